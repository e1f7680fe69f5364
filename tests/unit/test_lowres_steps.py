"""The extended-mask and low-resolution step builders (hpcddf.lofar.lowres): the exact
commands for a tier1 configuration (names, masks, uv range, beam, solutions, outputs), and the
extended_mask step run through the engine's runner on synthetic images."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from hpcddf.engine.runner import RunContext, Step, run_step
from hpcddf.lofar.config import load_config
from hpcddf.lofar.ddfcommands import Machine
from hpcddf.lofar.extmask import main as extmask_main
from hpcddf.lofar.lowres import BUILDERS
from hpcddf.lofar.stepkit import Reduction, external_mask_now

DATA = Path(__file__).parent.parent / "data"
TIER1 = str(DATA / "tier1-sep2024.cfg")
NODE = Machine(ncpu_ddf=4, ncpu_kms=4, cache_dir="/scratch/c", cpus=(8, 9, 10, 11), timeout_s=3600.0)
MS = ("L1_SB000.ms", "L1_SB010.ms")
FULL = ("L1_SB000.ms", "L1_SB001.ms", "L1_SB010.ms")
TOOLS = ("-m", "hpcddf.lofar.tools")
EXTMASK = ("-m", "hpcddf.lofar.extmask")


def red(*overrides: str, m: Machine = NODE) -> Reduction:
    """tier1 with the bootstrap on (as tier1 has it): extended_size 2000, rmsfacet, TGSS."""
    cfg = load_config([TIER1], list(overrides), catalog_dir="/cats")
    return Reduction(cfg, m, MS, FULL)


def step(name: str, *overrides: str) -> Step:
    return BUILDERS[name](red(*overrides))


def ddf(s: Step) -> list[str]:
    [cmd] = [c for c in s.commands if c.argv[0] == "DDF.py"]
    return list(cmd.argv)


def opt(argv: list[str], name: str) -> str | None:
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(vals) <= 1, (name, vals)
    return vals[0] if vals else None


def prog(s: Step, module: tuple[str, str], sub: str) -> list[str]:
    [argv] = [list(c.argv[4:]) for c in s.commands if c.argv[1:3] == module and c.argv[3] == sub]
    return argv


# ------------------------------------------------------------------------------ extended_mask

def test_extended_mask_makes_the_bootstrap_masks_then_external_mask_ext():
    s = step("extended_mask")
    assert [c.argv[0] for c in s.commands] == ["MakeMask.py", NODE.python, NODE.python]
    assert list(s.commands[0].argv) == [
        "MakeMask.py", "--RestoredIm=image_bootstrap.app.mean.fits", "--OutName=rmsmapmask", "--Th=3.0",
        "--Box=50,2", "--OutNameNoiseMap=image_bootstrap.app.mean.fits.noise"]
    assert prog(s, EXTMASK, "extended") == [
        "--image", "image_bootstrap.app.mean.fits", "--template", "image_dirin_SSD.app.restored.fits",
        "--root", "bootstrap", "--rms-thresh", "3.0", "--size-thresh", "2000", "--rmsfacet",
        "--region", "image_dirin_SSD_m_c.tessel.reg", "--noise-map", "image_bootstrap.app.mean.fits.noise.fits"]
    assert prog(s, TOOLS, "external-mask") == [
        "--template", "image_dirin_SSD_init.dirty.fits", "--out", "external_mask_ext.fits",
        "--record", "external_mask_ext.json", "--tgss", "/cats/TGSSADR1_7sigma_catalog.fits",
        "--tgss-radius", "8.0", "--tgss-flux", "300.0", "--fits", "bootstrap-mask-high.fits"]
    assert s.outputs == ("bootstrap-mask-low.fits", "bootstrap-mask-high.fits", "bootstrap-rms-low.fits",
                         "external_mask_ext.json")
    assert s.params == {"extended_size": 2000}


def test_without_rmsfacet_tgss_or_region_the_mask_is_the_central_rms_and_the_bootstrap_mask_only():
    s = step("extended_mask", "--masking-rmsfacet=False", "--masking-tgss=None", "--masking-extended_size=500",
             "--masking-extended_rms=4")
    assert "MakeMask.py" not in [c.argv[0] for c in s.commands]
    ext = prog(s, EXTMASK, "extended")
    assert "--rmsfacet" not in ext and ext[ext.index("--size-thresh") + 1] == "500"
    assert ext[ext.index("--rms-thresh") + 1] == "4.0"
    assert prog(s, TOOLS, "external-mask")[6:] == ["--fits", "bootstrap-mask-high.fits"]
    assert "bootstrap-rms-low.fits" not in s.outputs
    region = prog(step("extended_mask", "--masking-region=field.reg"), TOOLS, "external-mask")
    assert region[region.index("--region") + 1] == "field.reg"


def test_the_full_bandwidth_masks_use_external_mask_ext_once_it_exists():
    assert external_mask_now(red()) == "external_mask_ext.fits"
    assert external_mask_now(red("--masking-extended_size=None")) == "external_mask.fits"
    assert external_mask_now(red("--control-bootstrap=False")) == "external_mask.fits"
    prev = ("--inputmodel-basedicomodel=prev/im", "--image-clusterfile=prev/cat.npy")
    assert external_mask_now(red(*prev)) == "external_mask.fits"  # no bootstrap in such a run


# ------------------------------------------------------------------------------ the images

def test_image_full_low_is_the_low_resolution_clean_of_the_full_list():
    s = step("image_full_low")
    argv = ddf(s)
    expect = {"Data-MS": "big-mslist.txt", "Data-ColName": "DATA_DI_CORRECTED", "Output-Name": "image_full_low",
              "Deconv-Mode": "SSD", "Deconv-MaxMajorIter": "2", "Mask-SigTh": "5", "Image-NPix": "6000",
              "Image-Cell": "4.5", "Output-RestoringBeam": "20", "Weight-Robust": "-0.25",
              "Selection-UVRangeKm": "[0.1,25.75]", "Weight-ColName": "IMAGING_WEIGHT", "Beam-Smooth": "1",
              "GAClean-AllowNegativeInitHMP": "1", "Deconv-PeakFactor": "0.001",
              "DDESolutions-DDSols": "[DDS3_full_smoothed,DDS3_full_slow_merged]",
              "DDESolutions-DDModeGrid": "AP", "DDESolutions-DDModeDeGrid": "AP"}
    assert {k: opt(argv, k) for k in expect} == expect
    for absent in ("Facets-CatNodes", "Mask-External", "Predict-InitDicoModel", "DDESolutions-GlobalNorm",
                   "Cache-PSF", "Cache-Dirty"):
        assert opt(argv, absent) is None, absent
    assert s.outputs == ("image_full_low.app.restored.fits", "image_full_low.DicoModel")
    assert s.params == {"uvrange_km": [0.1, 25.75], "imsize": 6000, "cell_arcsec": 4.5}


def test_image_full_low_passes_the_bootstrap_mask_only_when_it_masks_a_pixel(tmp_path: Path, monkeypatch):
    """Decided on the node: the first command flags a non-empty bootstrap-mask-low.fits, and
    the DDF command gets --Mask-External only when the flag exists as it starts."""
    s = step("image_full_low")
    check, cmd = s.commands
    assert check.argv[1:] == (*EXTMASK, "nonempty", "--mask", "bootstrap-mask-low.fits",
                              "--flag", "image_full_low.external-mask.json")
    monkeypatch.chdir(tmp_path)
    hdr = WCS(naxis=2).to_header()
    for pixels, used in ((0, False), (5, True), (0, False)):
        data = np.zeros((20, 20), dtype=np.float32)
        data.ravel()[:pixels] = 1
        fits.PrimaryHDU(data, header=hdr).writeto("bootstrap-mask-low.fits", overwrite=True)
        assert extmask_main(list(check.argv[3:])) == 0
        argv = cmd.resolved(tmp_path).argv
        assert ("--Mask-External=bootstrap-mask-low.fits" in argv) is used, pixels
    assert [c.argv[0] for c in step("image_full_low", "--masking-extended_size=None").commands] == ["DDF.py"]


def test_image_full_low_im_cleans_one_more_cycle_in_makemask_or_the_bootstrap_mask():
    s = step("image_full_low_im", "--masking-low_threshold=4")
    mm, merge, cmd = s.commands
    assert list(mm.argv) == ["MakeMask.py", "--RestoredIm=image_full_low.app.restored.fits", "--Th=4", "--Box=50,2"]
    mask = "image_full_low.app.restored.fits.mask.fits"
    assert list(merge.argv[3:]) == ["merge-masks", "--out", mask, mask, "--optional", "bootstrap-mask-low.fits"]
    argv = list(cmd.argv)
    assert opt(argv, "Mask-External") == mask and opt(argv, "Deconv-MaxMajorIter") == "1"
    assert opt(argv, "Predict-InitDicoModel") == "image_full_low.DicoModel" and opt(argv, "Mask-SigTh") == "5"
    assert opt(argv, "Output-Name") == "image_full_low_im" and opt(argv, "Beam-Smooth") == "1"
    assert [w[1] for w in cmd.when_exists] == [("--Cache-PSF=force",), ("--Cache-Dirty=forceresidual",)]
    assert [w[0] for w in cmd.when_exists] == ["/scratch/c/big-mslist.txt.ddfcache/PSF",
                                               "/scratch/c/big-mslist.txt.ddfcache/LastResidual"]
    assert s.outputs == (mask, "image_full_low_im.app.restored.fits", "image_full_low_im.DicoModel")
    merge = step("image_full_low_im", "--masking-extended_size=None").commands[1]
    assert list(merge.argv[3:]) == ["merge-masks", "--out", mask, mask]


def test_image_full_low_m_makes_the_full_extended_mask_with_1500_pixel_islands():
    s = step("image_full_low_m", "--image-final_rmsfactor=2.5", "--masking-extended_rms=2.5")
    image = "image_full_low_im.app.restored.fits"
    assert list(s.commands[0].argv) == ["MakeMask.py", f"--RestoredIm={image}", "--OutName=rmsmapmask",
                                        "--Th=3.0", "--Box=50,2", f"--OutNameNoiseMap={image}.noise"]
    assert prog(s, EXTMASK, "extended") == [
        "--image", image, "--template", "image_dirin_SSD.app.restored.fits", "--root", "full",
        "--rms-thresh", "2.5", "--size-thresh", "1500", "--rmsfacet", "--region", "image_dirin_SSD_m_c.tessel.reg",
        "--noise-map", f"{image}.noise.fits"]  # 1500 hard-coded, whatever extended_size says
    assert prog(s, TOOLS, "merge-masks") == ["--out", f"{image}.mask.fits", f"{image}.mask.fits",
                                             "--optional", "full-mask-low.fits"]
    argv = ddf(s)
    assert opt(argv, "Mask-External") == f"{image}.mask.fits" and opt(argv, "Mask-SigTh") == "4"
    assert opt(argv, "Deconv-RMSFactor") == "2.5" and opt(argv, "Deconv-MaxMajorIter") == "1"
    assert opt(argv, "Predict-InitDicoModel") == "image_full_low_im.DicoModel"
    assert opt(argv, "Output-Name") == "image_full_low_m"
    assert s.outputs == ("full-mask-low.fits", "full-mask-high.fits", "full-rms-low.fits", f"{image}.mask.fits",
                         "image_full_low_m.app.restored.fits")


def test_a_run_from_a_previous_model_takes_the_full_mask_grid_from_the_full_bandwidth_image():
    prev = ("--inputmodel-basedicomodel=prev/im", "--image-clusterfile=prev/cat.npy")
    ext = prog(step("image_full_low_m", *prev), EXTMASK, "extended")
    assert ext[ext.index("--template") + 1] == "image_full_ampphase_di.app.restored.fits"
    assert ext[ext.index("--region") + 1] == "image_full_ampphase_di_m.tessel.reg"
    assert "--optional" not in prog(step("image_full_low_im", *prev), TOOLS, "merge-masks")


def test_the_chain_follows_the_reference_index_maps_and_size_rules():
    """apply_sols[6], normalize[2], low_imsize = imsize*cellsize/low_cell, uv <= 2.5*206/psf km."""
    over = ("--solutions-apply_sols=['P','P','P','P','P','AP','P']",
            "--solutions-normalize=['AbsAnt','BLBased','SumBLBased']", "--image-low_imsize=None",
            "--image-low_psf_arcsec=60", "--image-low_cell=20", "--image-uvmin=0.05",
            "--solutions-do_very_slow=False", "--image-low_robust=-0.5")
    for name in ("image_full_low", "image_full_low_im", "image_full_low_m"):
        argv = ddf(step(name, *over))
        assert opt(argv, "DDESolutions-DDModeGrid") == opt(argv, "DDESolutions-DDModeDeGrid") == "P", name
        assert opt(argv, "DDESolutions-GlobalNorm") == "SumBLBased", name
        assert opt(argv, "DDESolutions-DDSols") == "DDS3_full_smoothed", name
        assert opt(argv, "Image-NPix") == str(int(20000 * 1.5 / 20)) and opt(argv, "Image-Cell") == "20", name
        assert opt(argv, "Selection-UVRangeKm") == f"[0.05,{2.5 * 206 / 60}]", name
        assert opt(argv, "Output-RestoringBeam") == "60" and opt(argv, "Weight-Robust") == "-0.5", name


# ------------------------------------------------------------------------------ the deep mask

def test_external_mask_ext_deep_is_tgss_region_and_the_full_high_mask_on_the_final_grid():
    s = step("external_mask_ext_deep", "--masking-region=field.reg")
    assert prog(s, TOOLS, "external-mask") == [
        "--template", "image_full_ampphase_di.app.restored.fits", "--out", "external_mask_ext-deep.fits",
        "--record", "external_mask_ext-deep.json", "--tgss", "/cats/TGSSADR1_7sigma_catalog.fits",
        "--tgss-radius", "8.0", "--tgss-flux", "300.0", "--region", "field.reg", "--fits", "full-mask-high.fits"]
    assert s.outputs == ("external_mask_ext-deep.json",)
    plain = prog(step("external_mask_ext_deep", "--masking-extended_size=None"), TOOLS, "external-mask")
    assert "--fits" not in plain  # full-mask-high.fits is merged only with [masking] extended_size


# ------------------------------------------------------------------------------ run for real

def _image(path: Path, n: int, cell: float, data: np.ndarray | None = None) -> None:
    w = WCS(naxis=4)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN", "STOKES", "FREQ"]
    w.wcs.crval, w.wcs.crpix = [180.0, 60.0, 1.0, 1.44e8], [n // 2 + 1, n // 2 + 1, 1, 1]
    w.wcs.cdelt = [-cell / 3600.0, cell / 3600.0, 1.0, 1e6]
    plane = np.zeros((n, n)) if data is None else data
    fits.PrimaryHDU(plane.astype(np.float32).reshape(1, 1, n, n), header=w.to_header()).writeto(path)


def test_the_extended_mask_step_runs_through_the_engine(tmp_path: Path):
    """The step's tools on real files, through the runner: the bootstrap masks, the outputs it
    declares, and external_mask_ext.fits = the high mask on the full-resolution grid."""
    img = np.random.default_rng(0).normal(0.0, 0.01, (300, 300))
    img[100:140, 150:190] += 0.2  # 1600 px of extended emission above 3 sigma
    _image(tmp_path / "image_bootstrap.app.mean.fits", 300, 20.0, img)
    _image(tmp_path / "image_dirin_SSD.app.restored.fits", 600, 10.0)
    _image(tmp_path / "image_dirin_SSD_init.dirty.fits", 600, 10.0)
    m = replace(NODE, cache_dir=str(tmp_path / "cache"), cpus=(), timeout_s=120.0, python=sys.executable)
    s = BUILDERS["extended_mask"](red("--masking-rmsfacet=False", "--masking-tgss=None",
                                      "--masking-extended_size=1000", m=m))
    ctx = RunContext(workdir=tmp_path, log_dir=tmp_path / "logs", marker_dir=tmp_path / "done",
                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    ctx.log_dir.mkdir()
    ctx.marker_dir.mkdir()
    marker = run_step(ctx, s)
    assert marker["outputs"] == ["bootstrap-mask-low.fits", "bootstrap-mask-high.fits", "external_mask_ext.json"]
    high = fits.getdata(tmp_path / "bootstrap-mask-high.fits")[0, 0] > 0
    ext = fits.getdata(tmp_path / "external_mask_ext.fits")[0, 0] > 0
    assert high.sum() >= 4 * 1600 and (ext == high).all()
    # low pixel p sits at template pixel 300 + 2 (p - 150); the outermost template row rounds either way
    assert high[201:279, 301:379].all() and not high[:190].any() and not high[:, :290].any()
