"""The dynamic spectra's bright-source list (hpcddf.lofar.brightlist): ddf-pipeline's cuts on
a PyBDSF list and the final image's app/int ratio, its files, and its place in the plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpcddf.lofar.brightlist import BRIGHT_CSV, BRIGHT_FITS, ilt_name, main


def _images(wd: Path, root: str, ratio_right_half: float) -> None:
    """A 100-pixel app image and an int image that is the app one divided by the beam: 1 on
    the left half, ``ratio_right_half`` on the right."""
    from astropy.io import fits
    from astropy.wcs import WCS
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [180.0, 60.0]
    w.wcs.crpix = [50.5, 50.5]
    w.wcs.cdelt = [-0.01, 0.01]
    intd = np.ones((100, 100), np.float32)
    app = intd.copy()
    app[:, 50:] = ratio_right_half
    fits.PrimaryHDU(app, w.to_header()).writeto(wd / f"{root}.app.restored.fits")
    fits.PrimaryHDU(intd, w.to_header()).writeto(wd / f"{root}.int.restored.fits")


def _catalogue(wd: Path) -> list[tuple[float, float]]:
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS
    w = WCS(fits.getheader(wd / "F.app.restored.fits"))
    pix = [(20, 50), (80, 50), (25, 30), (30, 70), (10, 20)]  # x, y
    ra, dec = w.all_pix2world([p[0] for p in pix], [p[1] for p in pix], 0)
    Table({"RA": ra, "DEC": dec,
           "Peak_flux": [2.0, 2.0, 0.5, 3.0, 1.5],             # Jy
           "DC_Maj": [0.001, 0.001, 0.001, 0.01, 0.0]}         # deg: the 4th is extended
          ).write(wd / "F.offsets.srl.fits")
    return list(zip(ra, dec))


def test_bright_compact_sources_above_the_cut_in_apparent_flux(tmp_path: Path, monkeypatch, capsys):
    from astropy.table import Table
    _images(tmp_path, "F", ratio_right_half=0.4)  # the beam at 40 % on the right half
    pos = _catalogue(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["--catalogue", "F.offsets.srl.fits", "--root", "F", "--cutoff", "1.0"]) == 0
    assert "2 compact source(s) above 1.0 Jy" in capsys.readouterr().out
    # kept: the 2 Jy source on the left (app 2 Jy) and the 1.5 Jy point source on the left;
    # cut: 2 Jy on the right (0.8 Jy apparent), 0.5 Jy (faint), 3 Jy (extended)
    lines = (tmp_path / BRIGHT_CSV).read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [ilt_name(*pos[0]), ilt_name(*pos[4])]
    name, ra, dec, kind = lines[0].split(",")
    assert (float(ra), float(dec)) == pytest.approx(pos[0]) and kind == "Bright LOFAR"
    t = Table.read(tmp_path / BRIGHT_FITS)
    assert list(t["Peak_flux_app"]) == pytest.approx([2.0, 1.5])
    assert not list(tmp_path.glob("*.tmp*"))


def test_without_a_beam_the_app_image_serves_as_both(tmp_path: Path, monkeypatch):
    _images(tmp_path, "F", ratio_right_half=0.4)
    _catalogue(tmp_path)
    (tmp_path / "F.int.restored.fits").unlink()  # beam_model None: DDF writes app only
    monkeypatch.chdir(tmp_path)
    assert main(["--catalogue", "F.offsets.srl.fits", "--root", "F", "--cutoff", "1.0"]) == 0
    assert len((tmp_path / BRIGHT_CSV).read_text().splitlines()) == 3  # no attenuation known


def test_ilt_names_truncate_as_lotss_does():
    assert ilt_name(0.0, 0.0) == "ILTJ000000.00+000000.0"
    assert ilt_name(180.0 + 0.5 / 3600 * 15 * 0.999, -(1 + 1 / 60 + 1.25 / 3600)) == "ILTJ120000.49-010101.2"
