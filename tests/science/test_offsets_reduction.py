"""The offsets step on a real DDFacet image: a simulated field rich enough in sources for a
per-direction histogram fit (30 compact sources, 3 calibration directions) is imaged by
DDFacet as the final image; the reference catalogue is the true sky shifted by a known offset
plus a dense background of unrelated sources (as an optical catalogue would be). The offsets
step must measure the shift, write its products, and DDFacet's RestoreAndShift must move the
sources onto the reference frame.

The rest of the reduction (kMS) is not needed for this and is not run: the image is made
with the same DDF.py command builder the final step uses.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(3600)

SHIFT = (30.0, -20.0)  # arcsec east, north (a quarter beam): reference = truth + SHIFT
BEAM_ARCSEC = 120.0


def _sources(n: int, seed: int):
    from hpcddf.lofar.simulate import Source
    rng = np.random.default_rng(seed)
    out: list[Source] = []
    while len(out) < n:
        r, th = 1.35 * np.sqrt(rng.uniform(0.01, 1.0)), rng.uniform(0, 2 * np.pi)
        dec = 60.0 + r * np.sin(th)
        ra = 180.0 + r * np.cos(th) / np.cos(np.radians(dec))
        if all(np.hypot((ra - s.ra_deg) * np.cos(np.radians(dec)), dec - s.dec_deg) > 0.12 for s in out):
            out.append(Source(f"R{len(out)}", float(ra), float(dec), float(np.exp(rng.uniform(np.log(1.0), np.log(4.0))))))
    return tuple(out)


def _reference(path: Path, sources, seed: int, shift: tuple[float, float] = SHIFT) -> None:
    """Truth shifted by ``shift``, plus unrelated sources (chance matches: ~10 per pair disc,
    whose radius scales with the beam, 1200" here)."""
    from astropy.table import Table
    rng = np.random.default_rng(seed)
    dec_true = np.array([s.dec_deg for s in sources]) + shift[1] / 3600
    ra_true = np.array([s.ra_deg for s in sources]) + shift[0] / 3600 / np.cos(np.radians(dec_true))
    n_bg = 400
    dec_bg = rng.uniform(58.2, 61.8, n_bg)
    ra_bg = 180.0 + rng.uniform(-1.8, 1.8, n_bg) / np.cos(np.radians(dec_bg))
    Table({"ra": np.concatenate([ra_true, ra_bg]), "dec": np.concatenate([dec_true, dec_bg])}).write(path)


def _run(cmd, wd: Path) -> None:
    """Through the engine's runner, as a stage runs it (log file, timeout, start-up retries),
    in the node job's environment: BLAS threads pinned to 1 (with numpy's default of one per
    core, DDFacet's workers spin on each other's cores: 1.5x the CPU time for the same image)."""
    from hpcddf.engine.contained import science_env
    from hpcddf.engine.runner import RunContext, run_command
    ctx = RunContext(workdir=wd, log_dir=wd, marker_dir=wd / ".hpcddf" / "done", env=science_env())
    run_command(ctx, "offsets-test", replace(cmd, timeout_s=2400))


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from hpcddf.lofar.config import load_config
    from hpcddf.lofar.ddfcommands import Image, Machine, ddf_image
    from hpcddf.lofar.recipes import cf_wmax_m
    from hpcddf.lofar.reduction import FINAL_NS, Reduction, build
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    wd = tmp_path_factory.mktemp("offsets") / "SIMO"
    sources = _sources(30, seed=3)
    # 30 bright sources need a better PSF than the demo's 16 stations x 8 min to be cleaned
    # down to their positions: 24 stations x 32 min x 8 channels
    simulate_field(wd, SimSpec(n_ms=1, nant=24, ntime=240, nchan=8, sources=sources))
    _reference(wd / "reference.fits", sources, seed=4)
    _reference(wd / "truth.fits", sources, seed=4, shift=(0.0, 0.0))
    cfg = load_config([str(wd / "hpcddf.cfg")], ["--offsets-method=pslocal", f"--offsets-catalogue={wd / 'reference.fits'}",
                                                 "--offsets-fit=mcmc"])
    (wd / ".hpcddf").mkdir()
    (wd / ".hpcddf" / "pipeline.cfg").write_text(cfg.to_cfg_text())
    m = Machine(ncpu_ddf=2, ncpu_kms=2, cache_dir=str(wd / "cache"), timeout_s=1200.0, python=sys.executable,
                cf_wmax_m=cf_wmax_m([wd / "SIM_SB000.ms"]))  # as the reduction's recipe sets it
    (wd / "cache").mkdir()
    _run(ddf_image(cfg, m, Image(name=FINAL_NS, mslist="mslist.txt", colname="CORRECTED_DATA",
                                 clusterfile="nodes.npy", robust=-0.5, psf_arcsec=BEAM_ARCSEC,
                                 majorcycles=4)), wd)
    # the baseline: the same fit against the unshifted truth measures what the simulated
    # image itself holds (DDFacet's facet positions of a simulated sky are a few arcsec off)
    base = load_config([str(wd / "hpcddf.cfg")], ["--offsets-method=baseline", f"--offsets-catalogue={wd / 'truth.fits'}"])
    (wd / ".hpcddf" / "baseline.cfg").write_text(base.to_cfg_text())
    [step] = build(Reduction(base, m, ("SIM_SB000.ms",), ("SIM_SB000.ms",)), "final", ["offsets"])
    offsets_tool = step.commands[0]
    _run(type(offsets_tool)(offsets_tool.argv[:-1] + (".hpcddf/baseline.cfg",), "baseline.log"), wd)
    [step] = build(Reduction(cfg, m, ("SIM_SB000.ms",), ("SIM_SB000.ms",)), "final", ["offsets"])
    for cmd in step.commands:
        _run(cmd, wd)
    return {"wd": wd, "step": step}


def test_offsets_step_writes_its_products(field):
    wd, step = field["wd"], field["step"]
    for name in step.outputs:
        assert (wd / name).is_file(), name
    assert (wd / "pslocal-offsets.png").read_bytes()[:4] == b"\x89PNG"


def test_the_injected_shift_is_measured_within_a_tenth_of_the_beam(field):
    """Every direction (8-13 compact sources each here, so the significance test passes for
    some only) measures the injected shift on top of the baseline, within its errors."""
    from astropy.table import Table
    t = Table.read(field["wd"] / "pslocal-facet_offsets.fits")
    b = Table.read(field["wd"] / "baseline-facet_offsets.fits")
    assert (~t["Bad"]).sum() >= 1, t
    for row, ref in zip(t, b):
        assert row["N_Sources"] >= 5, row
        for axis, want in (("RA", SHIFT[0]), ("DEC", SHIFT[1])):
            got = row[f"{axis}_offset"] - ref[f"{axis}_offset"]
            err = float(np.hypot(row[f"{axis}_error"], ref[f"{axis}_error"]))
            assert abs(got - want) < 0.1 * BEAM_ARCSEC, (row["Facet_id"], axis, got, want)   # the bar
            assert abs(got - want) < max(3.0, 3 * err), (row["Facet_id"], axis, got, want, err)


def test_astromap_holds_the_direction_errors(field):
    from astropy.io import fits
    from astropy.table import Table
    t = Table.read(field["wd"] / "pslocal-facet_offsets.fits")
    amap = fits.getdata(field["wd"] / "astromap.fits")
    from hpcddf.lofar.reduction import FINAL_NS
    n = fits.getheader(field["wd"] / f"{FINAL_NS}.app.restored.fits")["NAXIS1"] // 20
    assert amap.shape == (n, n)
    errs = np.hypot(t["RA_error"], t["DEC_error"])
    vals = np.unique(amap[np.isfinite(amap)])
    assert len(vals) and all(np.isclose(errs, v).any() for v in vals)


def test_restore_and_shift_moves_sources_onto_the_reference(field):
    """Bright-source centroids in the _shift image are displaced by the measured offset in the
    sense that brings them onto the reference catalogue (east = lower pixel x)."""
    from astropy.io import fits
    from astropy.table import Table

    from hpcddf.lofar.reduction import FINAL_NS
    wd = field["wd"]
    before = fits.getdata(wd / f"{FINAL_NS}.app.restored.fits").squeeze()
    after = fits.getdata(wd / f"{FINAL_NS}_shift.app.facetRestored.fits").squeeze()
    cell = abs(fits.getheader(wd / f"{FINAL_NS}.app.restored.fits")["CDELT2"]) * 3600
    t = Table.read(wd / "pslocal-facet_offsets.fits")
    good = t[~t["Bad"]]
    want = (float(np.median(good["RA_offset"])), float(np.median(good["DEC_offset"])))
    shifts = []
    for y, x in zip(*np.nonzero((before > 0.3) & (before == _local_max(before)))):
        if 8 <= y < before.shape[0] - 8 and 8 <= x < before.shape[1] - 8:
            shifts.append(np.subtract(_centroid(after, y, x), _centroid(before, y, x)))
    assert len(shifts) >= 10
    dy, dx = np.median(shifts, axis=0)
    # directions differ by a few arcsec; the sign and size must be those of the offsets
    assert -dx * cell == pytest.approx(want[0], abs=4.0)
    assert dy * cell == pytest.approx(want[1], abs=4.0)


def _local_max(a: np.ndarray) -> np.ndarray:
    from scipy.ndimage import maximum_filter
    return maximum_filter(np.nan_to_num(a), size=5)


def _centroid(a: np.ndarray, y: int, x: int, h: int = 5) -> np.ndarray:
    box = np.nan_to_num(a[y - h:y + h + 1, x - h:x + h + 1])
    box = np.clip(box - 0.5 * box.max(), 0, None)  # the core of the beam only
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    return np.array([y + (box * yy).sum() / box.sum(), x + (box * xx).sum() / box.sum()])


def test_mosaic_apply_shifts_matches_ddfacets_restore_and_shift(field, tmp_path):
    """hpcddf mosaic --apply-shifts on the unshifted final image alone (no int image: beam_model
    None, so app is both) moves every bright source where DDFacet's RestoreAndShift put it, by
    the shift facet-offset.txt gives its facet. Sources within 1.5 beams of a facet edge are left
    out (both tools cut an image there)."""
    import math

    from astropy.io import fits
    from astropy.wcs import WCS

    from hpcddf.facets import facet_of, read_tessel
    from hpcddf.lofar.reduction import FINAL_NS
    from hpcddf.mosaic.combine import MosaicInput, MosaicOptions, make_mosaic, output_header
    from hpcddf.mosaic.corrections import FULL_INT, FULL_TESSEL, CorrectionOptions, field_corrections
    wd = field["wd"]
    app = wd / f"{FINAL_NS}.app.restored.fits"
    int_ = wd / FULL_INT if (wd / FULL_INT).is_file() else app
    corr = field_corrections(wd, wd.name, FULL_TESSEL, CorrectionOptions(apply_shifts=True))
    assert corr.shifted
    hdr = fits.getheader(app)
    wcs = WCS(hdr).celestial
    cell, npix = abs(float(hdr["CDELT2"])), int(hdr["NAXIS1"])
    centre = (float(hdr["CRVAL1"]), float(hdr["CRVAL2"]))
    # himsize = npix/2 + 0.5 rounded down: the grid is the image's, one pixel larger
    header = output_header(wd.name, *centre, 2 * (npix / 2 + 0.5) * cell / 1.15, cell * 3600, BEAM_ARCSEC)
    res = make_mosaic([MosaicInput(wd.name, str(int_), str(app), corrections=corr)], header,
                      tmp_path / "m.fits", tmp_path / "w.fits", MosaicOptions(block=256))
    mine, mwcs = fits.getdata(res.mosaic), WCS(fits.getheader(res.mosaic))
    before = fits.getdata(app).squeeze()
    ddf = fits.getdata(wd / f"{FINAL_NS}_shift.app.facetRestored.fits").squeeze()
    facets = read_tessel(str(wd / FULL_TESSEL), centre)
    shift = {f.index: f.shift for f in corr.facets}

    def position(a: np.ndarray, w: WCS, ra: float, dec: float, search: int = 4) -> tuple[float, float, float]:
        """(RA, Dec, peak) of the half-max centroid around the brightest pixel near (ra, dec)."""
        x, y = (int(round(float(v))) for v in w.all_world2pix([[ra, dec]], 0)[0])
        box = np.nan_to_num(a[y - search:y + search + 1, x - search:x + search + 1])
        dy, dx = np.unravel_index(np.argmax(box), box.shape)
        yc, xc = _centroid(a, y - search + dy, x - search + dx)
        r, d = w.all_pix2world([[xc, yc]], 0)[0]
        return float(r), float(d), float(box.max())

    def offset(p: tuple[float, ...], q: tuple[float, ...]) -> np.ndarray:
        """Arcsec east and north of p from q."""
        return np.array([((p[0] - q[0] + 180) % 360 - 180) * math.cos(math.radians(q[1])) * 3600,
                         (p[1] - q[1]) * 3600])

    ring = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    r = 1.5 * BEAM_ARCSEC / 3600
    checked = 0
    for s in _sources(30, seed=3):
        ras = np.r_[s.ra_deg, s.ra_deg + r * np.cos(ring) / math.cos(math.radians(s.dec_deg))]
        fac = facet_of(ras, np.r_[s.dec_deg, s.dec_deg + r * np.sin(ring)], facets, centre)
        x, y = wcs.all_world2pix([[s.ra_deg, s.dec_deg]], 0)[0]
        b = position(before, wcs, s.ra_deg, s.dec_deg)
        if not ((fac == fac[0]).all() and fac[0] >= 0 and 10 <= min(x, y) and max(x, y) < npix - 10 and b[2] > 0.3):
            continue
        m, d = position(mine, mwcs, s.ra_deg, s.dec_deg), position(ddf, wcs, s.ra_deg, s.dec_deg)
        assert np.hypot(*offset(m, d)) < 0.05 * BEAM_ARCSEC, (s.name, offset(m, d))
        moved = offset(m, b)
        assert np.hypot(*(moved - shift[int(fac[0])])) < 0.05 * BEAM_ARCSEC, (s.name, moved, shift[int(fac[0])])
        checked += 1
    assert checked >= 10
