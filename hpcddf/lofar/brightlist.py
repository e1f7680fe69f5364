"""The dynamic spectra's bright-source targets (ddf-pipeline's ``find_bright_offset_sources``):
the compact sources of the final image brighter than ``[spectra] bright_threshold`` in apparent
flux, written as ``brightlist.csv`` (``Name,ra,dec,Type``, which the dynspec step passes as
``--srclist``) and ``dynspec-targets.fits``.

ddf-pipeline makes the list after the offsets step, from the PyBDSF Gaussian list that step
wrote, and only when ``[offsets] method`` is set. hpcddf's offsets step writes PyBDSF's source
list (``<final>.offsets.srl.fits``, same Peak_flux and DC_Maj columns); a compact bright source
is one Gaussian, so the two lists give the same targets. The cuts are the reference's:
Peak_flux above the threshold and a deconvolved major axis below 0.003 deg (10.8"), then the
peak made apparent with the app/int image ratio at the source's pixel and cut again (the list
is of what the station beam lets the dynamic spectra see).

Run as ``python -m hpcddf.lofar.brightlist --catalogue SRL --root FINAL --cutoff JY``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# numpy and astropy are imported where used: the planner imports the names below on a login
# node that may have neither

OFFSETS_SRL = ".offsets.srl.fits"  # the offsets step's PyBDSF source list: <final image>{OFFSETS_SRL}
BRIGHT_CSV = "brightlist.csv"
BRIGHT_FITS = "dynspec-targets.fits"
MAX_DC_MAJ_DEG = 0.003
TYPE = "Bright LOFAR"


def ilt_name(ra_deg: float, dec_deg: float) -> str:
    """LoTSS's source name, ``ILTJhhmmss.ss+ddmmss.s`` (truncated, not rounded, as IAU names)."""
    import astropy.units as u
    import numpy as np
    from astropy.coordinates import SkyCoord
    c = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    ra = c.ra.hms
    sign = "-" if dec_deg < 0 else "+"
    d = c.dec.signed_dms
    sec_ra = np.floor(ra.s * 100) / 100
    sec_dec = np.floor(d.s * 10) / 10
    return f"ILTJ{int(ra.h):02d}{int(ra.m):02d}{sec_ra:05.2f}{sign}{int(d.d):02d}{int(d.m):02d}{sec_dec:04.1f}"


def _ratio_at(app: Any, int_: Any, ra: Any, dec: Any) -> Any:
    """app / int at each position (1 outside the image or where int is 0: no beam known)."""
    import numpy as np
    from astropy.wcs import WCS
    a, i = np.squeeze(app[0].data), np.squeeze(int_[0].data)
    x, y = WCS(app[0].header).celestial.all_world2pix(ra, dec, 0)
    xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (xi >= 0) & (yi >= 0) & (xi < a.shape[1]) & (yi < a.shape[0])
    out = np.ones(len(ra))
    num, den = a[yi[inside], xi[inside]], i[yi[inside], xi[inside]]
    out[inside] = np.where(den != 0, num / np.where(den != 0, den, 1), 1.0)
    return out


def bright_sources(table: Any, app: Any, int_: Any, cutoff_jy: float) -> Any:
    """The rows of ``table`` (a PyBDSF list) that are compact and brighter than ``cutoff_jy``
    both as measured and as the beam attenuates them, with their apparent peak."""
    import numpy as np
    sel = (np.asarray(table["Peak_flux"], float) > cutoff_jy) & (np.asarray(table["DC_Maj"], float) < MAX_DC_MAJ_DEG)
    rows = table[sel]
    ra, dec = np.asarray(rows["RA"], float), np.asarray(rows["DEC"], float)
    apparent = np.asarray(rows["Peak_flux"], float) * _ratio_at(app, int_, ra, dec)
    rows["Peak_flux_app"] = apparent
    return rows[apparent > cutoff_jy]


def write_lists(rows: Any, workdir: Path) -> None:
    """``brightlist.csv`` and ``dynspec-targets.fits``, each under a temporary name first."""
    import numpy as np
    from astropy.table import Table

    from hpcddf.engine.atomic import atomic_path, write_text_atomic
    names = [ilt_name(float(r), float(d)) for r, d in zip(rows["RA"], rows["DEC"])]
    csv = "".join(f"{n},{float(r)!r},{float(d)!r},{TYPE}\n" for n, r, d in zip(names, rows["RA"], rows["DEC"]))
    write_text_atomic(workdir / BRIGHT_CSV, csv)
    table = Table({"Source_id": names, "RA": np.asarray(rows["RA"], float), "DEC": np.asarray(rows["DEC"], float),
                   "Peak_flux": np.asarray(rows["Peak_flux"], float),
                   "Peak_flux_app": np.asarray(rows["Peak_flux_app"], float)})
    with atomic_path(workdir / BRIGHT_FITS) as tmp:
        table.write(tmp, format="fits", overwrite=True)


def make_brightlist(catalogue: str, root: str, cutoff_jy: float, workdir: Path = Path(".")) -> int:
    """The list for the final image ``root`` (``.app`` and ``.int`` restored images; without a
    beam model DDF writes the app image only, and the ratio is 1)."""
    from astropy.io import fits
    from astropy.table import Table
    app_path = workdir / f"{root}.app.restored.fits"
    int_path = workdir / f"{root}.int.restored.fits"
    with fits.open(app_path) as app, fits.open(int_path if int_path.is_file() else app_path) as int_:
        rows = bright_sources(Table.read(workdir / catalogue), app, int_, cutoff_jy)
    write_lists(rows, workdir)
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.brightlist", description=__doc__.split("\n")[0])
    ap.add_argument("--catalogue", required=True, help="PyBDSF source list of the final image")
    ap.add_argument("--root", required=True, help="the final image's name (its .app/.int.restored.fits)")
    ap.add_argument("--cutoff", type=float, required=True, help="[spectra] bright_threshold (Jy)")
    a = ap.parse_args(argv)
    n = make_brightlist(a.catalogue, a.root, a.cutoff)
    print(f"{BRIGHT_CSV}: {n} compact source(s) above {a.cutoff} Jy apparent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
