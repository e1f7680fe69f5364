"""PHANGS stages as task arrays: the plan of the example key set (tests/data/phangs_keys).

The example has three whole targets: ngc0628 (12m x2 and 7m, single dish for co21), ngc1087
(7m only) and the mosaic ngc3627 of two parts (12m and 7m each, single dish for co21); a line
product co21 and a continuum product; interferometric configs 12m+7m, 12m, 7m and feather
configs 12m+7m+tp, 7m+tp; mask_configs linking every line config to 12m+7m+tp and 7m co21 to
7m+tp too. Counts below are worked out by hand from those keys. No CASA, no Slurm.
"""

from __future__ import annotations

import inspect
import itertools
import json
import shutil
from pathlib import Path

import pytest

from hpcddf.errors import ConfigError
from hpcddf.phangs import plan as P
from hpcddf.phangs import plan_casa, plan_common, plan_derived, plan_moments
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.project import Project
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_casa_stages import scales_in_pixels
from hpcddf.phangs.run_common import read_task_state, task_state_path

DATA = Path(__file__).resolve().parents[1] / "data" / "phangs_keys"
C_KMS = 299_792.458


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(DATA, target)
    return target


def make_ms(keys: Path) -> None:
    """The input data the example keys name: the MSs and the single-dish cubes."""
    for line in (keys / "ms_file_key.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            words = line.split()
            (keys.parent / f"ms_{words[3]}" / words[5]).mkdir(parents=True)
    make_singledish(keys)
    make_cleanmasks(keys)


def make_cleanmasks(keys: Path) -> None:
    """The clean masks the cleanmask key names (the plan checks they exist, not what they hold)."""
    (keys.parent / "cleanmasks").mkdir(exist_ok=True)
    for line in (keys / "cleanmask_key.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            (keys.parent / "cleanmasks" / line.split()[2]).write_bytes(b"")


def make_singledish(keys: Path) -> None:
    (keys.parent / "singledish").mkdir(exist_ok=True)
    for line in (keys / "singledish_key.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            (keys.parent / "singledish" / line.split()[2]).write_bytes(b"")


@pytest.fixture
def project(keys: Path) -> Project:
    make_ms(keys)
    return load_project(keys / "master_key.txt")


def by_id(plan: list[plan_common.StageArray]) -> dict[str, plan_common.Task]:
    return {t.id: t for t in P.plan_tasks(plan)}


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def touch_all(paths: list[str]) -> None:
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_bytes(b"")


# ---------------------------------------------------------------------------------------------
# The arrays and their dependencies
# ---------------------------------------------------------------------------------------------

def test_one_array_per_stage_in_order_with_sizes(project: Project) -> None:
    plan = P.plan_project(project)
    # stage_ms: 8 MSs x 2 products; stage_line/imaging: 10 target-configs with data x 2;
    # postprocess: ngc0628 5+3, ngc1087 1+1, ngc3627 5+3 (co21 + cont);
    # derived: co21 only, ngc0628 5, ngc1087 1, ngc3627 5 (a continuum product ends at its
    # postprocessed 2-D image: noise, masks and moments are spectral-cube products)
    assert [(a.name, a.size) for a in plan] == [
        ("stage_ms", 16), ("stage_line", 20), ("imaging", 20), ("postprocess", 18),
        ("derived", 11), ("release", 18)]
    ids = by_id(plan)
    assert len(ids) == 16 + 20 + 20 + 18 + 11 + 18  # ids are unique
    assert not any(i.startswith("derived/") and i.split("/")[2] == "cont" for i in ids)
    assert "imaging/ngc0628/co21/12m" in ids
    assert "stage_ms/ngc0628/co21/2017.1.00886.L/12m/2" in ids
    assert "stage_line/ngc1087/co21/12m" not in ids       # ngc1087 has no 12m data
    assert not any(i.startswith("imaging/ngc3627/") for i in ids)       # the mosaic: no uv
    assert not any(i.startswith("postprocess/ngc3627_1/") for i in ids)  # parts: no postproc.


def test_every_dependency_is_a_task_of_an_earlier_stage(project: Project) -> None:
    ids = by_id(P.plan_project(project))
    for task in ids.values():
        for dep in task.depends:
            assert dep in ids
            if task.stage == "release":  # copies what postprocess and derived made
                assert ids[dep].stage in ("postprocess", "derived")
            else:
                assert P.STAGES.index(ids[dep].stage) == P.STAGES.index(task.stage) - 1
            assert set(task.inputs) & set(ids[dep].outputs), (task.id, dep)


def test_stage_line_waits_for_all_ms_of_its_config(project: Project) -> None:
    ids = by_id(P.plan_project(project))
    ms = "stage_ms/ngc0628/co21/2017.1.00886.L"
    assert ids["stage_line/ngc0628/co21/12m+7m"].depends == (
        f"{ms}/12m/1", f"{ms}/12m/2", f"{ms}/7m/1")
    assert ids["stage_line/ngc0628/co21/12m"].depends == (f"{ms}/12m/1", f"{ms}/12m/2")
    assert ids["stage_line/ngc0628/cont/7m"].depends == (
        "stage_ms/ngc0628/cont/2017.1.00886.L/7m/1",)
    assert ids["stage_line/ngc1087/co21/7m"].depends == (
        "stage_ms/ngc1087/co21/2017.1.00886.L/7m/1",)


def test_imaging_is_one_to_one_on_stage_line(project: Project) -> None:
    plan = P.plan_project(project)
    imaging = next(a for a in plan if a.name == "imaging")
    for task in imaging.tasks:
        assert task.depends == ("stage_line/" + "/".join(task.key),)


def test_a_linear_mosaic_waits_for_all_its_parts(project: Project) -> None:
    ids = by_id(P.plan_project(project))
    assert ids["postprocess/ngc3627/co21/12m"].depends == (
        "imaging/ngc3627_1/co21/12m", "imaging/ngc3627_2/co21/12m")
    # a feather config waits for its interferometric config's imaging of every part
    assert ids["postprocess/ngc3627/co21/12m+7m+tp"].depends == (
        "imaging/ngc3627_1/co21/12m+7m", "imaging/ngc3627_2/co21/12m+7m")
    assert ids["postprocess/ngc0628/co21/7m+tp"].depends == ("imaging/ngc0628/co21/7m",)
    # no single dish for continuum, nor for ngc1087
    assert "postprocess/ngc0628/cont/12m+7m+tp" not in ids
    assert [i for i in ids if i.startswith("postprocess/ngc1087/")] == [
        "postprocess/ngc1087/co21/7m", "postprocess/ngc1087/cont/7m"]
    mosaic = ids["postprocess/ngc3627/co21/12m"]
    assert len(mosaic.inputs) == 6  # .image, .pb, _singlescale.image of both parts
    assert mosaic.outputs[0].endswith("postprocess/ngc3627/ngc3627_12m_co21_pbcorr_trimmed_k.fits")


def test_broad_mask_links_are_all_of_dependencies_on_their_postprocess(project: Project) -> None:
    ids = by_id(P.plan_project(project))
    d = ids["derived/ngc0628/co21/7m"]
    assert d.depends == ("postprocess/ngc0628/co21/7m", "postprocess/ngc0628/co21/12m+7m+tp",
                         "postprocess/ngc0628/co21/7m+tp")
    assert d.params["linked"] == ["12m+7m+tp", "7m+tp"]
    assert set(d.params["chains"]) == {"7m", "12m+7m+tp", "7m+tp"}
    assert [Path(p).name for p in d.inputs] == [
        "ngc0628_7m_co21_pbcorr_trimmed_k.fits", "ngc0628_12m+7m+tp_co21_pbcorr_trimmed_k.fits",
        "ngc0628_7m+tp_co21_pbcorr_trimmed_k.fits"]
    # the linked config's products are its own task's, not this one's
    assert not any("12m+7m+tp" in Path(p).name for p in d.outputs)
    # linking to itself adds nothing; links a target does not have are ignored
    assert ids["derived/ngc0628/co21/12m+7m+tp"].depends == (
        "postprocess/ngc0628/co21/12m+7m+tp",)
    assert ids["derived/ngc1087/co21/7m"].depends == ("postprocess/ngc1087/co21/7m",)
    # continuum products have no derived task, so nothing links to their postprocess
    assert "postprocess/ngc0628/cont/7m" in ids and "derived/ngc0628/cont/7m" not in ids
    assert not any(dep.startswith("postprocess/ngc0628/cont/") for t in ids.values()
                   if t.stage == "derived" for dep in t.depends)
    assert ids["derived/ngc3627/co21/12m"].depends == (
        "postprocess/ngc3627/co21/12m", "postprocess/ngc3627/co21/12m+7m+tp")


def test_mutual_mask_links_make_no_cycle(keys: Path) -> None:
    make_ms(keys)
    append(keys / "derived_key.txt", "12m+7m+tp  co21  mask_configs  ['7m']")
    ids = by_id(P.plan_project(load_project(keys / "master_key.txt")))
    assert "postprocess/ngc0628/co21/7m" in ids["derived/ngc0628/co21/12m+7m+tp"].depends
    assert "postprocess/ngc0628/co21/12m+7m+tp" in ids["derived/ngc0628/co21/7m"].depends
    assert not any(dep.startswith("derived/") for t in ids.values() for dep in t.depends
                   if t.stage != "release")


# ---------------------------------------------------------------------------------------------
# What the tasks carry
# ---------------------------------------------------------------------------------------------

def test_casa_task_parameters_come_from_the_keys(project: Project) -> None:
    ids = by_id(P.plan_project(project))
    ms = ids["stage_ms/ngc0628/co21/2017.1.00886.L/7m/1"].params
    assert ms["vis"] == str(project.ms_roots[1] / "2017.1.00886.L/ngc0628_7m_1.ms")
    assert (ms["restfreq_ghz"], ms["vsys_kms"], ms["vwidth_kms"]) == (230.538, 657.0, 120.0)
    assert (ms["margin_kms"], ms["fitorder"], ms["field"]) == (50.0, 0, "ngc0628")
    # 13CO(2-1) at vsys, in CO(2-1) radio velocity, +- vwidth/2, kept out of the uvcontsub fit
    v13 = C_KMS * (1 - 220.398684 * (1 - 657.0 / C_KMS) / 230.538)
    assert ms["exclude_kms"][0] == pytest.approx([v13 - 60, v13 + 60], abs=1e-3)
    assert len(ms["exclude_kms"]) == 2
    line = ids["stage_line/ngc0628/co21/12m"].params
    assert line["vis"] == ids["stage_line/ngc0628/co21/12m"].inputs
    assert line["outputvis"].endswith("imaging/ngc0628/ngc0628_12m_co21.ms")
    assert (line["channel_kms"], line["statwt_edge_kms"]) == (2.54, 50.0)
    img = ids["imaging/ngc0628/co21/12m"].params
    assert img["recipes"]["singlescale"]["deconvolver"] == "hogbom"
    assert img["recipes"]["dirty"]["threshold"] == "0.0mJy/beam"
    assert img["clean_scales_arcsec"] == [0, 1, 2, 4]
    post = ids["postprocess/ngc3627/co21/12m+7m+tp"].params
    assert (post["mosaic"], post["feather"], post["interf_config"]) == (True, True, "12m+7m")
    assert json.loads(json.dumps(P.dry_run_document(P.plan_project(project))))  # JSON-able


def test_derived_parameters_resolutions_kw_and_moments(project: Project) -> None:
    ids = by_id(P.plan_project(project))
    d = ids["derived/ngc0628/co21/12m+7m+tp"].params
    chain = d["chains"]["12m+7m+tp"]
    assert [lvl["tag"] for lvl in chain["levels"]] == ["", "1as", "2as", "60pc", "90pc", "120pc"]
    assert chain["levels"][4]["phys_pc"] == 95.0      # the later derived-key line wins
    assert Path(chain["levels"][1]["strictmask"]).name == "ngc0628_12m+7m+tp_co21_1as_strictmask.fits"
    assert Path(chain["levels"][0]["noise"]).name == "ngc0628_12m+7m+tp_co21_noise.fits"
    assert chain["noise_kw"] == {"spec_box": 5, "iterations": 4}
    assert chain["strictmask_kw"] == {"hi_thresh": 4.0, "hi_nchan": 2, "lo_thresh": 2.0,
                                      "lo_nchan": 2}
    assert d["broadmask"]["kw"] == {"recipe": "anyscale", "fraction": 0.25}
    assert Path(d["broadmask"]["out"]).name == "ngc0628_12m+7m+tp_co21_broadmask.fits"
    assert d["distance_mpc"] == 9.84
    names = {Path(m["out"]).name for m in d["moments"]}
    assert "ngc0628_12m+7m+tp_co21_strict_mom0.fits" in names
    assert "ngc0628_12m+7m+tp_co21_60pc_broad_mom0.fits" in names
    assert len(d["moments"]) == 2 * 6                   # strictmom0, broadmom0 at 6 levels
    broad = next(m for m in d["moments"] if m["moment"] == "broadmom0" and m["tag"] == "60pc")
    assert broad["mask"] == d["broadmask"]["out"]
    assert broad["err"].endswith("ngc0628_12m+7m+tp_co21_60pc_broad_emom0.fits")
    # mom1wprior (round 2) combines a strict and a broad mom1 the example does not define
    reason = ("needs a mom1 moment with mask strictmask (strict_vfield); the moment key "
              "defines none")
    assert [(s["moment"], s["reason"]) for s in d["skipped_moments"]] == [("mom1wprior", reason)]
    assert d["vfield"] is None and d["flatmasks"] == []
    assert {Path(o).name for o in ids["derived/ngc0628/co21/12m+7m+tp"].outputs} >= names


def test_kw_names_are_parameters_of_the_functions_they_feed() -> None:
    from hpcddf.phangs.convolution import smooth_cube
    from hpcddf.phangs.masks import broad_mask, flat_mask, strict_mask
    from hpcddf.phangs.moments import mom1wprior
    from hpcddf.phangs.noise import phangs_noise
    for table, func in ((plan_common.NOISE_KW, phangs_noise),
                        (plan_common.STRICTMASK_KW, strict_mask),
                        (plan_common.BROADMASK_KW, broad_mask),
                        (plan_common.CONVOLVE_KW, smooth_cube),
                        (plan_derived.FLATMASK_KW, flat_mask),
                        (plan_moments.MOM1WPRIOR_KW, mom1wprior)):
        assert set(table.values()) <= set(inspect.signature(func).parameters), func.__name__


MOM1_LINES = [f"{name}  {param}  {value}" for name, mask, ext in (
    ("strictmom1", "strictmask", "strict"), ("broadmom1", "broadmask", "broad"))
    for param, value in (("algorithm", "mom1"), ("mask", mask), ("ext", f"_{ext}_mom1"),
                         ("ext_error", f"_{ext}_emom1"))]
FLAT_LINES = ["flatmom0  algorithm  mom0", "flatmom0  mask  flatstrictmask",
              "flatmom0  ext  _flatstrict_mom0", "flatmom0  round  3"]


def derived_plan(keys: Path) -> dict[str, plan_common.Task]:
    """The derived stage alone, on empty postprocessed cubes."""
    project = load_project(keys / "master_key.txt")
    touch_all([plan_casa.postprocess_cube(project, t, p, c) for t in project.whole_targets
               for p in ("co21", "cont") for c in plan_common.whole_target_configs(project, t, p)])
    return by_id(P.plan_project(project, stages=["derived"]))


def test_round_two_and_flat_moments_once_their_maps_are_defined(keys: Path) -> None:
    for line in MOM1_LINES + FLAT_LINES:
        append(keys / "moment_key.txt", line)
    append(keys / "derived_key.txt", "all  co21  moments  ['flatmom0']")
    append(keys / "derived_key.txt", "12m+7m  co21  moments  ['mom1wprior']")
    ids = derived_plan(keys)
    task = ids["derived/ngc0628/co21/12m+7m+tp"]
    d = task.params
    assert d["skipped_moments"] == []
    assert sorted({(m["moment"], m["round"]) for m in d["moments"]}) == [
        ("broadmom0", 1), ("broadmom1", 1), ("flatmom0", 3), ("mom1wprior", 2),
        ("strictmom0", 1), ("strictmom1", 1)]
    assert {m["moment"] for m in d["moments"] if m.get("implied_by")} == {"strictmom1",
                                                                         "broadmom1"}
    wp = next(m for m in d["moments"] if m["moment"] == "mom1wprior" and m["tag"] == "2as")
    # other_exts {'prior':'_12m+7m+tp_co21_strict_mom1.fits'}: this config's native strict mom1
    assert (Path(wp["prior"]["path"]).name, wp["prior"]["source"]) == (
        "ngc0628_12m+7m+tp_co21_strict_mom1.fits", "own")
    assert Path(wp["maps"]["broad_mom0"]).name == "ngc0628_12m+7m+tp_co21_2as_broad_mom0.fits"
    assert wp["kwargs"] == {} and wp["ignored_kwargs"] == ["line_width_kms", "errorfrac"]
    assert any("line_width_kms, errorfrac not used" in n for n in d["notes"])
    # the example's master key has no vfield_root: the window key's field is not used
    assert any("no vfield_root" in n for n in d["notes"]) and d["vfield"]["external"] is None
    assert len(d["vfield"]["layers"]) == 6
    # the flat window is ngc0628's window key entry (30 km/s), not PHANGS' fixed 50 km/s
    assert {f["window_kms"] for f in d["flatmasks"]} == {30.0}
    assert [f["tag"] for f in d["flatmasks"]] == [lvl["tag"] for lvl in
                                                  d["chains"]["12m+7m+tp"]["levels"]]
    names = {Path(o).name for o in task.outputs}
    assert {"ngc0628_12m+7m+tp_co21_vfield.fits", "ngc0628_12m+7m+tp_co21_60pc_mom1wprior.fits",
            "ngc0628_12m+7m+tp_co21_flatstrictmask.fits",
            "ngc0628_12m+7m+tp_co21_120pc_flatstrict_mom0.fits"} <= names
    # ngc1087 7m: no mom1wprior, no window key entry: no velocity field, flatmom0 skipped
    one = ids["derived/ngc1087/co21/7m"].params
    assert one["vfield"] is None and [s["moment"] for s in one["skipped_moments"]] == ["flatmom0"]
    # 12m+7m's mom1wprior takes 12m+7m+tp's strict mom1 as its prior and makes it itself
    other = ids["derived/ngc0628/co21/12m+7m"].params
    wp = next(m for m in other["moments"] if m["moment"] == "mom1wprior")
    assert (wp["prior"]["source"], wp["prior"]["config"]) == ("config", "12m+7m+tp")
    assert [lvl["tag"] for lvl in other["priors"][wp["prior"]["path"]]["chain"]["levels"]] == [""]


def test_unknown_derived_keyword_names_the_derived_key(keys: Path) -> None:
    append(keys / "derived_key.txt", "all  all  noise_kw  {'spectral_box':5}")
    project = load_project(keys / "master_key.txt")
    touch_all([plan_casa.postprocess_cube(project, t, p, c) for t in project.whole_targets
               for p in ("co21", "cont") for c in plan_common.whole_target_configs(project, t, p)])
    with pytest.raises(ConfigError, match=r"unknown keyword 'spectral_box'.*derived_key\.txt"):
        P.plan_project(project, stages=["derived"])


# ---------------------------------------------------------------------------------------------
# Stage filter and target selection
# ---------------------------------------------------------------------------------------------

def test_stage_filter_checks_the_products_of_stages_not_run(keys: Path) -> None:
    project = load_project(keys / "master_key.txt")  # no MS on disk: not needed for derived
    with pytest.raises(ConfigError) as err:
        P.plan_project(project, stages=["derived"])
    assert "ngc0628_12m+7m_co21_pbcorr_trimmed_k.fits does not exist" in err.value.message
    assert "derived/ngc0628/co21/12m+7m" in err.value.message
    assert "run stage postprocess first" in (err.value.hint or "")
    cubes = [plan_casa.postprocess_cube(project, t, p, c) for t in project.whole_targets
             for p in ("co21", "cont") for c in plan_common.whole_target_configs(project, t, p)]
    touch_all(cubes)
    plan = P.plan_project(project, stages=["derived"])
    assert [(a.name, a.size) for a in plan] == [("derived", 11)]  # co21 only: no cont derived
    assert all(t.depends == () for t in plan[0].tasks)


def test_kept_stages_keep_dependencies_and_come_in_pipeline_order(keys: Path) -> None:
    make_singledish(keys)  # postprocess runs: its feather configs need the single-dish cubes
    project = load_project(keys / "master_key.txt")
    with pytest.raises(ConfigError, match=r"ngc0628_12m\+7m_co21\.image does not exist") as err:
        P.plan_project(project, stages=["derived", "postprocess"])
    assert "run stage imaging first" in (err.value.hint or "")
    touch_all([f for t in project.targets if t not in project.linmos
               for p in ("co21", "cont") for c in project.interf_configs_for(t)
               for f in plan_casa._imaging_products(plan_casa.imaging_base(project, t, p, c))])
    plan = P.plan_project(project, stages=["derived", "postprocess"])
    assert [a.name for a in plan] == ["postprocess", "derived"]
    ids = by_id(plan)
    assert ids["postprocess/ngc3627/co21/12m"].depends == ()
    assert ids["derived/ngc0628/co21/7m"].depends[0] == "postprocess/ngc0628/co21/7m"


def test_a_task_whose_products_exist_needs_no_inputs(keys: Path) -> None:
    project = load_project(keys / "master_key.txt")
    post = [f for t in project.whole_targets for p in ("co21", "cont")
            for c in plan_common.whole_target_configs(project, t, p)
            for f in plan_casa._postprocess_products(project, t, p, c)]
    touch_all(post)
    plan = P.plan_project(project, stages=["postprocess"])  # no imaging products: fine
    assert plan[0].size == 18


def test_ms_on_disk_and_rest_frequencies_are_checked_only_for_stages_that_run(keys: Path) -> None:
    project = load_project(keys / "master_key.txt")
    with pytest.raises(ConfigError, match=r"ms_file_key\.txt:2: measurement set"):
        P.plan_project(project, stages=["stage_ms"])
    make_ms(keys)
    text = (keys / "config_definitions.txt").read_text().replace("'line_tag':'co21'",
                                                                  "'line_tag':'co76'")
    (keys / "config_definitions.txt").write_text(text)
    project = load_project(keys / "master_key.txt")
    with pytest.raises(ConfigError, match="line_tag 'co76' has no known rest frequency"):
        P.plan_project(project, stages=["stage_ms"])
    touch_all([plan_casa.postprocess_cube(project, t, p, c) for t in project.whole_targets
               for p in ("co21", "cont") for c in plan_common.whole_target_configs(project, t, p)])
    assert P.plan_project(project, stages=["derived"])[0].size == 11  # no cont derived


def test_unknown_stage_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown PHANGS stage 'imagin'") as err:
        P.select_stages(["imagin"])
    assert "imaging" in (err.value.hint or "")
    assert P.select_stages(["derived", " stage_ms"]) == ["stage_ms", "derived"]


def test_target_selection(project: Project) -> None:
    mosaic = by_id(P.plan_project(project, targets=["ngc3627"]))
    assert {i.split("/")[1] for i in mosaic if i.startswith("stage_ms/")} == {"ngc3627_1",
                                                                               "ngc3627_2"}
    assert {i.split("/")[1] for i in mosaic if i.startswith("derived/")} == {"ngc3627"}
    # postprocess co21 5 + cont 3; derived co21 5 only (continuum has no derived task);
    # release: one per postprocess task
    assert len(mosaic) == 8 + 12 + 12 + 8 + 5 + 8
    part = P.plan_project(project, targets=["ngc3627_1"])
    assert [(a.name, a.size) for a in part] == [("stage_ms", 4), ("stage_line", 6),
                                                ("imaging", 6), ("postprocess", 0),
                                                ("derived", 0), ("release", 0)]
    one = P.plan_project(project, targets=["ngc1087"], stages=["stage_ms", "stage_line"])
    assert [(a.name, a.size) for a in one] == [("stage_ms", 2), ("stage_line", 2)]
    with pytest.raises(ConfigError, match="unknown target 'ngc1078'") as err:
        P.plan_project(project, targets=["ngc1078"])
    assert "ngc1087" in (err.value.hint or "")


def test_phys_res_without_distance_is_an_error_when_derived_runs(keys: Path) -> None:
    text = (keys / "distance_key.txt").read_text().replace("ngc1087,15.85\n", "")
    (keys / "distance_key.txt").write_text(text)
    project = load_project(keys / "master_key.txt")
    touch_all([plan_casa.postprocess_cube(project, "ngc1087", p, "7m") for p in ("co21", "cont")])
    with pytest.raises(ConfigError, match="ngc1087: config 7m product co21 has physical") as err:
        P.plan_project(project, targets=["ngc1087"], stages=["derived"])
    assert "distance_key.txt" in (err.value.hint or "")


def test_names_that_cannot_be_task_ids_are_refused(keys: Path) -> None:
    append(keys / "ms_file_key.txt", "ngc1087  proj/x  ngc1087  7m  2  a/b.ms")
    with pytest.raises(ConfigError, match=r"'proj/x' cannot be part of a task id"):
        P.plan_project(load_project(keys / "master_key.txt"), stages=["stage_line"])


def test_dry_run_document_shape(project: Project) -> None:
    plan = P.plan_project(project, targets=["ngc1087"])
    doc = json.loads(json.dumps(P.dry_run_document(plan)))
    # derived: co21 only, no continuum task; release: co21 and cont
    assert doc["total_tasks"] == 2 + 2 + 2 + 2 + 1 + 2
    assert [s["name"] for s in doc["stages"]] == list(P.STAGES)
    for stage in doc["stages"]:
        assert stage["array_size"] == len(stage["tasks"])
        assert stage["depends_on"] == P.DEPENDENCY_RULES[stage["name"]]
    derived = doc["stages"][-2]["tasks"][0]
    assert derived["id"] == "derived/ngc1087/co21/7m"
    assert derived["depends"] == ["postprocess/ngc1087/co21/7m"]
    assert derived["key"] == ["ngc1087", "co21", "7m"]
    assert derived["params"]["config"] == "7m"
    release = doc["stages"][-1]["tasks"][0]
    assert release["id"] == "release/ngc1087/co21/7m"
    assert release["depends"] == ["postprocess/ngc1087/co21/7m", "derived/ngc1087/co21/7m"]


def test_work_dir_holds_the_roots(project: Project, keys: Path) -> None:
    assert P.project_work_dir(project) == keys.parent / "work"


# ---------------------------------------------------------------------------------------------
# The node side without CASA: state files, skipping, errors
# ---------------------------------------------------------------------------------------------

def test_task_with_its_products_present_is_done_without_casa(project: Project,
                                                             tmp_path: Path) -> None:
    task = by_id(P.plan_project(project))["stage_ms/ngc1087/co21/2017.1.00886.L/7m/1"]
    touch_all(task.outputs)
    out = run_task(task, tmp_path / "w")
    assert out["skipped"] and out["products"] == task.outputs
    state = read_task_state(tmp_path / "w", task.id)
    assert state["state"] == "done" and state["products"] == task.outputs
    assert task_state_path(tmp_path / "w", task.id) == (
        tmp_path / "w/.hpcddf/phangs/stage_ms/ngc1087/co21/2017.1.00886.L/7m/1.json")


def test_failed_task_records_error_and_attempts(project: Project, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # a CASA environment that does not exist fails the first CASA step the same way each time
    missing = tmp_path / "no-casa-env"
    monkeypatch.setenv("HPCDDF_CASA_ENV", str(missing))
    task = by_id(P.plan_project(project))["postprocess/ngc3627/co21/12m"]
    for attempt in (1, 2):
        with pytest.raises(ConfigError, match="CASA environment .*no-casa-env does not exist"):
            run_task(task, tmp_path / "w")
        state = read_task_state(tmp_path / "w", task.id)
        assert (state["state"], state["attempts"]) == ("failed", attempt)
        assert f"CASA environment {missing} does not exist" in state["error"]["message"]
        assert "make-casa-env.sh" in state["error"]["hint"] and state["ended"]
        assert not any(Path(p).exists() for p in task.outputs)


def test_walltime_checkpoint_marks_requeued_and_resubmits_the_same_task(project: Project,
                                                                       tmp_path: Path) -> None:
    import pickle

    from hpcddf.phangs.run import PhangsTask
    task = by_id(P.plan_project(project))["imaging/ngc1087/co21/7m"]
    job = PhangsTask(task, str(tmp_path))
    again = job.checkpoint()
    assert again.function is job
    assert read_task_state(tmp_path, task.id)["state"] == "requeued"
    copy = pickle.loads(pickle.dumps(job))          # what submitit ships to the node
    assert copy.task.id == task.id and copy.task.params == task.params


def test_clean_scales_from_arcsec_to_pixels() -> None:
    assert scales_in_pixels([0, 1, 2, 4], 0.25) == "0,4,8,16"
    assert scales_in_pixels([0, 0.1], 0.3) == "0"
    assert scales_in_pixels([], 0.3) is None and scales_in_pixels([1.0], None) is None


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def test_cli_dry_run_and_one_line_errors(keys: Path, run_cli, site_file: Path) -> None:
    make_ms(keys)
    out = run_cli("phangs", "submit", keys, "--site-file", site_file, "--targets", "ngc1087",
                  "--stages", "stage_ms,stage_line", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [(s["name"], s["array_size"]) for s in doc["stages"]] == [("stage_ms", 2),
                                                                    ("stage_line", 2)]
    assert doc["jobs"] == {} and doc["work_dir"] == str(keys.parent / "work")
    text = run_cli("phangs", "submit", keys, "--site-file", site_file, "--targets", "ngc1087",
                   "--stages", "stage_ms", "--dry-run")
    assert "stage_ms: 2 tasks, not submitted" in text.stdout
    assert not (keys.parent / "work").exists()  # a dry run writes nothing
    bad = run_cli("phangs", "submit", keys, "--site-file", site_file, "--stages", "derived")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "run stage postprocess first" in bad.stderr
    status = run_cli("phangs", "status", keys, "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == []
    assert "[container]" not in text.stderr
    # a site with an image: PHANGS's CASA stays in its own environment, and the submit says so
    contained = site_file.with_name("contained.toml")
    contained.write_text(site_file.read_text() + '\n[container]\nruntime = "charliecloud"\nimage = "/img"\n')
    text = run_cli("phangs", "submit", keys, "--site-file", contained, "--targets", "ngc1087",
                   "--stages", "stage_ms", "--dry-run")
    assert text.returncode == 0, text.stderr
    [line] = [ln for ln in text.stderr.splitlines() if "[container]" in ln]
    assert "has no effect on PHANGS tasks" in line and "CASA" in line


# ---------------------------------------------------------------------------------------------
# Continuum products (cont: 210-235 and 245-260 GHz, 0.5 GHz channels, flagging co, 13co, c18o)
# ---------------------------------------------------------------------------------------------

def _radio_ghz(rest_ghz: float, v_kms: float) -> float:
    return rest_ghz * (1 - v_kms / C_KMS)


@pytest.fixture
def cont_project(keys: Path) -> Project:
    """The example without single-dish data (no feather configs): every stage plans with
    only the measurement sets on disk."""
    (keys / "singledish_key.txt").write_text("# target  product  file\n")
    make_ms(keys)
    return load_project(keys / "master_key.txt")


def test_continuum_tasks_carry_ranges_line_flags_and_mfs_recipes(cont_project: Project) -> None:
    project = cont_project
    ids = by_id(P.plan_project(project, stages=["stage_ms", "stage_line", "imaging"]))
    ms = ids["stage_ms/ngc0628/cont/2017.1.00886.L/7m/1"]
    assert ms.params["kind"] == "cont" and "restfreq_ghz" not in ms.params
    assert ms.params["freq_ranges_ghz"] == [[210.0, 235.0], [245.0, 260.0]]
    assert ms.outputs == [ms.params["split"]] and ms.outputs[0].endswith("_cont_split.ms")
    line = ids["stage_line/ngc0628/cont/12m"].params
    assert (line["kind"], line["channel_ghz"], line["vsys_kms"]) == ("cont", 0.5, 657.0)
    # families: co -> co10 co21 co32 co43, 13co and c18o -> their 1-0, 2-1, 3-2 (not 13co in co)
    assert plan_casa.lines_to_flag(project, "cont") == ["co10", "co21", "co32", "co43", "13co10",
                                                "13co21", "13co32", "c18o10", "c18o21",
                                                "c18o32"]
    flags = line["flag_ghz"]
    assert len(flags) == 10 and flags == sorted(flags)
    assert all(lo < hi < nxt for (lo, hi), (nxt, _) in itertools.pairwise(flags))
    co21 = [_radio_ghz(230.538, 657.0 + 60.0), _radio_ghz(230.538, 657.0 - 60.0)]
    assert any(f == pytest.approx(co21, rel=1e-12) for f in flags)
    img = ids["imaging/ngc0628/cont/12m"].params
    assert img["kind"] == "cont" and img["restfreq_ghz"] is None
    assert {r["specmode"] for r in img["recipes"].values()} == {"mfs"}
    assert img["recipes"]["dirty"]["pblimit"] == 0.25  # the rest of the recipe is kept


def test_overlapping_line_windows_merge(keys: Path) -> None:
    text = (keys / "config_definitions.txt").read_text().replace(
        "'lines_to_flag':['co','13co','c18o']", "'lines_to_flag':['13co21','C18O 2-1']")
    (keys / "config_definitions.txt").write_text(text)
    project = load_project(keys / "master_key.txt")
    assert plan_casa.lines_to_flag(project, "cont") == ["13co21", "c18o21"]
    narrow = plan_casa.line_flag_ranges_ghz(project, "cont", 1000.0, 100.0)
    assert len(narrow) == 2 and narrow[0][1] < narrow[1][0]
    wide = plan_casa.line_flag_ranges_ghz(project, "cont", 1000.0, 3000.0)  # 2.2 GHz wide windows
    assert wide == [pytest.approx([_radio_ghz(219.560354, 2500.0),
                                   _radio_ghz(220.398684, -500.0)])]


@pytest.mark.parametrize(("old", "new", "message"), [
    ("'lines_to_flag':['co','13co','c18o']", "'lines_to_flag':['co','xco']",
     r"lines_to_flag names 'xco'.*config_definitions\.txt"),
    ("'freq_ranges_ghz':[[210.0,235.0],[245.0,260.0]]", "'freq_ranges_ghz':[[210.0]]",
     r"freq_ranges_ghz entry \[210\.0\] is not \[low, high\]"),
    ("'channel_ghz':0.5", "'channel_ghz':-0.5", r"channel_ghz -0\.5 is negative"),
])
def test_bad_continuum_definitions_are_config_errors(keys: Path, old: str, new: str,
                                                     message: str) -> None:
    make_ms(keys)
    text = (keys / "config_definitions.txt").read_text()
    assert old in text
    (keys / "config_definitions.txt").write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message):
        P.plan_project(load_project(keys / "master_key.txt"), targets=["ngc1087"],
                       stages=["stage_ms", "stage_line"])


def test_a_continuum_recipe_asking_for_a_cube_is_an_error(keys: Path) -> None:
    make_ms(keys)
    (keys / "singledish_key.txt").write_text("# target  product  file\n")
    recipe = keys / "recipes" / "phangsalma_cont.clean"
    recipe.write_text(recipe.read_text().replace("'mfs'", "'cube'"))
    with pytest.raises(ConfigError, match=r"phangsalma_cont\.clean: specmode 'cube' for "
                                          r"continuum product cont") as err:
        P.plan_project(load_project(keys / "master_key.txt"), targets=["ngc1087"],
                       stages=["stage_ms", "stage_line", "imaging"])
    assert "specmode = 'mfs'" in (err.value.hint or "")
    recipe.write_text("\n".join(line for line in recipe.read_text().splitlines()
                                if not line.startswith("specmode")))
    plan = P.plan_project(load_project(keys / "master_key.txt"), targets=["ngc1087"],
                          stages=["stage_ms", "stage_line", "imaging"])
    cont = by_id(plan)["imaging/ngc1087/cont/7m"].params
    assert {r["specmode"] for r in cont["recipes"].values()} == {"mfs"}  # filled in


def test_continuum_runners_call_stages_casa_tasks_accepts(cont_project: Project, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each continuum task through its runner, with CASA replaced by casa_tasks' own argument
    parser: the options the runners pass are the ones the stages take."""
    from hpcddf.phangs import casa_tasks
    from hpcddf.phangs.casaenv import CasaEnv, casa_argv
    from hpcddf.phangs.run_common import RunContext

    env = CasaEnv(python=Path("/e/bin/python"), siteconfig=Path("/e/casasiteconfig.py"))
    calls: list[tuple[str, object]] = []

    def fake_casa(self: RunContext, stage: str, **params: object) -> dict[str, object]:
        calls.append((stage, casa_tasks.build_parser().parse_args(
            casa_argv(env, stage, **params)[3:])))
        return {"cell": "0.25arcsec"} if stage == "dirty" else {}

    monkeypatch.setattr(RunContext, "casa", fake_casa)
    ids = by_id(P.plan_project(cont_project, stages=list(P.CASA_STAGES)))
    for task_id in ("stage_ms/ngc0628/cont/2017.1.00886.L/7m/1", "stage_line/ngc0628/cont/7m",
                    "imaging/ngc0628/cont/7m", "postprocess/ngc0628/cont/7m"):
        run_task(ids[task_id], tmp_path)
    stages = [stage for stage, _ in calls]
    assert stages == ["split", "extract_continuum", "dirty", "clean_mask", "multiscale",
                      "singlescale", "export_image", "postprocess"]
    split, extract, dirty = (args for _, args in calls[:3])
    assert split.continuum and split.freq_range_ghz == [(210.0, 235.0), (245.0, 260.0)]
    assert split.restfreq_ghz is None
    assert extract.channel_ghz == 0.5 and len(extract.flag_ghz) == 10
    assert extract.vis == ids["stage_line/ngc0628/cont/7m"].inputs
    assert dirty.restfreq_ghz is None and json.loads(dirty.tclean)["specmode"] == "mfs"
    assert calls[4][1].scales_pix == "0,20,40"  # the 7m config's 0, 5, 10 arcsec
    # a continuum mosaic: each part's postprocess, then the linear mosaic of their products
    from hpcddf.phangs import run_casa_stages
    mosaics: list[tuple[object, ...]] = []

    def fake_mosaic(parts: object, out: object, name: object = None) -> dict[str, object]:
        mosaics.append((parts, out, name))
        return {"beam_arcsec": 1.2}

    monkeypatch.setattr(run_casa_stages, "linear_mosaic", fake_mosaic)
    calls.clear()
    mosaic = ids["postprocess/ngc3627/cont/12m"]
    run_task(mosaic, tmp_path)
    units = mosaic.params["units"]
    assert [u["target"] for u in units] == ["ngc3627_1", "ngc3627_2"]
    assert [(stage, args.stem) for stage, args in calls] == [("postprocess", u["stem"])
                                                             for u in units]
    [(parts, out, name)] = mosaics
    assert parts == [u["fits"] for u in units] and name == "ngc3627"
    assert sorted(out.values()) == sorted(mosaic.outputs)  # type: ignore[attr-defined]
    # a feather config's continuum mosaic: each part through casa_tasks' feather stage with
    # its single-dish image (casa_tasks accepts the options), then the same linear mosaic
    calls.clear()
    units = [{**u, "singledish": f"/sd/{u['target']}_cont.fits"} for u in units]
    feather = plan_common.Task(mosaic.stage, mosaic.key, mosaic.depends,
                               {**mosaic.params, "feather": True, "units": units})
    run_task(feather, tmp_path / "feather")
    assert [(stage, args.stem, args.singledish) for stage, args in calls] == [
        ("feather", u["stem"], u["singledish"]) for u in units]


def test_a_cleanmask_key_entry_goes_to_the_imaging_stages(project: Project, keys: Path,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ngc0628 co21 has a cleanmask key line: its imaging puts that file on the cube's grid
    (clean_mask --from-fits) and keeps the single-scale mask inside it; ngc1087 has none and
    keeps the S/N mask. The options are parsed by casa_tasks' own parser. A line whose file is
    under no cleanmask_root is an error naming it."""
    from hpcddf.phangs import casa_tasks
    from hpcddf.phangs.casaenv import CasaEnv, casa_argv
    from hpcddf.phangs.run_common import RunContext

    env = CasaEnv(python=Path("/e/bin/python"), siteconfig=Path("/e/casasiteconfig.py"))
    calls: dict[str, object] = {}

    def fake_casa(self: RunContext, stage: str, **params: object) -> dict[str, object]:
        calls[stage] = casa_tasks.build_parser().parse_args(casa_argv(env, stage, **params)[3:])
        return {"cell": "0.25arcsec"} if stage == "dirty" else {}

    monkeypatch.setattr(RunContext, "casa", fake_casa)
    ids = by_id(P.plan_project(project, stages=list(P.CASA_STAGES)))
    mask = keys.parent / "cleanmasks" / "ngc0628_co21_mask.fits"
    task = ids["imaging/ngc0628/co21/12m"]
    assert task.params["cleanmask"] == str(mask) and str(mask) in task.inputs
    run_task(task, tmp_path)
    base = task.params["imagename"]
    assert calls["clean_mask"].from_fits == str(mask)  # type: ignore[attr-defined]
    assert calls["singlescale"].within_mask == f"{base}_cleanmask.im"  # type: ignore[attr-defined]
    calls.clear()
    other = ids["imaging/ngc1087/co21/7m"]
    assert other.params["cleanmask"] is None
    run_task(other, tmp_path / "other")
    assert calls["clean_mask"].from_fits is None  # type: ignore[attr-defined]
    assert calls["singlescale"].within_mask is None  # type: ignore[attr-defined]
    mask.unlink()
    with pytest.raises(ConfigError, match=r"cleanmask_key\.txt:\d+: clean mask "
                                          r"ngc0628_co21_mask\.fits not found under any "
                                          r"cleanmask_root"):
        P.plan_project(load_project(keys / "master_key.txt"), stages=list(P.CASA_STAGES))
