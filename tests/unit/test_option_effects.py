"""No silent option: every option of ddf-pipeline's table is either used by hpcddf's code or
listed with the reason it has no effect here (never both), and a config that sets such an
option is told so, one line per option, by `config show` and `submit` (also --dry-run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import hpcddf
from hpcddf.lofar.config import load_config
from hpcddf.lofar.option_effects import NO_EFFECT, no_effect_warnings
from hpcddf.lofar.options import OPTIONS

PACKAGE = Path(hpcddf.__file__).parent
NOT_CODE = {"options.py", "option_effects.py"}  # the table and this list name every option


def _code() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if p.name not in NOT_CODE)


def _read_by_code(code: str, section: str, name: str) -> bool:
    """The code reads the option: cfg.get("section", "name") or cfg["section"]["name"]."""
    s, n = re.escape(section), re.escape(name)
    return bool(re.search(rf"""["']{s}["']\s*,\s*["']{n}["']""", code)
                or re.search(rf"""\[["']{s}["']\]\s*\[["']{n}["']\]""", code))


def test_every_option_is_used_or_said_to_have_no_effect():
    code = _code()
    silent = [f"[{o.section}] {o.name}" for o in OPTIONS if not _read_by_code(code, *o.key) and o.key not in NO_EFFECT]
    assert not silent, f"read by no code and not in option_effects.NO_EFFECT: {silent}"


def test_an_option_that_is_used_is_not_also_said_to_have_no_effect():
    code = _code()
    both = [f"[{s}] {n}" for s, n in NO_EFFECT if _read_by_code(code, s, n)]
    assert not both, f"used by the code yet listed in NO_EFFECT (remove them there): {both}"
    keys = {o.key for o in OPTIONS}
    assert set(NO_EFFECT) <= keys, set(NO_EFFECT) - keys


def test_a_config_setting_an_option_without_effect_gets_one_line_naming_it(tmp_path: Path):
    cfg_file = tmp_path / "lgps.cfg"
    cfg_file.write_text("[image]\nwscms_max_scale = 20\ncentralfreqs = [130.0, 150.0]\n[offsets]\nmode = test\n"
                        "[control]\nquiet = False\nmsss_mode = True\n")  # quiet's default: no effect either way
    lines = no_effect_warnings(load_config([str(cfg_file)], ["--control-nobar=True"]))
    assert len(lines) == 3, lines
    assert any(ln.startswith("warning: [control] msss_mode has no effect (set in ") for ln in lines)
    # used: spectral_restored's bands, and WSCMS's settings (passed to DDFacet with cleanmode WSCMS)
    assert not any("centralfreqs" in ln or "wscms" in ln for ln in lines)
    assert any("[offsets] mode has no effect" in ln and "normal mode" in ln for ln in lines)
    assert any("[control] nobar has no effect (set in --control-nobar)" in ln for ln in lines)
    assert no_effect_warnings(load_config([])) == []


def test_config_show_prints_the_warnings_on_stderr(tmp_path: Path):
    cfg_file = tmp_path / "t.cfg"
    cfg_file.write_text("[control]\nmsss_mode = True\n")
    out = subprocess.run([sys.executable, "-m", "hpcddf", "config", "show", str(cfg_file), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("has no effect") == 1 and "[control] msss_mode" in out.stderr
    assert "\"msss_mode\": true" in out.stdout


def test_a_clean_mode_ddfacet_091_lacks_runs_as_its_predecessor_with_a_warning(tmp_path: Path):
    """LGPS's WSCMS2 (and SSD3) are newer DDFacet modes: the images are cleaned with WSCMS, and
    the submit says so in one line instead of DDFacet failing on the node."""
    from hpcddf.lofar.ddfcommands import Image, deconv_mode
    cfg = load_config([], ["--image-cleanmode=WSCMS2"])
    line, masks = no_effect_warnings(cfg)
    assert "[image] cleanmode WSCMS2 is not in DDFacet 0.9.1.0" in line and "cleaned with WSCMS" in line
    assert "WSCMS auto-masking applies only to images without a clean mask" in masks
    assert deconv_mode(cfg, Image(name="x", mslist="m", colname="DATA")) == "WSCMS"
