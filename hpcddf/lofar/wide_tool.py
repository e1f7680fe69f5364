"""The do_wide subtraction: ``DATA_SUB = <col> - <predict>`` in every MS, written so that a rerun
never subtracts twice (``python -m hpcddf.lofar.wide_tool subtract --col C --predict P --out
DATA_SUB [--drop-predict] MS...``).

ddf-pipeline predicts the outer sources into DATA_SUB and then overwrites DATA_SUB with
``<colname> - DATA_SUB`` in place, MS after MS, with one marker for the whole list: a kill after
some MSs are done makes a restart subtract those twice. Here the prediction has a column of its
own, which is only read, and DATA_SUB is always recomputed from the unchanged source column:

1. ``<out>_HPCDDF_PARTIAL`` (removed first if a killed run left one) is filled chunk by chunk,
   so memory stays at a few chunks whatever the MS size;
2. it gets the keyword saying what it was made from, and is renamed to ``<out>`` (an older
   ``<out>`` is removed just before): ``<out>`` is only ever complete;
3. with ``--drop-predict`` the prediction column is then removed, so the MS ends up with one
   column more than it started with, as in ddf-pipeline.

An MS with no prediction column but a complete ``<out>`` made from ``--col`` (step 3 of an
earlier run) is left alone; rerunning the DDF predict restores the column and the MS is redone.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator, Sequence

from hpcddf.lofar.mstables import casacore_tables

# numpy and casacore are imported where used: the planner imports this module's names on a
# login node that has neither (the science stack runs on the nodes)

PARTIAL_SUFFIX = "_HPCDDF_PARTIAL"
MADE_FROM = "HPCDDF_SUBTRACTED"  # column keyword of <out>: {"col": ..., "predict": ...}
CHUNK_MB = 256.0                 # per array read at once (the source and the prediction)


class SubtractError(Exception):
    """An MS the subtraction cannot be made in (the message says which and why)."""


def _tables() -> Any:
    return casacore_tables(SubtractError)


def chunk_rows(row_bytes: int, chunk_mb: float) -> int:
    """Rows per chunk so one chunk of one column takes at most ``chunk_mb`` MB (at least a row)."""
    return max(1, int(chunk_mb * 2**20) // max(1, row_bytes))


def chunks(nrow: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, nrow, rows):
        yield start, min(rows, nrow - start)


def _row_bytes(t: Any, col: str) -> int:
    return int(t.getcell(col, 0).nbytes) if t.nrows() else 1


def _check_names(col: str, predict: str, out: str) -> None:
    if out in (col, predict) or col == predict:
        raise SubtractError(f"--col {col}, --predict {predict} and --out {out} must be three columns")


def _done_before(t: Any, col: str, out: str) -> bool:
    """``out`` is complete and made from ``col`` (its prediction dropped by an earlier run)."""
    if out not in t.colnames():
        return False
    made = t.getcolkeywords(out).get(MADE_FROM)
    return isinstance(made, dict) and made.get("col") == col


def _add_partial(t: Any, col: str, tmp: str) -> None:
    """A new column shaped like ``col`` in a storage manager of its own (so removing it later
    frees its files), replacing what a killed run left under that name."""
    from casacore.tables import makecoldesc
    if tmp in t.colnames():
        t.removecols(tmp)
    cd = dict(t.getcoldesc(col))
    for key in ("dataManagerType", "dataManagerGroup", "comment", "keywords"):
        cd.pop(key, None)
    t.addcols(makecoldesc(tmp, cd))


def _fill(t: Any, col: str, predict: str, tmp: str, rows: int) -> None:
    """``tmp = col - predict``, a chunk of rows at a time (two chunks in memory at most)."""
    for start, n in chunks(t.nrows(), rows):
        diff = t.getcol(col, start, n)
        diff -= t.getcol(predict, start, n)
        t.putcol(tmp, diff, start, n)
        print(f"{t.name()}: rows {start}-{start + n} of {t.nrows()} subtracted", flush=True)
    t.flush()


def subtract_ms(ms: str, col: str, predict: str, out: str, drop_predict: bool = False,
                chunk_mb: float = CHUNK_MB) -> str:
    """Write ``out = col - predict`` in one MS; what was done ("subtracted" or "already done")."""
    _check_names(col, predict, out)
    with _tables().table(ms, readonly=False, ack=False) as t:
        cols = t.colnames()
        if col not in cols:
            raise SubtractError(f"{ms} has no column {col} to subtract from")
        if predict not in cols:
            if _done_before(t, col, out):
                return "already done"
            raise SubtractError(f"{ms} has no column {predict}: run the predict first")
        tmp = out + PARTIAL_SUFFIX
        _add_partial(t, col, tmp)
        _fill(t, col, predict, tmp, chunk_rows(_row_bytes(t, col), chunk_mb))
        t.putcolkeyword(tmp, MADE_FROM, {"col": col, "predict": predict})
        if out in t.colnames():
            t.removecols(out)
        t.renamecol(tmp, out)
        if drop_predict:
            t.removecols(predict)
    return "subtracted"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.wide_tool", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("subtract", help="OUT = COL - PREDICT in every MS, never twice")
    p.add_argument("--col", required=True, help="the data column (only read)")
    p.add_argument("--predict", required=True, help="the predicted column (only read)")
    p.add_argument("--out", required=True, help="the column written (DATA_SUB)")
    p.add_argument("--drop-predict", action="store_true", help="remove PREDICT once OUT is complete")
    p.add_argument("--chunk-mb", type=float, default=CHUNK_MB, help="MB of one column read at once")
    p.add_argument("ms", nargs="+")
    a = ap.parse_args(argv)
    try:
        for ms in a.ms:
            what = subtract_ms(ms, a.col, a.predict, a.out, a.drop_predict, a.chunk_mb)
            print(f"{ms}: {a.out} = {a.col} - {a.predict}: {what}", flush=True)
    except (SubtractError, RuntimeError) as exc:  # RuntimeError: casacore cannot open/lock the MS
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
