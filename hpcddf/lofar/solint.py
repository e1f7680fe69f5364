"""Automatic DI solution intervals (ddf-pipeline's ``give_dt_dnu``), then kMS.py with them.

ddf-pipeline picks each DI solve's time and frequency interval from the data, so that a cell
holds enough samples for a signal-to-noise of T = 10: S is the scatter of the unflagged
cross-hand visibilities (XY, YX: noise only, for an unpolarised sky), M the mean amplitude of
the unflagged XX, and a cell needs nb = (T S / M)^2 samples, split as sqrt(nb) channels
(snapped to a divisor of the channel count) times the rest in time.

Differences from the reference, on purpose: the intervals are decided per MS (the reference
reuses the first MS's for every later one of the call, so a restart could change them); the
column is read in row chunks (the reference reads the whole column into memory); and a
``[solutions] NChanSols`` the config sets is honoured for DI too (the reference ignores it).

Run on the node as ``python -m hpcddf.lofar.solint --ms MS --col COL [--dt MIN] [--nchan N]
-- kMS.py ...``: it works out what is not given, then replaces itself with kMS.py (exec), so
the runner's timeout, log and process group apply to kMS as to any command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SNR = 10.0  # the reference's T
CHUNK_ROWS = 20_000


@dataclass
class Moments:
    """Running sums of the cross-hand samples and of the XX amplitudes."""

    n_cross: int = 0
    sum_cross: complex = 0j
    sum_cross2: float = 0.0
    n_xx: int = 0
    sum_xx: float = 0.0

    def add(self, data: np.ndarray, flags: np.ndarray) -> None:
        """One chunk of (rows, channels, 4 correlations) data and flags."""
        cross = data[..., 1:3][~flags[..., 1:3]]
        self.n_cross += cross.size
        self.sum_cross += complex(cross.sum())
        self.sum_cross2 += float((np.abs(cross) ** 2).sum())
        xx = data[..., 0][~flags[..., 0]]
        self.n_xx += xx.size
        self.sum_xx += float(np.abs(xx).sum())

    def scatter_and_mean(self) -> tuple[float, float]:
        """S (numpy's std of the complex cross-hand samples) and M (mean |XX|)."""
        if not self.n_cross or not self.n_xx:
            raise SystemExit("error: every visibility is flagged: no solution interval can be chosen")
        mean = self.sum_cross / self.n_cross
        var = max(self.sum_cross2 / self.n_cross - abs(mean) ** 2, 0.0)
        return math.sqrt(var), self.sum_xx / self.n_xx


def nearest_divisor(n: int, k: int) -> int:
    """The divisor of n closest to k (the smaller one on a tie)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - k), d))


def intervals(scatter: float, mean_amp: float, nchan: int, interval_s: float) -> tuple[float, int]:
    """(dt in minutes, NChanSols) for a cell of SNR 10, as ddf-pipeline's give_dt_dnu."""
    nb = (SNR * scatter / mean_amp) ** 2
    nch_step = nearest_divisor(nchan, min(max(round(math.sqrt(nb)), 1), nchan))
    nt_step = max(1, round(nb / nch_step))
    return nt_step * interval_s / 60.0, nchan // nch_step


def measure(ms: str, col: str) -> tuple[float, float, int, float]:
    """S, M, the channel count and the integration time of one MS, read in row chunks."""
    from casacore.tables import table
    moments = Moments()
    with table(ms, readonly=True, ack=False) as t:
        interval = float(t.getcol("INTERVAL", 0, 1)[0])
        for start in range(0, t.nrows(), CHUNK_ROWS):
            n = min(CHUNK_ROWS, t.nrows() - start)
            moments.add(t.getcol(col, start, n), t.getcol("FLAG", start, n))
        nchan = int(t.getcol("FLAG", 0, 1).shape[1])
    s, m = moments.scatter_and_mean()
    return s, m, nchan, interval


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        raise SystemExit("error: give the kMS.py command after --")
    cut = args.index("--")
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.solint", description=__doc__.splitlines()[0])
    ap.add_argument("--ms", required=True)
    ap.add_argument("--col", required=True)
    ap.add_argument("--dt", type=float, help="minutes (given: not automatic)")
    ap.add_argument("--nchan", type=int, help="NChanSols (given: not automatic)")
    a = ap.parse_args(args[:cut])
    s, m, nchan, interval = measure(a.ms, a.col)
    auto_dt, auto_nchan = intervals(s, m, nchan, interval)
    dt = a.dt if a.dt is not None else auto_dt
    nsols = a.nchan if a.nchan is not None else auto_nchan
    print(f"solint {a.ms}: S={s:.4g} M={m:.4g} nchan={nchan} interval={interval:g} s -> "
          f"dt={dt:.4g} min{' (given)' if a.dt is not None else ''}, "
          f"NChanSols={nsols}{' (given)' if a.nchan is not None else ''}", flush=True)
    dt_arg = f"{auto_dt + 1e-4:.6g}" if a.dt is None else f"{a.dt:g}"  # the reference's guard
    kms = args[cut + 1:] + ["--dt", dt_arg, "--NChanSols", str(nsols)]
    os.execvp(kms[0], kms)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
