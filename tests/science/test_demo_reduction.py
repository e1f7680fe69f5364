"""End to end: `hpcddf demo` simulates a field with direction-dependent phase errors and reduces
it with the real DDFacet and killMS through the local site; the final image must match the
simulated sky and the DD self-calibration must beat DI calibration alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._demo import FIELD  # the demo itself: the session fixture `demo` (tests/_demo.py)
from tests.science.conftest import assert_matches_the_demo_sky, hpcddf

pytestmark = pytest.mark.timeout(3600)  # the demo fixture: ~5 min alone, ~8 min in CI, 24 min seen on a slower machine


def test_demo_reports_progress_and_where_the_image_is(demo):
    out, err = demo["proc"].stdout, demo["proc"].stderr
    assert f"final image: {demo['workdir']}/image_full_ampphase_di_m.NS.app.restored.fits" in out
    assert "every simulated source recovered, nothing spurious" in out
    for stage in ("initial", "dirin", "dirin_di", "phase", "ampphase", "ampphase_di",
                  "fullampphase", "final"):  # no low-res image: fulllow joins final
        assert f"stage {stage} done" in err, stage
    assert "step DDS0 running" in err and "step image_phase1 done in" in err


def test_final_image_matches_the_simulated_sky(demo):
    final = demo["result"].final
    print(final.text())
    assert_matches_the_demo_sky(final)


def test_dd_calibration_at_least_doubles_the_dynamic_range(demo):
    r = demo["result"]
    print(r.text())
    assert r.final.dynamic_range >= 2 * r.di.dynamic_range


def test_every_step_has_a_marker_logs_and_the_summary_has_versions(demo):
    wd = demo["workdir"]
    markers = {p.name.removesuffix(".done.json"): json.loads(p.read_text())
               for p in (wd / ".hpcddf" / "done").glob("*.done.json")}
    assert "image_full_ampphase_di_m.NS" in markers and "DDS3_full" in markers
    assert "DDS3_full_slow" not in markers  # switched off in the simulated field's config
    ddf = markers["image_phase1"]
    assert ddf["versions"]["hpcddf"] and ddf["commands"][0][0] == "DDF.py"
    assert ddf["duration_s"] > 0 and (wd / "logs" / "image_phase1.log").stat().st_size > 0
    kms = markers["DIS0"]["commands"]
    assert [c[0] for c in kms] == ["kMS.py", "ClipCal.py"]  # ClipCal in the same step
    summary = (wd / "summary.txt").read_text()
    assert "DDFacet = 0.9.1.0" in summary and "killMS = 3.3.0" in summary
    assert "beam_model = None" in summary
    logs = hpcddf("logs", FIELD, "--site", "local", "--work-root", str(wd.parent), home=demo["home"])
    assert logs.returncode == 0 and "stage total" in logs.stdout and "DDS2_full" in logs.stdout
    import os
    leftovers = [p for p in os.listdir("/dev/shm") if p.startswith("ddf.")]
    assert not [p for p in leftovers if not Path(f"/proc/{p.split('.')[1]}").exists()]


def _expected_int_flux_ratio(demo: dict) -> float:
    """Mean over the matched sources of (int / app image at the source) x (app flux / truth)."""
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS
    final = demo["result"].final_image
    app = fits.getdata(final).squeeze()
    intr = fits.getdata(str(final).replace(".app.restored", ".int.restored")).squeeze()
    wcs = WCS(fits.getheader(final)).celestial
    ratios = []
    for m in demo["result"].final.matches:
        x, y = (int(round(float(v))) for v in wcs.world_to_pixel_values(m.true.ra_deg, m.true.dec_deg))
        ratios.append(intr[y, x] / app[y, x] * m.flux_ratio)
    return float(np.mean(ratios))


def test_quality_of_the_final_image_against_catalogues_of_the_true_sky(demo, tmp_path):
    """`hpcddf quality` on the reduced field: one catalogue is the true sky, the other the true
    sky 30" further north and in mJy; the offsets, flux ratios and units must come out."""
    from astropy.table import Table

    from hpcddf.lofar.simulate import read_skymodel
    sky = read_skymodel(demo["workdir"] / "skymodel.txt")
    ra = [s.ra_deg for s in sky]
    dec = [s.dec_deg for s in sky]
    flux = [s.flux_jy for s in sky]
    Table({"RA": ra, "DEC": dec, "Total_flux": flux, "E_Total_flux": [0.1 * f for f in flux]}).write(
        tmp_path / "truth.fits")
    Table({"RA": ra, "DEC": [d + 30 / 3600 for d in dec], "Total_flux": [1000 * f for f in flux],
           "E_Total_flux": [100 * f for f in flux]}).write(tmp_path / "north_mjy.fits")
    proc = hpcddf("quality", FIELD, "--work-root", str(demo["home"] / "work"),
                  "--catalogue", f"TRUTH={tmp_path / 'truth.fits'}:60",
                  "--catalogue", f"NORTH={tmp_path / 'north_mjy.fits'}:60:1000",
                  "--min-matches", "3", "--json", home=demo["home"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    truth, north = doc["catalogues"]["TRUTH"], doc["catalogues"]["NORTH"]
    assert truth["matches"] == 6 and north["matches"] == 6 and truth["used"]
    assert abs(truth["dRA_arcsec"]["value"]) < 6 and abs(truth["dDEC_arcsec"]["value"]) < 6
    assert north["dDEC_arcsec"]["value"] == pytest.approx(truth["dDEC_arcsec"]["value"] - 30, abs=0.5)
    # the int image (what the quality pipeline measures) is the app image divided by DDFacet's
    # normalisation by the DD amplitude solutions, even without a beam model (0.91-0.96 x the
    # app image at the sources here): the expected ratio is that normalisation at each source
    # times the app image's own flux ratio, averaged. Measured: 0.922 vs 0.921 expected and
    # 0.916 vs 0.911 (two reductions); the ratio's own 68 % interval is +-0.006. +-0.03 is
    # three times the worst difference seen; the old +-0.15 around 1.0 would pass a 7 % error.
    assert truth["flux_ratio"]["value"] == pytest.approx(_expected_int_flux_ratio(demo), abs=0.03)
    assert north["flux_ratio"]["value"] == pytest.approx(truth["flux_ratio"]["value"], rel=1e-6)
    # peak / worst pixel within 10 beams (the quality pipeline's DR), far below peak / rms (~300):
    # set by the brightest source's residual sidelobes. Measured 48 and 52 in two reductions, its
    # own 68 % interval 32-68 (six sources): 30-75 holds that spread and fails a reduction whose
    # residuals doubled (DR ~25) or whose image lost its sidelobes to a bug (DR >> 100). The old
    # "> 50" was for the 120" restoring beam; "> 20" passed a reduction half as good.
    assert 30 <= doc["dynamic_range"]["value"] <= 75
    # the final image's rms: 15.4 and 16.4 mJy/beam measured (residual calibration errors and
    # sidelobes, far above the thermal 0.2 mJy); two-sided, so that neither a noisier image nor
    # one whose rms is not measured on the residual (rms ~0) passes
    assert 0.010 <= doc["rms_jy"] <= 0.025
    qdir = demo["workdir"] / "quality"
    assert (qdir / "quality.json").is_file() and (qdir / "quality.png").is_file()
    assert "flux ratio LOFAR/TRUTH" in (qdir / "quality.txt").read_text()
    status = hpcddf("status", FIELD, "--work-root", str(demo["home"] / "work"), home=demo["home"])
    assert "quality" in status.stdout and "DR " in status.stdout
    shown = json.loads(hpcddf("status", FIELD, "--work-root", str(demo["home"] / "work"), "--json",
                              home=demo["home"]).stdout)[0]["quality"]
    assert "TRUTH: dRA" in shown["summary"] and shown["report"].endswith("quality/quality.txt")
