"""The product step builders (polarisation cubes, Stokes V, spectral_restored): the exact DDF.py
options per frequency, observation and band, read from real simulated MSs, the tool commands
around them, compression as [compression] says, and the refusals before anything runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hpcddf.errors import PlanError
from hpcddf.lofar.config import load_config
from hpcddf.lofar.ddfcommands import Machine
from hpcddf.lofar.fullband import FINAL_NS, final_sols
from hpcddf.lofar.products import check_polcubes, dynspec, polcubes, spectral_restored, stokesv
from hpcddf.lofar.stepkit import Reduction

TIER1 = str(Path(__file__).parent.parent / "data" / "tier1-sep2024.cfg")
NODE = Machine(ncpu_ddf=4, ncpu_kms=4, cache_dir="/scratch/c", cpus=(8, 9, 10, 11), timeout_s=3600.0)
FULL = ("SIM_SB000.ms", "SIM_SB001.ms", "L2_SB000.ms")


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> Path:
    """Two subbands of 3 channels (means 128 and 131 MHz) of observation SIM, and observation
    L2 at 128 MHz (a renamed copy of the first)."""
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    d = tmp_path_factory.mktemp("field")
    simulate_field(d, SimSpec(n_ms=2, nant=5, ntime=3, nchan=3, chan_width_hz=1e6, freq0_hz=127e6))
    shutil.copytree(d / "SIM_SB000.ms", d / "L2_SB000.ms")
    return d


@pytest.fixture
def red(field, monkeypatch, tmp_path):
    """A tier1 Reduction built in the field directory, with no fpack on PATH."""
    monkeypatch.chdir(field)
    monkeypatch.setenv("PATH", str(tmp_path))

    def make(*overrides: str) -> Reduction:
        cfg = load_config([TIER1], ["--control-bootstrap=False", *overrides], catalog_dir="/cats")
        return Reduction(cfg, NODE, ("SIM_SB000.ms",), FULL, workdir=field)
    return make


def _ddf(step) -> list[list[str]]:
    return [list(c.argv) for c in step.commands if c.argv[0] == "DDF.py"]


def _tools(step) -> list[list[str]]:
    return [list(c.argv[3:]) for c in step.commands if c.argv[1:3] == ("-m", "hpcddf.lofar.cubes")]


def test_polcubes_image_each_frequency_of_both_sets_as_dirty_iqu_cubes(red):
    r = red()
    step = polcubes(r)
    ddf = _ddf(step)
    assert [a[4] for a in ddf] == [f"--Output-Name=image_full_{s}_IQU_Cube{i}" for s in ("low", "vlow") for i in (0, 1)]
    low0, vlow1 = ddf[0], ddf[3]
    for opt in ("--Data-MS=stokes-mslist-0.txt", "--Data-ColName=DATA_DI_CORRECTED", "--Output-Mode=Dirty",
                "--Output-Cubes=dD", "--RIME-PolMode=IQU", "--Freq-NBand=3", "--Selection-ChanStart=0",
                "--Selection-ChanEnd=3", "--Beam-Smooth=1", "--Weight-ColName=IMAGING_WEIGHT",
                "--Image-NPix=6000", "--Image-Cell=4.5", "--Output-RestoringBeam=20", "--Weight-Robust=-0.25",
                "--Selection-UVRangeKm=[0.1,25.75]", f"--DDESolutions-DDSols={final_sols(r)}",
                "--DDESolutions-DDModeGrid=AP", "--Cache-Dirty=off"):
        assert opt in low0, opt
    assert sum(a.startswith("--Output-Mode") for a in low0) == 1 and not any(a.startswith("--Deconv-") for a in low0)
    for opt in ("--Data-MS=stokes-mslist-1.txt", "--Selection-UVRangeKm=[0.1,1.6]", "--Image-NPix=500",
                "--Image-Cell=50", "--Output-RestoringBeam=12", "--Weight-Robust=-0.2"):
        assert opt in vlow1, opt
    tools = _tools(step)
    assert tools[0] == ["lists", "--stokes", *FULL]
    assert ["assemble", "--root", "image_full_low", "--count", "2"] in tools
    assert ["assemble", "--root", "image_full_vlow", "--count", "2"] in tools
    cubes = [f"image_full_{s}_QU.cube.{k}.fits" for s in ("low", "vlow") for k in ("dirty", "dirty.corr")]
    assert tools[-1] == ["compress", "--q", "4", "--delete", *cubes]  # tier1: compressed, originals deleted
    assert step.outputs == ("stokes-mslist-0.txt", "stokes-mslist-1.txt", *[f"{c}.fz" for c in cubes])


def test_polcubes_index_maps_and_the_derived_low_size(red):
    step = polcubes(red("--solutions-normalize=['A', 'B', 'SumBLBased']",
                        "--solutions-apply_sols=['AP','AP','AP','AP','AP','AP','P']", "--image-low_imsize=None"))
    low0 = _ddf(step)[0]
    assert "--DDESolutions-GlobalNorm=SumBLBased" in low0 and "--DDESolutions-DDModeGrid=P" in low0
    assert "--Image-NPix=6666" in low0  # imsize * cellsize / low_cell = 20000 * 1.5 / 4.5


def test_split_cubes_and_fpack_commands_when_fpack_is_installed(red, tmp_path):
    fpack = tmp_path / "fpack"
    fpack.write_text("#!/bin/sh\nexit 1\n")
    fpack.chmod(0o755)
    step = polcubes(red("--control-split_polcubes=True", "--compression-delete_compressed=False"))
    names = [f"image_full_low_{p}.cube.{k}.fits" for p in ("QU", "StokesQ", "StokesU") for k in ("dirty", "dirty.corr")]
    assert ["assemble", "--root", "image_full_low", "--count", "2", "--split"] in _tools(step)
    packs = [list(c.argv) for c in step.commands if c.argv[0] == str(fpack)]
    assert packs[:6] == [[str(fpack), "-q", "4", "-O", f".{n}.fz.fpack", n] for n in names]
    assert _tools(step)[-2][:2] == ["compress", "--fpack-clean"]
    assert _tools(step)[-1][:4] == ["compress", "--fpack-adopt", "--q", "4"] and "--delete" not in _tools(step)[-1]
    assert set(names + [f"{n}.fz" for n in names]) <= set(step.outputs)


def test_polcubes_without_compression_keep_the_fits_cubes(red):
    step = polcubes(red("--compression-compress_polcubes=False"))
    assert _tools(step)[-1][:2] == ["assemble", "--root"]
    assert "image_full_vlow_QU.cube.dirty.corr.fits" in step.outputs
    cleared = step.commands[0].argv  # clearcache_end (default True): the caches go first
    assert cleared[3:6] == ("clear-cache", "--cache-dir", "/scratch/c") and "big-mslist.txt" in cleared
    assert "clear-cache" not in polcubes(red("--control-clearcache_end=False")).commands[0].argv


def test_polcubes_without_a_low_resolution_beam_are_refused_before_anything_runs(red):
    with pytest.raises(PlanError, match=r"\[image\] low_psf_arcsec"):
        polcubes(red("--image-low_psf_arcsec=None"))
    with pytest.raises(PlanError, match="low_psf_arcsec"):
        check_polcubes(load_config([TIER1], ["--image-low_psf_arcsec=None"]))
    check_polcubes(load_config([TIER1], ["--image-low_psf_arcsec=None", "--control-polcubes=False"]))


def test_an_unreadable_ms_is_named(red, field):
    r = red()
    broken = Reduction(r.cfg, r.m, r.mss, ("SIM_SB000.ms", "missing.ms"))
    with pytest.raises(PlanError, match="missing.ms"):
        polcubes(broken)


def test_stokes_v_is_a_dirty_iv_image_per_observation(red):
    r = red("--solutions-normalize=['A', 'B', 'SumBLBased']")
    step = stokesv(r)
    assert _tools(step) == [["lists", "--obsids", *FULL]]
    sim, l2 = _ddf(step)
    assert sim[4] == "--Output-Name=image_full_high_stokesV_SIM" and l2[4] == "--Output-Name=image_full_high_stokesV_L2"
    for opt in ("--Data-MS=mslist-SIM.txt", "--Output-Mode=Dirty", "--RIME-PolMode=IV", "--Beam-Smooth=1",
                "--Image-NPix=20000", "--Image-Cell=1.5", "--Weight-Robust=-0.5", "--Output-RestoringBeam=6",
                "--Selection-UVRangeKm=[0.1,1000]", f"--DDESolutions-DDSols={final_sols(r)}",
                "--DDESolutions-GlobalNorm=SumBLBased", "--Weight-ColName=IMAGING_WEIGHT"):
        assert opt in sim, opt
    assert step.outputs == ("mslist-SIM.txt", "mslist-L2.txt", "image_full_high_stokesV_SIM.dirty.fits",
                            "image_full_high_stokesV_SIM.dirty.corr.fits", "image_full_high_stokesV_L2.dirty.fits",
                            "image_full_high_stokesV_L2.dirty.corr.fits")
    beam = ("--image-final_psf_minor_arcsec=4.5", "--image-final_psf_pa_deg=30")
    assert "--Output-RestoringBeam=[6,4.5,30]" in _ddf(stokesv(red(*beam)))[0]


def test_spectral_restored_images_each_band_with_an_ms_from_the_final_model(red):
    r = red("--image-centralfreqs=[128.0, 131.0, 160.2]", "--solutions-normalize=['A', 'BLBased', 'C']")
    step = spectral_restored(r)
    assert _tools(step)[0] == ["lists", "--bands", "128.0,131.0,160.2", *FULL]
    band0, band1 = _ddf(step)  # no MS near 160.2 MHz: no band 2
    for opt in ("--Data-MS=mslist_iBand_0.txt", f"--Output-Name={FINAL_NS}_Band0", "--Deconv-MaxMajorIter=0",
                "--Predict-InitDicoModel=image_full_ampphase_di_m_masked.DicoModel",
                "--Mask-External=image_full_ampphase_di_m.mask.fits", "--Mask-SigTh=5",
                "--GAClean-RMSFactorInitHMP=1", "--Weight-Robust=-0.5", "--Output-RestoringBeam=6",
                "--DDESolutions-GlobalNorm=BLBased", f"--DDESolutions-DDSols={final_sols(r)}"):
        assert opt in band0, opt
    assert "--Data-MS=mslist_iBand_1.txt" in band1
    assert _tools(step)[-1] == ["bands", "--root", FINAL_NS, "--band=0=128.0", "--band=1=131.0"]
    assert f"{FINAL_NS}_Band1.app.restored.fits" in step.outputs and "mslist_iBand_1.txt" in step.outputs
    shifted = spectral_restored(red("--image-centralfreqs=[128.0, 131.0]", "--offsets-method=pslocal"))
    shifts = [c.argv for c in shifted.commands if c.argv[:2] == ("DDF.py", f"{FINAL_NS}_Band0.parset")]
    assert len(shifts) == 1 and "--Output-ShiftFacetsFile=facet-offset.txt" in shifts[0]


def test_dynamic_spectra_per_observation_from_the_final_residuals(red, field):
    """DynSpecMS's options as ddf-pipeline passes them, one extraction per observation, the V
    image when Stokes V is made, the target catalogue from [spectra] catalogue ($$ = the site's
    catalogue directory) and the bright-source list when the field has one."""
    r = red("--spectra-do_dynspec=True", "--control-stokesv=True")
    step = dynspec(r)
    assert _tools(step)[0] == ["lists", "--obsids", *FULL]
    runs = [list(c.argv[3:]) for c in step.commands if c.argv[1:3] == ("-m", "hpcddf.lofar.dynspec")]
    assert [a[1] for a in runs] == ["mslist-SIM.txt", "mslist-L2.txt"]
    args = dict(zip(runs[0][::2], runs[0][1::2]))
    assert args["--data"] == r.img_col and args["--model"] == "DD_PREDICT"
    assert args["--sols"] == final_sols(r) and args["--DicoFacet"] == f"{FINAL_NS}.DicoFacet"
    assert args["--imageI"] == f"{FINAL_NS}.int.restored.fits" and args["--BeamModel"] == "None"
    assert args["--imageV"] == "image_full_high_stokesV_SIM.dirty.corr.fits"
    assert args["--FitsCatalog"] == "/cats/dyn_spec_catalogue_addedexo_addvlotss.fits"
    assert args["--rad"] == "2" and args["--noff"] == "100" and args["--CutGainsMinMax"] == "0.1,1.5"
    assert "--srclist" not in args
    assert "DynSpecs_SIM.tgz" in step.outputs and "DynSpecs_L2/Catalog.npy" in step.outputs
    (field / "brightlist.csv").write_text("ILTJ1,180.0,60.0,Bright LOFAR\n")
    try:
        no_v = dynspec(red("--spectra-do_dynspec=True", "--control-stokesv=False"))
    finally:
        (field / "brightlist.csv").unlink()
    argv = [c.argv for c in no_v.commands if c.argv[1:3] == ("-m", "hpcddf.lofar.dynspec")][0]
    assert "--imageV" not in argv and argv[argv.index("--srclist") + 1] == "brightlist.csv"


def test_with_offsets_the_bright_source_list_follows_them_and_feeds_the_dynamic_spectra(red):
    """As ddf-pipeline: with [offsets] method set, the offsets step ends with the bright-source
    list from its own PyBDSF catalogue, at [spectra] bright_threshold, and the dynamic spectra
    take it as --srclist (planned before the file exists)."""
    from hpcddf.lofar.fullband import offsets
    r = red("--spectra-do_dynspec=True", "--offsets-method=pslocal", "--spectra-bright_threshold=2.5")
    step = offsets(r)
    [cmd] = [c.argv for c in step.commands if c.argv[1:3] == ("-m", "hpcddf.lofar.brightlist")]
    assert cmd[3:] == ("--catalogue", f"{FINAL_NS}.offsets.srl.fits", "--root", FINAL_NS, "--cutoff", "2.5")
    assert {"brightlist.csv", "dynspec-targets.fits"} <= set(step.outputs)
    argv = [c.argv for c in dynspec(r).commands if c.argv[1:3] == ("-m", "hpcddf.lofar.dynspec")][0]
    assert argv[argv.index("--srclist") + 1] == "brightlist.csv"
    plain = offsets(red("--offsets-method=pslocal", "--spectra-bright_threshold=None"))
    assert not [c for c in plain.commands if "hpcddf.lofar.brightlist" in c.argv]


def test_the_planner_imports_no_numpy_for_the_product_steps():
    import subprocess
    import sys
    code = "import sys, hpcddf.lofar.products; assert 'numpy' not in sys.modules, 'numpy imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode == 0, proc.stderr
