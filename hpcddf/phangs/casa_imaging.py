"""The imaging stages of the PHANGS CASA chain, run INSIDE the separate CASA environment.

``dirty``, ``clean_mask``, ``multiscale``, ``singlescale`` and ``export_image``: tclean of a
cube (or one plane when the recipe says specmode 'mfs') with PHANGS's defaults, recipe and
dynamic sizing, the clean loop to convergence, and snapshots of the working images after each
step (``BASE_dirty.*``, ...) that the next step restarts from. Standard library only at the
top, as everything :mod:`hpcddf.phangs.casa_tasks` runs.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcddf.phangs.casa_cleanmask import aligned_clean_mask
from hpcddf.phangs.casa_common import (
    ARCSEC_RAD,
    C_M_S,
    StageError,
    beam_of,
    casa,
    chauvenet_mad_noise,
    log,
    lsrk_channels,
    model_flux,
    need,
    parse_json_dict,
    publish,
    read_image,
    remove,
    skip_existing,
    tmp_name,
    write_mask_image,
)

SNAPSHOT_EXTS = ("residual", "model", "image")  # image last: it marks the snapshot complete
TCLEAN_PRODUCTS = ("image", "model", "residual", "psf", "pb", "sumwt", "mask", "weight", "gridwt",
                   "image.pbcor", "workdirectory")

# tclean settings of the PHANGS cube imaging that a recipe may override (casa-here.md §3).
TCLEAN_DEFAULTS: dict[str, Any] = {
    "specmode": "cube", "outframe": "LSRK", "veltype": "radio", "gridder": "mosaic",
    "weighting": "briggs", "robust": 0.5, "perchanweightdensity": True, "pblimit": 0.2,
    "restoringbeam": "common", "datacolumn": "data", "interactive": False, "parallel": False}
# Set by the stages themselves; a recipe that sets them is overridden.
TCLEAN_OWNED = ("vis", "imagename", "niter", "threshold", "mask", "usemask", "deconvolver",
                "calcres", "calcpsf", "restart", "interactive", "parallel")


# --------------------------------------------------------------------------- imaging

def tclean_params(a: argparse.Namespace, vis: Sequence[Path]) -> dict[str, Any]:
    """PHANGS defaults, then the recipe (``--tclean`` JSON), then what the stage owns."""
    params = {**TCLEAN_DEFAULTS, **parse_json_dict(a.tclean, "--tclean")}
    for key in TCLEAN_OWNED:
        params.pop(key, None)
    # a continuum image (specmode 'mfs', one plane) has no line: it is sized for the highest
    # frequency of its data, where the beam is finest
    sizing_ghz = a.restfreq_ghz
    if params.get("specmode") == "mfs":
        sizing_ghz = None
    elif a.restfreq_ghz is None:
        raise StageError(f"a cube (specmode {params.get('specmode')!r}) needs --restfreq-ghz; "
                         "a continuum image sets specmode 'mfs' in --tclean")
    if a.restfreq_ghz is not None:
        params["restfreq"] = f"{a.restfreq_ghz}GHz"
    if not params.get("imsize") or not params.get("cell") or not params.get("phasecenter"):
        sizing_ghz = sizing_ghz or highest_frequency_ghz(vis)
        params.update({k: v for k, v in pick_cell_and_imsize(vis, sizing_ghz).items()
                       if not params.get(k)})
    params["vis"] = [str(v) for v in vis]
    params["imagename"] = str(Path(a.imagename).resolve())
    if getattr(a, "chunk", None):
        params.update(chunk_channels(a.chunk, vis))
    return params


def chunk_range(index: int, count: int, nchan: int) -> tuple[int, int]:
    """(first channel, number of channels) of chunk ``index`` of ``count`` over ``nchan``
    channels: near-equal contiguous ranges, the larger ones last, covering every channel once.
    Decided here from the MS's channels rather than at planning time, so a staged MS with fewer
    channels than the nominal window (the inputs cover less of it) is still split whole."""
    if not 0 <= index < count:
        raise StageError(f"chunk {index} of {count} does not exist")
    if count > nchan:
        raise StageError(f"{count} chunks of a cube of {nchan} channels: some would be empty; "
                         "plan fewer chunks (a larger chunksize)")
    first = index * nchan // count
    return first, (index + 1) * nchan // count - first


def chunk_channels(chunk: str, vis: Sequence[Path]) -> dict[str, Any]:
    """tclean's start and nchan for ``--chunk K,N`` (chunk K of N): the channels of the staged
    MS (one spectral window after extract_line), imaged as that slice of the whole cube's grid."""
    try:
        index, count = (int(x) for x in chunk.split(","))
    except ValueError:
        raise StageError(f"--chunk {chunk!r} is not K,N (chunk K of N)") from None
    nchan = {len(freqs) for v in vis for freqs, _ in lsrk_channels(v).values()}
    if len(nchan) != 1:
        raise StageError(f"chunked imaging needs one spectral window of one width, got "
                         f"channel counts {sorted(nchan)}")
    first, n = chunk_range(index, count, nchan.pop())
    return {"start": first, "nchan": n, "width": 1}


def enter_chunk_dir(a: argparse.Namespace) -> None:
    """A chunk runs in its own directory (its image's): CASA writes temporary products to the
    working directory, and chunks running side by side must not share them (PHANGS PR #246)."""
    if not getattr(a, "chunk", None):
        return
    for name in ("imagename", "mask", "within_mask"):  # paths given relative to the caller's
        if getattr(a, name, None):
            setattr(a, name, str(Path(getattr(a, name)).resolve()))
    a.vis = [str(Path(v).resolve()) for v in a.vis]
    d = Path(a.imagename).parent
    d.mkdir(parents=True, exist_ok=True)
    os.chdir(d)


def good_imsize(n: int) -> int:
    """The smallest size >= n whose prime factors are 2, 3, 5 (fast FFTs, as CASA advises)."""
    m = max(n, 8)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1 and m % 2 == 0:
            return m
        m += 1


def highest_frequency_ghz(vis: Sequence[Path]) -> float:
    """The highest LSRK channel frequency of the inputs (GHz)."""
    return max(max(freqs) for v in vis for freqs, _ in lsrk_channels(v).values()) / 1e9


def pick_cell_and_imsize(vis: Sequence[Path], restfreq_ghz: float) -> dict[str, Any]:
    """Dynamic sizing when the recipe leaves it open: five pixels across the beam (lambda over
    the 95th-percentile baseline) and a field covering every pointing plus the primary beam
    to its 20 % level, centred on the mean pointing direction."""
    import numpy as np

    tools, _ = casa()
    lam = C_M_S / (restfreq_ghz * 1e9)
    uvdist, dirs, diam = [], [], 12.0
    for v in vis:
        tb = tools.table()
        tb.open(str(v))
        try:
            uvw = tb.getcol("UVW")
        finally:
            tb.close()
        uvdist.append(np.hypot(uvw[0], uvw[1]))
        md = tools.msmetadata()
        md.open(str(v))
        try:
            diam = max(float(md.antennadiameter(0)["value"]), 1.0)
            for f in range(md.nfields()):
                d = md.phasecenter(f)
                dirs.append((d["m0"]["value"], d["m1"]["value"]))
        finally:
            md.close()
    bmax = float(np.percentile(np.concatenate(uvdist), 95))
    cell = lam / bmax / 5.0 / ARCSEC_RAD
    cell = float(f"{cell:.2g}")
    ra = np.unwrap(np.array([d[0] for d in dirs]))
    dec = np.array([d[1] for d in dirs])
    ra0, dec0 = float(np.mean(ra)), float(np.mean(dec))
    extent = max(np.max(np.abs((ra - ra0) * math.cos(dec0))), np.max(np.abs(dec - dec0)))
    pb_fwhm = 1.13 * lam / diam
    half_width = extent + 1.1 * pb_fwhm  # PB(r) of a Gaussian falls to ~0.1 at 1.1 FWHM
    imsize = good_imsize(math.ceil(2 * half_width / (cell * ARCSEC_RAD)))
    qa = tools.quanta()
    center = (f"J2000 {qa.formxxx(f'{ra0 % (2 * math.pi)}rad', format='hms', prec=4)} "
              f"{qa.formxxx(f'{dec0}rad', format='dms', prec=3)}")
    return {"cell": f"{cell}arcsec", "imsize": [imsize, imsize], "phasecenter": center}


def snapshot(base: str, stage: str) -> None:
    for ext in SNAPSHOT_EXTS:
        final = Path(f"{base}_{stage}.{ext}")
        tmp = tmp_name(final)
        remove(tmp)
        shutil.copytree(f"{base}.{ext}", tmp)
        publish(tmp, final)


def restore(base: str, stage: str) -> None:
    """Put the working images back to the end of ``stage`` (a killed later step is undone)."""
    for ext in SNAPSHOT_EXTS:
        need(Path(f"{base}_{stage}.{ext}"), f"the {stage} image")
    for ext in (*SNAPSHOT_EXTS, "mask"):
        remove(Path(f"{base}.{ext}"))
    for ext in SNAPSHOT_EXTS:
        shutil.copytree(f"{base}_{stage}.{ext}", f"{base}.{ext}")


IMAGING_STEPS = ("dirty", "cleanmask", "multiscale", "singlescale")
EXPORTED = ("", "_pb", "_residual", "_model")


def invalidate_after(base: str, step: str) -> None:
    """Remove what later imaging steps made from the previous result of ``step``: a redone
    dirty cube must not be followed by a stale clean mask or a skipped, stale clean."""
    later = IMAGING_STEPS[IMAGING_STEPS.index(step) + 1:]
    for name in later:
        if name == "cleanmask":
            remove(Path(f"{base}_cleanmask.im"))
            continue
        for ext in SNAPSHOT_EXTS:
            remove(Path(f"{base}_{name}.{ext}"))
    remove(Path(f"{base}_singlescale_mask.im"))
    for suffix in EXPORTED:
        remove(Path(f"{base}{suffix}.fits"))


def residual_noise(base: str, stage: str) -> float:
    """Noise of a snapshot's residual; tclean's flat-noise normalisation makes it uniform."""
    data, _ = read_image(Path(f"{base}_{stage}.residual"))
    return chauvenet_mad_noise(data)


MAX_NOISE_SAMPLES = 8_000_000


def whole_cube_noise(bases: Sequence[str], load: Any) -> float:
    """The noise of a chunked cube as the single call measures it over its whole cube: the
    same estimate over the voxels of every chunk (``load(base)`` gives a chunk's pixels).

    A chunk's own estimate is not that: a chunk of bright channels holds little but emission
    and its sidelobes, its estimate is twice the cube's and it would clean far less (measured
    on the simulated galaxy). Chunks of a large cube are subsampled to MAX_NOISE_SAMPLES
    values in all, the estimate's own subsample size, so memory stays that of one chunk."""
    import numpy as np

    parts = []
    for b in bases:
        x = np.asarray(load(b), dtype=float).ravel()
        x = x[np.isfinite(x)]
        step = max(1, x.size * len(bases) // MAX_NOISE_SAMPLES)
        parts.append(x[::step])
    return chauvenet_mad_noise(np.concatenate(parts))


def dirty_residual(base: str) -> Any:
    return read_image(Path(f"{base}_dirty.residual"))[0]


def multiscale_residual(base: str) -> Any:
    return read_image(Path(f"{base}_multiscale.residual"))[0]


def smoothed_image(image: Path, smooth_pix: float) -> Any:
    """A cube, each channel Gaussian-smoothed by ``smooth_pix`` (blank: NaN)."""
    import numpy as np
    from scipy import ndimage

    data, good = read_image(image)
    smooth = ndimage.gaussian_filter(np.where(good, data, 0.0),
                                     sigma=(smooth_pix, smooth_pix, 0, 0))
    smooth[~good] = np.nan
    return smooth


def stage_dirty(a: argparse.Namespace) -> dict[str, Any]:
    enter_chunk_dir(a)
    base = str(Path(a.imagename).resolve())
    if skip_existing(Path(f"{base}_dirty.image"), a.overwrite):
        return {"imagename": base, "skipped": True}
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    params = tclean_params(a, vis)
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    # tclean's own products of an earlier attempt (only its extensions: the staged MS may be
    # called <base>.ms, and PHANGS names the cube like the MS it images)
    for ext in TCLEAN_PRODUCTS:
        remove(Path(f"{base}.{ext}"))
    invalidate_after(base, "dirty")
    _, tasks = casa()
    tasks.tclean(**params, niter=0, deconvolver="hogbom", calcres=True, calcpsf=True,
                 restart=True)
    snapshot(base, "dirty")
    sigma = residual_noise(base, "dirty")
    return {"imagename": base, "noise_jy_beam": sigma, **beam_of(Path(f"{base}.image")),
            **{k: params[k] for k in ("cell", "imsize", "phasecenter")}}


def stage_clean_mask(a: argparse.Namespace) -> dict[str, Any]:
    """A clean mask for the dirty cube: the cleanmask_key's FITS mask (``--from-fits``) put on
    the cube's grid, or else one made from the dirty cube (:func:`snr_clean_mask`).

    Never named ``<imagename>.mask``: tclean refuses a user mask of its own mask's name."""
    base = str(Path(a.imagename).resolve())
    out = Path(a.mask).resolve() if a.mask else Path(f"{base}_cleanmask.im")
    if out == Path(f"{base}.mask"):
        raise StageError(f"the clean mask cannot be named {out} (tclean's own mask)")
    if skip_existing(out, a.overwrite):
        return {"mask": str(out), "skipped": True}
    dirty = need(Path(f"{base}_dirty.image"), "dirty cube")
    _, good = read_image(dirty)
    summary: dict[str, Any] = {"mask": str(out)}
    if a.from_fits:
        source = need(Path(a.from_fits).resolve(), "clean mask FITS file")
        mask = aligned_clean_mask(source, dirty)
        summary["from_fits"] = str(source)
    else:
        mask, summary["smoothed_noise"] = snr_clean_mask(dirty, a.smooth_pix, a.snr, a.grow,
                                                             a.noise_from)
    mask &= good
    if out == Path(f"{base}_cleanmask.im"):
        invalidate_after(base, "cleanmask")
    write_mask_image(out, dirty, mask)
    return {**summary, "mask_voxels": int(mask.sum())}


def snr_clean_mask(dirty: Path, smooth_pix: float, snr: float, grow: int,
                   noise_from: Sequence[str] = ()) -> tuple[Any, float]:
    """(mask, smoothed noise) from the dirty cube: Gaussian-smooth each channel by
    ``smooth_pix``, keep S/N > ``snr`` of the smoothed cube, dilate ``grow`` times in x, y, v.
    A chunk (``noise_from``: every chunk's image base) takes the noise of the whole cube's
    smoothed dirty cube (:func:`whole_cube_noise`)."""
    import numpy as np
    from scipy import ndimage

    smooth = smoothed_image(dirty, smooth_pix)
    sigma = (whole_cube_noise(noise_from,
                              lambda b: smoothed_image(Path(f"{b}_dirty.image"), smooth_pix))
             if noise_from else chauvenet_mad_noise(smooth))
    mask = np.nan_to_num(smooth) > snr * sigma
    if grow > 0:
        mask = ndimage.binary_dilation(mask, iterations=grow,
                                       structure=ndimage.generate_binary_structure(4, 1))
    return mask, sigma


def clean_until_converged(params: dict[str, Any], *, deconvolver: str, mask: Path,
                          threshold_jy: float, niter_start: int, niter_growth: float,
                          max_loops: int, fracflux: float, extra: dict[str, Any]
                          ) -> list[dict[str, Any]]:
    """PHANGS's clean loop: repeated tclean calls, each continuing from the last model with a
    larger niter, until the model flux changes by less than ``fracflux`` between calls, tclean
    stops for another reason than its niter (threshold, empty mask, ...), or ``max_loops``
    calls are done. For cubes, CASA 6.7 applies niter to each channel (iterdone is the sum)."""
    _, tasks = casa()
    base = params["imagename"]
    history = []
    flux_before = model_flux(base)
    niter = niter_start
    for loop in range(max_loops):
        # The first call copies the user mask to BASE.mask; later calls must reuse that one
        # (tclean refuses a user mask while BASE.mask exists).
        rec = tasks.tclean(**params, **extra, deconvolver=deconvolver, niter=niter,
                           threshold=f"{threshold_jy}Jy", usemask="user",
                           mask=str(mask) if loop == 0 else "",
                           calcres=False, calcpsf=False, restart=True) or {}
        flux = model_flux(base)
        done = int(rec.get("iterdone", niter))
        # stopcode 1: niter used up, so more iterations could still clean; any other code
        # (threshold, zero mask, divergence, ...) means another call would not help.
        stopcode = int(rec.get("stopcode", 1 if done >= niter else 2))
        change = abs(flux - flux_before) / abs(flux) if flux else math.inf
        history.append({"loop": loop, "niter": niter, "iterdone": done, "model_flux": flux,
                        "fractional_change": change, "stopcode": stopcode})
        log(f"{deconvolver} loop {loop}: niter {niter}, done {done}, model flux {flux:.4g}, "
            f"change {change:.3g}")
        if stopcode != 1 or change < fracflux:
            break
        flux_before = flux
        niter = math.ceil(niter * niter_growth)
    return history


def stage_multiscale(a: argparse.Namespace) -> dict[str, Any]:
    """Multiscale clean inside the clean mask down to ``--threshold-snr`` x the dirty noise."""
    enter_chunk_dir(a)
    base = str(Path(a.imagename).resolve())
    if skip_existing(Path(f"{base}_multiscale.image"), a.overwrite):
        return {"imagename": base, "skipped": True}
    mask = need(Path(a.mask).resolve() if a.mask else Path(f"{base}_cleanmask.im"), "clean mask")
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    params = tclean_params(a, vis)
    invalidate_after(base, "multiscale")
    restore(base, "dirty")
    # a chunk cleans to the threshold of the whole cube (see whole_cube_noise)
    sigma = (whole_cube_noise(a.noise_from, dirty_residual) if a.noise_from
             else residual_noise(base, "dirty"))
    scales = multiscale_scales(a, params)
    extra = {"scales": scales, "smallscalebias": params.pop("smallscalebias", 0.6),
             "cyclefactor": params.pop("cyclefactor", 1.5)}
    history = clean_until_converged(
        params, deconvolver="multiscale", mask=mask, threshold_jy=a.threshold_snr * sigma,
        niter_start=a.niter_start, niter_growth=a.niter_growth, max_loops=a.max_loops,
        fracflux=a.convergence_fracflux, extra=extra)
    snapshot(base, "multiscale")
    return {"imagename": base, "noise_jy_beam": sigma, "loops": history}


def multiscale_scales(a: argparse.Namespace, params: dict[str, Any]) -> list[int]:
    """Scales in pixels: ``--scales-pix``, else ``--scales-arcsec`` (an interf_config's
    clean_scales_arcsec) over the cell, else the recipe's, else casa-here.md's 0, 5, 10, 20."""
    recipe = params.pop("scales", None)
    if a.scales_pix:
        return [int(s) for s in a.scales_pix.split(",")]
    if a.scales_arcsec:
        tools, _ = casa()
        cell = float(tools.quanta().convert(params["cell"], "arcsec")["value"])
        return sorted({round(float(s) / cell) for s in a.scales_arcsec.split(",")})
    return [int(s) for s in recipe] if recipe else [0, 5, 10, 20]


def singlescale_mask(base: str, hi_snr: float, lo_snr: float, within: Path | None,
                     sigma: float | None = None) -> Any:
    """Bright emission of the multiscale result: S/N > hi seeds grown through S/N > lo (both
    in two consecutive channels of a cube; a continuum image has one plane, where the S/N
    alone decides), optionally inside the prior clean mask."""
    import numpy as np
    from scipy import ndimage

    sigma = sigma or residual_noise(base, "multiscale")
    image, good = read_image(Path(f"{base}_multiscale.image"))
    snr = np.nan_to_num(image) / sigma
    run = np.zeros((1, 1, 1, 2), dtype=bool)
    run[..., :] = True

    def in_two_channels(m: Any) -> Any:
        return ndimage.binary_opening(m, structure=run) if m.shape[3] > 1 else m
    hi = in_two_channels(snr > hi_snr)
    lo = in_two_channels(snr > lo_snr)
    mask = ndimage.binary_propagation(hi, mask=lo) & good
    if within is not None:
        prior, _ = read_image(within)
        mask &= np.nan_to_num(prior) > 0.5
    return mask


def stage_singlescale(a: argparse.Namespace) -> dict[str, Any]:
    """Single-scale (Hogbom) clean inside the S/N mask down to ``--threshold-snr`` x noise."""
    enter_chunk_dir(a)
    base = str(Path(a.imagename).resolve())
    if skip_existing(Path(f"{base}_singlescale.image"), a.overwrite):
        return {"imagename": base, "skipped": True}
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    params = tclean_params(a, vis)
    for key in ("scales", "smallscalebias"):
        params.pop(key, None)
    invalidate_after(base, "singlescale")
    restore(base, "multiscale")
    within = Path(a.within_mask).resolve() if a.within_mask else None
    # a chunk: the noise of the whole cube's multiscale residual (see whole_cube_noise)
    sigma = (whole_cube_noise(a.noise_from, multiscale_residual) if a.noise_from
             else residual_noise(base, "multiscale"))
    mask = singlescale_mask(base, a.hi_snr, a.lo_snr, within, sigma)
    mask_path = write_mask_image(Path(f"{base}_singlescale_mask.im"),
                                 Path(f"{base}_multiscale.image"), mask)
    history: list[dict[str, Any]] = []
    if mask.any():
        history = clean_until_converged(
            params, deconvolver="hogbom", mask=mask_path, threshold_jy=a.threshold_snr * sigma,
            niter_start=a.niter_start, niter_growth=a.niter_growth, max_loops=a.max_loops,
            fracflux=a.convergence_fracflux, extra={})
    else:
        log("the single-scale mask is empty; the multiscale result stands")
    snapshot(base, "singlescale")
    return {"imagename": base, "noise_jy_beam": sigma, "mask_voxels": int(mask.sum()),
            "loops": history}


def single_plane_frequency_hz(image: Path) -> float | None:
    """The frequency of an image with one spectral plane (a continuum image), else None."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        csys = ia.coordsys()
        spec = csys.findcoordinate("spectral")
        if not spec["return"]:
            return None
        axis = int(spec["pixel"][0])
        if ia.shape()[axis] != 1:
            return None
        return float(csys.toworld([0.0] * len(ia.shape()), format="n")["numeric"][axis])
    finally:
        ia.close()


def export_fits(image: Path, fits: Path) -> Path:
    """exportfits with velocity axes and degenerate axes dropped, atomically.

    Dropping the degenerate axes drops a continuum image's one-plane spectral axis, and with
    it the frequency its Kelvin scale (and any spectral index) refers to: it is kept as the
    header card FREQ (Hz), written from the image's miscinfo."""
    freq = single_plane_frequency_hz(image)
    if freq is not None:
        tools, _ = casa()
        ia = tools.image()
        ia.open(str(image))
        try:
            ia.setmiscinfo({**ia.miscinfo(), "FREQ": freq})
        finally:
            ia.close()
    _, tasks = casa()
    tmp = fits.with_name(f".tmp{os.getpid()}.{fits.name}")
    remove(tmp)
    tasks.exportfits(imagename=str(image), fitsimage=str(tmp), velocity=True, dropdeg=True,
                     dropstokes=True, overwrite=True)
    return publish(tmp, fits)


def stage_export_image(a: argparse.Namespace) -> dict[str, Any]:
    """The imaging products as FITS: BASE.fits (image), BASE_pb/_residual/_model.fits."""
    base = str(Path(a.imagename).resolve())
    written = []
    for ext, suffix in (("pb", "_pb"), ("residual", "_residual"), ("model", "_model"),
                        ("image", "")):
        src = need(Path(f"{base}.{ext}"), f"the {ext} image")
        final = Path(f"{base}{suffix}.fits")
        if not skip_existing(final, a.overwrite):
            export_fits(src, final)
        written.append(str(final))
    return {"fits": written}
