"""What the dynamic spectra leave behind (``hpcddf.lofar.dynspec``), in DynSpecMS's layout so
ddf-pipeline's ``ingest_dynspec`` and users' scripts read them unchanged:

    DynSpecs_<obsid>/TARGET/<obsid>_<RA h:m:s>_<Dec d:m:s>.fits   (4 Stokes, nchan, ntime)
    DynSpecs_<obsid>/OFF/...                                       (the same for off positions)
    DynSpecs_<obsid>/TARGET_W/<same>.W.fits, .W2.fits              (sum of weights, of their
    DynSpecs_<obsid>/OFF_W/...                                      squares; first correlation)
    DynSpecs_<obsid>/Catalog.npy, <obsid>.reg, [DDF.DicoFacet.npy], [<obsid>_TARGET.pdf, ...]
    DynSpecs_<obsid>.tgz                                           (the directory, packed)

Headers: axis 1 Time (s since OBS-STAR, pixel centres), axis 2 Frequency (MHz), axis 3
Stokes (1..4 = I, Q, U, V), plus OBSID, CHAN-WID, FRQ-MIN/MAX (Hz), OBS-STAR/STOP (UTC),
RA_RAD/DEC_RAD, TEL_NAME, NAME, SRC-TYPE, ORIGIN, FACET, TESSEL.

Catalog.npy has FluxI/FluxV (the image pixel at the position) and sigFluxI/sigFluxV (the
normal-scaled median absolute deviation in a 300" box) filled before it is saved; DynSpecMS
saves it before filling them. Without an image the columns are NaN (DynSpecMS puts random
noise in FluxV when there is no V image).
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.lofar.dynspec_ms import Grid
from hpcddf.lofar.dynspec_targets import Direction

ORIGIN = "hpcddf.lofar.dynspec"
BOX_ARCSEC = 300.0
STOKES_I, STOKES_V = 1, 4  # FITS Stokes axis values


@dataclass(frozen=True)
class Meta:
    obsid: str
    telescope: str


def _iso(mjd_s: float) -> str:
    from astropy.time import Time
    return str(Time(mjd_s / 86400.0, format="mjd", scale="utc").isot)


def fits_name(obsid: str, ra: float, dec: float) -> str:
    """``<obsid>_<RA h:m:s>_<Dec d:m:s>.fits`` (RA to 0.01 s, Dec to 0.1")."""
    import astropy.units as u
    from astropy.coordinates import Angle
    ras = Angle(ra, u.rad).wrap_at(360 * u.deg).to_string(unit=u.hourangle, sep=":", precision=2, pad=True)
    decs = Angle(dec, u.rad).to_string(unit=u.deg, sep=":", precision=1, pad=True, alwayssign=True)
    return f"{obsid}_{ras}_{decs}.fits"


def unique_names(obsid: str, dirs: Sequence[Direction]) -> list[str]:
    """One file name per direction; a repeat (a source listed twice) gets a ``-<k>`` suffix."""
    seen: dict[str, int] = {}
    out = []
    for d in dirs:
        name = fits_name(obsid, d.ra, d.dec)
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else name.replace(".fits", f"-{k}.fits"))
    return out


@dataclass(frozen=True)
class Headers:
    """The cards every direction of a period shares, made once: building astropy headers
    card by card costs more than the stacking of a small field."""

    spec: Any  # astropy.io.fits.Header with the Stokes axis
    weight: Any  # the same without it


def headers(grid: Grid, meta: Meta) -> Headers:
    from astropy.io import fits
    h = fits.Header()
    h["CTYPE1"], h["CUNIT1"], h["CRPIX1"] = "Time", "s", 1.0
    h["CRVAL1"], h["CDELT1"] = (grid.dt / 2, "s since OBS-STAR"), grid.dt
    h["CTYPE2"], h["CUNIT2"], h["CRPIX2"] = "Frequency", "MHz", 1.0
    h["CRVAL2"], h["CDELT2"] = grid.f0 / 1e6, grid.df / 1e6
    w = h.copy()
    h["CTYPE3"], h["CRPIX3"], h["CRVAL3"], h["CDELT3"] = "Stokes", 1.0, 1.0, 1.0
    h["BUNIT"] = "Jy"
    cards = {"OBSID": meta.obsid, "CHAN-WID": (grid.df, "Hz"), "FRQ-MIN": (grid.f0, "Hz"),
             "FRQ-MAX": (grid.fmax, "Hz"), "OBS-STAR": (_iso(grid.t0), "UTC"),
             "OBS-STOP": (_iso(grid.t1), "UTC"), "TEL_NAME": meta.telescope, "ORIGIN": ORIGIN}
    for key, value in cards.items():
        h[key] = w[key] = value
    return Headers(h, w)


def _for(h: Any, d: Direction) -> Any:
    """A copy of ``h`` with direction ``d``'s cards."""
    h = h.copy()
    for key, value in {"RA_RAD": d.ra, "DEC_RAD": d.dec, "NAME": d.name, "SRC-TYPE": d.type,
                       "FACET": d.facet, "TESSEL": d.tessel}.items():
        h[key] = value
    return h


def write_direction(outdir: Path, name: str, hdrs: Headers, d: Direction,
                    spec: np.ndarray, w: np.ndarray, w2: np.ndarray) -> None:
    """``<kind>/<name>`` and ``<kind>_W/<name>.W.fits``, ``.W2.fits`` inside ``outdir``."""
    from astropy.io import fits
    (outdir / d.kind).mkdir(exist_ok=True)
    (outdir / f"{d.kind}_W").mkdir(exist_ok=True)
    fits.PrimaryHDU(spec, _for(hdrs.spec, d)).writeto(outdir / d.kind / name)
    stem = name.removesuffix(".fits")
    hw = _for(hdrs.weight, d)
    fits.PrimaryHDU(w, hw).writeto(outdir / f"{d.kind}_W" / f"{stem}.W.fits")
    fits.PrimaryHDU(w2, hw).writeto(outdir / f"{d.kind}_W" / f"{stem}.W2.fits")


# ------------------------------------------------------------------------------ image fluxes


def _plane(data: np.ndarray, hdr: Any, wcs: Any, stokes: int) -> np.ndarray:
    """The 2-D plane of Stokes ``stokes`` (the first plane where there is no such axis value)
    and the first plane of every other non-celestial axis."""
    idx: list[Any] = []
    for ax in range(data.ndim, 0, -1):  # numpy order is the reverse of FITS's
        if ax <= 2:
            idx.append(slice(None))
            continue
        k = 0
        if str(hdr.get(f"CTYPE{ax}", "")).upper().startswith("STOKES"):
            vals = wcs.sub([ax]).pixel_to_world_values(np.arange(data.shape[data.ndim - ax]))
            hits = np.flatnonzero(np.isclose(np.atleast_1d(vals), stokes))
            k = int(hits[0]) if len(hits) else 0
        idx.append(k)
    return np.asarray(data[tuple(idx)], dtype=float)


def image_fluxes(image: Path, dirs: Sequence[Direction], stokes: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixel value at each direction and the MAD (normal-scaled) of its 300" box; NaN
    outside the image."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from scipy.stats import median_abs_deviation
    with fits.open(image) as hdul:
        hdr, data = hdul[0].header, hdul[0].data
        wcs = WCS(hdr)
        plane = _plane(data, hdr, wcs, stokes)
    cel = wcs.celestial
    half = int(np.ceil(BOX_ARCSEC / 2 / (abs(cel.wcs.cdelt[1]) * 3600)))
    x, y = cel.wcs_world2pix(np.degrees([d.ra for d in dirs]), np.degrees([d.dec for d in dirs]), 0)
    flux, sig = np.full(len(dirs), np.nan), np.full(len(dirs), np.nan)
    for i, (xi, yi) in enumerate(zip(np.round(x).astype(int), np.round(y).astype(int))):
        if 0 <= yi < plane.shape[0] and 0 <= xi < plane.shape[1]:
            flux[i] = plane[yi, xi]
            box = plane[max(0, yi - half):yi + half + 1, max(0, xi - half):xi + half + 1]
            sig[i] = median_abs_deviation(box[np.isfinite(box)], scale="normal")
    return flux, sig


def catalogue(dirs: Sequence[Direction], files: Sequence[str], flux_i: tuple[np.ndarray, np.ndarray],
              flux_v: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Catalog.npy's records: Name, FileName, ra, dec (radians), Type, IDTessel, IDFacet,
    FluxI, FluxV, sigFluxI, sigFluxV (text as unicode, so it loads without pickle)."""
    def width(xs: Sequence[str]) -> str:
        return f"U{max([1, *map(len, xs)])}"
    dtype = [("Name", width([d.name for d in dirs])), ("FileName", width(files)), ("ra", "f8"),
             ("dec", "f8"), ("Type", width([d.type for d in dirs])), ("IDTessel", "i8"),
             ("IDFacet", "i8"), ("FluxI", "f8"), ("FluxV", "f8"), ("sigFluxI", "f8"), ("sigFluxV", "f8")]
    rows = [(d.name, f, d.ra, d.dec, d.type, d.tessel, d.facet, flux_i[0][i], flux_v[0][i],
             flux_i[1][i], flux_v[1][i]) for i, (d, f) in enumerate(zip(dirs, files))]
    return np.array(rows, dtype=dtype)


def region_text(dirs: Sequence[Direction]) -> str:
    """A ds9 region of the directions: targets green, off positions red."""
    lines = ["# Region file format: DS9 version 4.1", "fk5"]
    for d in dirs:
        colour = "green" if d.kind == "TARGET" else "red"
        lines.append(f'circle({np.degrees(d.ra):.6f},{np.degrees(d.dec):.6f},10") '
                     f"# color={colour} text={{{d.name}}}")
    return "\n".join(lines) + "\n"


def write_tarball(src: Path, tgz: Path, arcname: str) -> None:
    """Pack ``src`` as ``arcname`` into ``tgz`` (the caller gives a temporary name)."""
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src, arcname=arcname)


def plot_pdf(path: Path, grid: Grid, items: Sequence[tuple[Direction, np.ndarray]]) -> None:
    """One page per direction: its Stokes I and V dynamic spectra (time x frequency)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages
    extent = (0.0, grid.ntime * grid.dt / 60, grid.f0 / 1e6, grid.fmax / 1e6)
    with PdfPages(path) as pdf:
        for d, spec in items:
            fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
            for ax, k, label in zip(axes, (0, 3), ("I", "V")):
                im = ax.imshow(spec[k], origin="lower", aspect="auto", extent=extent, cmap="viridis")
                ax.set_ylabel("MHz")
                ax.set_title(f"{d.name} ({d.type}) Stokes {label}")
                fig.colorbar(im, ax=ax, label="Jy")
            axes[1].set_xlabel("minutes since OBS-STAR")
            pdf.savefig(fig)
            plt.close(fig)
