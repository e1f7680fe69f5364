"""How well a reduced image matches a known sky: source finding, cross-match, dynamic range.

Used by ``hpcddf demo`` to end with a verdict, and by the end-to-end tests to hold the
reduction to numbers: every true source above the detection limit found, nothing spurious,
positions within a fraction of the restoring beam, fluxes within a fraction of the truth.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcddf.lofar.simulate import Source


@dataclass(frozen=True)
class Match:
    true: Source
    ra_deg: float
    dec_deg: float
    flux_jy: float
    offset_arcsec: float

    @property
    def flux_ratio(self) -> float:
        return self.flux_jy / self.true.flux_jy


@dataclass
class SkyCheck:
    """The verdict on one image."""

    image: str
    beam_fwhm_arcsec: float
    rms_jy: float
    peak_jy: float
    matches: list[Match] = field(default_factory=list)
    missed: list[Source] = field(default_factory=list)
    spurious: list[tuple[float, float, float]] = field(default_factory=list)  # ra, dec, flux

    @property
    def dynamic_range(self) -> float:
        return self.peak_jy / self.rms_jy if self.rms_jy > 0 else math.inf

    def worst_offset_beams(self) -> float:
        return max((m.offset_arcsec / self.beam_fwhm_arcsec for m in self.matches), default=0.0)

    def worst_flux_error(self) -> float:
        return max((abs(m.flux_ratio - 1) for m in self.matches), default=0.0)

    def ok(self, max_offset_beams: float = 0.1, max_flux_error: float = 0.1) -> bool:
        return (not self.missed and not self.spurious
                and self.worst_offset_beams() <= max_offset_beams
                and self.worst_flux_error() <= max_flux_error)

    def text(self) -> str:
        lines = [f"image {self.image}",
                 f"  restoring beam {self.beam_fwhm_arcsec:.1f}\"  peak {self.peak_jy:.3f} Jy/beam  "
                 f"off-source rms {self.rms_jy * 1e3:.2f} mJy/beam  dynamic range {self.dynamic_range:.0f}"]
        for m in self.matches:
            lines.append(f"  {m.true.name:<6} true {m.true.flux_jy:6.3f} Jy  found {m.flux_jy:6.3f} Jy "
                         f"({(m.flux_ratio - 1) * 100:+5.1f} %)  offset {m.offset_arcsec:5.1f}\" "
                         f"({m.offset_arcsec / self.beam_fwhm_arcsec:.3f} beam)")
        lines += [f"  {s.name:<6} true {s.flux_jy:6.3f} Jy  NOT FOUND" for s in self.missed]
        lines += [f"  spurious source at ra {ra:.4f} dec {dec:.4f}: {f:.3f} Jy" for ra, dec, f in self.spurious]
        return "\n".join(lines)


def beam_fwhm_arcsec(header: object) -> float:
    """The geometric-mean FWHM of the restoring beam from BMAJ/BMIN (degrees)."""
    return math.sqrt(float(header["BMAJ"]) * float(header["BMIN"])) * 3600.0  # type: ignore[index]


def off_source_rms(image: np.ndarray, header: object, sources: Sequence[Source],
                   radius_beams: float = 5.0) -> float:
    """Robust rms (1.4826 x MAD) of the image away from every true source."""
    from astropy.wcs import WCS
    wcs = WCS(header).celestial
    data = np.squeeze(image)
    ny, nx = data.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    keep = np.isfinite(data)
    pix_deg = abs(float(header["CDELT1"]))  # type: ignore[index]
    r_pix = radius_beams * beam_fwhm_arcsec(header) / 3600.0 / pix_deg
    for s in sources:
        x, y = wcs.all_world2pix(s.ra_deg, s.dec_deg, 0)
        keep &= (xx - x) ** 2 + (yy - y) ** 2 > r_pix ** 2
    vals = data[keep]
    return float(1.4826 * np.median(np.abs(vals - np.median(vals))))


def find_sources(image: str, thresh_isl: float = 5.0, thresh_pix: float = 7.0) -> list[tuple[float, float, float]]:
    """PyBDSF on the image: (ra_deg, dec_deg, total_flux_jy) per source."""
    import bdsf
    from astropy.table import Table
    with tempfile.TemporaryDirectory(prefix="hpcddf-skycheck-") as tmp:
        out = os.path.join(tmp, "srl.fits")
        img = bdsf.process_image(image, thresh_isl=thresh_isl, thresh_pix=thresh_pix,
                                 rms_box=(60, 20), adaptive_rms_box=True, quiet=True,
                                 output_opts=False)
        img.write_catalog(outfile=out, format="fits", catalog_type="srl", clobber=True)
        if not Path(out).exists():
            return []
        cat = Table.read(out)
    return [(float(r["RA"]), float(r["DEC"]), float(r["Total_flux"])) for r in cat]


def _sep_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(min(1.0, max(-1.0, c)))) * 3600.0


def check_image(image: str, sky: Sequence[Source], min_snr: float = 10.0,
                match_beams: float = 1.0) -> SkyCheck:
    """Cross-match PyBDSF's sources with the true sky.

    A true source brighter than ``min_snr`` x rms must be found within ``match_beams`` beams;
    a detection with no true source within that radius is spurious.
    """
    from astropy.io import fits
    with fits.open(image) as hdul:
        header, data = hdul[0].header, hdul[0].data
        fwhm = beam_fwhm_arcsec(header)
        rms = off_source_rms(data, header, sky)
        peak = float(np.nanmax(data))
    found = find_sources(image)
    check = SkyCheck(image=image, beam_fwhm_arcsec=fwhm, rms_jy=rms, peak_jy=peak)
    used: set[int] = set()
    for s in sky:
        best = min(((i, _sep_arcsec(s.ra_deg, s.dec_deg, ra, dec)) for i, (ra, dec, _) in enumerate(found)),
                   key=lambda t: t[1], default=None)
        if best is not None and best[1] <= match_beams * fwhm:
            i = best[0]
            used.add(i)
            check.matches.append(Match(s, found[i][0], found[i][1], found[i][2], best[1]))
        elif s.flux_jy >= min_snr * rms:
            check.missed.append(s)
    check.spurious = [f for i, f in enumerate(found) if i not in used]
    return check
