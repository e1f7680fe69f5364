"""Site configs: one TOML file per cluster describing its scheduler, nodes, container and paths.

Sites are looked up by name in, first to last: ``--site-file``, ``$HPCDDF_SITES_DIR``,
``~/.config/hpcddf/sites/`` and the configs shipped with hpcddf (``site_configs/``). A user file
with the same name as a shipped one replaces it. Every key is checked when loaded: unknown keys
(with the closest valid one), wrong types and impossible values are one-line errors, so a typo
never reaches ``sbatch``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from hpcddf.errors import SiteError

SCHEDULERS = ("slurm", "local")
RUNTIMES = ("apptainer", "singularity", "charliecloud", "none")
# sbatch options hpcddf sets itself; a site may not override them through extra_sbatch
MANAGED_SBATCH = ("job-name", "output", "error", "array", "dependency", "time", "partition",
                  "account", "qos", "nodes", "ntasks", "cpus-per-task", "mem", "exclusive",
                  "signal", "requeue", "kill-on-invalid-dep", "open-mode", "wrap", "chdir", "comment")
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


@dataclass(frozen=True)
class SlurmSection:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool = True
    max_walltime: str = "24:00:00"
    max_requeues: int = 5
    signal_delay_s: int = 300
    # ask for the walltime measured step durations need (and split a stage that would not fit)
    size_from_measurements: bool = True
    # cores for a job of light steps only (masks, catalogues, reports); 0: every stage a whole node
    light_cpus: int = 0
    # most tasks in one job array (0: the cluster's MaxArraySize); larger submissions are split
    max_array_size: int = 0
    # a guard job per chain resubmits a field whose stage failed transiently (recovery.py);
    # off by default: the site's compute nodes must be allowed to run sbatch
    auto_recover: bool = False
    max_retries: int = 2  # automatic resubmissions per stage
    # hours every job of the site avoids a node that failed under one (exclusions.py); 0: never
    exclude_node_hours: float = 24.0
    extra_sbatch: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeSection:
    cpus: int | str = 1          # "auto": this machine's CPUs (for the local site)
    mem_gb: int | str = 4        # "auto": this machine's memory
    scratch_dir: str = "$TMPDIR/hpcddf-$SLURM_JOB_ID"
    scratch_min_free_gb: float = 10.0


@dataclass(frozen=True)
class PreflightSection:
    shm_min_fraction: float = 0.5
    thp_defrag: list[str] = field(default_factory=lambda: ["never", "defer", "madvise"])
    min_max_map_count: int = 65530
    min_memlock_kb: int = 0
    require_swap: bool = False


@dataclass(frozen=True)
class ContainerSection:
    runtime: str = "none"
    executable: str | None = None
    image: str | None = None
    binds: list[str] = field(default_factory=list)
    # Variables the site passes into every container (licence servers, PYTHONPATH, ...): the
    # container starts from a clean environment, so nothing else from the job's leaks in.
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PathsSection:
    work_root: str = "~/hpcddf-fields"
    data_root: str | None = None
    catalog_dir: str | None = None


@dataclass(frozen=True)
class CataloguesSection:
    """Where the login node may download a catalogue a configuration needs and nobody has put
    in place (compute nodes often have no network). URLs are the site's data, never hpcddf's."""

    # one cone query per PanSTARRS tile: {ra} and {dec} its centre, {radius} its radius (degrees)
    panstarrs_url: str | None = None
    # whole catalogues by their file name in [paths] catalog_dir (TGSS, VLSS, WENSS, ...) -> URL
    files: dict[str, str] = field(default_factory=dict)
    # [control] redo_DI's sky model by its redo_DI_type (GSM, TGSS) -> a cone-query template
    # like panstarrs_url's ({ra}, {dec}, {radius}: 5 deg around the field, as ddf-pipeline asks)
    skymodel_urls: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 300
    max_mb: int = 2000


@dataclass(frozen=True)
class FieldsSection:
    pattern: str = r"L[0-9]{5,7}"
    max_running: int = 10


@dataclass(frozen=True)
class SurveySection:
    # The survey ledger (`hpcddf survey`): a MySQL/MariaDB URL for shared operation
    # ("mysql+pymysql://user:${PASSWORD_VAR}@host/db"), or the path of a SQLite file on a LOCAL
    # disk of the machine that runs the tick (SQLite's locking is unreliable on NFS/Lustre).
    # $VARS are expanded when used. None: $XDG_STATE_HOME/hpcddf/survey-<site>.sqlite.
    database: str | None = None
    # How `survey tick` brings a field's data: an argv run on the login node through the
    # runner, {field} the field id and {dest} the directory its files go to (archive tarballs
    # there are unpacked, as ddf-pipeline's unpack does), e.g.
    # ["rsync", "-a", "archive:/lofar/{field}/", "{dest}/"]. Empty: the data is put in the field
    # directory (or under [paths] data_root) by other means, and a field without it waits.
    fetch: list[str] = field(default_factory=list)
    fetch_timeout_s: int = 3600
    fetch_per_tick: int = 4   # fields one tick fetches (one after another, on the login node)
    fetch_retries: int = 3    # failed fetches of a field before it is failed
    max_queued: int = 50      # fields queued or reducing at once; a tick submits up to it
    tick_minutes: float = 15.0  # `survey run`: minutes between the start of one tick and the next


@dataclass(frozen=True)
class Site:
    """A cluster (or this machine) as hpcddf needs to know it."""

    name: str
    path: str
    scheduler: str = "slurm"
    description: str = ""
    slurm: SlurmSection = field(default_factory=SlurmSection)
    node: NodeSection = field(default_factory=NodeSection)
    preflight: PreflightSection = field(default_factory=PreflightSection)
    container: ContainerSection = field(default_factory=ContainerSection)
    paths: PathsSection = field(default_factory=PathsSection)
    catalogues: CataloguesSection = field(default_factory=CataloguesSection)
    fields: FieldsSection = field(default_factory=FieldsSection)
    survey: SurveySection = field(default_factory=SurveySection)

    @property
    def cpus(self) -> int:
        """CPUs of one node; "auto" means the CPUs this process may use."""
        if self.node.cpus == "auto":
            return len(os.sched_getaffinity(0))
        return int(self.node.cpus)

    @property
    def mem_gb(self) -> int:
        """Memory of one node in GB; "auto" means this machine's physical memory."""
        if self.node.mem_gb == "auto":
            return max(1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30)
        return int(self.node.mem_gb)

    @property
    def max_walltime_min(self) -> int:
        return walltime_minutes(self.slurm.max_walltime)

    @property
    def work_root(self) -> Path:
        return expand_login_path(self.paths.work_root)

    @property
    def data_root(self) -> Path | None:
        return expand_login_path(self.paths.data_root) if self.paths.data_root else None

    @property
    def catalog_dir(self) -> Path | None:
        return expand_login_path(self.paths.catalog_dir) if self.paths.catalog_dir else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expand_login_path(p: str) -> Path:
    """Expand ``~`` and ``$VARS`` now (paths the login node and the jobs share)."""
    return Path(os.path.expandvars(os.path.expanduser(p)))


# characters that would break out of an "#SBATCH --key=value" line or into a shell
_SBATCH_FORBIDDEN = set("\n\r\0`$;\\\"'<>")


def walltime_minutes(text: str) -> int:
    """Slurm's time formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) as whole minutes, seconds rounded up."""
    m = _WALLTIME.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a walltime")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is None:
        h, mi, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    else:
        h, mi, s = (parts + [0, 0])[:3]
    # Slurm refuses a field out of its range (only the leading one may be larger)
    if s >= 60 or (mi >= 60 and (days is not None or len(parts) == 3)) or (days is not None and h >= 24):
        raise ValueError(f"{text!r} has a field out of range (seconds and minutes < 60, hours < 24 after days)")
    total = int(days or 0) * 1440 + h * 60 + mi + (1 if s else 0)
    if total <= 0:
        raise ValueError(f"{text!r} is zero")
    return total


# ------------------------------------------------------------------- validation of the TOML

def _type_ok(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is None:
        if hint is float:  # NaN and infinity are no settings
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if hint is bool:
            return isinstance(value, bool)
        return isinstance(value, hint)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _type_ok(v, args[1]) for k, v in value.items())
    # X | None
    return any(_type_ok(value, a) for a in args if a is not type(None))


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is list:
        return f"a list of {_type_name(get_args(hint)[0])}"
    if origin is dict:
        return "a table of strings"
    if origin is None:
        return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
            hint, hint.__name__)
    return " or ".join(_type_name(a) for a in get_args(hint) if a is not type(None))


def _build(cls: type, data: dict[str, Any], where: str, fixed: dict[str, Any] | None = None) -> Any:
    """``cls`` from a TOML table, checking every key and type; ``fixed`` keys are not the user's."""
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = dict(fixed or {})
    names = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs]
    for key, value in data.items():
        if key not in names:
            best = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"did you mean {best[0]!r}?" if best else f"valid keys: {', '.join(names)}"
            raise SiteError(f"{where}: unknown key {key!r}", hint)
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            if not isinstance(value, dict):
                raise SiteError(f"{where}: [{key}] must be a table", f"write it as [{key}]")
            kwargs[key] = _build(hint_t, value, f"{where} [{key}]")
            continue
        if not _type_ok(value, hint_t):
            raise SiteError(f"{where}: {key} = {value!r} has the wrong type",
                            f"{key} must be {_type_name(hint_t)}")
        kwargs[key] = float(value) if hint_t is float else value
    return cls(**kwargs)


def _check_survey(site: Site, bad: Callable[[str, str], SiteError]) -> None:
    sv = site.survey
    small = [k for k in ("fetch_timeout_s", "fetch_per_tick", "max_queued") if getattr(sv, k) < 1]
    small += [k for k in ("fetch_retries",) if sv.fetch_retries < 0]
    small += [k for k in ("tick_minutes",) if sv.tick_minutes <= 0]
    if small:
        raise bad(f"[survey] {small[0]} = {getattr(sv, small[0])} is impossible", f"make {small[0]} larger")
    if sv.fetch and not any("{field}" in a for a in sv.fetch):
        raise bad("[survey] fetch does not name {field}: every field would fetch the same data",
                  'put {field} (and {dest}) in its arguments, e.g. ["rsync", "-a", "src/{field}/", "{dest}/"]')


def _check_values(site: Site) -> None:
    """Impossible values, each with what to do about it."""
    def bad(msg: str, hint: str) -> SiteError:
        return SiteError(f"site {site.name} ({site.path}): {msg}", hint)

    if site.scheduler not in SCHEDULERS:
        raise bad(f"scheduler {site.scheduler!r} is unknown", f"use one of {', '.join(SCHEDULERS)}")
    if site.container.runtime not in RUNTIMES:
        raise bad(f"container runtime {site.container.runtime!r} is unknown",
                  f"use one of {', '.join(RUNTIMES)}")
    if site.container.runtime != "none" and not site.container.image:
        raise bad(f"container runtime {site.container.runtime} needs an image",
                  "set [container] image to the SIF or image directory")
    for key in ("cpus", "mem_gb"):
        value = getattr(site.node, key)
        if isinstance(value, str) and value != "auto":
            raise bad(f"[node] {key} = {value!r} is not a number", 'give a whole number or "auto"')
        if isinstance(value, int) and value < 1:
            raise bad(f"[node] {key} = {value} is impossible", f"{key} must be at least 1")
    if not 0 < site.preflight.shm_min_fraction <= 1:
        raise bad(f"shm_min_fraction {site.preflight.shm_min_fraction} is not in (0, 1]",
                  "give the fraction of node memory /dev/shm must offer, e.g. 0.5")
    if site.node.scratch_min_free_gb < 0:
        raise bad("scratch_min_free_gb is negative", "use 0 or more")
    try:
        walltime_min = walltime_minutes(site.slurm.max_walltime)
    except ValueError as exc:
        raise bad(f"max_walltime: {exc}", "use Slurm's format, e.g. \"72:00:00\" or \"2-00:00:00\"")
    negative = [k for k in ("max_requeues", "signal_delay_s", "light_cpus", "max_array_size", "max_retries",
                            "exclude_node_hours")
                if getattr(site.slurm, k) < 0]
    if negative:
        raise bad(f"{negative[0]} must be 0 or more (it is {getattr(site.slurm, negative[0])})",
                  f"fix [slurm] {negative[0]}")
    if site.slurm.signal_delay_s >= walltime_min * 60:
        raise bad(f"signal_delay_s = {site.slurm.signal_delay_s} is not below max_walltime "
                  f"{site.slurm.max_walltime}: the walltime signal would come before the job starts",
                  "make signal_delay_s a few minutes, well below max_walltime")
    _check_survey(site, bad)
    scratch = site.node.scratch_dir.strip()
    if not scratch.startswith(("/", "$", "~")):
        raise bad(f"[node] scratch_dir = {scratch!r} is a relative path",
                  'give an absolute path on the node, e.g. "$TMPDIR/hpcddf-$SLURM_JOB_ID"')
    if site.fields.max_running < 1:
        raise bad("[fields] max_running must be at least 1", "set how many fields may run at once")
    try:
        re.compile(site.fields.pattern)
    except re.error as exc:
        raise bad(f"[fields] pattern is not a regular expression: {exc}", "fix the pattern")
    _check_catalogues(site.catalogues, bad)
    for key in site.slurm.extra_sbatch:
        # submitit writes "job_name" as --job-name, and sbatch accepts unambiguous prefixes
        flag = key.lstrip("-").replace("_", "-")
        if flag and any(m.startswith(flag) for m in MANAGED_SBATCH):
            raise bad(f"extra_sbatch may not set {key!r}: hpcddf manages it",
                      "remove it; set partition/account/qos/max_walltime in [slurm]")
        bad_chars = sorted({ch for ch in f"{key}{site.slurm.extra_sbatch[key]}" if ch in _SBATCH_FORBIDDEN})
        if bad_chars:
            raise bad(f"extra_sbatch {key} contains {''.join(map(repr, bad_chars))}: it would reach the batch "
                      "script as it is", "use a plain sbatch value (constraints may use & and |)")


TILE_FIELDS = ("ra", "dec", "radius")


def _check_catalogues(cat: CataloguesSection, bad: Any) -> None:
    """URLs are http(s); the PanSTARRS template names only {ra}, {dec} and {radius}; the file
    names are plain names inside the catalogue directory."""
    import string
    templates = ([("panstarrs_url", cat.panstarrs_url)] if cat.panstarrs_url else []) + \
        [(f"skymodel_urls {kind!r}", url) for kind, url in cat.skymodel_urls.items()]
    urls = templates + [(f"files {name!r}", url) for name, url in cat.files.items()]
    for key, url in urls:
        if not url.startswith(("http://", "https://")):
            raise bad(f"[catalogues] {key} = {url!r} is not an http(s) URL", "give the full URL, http:// or https://")
    for key, url in templates:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(url) if f is not None}
        except ValueError as exc:
            raise bad(f"[catalogues] {key} is not a template: {exc}", "write {ra}, {dec} and {radius}; double other braces")
        if names - set(TILE_FIELDS):
            raise bad(f"[catalogues] {key} names {{{sorted(names - set(TILE_FIELDS))[0]}}}",
                      "use only {ra}, {dec} and {radius} (degrees)")
    for kind in cat.skymodel_urls:
        if kind not in ("GSM", "TGSS"):
            raise bad(f"[catalogues] skymodel_urls: {kind!r} is not a redo_DI_type", "use GSM or TGSS")
    for name in cat.files:
        if not name or "/" in name or name in (".", ".."):
            raise bad(f"[catalogues] files: {name!r} is not a file name", "give the name in [paths] catalog_dir, e.g. \"VLSS.fits\"")
    if cat.timeout_s < 1 or cat.max_mb < 1:
        raise bad("[catalogues] timeout_s and max_mb must be at least 1", "fix [catalogues]")


def load_site_file(path: str | os.PathLike[str], name: str | None = None) -> Site:
    """Read and validate one site TOML file."""
    path = Path(path)
    name = name or path.stem
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"site file {path} does not exist", "check the path") from None
    except PermissionError:
        raise SiteError(f"site file {path} is not readable", f"chmod u+r {path}") from None
    except IsADirectoryError:
        raise SiteError(f"site file {path} is a directory", "pass a site .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteError(f"site file {path} is not valid TOML: {exc}", "fix the syntax") from None
    if not isinstance(data, dict):
        raise SiteError(f"site file {path} is not a TOML table", "fix the syntax")
    site = _build(Site, data, f"site file {path}", fixed={"name": name, "path": str(path)})
    _check_values(site)
    return site


def site_dirs() -> list[Path]:
    """Where site files are looked for, highest priority first."""
    dirs = []
    if os.environ.get("HPCDDF_SITES_DIR"):
        dirs.append(Path(os.environ["HPCDDF_SITES_DIR"]))
    # an empty XDG_CONFIG_HOME counts as unset (XDG base directory spec)
    dirs.append(Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "hpcddf" / "sites")
    dirs.append(Path(str(resources.files("hpcddf.site_configs"))))
    return dirs


def available_sites() -> dict[str, Path]:
    """Site name -> file, user files shadowing shipped ones."""
    found: dict[str, Path] = {}
    for d in reversed(site_dirs()):
        if d.is_dir():
            for f in sorted(d.glob("*.toml")):
                found[f.stem] = f
    return dict(sorted(found.items()))


def load_site(name: str | None = None, site_file: str | None = None) -> Site:
    """The site named ``name`` (or the file ``site_file``)."""
    if site_file:
        return load_site_file(site_file)
    if not name:
        raise SiteError("no site given", "pass --site NAME (see `hpcddf sites`) or --site-file FILE")
    sites = available_sites()
    if name not in sites:
        best = difflib.get_close_matches(name, list(sites), n=1)
        hint = f"did you mean {best[0]!r}?" if best else f"known sites: {', '.join(sites)}"
        raise SiteError(f"unknown site {name!r}",
                        f"{hint} Add your own under ~/.config/hpcddf/sites/ or pass --site-file")
    return load_site_file(sites[name], name)
