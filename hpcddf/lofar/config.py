"""Pipeline configuration compatible with ddf-pipeline: .cfg files plus ``--section-option=value``.

Layering follows ddf-pipeline exactly: the option table's defaults, then each config file in the
order given (later files win), then the command-line overrides in order (later ones win).
Unlike ddf-pipeline, nothing is ``eval``'d (lists and tuples go through ``ast.literal_eval``) and
an unknown section or option is an error that names the closest valid one instead of being
silently ignored.
"""

from __future__ import annotations

import ast
import configparser
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from hpcddf.errors import ConfigError
from hpcddf.lofar.options import OPTIONS, SECTIONS, Option, lookup

_OVERRIDE = re.compile(r"^--(\w+)-(\w+)\s*=\s*(.*)$", re.DOTALL)
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}
CATALOG_TOKEN = "$$"


@dataclass(frozen=True)
class Override:
    section: str
    name: str
    value: str

    @property
    def origin(self) -> str:
        return f"--{self.section}-{self.name}"


@dataclass(frozen=True)
class PipelineConfig:
    """The effective, typed configuration: ``cfg["control"]["restart"]``.

    ``origins`` says where each non-default value came from (a file path or an override), so
    ``config show`` and ``summary.txt`` can tell the user why a value is what it is.
    """

    values: Mapping[str, Mapping[str, Any]]
    origins: Mapping[tuple[str, str], str] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    def __getitem__(self, section: str) -> Mapping[str, Any]:
        return self.values[section]

    def get(self, section: str, name: str) -> Any:
        opt = lookup(section, name)
        if opt is None:
            raise KeyError(f"[{section}] {name}")
        return self.values[section][opt.name]

    def items(self) -> Iterator[tuple[Option, Any]]:
        for opt in OPTIONS:
            yield opt, self.values[opt.section][opt.name]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dict(v) for s, v in self.values.items()}

    def to_cfg_text(self) -> str:
        """The effective configuration as a ddf-pipeline .cfg (loads back to the same values)."""
        lines: list[str] = []
        for section in SECTIONS:
            lines.append(f"[{section}]")
            for opt in OPTIONS:
                if opt.section == section:
                    lines.append(f"{opt.name} = {format_value(self.values[section][opt.name])}")
            lines.append("")
        return "\n".join(lines)


def format_value(value: Any) -> str:
    """Render a value the way a .cfg file writes it (``None``, ``True``, ``[1, 2]``)."""
    return repr(value) if isinstance(value, (list, tuple)) else str(value)


def parse_override(arg: str) -> Override:
    """``--control-restart=False`` -> Override("control", "restart", "False")."""
    m = _OVERRIDE.match(arg)
    if m is None:
        raise ConfigError(f"cannot parse option {arg!r}",
                          "write overrides as --section-option=value, e.g. --control-restart=False")
    return Override(*m.groups())


def is_override(arg: str) -> bool:
    return arg.startswith("--") and "=" in arg and _OVERRIDE.match(arg) is not None


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    pool = list(candidates)
    lowered = {c.lower(): c for c in pool}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def _unknown_section(section: str, where: str) -> ConfigError:
    best = _closest(section, SECTIONS)
    hint = f"did you mean [{best}]?" if best else f"valid sections: {', '.join(SECTIONS)}"
    return ConfigError(f"{where}: unknown section [{section}]", hint)


def _unknown_option(section: str, name: str, where: str) -> ConfigError:
    names = [o.name for o in OPTIONS if o.section == section]
    best = _closest(name, names)
    if best is None:  # maybe it lives in another section
        other = [o for o in OPTIONS if o.name.lower() == name.lower()]
        if other:
            return ConfigError(f"{where}: unknown option {name!r} in [{section}]",
                               f"{name} belongs in [{other[0].section}]")
    hint = f"did you mean {best!r}?" if best else f"valid options: {', '.join(names)}"
    return ConfigError(f"{where}: unknown option {name!r} in [{section}]", hint)


def _read_cfg(path: str) -> configparser.RawConfigParser:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory", "pass a ddf-pipeline .cfg file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist", "check the path")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"config file {path} is not readable", f"chmod u+r {path}")
    # strict: an option or section given twice in one file is an error, as in ddf-pipeline
    parser = configparser.RawConfigParser(strict=True)
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh, source=path)
    except configparser.Error as exc:
        # configparser spreads one error over several lines (which line, its text): join them
        first = " ".join(ln.strip() for ln in str(exc).strip().splitlines() if ln.strip())
        twice = isinstance(exc, (configparser.DuplicateOptionError, configparser.DuplicateSectionError))
        raise ConfigError(f"config file {path} has a syntax error: {first}",
                          "give each section and option once in a file" if twice
                          else "use [section] headers and name = value lines") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text", "pass a ddf-pipeline .cfg file") from None
    return parser


def convert(opt: Option, raw: str, where: str) -> Any:
    """Turn the text of one option into its typed value; ``None`` means None for every type."""
    text = raw.strip()
    if text == "None":
        return None
    try:
        if opt.type == "bool":
            return _to_bool(text)
        typed = convert_typed(opt, text)
    except ValueError as exc:
        raise ConfigError(f"{where}: [{opt.section}] {opt.name} = {text!r}: {exc}",
                          f"{opt.name} must be {_describe(opt)}") from None
    if opt.type in ("int", "float", "list"):
        return _in_range(opt, typed, text, where)
    if opt.choices and text not in opt.choices:
        raise ConfigError(f"{where}: [{opt.section}] {opt.name} = {text!r} is not a valid choice",
                          f"use one of {', '.join(opt.choices)}")
    return raw.strip()


def convert_typed(opt: Option, text: str) -> Any:
    """An int, float or list option's value (ValueError when it is not one)."""
    if opt.type == "int":
        return int(text)
    if opt.type == "float":
        value = float(text)
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if opt.type == "list":
        return _to_list(opt, text)
    return text


# Values DDFacet, killMS or the plan cannot work with, refused before anything is queued
# (ddf-pipeline would fail hours later, or divide by zero): sizes, cells, beams and counts must
# be positive, the mask thresholds a non-empty list of positive numbers.
POSITIVE = {("solutions", "ndir"), ("machine", "NCPU_DDF"), ("machine", "NCPU_killms"),
            *(("image", n) for n in ("wide_imsize", "wide_cell", "wide_psf_arcsec", "imsize", "cellsize",
                                     "psf_arcsec", "final_psf_arcsec", "final_psf_minor_arcsec",
                                     "low_psf_arcsec", "low_cell", "low_imsize", "vlow_psf_arcsec",
                                     "vlow_cell", "vlow_imsize", "HMPsize"))}
NONEMPTY_POSITIVE_LISTS = {("masking", "thresholds")}


def _in_range(opt: Option, value: Any, text: str, where: str) -> Any:
    if opt.key in POSITIVE and value <= 0:
        raise ConfigError(f"{where}: [{opt.section}] {opt.name} = {text} is not positive",
                          f"{opt.name} must be above 0 (or None where that is allowed)")
    if opt.key in NONEMPTY_POSITIVE_LISTS and (not value or any(v is None or v <= 0 for v in value)):
        raise ConfigError(f"{where}: [{opt.section}] {opt.name} = {text} is not a list of positive numbers",
                          f"give at least one, e.g. {format_value(opt.default)}")
    return value


def _describe(opt: Option) -> str:
    if opt.type == "list":
        return f"a list literal of {opt.item or 'values'}, e.g. {format_value(opt.default or [1, 2])}"
    return {"int": "an integer", "float": "a number", "bool": "True or False"}.get(opt.type, "text")


def _to_bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("not a boolean")


def _to_list(opt: Option, text: str) -> list[Any]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("not a list literal") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError("not a list literal")
    return [_check_item(opt, v) for v in value]


def _check_item(opt: Option, v: Any) -> Any:
    item = opt.item or "any"
    if item == "any" or v is None:
        return v
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
    }[item]
    if not ok:
        raise ValueError(f"element {v!r} is not {item}")
    return float(v) if item == "float" else v


def _expand_catalogs(value: Any, catalog_dir: str | None) -> Any:
    if catalog_dir is None:
        return value
    if isinstance(value, str):
        return value.replace(CATALOG_TOKEN, catalog_dir)
    if isinstance(value, list):
        return [_expand_catalogs(v, catalog_dir) for v in value]
    return value


def load_config(sources: Iterable[str] = (), overrides: Iterable[str | Override] = (),
                catalog_dir: str | None = None) -> PipelineConfig:
    """Defaults < each .cfg file in order < each override in order.

    ``$$`` in string values expands to ``catalog_dir`` (the site's catalogue directory, else
    ``$DDF_PIPELINE_CATALOGS``); with neither it is left as written.
    """
    catalog_dir = catalog_dir or os.environ.get("DDF_PIPELINE_CATALOGS") or None
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for opt in OPTIONS:
        values[opt.section][opt.name] = _copy(opt.default)
    origins: dict[tuple[str, str], str] = {}
    files = tuple(str(s) for s in sources)
    for path in files:
        parser = _read_cfg(path)
        for section in parser.sections():
            if section not in values:
                raise _unknown_section(section, path)
            for name, raw in parser.items(section):
                _set(values, origins, section, name, raw, path)
    for ov in overrides:
        ov = ov if isinstance(ov, Override) else parse_override(ov)
        if ov.section not in values:
            raise _unknown_section(ov.section, ov.origin)
        _set(values, origins, ov.section, ov.name, ov.value, ov.origin)
    for opt in OPTIONS:
        values[opt.section][opt.name] = _expand_catalogs(values[opt.section][opt.name], catalog_dir)
    return PipelineConfig(values=values, origins=origins, files=files)


def _set(values: dict[str, dict[str, Any]], origins: dict[tuple[str, str], str],
         section: str, name: str, raw: str, where: str) -> None:
    opt = lookup(section, name)
    if opt is None:
        raise _unknown_option(section, name, where)
    values[section][opt.name] = convert(opt, raw, where)
    origins[(section, opt.name)] = where


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else v


# options read only when another one is on: their ``$$`` default needs no catalogue directory
# otherwise (hpcddf's additions default to a file in it)
READ_ONLY_WHEN: dict[tuple[str, str], tuple[str, str]] = {("spectra", "catalogue"): ("spectra", "do_dynspec")}


def uses_catalog_token(cfg: PipelineConfig) -> list[str]:
    """Options in use whose value still contains ``$$`` (no catalogue directory was known)."""
    found = []
    for opt, value in cfg.items():
        gate = READ_ONLY_WHEN.get(opt.key)
        if gate and not cfg.get(*gate):
            continue
        vals = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and CATALOG_TOKEN in v for v in vals):
            found.append(f"[{opt.section}] {opt.name}")
    return found


def split_cli_args(args: Iterable[str]) -> tuple[list[str], list[Override]]:
    """Separate a ddf-pipeline style argument mixture into config files and overrides."""
    files: list[str] = []
    overrides: list[Override] = []
    for arg in args:
        if arg.startswith("--"):
            overrides.append(parse_override(arg))
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}", "see --help")
        else:
            files.append(arg)
    return files, overrides


def resolve_path(path: str | None, base: Path) -> Path | None:
    """A config path relative to the field directory, as ddf-pipeline runs inside it."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p
