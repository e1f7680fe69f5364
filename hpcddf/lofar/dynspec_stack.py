"""The stacking of the dynamic spectra (``hpcddf.lofar.dynspec``): every residual visibility
phased to each direction, corrected by its scalar gains and summed over the baselines of its
integration, then turned into Stokes parameters.

For one direction, one integration and one channel the result is the weighted least-squares
estimate of the source's (residual) visibility from all baselines,

    V_hat = sum_pq w g_p* V_pq g_q exp(-2 pi i (u l + v m + w (n - 1))) / sum_pq w |g_p g_q|^2

with V_pq = g_p M g_q* the killMS/DDFacet convention, so the gains divide out, and with the
phase sign that brings a source at (l, m) of the MS convention V = S exp(+2 pi i (...)) (the
one ``hpcddf.lofar.simulate`` writes and DDFacet images) to the phase centre. The sums of the
weights w |g_p g_q|^2 and of their squares are kept for the W/W2 files. There is no averaging
beyond the baseline sum: pixels are native integrations x channels (as DynSpecMS).

The work is vectorised over the rows of a chunk and the channels; directions are a loop. The
sum over the rows of each integration is a product with a sparse (integrations x rows) matrix
of ones, so rows need not be in time order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.constants import c as C_LIGHT

from hpcddf.lofar.dynspec_ms import CHUNK_BYTES, Chunk, Columns, Grid, MSInfo, chunk_rows, iter_chunks
from hpcddf.lofar.dynspec_sols import Gains
from hpcddf.lofar.dynspec_targets import radec_to_lm


@dataclass(frozen=True)
class Stack:
    """The running sums of one period, (ndir, ntime, nchan, 4): data, weight, weight^2."""

    data: np.ndarray
    w: np.ndarray
    w2: np.ndarray

    @classmethod
    def empty(cls, ndir: int, grid: Grid) -> "Stack":
        shape = (ndir, grid.ntime, grid.nchan, 4)
        return cls(np.zeros(shape, np.complex128), np.zeros(shape), np.zeros(shape))

    @staticmethod
    def nbytes(ndir: int, grid: Grid) -> int:
        return ndir * grid.ntime * grid.nchan * 4 * (16 + 8 + 8)


def _row_sum(tidx: np.ndarray) -> tuple[np.ndarray, Any]:
    """The integrations present and the sparse matrix that sums rows into them."""
    from scipy.sparse import csr_matrix
    tu, inv = np.unique(tidx, return_inverse=True)
    n = len(tidx)
    return tu, csr_matrix((np.ones(n), (inv, np.arange(n))), shape=(len(tu), n))


def _phase(chunk: Chunk, l: float, m: float, freqs: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(nrow, nchan) factors that move a source at (l, m) to the phase centre, into ``out``.
    For evenly spaced channels the factor of channel k is f0's times the step's k-th power:
    two complex exponentials per row instead of one per row and channel."""
    n = np.sqrt(max(0.0, 1.0 - l * l - m * m))
    k = (-2j * np.pi / C_LIGHT) * (chunk.uvw @ np.array([l, m, n - 1.0]))  # per Hz
    df = np.diff(freqs)
    if len(freqs) < 3 or not np.allclose(df, df[0], rtol=1e-9, atol=0):
        return np.exp(k[:, None] * freqs[None, :], out=out)
    out[:, 0] = np.exp(k * freqs[0])
    out[:, 1:] = np.exp(k * df[0])[:, None]
    return np.cumprod(out, axis=1, out=out)


@dataclass(frozen=True)
class Workers:
    """The threads directions are spread over."""

    pool: ThreadPoolExecutor
    n: int


@dataclass(frozen=True)
class _Group:
    """Directions that share their gains in one chunk: conj(g_p) g_q and the weight sums."""

    dirs: list[int]
    cg: np.ndarray | None  # (nrow, nchan); None: no gains
    ws: np.ndarray  # (ntu, nchan, 4)
    w2s: np.ndarray


def _groups(chunk: Chunk, rows: Any, ntu: int, ndir: int, gains: Gains | None) -> Iterator[_Group]:
    """The gain groups of a chunk, one at a time (so only one group's gains are in memory)."""
    nrow, nch = chunk.vis.shape[:2]

    def sums(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = w.reshape(nrow, -1)
        return (rows @ flat).reshape(ntu, nch, 4), (rows @ flat ** 2).reshape(ntu, nch, 4)

    if gains is None:  # unit gains: the weights are the same for every direction
        yield _Group(list(range(ndir)), None, *sums(chunk.weight))
        return
    tidx = gains.time_index(chunk.time)
    for key, dirs in gains.groups().items():
        gp, gq = gains.station(tidx, chunk.a1, key), gains.station(tidx, chunk.a2, key)
        yield _Group(dirs, np.conj(gp) * gq, *sums(chunk.weight * (np.abs(gp * gq) ** 2)[:, :, None]))


def stack_chunk(stack: Stack, chunk: Chunk, grid: Grid, c0: int, lm: np.ndarray,
                freqs: np.ndarray, gains: Gains | None, workers: Workers) -> None:
    """Add one chunk of rows to every direction's sums (``lm``: (ndir, 2) about this MS's
    phase centre; ``c0``: this MS's first channel on the grid). Each of the ``workers`` takes
    a batch of directions and works in its own buffers, allocated once per chunk (fresh
    arrays of this size cost more in page faults than the arithmetic); numpy and scipy's
    sparse products release the GIL, and each thread writes only its own directions' sums."""
    nrow, nch = chunk.vis.shape[:2]
    tu, rows = _row_sum(grid.time_index(chunk.time))
    cs = slice(c0, c0 + nch)
    wv = chunk.weight * chunk.vis
    nthread = max(1, min(workers.n, len(lm)))
    bufs = [(np.empty((nrow, nch), np.complex128), np.empty((nrow, nch, 4), np.complex128))
            for _ in range(nthread)]

    def batch(dirs: np.ndarray, g: _Group, buf: tuple[np.ndarray, np.ndarray]) -> None:
        ph, x = buf
        for d in dirs:
            _phase(chunk, float(lm[d, 0]), float(lm[d, 1]), freqs, ph)
            if g.cg is not None:
                ph *= g.cg
            np.multiply(wv, ph[:, :, None], out=x)
            stack.data[d, tu, cs] += (rows @ x.reshape(nrow, -1)).reshape(len(tu), nch, 4)
            stack.w[d, tu, cs] += g.ws
            stack.w2[d, tu, cs] += g.w2s

    for g in _groups(chunk, rows, len(tu), len(lm), gains):
        if not g.dirs:
            continue
        parts = np.array_split(np.asarray(g.dirs), min(nthread, len(g.dirs)))
        list(workers.pool.map(batch, parts, [g] * len(parts), bufs[:len(parts)]))


def stack_ms(stack: Stack, info: MSInfo, grid: Grid, ra: np.ndarray, dec: np.ndarray,
             cols: Columns, gains: Gains | None, workers: Workers, rows: int | None = None) -> int:
    """Stack one MS, chunk by chunk, for directions (ra, dec); returns the rows read."""
    l, m = radec_to_lm(ra, dec, info.ra0, info.dec0)  # each MS's own phase centre
    lm = np.stack([l, m], axis=1)
    c0, done, start = grid.chan_offset(info), 0, time.monotonic()
    for chunk in iter_chunks(info, cols, rows):
        stack_chunk(stack, chunk, grid, c0, lm, info.freqs, gains, workers)
        done += len(chunk.time)
        print(f"{info.name}: {done}/{info.nrow} rows stacked for {len(lm)} directions "
              f"({time.monotonic() - start:.1f} s)", flush=True)
    return done


def stokes(stack: Stack, d: int) -> np.ndarray:
    """Direction ``d`` as (4, nchan, ntime) float32 Stokes I, Q, U, V: the sums divided by
    their weights (empty pixels give 0), I = (XX+YY)/2, Q = (XX-YY)/2, U = (XY+YX)/2,
    V = -i (XY-YX)/2, real parts."""
    w = stack.w[d]
    c = stack.data[d] / np.where(w > 0, w, 1.0)
    xx, xy, yx, yy = (c[..., k] for k in range(4))
    out = np.stack([(xx + yy) / 2, (xx - yy) / 2, (xy + yx) / 2, -0.5j * (xy - yx)]).real
    return out.transpose(0, 2, 1).astype(np.float32)


def weights(stack: Stack, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Direction ``d``'s sums of weight and weight^2 of the first correlation, (nchan, ntime)."""
    return stack.w[d, :, :, 0].T.astype(np.float32), stack.w2[d, :, :, 0].T.astype(np.float32)


def stack_period(infos: Sequence[MSInfo], grid: Grid, ra: np.ndarray, dec: np.ndarray,
                 cols: Columns, gains_of: Callable[[MSInfo], Gains | None], threads: int = 1,
                 rows: int | None = None) -> Stack:
    """Stack every MS of a period, one after the other (``gains_of(info)`` gives each MS's
    gains, loaded only when its turn comes), directions spread over ``threads`` threads."""
    stack = Stack.empty(len(ra), grid)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for info in infos:  # every thread has its own temporaries: the chunk shrinks
            n = rows or chunk_rows(len(info.freqs), CHUNK_BYTES // max(1, threads))
            stack_ms(stack, info, grid, ra, dec, cols, gains_of(info), Workers(pool, threads), n)
    return stack
