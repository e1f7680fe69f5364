"""Mosaic maths: combine the final images of neighbouring pointings on one SIN grid.

For each input i (its beam-corrected ``int`` image and apparent ``app`` image, as DDFacet
writes them), in its own pixel grid:

    B_i = median3x3(app_i / int_i), set to 0 where B_i < beamcut      (primary beam)
    W_i = (B_i / sigma_i)^2                                           (inverse variance of int_i)

with sigma_i the clipped rms of the central box of ``app_i`` (or given). Both ``int_i`` and
``W_i`` are reprojected (``reproject``: bilinear, or exact flux-conserving) onto the output grid;
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
from hpcddf.engine.atomic import atomic_path
from hpcddf.errors import HpcddfError
from hpcddf.sky import clipped_rms, image_plane

ARCSEC_DEG = 1.0 / 3600.0
HALF_SIZE_FACTOR = 1.15   # the mosaic reaches 1.15 x half the largest neighbour separation
EDGE_SAMPLES = 16         # points per block edge mapped into an input to find its cutout
CUTOUT_MARGIN = 3         # pixels: bilinear needs 1, the 3x3 median 1 more, 1 spare
ROWS_PER_WRITE = 512
ROWS_PER_STEP = 128       # row chunks of whole-mosaic passes: temporaries stay small
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


PRODUCTS = {
    "full": Product("full", "image_full_ampphase_di_m.NS.int.restored.fits",
                    "image_full_ampphase_di_m.NS.app.restored.fits", 1.5, 6.0, 1000),
    "low": Product("low", "image_full_low.int.restored.fits",
                   "image_full_low.app.restored.fits", 4.5, 20.0, 1500),
}


@dataclass(frozen=True)
class MosaicInput:
    """One field's images; ``noise`` (Jy/beam) is measured when None, ``scale`` multiplies flux."""

    name: str
    int_path: str
    app_path: str
    noise: float | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class MosaicOptions:
    beamcut: float = 0.3
    method: str = "bilinear"       # or "exact"
    block: int = 0                 # output block side in pixels; 0: from the memory budget
    workers: int = 1
    island_size: int = 20
    noise_box: int = 1000
    measure_memory: bool = False   # report the peak traced memory of every process


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
    with np.errstate(invalid="ignore"):
        ra, dec = out_wcs.all_pix2world(xs, ys, 0)
        ix, iy = in_wcs.all_world2pix(ra, dec, 0, quiet=True)
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
class _Opened:
    inp: MosaicInput
    noise: float
    int_data: Any
    app_data: Any
    wcs: Any


_STATE: dict[str, Any] = {}


def _open_inputs(inputs: Sequence[MosaicInput], noises: Sequence[float], header_text: str,
                 opts: MosaicOptions) -> None:
    """Per process: memory-map every input once (a worker's initializer, or the parent's)."""
    from astropy.io import fits
    from astropy.wcs import WCS
    opened = []
    for inp, noise in zip(inputs, noises):
        idata, wcs, _ = image_plane(inp.int_path)
        adata, awcs, _ = image_plane(inp.app_path)
        if idata.shape != adata.shape:
            raise MosaicError(f"{inp.name}: int and app images differ in shape",
                              "use the int/app pair of one DDFacet run")
        opened.append(_Opened(inp, noise, idata, adata, wcs))
    _STATE.update(inputs=opened, out_wcs=WCS(fits.Header.fromstring(header_text)), opts=opts)


def _worker_init(inputs: Sequence[MosaicInput], noises: Sequence[float], header_text: str,
                 opts: MosaicOptions) -> None:
    """A worker process: its own memory count (a forked child inherits the parent's traces);
    modules are imported first, so the count is the data's, not the code's."""
    import reproject  # noqa: F401
    import scipy.ndimage  # noqa: F401
    _open_inputs(inputs, noises, header_text, opts)
    if opts.measure_memory:
        tracemalloc.stop()
        tracemalloc.start()


def _reproject(stack: np.ndarray, wcs_in: Any, wcs_out: Any, shape: tuple[int, int], method: str) -> np.ndarray:
    from reproject import reproject_exact, reproject_interp
    if method == "exact":
        return reproject_exact((stack, wcs_in), wcs_out, shape_out=shape, return_footprint=False)
    return reproject_interp((stack, wcs_in), wcs_out, shape_out=shape, order="bilinear",
                            return_footprint=False)


def _mosaic_block(box: tuple[int, int, int, int]) -> tuple[tuple[int, int, int, int], Any, Any, int, int, int]:
    """Sum of r*w and of w over every input for one output block (None, None if no input has beam here)."""
    y0, y1, x0, x1 = box
    opts: MosaicOptions = _STATE["opts"]
    out_wcs = _STATE["out_wcs"][y0:y1, x0:x1]
    shape = (y1 - y0, x1 - x0)
    isum = wsum = None
    used = 0
    for o in _STATE["inputs"]:
        cut = input_cutout(o.wcs, o.int_data.shape, _STATE["out_wcs"], box)
        if cut is None:
            continue
        int_cut = np.asarray(o.int_data[cut], dtype=np.float32)
        _, weight = beam_and_weight(o.app_data[cut], int_cut, o.noise, opts.beamcut)
        if not weight.any():
            continue
        int_cut[~np.isfinite(int_cut)] = 0.0
        r, w = _reproject(np.stack([int_cut, weight]), o.wcs[cut], out_wcs, shape, opts.method)
        del int_cut, weight
        r = np.nan_to_num(r, nan=0.0).astype(np.float32) * np.float32(o.inp.scale)
        w = np.nan_to_num(w, nan=0.0).astype(np.float32) / np.float32(o.inp.scale ** 2)
        if isum is None:
            isum, wsum = r * w, w
        else:
            isum += r * w
            wsum += w
        used += 1
    peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
    return box, isum, wsum, used, os.getpid(), peak


# ---------------------------------------------------------------- the whole mosaic

def measure_noise(inputs: Sequence[MosaicInput], box: int) -> list[float]:
    out = []
    for inp in inputs:
        if inp.noise is not None:
            if not inp.noise > 0:
                raise MosaicError(f"{inp.name}: noise {inp.noise} must be positive", "give Jy/beam > 0")
            out.append(float(inp.noise))
            continue
        data, _, _ = image_plane(inp.app_path)
        out.append(clipped_rms(data, box))
    return out


def beam_warnings(inputs: Sequence[MosaicInput], header: Any) -> list[str]:
    """Inputs restored with another beam than the mosaic's (ddf-pipeline would convolve them)."""
    warn = []
    for inp in inputs:
        _, _, h = image_plane(inp.int_path)
        bmaj, bmin = h.get("BMAJ"), h.get("BMIN")
        if bmaj is None:
            continue
        if abs(bmaj - header["BMAJ"]) > 1e-5 or abs((bmin or bmaj) - header["BMIN"]) > 1e-5:
            warn.append(f"{inp.name} is restored with {bmaj * 3600:.1f}\"x{(bmin or bmaj) * 3600:.1f}\", "
                        f"the mosaic's beam is {header['BMAJ'] * 3600:.1f}\"")
    return warn


def _run_blocks(todo: list[tuple[int, int, int, int]], inputs: Sequence[MosaicInput],
                noises: Sequence[float], header: Any, opts: MosaicOptions,
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
        _open_inputs(inputs, noises, text, opts)
        for box in todo:
            add(_mosaic_block(box))
        return pairs, peaks
    with ProcessPoolExecutor(max_workers=opts.workers, initializer=_worker_init,
                             initargs=(list(inputs), list(noises), text, opts)) as pool:
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


def _write_streamed(path: Path, header: Any, data: np.ndarray) -> None:
    """Write a 2-D float32 image in row chunks (no full-size big-endian copy), atomically."""
    from astropy.io import fits
    with atomic_path(path) as tmp:
        tmp.unlink()
        out = fits.StreamingHDU(str(tmp), header)
        for y in range(0, data.shape[0], ROWS_PER_WRITE):
            out.write(np.ascontiguousarray(data[y:y + ROWS_PER_WRITE], dtype=">f4"))
        out.close()


def finish_mosaic(isum: np.ndarray, wsum: np.ndarray, centre: tuple[float, float], radius: float) -> None:
    """isum becomes the mosaic in place: isum/wsum, NaN where no weight or outside the circle."""
    cx, cy = centre
    x = np.arange(isum.shape[1], dtype=np.float64)
    for y in range(0, isum.shape[0], ROWS_PER_STEP):
        rows = slice(y, y + ROWS_PER_STEP)
        w = wsum[rows]
        yy = np.arange(y, y + w.shape[0], dtype=np.float64)[:, None]
        outside = (x[None, :] - cx) ** 2 + (yy - cy) ** 2 > radius * radius
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(isum[rows], w, out=isum[rows], where=w > 0)
        isum[rows][(w <= 0) | outside] = np.nan


def remove_islands(data: np.ndarray, size: int) -> int:
    """Blank isolated islands of at most ``size`` finite pixels (4-connected); how many pixels.

    Memory: one int32 label image; each small island is blanked inside its own bounding box
    (an index array over the whole image would be int64, 2x the mosaic)."""
    if size <= 0:
        return 0
    from scipy import ndimage
    labels = np.empty(data.shape, dtype=np.int32)
    n = ndimage.label(np.isfinite(data), output=labels)
    if n == 0:
        return 0
    blanked = 0
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        # a 4-connected island spans at most (pixels) rows + columns - 1: larger boxes are big
        # islands (no np.bincount: it would copy the labels as int64)
        if where is None or (where[0].stop - where[0].start) + (where[1].stop - where[1].start) - 1 > size:
            continue
        island = labels[where] == k
        if island.sum() <= size:
            data[where][island] = np.nan
            blanked += int(island.sum())
    return blanked


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
    noises = measure_noise(inputs, opts.noise_box)
    phases.append(phase_peak())
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    centre = (header["CRPIX1"] - 1.0, header["CRPIX2"] - 1.0)
    radius = shape[1] / 2.0
    all_blocks = list(blocks(shape, opts.block or auto_block(shape[0] * shape[1], opts.workers)))
    todo = [b for b in all_blocks if block_in_circle(b, centre, radius)]
    isum = np.zeros(shape, dtype=np.float32)
    wsum = np.zeros(shape, dtype=np.float32)
    pairs, peaks = _run_blocks(todo, inputs, noises, header, opts, isum, wsum)
    # the workers run while the parent holds the sums: their peaks add to the parent's
    phases.append(phase_peak() + sum(v for pid, v in peaks.items() if pid != os.getpid()))
    head = header.copy()
    head["HISTORY"] = f"hpcddf {__version__} mosaic of {len(inputs)} fields, beamcut {opts.beamcut}, {opts.method}"
    for inp, noise in zip(inputs, noises):
        head["HISTORY"] = f"input {inp.name} noise {noise:.4g} Jy/beam scale {inp.scale:g}: {Path(inp.int_path).name}"
    warnings = beam_warnings(inputs, header)
    for w in warnings:
        head["HISTORY"] = f"WARNING {w}"
    wh = head.copy()
    wh["BUNIT"] = ""
    wh["HISTORY"] = "weight map: sum over inputs of (primary beam / noise)^2, in beam^2/(Jy/beam)^2"
    _write_streamed(Path(weight_path), wh, wsum)
    finish_mosaic(isum, wsum, centre, radius)
    del wsum
    remove_islands(isum, opts.island_size)
    _write_streamed(Path(out_path), head, isum)
    peak = None
    if opts.measure_memory:
        phases.append(phase_peak())
        tracemalloc.stop()
        peak = max(phases)
    return MosaicResult(str(out_path), str(weight_path), {i.name: n for i, n in zip(inputs, noises)},
                        len(todo), len(all_blocks), pairs, warnings, peak_bytes=peak,
                        output_bytes=isum.nbytes, peak_phases=dict(zip(("noise", "blocks", "finish"), phases)))


def write_preview(mosaic_path: str | Path, png_path: str | Path, max_pixels: int = 1500) -> None:
    """A PNG quick look of a mosaic (strided read, percentile stretch), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data, _, header = image_plane(str(mosaic_path))
    step = max(1, math.ceil(max(data.shape) / max_pixels))
    img = np.asarray(data[::step, ::step], dtype=np.float32)
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99.7]) if finite.size else (0.0, 1.0))
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(img, origin="lower", cmap="gray_r", vmin=lo, vmax=hi)
    ax.set_title(str(header.get("OBJECT", Path(mosaic_path).stem)))
    ax.set_xticks([])
    ax.set_yticks([])
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
