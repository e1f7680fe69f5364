"""PHANGS derived rounds 2 and 3 on a synthetic rotating disk with known velocity field.

The disk: a bright core (S/N ~ 16 per channel) inside a faint ring (S/N ~ 2.4) whose line
centre follows v(x) = 35 tanh((x - cx)/6) km/s, 2.5 km/s channels, a 3" beam on 1" pixels. At
native resolution only the core passes the strict mask; smoothed to 6" the ring does too, so
the broad mask (the union over resolutions) holds it: exactly the gap mom1wprior fills.

Two configs (7m, 12m) share the target. Their mom1wprior's prior is the 7m config's 6" strict
mom1 (PHANGS' ``<target>_7m+tp_co21_15as_strict_mom1.fits`` pattern), so the 12m task, run
first, makes that map of the other config itself. The window key gives a 20 km/s window and an
external velocity field (the truth), the last layer of the velocity field.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests._require import need

need("spectral_cube", "phangs")
need("reproject", "phangs")

from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from hpcddf.errors import ConfigError
from hpcddf.phangs import moments, plan_casa, plan_common
from hpcddf.phangs import plan as P
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.project import Project
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_common import read_task_state

NZ, NY, NX = 48, 40, 40
DV = 2.5
CX, CY = 19.5, 19.5
VROT = 35.0
SIGMA_V = 5.0
NOISE_K = 0.05
WINDOW_KMS = 20.0
TARGET = "synth"
DISTANCE_MPC = 10.0  # 200 pc = 4.1": the resolutions sort native, 200pc, 6as
VAXIS = (np.arange(NZ) - (NZ - 1) / 2) * DV

MOMENT_KEY = """\
strictmom0  algorithm mom0
strictmom0  mask      strictmask
strictmom0  ext       _strict_mom0
strictmom0  ext_error _strict_emom0
strictmom1  algorithm mom1
strictmom1  mask      strictmask
strictmom1  ext       _strict_mom1
strictmom1  ext_error _strict_emom1
broadmom0   algorithm mom0
broadmom0   mask      broadmask
broadmom0   ext       _broad_mom0
broadmom0   ext_error _broad_emom0
broadmom1   algorithm mom1
broadmom1   mask      broadmask
broadmom1   ext       _broad_mom1
broadmom1   ext_error _broad_emom1
mom1wprior  algorithm mom1wprior
mom1wprior  mask      None
mom1wprior  ext       _mom1wprior
mom1wprior  ext_error _emom1wprior
mom1wprior  round     2
mom1wprior  maps_to_pass ['strictmom1','broadmom1','broadmom0']
mom1wprior  other_exts {'prior':'_7m_co21_6as_strict_mom1.fits'}
mom1wprior  kwargs    {'vfield_reject_thresh':'20km/s','mom0_thresh_for_mom1':2.0}
flatstrictmom0 algorithm mom0
flatstrictmom0 mask      flatstrictmask
flatstrictmom0 ext       _flatstrict_mom0
flatstrictmom0 ext_error _flatstrict_emom0
flatstrictmom0 round     3
flatbroadmom0  algorithm mom0
flatbroadmom0  mask      flatbroadmask
flatbroadmom0  ext       _flatbroad_mom0
"""

MASTER_KEY = """\
key_dir ./
imaging_root ../imaging/
postprocess_root ../postprocess/
derived_root ../derived/
vfield_root ../vfields/
ms_root ../ms/
ms_key ms_file_key.txt
target_key target_definitions.txt
config_key config_definitions.txt
derived_key derived_key.txt
moment_key moment_key.txt
distance_key distance_key.txt
window_key window_key.txt
"""

DERIVED_KEY = """\
all  all  ang_res  {'6as':6.0}
all  all  phys_res  {'200pc':200.0}
all  all  noise_kw  {'iterations':2}
all  all_line  strictmask_kw  {'hi_thresh':4.0,'hi_nchan':2,'lo_thresh':2.0,'lo_nchan':2}
all  all_line  broadmask_kw  {'recipe':'anyscale'}
7m   co21  moments  ['strictmom0','strictmom1','broadmom0','broadmom1','mom1wprior','flatstrictmom0','flatbroadmom0']
12m  co21  moments  ['strictmom0','mom1wprior','flatbroadmom0']
"""


# ---------------------------------------------------------------------------------------------
# The synthetic project
# ---------------------------------------------------------------------------------------------

def true_vfield() -> np.ndarray:
    _, x = np.mgrid[:NY, :NX]
    return VROT * np.tanh((x - CX) / 6.0)


def cube_header(nx: int = NX, ny: int = NY, cdelt_arcsec: float = 1.0) -> fits.Header:
    h = fits.Header()
    h["NAXIS"] = 3
    h["NAXIS1"], h["NAXIS2"], h["NAXIS3"] = nx, ny, NZ
    h["CTYPE1"], h["CTYPE2"], h["CTYPE3"] = "RA---SIN", "DEC--SIN", "VRAD"
    h["CUNIT1"], h["CUNIT2"], h["CUNIT3"] = "deg", "deg", "m/s"
    h["CRPIX1"], h["CRPIX2"], h["CRPIX3"] = (nx + 1) / 2, (ny + 1) / 2, (NZ + 1) / 2
    h["CRVAL1"], h["CRVAL2"], h["CRVAL3"] = 150.0, 2.0, 0.0
    h["CDELT1"], h["CDELT2"], h["CDELT3"] = -cdelt_arcsec / 3600, cdelt_arcsec / 3600, DV * 1e3
    h["RESTFRQ"] = 230.538e9
    h["SPECSYS"] = "LSRK"
    h["BUNIT"] = "K"
    h["BMAJ"] = h["BMIN"] = 3.0 / 3600
    h["BPA"] = 0.0
    return h


def disk_cube(seed: int) -> np.ndarray:
    """The disk (core 0.8 K, ring 0.12 K, 3" beam) plus beam-correlated noise of NOISE_K."""
    y, x = np.mgrid[:NY, :NX]
    r = np.hypot(x - CX, y - CY)
    peak = np.where(r < 7, 0.8, np.where(r < 14, 0.12, 0.0))
    beam_px = 3.0 / math.sqrt(8 * math.log(2))
    peak = ndimage.gaussian_filter(peak, beam_px)
    line = np.exp(-0.5 * ((VAXIS[:, None, None] - true_vfield()[None]) / SIGMA_V) ** 2)
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(NZ, NY, NX)), (0, beam_px, beam_px))
    noise *= NOISE_K / noise.std()
    return peak[None] * line + noise


def write_keys(root: Path, window_line: str = f"{TARGET},{WINDOW_KMS},{TARGET}_vfield.fits",
               derived_key: str = DERIVED_KEY, moment_key: str = MOMENT_KEY) -> Path:
    keys = root / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    files = {
        "master_key.txt": MASTER_KEY,
        "ms_file_key.txt": f"{TARGET} p1 all 7m 1 synth_7m.ms\n{TARGET} p1 all 12m 1 synth_12m.ms\n",
        "target_definitions.txt": f"{TARGET} 10h00m00s +02d00m00s 0.0 120.0\n",
        "config_definitions.txt": (
            "interf_config 7m {'array_tags':['7m'],'clean_scales_arcsec':[0]}\n"
            "interf_config 12m {'array_tags':['12m'],'clean_scales_arcsec':[0]}\n"
            "line_product co21 {'line_tag':'co21','channel_kms':2.5}\n"),
        "derived_key.txt": derived_key,
        "moment_key.txt": moment_key,
        "distance_key.txt": f"galaxy,dist\n{TARGET},{DISTANCE_MPC}\n",
        "window_key.txt": f"galaxy,window,vfield\n{window_line}\n",
    }
    for name, text in files.items():
        (keys / name).write_text(text)
    return keys / "master_key.txt"


def write_inputs(root: Path, project: Project) -> None:
    """The postprocessed K cubes of both configs and the external velocity field (truth)."""
    for config, seed in (("7m", 1), ("12m", 2)):
        path = Path(plan_casa.postprocess_cube(project, TARGET, "co21", config))
        path.parent.mkdir(parents=True, exist_ok=True)
        fits.PrimaryHDU(disk_cube(seed).astype(np.float32), cube_header()).writeto(path)
    vdir = root / "vfields"
    vdir.mkdir(exist_ok=True)
    # a coarser grid (2" pixels) in m/s: reprojected and converted when combined
    h2 = WCS(cube_header(nx=NX // 2, ny=NY // 2, cdelt_arcsec=2.0)).celestial.to_header()
    h2["BUNIT"] = "m/s"
    _, x = np.mgrid[:NY // 2, :NX // 2]
    coarse = VROT * np.tanh((2 * x + 0.5 - CX) / 6.0) * 1e3
    fits.PrimaryHDU(coarse.astype(np.float32), h2).writeto(vdir / f"{TARGET}_vfield.fits")


def derived_tasks(project: Project) -> dict[str, plan_common.Task]:
    return {t.key[-1]: t for t in P.plan_tasks(P.plan_project(project, stages=["derived"]))}


def dname(root: Path, config: str, ext: str) -> Path:
    return root / "derived" / TARGET / f"{TARGET}_{config}_co21_{ext}.fits"


def data(path: Path) -> np.ndarray:
    return fits.getdata(path).astype(float)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Plan the derived stage and run it: the 12m task first (it makes the 7m prior), then 7m,
    then both again."""
    root = tmp_path_factory.mktemp("rounds")
    project = load_project(write_keys(root))
    write_inputs(root, project)
    tasks = derived_tasks(project)
    work = root / "work"
    first = {"12m": run_task(tasks["12m"], work)}
    prior_after_12m = dname(root, "7m", "6as_strict_mom1").is_file()
    first["7m"] = run_task(tasks["7m"], work)
    again = {c: run_task(tasks[c], work) for c in ("12m", "7m")}
    return {"root": root, "project": project, "tasks": tasks, "work": work, "first": first,
            "again": again, "prior_after_12m": prior_after_12m}


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def test_every_moment_is_a_spec_in_the_round_its_inputs_allow(run: dict) -> None:
    p = run["tasks"]["7m"].params
    rounds = {(m["moment"], m["round"]) for m in p["moments"]}
    assert rounds == {("strictmom0", 1), ("strictmom1", 1), ("broadmom0", 1), ("broadmom1", 1),
                      ("mom1wprior", 2), ("flatstrictmom0", 3), ("flatbroadmom0", 3)}
    assert p["skipped_moments"] == []
    wp = next(m for m in p["moments"] if m["moment"] == "mom1wprior" and m["tag"] == "200pc")
    assert Path(wp["maps"]["strict_mom1"]).name == "synth_7m_co21_200pc_strict_mom1.fits"
    assert Path(wp["maps"]["broad_emom0"]).name == "synth_7m_co21_200pc_broad_emom0.fits"
    assert wp["kwargs"] == {"vwindow_kms": 20.0, "snr_thresh": 2.0}
    assert (Path(wp["prior"]["path"]).name, wp["prior"]["source"]) == (
        "synth_7m_co21_6as_strict_mom1.fits", "own")
    # fallback: the broad mom1 of the coarsest level first (6" > 200 pc = 4.1" > native)
    assert [Path(f).name for f in wp["prior"]["fallback"]] == [
        "synth_7m_co21_6as_broad_mom1.fits", "synth_7m_co21_200pc_broad_mom1.fits",
        "synth_7m_co21_broad_mom1.fits"]
    v = p["vfield"]
    assert Path(v["out"]).name == "synth_7m_co21_vfield.fits" and v["after_round"] == 2
    assert [Path(f).name for f in v["layers"]] == [  # finest first
        "synth_7m_co21_mom1wprior.fits", "synth_7m_co21_200pc_mom1wprior.fits",
        "synth_7m_co21_6as_mom1wprior.fits"]
    assert Path(v["external"]).name == "synth_vfield.fits"
    kinds = sorted((f["kind"], f["tag"]) for f in p["flatmasks"])
    assert kinds == [("flatbroadmask", ""), ("flatstrictmask", ""), ("flatstrictmask", "200pc"),
                     ("flatstrictmask", "6as")]
    assert {f["window_kms"] for f in p["flatmasks"]} == {WINDOW_KMS}
    outputs = {Path(o).name for o in run["tasks"]["7m"].outputs}
    assert {"synth_7m_co21_vfield.fits", "synth_7m_co21_6as_flatstrictmask.fits",
            "synth_7m_co21_flatbroadmask.fits", "synth_7m_co21_200pc_emom1wprior.fits",
            "synth_7m_co21_6as_flatstrict_mom0.fits"} <= outputs


def test_a_prior_of_another_config_is_made_by_the_task_that_needs_it(run: dict) -> None:
    task = run["tasks"]["12m"]
    p = task.params
    wp = next(m for m in p["moments"] if m["algorithm"] == "mom1wprior")
    assert (wp["prior"]["source"], wp["prior"]["config"]) == ("config", "7m")
    made_here = p["priors"][wp["prior"]["path"]]
    assert [lvl["tag"] for lvl in made_here["chain"]["levels"]] == ["", "6as"]
    assert made_here["moment"]["mask"].endswith("synth_7m_co21_6as_strictmask.fits")
    # its cube comes from the 7m postprocess task: an input and a dependency (dropped by the
    # stage filter of the run, so seen in the unfiltered derived builder)
    full = {t.key[-1]: t for t in P.BUILDERS["derived"](
        run["project"], plan_common._selection(run["project"], None), True)}
    assert full["12m"].depends == ("postprocess/synth/co21/12m", "postprocess/synth/co21/7m")
    assert full["7m"].depends == ("postprocess/synth/co21/7m",)
    assert plan_casa.postprocess_cube(run["project"], TARGET, "co21", "7m") in task.inputs
    # maps mom1wprior needs that 12m's list lacks are made too, and say why
    implied = {m["moment"] for m in p["moments"] if m.get("implied_by") == "mom1wprior"}
    assert implied == {"strictmom1", "broadmom1", "broadmom0"}
    # the 7m prior map is not one of 12m's outputs (7m's task owns it)
    assert wp["prior"]["path"] not in task.outputs


# ---------------------------------------------------------------------------------------------
# Running the derived tasks
# ---------------------------------------------------------------------------------------------

def test_every_planned_product_is_written_and_a_rerun_skips(run: dict) -> None:
    for config, task in run["tasks"].items():
        missing = [o for o in task.outputs if not Path(o).is_file()]
        assert not missing, missing
        assert not run["first"][config]["skipped"]
        assert run["again"][config]["skipped"], config
        state = read_task_state(run["work"], task.id)
        assert state["state"] == "done" and set(state["products"]) == set(task.outputs)
    # the 12m task ran first and made the 7m prior (and what it needs); the 7m task reused it
    assert run["prior_after_12m"]
    assert any("products of config 7m for the prior synth_7m_co21_6as_strict_mom1.fits" in n
               for n in run["first"]["12m"]["notes"])
    for config in ("12m", "7m"):                         # the named prior was used, no fallback
        assert not any("prior is" in n for n in run["first"][config]["notes"])


def test_mom1wprior_fills_strict_gaps_from_broad_mom1(run: dict) -> None:
    root = run["root"]
    strict = data(dname(root, "7m", "strict_mom1"))
    broad = data(dname(root, "7m", "broad_mom1"))
    wp = data(dname(root, "7m", "mom1wprior"))
    ewp = data(dname(root, "7m", "emom1wprior"))
    truth = true_vfield()
    have = np.isfinite(strict)
    np.testing.assert_array_equal(wp[have], strict[have])   # strict values are kept
    np.testing.assert_array_equal(ewp[have], data(dname(root, "7m", "strict_emom1"))[have])
    filled = ~have & np.isfinite(wp)
    assert filled.sum() > 80                       # the faint ring (~ 1/3 of it is strict)
    np.testing.assert_array_equal(wp[filled], broad[filled])
    np.testing.assert_array_equal(ewp[filled], data(dname(root, "7m", "broad_emom1"))[filled])
    assert np.median(np.abs(wp[filled] - truth[filled])) < 3.0
    # the rule: only where broad mom0 is detected and the prior agrees within 20 km/s
    m0, e0 = data(dname(root, "7m", "broad_mom0")), data(dname(root, "7m", "broad_emom0"))
    prior = data(dname(root, "7m", "6as_strict_mom1"))
    assert (m0[filled] > 2 * e0[filled]).all()
    assert (np.abs(broad[filled] - prior[filled]) < 20).all()
    candidates = ~have & np.isfinite(broad)
    rejected = candidates & ((m0 <= 2 * e0) | ~(np.abs(broad - prior) < 20))
    assert np.isnan(wp[rejected]).all()


def test_mom1wprior_rejects_broad_values_the_prior_disagrees_with(run: dict,
                                                                  tmp_path: Path) -> None:
    """The same maps with a prior 40 km/s off on the approaching half: no fill there."""
    root = run["root"]
    maps = {name: dname(root, "7m", ext) for name, ext in (
        ("strict_mom1", "strict_mom1"), ("strict_emom1", "strict_emom1"),
        ("broad_mom1", "broad_mom1"), ("broad_emom1", "broad_emom1"),
        ("broad_mom0", "broad_mom0"), ("broad_emom0", "broad_emom0"))}
    header = fits.getheader(maps["strict_mom1"])
    truth = true_vfield()
    _, x = np.mgrid[:NY, :NX]
    off = np.where(x < CX, truth + 40.0, truth)
    maps["prior_mom1"] = tmp_path / "prior.fits"
    fits.PrimaryHDU(off.astype(np.float32), header).writeto(maps["prior_mom1"])
    out, _ = moments.write_moment(None, None, None, "mom1wprior", tmp_path / "wp.fits",
                                  tmp_path / "ewp.fits", maps_to_pass=maps, vwindow_kms=20.0)
    wp, strict = data(out), data(maps["strict_mom1"])
    filled = np.isfinite(wp) & ~np.isfinite(strict)
    assert filled[:, NX // 2 + 2:].sum() > 50 and not filled[:, : NX // 2 - 2].any()


def test_velocity_field_is_first_finite_finest_first(run: dict) -> None:
    root = run["root"]
    vf = data(dname(root, "7m", "vfield"))
    assert fits.getheader(dname(root, "7m", "vfield"))["BUNIT"] == "km/s"
    layers = [data(dname(root, "7m", e)) for e in ("mom1wprior", "200pc_mom1wprior",
                                                    "6as_mom1wprior")]
    taken = np.zeros(vf.shape, bool)
    for layer in layers:
        here = ~taken & np.isfinite(layer)
        np.testing.assert_allclose(vf[here], layer[here], rtol=1e-6)
        taken |= here
    assert (~taken).sum() > 100            # the rest comes from the window key's field (m/s)
    np.testing.assert_allclose(vf[~taken], true_vfield()[~taken], atol=3.0)
    assert np.isfinite(vf).all()


def test_velocity_field_array_hierarchy() -> None:
    nan = np.nan
    fine = np.array([[1.0, nan, nan, nan]])
    mid = np.array([[9.0, 2.0, nan, nan]])
    coarse = np.array([[9.0, 9.0, 3.0, nan]])
    np.testing.assert_array_equal(moments.velocity_field([fine, mid, coarse]),
                                  [[1.0, 2.0, 3.0, nan]])
    with pytest.raises(ConfigError):
        moments.velocity_field([fine, np.zeros((2, 2))])


def test_flat_mask_follows_the_velocity_field_within_the_window(run: dict) -> None:
    root = run["root"]
    vf = data(dname(root, "7m", "vfield"))
    for ext, base in (("flatstrictmask", "strictmask"), ("flatbroadmask", "broadmask"),
                      ("6as_flatstrictmask", "6as_strictmask")):
        flat = data(dname(root, "7m", ext)).astype(bool)
        window = np.abs(VAXIS[:, None, None] - vf[None]) <= WINDOW_KMS / 2
        np.testing.assert_array_equal(flat, window | data(dname(root, "7m", base)).astype(bool))
    # 20 km/s, not PHANGS' 50 km/s default: 8 channels of 2.5 km/s per spectrum
    outside = ~data(dname(root, "7m", "broadmask")).astype(bool).any(axis=0)
    counts = data(dname(root, "7m", "flatbroadmask")).astype(bool).sum(axis=0)[outside]
    assert set(np.unique(counts)) <= {8, 9} and outside.sum() > 100


def test_flat_moments_integrate_the_window(run: dict) -> None:
    root = run["root"]
    flat = data(dname(root, "7m", "flatstrict_mom0"))
    strict = data(dname(root, "7m", "strict_mom0"))
    # the flat window recovers the faint ring that the strict mask misses
    y, x = np.mgrid[:NY, :NX]
    ring = (np.hypot(x - CX, y - CY) > 9) & (np.hypot(x - CX, y - CY) < 12)
    true_ring = 0.12 * SIGMA_V * math.sqrt(2 * math.pi)
    assert np.median(flat[ring]) > 0.75 * true_ring
    assert np.median(np.nan_to_num(strict[ring])) < 0.5 * true_ring
    assert dname(root, "12m", "flatbroad_mom0").is_file()


# ---------------------------------------------------------------------------------------------
# Planning corner cases (no run)
# ---------------------------------------------------------------------------------------------

def _plan(tmp_path: Path, **keys: str) -> dict[str, plan_common.Task]:
    project = load_project(write_keys(tmp_path, **keys))
    for config in ("7m", "12m"):
        path = Path(plan_casa.postprocess_cube(project, TARGET, "co21", config))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return derived_tasks(project)


def test_flat_moments_without_any_velocity_field_are_skipped(tmp_path: Path) -> None:
    derived = DERIVED_KEY.replace("'mom1wprior',", "")
    tasks = _plan(tmp_path, window_line=f"{TARGET},{WINDOW_KMS},", derived_key=derived)
    p = tasks["7m"].params
    assert p["vfield"] is None and p["flatmasks"] == []
    assert {s["moment"] for s in p["skipped_moments"]} == {"flatstrictmom0", "flatbroadmom0"}
    assert "velocity field" in p["skipped_moments"][0]["reason"]
    assert not any("flat" in Path(o).name for o in tasks["7m"].outputs)


def test_window_comes_from_the_window_key_then_the_derived_key(tmp_path: Path) -> None:
    derived = DERIVED_KEY + "all all_line flatstrictmask_kw {'window':'40km/s'}\n"
    p = _plan(tmp_path / "a", derived_key=derived)["7m"].params
    assert {f["window_kms"] for f in p["flatmasks"]} == {WINDOW_KMS}   # window key wins
    p = _plan(tmp_path / "b", derived_key=derived, window_line="other,30.0,")["7m"].params
    windows = {f["kind"]: f["window_kms"] for f in p["flatmasks"]}
    assert windows == {"flatstrictmask": 40.0, "flatbroadmask": 50.0}   # derived kw, default


def test_missing_external_vfield_is_a_note_and_mom1wprior_layers_remain(tmp_path: Path) -> None:
    p = _plan(tmp_path)["7m"].params                    # vfields/ not written here
    assert p["vfield"]["external"] is None and len(p["vfield"]["layers"]) == 3
    assert any("synth_vfield.fits does not exist" in n for n in p["notes"])


def test_without_a_prior_the_fallback_is_planned(tmp_path: Path) -> None:
    key = MOMENT_KEY.replace("mom1wprior  other_exts {'prior':'_7m_co21_6as_strict_mom1.fits'}\n",
                             "")
    p = _plan(tmp_path, moment_key=key)["12m"].params
    wp = next(m for m in p["moments"] if m["algorithm"] == "mom1wprior")
    assert wp["prior"]["source"] == "fallback" and p["priors"] == {}
    assert Path(wp["prior"]["fallback"][0]).name == "synth_12m_co21_6as_broad_mom1.fits"


@pytest.mark.parametrize(("line", "message"), [
    ("mom1wprior maps_to_pass ['strictmom0']", "none of the maps mom1wprior combines"),
    ("mom1wprior maps_to_pass ['strict_mom0']", "none of the maps mom1wprior combines"),
    ("mom1wprior maps_to_pass ['nosuch']", "'nosuch', which the moment key does not define"),
    ("mom1wprior other_exts {'extra':'_x.fits'}", "other_exts 'extra' is not used"),
    ("mom1wprior other_exts {'vfield_prior':'_x.fits'}", "'vfield_prior' name different"),
    ("mom1wprior kwargs {'vfield_reject_thresh':'20 K'}", "is not a velocity"),
    ("strictmom0 kwargs {'include_limit':False}", "'include_limit' is not a parameter of mom0"),
])
def test_bad_round_definitions_are_key_errors(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _plan(tmp_path, moment_key=MOMENT_KEY + line + "\n")
    assert "moment_key.txt" in str(err.value)
    if line.startswith("mom1wprior"):            # round-2 errors name the appended line
        assert f"moment_key.txt:{MOMENT_KEY.count(chr(10)) + 1})" in str(err.value)


def test_missing_prior_falls_back_to_the_coarsest_broad_mom1_with_a_note(tmp_path: Path) -> None:
    """A named prior file that is not there when the map is made: the coarsest broad mom1."""
    from hpcddf.phangs.run_common import RunContext
    from hpcddf.phangs.run_derived import _prior_map

    fallback = [tmp_path / "6as_broad_mom1.fits", tmp_path / "broad_mom1.fits"]
    fallback[1].write_bytes(b"")                      # the 6" level was not made
    spec = {"moment": "mom1wprior", "prior": {"path": str(tmp_path / "gone.fits"),
                                              "source": "file",
                                              "fallback": [str(f) for f in fallback]}}
    ctx = RunContext(tmp_path, plan_common.Task("derived", ("t", "p", "c")))
    assert _prior_map(ctx, spec) == str(fallback[1])
    assert any("gone.fits is missing" in n and "broad_mom1.fits" in n for n in ctx.notes)


# PHANGS' published moment key (akleroy/phangs_imaging_scripts, phangs-alma_keys/moment_key.txt):
# the strict and broad moments mom1wprior reads and its own block, verbatim (tabs, the stray
# spaces after the name). maps_to_pass names map extensions, other_exts uses 'vfield_prior'.
PHANGS_MOMENT_KEY = (
    "strictmom1\talgorithm\tmom1\nstrictmom1\tmask\t\tstrictmask\n"
    "strictmom1\text\t\t_strict_mom1\nstrictmom1\text_error\t_strict_emom1\n"
    "strictmom1\tround\t\t1\nstrictmom1\tkwargs\t\t{}\n\n"
    "broadmom0\talgorithm\tmom0\nbroadmom0\tmask\t\tbroadmask\n"
    "broadmom0\text\t\t_broad_mom0\nbroadmom0\text_error\t_broad_emom0\n"
    "broadmom0\tround\t\t1\nbroadmom0\tkwargs\t\t{}\n\n"
    "broadmom1\talgorithm\tmom1\nbroadmom1\tmask\t\tbroadmask\n"
    "broadmom1\text\t\t_broad_mom1\nbroadmom1\text_error\t_broad_emom1\n"
    "broadmom1\tround\t\t1\nbroadmom1\tkwargs\t\t{}\n\n"
    "mom1wprior\talgorithm\tmom1wprior\n"
    "mom1wprior \tmask \t\tNone\n"
    "mom1wprior \tround \t\t2\n"
    "mom1wprior \text \t\t_mom1wprior\n"
    "mom1wprior \text_error \t_emom1wprior\n"
    "mom1wprior\tmaps_to_pass\t['strict_mom1','strict_emom1','broad_mom1','broad_emom1',"
    "'broad_mom0','broad_emom0']\n"
    "mom1wprior \tother_exts \t{'vfield_prior':'_7m+tp_co21_15as_strict_mom1.fits'}\n"
    "mom1wprior\tkwargs \t\t{'vfield_reject_thresh':'20km/s','mom0_thresh':2.0}\n")
# 7m lists the maps mom1wprior reads; 12m only mom1wprior, so the extensions resolve to
# moments found elsewhere in the key (and those are made for it)
PHANGS_DERIVED_KEY = DERIVED_KEY.replace(
    "['strictmom0','strictmom1','broadmom0','broadmom1','mom1wprior','flatstrictmom0',"
    "'flatbroadmom0']", "['strictmom1','broadmom0','broadmom1','mom1wprior']").replace(
    "['strictmom0','mom1wprior','flatbroadmom0']", "['mom1wprior']")


def test_phangs_published_mom1wprior_lines_plan_unchanged(tmp_path: Path) -> None:
    tasks = _plan(tmp_path, moment_key=PHANGS_MOMENT_KEY, derived_key=PHANGS_DERIVED_KEY)
    derived = tmp_path / "derived" / TARGET
    for config, task in tasks.items():
        specs = task.params["moments"]
        wps = [s for s in specs if s["algorithm"] == "mom1wprior"]
        assert sorted(s["tag"] for s in wps) == ["", "200pc", "6as"]   # native + every res
        for wp in wps:
            stem = f"{TARGET}_{config}_co21" + (f"_{wp['tag']}" if wp["tag"] else "")
            assert {k: Path(v).name for k, v in wp["maps"].items()} == {
                "strict_mom1": f"{stem}_strict_mom1.fits", "strict_emom1": f"{stem}_strict_emom1.fits",
                "broad_mom1": f"{stem}_broad_mom1.fits", "broad_emom1": f"{stem}_broad_emom1.fits",
                "broad_mom0": f"{stem}_broad_mom0.fits", "broad_emom0": f"{stem}_broad_emom0.fits"}
            assert wp["prior"]["path"] == str(derived / f"{TARGET}_7m+tp_co21_15as_strict_mom1.fits")
            assert wp["prior"]["source"] == "file"
            # PHANGS' 'mom0_thresh' is the mom0 S/N threshold, not an ignored keyword
            assert wp["kwargs"] == {"vwindow_kms": 20.0, "snr_thresh": 2.0}
            assert "ignored_kwargs" not in wp and wp["round"] == 2
        made = {s["moment"]: s.get("implied_by") for s in specs if s["algorithm"] != "mom1wprior"}
        assert made == ({"strictmom1": None, "broadmom0": None, "broadmom1": None}
                        if config == "7m" else
                        dict.fromkeys(("strictmom1", "broadmom0", "broadmom1"), "mom1wprior"))


def test_prior_key_and_moment_names_still_plan_the_same(tmp_path: Path) -> None:
    """hpcddf's own spellings ('prior', moment names) give the same plan as PHANGS'."""
    ours = (PHANGS_MOMENT_KEY.replace("'vfield_prior':", "'prior':")
            .replace("['strict_mom1','strict_emom1','broad_mom1','broad_emom1','broad_mom0',"
                     "'broad_emom0']", "['strictmom1','broadmom1','broadmom0']"))
    assert ours != PHANGS_MOMENT_KEY and "strict_emom1'" not in ours.split("maps_to_pass")[1]
    a = _plan(tmp_path / "a", moment_key=PHANGS_MOMENT_KEY, derived_key=PHANGS_DERIVED_KEY)
    b = _plan(tmp_path / "b", moment_key=ours, derived_key=PHANGS_DERIVED_KEY)
    for config in ("7m", "12m"):
        wa, wb = ([s for s in t[config].params["moments"] if s["algorithm"] == "mom1wprior"]
                  for t in (a, b))
        assert [Path(s["prior"]["path"]).name for s in wa] == \
               [Path(s["prior"]["path"]).name for s in wb]
        assert [{k: Path(v).name for k, v in s["maps"].items()} for s in wa] == \
               [{k: Path(v).name for k, v in s["maps"].items()} for s in wb]


def test_an_unknown_map_extension_is_an_error_naming_the_line(tmp_path: Path) -> None:
    key = PHANGS_MOMENT_KEY + "mom1wprior maps_to_pass ['strict_mom1','strict_mom9']\n"
    with pytest.raises(ConfigError, match="'strict_mom9', which the moment key does not "
                                          "define") as err:
        _plan(tmp_path, moment_key=key, derived_key=PHANGS_DERIVED_KEY)
    line = key.count("\n")                        # the appended line, the one in force
    assert f"moment_key.txt:{line})" in str(err.value)
    assert "_strict_mom9" in str(err.value) and "strict_mom1" in err.value.hint
