"""Synthetic survey fields for the mosaic: a hexagonal tiling of pointings and, per pointing,
the int/app image pair a reduced field leaves behind, with known sources and noise.

Each field is a SIN image centred on its pointing: point sources of known flux restored with a
circular Gaussian beam, multiplied by a Gaussian primary beam, plus noise correlated on the
beam scale (as in a real restored image) of rms ``noise`` in the apparent image:

    app = B * (sky * restoring beam) + noise,    int = app / B

The tests and ``bench/mosaic.py`` build surveys with it; nothing here needs the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcddf.engine.atomic import atomic_path
from hpcddf.mosaic.pointings import Pointing

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class FieldSpec:
    """How every field of the synthetic survey is imaged."""

    cell_arcsec: float
    resolution_arcsec: float
    npix: int                  # image side
    pb_fwhm_deg: float         # Gaussian primary beam
    noise: float = 1e-4        # Jy/beam, apparent image
    bmaj_arcsec: float | None = None  # restoring beam written in the header (default: resolution)
    facets: int = 0            # > 0: the image is cut into facets x facets square DDFacet facets


@dataclass(frozen=True)
class SkySource:
    ra: float
    dec: float
    flux: float  # Jy


def hex_grid(ra0: float, dec0: float, spacing_deg: float, rings: int, prefix: str = "P") -> list[Pointing]:
    """Pointings on a hexagonal grid around (ra0, dec0), ``rings`` deep, centre first, then
    ring by ring (a flat-sky layout: spacing is exact near the centre, as in survey tilings)."""
    cells = [(q, r) for q in range(-rings, rings + 1)
             for r in range(max(-rings, -q - rings), min(rings, -q + rings) + 1)]
    def where(q: int, r: int) -> tuple[float, float]:
        return spacing_deg * (q + r / 2.0), spacing_deg * (math.sqrt(3.0) / 2.0) * r
    cells.sort(key=lambda c: (max(abs(c[0]), abs(c[1]), abs(c[0] + c[1])),
                              math.atan2(where(*c)[1], where(*c)[0])))
    out = []
    for k, (q, r) in enumerate(cells):
        x, y = where(q, r)
        dec = dec0 + y
        ra = (ra0 + x / math.cos(math.radians(dec))) % 360.0
        out.append(Pointing(f"{prefix}{k:03d}", ra, dec))
    return out


def field_wcs(p: Pointing, spec: FieldSpec) -> object:
    from astropy.wcs import WCS
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [p.ra, p.dec]
    w.wcs.crpix = [spec.npix / 2 + 1, spec.npix / 2 + 1]
    w.wcs.cdelt = [-spec.cell_arcsec / 3600.0, spec.cell_arcsec / 3600.0]
    w.wcs.cunit = ["deg", "deg"]
    return w


def _gaussian_noise(shape: tuple[int, int], sigma_pix: float, rms: float, rng: np.random.Generator) -> np.ndarray:
    """White noise smoothed by the restoring beam (FFT), scaled to ``rms``."""
    white = rng.standard_normal(shape).astype(np.float32)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma_pix) ** 2 * (kx ** 2 + ky ** 2)).astype(np.float32)
    smooth = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape).astype(np.float32)
    smooth *= np.float32(rms / smooth.std())
    return smooth


def _add_sources(img: np.ndarray, wcs: object, sources: Sequence[SkySource], sigma_pix: float) -> None:
    """Point sources restored with the beam (peak Jy/beam = flux), each over a small box."""
    half = int(math.ceil(5 * sigma_pix))
    ny, nx = img.shape
    for s in sources:
        x, y = wcs.all_world2pix([[s.ra, s.dec]], 0)[0]  # type: ignore[attr-defined]
        if not (np.isfinite(x) and -half <= x < nx + half and -half <= y < ny + half):
            continue
        x0, x1 = max(0, int(x) - half), min(nx, int(x) + half + 2)
        y0, y1 = max(0, int(y) - half), min(ny, int(y) + half + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += (s.flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma_pix ** 2))
                              ).astype(np.float32)


def primary_beam(p: Pointing, wcs: object, shape: tuple[int, int], fwhm_deg: float) -> np.ndarray:
    """Gaussian primary beam of the pointing on the image grid (true angular distance)."""
    ny, nx = shape
    beam = np.empty(shape, dtype=np.float32)
    sig = math.radians(fwhm_deg * FWHM_TO_SIGMA)
    sd, cd = math.sin(math.radians(p.dec)), math.cos(math.radians(p.dec))
    xs = np.arange(nx)
    for y0 in range(0, ny, 512):  # row chunks keep the temporaries small
        ys = np.arange(y0, min(ny, y0 + 512))
        xx, yy = np.meshgrid(xs, ys)
        ra, dec = wcs.all_pix2world(xx, yy, 0)  # type: ignore[attr-defined]
        ra, dec = np.radians(ra), np.radians(dec)
        cosd = sd * np.sin(dec) + cd * np.cos(dec) * np.cos(ra - math.radians(p.ra))
        d = np.arccos(np.clip(cosd, -1.0, 1.0))
        beam[y0:y0 + len(ys)] = np.exp(-d ** 2 / (2 * sig ** 2))
    return beam


def facet_of_pixel(spec: FieldSpec, x: float, y: float) -> int:
    """The facet (row-major in the facets x facets grid) holding pixel (x, y); -1 outside."""
    side = spec.npix / spec.facets
    i, j = int(math.floor(x / side)), int(math.floor(y / side))
    return j * spec.facets + i if 0 <= i < spec.facets and 0 <= j < spec.facets else -1


def write_facets(outdir: Path, p: Pointing, spec: FieldSpec, root: str,
                 offsets: dict[int, tuple[float, float]]) -> None:
    """The facet products of a field as DDFacet and the offsets step leave them: ``<root>.tessel.reg``
    (square facets, one direction each), ``<root>.facetCoord.txt`` and ``facet-offset.txt``
    (``offsets``: the shift to apply per facet, arcsec east and north)."""
    from hpcddf.engine.atomic import write_text_atomic
    from hpcddf.facets import Facet, write_tessel
    wcs = field_wcs(p, spec)
    side = spec.npix / spec.facets
    facets, labels, coord_lines, shift_lines = [], [], [], []
    for k in range(spec.facets ** 2):
        i, j = k % spec.facets, k // spec.facets
        xs = np.array([i, i + 1, i + 1, i]) * side - 0.5
        ys = np.array([j, j, j + 1, j + 1]) * side - 0.5
        ra, dec = wcs.all_pix2world(xs, ys, 0)  # type: ignore[attr-defined]
        facets.append(Facet(k, k, np.column_stack([ra, dec])))
        cra, cdec = (float(v) for v in wcs.all_pix2world((i + 0.5) * side - 0.5, (j + 0.5) * side - 0.5, 0))  # type: ignore[attr-defined]
        labels.append((cra, cdec))
        coord_lines.append(f"x, y, {math.radians(cra):.6f}, {math.radians(cdec):.6f}")
        east, north = offsets.get(k, (0.0, 0.0))
        shift_lines.append(f"{math.radians(cra):.9f} {math.radians(cdec):.9f} "
                           f"{east / spec.cell_arcsec:.6f} {-north / spec.cell_arcsec:.6f}")
    write_tessel(str(outdir / f"{root}.tessel.reg"), facets, labels)
    write_text_atomic(outdir / f"{root}.facetCoord.txt", "\n".join(coord_lines) + "\n")
    write_text_atomic(outdir / "facet-offset.txt", "\n".join(shift_lines) + "\n")


def displaced(sources: Sequence[SkySource], p: Pointing, spec: FieldSpec,
              offsets: dict[int, tuple[float, float]], flux_scale: float) -> list[SkySource]:
    """The sources as this field sees them: a source in a facet with an offset (the shift that
    corrects it, arcsec east and north) is drawn that far the other way."""
    wcs = field_wcs(p, spec)
    out = []
    for s in sources:
        east, north = 0.0, 0.0
        if offsets:
            x, y = wcs.all_world2pix([[s.ra, s.dec]], 0)[0]  # type: ignore[attr-defined]
            east, north = offsets.get(facet_of_pixel(spec, x, y), (0.0, 0.0))
        dec = s.dec - north / 3600.0
        ra = s.ra - east / 3600.0 / math.cos(math.radians(dec))
        out.append(SkySource(ra, dec, s.flux * flux_scale))
    return out


def write_field(outdir: Path, p: Pointing, spec: FieldSpec, sources: Sequence[SkySource],
                int_name: str, app_name: str, seed: int, flux_scale: float = 1.0,
                offsets: dict[int, tuple[float, float]] | None = None,
                facet_root: str = "image_full_ampphase_di_m.NS") -> tuple[Path, Path]:
    """Write one field's int and app images (DDFacet-like 4-D FITS) into ``outdir``.

    ``flux_scale`` multiplies the sky of this field only (a field with a flux-scale error).
    With ``spec.facets``, also its facet files (``facet_root``); ``offsets`` (facet -> arcsec
    east, north) displaces that facet's sources and is written as the shift that undoes it.
    """
    from astropy.io import fits
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wcs = field_wcs(p, spec)
    shape = (spec.npix, spec.npix)
    sigma_pix = spec.resolution_arcsec * FWHM_TO_SIGMA / spec.cell_arcsec
    sky = np.zeros(shape, dtype=np.float32)
    _add_sources(sky, wcs, displaced(sources, p, spec, offsets or {}, flux_scale), sigma_pix)
    if spec.facets:
        write_facets(outdir, p, spec, facet_root, offsets or {})
    beam = primary_beam(p, wcs, shape, spec.pb_fwhm_deg)
    app = sky * beam + _gaussian_noise(shape, sigma_pix, spec.noise, rng)
    del sky
    header = wcs.to_header()  # type: ignore[attr-defined]
    bmaj = (spec.bmaj_arcsec or spec.resolution_arcsec) / 3600.0
    header["BMAJ"], header["BMIN"], header["BPA"] = bmaj, bmaj, 0.0
    header["BUNIT"] = "JY/BEAM"
    header["OBJECT"] = p.id
    paths = []
    for name, data in ((int_name, app / beam), (app_name, app)):
        path = outdir / name
        with atomic_path(path) as tmp:
            fits.PrimaryHDU(data=data.astype(np.float32)[None, None], header=header).writeto(tmp, overwrite=True)
        paths.append(path)
    return paths[0], paths[1]


def random_sources(pointings: Sequence[Pointing], n: int, radius_deg: float, flux: tuple[float, float],
                   seed: int, min_sep_deg: float = 0.0) -> list[SkySource]:
    """``n`` sources spread over the area within ``radius_deg`` of any pointing."""
    rng = np.random.default_rng(seed)
    out: list[SkySource] = []
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        p = pointings[int(rng.integers(len(pointings)))]
        r = radius_deg * math.sqrt(rng.random())
        t = 2 * math.pi * rng.random()
        dec = p.dec + r * math.sin(t)
        ra = (p.ra + r * math.cos(t) / math.cos(math.radians(dec))) % 360.0
        if any(abs(dec - s.dec) < min_sep_deg and
               abs((ra - s.ra) * math.cos(math.radians(dec))) < min_sep_deg for s in out):
            continue
        out.append(SkySource(ra, dec, float(rng.uniform(*flux))))
    return out
