"""``compress_ms``: a Dysco-compressed archive copy of every MS (``<ms>.archive``), verified
before it gets its name (``python -m hpcddf.lofar.compress --column COL MS...``).

ddf-pipeline's ``archivems.py`` runs ``DP3 msin=<ms> msin.datacolumn=<col> msout=<ms>.archive
msout.storagemanager=dysco`` per MS of ``big-mslist.txt`` and skips any ``<ms>.archive`` that
exists, so a copy half-written by a killed run counts as done. DP3 has no executable on PyPI,
but python-casacore's wheel contains casacore's DyscoStMan, so this module writes the same
archive itself: the main table's non-data columns and every subtable (a deep copy), ``DATA``
= the chosen column through DyscoStMan with DP3's defaults, ``WEIGHT_SPECTRUM`` through the
same manager (12 bits, as DP3; Dysco keeps one weight per channel, the smallest of the
polarisations), ``IMAGING_WEIGHT`` copied as it is. The copy is written under a temporary
name in the same directory, read back and compared with the MS (``verify``), and only then
renamed: an ``<ms>.archive`` always verified once, a temporary left by a killed run is removed
and redone, and the MS itself is only ever opened read-only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from hpcddf.lofar.mstables import casacore_tables

# numpy and casacore are imported where used: the planner imports archive_name on a login node
# that has neither (the science stack runs on the nodes)

ARCHIVE_SUFFIX = ".archive"

# DP3's msout.dysco* defaults (dp3 docs/schemas/Output.yml), which archivems.py relies on
DYSCO_SPEC = {"dataBitCount": 10, "weightBitCount": 12, "distribution": "TruncatedGaussian",
              "distributionTruncation": 2.5, "normalization": "AF", "studentTNu": 0.0}

# Read back, the data must be within this relative rms error of the source column, per chunk
# of rows. Dysco's documented design error at 10 bits is a fraction of a percent of the noise
# (measured here: 0.26-0.29 % on simulated MSs from noise- to signal-dominated); a row range
# left unwritten or written from another column is off by ~100 %.
MAX_REL_RMS_ERROR = 0.01

# Columns that must be bit-identical in the archive (where the MS has them).
EXACT_COLUMNS = ("TIME", "ANTENNA1", "ANTENNA2", "UVW", "FLAG", "FLAG_ROW", "WEIGHT", "SIGMA",
                 "IMAGING_WEIGHT")
CHUNK_ROWS = 100_000


class ArchiveError(Exception):
    """An archive that cannot be written or does not match its MS (the message says which)."""


@dataclass(frozen=True)
class Outcome:
    archive: Path
    action: str          # "verified" (existed and matched) or "written"
    rel_rms_error: float
    ms_bytes: int
    archive_bytes: int


def archive_name(ms: str) -> str:
    """ddf-pipeline's name: the MS's file name + ``.archive``, in the field directory."""
    return Path(ms).name + ARCHIVE_SUFFIX


def temporary_name(archive: Path) -> Path:
    """Where the archive is written before it is verified (hidden, in the same directory)."""
    return archive.with_name(f".{archive.name}.tmp")


def _tables() -> Any:
    return casacore_tables(ArchiveError)


def _is_data_column(t: Any, name: str) -> bool:
    return t.getcoldesc(name).get("valueType") in ("complex", "dcomplex")


def _cell_shape(t: Any, name: str) -> list[int]:
    """The (channel, polarisation) shape of a column's cells: Dysco needs a fixed shape."""
    shape = t.getcoldesc(name).get("shape")
    if shape is not None and len(shape):
        return [int(s) for s in shape]
    return [int(s) for s in t.getcell(name, 0).shape]


def _chunks(nrow: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, nrow, chunk_rows):
        yield start, min(chunk_rows, nrow - start)


def _dysco_columns(ct: Any, src: Any, column: str) -> tuple[list[str], Any]:
    """The archive's Dysco-managed columns and their descriptions (DATA, WEIGHT_SPECTRUM)."""
    shape = _cell_shape(src, column)
    descs = [ct.makearrcoldesc("DATA", 0j, shape=shape, valuetype="complex", options=5)]
    names = ["DATA"]
    if "WEIGHT_SPECTRUM" in src.colnames():
        descs.append(ct.makearrcoldesc("WEIGHT_SPECTRUM", 0.0, shape=shape, valuetype="float", options=5))
        names.append("WEIGHT_SPECTRUM")
    return names, ct.maketabdesc(descs)


def write_archive(ms: Path, tmp: Path, column: str, chunk_rows: int = CHUNK_ROWS) -> None:
    """Write the archive of ``ms`` to ``tmp``: every non-data column and subtable (deep copy),
    then DATA (= ``column``) and WEIGHT_SPECTRUM through DyscoStMan, chunk by chunk so a
    large MS never has to fit in memory. ``ms`` is opened read-only."""
    ct = _tables()
    with ct.table(str(ms), ack=False) as src:
        if column not in src.colnames():
            raise ArchiveError(f"{ms} has no column {column} to archive")
        keep = [c for c in src.colnames() if not _is_data_column(src, c) and c != "WEIGHT_SPECTRUM"]
        with src.query(columns=",".join(keep)) as sel:
            sel.copy(str(tmp), deep=True, valuecopy=True).close()
        names, desc = _dysco_columns(ct, src, column)
        with ct.table(str(tmp), readonly=False, ack=False) as out:
            out.addcols(desc, {"TYPE": "DyscoStMan", "NAME": "DyscoData", "SPEC": dict(DYSCO_SPEC)})
            for start, n in _chunks(src.nrows(), chunk_rows):
                out.putcol("DATA", src.getcol(column, start, n), start, n)
                if "WEIGHT_SPECTRUM" in names:
                    out.putcol("WEIGHT_SPECTRUM", src.getcol("WEIGHT_SPECTRUM", start, n), start, n)
                print(f"{ms}: rows {start}-{start + n} of {src.nrows()} written", flush=True)


# ------------------------------------------------------------------------------ verification

def _data_error(ref: Any, got: Any) -> float:
    """Relative rms error of the finite source values (flagged NaNs carry no data)."""
    import numpy as np
    ok = np.isfinite(ref)
    if not np.all(np.isfinite(got[ok])):
        return float("inf")
    err = np.sum(np.abs(got[ok] - ref[ok]) ** 2)
    power = np.sum(np.abs(ref[ok]) ** 2)
    if power == 0:
        return 0.0 if err == 0 else float("inf")
    return float(np.sqrt(err / power))


def _weights_ok(ref: Any, got: Any) -> bool:
    """Dysco stores, per row and channel, the smallest weight of the polarisations in
    weightBitCount bits scaled to the row's largest weight: rounding keeps it within half a
    quantisation step (measured), one step is allowed."""
    import numpy as np
    smallest = ref.min(axis=-1, keepdims=True)
    scale = ref.reshape(ref.shape[0], -1).max(axis=1).reshape(-1, 1, 1)
    step = scale / (2 ** DYSCO_SPEC["weightBitCount"] - 1)
    return bool(np.all(np.abs(got - smallest) <= step))


def _check_structure(src: Any, arc: Any, ms: Path) -> None:
    missing = [c for c in ("DATA", "WEIGHT_SPECTRUM") if c in src.colnames() and c not in arc.colnames()]
    if missing or "DATA" not in arc.colnames():
        raise ArchiveError(f"columns {', '.join(missing or ['DATA'])} are missing")
    if arc.nrows() != src.nrows():
        raise ArchiveError(f"{arc.nrows()} rows, {ms} has {src.nrows()}")
    if arc.getdminfo("DATA").get("TYPE") != "DyscoStMan":
        raise ArchiveError("DATA is not Dysco-compressed")
    for key, value in src.getkeywords().items():
        if isinstance(value, str) and value.startswith("Table: "):
            sub = arc.getkeywords().get(key)
            if not isinstance(sub, str):
                raise ArchiveError(f"subtable {key} is missing")
            if _nrows(sub) != _nrows(value):
                raise ArchiveError(f"subtable {key} has {_nrows(sub)} rows, the MS's has {_nrows(value)}")


def _nrows(keyword: str) -> int:
    with _tables().table(keyword.removeprefix("Table: "), ack=False) as t:
        return t.nrows()


def _check_chunk(src: Any, arc: Any, column: str, start: int, n: int, exact: list[str]) -> float:
    import numpy as np
    ref, got = src.getcol(column, start, n), arc.getcol("DATA", start, n)
    if ref.shape != got.shape:
        raise ArchiveError(f"DATA cells are {got.shape[1:]}, {column}'s are {ref.shape[1:]}")
    err = _data_error(ref, got)
    if err > MAX_REL_RMS_ERROR:
        raise ArchiveError(f"DATA rows {start}-{start + n} differ from {column} by {err:.3g} rms "
                           f"(Dysco's bound here: {MAX_REL_RMS_ERROR})")
    for name in exact:
        if not np.array_equal(src.getcol(name, start, n), arc.getcol(name, start, n), equal_nan=True):
            raise ArchiveError(f"{name} rows {start}-{start + n} differ from the MS's")
    if "WEIGHT_SPECTRUM" in src.colnames() and not _weights_ok(
            src.getcol("WEIGHT_SPECTRUM", start, n), arc.getcol("WEIGHT_SPECTRUM", start, n)):
        raise ArchiveError(f"WEIGHT_SPECTRUM rows {start}-{start + n} differ beyond Dysco's 12-bit step")
    return err


def verify(ms: Path, archive: Path, column: str, chunk_rows: int = CHUNK_ROWS) -> float:
    """Compare the archive with the MS; the worst relative rms error of DATA, or ArchiveError
    saying what does not match (a half-written table, a missing row range, another column)."""
    ct = _tables()
    try:
        with ct.table(str(ms), ack=False) as src, ct.table(str(archive), ack=False) as arc:
            _check_structure(src, arc, ms)
            exact = [c for c in EXACT_COLUMNS if c in src.colnames()]
            missing = [c for c in exact if c not in arc.colnames()]
            if missing:
                raise ArchiveError(f"columns {', '.join(missing)} are missing")
            return max([_check_chunk(src, arc, column, s, n, exact)
                        for s, n in _chunks(src.nrows(), chunk_rows)], default=0.0)
    except RuntimeError as exc:  # casacore: not a table, a storage manager left half-written
        raise ArchiveError(f"cannot read it: {str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------------ per MS

def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path, why: str) -> None:
    print(f"{path}: {why}, removed", flush=True)
    shutil.rmtree(path)


def archive_ms(ms: Path, outdir: Path, column: str, chunk_rows: int = CHUNK_ROWS) -> Outcome:
    """Make ``outdir/<ms>.archive`` unless one exists and verifies; the original is read only."""
    archive = outdir / archive_name(str(ms))
    tmp = temporary_name(archive)
    if tmp.exists():
        _remove(tmp, "half-written by an interrupted run")
    if archive.exists():
        try:
            err = verify(ms, archive, column, chunk_rows)
            return Outcome(archive, "verified", err, _size(ms), _size(archive))
        except ArchiveError as exc:
            print(f"{archive}: does not verify ({exc}); writing it again", flush=True)
    write_archive(ms, tmp, column, chunk_rows)
    try:
        err = verify(ms, tmp, column, chunk_rows)
    except ArchiveError as exc:
        raise ArchiveError(f"{tmp} (just written) does not verify: {exc}") from None
    if archive.exists():
        _remove(archive, "did not verify")
    tmp.rename(archive)
    return Outcome(archive, "written", err, _size(ms), _size(archive))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.compress", description=__doc__.split("\n")[0])
    ap.add_argument("--column", required=True, help="the MS column the archive's DATA holds")
    ap.add_argument("--outdir", default=".", help="where <ms>.archive goes (the field directory)")
    ap.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows read and written at once")
    ap.add_argument("ms", nargs="+")
    a = ap.parse_args(argv)
    try:
        for ms in a.ms:
            o = archive_ms(Path(ms), Path(a.outdir), a.column, a.chunk_rows)
            print(f"{o.archive}: {o.action}; DATA = {a.column} within {o.rel_rms_error:.2e} rms; "
                  f"{o.ms_bytes} -> {o.archive_bytes} bytes", flush=True)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
