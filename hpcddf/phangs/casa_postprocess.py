"""The postprocess stages of the PHANGS CASA chain, run INSIDE the separate CASA environment.

``postprocess`` (impbcor, round beam, Jy/beam -> K, trim, FITS export) and ``feather`` (the
same with the round-beam cubes feathered with an imported, regridded single-dish cube before
the conversion to K). A continuum product (one plane) feathers with a one-plane single-dish
image the same way, regridded on the sky only. Standard library only at the top, as everything
:mod:`hpcddf.phangs.casa_tasks` runs.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcddf.phangs.casa_common import (
    ARCSEC_RAD,
    C_M_S,
    K_BOLTZMANN,
    StageError,
    beam_of,
    casa,
    log,
    need,
    ranges_text,
    read_image,
    remove,
)
from hpcddf.phangs.casa_imaging import export_fits

# --------------------------------------------------------------------------- postprocess

def round_beam_arcsec(beam: dict[str, float], forced: float | None) -> float:
    """The round target beam: forced, or the major axis rounded up to the next 0.01"
    after widening it 2 % (imsmooth cannot deconvolve a kernel of zero width)."""
    if forced:
        if forced < beam["bmaj"]:
            raise StageError(f"--round-beam-arcsec {forced} is finer than the beam's major "
                             f"axis {beam['bmaj']:.3f} arcsec")
        return forced
    return math.ceil(beam["bmaj"] * 1.02 * 100.0) / 100.0


def convert_to_kelvin(image: Path) -> list[float]:
    """Jy/beam -> K (Rayleigh-Jeans) in place, channel by channel at each channel's frequency:
    T = S c^2 / (2 k nu^2 Omega_beam), Omega = pi bmaj bmin / (4 ln 2)."""
    return rescale_brightness(image, to_kelvin=True)


def rescale_brightness(image: Path, to_kelvin: bool) -> list[float]:
    """Jy/beam <-> K in place with the image's beam; the K per Jy/beam factor of each channel.
    The inverse direction stages a single-dish cube delivered in K (feather needs Jy/beam)."""
    import numpy as np

    tools, _ = casa()
    beam = beam_of(image)
    omega = math.pi * beam["bmaj"] * beam["bmin"] * ARCSEC_RAD ** 2 / (4.0 * math.log(2.0))
    ia = tools.image()
    ia.open(str(image))
    factors = []
    try:
        csys = ia.coordsys()
        spec = csys.findcoordinate("spectral")
        axis = int(spec["pixel"][0])
        shape = list(ia.shape())
        for chan in range(shape[axis]):
            pix = [0.0] * len(shape)
            pix[axis] = float(chan)
            world = csys.toworld(pix, format="n")["numeric"]
            nu = float(world[axis])
            factor = 1e-26 * C_M_S ** 2 / (2.0 * K_BOLTZMANN * nu ** 2 * omega)
            blc = [0] * len(shape)
            trc = [s - 1 for s in shape]
            blc[axis] = trc[axis] = chan
            plane = ia.getchunk(blc=blc, trc=trc)
            ia.putchunk(np.asarray(plane) * (factor if to_kelvin else 1.0 / factor), blc=blc)
            factors.append(factor)
        ia.setbrightnessunit("K" if to_kelvin else "Jy/beam")
    finally:
        ia.close()
    return factors


def trim_box(pb: Path, cutoff: float, pad: int) -> str:
    """Pixel box around every pixel with pb >= cutoff in any channel, padded by ``pad``."""
    import numpy as np

    data, good = read_image(pb)
    cover = (np.nan_to_num(data) >= cutoff) & good
    cover2d = cover.any(axis=tuple(range(2, cover.ndim)))
    xs, ys = np.nonzero(cover2d)
    if xs.size == 0:
        raise StageError(f"no pixel of {pb} reaches the primary-beam cutoff {cutoff}")
    nx, ny = cover2d.shape
    x0, x1 = max(0, xs.min() - pad), min(nx - 1, xs.max() + pad)
    y0, y1 = max(0, ys.min() - pad), min(ny - 1, ys.max() + pad)
    return f"{x0},{y0},{x1},{y1}"


def stage_postprocess(a: argparse.Namespace) -> dict[str, Any]:
    """impbcor, imsmooth to a round beam, Jy/beam -> K, trim to the pb cutoff, export:
    ``{stem}_pbcorr_trimmed_k.fits`` (the input of the derived products),
    ``{stem}_flat_trimmed_k.fits`` (not pb-corrected: flat noise) and ``{stem}_pb_trimmed.fits``."""
    return postprocess(a, singledish=None)


def stage_feather(a: argparse.Namespace) -> dict[str, Any]:
    """The postprocess of a feather config: as ``postprocess``, with the round-beam cubes
    feathered with the single-dish cube ``--singledish`` before the conversion to K (the
    feathered cube keeps the interferometric round beam), so the products have the same
    names, units and trim and the derived products treat them like any other cube."""
    return postprocess(a, singledish=need(Path(a.singledish).resolve(), "single-dish cube"))


def postprocess(a: argparse.Namespace, singledish: Path | None) -> dict[str, Any]:
    base = str(Path(a.imagename).resolve())
    outdir = Path(a.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    finals = {k: outdir / f"{a.stem}_{k}.fits"
              for k in ("pbcorr_trimmed_k", "flat_trimmed_k", "pb_trimmed")}
    if all(f.exists() for f in finals.values()) and not a.overwrite:
        log(f"{finals['pbcorr_trimmed_k']} exists, skipped (use --overwrite to redo it)")
        return {"fits": {k: str(v) for k, v in finals.items()}, "skipped": True}
    image = need(Path(f"{base}.image"), "the cleaned cube")
    pb = need(Path(f"{base}.pb"), "the primary beam")
    _, tasks = casa()
    work = outdir / f".{a.stem}.post{os.getpid()}"
    remove(work)
    work.mkdir()
    beam = beam_of(image)
    target = round_beam_arcsec(beam, a.round_beam_arcsec)
    # a single-dish cube feather cannot use fails here, before the interferometric steps
    planes = 1 if is_one_plane(image) else 0
    sd = import_singledish(singledish, work, planes) if singledish is not None else None
    tasks.impbcor(imagename=str(image), pbimage=str(pb), outfile=str(work / "pbcor.im"),
                  cutoff=a.pb_cutoff, overwrite=True)
    for name, src in (("pbcorr", work / "pbcor.im"), ("flat", image)):
        tasks.imsmooth(imagename=str(src), kernel="gauss", targetres=True,
                       major=f"{target}arcsec", minor=f"{target}arcsec", pa="0deg",
                       outfile=str(work / f"{name}_round.im"), overwrite=True)
    sources = {"pbcorr_trimmed_k": work / "pbcorr_round.im", "flat_trimmed_k": work / "flat_round.im",
               "pb_trimmed": pb}
    summary: dict[str, Any] = {}
    if sd is not None:
        cubes, summary["singledish"] = feather_with_singledish(
            sd, sources["pbcorr_trimmed_k"], sources["flat_trimmed_k"], pb, work,
            cutoff=a.pb_cutoff, apodize=a.apodize, sdfactor=a.sdfactor)
        sources.update(cubes)
    for key in ("pbcorr_trimmed_k", "flat_trimmed_k"):
        convert_to_kelvin(sources[key])
    box = trim_box(pb, a.pb_cutoff, a.trim_pad)
    for key, src in sources.items():
        trimmed = work / f"{key}.im"
        tasks.imsubimage(imagename=str(src), outfile=str(trimmed), box=box, overwrite=True)
        export_fits(trimmed, finals[key])
    shutil.rmtree(work, ignore_errors=True)
    return {"fits": {k: str(v) for k, v in finals.items()}, "round_beam_arcsec": target,
            "native_beam": beam, "trim_box": box, **summary}


# --------------------------------------------------------------------------- feather

def dropdeg(image: Path, out: Path) -> Path:
    """``image`` without its length-1 axes (Stokes): single-dish cubes come as RA, Dec,
    spectral, and imregrid and the pixel arithmetic below need the same axes on both sides."""
    _, tasks = casa()
    tasks.imsubimage(imagename=str(image), outfile=str(out), dropdeg=True, overwrite=True)
    return out


def image_like(path: Path, template: Path, data: Any) -> Path:
    """A new unmasked image of ``data`` with ``template``'s coordinates, beam and unit (NaN
    marks blanks: exportfits writes them as NaN, as it writes masked pixels)."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(template))
    try:
        csys, beam, unit = ia.coordsys().torecord(), ia.restoringbeam(), ia.brightnessunit()
    finally:
        ia.close()
    out = tools.image()
    out.fromarray(outfile=str(path), pixels=data.astype("float32"), csys=csys, overwrite=True)
    try:
        if "major" in beam:
            out.setrestoringbeam(beam=beam)
        out.setbrightnessunit(unit)
    finally:
        out.close()
    return path


def is_one_plane(image: Path) -> bool:
    """A continuum image (tclean 'mfs'): RA and Dec are its only axes longer than one."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        return sum(1 for n in ia.shape() if n > 1) == 2
    finally:
        ia.close()


def _has_spectral_axis(ia: Any) -> bool:
    return len(ia.coordsys().findcoordinate("spectral")["pixel"]) > 0


def singledish_unit(image: Path, source: Path, planes: int = 0) -> str:
    """Check the imported single-dish image (before its degenerate axes are dropped) has a
    beam, the axes feather needs and a brightness unit it can use: RA, Dec and a spectral axis
    for a cube (``planes`` 0), RA and Dec only for a continuum image (``planes`` 1, any
    spectral or Stokes axis of length one). An image in K is converted to Jy/beam in place at
    each channel's frequency, so a one-plane image in K needs its spectral axis (FREQ) to
    say at which frequency its K are. Returns the unit it came in."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        beam, unit = ia.restoringbeam(), ia.brightnessunit().strip()
        ndim = sum(1 for n in ia.shape() if n > 1)
        spectral = _has_spectral_axis(ia)
    finally:
        ia.close()
    what = "image" if planes == 1 else "cube"
    if "major" not in beam and "beams" not in beam:
        raise StageError(f"single-dish {what} {source} has no beam (BMAJ/BMIN): feather needs it")
    if planes == 0 and ndim != 3:
        raise StageError(f"single-dish cube {source} has {ndim} non-degenerate axes; "
                         "expected RA, Dec and a spectral axis")
    if planes == 1 and ndim != 2:
        raise StageError(f"single-dish image {source} has {ndim} non-degenerate axes; a "
                         "continuum product feathers with one plane (RA, Dec): average the "
                         "single-dish cube over the product's band first")
    key = unit.replace(" ", "").lower()
    if key == "k" and not spectral:
        raise StageError(f"single-dish image {source} is in K without a spectral axis (FREQ) "
                         "to convert it at: give it in Jy/beam or add a FREQ axis")
    if key == "k":
        rescale_brightness(image, to_kelvin=False)
    elif key != "jy/beam":
        raise StageError(f"single-dish {what} {source} has brightness unit "
                         f"{unit or '(none)'!r}; feather needs Jy/beam (or K, converted with "
                         "its beam)")
    return unit


@dataclass(frozen=True)
class SingleDish:
    """An imported single-dish cube: its CASA image (Jy/beam, no degenerate axes), the FITS
    file it came from and the brightness unit it came in."""

    image: Path
    source: Path
    unit_in: str


def import_singledish(sd_fits: Path, work: Path, planes: int = 0) -> SingleDish:
    """``planes``: 0 for a cube, 1 for a continuum image (see :func:`singledish_unit`)."""
    _, tasks = casa()
    raw = work / "sd_import.im"
    tasks.importfits(fitsimage=str(sd_fits), imagename=str(raw), overwrite=True)
    unit = singledish_unit(raw, sd_fits, planes)   # K -> Jy/beam while the FREQ axis is there
    return SingleDish(dropdeg(raw, work / "sd.im"), sd_fits, unit)


def regrid_singledish(sd: SingleDish, template: Path, work: Path
                      ) -> tuple[Path, dict[str, Any]]:
    """The single-dish cube on ``template``'s grid (the interferometric round-beam cube),
    spatially and spectrally (imregrid, linear): feather and the apodisation need both cubes
    pixel for pixel on one grid. Channels the single dish does not cover are an error; pixels
    outside its map are zero (no single-dish information).

    Feather takes the total flux from the single dish on this grid, so the single-dish emission
    outside the interferometric image is lost: the image must hold the galaxy plus about a
    single-dish beam (a 28.6" TP beam spreads a 26" disk over some 80"). Channels are
    interpolated, not averaged: a cube at (or finer than half) the product's channel width
    keeps the line's flux."""
    import numpy as np

    _, tasks = casa()
    regridded = work / "sd_regrid.im"
    tasks.imregrid(imagename=str(sd.image), template=str(template), output=str(regridded),
                   interpolation="linear", overwrite=True)
    data, good = read_image(regridded)
    covered = good & np.isfinite(data)
    # a continuum plane (2-D) has no channels: pixels it misses are zero like any other's
    per_chan = (covered.reshape(-1, covered.shape[-1]).any(axis=0) if covered.ndim == 3
                else np.ones(1, dtype=bool))
    if not per_chan.all():
        missing = [int(i) for i in np.nonzero(~per_chan)[0]]
        raise StageError(f"single-dish cube {sd.source} does not cover channel(s) "
                         f"{ranges_text(missing)} of the interferometric cube (compare their "
                         "velocity ranges)")
    info = {"file": str(sd.source), "unit_in": sd.unit_in,
            **{f"sd_{k}": v for k, v in beam_of(sd.image).items()},
            "uncovered_fraction": round(float(1.0 - covered.mean()), 4)}
    return image_like(work / "sd_on_grid.im", regridded, np.where(covered, data, 0.0)), info


def feather_with_singledish(sd_in: SingleDish, pbcorr: Path, flat: Path, pb: Path,
                            work: Path, *, cutoff: float, apodize: bool, sdfactor: float
                            ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Feathered (pbcorr, flat) round-beam cubes in Jy/beam.

    Plain: feather(pb-corrected interferometric, single dish); the flat cube is that times pb.
    Apodised (PHANGS' option): feather(flat interferometric, single dish x pb), then divide by
    pb, so both inputs taper to the same footprint before the Fourier combination and the edge
    noise of the pb-corrected cube does not enter it. That treats (sky * SD beam) x pb as
    (sky x pb) * SD beam, true only where pb varies slowly across the single-dish beam; with
    ALMA's TP beam about as wide as the 12 m primary beam it is not (on the simulated galaxy
    the apodised cube keeps under half the flux), hence off by default. Blanked
    interferometric pixels (pb below the cutoff) are zero inside feather and blank again after
    it: the feathered cube keeps the interferometric footprint."""
    import numpy as np

    _, tasks = casa()
    hi_pbcorr, hi_flat, pb3 = (dropdeg(img, work / f"{name}_3d.im") for img, name in
                               ((pbcorr, "pbcorr"), (flat, "flat"), (pb, "pb")))
    sd, info = regrid_singledish(sd_in, hi_pbcorr, work)
    pbcorr_data, _ = read_image(hi_pbcorr)
    flat_data, _ = read_image(hi_flat)
    pb_data = np.nan_to_num(read_image(pb3)[0])
    sd_data, _ = read_image(sd)
    valid = np.isfinite(pbcorr_data) & (pb_data >= cutoff)
    if apodize:
        high = np.where(valid & np.isfinite(flat_data), flat_data, 0.0)
        low = sd_data * pb_data
    else:
        high, low = np.where(valid, pbcorr_data, 0.0), sd_data
    high_im = image_like(work / "feather_high.im", hi_pbcorr, high)
    low_im = image_like(work / "feather_low.im", sd, low)
    out = work / "feathered.im"
    tasks.feather(imagename=str(out), highres=str(high_im), lowres=str(low_im), sdfactor=sdfactor,
                  lowpassfiltersd=False)
    feathered, _ = read_image(out)
    # feather writes a degenerate Stokes axis back; the pixels are those of its inputs
    feathered = feathered.reshape(pb_data.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        pbcorr_out = feathered / pb_data if apodize else feathered
        flat_out = feathered if apodize else feathered * pb_data
    # a continuum plane goes back on the full-axis round-beam image: its FREQ axis is what the
    # conversion to K, and the FITS header, take the frequency from
    template = pbcorr if pb_data.ndim == 2 else hi_pbcorr
    shape = read_image(template)[0].shape

    def back(name: str, data: Any) -> Path:
        return image_like(work / name, template,
                          np.where(valid, data, np.nan).reshape(shape))
    cubes = {"pbcorr_trimmed_k": back("pbcorr_feathered.im", pbcorr_out),
             "flat_trimmed_k": back("flat_feathered.im", flat_out)}
    return cubes, {**info, "apodize": apodize, "sdfactor": sdfactor}
