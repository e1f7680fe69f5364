"""PHANGS key files -> Project: the full example key set, and every kind of bad key.

The example (tests/data/phangs_keys) is copied to a tmp dir per test, so its relative roots
(../ms_12m, ../work/imaging, ...) land in tmp and MS "files" can be created as directories.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpcddf.errors import ConfigError
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.project import Project, Window, cube_filename

DATA = Path(__file__).resolve().parents[1] / "data" / "phangs_keys"
CONFIGS_ALL = ["12m+7m", "12m", "7m", "12m+7m+tp", "7m+tp"]
RECIPES = "recipes/phangsalma_{}.clean"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(DATA, target)
    return target


@pytest.fixture
def project(keys: Path) -> Project:
    return load_project(keys / "master_key.txt")


def append(keys: Path, name: str, line: str) -> int:
    """Append a line to a key file; return its line number."""
    path = keys / name
    text = path.read_text()
    path.write_text(text + line + "\n")
    return len((text + line).splitlines())


def make_ms(keys: Path) -> None:
    """Empty MS directories: 12m data under ../ms_12m, 7m data under ../ms_7m."""
    for line in (keys / "ms_file_key.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            words = line.split()
            (keys.parent / f"ms_{words[3]}" / words[5]).mkdir(parents=True)


# ---------------------------------------------------------------------------------------------
# The full example
# ---------------------------------------------------------------------------------------------

def test_targets_mosaics_and_coordinates(project: Project) -> None:
    assert project.targets == ["ngc0628", "ngc1087", "ngc3627", "ngc3627_1", "ngc3627_2"]
    assert project.whole_targets == ["ngc0628", "ngc1087", "ngc3627"]
    assert project.linmos == {"ngc3627": ["ngc3627_1", "ngc3627_2"]}
    assert project.mosaic_for("ngc3627_2") == "ngc3627"
    assert project.mosaic_for("ngc0628") is None
    t = project.target_defs
    # 01h36m41.75s = (1 + 36/60 + 41.75/3600) * 15 deg; sexagesimal with colons: hours / deg
    assert t["ngc0628"].ra_deg == pytest.approx((1 + 36 / 60 + 41.75 / 3600) * 15)
    assert t["ngc0628"].dec_deg == pytest.approx(15 + 47 / 60 + 1.2 / 3600)
    assert t["ngc1087"].ra_deg == pytest.approx((2 + 46 / 60 + 25.16 / 3600) * 15)
    assert t["ngc1087"].dec_deg == pytest.approx(-(29 / 60 + 55.1 / 3600))
    assert t["ngc3627_2"].ra_deg == pytest.approx(170.0583)
    assert (t["ngc1087"].vsys_kms, t["ngc1087"].vwidth_kms) == (1517.0, 200.0)
    assert t["ngc0628"].ra == "01h36m41.75s"


def test_configs_merge_lines_keep_defaults_and_definition_order(project: Project) -> None:
    assert project.interf_configs == ["12m+7m", "12m", "7m"]
    assert project.feather_configs == ["12m+7m+tp", "7m+tp"]
    assert project.line_products == ["co21"]
    assert project.cont_products == ["cont"]
    c = project.configs
    both = c.interf_config["12m+7m"]
    assert both.array_tags == ["12m", "7m"]
    assert both.clean_scales_arcsec == [0, 1, 2, 4, 8]      # from the first line
    assert (both.res_min_arcsec, both.res_max_arcsec, both.res_step_factor) == (1.0, 3.0, 1.1)
    assert both.clean_scales_auto is False and both.requires == []   # defaults
    assert c.interf_config["7m"].clean_scales_arcsec == [0, 5, 10]   # dict with spaces
    co21 = c.line_product["co21"]                                    # three lines merged
    assert (co21.line_tag, co21.channel_kms, co21.statwt_edge_kms) == ("co21", 2.54, 50.0)
    assert co21.lines_to_flag == ["13co21", "c18o21"]
    assert co21.flag_edge_fraction == 0.0
    assert c.cont_product["cont"].freq_ranges_ghz == [[210.0, 235.0], [245.0, 260.0]]
    assert c.feather_config["7m+tp"].interf_config == "7m"
    assert c.feather_config["7m+tp"].res_list == [10.0]
    assert c.singledish_config["tp"].bl_order == 1
    assert c.singledish_config["tp"].do_plots is False


def test_later_config_value_wins_and_int_passes_as_float(keys: Path) -> None:
    append(keys, "config_definitions.txt", "line_product co21 {'channel_kms':5}")
    co21 = load_project(keys / "master_key.txt").configs.line_product["co21"]
    assert co21.channel_kms == 5.0 and isinstance(co21.channel_kms, float)
    assert co21.line_tag == "co21"


def test_input_ms_found_under_either_root_and_sorted(keys: Path) -> None:
    make_ms(keys)
    project = load_project(keys / "master_key.txt")
    entries = project.input_ms("ngc0628")
    assert [(e.array_tag, e.obsnum) for e in entries] == [("12m", "1"), ("12m", "2"), ("7m", "1")]
    assert entries[0].path == keys.parent / "ms_12m/2017.1.00886.L/ngc0628_12m_1.ms"
    assert entries[2].path == keys.parent / "ms_7m/2017.1.00886.L/ngc0628_7m_1.ms"
    assert (entries[0].project, entries[0].field) == ("2017.1.00886.L", "ngc0628")


def test_input_ms_for_configs_needs_full_data(project: Project) -> None:
    def tags(target: str, configs: object) -> list[str]:
        return [e.array_tag for e in project.input_ms(target, configs=configs, must_exist=False)]
    assert tags("ngc0628", "7m") == ["7m"]
    assert tags("ngc0628", "12m+7m") == ["12m", "12m", "7m"]
    assert tags("ngc1087", "12m+7m") == []                  # 12m missing: not this config
    assert tags("ngc1087", ["12m+7m", "7m"]) == ["7m"]
    assert tags("ngc1087", "7m+tp") == ["7m"]               # feather -> its interf config
    assert project.interf_configs_for("ngc1087") == ["7m"]
    assert project.interf_configs_for("ngc3627_1") == ["12m+7m", "12m", "7m"]
    assert project.interf_configs_for("ngc3627") == []      # the mosaic has no MS of its own
    assert project.has_data_for_config("ngc1087", "12m+7m", strict=False) is True
    assert project.has_data_for_config("ngc1087", "12m", strict=False) is False


def test_missing_ms_is_an_error_naming_its_key_line(project: Project) -> None:
    with pytest.raises(ConfigError, match=r"ms_file_key\.txt:2: measurement set .*ngc0628_12m_1"):
        project.input_ms("ngc0628")
    assert all(e.path is None for e in project.input_ms("ngc0628", must_exist=False))


def test_requires_or_group(keys: Path) -> None:
    append(keys, "config_definitions.txt",
           "interf_config either {'array_tags':['12m','7m'],'requires':['12m|7m']}")
    project = load_project(keys / "master_key.txt")
    assert project.has_data_for_config("ngc1087", "either")
    assert not project.has_data_for_config("ngc1087", "12m+7m")
    assert [e.array_tag for e in project.input_ms("ngc1087", "either", must_exist=False)] == ["7m"]


def test_loop_order_target_product_config(project: Project) -> None:
    loop = project.loop()
    expected = [(t, p, c) for t in project.targets for p in ("co21", "cont") for c in CONFIGS_ALL]
    assert loop == expected
    assert loop[:3] == [("ngc0628", "co21", "12m+7m"), ("ngc0628", "co21", "12m"),
                        ("ngc0628", "co21", "7m")]


def test_loop_selections(project: Project) -> None:
    assert project.loop(targets="ngc1087", just_cont=True, just_feather=True) == [
        ("ngc1087", "cont", "12m+7m+tp"), ("ngc1087", "cont", "7m+tp")]
    # selection filters in project order and may name a mosaic
    assert project.loop(targets=["ngc3627", "ngc0628"], products="co21",
                        configs=["7m", "12m"]) == [
        ("ngc0628", "co21", "12m"), ("ngc0628", "co21", "7m"),
        ("ngc3627", "co21", "12m"), ("ngc3627", "co21", "7m")]
    assert project.loop(configs="12m+7m+tp", just_interf=True) == []
    assert len(project.loop(just_line=True, just_interf=True)) == 5 * 1 * 3
    with pytest.raises(ConfigError, match="unknown target 'ngc0268'") as err:
        project.loop(targets="ngc0268")
    assert "ngc0628" in (err.value.hint or "")
    with pytest.raises(ConfigError, match="exclude each other"):
        project.loop(just_line=True, just_cont=True)


def test_imaging_recipes_wildcards_and_later_lines_override(project: Project, keys: Path) -> None:
    cube, single, cont = (keys / RECIPES.format(n) for n in ("cube", "singlescale", "cont"))
    assert project.imaging_recipes("12m+7m", "co21") == {
        "dirty": cube, "multiscale": cube, "singlescale": single}
    assert project.imaging_recipes("7m", "co21", "singlescale") == cube     # wildcard only
    assert project.imaging_recipes("12m", "co21", "singlescale") == single  # overridden
    assert set(project.imaging_recipes("7m", "cont").values()) == {cont}
    with pytest.raises(ConfigError, match="unknown interf config '12m\\+7m\\+tp'"):
        project.imaging_recipes("12m+7m+tp", "co21")


def test_imaging_recipe_missing_for_a_product(keys: Path) -> None:
    path = keys / "imaging_recipes.txt"
    path.write_text(path.read_text().replace("all        all_cont", "# all   all_cont"))
    project = load_project(keys / "master_key.txt")
    with pytest.raises(ConfigError, match="no imaging recipe for config 7m product cont stage"):
        project.imaging_recipes("7m", "cont")


def test_derived_params_merge_override_and_append(project: Project) -> None:
    tp = project.derived_params("12m+7m+tp", "co21")
    assert tp.phys_res == {"60pc": 60.0, "90pc": 95.0, "120pc": 120.0}   # merged, 90pc overridden
    assert tp.ang_res == {"1as": 1.0, "2as": 2.0}
    assert tp.moments == ["strictmom0", "broadmom0", "mom1wprior"]       # no duplicate
    assert tp.mask_configs == ["12m+7m+tp"]
    assert tp.noise_kw == {"spec_box": 5, "iterations": 4}               # specific line wins
    assert tp.strictmask_kw["hi_thresh"] == 4.0
    assert tp.shuffle_kw == {"window": "30km/s"}
    assert tp.flatstrictmask_kw == {}
    seven = project.derived_params("7m", "co21")
    assert seven.mask_configs == ["12m+7m+tp", "7m+tp"]
    assert seven.ang_res == {"1as": 1.0} and seven.noise_kw["iterations"] == 3
    cont = project.derived_params("12m", "cont")
    assert cont.ang_res == {} and cont.moments == [] and cont.phys_res["120pc"] == 120.0
    tp.moments.append("changed")                          # a copy: the project is unchanged
    assert "changed" not in project.derived_params("12m+7m+tp", "co21").moments


def test_moment_params(project: Project) -> None:
    strict = project.moment_params("strictmom0")
    assert (strict.algorithm, strict.mask, strict.ext, strict.ext_error, strict.round) == (
        "mom0", "strictmask", "_strict_mom0", "_strict_emom0", 1)
    prior = project.moment_params("mom1wprior")
    assert prior.mask is None and prior.round == 2
    assert prior.maps_to_pass == ["broadmom0"]
    assert prior.kwargs == {"line_width_kms": 30.0, "errorfrac": 0.5}    # dict lines merged
    assert prior.other_exts == {"prior": "_12m+7m+tp_co21_strict_mom1.fits"}
    assert project.moment_params("broadmom0").round == 1                 # default
    with pytest.raises(ConfigError, match="unknown moment 'mom2'"):
        project.moment_params("mom2")


def test_distances_and_windows_from_csv_with_ecsv_header(project: Project) -> None:
    assert project.distances == {"ngc0628": 9.84, "ngc1087": 15.85, "ngc3627": 11.32}
    assert project.distance_mpc("ngc3627_1") == 11.32        # part -> its mosaic
    win = project.window("ngc0628")
    assert isinstance(win, Window)
    assert (win.width_kms, win.vfield_file, win.casa) == (30.0, "ngc0628_vfield.fits", "30km/s")
    assert project.window("ngc3627_2").vfield_file is None   # empty column, via the mosaic
    assert project.window("ngc1087") is None


def test_directories_and_filenames(project: Project, keys: Path) -> None:
    work = keys.parent / "work"
    assert project.dir_for("ngc3627_1") == "ngc3627"
    assert project.dir_for("ngc0628") == "ngc0628"
    assert project.imaging_dir("ngc3627_2") == work / "imaging" / "ngc3627"
    assert project.postprocess_dir("ngc0628") == work / "postprocess" / "ngc0628"
    assert project.derived_dir("ngc1087") == work / "derived" / "ngc1087"
    assert project.target_dir("ngc1087", "release") == work / "release" / "ngc1087"
    assert project.cube_filename("ngc0628", "12m+7m", "co21", "pbcorr_trimmed_k") == \
        "ngc0628_12m+7m_co21_pbcorr_trimmed_k.fits"
    assert cube_filename("ngc0628", "7m", "co21") == "ngc0628_7m_co21.fits"      # '_.' -> '.'
    assert cube_filename("ngc0628", "7m", None, "_strict_mom0") == "ngc0628_7m_strict_mom0.fits"
    assert cube_filename("ngc0628", "", "", None) == "ngc0628.fits"


def test_files_overrides_and_key_paths(project: Project, keys: Path) -> None:
    assert project.key_dir == keys
    assert project.ms_roots == [keys.parent / "ms_12m", keys.parent / "ms_7m"]
    assert project.key_files["config_key"] == [keys / "config_definitions.txt"]
    assert project.singledish_file("ngc0628", "co21") is None        # no file on disk yet
    sd = keys.parent / "singledish" / "ngc0628_tp_co21.fits"
    sd.parent.mkdir()
    sd.write_bytes(b"")
    assert project.singledish_file("ngc0628", "co21") == sd
    assert project.singledish_file("ngc1087", "co21") is None        # not in the key
    assert project.cleanmask_files[("ngc0628", "co21")].file == "ngc0628_co21_mask.fits"
    ov = project.overrides["ngc0628_12m+7m_co21"]
    assert {k: v.value for k, v in ov.items()} == {"imsize": [1024, 1024], "cell": "0.2arcsec"}
    assert ov["cell"].source.line == 3


# ---------------------------------------------------------------------------------------------
# Bad keys: each a ConfigError naming the file and line, with a fix
# ---------------------------------------------------------------------------------------------

BAD = [
    ("target_definitions.txt", "ngc9999 01h00m00s +10d00m00s 500.0", "expected 5 columns"),
    ("target_definitions.txt", "ngc9999 25h00m00s +10d00m00s 500 100", "RA '25h00m00s'"),
    ("target_definitions.txt", "ngc9999 24.17 +10d00m00s 500 100", "RA '24.17'"),
    ("target_definitions.txt", "ngc9999 01h00m00s +95d00m00s 500 100", "Dec '\\+95d00m00s'"),
    ("target_definitions.txt", "ngc9999 01h00m00s +10d61m00s 500 100", "Dec"),
    ("target_definitions.txt", "ngc9999 01h00m00s +10d00m00s fast 100", "vsys_kms"),
    ("config_definitions.txt", "line_prodcut co32 {'line_tag':'co32'}",
     "unknown config type 'line_prodcut'"),
    ("config_definitions.txt", "line_product co32 {'line_tag':'co32',", "cannot read"),
    ("config_definitions.txt", "line_product co32 ['co32']", "must be a dict"),
    ("config_definitions.txt", "line_product co21 {'channel_kms':'2.5'}",
     "'channel_kms' must be float, got str"),
    ("config_definitions.txt", "line_product co21 {'combinespw':1}", "'combinespw' must be bool"),
    ("config_definitions.txt", "interf_config 12m {'array_tag':['12m']}",
     "unknown parameter 'array_tag'"),
    ("config_definitions.txt", "line_product co32 {'line_tag':'co32'}", "channel_kms > 0"),
    ("config_definitions.txt", "interf_config 12m+tp {'res_min_arcsec':1.0}", "needs array_tags"),
    ("config_definitions.txt", "feather_config 12m+tp {'interf_config':'12m+tp'}",
     "interf_config '12m\\+tp' is not defined"),
    ("config_definitions.txt", "cont_product co21 {'channel_ghz':1.0}", "both as line_product"),
    ("config_definitions.txt", "line_product", "expected 3 columns"),
    ("ms_file_key.txt", "ngc9999 2017.1.00886.L ngc9999 12m 1 x.ms",
     "target 'ngc9999' is not in target_definitions"),
    ("ms_file_key.txt", "ngc0628 2017.1.00886.L ngc0628 12m 3", "expected 6 columns"),
    ("ms_file_key.txt", "ngc0628 2017.1.00886.L ngc0628 12m 2 other.ms",
     "obsnum 2 is already given at line 3"),
    ("linearmosaic_definitions.txt", "ngc3627 ngc3627_3",
     "mosaic part 'ngc3627_3' is not a target"),
    ("linearmosaic_definitions.txt", "ngc0628 ngc3627_1", "already a part of mosaic ngc3627"),
    ("imaging_recipes.txt", "12m+7m+tp co21 all " + RECIPES.format("cube"),
     "unknown interf config '12m\\+7m\\+tp'"),
    ("imaging_recipes.txt", "12m co32 all " + RECIPES.format("cube"), "unknown product 'co32'"),
    ("imaging_recipes.txt", "12m co21 cleanest " + RECIPES.format("cube"),
     "unknown imaging stage 'cleanest'"),
    ("imaging_recipes.txt", "7m co21 dirty recipes/missing.clean", "missing.clean does not exist"),
    ("derived_key.txt", "13m co21 ang_res {'1as':1.0}", "unknown config '13m'"),
    ("derived_key.txt", "all co21 resolution {'1as':1.0}", "unknown derived parameter"),
    ("derived_key.txt", "all co21 mask_configs ['12m+tp']", "'12m\\+tp' is not defined"),
    ("derived_key.txt", "all co21 moments ['mom2']", "'mom2' is not defined in the moment key"),
    ("derived_key.txt", "all all phys_res {'60pc':'sixty'}", "size must be a positive number"),
    ("derived_key.txt", "all all noise_kw {'spec_box':5", "cannot read"),
    ("moment_key.txt", "strictmom0 mask strict", "unknown mask 'strict'"),
    ("moment_key.txt", "strictmom0 round first", "must be an integer"),
    ("moment_key.txt", "strictmom0 colour red", "unknown parameter 'colour'"),
    ("distance_key.txt", "ngc4321,far", "dist_mpc must be a number"),
    ("distance_key.txt", "ngc4321,15.2,extra", "expected 2 comma-separated columns"),
    ("window_key.txt", "ngc4321", "expected 2 or 3 comma-separated columns"),
    ("dir_key.txt", "ngc0628", "expected 2 columns"),
    ("singledish_key.txt", "ngc0628 co21", "expected 3 columns"),
    ("master_key.txt", "derived_key derived_key_extra.txt", "derived_key_extra.txt does not exist"),
    ("master_key.txt", "ms_kye more_ms.txt", "unknown master key entry 'ms_kye'"),
    ("master_key.txt", "imaging_root ../elsewhere/", "imaging_root is set twice"),
]


@pytest.mark.parametrize(("name", "line", "problem"), BAD,
                         ids=[f"{n.split('.')[0]}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_key_names_file_and_line(keys: Path, name: str, line: str, problem: str) -> None:
    number = append(keys, name, line)
    with pytest.raises(ConfigError, match=problem) as err:
        load_project(keys / "master_key.txt")
    assert str(err.value.message).startswith(f"{keys / name}:{number}: ")
    assert err.value.hint


def test_wrong_column_count_names_the_expected_columns(keys: Path) -> None:
    number = append(keys, "ms_file_key.txt", "ngc0628 2017.1.00886.L ngc0628 12m")
    with pytest.raises(ConfigError) as err:
        load_project(keys / "master_key.txt")
    assert f"ms_file_key.txt:{number}: expected 6 columns " \
           "(target project field array_tag obsnum file), got 4" in err.value.message


def test_master_key_without_targets_or_missing(keys: Path, tmp_path: Path) -> None:
    path = keys / "master_key.txt"
    path.write_text(path.read_text().replace("target_key", "# target_key"))
    with pytest.raises(ConfigError, match="master_key.txt: the master key names no target_key"):
        load_project(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_project(tmp_path / "nowhere.txt")


def test_comments_blank_lines_and_header_rows_are_skipped(keys: Path) -> None:
    append(keys, "target_definitions.txt", "\n   # indented comment\n\n")
    append(keys, "distance_key.txt", "ngc4321,15.2")
    project = load_project(keys / "master_key.txt")
    assert len(project.targets) == 5
    assert project.distances["ngc4321"] == 15.2 and "galaxy" not in project.distances
