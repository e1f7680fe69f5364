"""The extended-mask tool (hpcddf.lofar.extmask) on synthetic FITS images with known islands:
which islands are kept, where the full-resolution mask lands on the sky, the per-facet noise
from a DDFacet-style facet region file, and the "only if non-empty" flag for DDFacet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from hpcddf.lofar.extmask import FacetNoise, central_rms, flag_if_nonempty, make_extended_mask

N_LOW, CELL_LOW = 400, 20.0   # pixels, arcsec
N_HIGH, CELL_HIGH = 800, 10.0
ISLAND = (slice(60, 90), slice(120, 150))     # 900 px: kept
SMALL = (slice(150, 156), slice(40, 46))      # 36 px: below the size threshold
HUGE = (slice(250, 290), slice(250, 290))     # 1600 px: above --max-size
POINTS = ((20, 20), (30, 370), (375, 15))


def header(n: int, cell: float, dec0: float = 60.0) -> fits.Header:
    """A DDFacet-like 4-axis image header (RA/Dec SIN, Stokes, frequency)."""
    w = WCS(naxis=4)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN", "STOKES", "FREQ"]
    w.wcs.crval = [180.0, dec0, 1.0, 1.44e8]
    w.wcs.crpix = [n // 2 + 1, n // 2 + 1, 1, 1]
    w.wcs.cdelt = [-cell / 3600.0, cell / 3600.0, 1.0, 1e6]
    w.wcs.cunit = ["deg", "deg", "", "Hz"]
    return w.to_header()


def write(path: Path, plane: np.ndarray, hdr: fits.Header) -> Path:
    fits.PrimaryHDU(plane.astype(np.float32).reshape((1, 1, *plane.shape)), header=hdr).writeto(path)
    return path


def plane(path: Path) -> np.ndarray:
    return fits.getdata(path)[0, 0]


def low_field(tmp: Path, amp: float = 10.0) -> tuple[Path, np.ndarray]:
    """Unit Gaussian noise, one extended island, a small one, a huge one, point sources."""
    img = np.random.default_rng(1).normal(0.0, 1.0, (N_LOW, N_LOW))
    for box in (ISLAND, SMALL, HUGE):
        img[box] += amp
    for y, x in POINTS:
        img[y, x] += 50.0
    return write(tmp / "low.fits", img, header(N_LOW, CELL_LOW)), img


def template(tmp: Path, dec0: float = 60.0) -> Path:
    return write(tmp / "template.fits", np.zeros((N_HIGH, N_HIGH)), header(N_HIGH, CELL_HIGH, dec0))


def _dilated(box: tuple[slice, slice]) -> np.ndarray:
    out = np.zeros((N_LOW, N_LOW), dtype=bool)
    out[box[0].start - 1:box[0].stop + 1, box[1].start - 1:box[1].stop + 1] = True
    return out


def test_central_rms_ignores_bright_sources():
    img = np.random.default_rng(2).normal(0.0, 2.0, (300, 300))
    img[100:140, 100:140] += 100.0
    assert central_rms(img) == pytest.approx(2.0, rel=0.03)


def test_islands_in_the_size_window_are_kept_and_grown_by_about_a_pixel(tmp_path: Path):
    low, img = low_field(tmp_path)
    doc = make_extended_mask(str(low), str(template(tmp_path)), str(tmp_path / "boot"), 3.0, 100, max_size=1200)
    assert doc["kept"] == 1 and doc["rms"] == pytest.approx(1.0, rel=0.05)
    mask = plane(tmp_path / "boot-mask-low.fits") > 0
    assert mask[ISLAND].all()                       # the whole extended island
    island = np.zeros_like(mask)
    island[ISLAND] = True
    # at most one pixel of growth around the island's own pixels (noise peaks may touch it)
    grown = (img > 3.0) & _dilated((slice(55, 95), slice(115, 155)))
    assert not (mask & ~_dilated(ISLAND) & ~grown).any()
    assert mask.sum() > island.sum()                 # it did grow
    for box in (SMALL, HUGE):
        assert not mask[box].any()
    assert not any(mask[y, x] for y, x in POINTS)
    assert not list(tmp_path.glob(".*tmp*"))         # written under temporary names, then renamed


def test_the_high_mask_covers_the_island_at_its_sky_position_on_the_finer_grid(tmp_path: Path):
    low, _ = low_field(tmp_path)
    tmpl = template(tmp_path, dec0=60.1)  # another centre: the mapping must go through the sky
    make_extended_mask(str(low), str(tmpl), str(tmp_path / "boot"), 3.0, 100, max_size=1200)
    high = plane(tmp_path / "boot-mask-high.fits") > 0
    assert high.shape == (N_HIGH, N_HIGH)
    assert fits.getheader(tmp_path / "boot-mask-high.fits")["CRVAL2"] == pytest.approx(60.1)
    # four template pixels per low pixel of the island's 900 (its bounding box holds the
    # growth ring only where noise peaks joined the island; pixel edges fall either way)
    assert 0.97 * 4 * 900 <= high.sum() <= 4 * 32 * 32
    lw, hw = WCS(header(N_LOW, CELL_LOW)).celestial, WCS(header(N_HIGH, CELL_HIGH, 60.1)).celestial
    ys, xs = np.nonzero(high)
    centre_high = hw.pixel_to_world(xs.mean(), ys.mean())
    centre_low = lw.pixel_to_world(134.5, 74.5)  # the island's centre on the low grid
    assert centre_high.separation(centre_low).arcsec < CELL_HIGH
    # every template pixel whose centre is inside the island is masked
    ty, tx = np.mgrid[0:N_HIGH, 0:N_HIGH]
    lx, ly = lw.world_to_pixel(hw.pixel_to_world(tx, ty))
    inside = (np.abs(lx - 134.5) < 14.5) & (np.abs(ly - 74.5) < 14.5)
    assert inside.sum() > 3000 and high[inside].all()


def _tessel(path: Path, wcs: WCS, style: str) -> Path:
    """Two facets, left and right halves of the low grid, as DDFacet writes them (a labelled
    point, then the edges as lines, one of zero length) or as ds9 polygons."""
    def sky(x: float, y: float) -> str:
        c = wcs.pixel_to_world(x, y)
        return f"{c.ra.deg:.8f},{c.dec.deg:.8f}"
    lo, mid, hi = -0.5, N_LOW / 2 - 0.5, N_LOW - 0.5
    facets = [[(lo, lo), (mid, lo), (mid, hi), (lo, hi)], [(mid, lo), (hi, lo), (hi, hi), (mid, hi)]]
    lines = ["# Region file format: DS9 version 4.1", "global color=green", "fk5"]
    for k, corners in enumerate(facets):
        pts = [sky(*c) for c in corners]
        if style == "polygon":
            lines.append(f"polygon({','.join(pts)})")
            continue
        cx = np.mean([c[0] for c in corners])
        lines.append(f"point({sky(cx, N_LOW / 2)}) # text={{[F{k}_S{k}]}} point=circle 5")
        lines.append(f"line({pts[0]},{pts[0]}) # line=0 0")  # DDFacet writes such zero-length edges
        lines += [f"line({pts[i]},{pts[(i + 1) % 4]}) # line=0 0" for i in range(4)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("style", ["tessel", "polygon"])
def test_rmsfacet_gives_each_facet_the_mean_noise_inside_it(tmp_path: Path, style: str):
    rng = np.random.default_rng(3)
    img = rng.normal(0.0, 1.0, (N_LOW, N_LOW))
    img[60:90, 30:60] += 6.0     # left facet (noise 1): above 3 x 1
    img[60:90, 230:260] += 6.0   # right facet (noise 3): below 3 x 3
    low = write(tmp_path / "low.fits", img, header(N_LOW, CELL_LOW))
    noise = np.where(np.arange(N_LOW)[None, :] < N_LOW // 2, 1.0, 3.0) * rng.uniform(0.9, 1.1, (N_LOW, N_LOW))
    write(tmp_path / "low.fits.noise.fits", noise, header(N_LOW, CELL_LOW))
    reg = _tessel(tmp_path / "facets.reg", WCS(header(N_LOW, CELL_LOW)).celestial, style)
    doc = make_extended_mask(str(low), str(template(tmp_path)), str(tmp_path / "full"), 3.0, 100,
                             facets=FacetNoise(str(tmp_path / "low.fits.noise.fits"), str(reg)))
    rms = plane(tmp_path / "full-rms-low.fits")
    half = N_LOW // 2
    assert np.allclose(rms[:, :half], noise[:, :half].mean(), rtol=1e-5)
    assert np.allclose(rms[:, half:], noise[:, half:].mean(), rtol=1e-5)
    mask = plane(tmp_path / "full-mask-low.fits") > 0
    assert doc["kept"] == 1 and mask[60:90, 30:60].all() and not mask[:, half:].any()


def test_the_command_line_tool_writes_the_three_masks_in_the_working_directory(tmp_path: Path):
    low, _ = low_field(tmp_path)
    template(tmp_path)
    write(tmp_path / "low.fits.noise.fits", np.ones((N_LOW, N_LOW)), header(N_LOW, CELL_LOW))
    _tessel(tmp_path / "facets.reg", WCS(header(N_LOW, CELL_LOW)).celestial, "tessel")
    out = subprocess.run([sys.executable, "-m", "hpcddf.lofar.extmask", "extended", "--image", "low.fits",
                          "--template", "template.fits", "--root", "bootstrap", "--rms-thresh", "3",
                          "--size-thresh", "100", "--max-size", "1200", "--rmsfacet", "--region", "facets.reg"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["root"] == "bootstrap" and doc["kept"] == 1 and doc["rms"] == pytest.approx(1.0)
    for name in ("bootstrap-mask-low.fits", "bootstrap-mask-high.fits", "bootstrap-rms-low.fits"):
        assert (tmp_path / name).is_file(), name
    bad = subprocess.run([sys.executable, "-m", "hpcddf.lofar.extmask", "extended", "--image", "low.fits",
                          "--template", "template.fits", "--root", "x", "--rms-thresh", "3",
                          "--size-thresh", "100", "--rmsfacet"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "--region" in bad.stderr


def test_the_flag_exists_only_while_the_mask_masks_a_pixel(tmp_path: Path):
    mask, flag = tmp_path / "m.fits", tmp_path / "m.flag.json"
    assert flag_if_nonempty(str(mask), str(flag)) == 0 and not flag.exists()  # no mask at all
    data = np.zeros((50, 50))
    data[10:12, 10:13] = 1.0
    write(mask, data, header(50, 20.0))
    assert flag_if_nonempty(str(mask), str(flag)) == 6
    assert json.loads(flag.read_text()) == {"mask": str(mask), "masked_pixels": 6}
    write(mask.with_name("e.fits"), np.zeros((50, 50)), header(50, 20.0))
    mask.unlink()
    mask.with_name("e.fits").rename(mask)
    assert flag_if_nonempty(str(mask), str(flag)) == 0 and not flag.exists()  # a stale flag goes
