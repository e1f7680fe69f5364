"""The DDF.py / kMS.py command builders: exact argv for a tier1 config, node resources, and the
step declarations (ClipCal in the same step as its kMS, outputs, stages)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hpcddf.engine.nodejob import NodeInfo
from hpcddf.engine.runner import Command
from hpcddf.engine.sites import load_site
from hpcddf.errors import PlanError
from hpcddf.lofar.config import load_config
from hpcddf.lofar.ddfcommands import Machine
from hpcddf.lofar.plan import plan_reduction
from hpcddf.lofar.recipes import build_steps, machine
from hpcddf.lofar.reduction import BUILDERS, Reduction, build, unbuildable

DATA = Path(__file__).parent.parent / "data"
TIER1 = str(DATA / "tier1-sep2024.cfg")
NODE = Machine(ncpu_ddf=4, ncpu_kms=4, cache_dir="/scratch/c", cpus=(8, 9, 10, 11), timeout_s=3600.0)
MS = ("L1_SB000.ms", "L1_SB010.ms")
FULL = ("L1_SB000.ms", "L1_SB001.ms", "L1_SB010.ms")


def tier1(*overrides: str) -> Reduction:
    cfg = load_config([TIER1], ["--control-bootstrap=False", *overrides], catalog_dir="/cats")
    return Reduction(cfg, NODE, MS, FULL)


def test_image_phase1_argv_for_tier1():
    cmd = BUILDERS["image_phase1"](tier1()).commands[0]
    assert list(cmd.argv) == [
        "DDF.py", "--Data-MS=mslist.txt", "--Data-ColName=DATA_DI_CORRECTED", "--Data-Sort=1",
        "--Output-Name=image_phase1", "--Output-Mode=Clean", "--Output-Clobber=1",
        "--Misc-ConserveMemory=1", "--Parallel-NCPU=4", "--Parallel-Affinity=[8,9,10,11]",
        "--Beam-Model=LOFAR", "--Beam-LOFARBeamMode=A", "--Beam-At=facet",
        "--Facets-NFacets=11", "--Facets-DiamMax=1.5", "--Facets-DiamMin=0.1",
        "--Facets-CatNodes=image_dirin_SSD_m.npy.ClusterCat.npy", "--CF-wmax=50000", "--CF-Nw=100",
        "--Cache-Dir=/scratch/c", "--Cache-DirWisdomFFTW=/scratch/c", "--Cache-Weight=reset",
        "--Debug-Pdb=never", "--Log-Memory=1", "--Log-Boring=1", "--DDESolutions-SolsDir=SOLSDIR",
        "--RIME-DecorrMode=FT", "--Freq-NBand=2", "--Weight-ColName=IMAGING_WEIGHT",
        "--Weight-Mode=Briggs", "--Weight-Robust=-0.15", "--Image-NPix=20000", "--Image-Cell=1.5",
        "--Output-RestoringBeam=12", "--Selection-UVRangeKm=[0.1,1000]",
        "--Deconv-Mode=SSD", "--Deconv-MaxMajorIter=2", "--Deconv-PeakFactor=0.001",
        "--Deconv-RMSFactor=0", "--Deconv-FluxThreshold=0", "--Deconv-MaxMinorIter=1000000",
        "--GAClean-MinSizeInit=10", "--Mask-External=image_dirin_SSD_m_c_di_m.mask.fits",
        "--SSDClean-SSDSolvePars=[S,Alpha]", "--SSDClean-BICFactor=0", "--Mask-Auto=1",
        "--Mask-SigTh=5", "--DDESolutions-DDSols=DDS0_smoothed", "--DDESolutions-DDModeGrid=P",
        "--DDESolutions-DDModeDeGrid=P",
        "--Predict-InitDicoModel=image_dirin_SSD_m_c_di_m_masked.DicoModel"]
    assert cmd.timeout_s == 3600.0 and cmd.log_name == "image_phase1.log"


def test_dds0_argv_for_tier1():
    step = BUILDERS["DDS0"](tier1())
    assert list(step.commands[0].argv) == [
        "kMS.py", "--MSName", "L1_SB000.ms", "--SolverType", "KAFCA", "--PolMode", "Scalar",
        "--InCol", "DATA_DI_CORRECTED", "--OutSolsName", "DDS0", "--SolsDir", "SOLSDIR",
        "--NCPU", "4", "--DDFCacheDir", "/scratch/c", "--DoBar", "0",
        "--BeamModel", "LOFAR", "--LOFARBeamMode", "A", "--BeamAt", "facet",
        "--BaseImageName", "image_dirin_SSD_m_c_di_m",
        "--DicoModel", "image_dirin_SSD_m_c_di_m_masked.DicoModel",
        "--NodesFile", "image_dirin_SSD_m.npy.ClusterCat.npy", "--NIterKF", "6", "--CovQ", "0.02",
        "--LambdaKF", "0.5", "--UVMinMax", "0.1,1000", "--dt", "1", "--NChanSols", "1"]
    # one kMS per MS, then merge, smooth and link the smoothed solutions for DDF
    progs = [c.argv[0] for c in step.commands]
    assert progs == ["kMS.py", "kMS.py", "MergeSols.py", "SmoothSols.py", NODE.python]
    assert "--InterpMode=TEC,PolyAmp" in step.commands[3].argv
    assert step.outputs == ("SOLSDIR/L1_SB000.ms/killMS.DDS0.sols.npz",
                            "SOLSDIR/L1_SB010.ms/killMS.DDS0.sols.npz",
                            "SOLSDIR/L1_SB000.ms/killMS.DDS0_smoothed.sols.npz",
                            "SOLSDIR/L1_SB010.ms/killMS.DDS0_smoothed.sols.npz")


def test_di_calibration_clipcal_runs_in_the_same_step_after_each_kms():
    step = BUILDERS["DIS0"](tier1())
    progs = [(_program(c.argv)[0], _program(c.argv)[2]) for c in step.commands]
    assert progs == [("kMS.py", "L1_SB000.ms"), ("ClipCal.py", "L1_SB000.ms"),
                     ("kMS.py", "L1_SB010.ms"), ("ClipCal.py", "L1_SB010.ms")]
    kms = list(_program(step.commands[0].argv))
    for flag, value in (("--SolverType", "CohJones"), ("--PolMode", "IFull"),
                        ("--SkyModelCol", "DD_PREDICT"), ("--OutCol", "DATA_DI_CORRECTED"),
                        ("--InCol", "CORRECTED_DATA"), ("--ApplyToDir", "0")):
        assert kms[kms.index(flag) + 1] == value
    assert list(step.commands[1].argv) == ["ClipCal.py", "--MSName", "L1_SB000.ms", "--ColName",
                                           "DATA_DI_CORRECTED"]


def test_full_list_steps_use_the_full_list_and_final_sols_include_the_slow_ones():
    r = tier1()
    assert [c.argv[2] for c in BUILDERS["DDS2_full"](r).commands if c.argv[0] == "kMS.py"] == list(FULL)
    final = BUILDERS["image_full_ampphase_di_m.NS"](r).commands[0].argv
    assert "--Data-MS=big-mslist.txt" in final
    assert "--DDESolutions-DDSols=[DDS3_full_smoothed,DDS3_full_slow_merged]" in final
    assert "--Output-RestoringBeam=6" in final and "--Weight-Robust=-0.5" in final
    slow = BUILDERS["DDS3_full_slow"](r).commands[0].argv
    assert slow[slow.index("--PreApplySols") + 1] == "[DDS3_full_smoothed]"
    assert slow[slow.index("--dt") + 1] == "43.63"


def test_cache_reuse_arguments_are_decided_when_the_command_starts(tmp_path):
    r = tier1()
    cmd = BUILDERS["image_dirin_SSD_m"](r).commands[0]
    assert not any(a.startswith("--Cache-PSF") for a in cmd.argv)
    assert cmd.resolved(tmp_path).argv == cmd.argv  # nothing cached yet
    cache = tmp_path / "cache" / "mslist.txt.ddfcache"
    (cache / "PSF").mkdir(parents=True)
    (cache / "LastResidual").mkdir()
    cmd2 = BUILDERS["image_dirin_SSD_m"](Reduction(r.cfg, Machine(4, 4, str(tmp_path / "cache"), (0, 1, 2, 3)),
                                                   MS, FULL)).commands[0]
    extra = cmd2.resolved(tmp_path).argv[len(cmd2.argv):]
    assert extra == ("--Cache-PSF=force", "--Cache-Dirty=forceresidual")


def test_the_first_dirty_image_also_makes_the_psf_that_image_dirin_SSD_forces():
    """ddf-pipeline's image_dirin_SSD_init is a clean of no major cycle, so the PSF cache holds
    this image's PSF when image_dirin_SSD passes --Cache-PSF=force; a Dirty run computes none,
    and after do_wide the forced PSF was the wide image's (WSCMS refused its shape)."""
    ddf = _opts_of(BUILDERS["image_dirin_SSD_init"](tier1("--image-do_wide=True")).commands[-1].argv)
    assert ddf["--Output-Mode"] == "Clean" and ddf["--Deconv-MaxMajorIter"] == "0"
    assert ddf["--Output-Name"] == "image_dirin_SSD_init" and "--Cache-PSF" not in ddf


def test_beam_model_none_drops_every_beam_option():
    r = tier1("--image-beam_model=None")
    ddf = BUILDERS["image_dirin_SSD_init"](r).commands[-1].argv
    assert "--Beam-Model=None" in ddf and not any(a.startswith("--Beam-LOFAR") for a in ddf)
    kms = BUILDERS["DDS0"](r).commands[0].argv
    assert kms[kms.index("--BeamModel") + 1] == "None" and "--LOFARBeamMode" not in kms


def test_machine_cpus_come_from_the_allocation_unless_the_config_says(tmp_path):
    node = NodeInfo(cpus=(3, 5), cache_dir=tmp_path / "scratch" / "cache", workdir=tmp_path)
    m = machine(load_config([TIER1]), node, {})
    assert (m.ncpu_ddf, m.ncpu_kms, m.cpus) == (2, 2, (3, 5))
    assert Path(m.cache_dir).is_dir()  # created: DDF 0.9.1 does not create --Cache-Dir
    m2 = machine(load_config([TIER1], ["--machine-NCPU_DDF=1", "--machine-NCPU_killms=2"]), node,
                 {"timeout": "60"})
    assert (m2.ncpu_ddf, m2.ncpu_kms, m2.timeout_s) == (1, 2, 60.0)
    r = Reduction(load_config([TIER1]), m2, MS, FULL)
    assert "--Parallel-Affinity=[3]" in BUILDERS["image_dirin_SSD"](r).commands[0].argv
    own = tmp_path / "own-cache"
    m3 = machine(load_config([TIER1], [f"--control-cache_dir={own}"]), node, {})
    assert m3.cache_dir == str(own) and own.is_dir()


def test_the_memory_remedy_halves_ddfacet_and_killms_workers(tmp_path):
    """After a memory death on a whole node the engine passes fewer workers (NodeInfo.workers):
    DDFacet's Parallel-NCPU and killMS's NCPU follow, a config's smaller count stays."""
    node = NodeInfo(cpus=tuple(range(8)), cache_dir=tmp_path / "cache", workdir=tmp_path, workers=4)
    m = machine(load_config([TIER1]), node, {})
    assert (m.ncpu_ddf, m.ncpu_kms) == (4, 4)
    assert "--Parallel-NCPU=4" in BUILDERS["image_dirin_SSD"](Reduction(load_config([TIER1]), m, MS, FULL)).commands[0].argv
    m2 = machine(load_config([TIER1], ["--machine-NCPU_DDF=2"]), node, {})
    assert (m2.ncpu_ddf, m2.ncpu_kms) == (2, 4)


def test_every_step_of_the_plan_has_a_builder_and_outputs():
    site = load_site("local")
    cfg = load_config([TIER1], ["--control-bootstrap=False", "--control-polcubes=False",
                                "--control-stokesv=False", "--spectra-do_dynspec=False"],
                     catalog_dir="/cats")
    plan = plan_reduction(cfg, site, "L1")
    r = Reduction(cfg, NODE, MS, FULL)
    for stage in plan.stages:
        steps = build(r, stage.name, stage.steps)
        assert [s.name for s in steps] == list(stage.steps)
        for s in steps:
            assert s.stage == stage.name and s.commands
            assert all(isinstance(c, Command) and c.timeout_s == 3600.0 for c in s.commands)
            if s.name not in ("Predict_DI1", "Predict_DDS2"):  # a predict writes a column only
                assert s.outputs, s.name


def test_every_step_of_the_table_has_a_builder_and_tier1_plans_whole():
    """No step of ddf-pipeline's sequence is refused any more: the whole tier1 plan builds."""
    from hpcddf.lofar.steps import STEP_NAMES
    assert unbuildable(STEP_NAMES) == []
    site = load_site("local")
    plan = plan_reduction(load_config([TIER1], catalog_dir="/cats"), site, "L1")
    assert unbuildable([n for st in plan.stages for n in st.steps]) == []
    with pytest.raises(PlanError, match="no builder"):
        build(tier1(), "ampphase", ["no_such_step"])


def boot(*overrides: str) -> Reduction:
    cfg = load_config([TIER1], ["--control-bootstrap=True", *overrides], catalog_dir="/cats")
    return Reduction(cfg, NODE, MS, FULL)


def test_bootstrap_images_a_cube_per_observation_and_scales_both_lists():
    [step] = build(boot(), "bootstrap", ["bootstrap"])
    ddf = [c.argv for c in step.commands if c.argv[0] == "DDF.py"]
    assert len(ddf) == 2  # one observation, L1: dirty, then the masked clean
    assert "--Output-Mode=Dirty" in ddf[0] and "--Output-Cubes=Ii" not in ddf[0]
    mm = next(c.argv for c in step.commands if c.argv[0] == "MakeMask.py")
    assert mm[1] == "--RestoredIm=image_bootstrap_L1.dirty.fits"
    argv = ddf[1]
    assert "--Mask-External=image_bootstrap_L1.mask.fits" in argv
    for opt in ("--Data-MS=bootstrap_L1_mslist.txt", "--Data-ColName=CORRECTED_DATA", "--Freq-NBand=2",
                "--Output-Cubes=Ii", "--Image-Cell=4.5", "--Image-NPix=6000", "--Output-RestoringBeam=20",
                "--Weight-Robust=-0.25", "--DDESolutions-DDSols=DDS0_smoothed", "--Deconv-MaxMajorIter=5",
                "--Mask-SigTh=15", "--Selection-UVRangeKm=[0.1,25.75]", "--Deconv-Mode=SSD"):
        assert opt in argv, opt
    tools = {c.argv[3]: c.argv[4:] for c in step.commands if c.argv[1:3] == ("-m", "hpcddf.lofar.tools")}
    assert tools["write-list"] == ("--out", "bootstrap_L1_mslist.txt", *MS)
    assert tools["bootstrap-fit"][:2] == ("--cube", "image_bootstrap_L1.cube.int.restored.fits")
    # every MS of the observation in either list gets SCALED_DATA, and the DI column is scaled too
    assert tools["bootstrap-apply"] == ("--factors", "L1-bootstrap-factors.json", "--colname", "CORRECTED_DATA",
                                        "--di-col", "DATA_DI_CORRECTED", *sorted(FULL))
    assert "image_bootstrap.app.mean.fits" in step.outputs and "L1-bootstrap-factors.json" in step.outputs


def test_bootstrap_mask_is_tgss_on_the_dirty_grid_or_makemask():
    """ddf-pipeline masks the bootstrap clean with TGSS sources; MakeMask's islands are OR'd in
    (and are the whole mask without a TGSS file)."""
    def tools(red: Reduction) -> dict:
        [step] = build(red, "bootstrap", ["bootstrap"])
        return {c.argv[3]: c.argv[4:] for c in step.commands if c.argv[1:3] == ("-m", "hpcddf.lofar.tools")}
    with_tgss = tools(boot("--masking-tgss=/cats/tgss.fits", "--masking-tgss_radius=5"))
    ext = with_tgss["external-mask"]
    assert ext[:2] == ("--template", "image_bootstrap_L1.dirty.fits")
    assert ("--tgss", "/cats/tgss.fits") == ext[ext.index("--tgss"):ext.index("--tgss") + 2]
    assert ext[ext.index("--tgss-radius") + 1] == "5.0"
    assert with_tgss["merge-masks"] == ("--out", "image_bootstrap_L1.mask.fits",
                                        "image_bootstrap_L1.dirty.fits.mask.fits",
                                        "--optional", "image_bootstrap_L1.tgss_mask.fits")
    without = tools(boot("--masking-tgss=None"))
    assert "external-mask" not in without
    assert without["merge-masks"] == ("--out", "image_bootstrap_L1.mask.fits",
                                      "image_bootstrap_L1.dirty.fits.mask.fits")


def test_bootstrap_needs_a_low_resolution_beam():
    with pytest.raises(PlanError, match="low_psf_arcsec"):
        build(boot("--image-low_psf_arcsec=None"), "bootstrap", ["bootstrap"])


def _program(argv) -> tuple:
    """The program a command runs: kMS.py behind hpcddf's solution-interval wrapper too."""
    return tuple(argv[argv.index("--") + 1:]) if "hpcddf.lofar.solint" in argv else tuple(argv)


def _col(step, prog="DDF.py", opt="--Data-ColName="):
    for c in step.commands:
        argv = _program(c.argv)
        if argv[0] == prog:
            c = replace(c, argv=argv)
            if prog == "kMS.py":
                return c.argv[c.argv.index("--InCol") + 1]
            return next(a[len(opt):] for a in c.argv if a.startswith(opt))
    raise AssertionError(f"no {prog} in {step.name}")


def test_after_the_bootstrap_steps_read_the_scaled_columns():
    names = ["DDS0", "image_phase1", "DDS1", "Predict_DI1", "DIS1", "image_ampphase1_di", "DDS2_full"]
    on = {s.name: s for s in build(boot(), "x", names)}
    off = {s.name: s for s in build(tier1(), "x", names)}
    assert _col(on["DDS0"], "kMS.py") == _col(off["DDS0"], "kMS.py") == "DATA_DI_CORRECTED"
    assert _col(on["image_phase1"]) == "DATA_DI_CORRECTED_SCALED"
    assert _col(off["image_phase1"]) == "DATA_DI_CORRECTED"
    assert _col(on["DDS1"], "kMS.py") == "DATA_DI_CORRECTED_SCALED"
    assert _col(on["Predict_DI1"]) == "SCALED_DATA" and _col(off["Predict_DI1"]) == "CORRECTED_DATA"
    assert _col(on["DIS1"], "kMS.py") == "SCALED_DATA"  # DIS1 rewrites DATA_DI_CORRECTED from it
    assert _col(on["image_ampphase1_di"]) == "DATA_DI_CORRECTED"
    assert _col(on["DDS2_full"], "kMS.py") == "SCALED_DATA"


def test_compress_ms_archives_the_final_images_column_of_every_ms_of_the_full_list():
    """The archive's DATA is the column image_full_ampphase_di_m.NS imaged (its DDF --Data-ColName)."""
    for r in (tier1(), boot(), tier1("--control-skip_di=True")):
        [final, step] = build(r, "final", ["image_full_ampphase_di_m.NS", "compress_ms"])
        col = _col(final)
        assert step.commands[0].argv[1:5] == ("-m", "hpcddf.lofar.compress", "--column", col)
        assert step.commands[0].argv[5:] == FULL and step.params["column"] == col
        assert step.outputs == tuple(f"{ms}.archive" for ms in FULL)
    assert _col(build(boot(), "final", ["image_full_ampphase_di_m.NS"])[0]) == "DATA_DI_CORRECTED"
    assert build(tier1("--control-skip_di=True"), "final", ["compress_ms"])[0].params["column"] == "CORRECTED_DATA"


def test_build_steps_reads_the_ms_lists_of_the_field(tmp_path):
    (tmp_path / "mslist.txt").write_text("A.ms\n\n")
    (tmp_path / "big-mslist.txt").write_text("A.ms\nB.ms\n")
    cfg = load_config([TIER1], ["--control-bootstrap=False"])
    node = NodeInfo(cpus=(0, 1), cache_dir=tmp_path / "c", workdir=tmp_path)
    steps = build_steps({"name": "ddf", "options": {}}, cfg, "fullampphase", ["DDS2_full"], node)
    assert [c.argv[2] for c in steps[0].commands if c.argv[0] == "kMS.py"] == ["A.ms", "B.ms"]
    (tmp_path / "mslist.txt").unlink()
    with pytest.raises(PlanError, match="mslist.txt"):
        build_steps({"name": "ddf", "options": {}}, cfg, "initial", ["image_dirin_SSD_init"], node)


def test_predicts_write_dd_predict_unsorted():
    argv = BUILDERS["Predict_DDS2"](tier1()).commands[0].argv
    assert "--Output-Mode=Predict" in argv and "--Predict-ColName=DD_PREDICT" in argv
    assert "--Data-Sort=0" in argv  # DDF 0.9.1 crashes sorting data it loaded without weights
    assert "--Data-MS=big-mslist.txt" in argv and "--Data-ColName=CORRECTED_DATA" in argv
    # no deconvolution, but the model's minor cycle: DDF 0.9.1 predicts with --Deconv-Mode's
    # (default HMP) and refuses tier1's SSD model under another
    assert [a for a in argv if a.startswith("--Deconv-")] == ["--Deconv-Mode=SSD"]


def test_quality_runs_as_the_last_step_when_configured_and_its_catalogues_are_checked(tmp_path):
    from astropy.table import Table

    from hpcddf.errors import ConfigError
    from hpcddf.lofar.plan import group_steps
    from hpcddf.lofar.reduction import check_inputs
    cat = tmp_path / "first.fits"
    Table({"RA": [1.0], "DEC": [2.0], "Total_flux": [1.0], "E_Total_flux": [0.1]}).write(cat)
    r = tier1(f"--control-quality=['FIRST={cat}:10']")
    [step] = build(r, "final", ["quality"])
    assert step.commands[0].argv[3:] == ("quality", "--catalogue", f"FIRST={cat}:10")
    assert "quality/quality.json" in step.outputs
    names = [n for _, steps in group_steps(r.cfg) for n in steps]
    assert names[-2:] == ["quality", "summary"]
    check_inputs(r.cfg, names)
    with pytest.raises(ConfigError, match="nope.fits"):
        check_inputs(tier1(f"--control-quality=['FIRST={tmp_path}/nope.fits']").cfg, names)


def test_a_stage_with_killms_is_refused_on_cores_without_core_0(tmp_path):
    """killMS 3.3.0 always pins its main process to core 0: a job without it is refused when
    the stage is built on the node, before any step runs; stages without kMS run anywhere."""
    from hpcddf.errors import PreflightError
    from hpcddf.lofar.recipes import check_killms_cores
    r = tier1()
    with_kms, images = [BUILDERS["DDS0"](r)], [BUILDERS["image_dirin_SSD"](r)]
    with pytest.raises(PreflightError, match=r"cores \(3,5\) do not include core 0") as err:
        check_killms_cores(with_kms, (3, 5))
    assert "exclusive = true" in err.value.hint
    check_killms_cores(with_kms, (0, 1))
    check_killms_cores(images, (3, 5))


# --------------------------------------------------------------- options ddf-pipeline passes on

def _argv(step: str, *overrides: str) -> list[str]:
    """The step's DDF.py (or kMS.py) command: the first one of the step that runs it."""
    cmds = BUILDERS[step](tier1(*overrides)).commands
    return list(next(c for c in cmds if c.argv[0] in ("DDF.py", "kMS.py")).argv)


def test_an_elliptical_final_beam_restores_the_full_resolution_images_only():
    beam = ("--image-final_psf_arcsec=6", "--image-final_psf_minor_arcsec=4.5", "--image-final_psf_pa_deg=30")
    for step in ("image_full_ampphase_di", "image_full_ampphase_di_m", "image_full_ampphase_di_m.NS"):
        assert "--Output-RestoringBeam=[6,4.5,30]" in _argv(step, *beam), step
    low = _argv("image_full_low", *beam, "--image-low_psf_arcsec=20")
    assert "--Output-RestoringBeam=20" in low  # ddf-pipeline: the low-resolution image stays circular
    assert "--Output-RestoringBeam=6" in _argv("image_full_ampphase_di", "--image-final_psf_arcsec=6")


def test_a_minor_axis_without_its_position_angle_is_refused_at_plan_time():
    cfg = load_config([TIER1], ["--image-final_psf_minor_arcsec=4.5"])
    with pytest.raises(PlanError, match="final_psf_pa_deg"):
        plan_reduction(cfg, load_site("local", None), "L1")


def test_hmpsize_sets_ddfacets_initial_island_size():
    assert "--GAClean-MinSizeInit=25" in _argv("image_phase1", "--image-HMPsize=25")


def test_normalize_is_ddfacets_global_norm_by_the_reference_index_map():
    norm = "--solutions-normalize=['AbsAnt', 'BLBased', 'SumBLBased']"
    assert "--DDESolutions-GlobalNorm=MeanAbsAnt" in _argv("image_phase1", norm)  # [0], Abs -> MeanAbs
    assert "--DDESolutions-GlobalNorm=BLBased" in _argv("image_full_ampphase_di_m.NS", norm)  # [1]
    assert "--DDESolutions-GlobalNorm=SumBLBased" in _argv("image_full_low", norm, "--image-low_psf_arcsec=20")
    # tier1's 'None' strings pass nothing; an image without DD solutions never gets it
    assert not any(a.startswith("--DDESolutions-GlobalNorm") for a in _argv("image_phase1"))
    assert not any(a.startswith("--DDESolutions-GlobalNorm") for a in _argv("image_dirin_SSD_m_c", norm))


def test_wtuv_down_weights_baselines_outside_the_range_instead_of_dropping_them():
    argv = _argv("DDS0", "--solutions-wtuv=0.05")
    i = argv.index("--WTUV")
    assert argv[i:i + 4] == ["--WTUV", "0.05", "--WeightUVMinMax", "0.1,1000"] and "--UVMinMax" not in argv


def test_every_external_mask_gets_the_tgss_shapes_and_the_region():
    opts = ("--masking-tgss=/cats/tgss.fits", "--masking-tgss_extended=True",
            "--masking-tgss_pointlike=40", "--masking-region=field.reg")
    ext = list(BUILDERS["external_mask"](tier1(*opts)).commands[0].argv)
    assert ext[ext.index("--tgss-extended"):ext.index("--tgss-extended") + 3] == [
        "--tgss-extended", "--tgss-pointlike", "40.0"]
    assert ext[ext.index("--region") + 1] == "field.reg"
    [step] = build(boot(*opts), "bootstrap", ["bootstrap"])
    boot_ext = next(c.argv for c in step.commands if "external-mask" in c.argv)
    assert "--tgss-extended" in boot_ext and "--region" in boot_ext
    # a region alone (no TGSS) still makes the bootstrap's external mask
    [step] = build(boot("--masking-tgss=None", "--masking-region=field.reg"), "bootstrap", ["bootstrap"])
    assert any("external-mask" in c.argv and "--region" in c.argv for c in step.commands)


def test_a_run_from_a_previous_model_starts_dds2_full_from_it():
    prev = ("--inputmodel-basedicomodel=prev/im", "--image-clusterfile=prev/cat.npy",
            "--inputmodel-baseimagename=prev/im_img", "--inputmodel-basemaskname=prev/im.mask.fits")
    step = BUILDERS["DDS2_full"](tier1(*prev))
    tools = [c.argv[3:] for c in step.commands if c.argv[1:3] == ("-m", "hpcddf.lofar.tools")]
    # what the skipped steps would have left: imaging columns, clusters, the external mask
    assert tools[0][0] == "prepare-ms"
    assert tools[1] == ("cluster", "--copy", "prev/cat.npy", "--out", "image_dirin_SSD_m.npy.ClusterCat.npy")
    assert tools[2] == ("merge-masks", "--out", "external_mask.fits", "prev/im.mask.fits")
    kms = next(c.argv for c in step.commands if c.argv[0] == "kMS.py")
    assert kms[kms.index("--DicoModel") + 1] == "prev/im.DicoModel"  # unmasked, as ddf-pipeline
    assert kms[kms.index("--BaseImageName") + 1] == "prev/im_img"
    assert {"image_dirin_SSD_m.npy.ClusterCat.npy", "external_mask.fits"} <= set(step.outputs)
    first = _argv("image_full_ampphase_di", *prev)
    assert "--Predict-InitDicoModel=prev/im.DicoModel" in first
    assert "--Mask-External=external_mask.fits" in first
    assert "--Predict-InitDicoModel=prev/im.DicoModel" in _argv("Predict_DDS2", *prev)
    # without it, the small images' last masked model as before
    assert "--Predict-InitDicoModel=image_ampphase1_di_masked.DicoModel" in _argv("image_full_ampphase_di")


def test_very_slow_solutions_are_merged_per_observation_with_outliers_clipped():
    r = Reduction(load_config([TIER1], ["--control-bootstrap=False", "--solutions-sigma_clip=4"],
                              catalog_dir="/cats"), NODE, MS, ("L1_SB000.ms", "L1_SB001.ms", "L2_SB000.ms"))
    step = BUILDERS["DDS3_full_slow"](r)
    kms = step.commands[0].argv
    assert kms[kms.index("--NIterKF") + 1] == "6"  # kMS's own default, not the NIterKF list
    merges = [c.argv for c in step.commands if c.argv[0] == "MergeSols.py"]
    assert merges == [("MergeSols.py", "--SolsFilesIn=solslist_DDS3_full_slow_L1.txt",
                       "--SolFileOut=SOLSDIR/DDS3_full_slow_L1_merged.npz", "--SigmaFilterOutliers", "4"),
                      ("MergeSols.py", "--SolsFilesIn=solslist_DDS3_full_slow_L2.txt",
                       "--SolFileOut=SOLSDIR/DDS3_full_slow_L2_merged.npz", "--SigmaFilterOutliers", "4")]
    assert "SmoothSols.py" not in [c.argv[0] for c in step.commands]
    lists = [c.argv for c in step.commands if "write-list" in c.argv]
    assert lists[0][-2:] == ("SOLSDIR/L1_SB000.ms/killMS.DDS3_full_slow.sols.npz",
                             "SOLSDIR/L1_SB001.ms/killMS.DDS3_full_slow.sols.npz")
    assert step.outputs[-3:] == tuple(f"SOLSDIR/{ms}/killMS.DDS3_full_slow_merged.sols.npz"
                                      for ms in ("L1_SB000.ms", "L1_SB001.ms", "L2_SB000.ms"))


def test_di_intervals_are_worked_out_from_the_data_unless_the_config_gives_them():
    auto = BUILDERS["DIS0"](tier1()).commands[0].argv  # tier1: dt_di and NChanSols None
    assert auto[:7] == (NODE.python, "-m", "hpcddf.lofar.solint", "--ms", "L1_SB000.ms", "--col", "CORRECTED_DATA")
    assert auto[7] == "--" and auto[8] == "kMS.py" and "--dt" not in auto and "--NChanSols" not in auto
    given = BUILDERS["DIS1"](tier1("--solutions-dt_di=0.2", "--solutions-NChanSols=2")).commands[0].argv
    assert given[0] == "kMS.py" and given[-4:] == ("--dt", "0.2", "--NChanSols", "2")
    half = BUILDERS["DIS2_full"](tier1("--solutions-dt_di=0.2")).commands[0].argv
    assert half[7:10] == ("--dt", "0.2", "--") and "--nchan" not in half
    # DD solves never go through it; DDS3 always solves one channel (as ddf-pipeline)
    dd = BUILDERS["DDS3_full"](tier1("--solutions-NChanSols=4")).commands[0].argv
    assert dd[0] == "kMS.py" and dd[dd.index("--NChanSols") + 1] == "1"
    dds2 = BUILDERS["DDS2_full"](tier1("--solutions-NChanSols=4")).commands[0].argv
    assert dds2[dds2.index("--NChanSols") + 1] == "4"


def test_the_planner_imports_no_numpy_for_compress_ms():
    """The login node plans without the science stack: the archive names come from a module
    whose numpy and casacore imports wait until the node tool runs."""
    import subprocess
    import sys
    code = "import sys, hpcddf.lofar.reduction; assert 'numpy' not in sys.modules, 'numpy imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _opts_of(argv) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_lgps_wscms_settings_reach_ddfacet_per_round_and_per_cell(tmp_path):
    """LGPS's WSCMS options are passed (per-round lists at the image's round, the thresholds'
    index; scales converted to the image's own cell), and its WSCMS2 runs as 0.9.1's WSCMS."""
    cfg = load_config([str(DATA / "lgps_optimized.cfg")], catalog_dir="/cats")
    r = Reduction(cfg, NODE, MS, FULL)
    thr = [float(t) for t in cfg.get("masking", "thresholds")]
    final = _opts_of(BUILDERS["image_full_ampphase_di_m.NS"](r).commands[0].argv)
    i = thr.index(r.thr(2))
    assert final["--Deconv-Mode"] == "WSCMS" and final["--WSCMS-MultiScale"] == "1"
    assert final["--WSCMS-MaxScale"] == "550" and final["--WSCMS-NSubMinorIter"] == "250"
    assert final["--WSCMS-Scales"] == "[0,4,8,16,32,64,128,256,512]"
    assert float(final["--Deconv-RMSFactor"]) == cfg.get("image", "wscms_rms_factor")[i]
    assert float(final["--Deconv-PeakFactor"]) == cfg.get("image", "wscms_peakfactor")[i]
    # never --Mask-Auto: DDFacet 0.9.1 refuses it under WSCMS ("Automasking only supported under
    # HMP and SSD"), and ddf-pipeline does not pass it there; with a clean mask, the mask alone:
    # 0.9.1's WSCMS stops given both ("No scale has been selected")
    assert "--Mask-Auto" not in final and "--Mask-SigTh" not in final
    assert final["--Mask-External"] and final["--WSCMS-AutoMask"] == "0" and "--WSCMS-AutoMaskRMSFactor" not in final
    assert final["--Mask-FluxImageType"] == "ModelConv"
    # without one, WSCMS's own scale-dependent auto-mask at the round's factor
    from hpcddf.lofar.ddfcommands import Image, ddf_image
    img = Image(name="x", mslist="mslist.txt", colname="DATA", automask_sigma=r.thr(2))
    free = _opts_of(ddf_image(cfg, NODE, img).argv)
    assert free["--WSCMS-AutoMask"] == "1" and "--Mask-Auto" not in free
    assert float(free["--WSCMS-AutoMaskRMSFactor"]) == cfg.get("masking", "wscms_automask_rms_factor")[i]
    # an optional mask (passed if its file exists as the step starts) decides it at run time:
    # without the file the auto-mask, with it the mask alone (DDFacet's parser: the last one wins)
    maybe = ddf_image(cfg, NODE, replace(img, cleanmask="m.mask.fits", cleanmask_optional=True))
    assert _opts_of(maybe.resolved(tmp_path).argv)["--WSCMS-AutoMask"] == "1"
    (tmp_path / "m.mask.fits").touch()
    masked = maybe.resolved(tmp_path).argv
    assert masked[-2:] == ("--Mask-External=m.mask.fits", "--WSCMS-AutoMask=0")
    # an image of no major cycle without the alpha map: 0.9.1's WSCMS cannot make one before a minor cycle
    assert _opts_of(BUILDERS["image_full_ampphase_di"](r).commands[-1].argv)["--Output-Images"] == "DdPMRIikemz"
    assert "--Output-Images" not in final
    # its models are masked by hpcddf's WSCMS masker: 0.9.1's MaskDicoModel.py masks SSD/HMP models only
    mask = BUILDERS["image_dirin_SSD_m_c"](r).commands[-1].argv
    assert list(mask) == [NODE.python, "-m", "hpcddf.lofar.wscmsmodel", "--mask", "image_dirin_SSD_m_c.mask.fits",
                          "--in", "image_dirin_SSD_m_c.DicoModel", "--out", "image_dirin_SSD_m_c_masked.DicoModel"]
    first = _opts_of(BUILDERS["image_dirin_SSD"](r).commands[0].argv)
    assert float(first["--Deconv-RMSFactor"]) == cfg.get("image", "wscms_rms_factor")[thr.index(r.thr(0))]
    # an SSD config gets none of it
    assert not any(a.startswith("--WSCMS") for a in BUILDERS["image_full_ampphase_di_m.NS"](tier1()).commands[0].argv)
