"""Every PHANGS key entry is used or refused (keyschema), and the ones made real change the plan.

The schema walk: every master-key entry, config type and config field, derived parameter and
moment parameter the readers know has a decision in the table, and the table decides nothing
the readers do not know. Every refused entry, set by a key, is a ConfigError naming that key
line. The entries this version made real (config res_*, flag_edge_fraction, combinespw,
array_tag timebin, the override key) are shown to change the plan or the CASA call they feed. Pure Python.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from hpcddf.errors import ConfigError
from hpcddf.phangs import keys as K
from hpcddf.phangs import keyschema as S
from hpcddf.phangs import plan as P
from hpcddf.phangs.casa_common import edge_channels
from hpcddf.phangs.casaenv import casa_argv
from hpcddf.phangs.keyreaders import DERIVED_PARAMS, _config_fields
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.plan_chain import _resolutions, config_resolutions
from hpcddf.phangs.project import CONFIG_TYPES, MomentDef, Project
from tests.unit.test_phangs_plan import make_ms

DATA = Path(__file__).resolve().parents[1] / "data" / "phangs_keys"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(DATA, target)
    return target


def append(keys: Path, name: str, line: str) -> int:
    """Add a line to a key file; its line number."""
    path = keys / name
    text = path.read_text()
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + line + "\n")
    return len((text + line).splitlines())


# ---------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------

def _reader_schema() -> dict[str, set[str]]:
    """What the readers accept, section by section (the names the table must decide)."""
    out = {"master": set(K._SINGLE_ENTRIES + K._ROOT_LISTS + K.KEY_KINDS),
           "config type": set(CONFIG_TYPES), "derived": set(DERIVED_PARAMS),
           "moment": {f.name for f in dataclasses.fields(MomentDef) if f.name != "name"}}
    for kind, cls in CONFIG_TYPES.items():
        out[f"{kind} parameter"] = set(_config_fields(cls))
    out["singledish product"] = {"line_product", "cont_product"}   # what a line feathers
    return out


def test_every_entry_the_readers_accept_has_exactly_one_decision() -> None:
    readers = _reader_schema()
    assert set(S.SECTIONS) == set(readers)
    for section, names in readers.items():
        assert set(S.SECTIONS[section]) == names, section
    for section, table in S.SECTIONS.items():
        for name, d in table.items():
            assert d.note, (section, name)
            assert d.used or d.fix, (section, name)          # a refusal says what to do


def _non_default(section: str, name: str) -> Any:
    kind = section.removesuffix(" parameter")
    expected, default = _config_fields(CONFIG_TYPES[kind])[name]
    if expected is bool:
        return not default
    if expected in (int, float):
        return default + 1
    return {str: "x", list: [1.0], dict: {"a": 1}}[expected]


_CONFIG_NAMES = {"line_product": "co21", "cont_product": "cont", "interf_config": "12m",
                 "feather_config": "7m+tp", "singledish_config": "tp", "array_tag": "12m"}


def _refusing_line(section: str, name: str) -> tuple[str, str]:
    """(key file, a line that sets the refused entry)."""
    if section == "master":
        return "master_key.txt", f"{name}  somewhere.txt"
    if section == "config type":
        return "config_definitions.txt", f"{name}  {_CONFIG_NAMES[name]}  {{}}"
    if section == "singledish product":
        return "singledish_key.txt", "ngc0628  cont  ngc0628_tp_cont.fits"
    if section == "derived":
        return "derived_key.txt", f"all  all_line  {name}  {{'window':'30km/s'}}"
    kind = section.removesuffix(" parameter")
    value = _non_default(section, name)
    return "config_definitions.txt", f"{kind}  {_CONFIG_NAMES[kind]}  {{'{name}':{value!r}}}"


@pytest.mark.parametrize("section,name", S.refused_entries())
def test_every_refused_entry_set_by_a_key_is_an_error_at_its_line(keys: Path, section: str,
                                                                 name: str) -> None:
    assert section != "moment"                                 # none refused: no line form
    fname, line = _refusing_line(section, name)
    number = append(keys, fname, line)
    with pytest.raises(ConfigError) as err:
        load_project(keys / "master_key.txt")
    assert str(err.value).startswith(f"{keys / fname}:{number}: ")
    kind = section.removesuffix(" parameter").removeprefix("singledish product")
    # a parameter of a refused config type is refused with its type, on the same line
    types = S.CONFIG_TYPE_DECISIONS
    named = kind if kind in types and not types[kind].used else name
    assert "refused" in str(err.value) and repr(named) in str(err.value)


@pytest.mark.parametrize("line,message", [
    ("ngc9999  co21  x.fits", "target 'ngc9999' is not a target"),
    ("ngc0628  co32  x.fits", "product 'co32' is not a line product")])
def test_a_singledish_line_naming_nothing_is_an_error(keys: Path, line: str,
                                                      message: str) -> None:
    number = append(keys, "singledish_key.txt", line)
    with pytest.raises(ConfigError, match=message) as err:
        load_project(keys / "master_key.txt")
    assert str(err.value).startswith(f"{keys / 'singledish_key.txt'}:{number}: ")
    assert "\n" not in str(err.value)


def test_a_refused_parameter_spelled_at_its_default_is_accepted(keys: Path) -> None:
    append(keys, "config_definitions.txt", "interf_config 12m {'clean_scales_auto':False}")
    load_project(keys / "master_key.txt")


def test_the_example_keys_and_the_simulated_galaxy_set_nothing_refused(tmp_path: Path) -> None:
    from hpcddf.phangs.galaxy import GalaxySpec, key_files
    load_project(DATA / "master_key.txt")
    master = key_files(GalaxySpec(), "sim.ms", "vfield.fits")["master_key.txt"]
    entries = [line.split()[0] for line in master.splitlines()
               if line.strip() and not line.startswith("#")]
    assert all(S.decision("master", e).used for e in entries)


# ---------------------------------------------------------------------------------------------
# Made real: res_*
# ---------------------------------------------------------------------------------------------

def test_config_res_fields_add_the_configs_resolutions_to_the_derived_chain(keys: Path) -> None:
    append(keys, "config_definitions.txt",
           "interf_config 12m {'res_min_arcsec':1.0,'res_max_arcsec':1.5,'res_step_factor':1.2,"
           "'res_list':[2.0, 4.0],'res_min_pc':100,'res_max_pc':200}")
    append(keys, "config_definitions.txt", "interf_config 12m {'res_step_factor':2.0}")
    project = load_project(keys / "master_key.txt")
    ang, phys = config_resolutions(project, "12m")
    assert ang == {"2p00as": 2.0, "4p00as": 4.0, "1p00as": 1.0}
    assert sorted(ang.values()) == pytest.approx([1.0, 2.0, 4.0])       # 1.0*2 > 1.5: one step
    assert phys == {"100pc": 100.0, "200pc": 200.0}
    levels = _resolutions(project, "ngc0628", "12m", "co21")
    tags = [lvl["tag"] for lvl in levels]
    # the derived key's 1as (1.0") is the config's 1.0": kept once, under the key's tag
    assert tags[:3] == ["1as", "2p00as", "4p00as"] and "1p00as" not in tags
    assert {"100pc", "200pc", "60pc"} <= set(tags)
    before = _resolutions(load_project(DATA / "master_key.txt"), "ngc0628", "12m", "co21")
    assert len(levels) == len(before) + 4


def test_the_res_ladder_reaches_res_max(keys: Path) -> None:
    project = load_project(keys / "master_key.txt")           # 12m+7m: 1.0 .. 3.0 by 1.1
    ang, _ = config_resolutions(project, "12m+7m")
    values = sorted(ang.values())
    assert values[0] == 1.0 and values[-1] <= 3.0 < values[-1] * 1.1
    assert len(values) == 12


@pytest.mark.parametrize("params,message", [
    ("{'res_min_arcsec':1.0}", "do not make a range"),
    ("{'res_min_pc':300,'res_max_pc':100,'res_step_factor':1.5}", "do not make a range"),
    ("{'res_min_arcsec':1.0,'res_max_arcsec':2.0}", "res_step_factor 1 must be > 1"),
    ("{'res_step_factor':1.5}", "res_step_factor without res_min/res_max"),
    ("{'res_list':[1.0, -2]}", "res_list entry -2"),
])
def test_bad_res_fields_are_errors_at_their_line(keys: Path, params: str, message: str) -> None:
    number = append(keys, "config_definitions.txt", f"interf_config 12m {params}")
    with pytest.raises(ConfigError, match=message) as err:
        load_project(keys / "master_key.txt")
    assert str(err.value).startswith(f"{keys / 'config_definitions.txt'}:{number}: ")


# ---------------------------------------------------------------------------------------------
# Made real: flag_edge_fraction and combinespw
# ---------------------------------------------------------------------------------------------

def _task_params(project: Project, task_id: str) -> dict[str, Any]:
    return {t.id: t for t in P.plan_tasks(P.plan_project(project))}[task_id].params


def test_flag_edge_fraction_and_combinespw_reach_the_casa_calls(keys: Path) -> None:
    make_ms(keys)
    ms_id = "stage_ms/ngc0628/co21/2017.1.00886.L/7m/1"
    default = _task_params(load_project(keys / "master_key.txt"), ms_id)
    assert (default["flag_edge_fraction"], default["combinespw"]) == (0.0, False)
    append(keys, "config_definitions.txt",
           "line_product co21 {'flag_edge_fraction':0.1,'combinespw':True}")
    p = _task_params(load_project(keys / "master_key.txt"), ms_id)
    assert (p["flag_edge_fraction"], p["combinespw"]) == (0.1, True)
    # the runner's options, as run_stage_ms passes them, are ones casa_tasks accepts
    from hpcddf.phangs.casa_tasks import build_parser
    env = type("Env", (), {"python": "python"})()
    split = casa_argv(env, "split", vis="a.ms", outputvis="b.ms", margin_kms=50.0,
                      flag_edge_fraction=p["flag_edge_fraction"], restfreq_ghz=230.5,
                      vsys_kms=600.0, vwidth_kms=100.0)
    contsub = casa_argv(env, "contsub", vis="a.ms", outputvis="b.ms", fitorder=0,
                        combinespw=p["combinespw"], restfreq_ghz=230.5, vsys_kms=600.0,
                        vwidth_kms=100.0)
    assert build_parser().parse_args(split[3:]).flag_edge_fraction == 0.1
    assert build_parser().parse_args(contsub[3:]).combinespw is True


def test_array_tag_timebin_reaches_the_split(keys: Path) -> None:
    make_ms(keys)
    ms_id = "stage_ms/ngc0628/co21/2017.1.00886.L/7m/1"
    assert _task_params(load_project(keys / "master_key.txt"), ms_id)["timebin"] == "0s"
    append(keys, "config_definitions.txt", "array_tag 7m {'timebin':'30s'}")
    project = load_project(keys / "master_key.txt")
    assert _task_params(project, ms_id)["timebin"] == "30s"
    assert _task_params(project, "stage_ms/ngc0628/co21/2017.1.00886.L/12m/1")["timebin"] == "0s"
    from hpcddf.phangs.casa_tasks import build_parser
    from hpcddf.phangs.run_casa_stages import _timebin
    env = type("Env", (), {"python": "python"})()
    argv = casa_argv(env, "split", vis="a.ms", outputvis="b.ms", continuum=True,
                     timebin=_timebin({"timebin": "30s"}))
    assert build_parser().parse_args(argv[3:]).timebin == "30s"
    assert _timebin({"timebin": "0s"}) is None and _timebin({}) is None


@pytest.mark.parametrize("line,message", [
    ("array_tag 8m {'timebin':'30s'}", "no array tag of the ms key"),
    ("array_tag 7m {'timebin':'thirty'}", "is not a time")])
def test_bad_array_tags_are_errors_at_their_line(keys: Path, line: str, message: str) -> None:
    number = append(keys, "config_definitions.txt", line)
    with pytest.raises(ConfigError, match=message) as err:
        load_project(keys / "master_key.txt")
    assert str(err.value).startswith(f"{keys / 'config_definitions.txt'}:{number}: ")


def test_edge_channels_are_the_fraction_at_both_ends() -> None:
    assert edge_channels(100, 0.0) == set()
    assert edge_channels(100, 0.05) == set(range(5)) | set(range(95, 100))
    assert edge_channels(10, 0.01) == {0, 9}                 # any fraction flags a channel
    assert edge_channels(3, 0.49) == {0, 1, 2}


@pytest.mark.parametrize("value", ["0.5", "-0.1"])
def test_flag_edge_fraction_out_of_range_is_an_error(keys: Path, value: str) -> None:
    number = append(keys, "config_definitions.txt",
                    f"line_product co21 {{'flag_edge_fraction':{value}}}")
    with pytest.raises(ConfigError, match="flag_edge_fraction") as err:
        load_project(keys / "master_key.txt")
    assert str(err.value).startswith(f"{keys / 'config_definitions.txt'}:{number}: ")


# ---------------------------------------------------------------------------------------------
# Made real: the override key
# ---------------------------------------------------------------------------------------------

def test_overrides_set_tclean_parameters_of_the_named_cube(keys: Path) -> None:
    make_ms(keys)
    cube = "imaging/ngc0628/co21/12m+7m"
    (keys / "overrides.txt").write_text("")
    plain = _task_params(load_project(keys / "master_key.txt"), cube)["recipes"]
    shutil.copy(DATA / "overrides.txt", keys / "overrides.txt")
    line = append(keys, "overrides.txt", "ngc0628_12m+7m_co21_multiscale  robust  2.0")
    project = load_project(keys / "master_key.txt")
    img = _task_params(project, cube)
    assert plain["dirty"].get("imsize") != [1024, 1024]
    for stage in ("dirty", "multiscale", "singlescale"):
        assert img["recipes"][stage]["imsize"] == [1024, 1024]
        assert img["recipes"][stage]["cell"] == "0.2arcsec"
    assert img["recipes"]["multiscale"]["robust"] == 2.0          # the stage's own line
    assert img["recipes"]["dirty"].get("robust") == plain["dirty"].get("robust") != 2.0
    assert any(f"overrides.txt:{line}: multiscale tclean robust=2.0" in n
               for n in img["overrides"])
    other = _task_params(project, "imaging/ngc0628/co21/12m")    # another cube: untouched
    assert "imsize" not in other["recipes"]["dirty"] and other["overrides"] == []


@pytest.mark.parametrize("line,message", [
    ("ngc0628_12m+7m_co22  robust  0.5", "no cube this project images"),
    ("ngc0628_12m+7m_co21_final  robust  0.5", "no cube this project images"),
    ("ngc0628_12m+7m_co21  robustness  0.5", "not a tclean parameter"),
    ("ngc0628_12m+7m_co21  niter  1000", "set by the imaging stages"),
])
def test_bad_overrides_are_errors_at_their_line(keys: Path, line: str, message: str) -> None:
    number = append(keys, "overrides.txt", line)
    with pytest.raises(ConfigError, match=message) as err:
        load_project(keys / "master_key.txt")
    assert str(err.value).startswith(f"{keys / 'overrides.txt'}:{number}: ")
