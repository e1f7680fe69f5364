"""Mosaic maths: combine the final images of neighbouring pointings on one SIN grid.

For each input i (its beam-corrected ``int`` image and apparent ``app`` image, as DDFacet
writes them), in its own pixel grid:

    B_i = median3x3(app_i / int_i), set to 0 where B_i < beamcut      (primary beam)
    W_i = (B_i / sigma_i)^2                                           (inverse variance of int_i)

with sigma_i the clipped rms of the central box of ``app_i`` (or given). Both ``int_i`` and
``W_i`` are resampled onto the output grid (bilinear through a coarse-grid pixel map, resample.py;
or exact flux-conserving with ``reproject``);
with per-field flux-scale factors s_i, r = s_i int_i and w = W_i / s_i^2. Then

    mosaic = sum_i(r_i w_i) / sum_i(w_i)

blanked outside the mosaic circle and where no input contributes, with isolated islands of at
most ``island_size`` pixels removed. The weight map sum_i(w_i) is written beside it.

Memory stays bounded: inputs are memory-mapped and only the cutout under each output block
is read; the output is built block by block (blocks outside the circle, or outside every
input's beam, are never computed); only the two float32 output sums stay resident, and FITS
files are streamed out in row chunks. Blocks run in worker processes when ``workers`` > 1.

Differences from ddf-pipeline's mosaic.py, on purpose:
* the input cutout around each block has a symmetric margin (theirs was int(min/1.1) and
  int(max*1.1), lopsided and scale dependent);
* exact zeros are data, not background, in the island filter (their ``data[data==0]==-9999``
  was a comparison, not an assignment);
* the restoring beam in the header is the product's, and a differing input beam is reported
  in the header and the result instead of copied silently from the first input.
"""

from __future__ import annotations

import math
import os
import tracemalloc
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf import __version__
from hpcddf.errors import HpcddfError
from hpcddf.mosaic.corrections import (
    Beam,
    Corrections,
    PixelFacets,
    astromap_bad,
    common_beam,
    convolution_kernel,
    facet_noise,
    shift_facets,
)
from hpcddf.mosaic.products import finish_mosaic, remove_islands, write_streamed
from hpcddf.mosaic.resample import fold_shifts, out_to_in, pixel_map, resample
from hpcddf.sky import clipped_rms, image_plane

ARCSEC_DEG = 1.0 / 3600.0
HALF_SIZE_FACTOR = 1.15   # the mosaic reaches 1.15 x half the largest neighbour separation
EDGE_SAMPLES = 16         # points per block edge mapped into an input to find its cutout
CUTOUT_MARGIN = 3         # pixels: bilinear needs 1, the 3x3 median 1 more, 1 spare
BLOCK_BYTES_PER_PIXEL = 200  # measured: a worker's temporaries per output pixel of its block


class MosaicError(HpcddfError):
    """A mosaic cannot be made from these inputs."""


@dataclass(frozen=True)
class Product:
    """One kind of final image a field produces, and its mosaic grid."""

    name: str
    int_image: str
    app_image: str
    cell_arcsec: float
    resolution_arcsec: float
    noise_box: int
    tessel: str


PRODUCTS = {
    "full": Product("full", "image_full_ampphase_di_m.NS.int.restored.fits",
                    "image_full_ampphase_di_m.NS.app.restored.fits", 1.5, 6.0, 1000,
                    "image_full_ampphase_di_m.NS.tessel.reg"),
    "low": Product("low", "image_full_low.int.restored.fits",
                   "image_full_low.app.restored.fits", 4.5, 20.0, 1500,
                   "image_full_low.tessel.reg"),
}


@dataclass(frozen=True)
class MosaicInput:
    """One field's images; ``noise`` (Jy/beam) is measured when None, ``scale`` multiplies flux
    (``scale_from`` says where it came from), ``corrections`` are applied per block."""

    name: str
    int_path: str
    app_path: str
    noise: float | None = None
    scale: float = 1.0
    corrections: Corrections = Corrections()
    scale_from: str = ""


@dataclass(frozen=True)
class MosaicOptions:
    beamcut: float = 0.3
    method: str = "bilinear"       # or "exact"
    block: int = 0                 # output block side in pixels; 0: from the memory budget
    workers: int = 1
    island_size: int = 20
    noise_box: int = 1000
    measure_memory: bool = False   # report the peak traced memory of every process
    common_beam: str = "auto"      # "auto": convolve differing inputs to their common beam;
                                   # "none": keep each input's; or a round beam in arcsec


@dataclass
class MosaicResult:
    mosaic: str
    weights: str
    noise: dict[str, float]
    blocks_computed: int
    blocks_total: int
    input_blocks: int              # (block, input) pairs reprojected
    warnings: list[str] = field(default_factory=list)
    peak_bytes: int | None = None  # the largest of: noise, blocks (parent + workers), finishing
    peak_phases: dict[str, int] = field(default_factory=dict)
    output_bytes: int = 0


# ---------------------------------------------------------------- grid and images

def output_header(name: str, ra: float, dec: float, max_sep_deg: float, cell_arcsec: float,
                  resolution_arcsec: float) -> Any:
    """ddf-pipeline's mosaic grid: SIN centred on the pointing, 2 x himsize pixels square with
    himsize = (max_sep/2 x 1.15) / cell, the product's restoring beam."""
    from astropy.io import fits
    cell = cell_arcsec * ARCSEC_DEG
    himsize = int((max_sep_deg / 2.0) * HALF_SIZE_FACTOR / cell)
    if himsize < 1:
        raise MosaicError(f"mosaic {name}: no neighbours to cover (largest separation {max_sep_deg} deg)",
                          "a mosaic needs at least one neighbouring pointing")
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = -32
    h["NAXIS"] = 2
    h["NAXIS1"] = h["NAXIS2"] = 2 * himsize
    h["CTYPE1"], h["CTYPE2"] = "RA---SIN", "DEC--SIN"
    h["CRPIX1"] = h["CRPIX2"] = float(himsize)
    h["CRVAL1"], h["CRVAL2"] = float(ra), float(dec)
    h["CDELT1"], h["CDELT2"] = -cell, cell
    h["CUNIT1"] = h["CUNIT2"] = "deg"
    h["RADESYS"] = "ICRS"
    h["EQUINOX"] = 2000.0
    h["LONPOLE"] = 180.0
    h["LATPOLE"] = float(dec)
    h["BMAJ"] = h["BMIN"] = resolution_arcsec * ARCSEC_DEG
    h["BPA"] = 0.0
    h["BUNIT"] = "JY/BEAM"
    h["RESTFRQ"] = 144e6
    h["OBJECT"] = name
    h["ORIGIN"] = f"hpcddf {__version__}"
    return h


def beam_and_weight(app: np.ndarray, int_: np.ndarray, noise: float,
                    beamcut: float) -> tuple[np.ndarray, np.ndarray]:
    """The primary beam (median-filtered app/int, 0 below ``beamcut``) and weight (B/noise)^2."""
    from scipy.ndimage import median_filter
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(app, dtype=np.float32) / np.asarray(int_, dtype=np.float32)
    ratio[~np.isfinite(ratio)] = 0.0
    beam = median_filter(ratio, size=3, mode="nearest")
    beam[beam < beamcut] = 0.0
    beam[~np.isfinite(int_)] = 0.0
    return beam, np.square(beam / np.float32(noise), dtype=np.float32)


def input_cutout(in_wcs: Any, in_shape: tuple[int, int], out_wcs: Any, box: tuple[int, int, int, int],
                 margin: int = CUTOUT_MARGIN) -> tuple[slice, slice] | None:
    """The input pixels under an output block (y0, y1, x0, x1), with a symmetric margin."""
    y0, y1, x0, x1 = box
    t = np.linspace(0.0, 1.0, EDGE_SAMPLES)
    xs = np.concatenate([x0 - 0.5 + t * (x1 - x0), np.full_like(t, x1 - 0.5),
                         x0 - 0.5 + t * (x1 - x0), np.full_like(t, x0 - 0.5)])
    ys = np.concatenate([np.full_like(t, y0 - 0.5), y0 - 0.5 + t * (y1 - y0),
                         np.full_like(t, y1 - 0.5), y0 - 0.5 + t * (y1 - y0)])
    ix, iy = out_to_in(in_wcs, out_wcs, xs, ys)
    ok = np.isfinite(ix) & np.isfinite(iy)
    if not ok.any():
        return None
    ny, nx = in_shape
    cx0 = max(0, int(math.floor(ix[ok].min())) - margin)
    cx1 = min(nx, int(math.ceil(ix[ok].max())) + margin + 1)
    cy0 = max(0, int(math.floor(iy[ok].min())) - margin)
    cy1 = min(ny, int(math.ceil(iy[ok].max())) + margin + 1)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    return slice(cy0, cy1), slice(cx0, cx1)


def blocks(shape: tuple[int, int], size: int) -> Iterator[tuple[int, int, int, int]]:
    ny, nx = shape
    for y0 in range(0, ny, size):
        for x0 in range(0, nx, size):
            yield y0, min(ny, y0 + size), x0, min(nx, x0 + size)


def auto_block(out_pixels: int, workers: int) -> int:
    """Block side keeping all workers' temporaries within half the size of one float32 mosaic
    (bench/mosaic.py: 256 px blocks cost a worker about 13 MB), between 64 and 512 px."""
    side = math.sqrt(0.5 * out_pixels * 4 / (BLOCK_BYTES_PER_PIXEL * max(1, workers)))
    return int(min(512, max(64, side)))


def block_in_circle(box: tuple[int, int, int, int], centre: tuple[float, float], radius: float) -> bool:
    """Whether any pixel of the block lies within ``radius`` pixels of ``centre`` (x, y)."""
    y0, y1, x0, x1 = box
    cx, cy = centre
    dx = max(x0 - cx, 0.0, cx - (x1 - 1))
    dy = max(y0 - cy, 0.0, cy - (y1 - 1))
    return dx * dx + dy * dy <= radius * radius


# ---------------------------------------------------------------- one block (any process)

@dataclass
class Prepared:
    """What the parent measured of one input, for every block (picklable: sent to workers)."""

    noise: float
    facet_sigma: np.ndarray | None = None   # per facet, after any convolution
    kernel: np.ndarray | None = None        # to the common beam
    area_ratio: float = 1.0


@dataclass
class _Opened:
    inp: MosaicInput
    prep: Prepared
    int_data: Any
    app_data: Any
    wcs: Any
    facets: PixelFacets | None
    astromap: tuple[np.ndarray, Any] | None
    pad: int                                 # extra cutout margin: kernel and shifts


_STATE: dict[str, Any] = {}


def _open_one(inp: MosaicInput, prep: Prepared) -> _Opened:
    from hpcddf.mosaic.corrections import read_astromap
    idata, wcs, _ = image_plane(inp.int_path)
    adata, _, _ = image_plane(inp.app_path)
    if idata.shape != adata.shape:
        raise MosaicError(f"{inp.name}: int and app images differ in shape",
                          "use the int/app pair of one DDFacet run")
    corr = inp.corrections
    facets = PixelFacets.build(corr, wcs) if corr.needs_labels else None
    amap = read_astromap(corr.astromap) if corr.astromap else None
    pad = (prep.kernel.shape[0] // 2 + 1 if prep.kernel is not None else 0)
    pad += facets.max_shift_px() + 3 if facets is not None and corr.shifted else 0
    return _Opened(inp, prep, idata, adata, wcs, facets, amap, pad)


def _open_inputs(inputs: Sequence[MosaicInput], preps: Sequence[Prepared], header_text: str,
                 opts: MosaicOptions) -> None:
    """Per process: memory-map every input once (a worker's initializer, or the parent's)."""
    from astropy.io import fits
    from astropy.wcs import WCS
    _STATE.update(inputs=[_open_one(i, p) for i, p in zip(inputs, preps)],
                  out_wcs=WCS(fits.Header.fromstring(header_text)), opts=opts)


def _worker_init(inputs: Sequence[MosaicInput], preps: Sequence[Prepared], header_text: str,
                 opts: MosaicOptions) -> None:
    """A worker process: its own memory count (a forked child inherits the parent's traces);
    modules are imported first, so the count is the data's, not the code's."""
    import scipy.interpolate  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import scipy.signal  # noqa: F401
    _open_inputs(inputs, preps, header_text, opts)
    if opts.measure_memory:
        tracemalloc.stop()
        tracemalloc.start()


def _corrected_cutout(o: _Opened, cut: tuple[slice, slice], beamcut: float,
                      shift_now: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(int, weight, facet labels) of one input's cutout with every correction applied, on its
    own grid; facet shifts are applied here only when ``shift_now`` (else the resampling folds
    them into its coordinates)."""
    int_cut = np.asarray(o.int_data[cut], dtype=np.float32)
    beam, weight = beam_and_weight(o.app_data[cut], int_cut, o.prep.noise, beamcut)
    if not weight.any():
        return None
    invalid = ~np.isfinite(int_cut)
    int_cut[invalid] = 0.0
    labels = None
    if o.facets is not None:
        labels = o.facets.labels(cut)
        if o.prep.facet_sigma is not None:
            sigma = np.where(labels >= 0, o.prep.facet_sigma[np.maximum(labels, 0)], o.prep.noise)
            weight = np.square(beam / sigma.astype(np.float32), dtype=np.float32)
        weight[(labels >= 0) & o.facets.blank[np.maximum(labels, 0)]] = 0.0
        if o.inp.corrections.shifted and shift_now:
            int_cut = shift_facets(int_cut, labels, o.facets.shifts_px)
    if o.astromap is not None:
        weight[astromap_bad(*o.astromap, o.inp.corrections.astromap_max or 0.0, o.wcs, cut)] = 0.0
    if o.prep.kernel is not None:
        from scipy.ndimage import maximum_filter
        from scipy.signal import fftconvolve
        int_cut = fftconvolve(int_cut, o.prep.kernel, mode="same").astype(np.float32) * np.float32(o.prep.area_ratio)
        if invalid.any():  # pixels the convolution filled from outside the image get no weight
            weight[maximum_filter(invalid, size=o.prep.kernel.shape[0])] = 0.0
    return int_cut, weight, labels


def _onto_block(o: _Opened, cut: tuple[slice, slice], box: tuple[int, int, int, int],
                method: str, beamcut: float) -> tuple[np.ndarray, np.ndarray] | None:
    """One input's corrected (int, weight) on the output block: ``exact`` through reproject,
    bilinear through the coarse-grid pixel map with the facet shifts folded in (resample.py)."""
    got = _corrected_cutout(o, cut, beamcut, shift_now=method == "exact")
    if got is None:
        return None
    y0, y1, x0, x1 = box
    if method == "exact":
        from reproject import reproject_exact
        r, w = reproject_exact((np.stack(got[:2]), o.wcs[cut]), _STATE["out_wcs"][y0:y1, x0:x1],
                               shape_out=(y1 - y0, x1 - x0), return_footprint=False)
        return np.nan_to_num(r, nan=0.0), np.nan_to_num(w, nan=0.0)
    mapped = pixel_map(o.wcs, _STATE["out_wcs"], box)
    if mapped is None:
        return None
    cy, cx = mapped[0] - cut[0].start, mapped[1] - cut[1].start
    if got[2] is not None and o.inp.corrections.shifted:
        cy, cx = fold_shifts(cy, cx, got[2], o.facets.shifts_px)
    r, w = resample(got[:2], (cy, cx))
    return r, w


def _mosaic_block(box: tuple[int, int, int, int]) -> tuple[tuple[int, int, int, int], Any, Any, int, int, int]:
    """Sum of r*w and of w over every input for one output block (None, None if no input has beam here)."""
    opts: MosaicOptions = _STATE["opts"]
    isum = wsum = None
    used = 0
    for o in _STATE["inputs"]:
        cut = input_cutout(o.wcs, o.int_data.shape, _STATE["out_wcs"], box, CUTOUT_MARGIN + o.pad)
        got = _onto_block(o, cut, box, opts.method, opts.beamcut) if cut is not None else None
        if got is None:
            continue
        r = got[0].astype(np.float32, copy=False) * np.float32(o.inp.scale)
        w = got[1].astype(np.float32, copy=False) / np.float32(o.inp.scale ** 2)
        if isum is None:
            isum, wsum = r * w, w
        else:
            isum += r * w
            wsum += w
        used += 1
    peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
    return box, isum, wsum, used, os.getpid(), peak


# ---------------------------------------------------------------- the whole mosaic

def parse_common_beam(how: str) -> float | None:
    """``--common-beam``: auto, none, or a round beam in arcsec (checked before anything is queued)."""
    if how in ("auto", "none"):
        return None
    try:
        size = float(how)
    except ValueError:
        size = float("nan")
    if not size > 0:
        raise MosaicError(f"--common-beam {how!r} is not auto, none or arcsec > 0", "e.g. --common-beam 9")
    return size


def target_beam(inputs: Sequence[MosaicInput], header: Any, how: str) -> tuple[list[Beam | None], Beam | None]:
    """Each input's restoring beam, and the beam to convolve them to (None: keep them)."""
    beams = [Beam.of(image_plane(i.int_path)[2]) for i in inputs]
    size = parse_common_beam(how)
    if how == "none":
        return beams, None
    if size is not None:
        return beams, Beam(size, size)
    known = [b for b in beams if b is not None]
    return beams, (common_beam(known) if known else None)  # all alike: theirs, nothing convolved


def _noise_of(inp: MosaicInput, box: int, kernel: tuple[np.ndarray, float] | None) -> float:
    if inp.noise is not None:
        if not inp.noise > 0:
            raise MosaicError(f"{inp.name}: noise {inp.noise} must be positive", "give Jy/beam > 0")
        return float(inp.noise)
    data, _, _ = image_plane(inp.app_path)
    if kernel is None:
        return clipped_rms(data, box)
    from scipy.signal import fftconvolve
    ny, nx = data.shape
    half = box // 2 + kernel[0].shape[0]
    y0, x0 = max(0, ny // 2 - half), max(0, nx // 2 - half)
    sub = np.nan_to_num(np.asarray(data[y0:ny // 2 + half, x0:nx // 2 + half], dtype=np.float32))
    return clipped_rms(fftconvolve(sub, kernel[0], mode="same") * kernel[1], box)


def prepare_inputs(inputs: Sequence[MosaicInput], box: int, beams: Sequence[Beam | None],
                   target: Beam | None) -> list[Prepared]:
    """Per input: its noise (after convolution), noise per facet, and convolution kernel."""
    out = []
    for inp, beam in zip(inputs, beams):
        _, wcs, _ = image_plane(inp.int_path)
        kern = None
        if target is not None and beam is not None:
            kern = convolution_kernel(beam, target, abs(float(wcs.wcs.cdelt[1])) * 3600.0)
        noise = _noise_of(inp, box, kern)
        sigma = None
        if inp.corrections.facet_noise:
            app, _, _ = image_plane(inp.app_path)
            native = clipped_rms(app, box) if kern is not None else noise
            sigma = facet_noise(app, PixelFacets.build(inp.corrections, wcs), native) * (noise / native)
        out.append(Prepared(noise, sigma, kern[0] if kern else None, kern[1] if kern else 1.0))
    return out


def beam_warnings(beams: Sequence[Beam | None], names: Sequence[str], header: Any) -> list[str]:
    """Inputs restored with another beam than the mosaic's (``--common-beam none``)."""
    mine = Beam.of(header)
    warn = []
    for name, b in zip(names, beams):
        if b is not None and mine is not None and not b.same(mine):
            warn.append(f"{name} is restored with {b.bmaj:.1f}\"x{b.bmin:.1f}\", "
                        f"the mosaic's beam is {mine.bmaj:.1f}\"")
    return warn


def _run_blocks(todo: list[tuple[int, int, int, int]], inputs: Sequence[MosaicInput],
                preps: Sequence[Prepared], header: Any, opts: MosaicOptions,
                isum: np.ndarray, wsum: np.ndarray) -> tuple[int, dict[int, int]]:
    """Compute the blocks (here or in worker processes) and add them into the sums."""
    peaks: dict[int, int] = {}
    pairs = 0

    def add(res: tuple[Any, ...]) -> None:
        nonlocal pairs
        (y0, y1, x0, x1), bi, bw, used, pid, peak = res
        pairs += used
        peaks[pid] = max(peaks.get(pid, 0), peak)
        if bi is not None:
            isum[y0:y1, x0:x1] += bi
            wsum[y0:y1, x0:x1] += bw

    text = header.tostring()
    if opts.workers <= 1:
        _open_inputs(inputs, preps, text, opts)
        for box in todo:
            add(_mosaic_block(box))
        return pairs, peaks
    with ProcessPoolExecutor(max_workers=opts.workers, initializer=_worker_init,
                             initargs=(list(inputs), list(preps), text, opts)) as pool:
        pending: set[Any] = set()
        queue = iter(todo)
        for box in queue:  # keep at most 2 blocks per worker in flight: bounded memory
            pending.add(pool.submit(_mosaic_block, box))
            if len(pending) >= 2 * opts.workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    add(f.result())
        for f in pending:
            add(f.result())
    return pairs, peaks


def history_inputs(head: Any, inputs: Sequence[MosaicInput], preps: Sequence[Prepared],
                   beams: Sequence[Beam | None], target: Beam | None) -> None:
    """One HISTORY line per input and per correction applied to it (what a release records)."""
    if target is not None and any(p.kernel is not None for p in preps):
        head["HISTORY"] = f"common beam {target.bmaj:.2f}\"x{target.bmin:.2f}\" PA {target.bpa:.1f}"
    for inp, prep, beam in zip(inputs, preps, beams):
        src = f" ({inp.scale_from})" if inp.scale_from else ""
        head["HISTORY"] = (f"input {inp.name} noise {prep.noise:.4g} Jy/beam scale {inp.scale:g}{src}: "
                           f"{Path(inp.int_path).name}")
        if prep.kernel is not None and beam is not None:
            head["HISTORY"] = f"  {inp.name} convolved from {beam.bmaj:.2f}\"x{beam.bmin:.2f}\""
        if prep.facet_sigma is not None:
            head["HISTORY"] = (f"  {inp.name} noise per facet {prep.facet_sigma.min():.4g}-"
                               f"{prep.facet_sigma.max():.4g} Jy/beam")
        if inp.corrections.summary():
            head["HISTORY"] = f"  {inp.name} {inp.corrections.summary()}"


def make_mosaic(inputs: Sequence[MosaicInput], header: Any, out_path: str | Path,
                weight_path: str | Path, opts: MosaicOptions = MosaicOptions()) -> MosaicResult:
    """Build the mosaic on ``header``'s grid and write it and its weight map (atomically)."""
    if not inputs:
        raise MosaicError("a mosaic needs at least one input image", "check the neighbours' products")
    if opts.method not in ("bilinear", "exact"):
        raise MosaicError(f"reprojection {opts.method!r} is unknown", "use bilinear or exact")
    phases: list[int] = []

    def phase_peak() -> int:
        """Peak traced memory since the last call (this process)."""
        if not opts.measure_memory:
            return 0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        return peak

    if opts.measure_memory:
        tracemalloc.start()
    beams, target = target_beam(inputs, header, opts.common_beam)
    header = header.copy()
    if target is not None:
        header["BMAJ"], header["BMIN"], header["BPA"] = target.bmaj / 3600.0, target.bmin / 3600.0, target.bpa
    preps = prepare_inputs(inputs, opts.noise_box, beams, target)
    noises = [p.noise for p in preps]
    phases.append(phase_peak())
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    centre = (header["CRPIX1"] - 1.0, header["CRPIX2"] - 1.0)
    radius = shape[1] / 2.0
    all_blocks = list(blocks(shape, opts.block or auto_block(shape[0] * shape[1], opts.workers)))
    todo = [b for b in all_blocks if block_in_circle(b, centre, radius)]
    isum = np.zeros(shape, dtype=np.float32)
    wsum = np.zeros(shape, dtype=np.float32)
    pairs, peaks = _run_blocks(todo, inputs, preps, header, opts, isum, wsum)
    # the workers run while the parent holds the sums: their peaks add to the parent's
    phases.append(phase_peak() + sum(v for pid, v in peaks.items() if pid != os.getpid()))
    head = header.copy()
    head["HISTORY"] = f"hpcddf {__version__} mosaic of {len(inputs)} fields, beamcut {opts.beamcut}, {opts.method}"
    history_inputs(head, inputs, preps, beams, target)
    warnings = beam_warnings(beams, [i.name for i in inputs], header) if target is None else []
    for w in warnings:
        head["HISTORY"] = f"WARNING {w}"
    wh = head.copy()
    wh["BUNIT"] = ""
    wh["HISTORY"] = "weight map: sum over inputs of (primary beam / noise)^2, in beam^2/(Jy/beam)^2"
    write_streamed(Path(weight_path), wh, wsum)
    finish_mosaic(isum, wsum, centre, radius)
    del wsum
    remove_islands(isum, opts.island_size)
    write_streamed(Path(out_path), head, isum)
    peak = None
    if opts.measure_memory:
        phases.append(phase_peak())
        tracemalloc.stop()
        peak = max(phases)
    return MosaicResult(str(out_path), str(weight_path), {i.name: n for i, n in zip(inputs, noises)},
                        len(todo), len(all_blocks), pairs, warnings, peak_bytes=peak,
                        output_bytes=isum.nbytes, peak_phases=dict(zip(("noise", "blocks", "finish"), phases)))
