"""do_wide: the subtraction tool on real simulated MSs (DATA_SUB = col - predict exactly, a
rerun and a run SIGKILLed mid-write never subtract twice, memory bounded by the chunk size) and
the step builders' argv for a tier1 config."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tests._require import need

np = need("numpy", "science")
ct = need("casacore.tables", "science")

from hpcddf.lofar import wide  # noqa: E402
from hpcddf.lofar.config import load_config  # noqa: E402
from hpcddf.lofar.ddfcommands import Machine  # noqa: E402
from hpcddf.lofar.simulate import SimSpec, simulate_field  # noqa: E402
from hpcddf.lofar.stepkit import Reduction  # noqa: E402
from hpcddf.lofar.wide_tool import MADE_FROM, PARTIAL_SUFFIX, chunk_rows, main, subtract_ms  # noqa: E402

COL, PRED, OUT = "CORRECTED_DATA", "WIDE_PREDICT", "DATA_SUB"
# 3600 rows x 4 channels x 4 polarisations per MS (128 bytes a row)
SPEC = SimSpec(n_ms=2, nant=16, ntime=30)
TOOL = [sys.executable, "-m", "hpcddf.lofar.wide_tool", "subtract", "--col", COL, "--predict", PRED,
        "--out", OUT]
ONE_ROW_MB = 100 / 2**20  # less than a row: one row per chunk, one progress line per row


def _put_predict(ms: Path, seed: int) -> np.ndarray:
    """A predicted column as DDF leaves it (a complex column like the data, its own values)."""
    with ct.table(str(ms), readonly=False, ack=False) as t:
        if PRED not in t.colnames():
            cd = dict(t.getcoldesc(COL))
            for key in ("dataManagerType", "dataManagerGroup"):
                cd.pop(key, None)
            t.addcols(ct.makecoldesc(PRED, cd))
        rng = np.random.default_rng(seed)
        shape = t.getcol(COL).shape
        values = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
        t.putcol(PRED, values)
    return values


@pytest.fixture(scope="module")
def source_field(tmp_path_factory) -> tuple[Path, ...]:
    mss = simulate_field(tmp_path_factory.mktemp("sim"), SPEC).ms
    for i, ms in enumerate(mss):
        _put_predict(ms, seed=i)
    return mss


@pytest.fixture
def mss(source_field: tuple[Path, ...], tmp_path: Path) -> list[Path]:
    out = []
    for ms in source_field:
        shutil.copytree(ms, tmp_path / ms.name)
        out.append(tmp_path / ms.name)
    return out


def _cols(ms: Path) -> list[str]:
    with ct.table(str(ms), ack=False) as t:
        return t.colnames()


def _get(ms: Path, col: str) -> np.ndarray:
    with ct.table(str(ms), ack=False) as t:
        return t.getcol(col)


def _assert_subtracted(ms: Path, predict: np.ndarray | None = None) -> None:
    """DATA_SUB is exactly col - predict (once: not col - 2 predict), complete, no partial left."""
    pred = _get(ms, PRED) if predict is None else predict
    assert np.array_equal(_get(ms, OUT), _get(ms, COL) - pred)
    with ct.table(str(ms), ack=False) as t:
        assert t.getcolkeywords(OUT)[MADE_FROM] == {"col": COL, "predict": PRED}
    assert OUT + PARTIAL_SUFFIX not in _cols(ms)


def _run(mss: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOOL, *extra, *map(str, mss)], capture_output=True, text=True, timeout=120)


def test_data_sub_is_col_minus_predict_exactly_in_chunks_and_the_inputs_are_untouched(mss):
    before = {ms: (_get(ms, COL), _get(ms, PRED)) for ms in mss}
    assert main(["subtract", "--col", COL, "--predict", PRED, "--out", OUT, "--chunk-mb", "0.1",
                 *map(str, mss)]) == 0
    for ms in mss:
        _assert_subtracted(ms)
        assert np.array_equal(_get(ms, COL), before[ms][0]) and np.array_equal(_get(ms, PRED), before[ms][1])
        assert np.abs(_get(ms, OUT)).max() > 0


def test_a_rerun_gives_the_same_data_sub_and_a_new_prediction_replaces_the_old(mss):
    assert _run(mss).returncode == 0
    first = _get(mss[0], OUT)
    rerun = _run(mss)
    assert rerun.returncode == 0, rerun.stderr
    assert np.array_equal(_get(mss[0], OUT), first)  # not col - 2 * predict
    new = _put_predict(mss[0], seed=9)  # the model was redone: DATA_SUB follows it, not adds to it
    assert _run(mss).returncode == 0
    _assert_subtracted(mss[0], new)


def test_drop_predict_leaves_one_column_more_and_a_rerun_without_prediction_keeps_it(mss):
    cols = _cols(mss[0])
    proc = _run(mss, "--drop-predict")
    assert proc.returncode == 0, proc.stderr
    preds = [_put_predict(ms, seed=i) for i, ms in enumerate(mss)]  # what was dropped, for the check
    for ms, pred in zip(mss, preds):
        _assert_subtracted(ms, pred)
    assert _run(mss, "--drop-predict").returncode == 0
    assert sorted(_cols(mss[0])) == sorted([c for c in cols if c != PRED] + [OUT])
    kept = _get(mss[0], OUT)
    again = _run(mss, "--drop-predict")  # the predict column is gone: nothing to redo
    assert again.returncode == 0 and f"{mss[0]}: {OUT} = {COL} - {PRED}: already done" in again.stdout
    assert np.array_equal(_get(mss[0], OUT), kept)


def _kill_on_line(mss: list[Path], marker: str) -> None:
    """The tool, SIGKILLed as soon as it reports a row chunk of ``marker``'s MS (one row per
    chunk: it blocks on the pipe long before that MS is done)."""
    proc = subprocess.Popen([*TOOL, "--chunk-mb", str(ONE_ROW_MB), *map(str, mss)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(marker) and "rows 10-11 " in line:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_run_killed_in_the_second_ms_then_rerun_subtracts_each_ms_once(mss):
    _kill_on_line(mss, str(mss[1]))
    _assert_subtracted(mss[0])            # the first MS was finished
    assert OUT not in _cols(mss[1])       # the second has no half-made DATA_SUB
    rerun = _run(mss)
    assert rerun.returncode == 0, rerun.stderr
    for ms in mss:
        _assert_subtracted(ms)


def test_a_rerun_killed_over_a_complete_data_sub_then_rerun_still_subtracts_once(mss):
    assert _run(mss).returncode == 0
    _kill_on_line(mss, str(mss[0]))       # killed while the first MS is being redone
    assert _run(mss).returncode == 0
    for ms in mss:
        _assert_subtracted(ms)


def test_memory_stays_at_a_few_chunks_whatever_the_column_size(mss):
    with ct.table(str(mss[0]), ack=False) as t:
        column_bytes = t.getcol(COL).nbytes
    chunk_mb = column_bytes / 20 / 2**20
    tracemalloc.start()
    try:
        subtract_ms(str(mss[0]), COL, PRED, OUT, chunk_mb=chunk_mb)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole = _get(mss[0], COL)  # the check sees casacore's arrays: one whole column is counted
        assert tracemalloc.get_traced_memory()[1] >= whole.nbytes
    finally:
        tracemalloc.stop()
    _assert_subtracted(mss[0])
    assert peak < column_bytes / 4, (peak, column_bytes)
    assert chunk_rows(128, chunk_mb) == 3600 // 20 and chunk_rows(10**9, 1.0) == 1


def test_errors_are_one_line_and_write_nothing(mss):
    same = subprocess.run([*TOOL[:-1], COL, str(mss[0])], capture_output=True, text=True, timeout=60)
    assert same.returncode == 1 and "must be three columns" in same.stderr
    with ct.table(str(mss[1]), readonly=False, ack=False) as t:
        t.removecols(PRED)
    proc = _run(mss[1:])
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {mss[1]} has no column {PRED}: run the predict first"
    assert OUT not in _cols(mss[1]) and OUT + PARTIAL_SUFFIX not in _cols(mss[1])


# ------------------------------------------------------------------------------ step builders

TIER1 = str(Path(__file__).parent.parent / "data" / "tier1-sep2024.cfg")
NODE = Machine(ncpu_ddf=4, ncpu_kms=4, cache_dir="/scratch/c", cpus=(8, 9, 10, 11), timeout_s=3600.0)


def tier1(*overrides: str) -> Reduction:
    cfg = load_config([TIER1], ["--control-bootstrap=False", "--image-do_wide=True", *overrides],
                      catalog_dir="/cats")
    return Reduction(cfg, NODE, ("L1_SB000.ms", "L1_SB010.ms"), ("L1_SB000.ms", "L1_SB001.ms", "L1_SB010.ms"))


WIDE_COMMON = [
    "--Parallel-NCPU=4", "--Parallel-Affinity=[8,9,10,11]",
    "--Beam-Model=LOFAR", "--Beam-LOFARBeamMode=A", "--Beam-At=facet",
    "--Facets-NFacets=11", "--Facets-DiamMax=1.5", "--Facets-DiamMin=0.1", "--CF-wmax=50000", "--CF-Nw=100",
    "--Cache-Dir=/scratch/c", "--Cache-DirWisdomFFTW=/scratch/c", "--Cache-Weight=reset",
    "--Debug-Pdb=never", "--Log-Memory=1", "--Log-Boring=1", "--DDESolutions-SolsDir=SOLSDIR",
    "--RIME-DecorrMode=FT", "--Freq-NBand=2", "--Weight-ColName=None", "--Weight-Mode=Briggs",
    "--Weight-Robust=-0.2", "--Image-NPix=10000", "--Image-Cell=10", "--Output-RestoringBeam=45",
    f"--Selection-UVRangeKm=[0.1,{2.5 * 206 / 45}]"]


def _ddf(name: str, mode: str, mslist: str = "mslist.txt", col: str = "CORRECTED_DATA") -> list[str]:
    return ["DDF.py", f"--Data-MS={mslist}", f"--Data-ColName={col}", f"--Data-Sort={int(mode != 'Predict')}",
            f"--Output-Name={name}", f"--Output-Mode={mode}", "--Output-Clobber=1", "--Misc-ConserveMemory=1",
            *WIDE_COMMON]


def _clean(majorcycles: int) -> list[str]:
    return ["--Deconv-Mode=SSD", f"--Deconv-MaxMajorIter={majorcycles}", "--Deconv-PeakFactor=0.001",
            "--Deconv-RMSFactor=0", "--Deconv-FluxThreshold=0", "--Deconv-MaxMinorIter=1000000",
            "--GAClean-MinSizeInit=10"]


SSD = ["--SSDClean-SSDSolvePars=[S,Alpha]", "--SSDClean-BICFactor=0", "--Mask-Auto=1", "--Mask-SigTh=15"]


def test_image_full_wide_argv_for_tier1():
    step = wide.image_full_wide(tier1())
    prep, ddf = step.commands
    assert list(prep.argv) == [NODE.python, "-m", "hpcddf.lofar.tools", "prepare-ms", "--colname", "CORRECTED_DATA",
                               "L1_SB000.ms", "L1_SB001.ms", "L1_SB010.ms"]
    assert list(ddf.argv) == _ddf("image_full_wide", "Clean") + _clean(2) + SSD
    assert ddf.when_exists == ()
    assert step.outputs == ("image_full_wide.app.restored.fits", "image_full_wide.dirty.fits")


def test_wide_mask_is_the_external_mask_tool_on_the_wide_dirty_grid_then_makemask():
    step = wide.wide_mask(tier1("--masking-region=field.reg", "--masking-external_fits_mask=big.fits"))
    ext, makemask, merge = (list(c.argv) for c in step.commands)
    assert ext == [NODE.python, "-m", "hpcddf.lofar.tools", "external-mask", "--template",
                   "image_full_wide.dirty.fits", "--out", "wide_external_mask.fits", "--record",
                   "wide_external_mask.json", "--tgss", "/cats/TGSSADR1_7sigma_catalog.fits",
                   "--tgss-radius", "8.0", "--tgss-flux", "300.0", "--region", "field.reg"]
    assert makemask == ["MakeMask.py", "--RestoredIm=image_full_wide.app.restored.fits", "--Th=3", "--Box=50,2"]
    assert merge == [NODE.python, "-m", "hpcddf.lofar.tools", "merge-masks", "--out", "image_full_wide.mask.fits",
                     "image_full_wide.app.restored.fits.mask.fits", "--optional", "wide_external_mask.fits"]
    assert step.outputs == ("wide_external_mask.json", "image_full_wide.mask.fits")


def test_image_full_wide_im_is_one_more_major_cycle_in_the_wide_mask():
    cmd = wide.image_full_wide_im(tier1()).commands[0]
    assert list(cmd.argv) == (_ddf("image_full_wide_im", "Clean") + _clean(1)
                              + ["--Mask-External=image_full_wide.mask.fits"] + SSD
                              + ["--Predict-InitDicoModel=image_full_wide.DicoModel"])
    assert cmd.when_exists == (("/scratch/c/mslist.txt.ddfcache/PSF", ("--Cache-PSF=force",)),
                               ("/scratch/c/mslist.txt.ddfcache/LastResidual", ("--Cache-Dirty=forceresidual",)))


def test_image_full_wide_predict_masks_the_central_square_and_subtracts_on_the_full_list():
    step = wide.image_full_wide_predict(tier1())
    ddf, sub = step.commands
    # the model's minor cycle (DDF refuses to predict an SSD model as its default HMP)
    assert "--Deconv-Mode=SSD" in ddf.argv
    assert [a for a in ddf.argv if a != "--Deconv-Mode=SSD"] == (
        _ddf("image_full_wide_predict", "Predict", "big-mslist.txt")
        + ["--Predict-ColName=WIDE_PREDICT", "--Predict-InitDicoModel=image_full_wide_im.DicoModel",
           "--Predict-MaskSquare=[0,2850]"])  # 0.95 * 20000 * 1.5 / 10
    assert list(sub.argv) == [NODE.python, "-m", "hpcddf.lofar.wide_tool", "subtract", "--col", "CORRECTED_DATA",
                              "--predict", "WIDE_PREDICT", "--out", "DATA_SUB", "--drop-predict",
                              "L1_SB000.ms", "L1_SB001.ms", "L1_SB010.ms"]
    assert step.params == {"mask_square_npix": 2850, "column": "DATA_SUB"}


def test_the_check_image_is_a_dirty_image_of_data_sub():
    cmd = wide.image_full_wide_im_sub(tier1()).commands[0]
    assert list(cmd.argv) == _ddf("image_full_wide_im_sub", "Dirty", col="DATA_SUB")


def test_the_wide_steps_read_the_configured_column_whatever_the_reduction_works_on():
    from dataclasses import replace
    r = replace(tier1("--data-colname=DATA", "--image-wide_cell=12"), scaled=True)
    assert r.col == "SCALED_DATA"
    ddf = [wide.image_full_wide(r).commands[1], wide.image_full_wide_im(r).commands[0],
           wide.image_full_wide_predict(r).commands[0]]
    assert all("--Data-ColName=DATA" in c.argv for c in ddf)
    assert "--col" in (sub := wide.image_full_wide_predict(r).commands[1].argv)
    assert sub[sub.index("--col") + 1] == "DATA"
    assert wide.mask_square_npix(r) == 2375  # floor(0.95 * 30000 / 12)
