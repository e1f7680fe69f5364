"""compress_ms: Dysco archives of real casacore MSs (python-casacore's DyscoStMan), checked
for size, read-back error, verification before the rename, and a run killed mid-write."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._require import need

np = need("numpy", "science")
ct = need("casacore.tables", "science")

from hpcddf.lofar.compress import (  # noqa: E402
    DYSCO_SPEC,
    ArchiveError,
    archive_ms,
    temporary_name,
    verify,
    write_archive,
)
from hpcddf.lofar.simulate import SimSpec, simulate_field  # noqa: E402

# Noise-dominated, as real LOFAR visibilities are (Dysco's design case): 10 Jy per visibility
# against sources of 1-5 Jy. 14400 rows x 16 channels x 4 polarisations.
SPEC = SimSpec(n_ms=1, nant=16, nchan=16, ntime=120, noise_jy=10.0)
COLUMN = "CORRECTED_DATA"
TOOL = [sys.executable, "-m", "hpcddf.lofar.compress", "--column", COLUMN]


@pytest.fixture(scope="module")
def source_ms(tmp_path_factory) -> Path:
    """One simulated MS whose archived column differs from DATA, with varied weights, a few
    flags and IMAGING_WEIGHT, so every column the archive keeps is checked for what it is."""
    ms = simulate_field(tmp_path_factory.mktemp("sim"), SPEC).ms[0]
    rng = np.random.default_rng(7)
    with ct.table(str(ms), readonly=False, ack=False) as t:
        shape = (t.nrows(), SPEC.nchan, 4)
        t.putcol(COLUMN, t.getcol("DATA") * np.complex64(0.5 + 0.25j))
        t.putcol("WEIGHT_SPECTRUM", rng.uniform(0.2, 3.0, shape).astype(np.float32))
        t.putcol("FLAG", rng.uniform(size=shape) < 0.01)
    ct.addImagingColumns(str(ms), ack=False)
    with ct.table(str(ms), readonly=False, ack=False) as t:
        t.putcol("IMAGING_WEIGHT", rng.uniform(0, 1, (t.nrows(), SPEC.nchan)).astype(np.float32))
    return ms


@pytest.fixture
def ms(source_ms: Path, tmp_path: Path) -> Path:
    copy = tmp_path / source_ms.name
    shutil.copytree(source_ms, copy)
    return copy


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def col(path: Path, name: str):
    with ct.table(str(path), ack=False) as t:
        return t.getcol(name)


def test_archive_is_smaller_by_dyscos_factor_and_reads_back_within_its_error(ms: Path):
    before = digest(ms)
    out = archive_ms(ms, ms.parent, COLUMN)
    archive = ms.parent / f"{ms.name}.archive"
    assert out.action == "written" and out.archive == archive and not temporary_name(archive).exists()
    assert digest(ms) == before  # the MS was only read

    with ct.table(str(archive), ack=False) as a:
        dm = a.getdminfo("DATA")
        assert dm["TYPE"] == "DyscoStMan" and a.getdminfo("WEIGHT_SPECTRUM")["NAME"] == dm["NAME"]
        assert dm["SPEC"] == DYSCO_SPEC
        nrow = a.nrows()
        assert not [c for c in a.colnames() if c not in ("DATA",) and a.getcoldesc(c)["valueType"] == "complex"]
        assert ct.table(a.getkeywords()["ANTENNA"], ack=False).nrows() == SPEC.nant
        dysco_bytes = (archive / f"table.f{dm['SEQNR']}").stat().st_size
    # Dysco stores dataBitCount bits per real and imaginary part and weightBitCount bits per
    # (row, channel); the normalisation factors are the rest
    nvis = nrow * SPEC.nchan * 4
    predicted = (nvis * 2 * 10 + nrow * SPEC.nchan * 12) / 8
    assert predicted <= dysco_bytes <= 1.05 * predicted, (dysco_bytes, predicted)
    ratio = nvis * (8 + 4) / dysco_bytes  # complex64 data + float32 weights, uncompressed
    assert ratio > 0.95 * 96 / (20 + 3), ratio  # 4.08 measured; DATA alone: 64 bits -> 20

    ref, got = col(ms, COLUMN), col(archive, "DATA")
    rel = np.sqrt(np.mean(np.abs(got - ref) ** 2) / np.mean(np.abs(ref) ** 2))
    assert 1e-4 < rel < 0.005, rel  # lossy, at a fraction of a percent (measured 0.26 %)
    assert np.sqrt(np.mean(np.abs(got - col(ms, "DATA")) ** 2)) > 10 * rel  # the chosen column
    for name in ("FLAG", "UVW", "WEIGHT", "TIME", "ANTENNA1", "IMAGING_WEIGHT"):
        assert np.array_equal(col(ms, name), col(archive, name)), name
    w, wa = col(ms, "WEIGHT_SPECTRUM"), col(archive, "WEIGHT_SPECTRUM")
    assert np.max(np.abs(wa - w.min(axis=-1, keepdims=True))) <= 3.0 / 4095


def test_an_archive_of_another_column_or_with_a_row_missing_does_not_verify(ms: Path, tmp_path: Path):
    wrong = tmp_path / "wrong.archive"
    write_archive(ms, wrong, "DATA")
    with pytest.raises(ArchiveError, match="DATA rows 0-.* differ from CORRECTED_DATA"):
        verify(ms, wrong, COLUMN)
    assert verify(ms, wrong, "DATA") < 0.005
    short, of_short = tmp_path / "short.ms", tmp_path / "short.archive"  # Dysco removes no rows
    with ct.table(str(ms), ack=False) as t, t.query(limit=t.nrows() - 1) as sel:
        sel.copy(str(short), deep=True).close()
    write_archive(short, of_short, COLUMN)
    with pytest.raises(ArchiveError, match="14399 rows, .* has 14400"):
        verify(ms, of_short, COLUMN)


def test_an_archive_that_verifies_is_kept_and_one_that_does_not_is_redone(ms: Path):
    archive = ms.parent / f"{ms.name}.archive"
    write_archive(ms, archive, "DATA")  # e.g. a copy of the wrong column under the final name
    proc = subprocess.run([*TOOL, "--outdir", str(ms.parent), str(ms)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "does not verify" in proc.stdout and "did not verify, removed" in proc.stdout
    assert verify(ms, archive, COLUMN) < 0.005
    files = {p: p.stat().st_mtime_ns for p in archive.rglob("*") if p.is_file()}
    again = subprocess.run([*TOOL, "--outdir", str(ms.parent), str(ms)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and ": verified;" in again.stdout and "written" not in again.stdout
    assert files == {p: p.stat().st_mtime_ns for p in archive.rglob("*") if p.is_file()}


def test_a_run_killed_while_writing_leaves_the_ms_intact_and_the_rerun_redoes_the_archive(ms: Path):
    before = digest(ms)
    archive = ms.parent / f"{ms.name}.archive"
    tmp = temporary_name(archive)
    argv = [*TOOL, "--outdir", str(ms.parent), "--chunk-rows", "16", str(ms)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and " written" in proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)  # a few of its 900 chunks written
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists() and not archive.exists()  # killed mid-write: nothing has the final name
    with pytest.raises(ArchiveError):
        verify(ms, tmp, COLUMN)
    assert digest(ms) == before

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "half-written by an interrupted run, removed" in rerun.stdout
    assert f"{archive}: written;" in rerun.stdout
    assert not tmp.exists() and verify(ms, archive, COLUMN) < 0.005
    assert digest(ms) == before


def test_a_missing_column_is_one_line_and_leaves_nothing(ms: Path):
    proc = subprocess.run([sys.executable, "-m", "hpcddf.lofar.compress", "--column", "NOPE",
                           "--outdir", str(ms.parent), str(ms)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {ms} has no column NOPE to archive"
    assert sorted(p.name for p in ms.parent.iterdir()) == [ms.name]


def test_the_compress_ms_step_runs_through_the_engine_in_the_field_directory(ms: Path):
    """The step as the final stage builds it: its command, run by the engine's runner in the
    field directory, writes the outputs the step declares; the marker comes after them."""
    from hpcddf.engine.runner import RunContext, marker_path, run_step
    from hpcddf.lofar.config import load_config
    from hpcddf.lofar.ddfcommands import Machine
    from hpcddf.lofar.reduction import Reduction, build
    wd = ms.parent
    cfg = load_config([], ["--control-skip_di=True", "--data-colname=CORRECTED_DATA"])
    m = Machine(ncpu_ddf=1, ncpu_kms=1, cache_dir=str(wd / "cache"), timeout_s=300.0, python=sys.executable)
    [step] = build(Reduction(cfg, m, (ms.name,), (ms.name,)), "final", ["compress_ms"])
    ctx = RunContext(workdir=wd, log_dir=wd / "logs", marker_dir=wd / "done",
                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    ctx.log_dir.mkdir()  # the node job makes both
    ctx.marker_dir.mkdir()
    marker = run_step(ctx, step)
    assert marker["outputs"] == [f"{ms.name}.archive"] and marker["params"] == {"column": COLUMN}
    assert marker_path(ctx, "compress_ms").is_file()
    assert verify(ms, wd / f"{ms.name}.archive", COLUMN) < 0.005
    assert ": written;" in (wd / "logs" / "compress_ms.log").read_text()
