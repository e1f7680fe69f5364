"""The flux-scale bootstrap inside the real reduction: a simulated field whose four subbands
carry flux-scale errors is reduced with DDFacet and killMS up to and including the bootstrap
step; the SCALED_DATA it writes must carry the true flux scale again (within 5 %).

The external catalogues are the true sky (flat spectra) at 74 and 327 MHz, as VLSS and WENSS
would be for a real field; they are local files, nothing needs the network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.science.conftest import hpcddf

pytestmark = pytest.mark.timeout(3600)

FLUX_SCALE = (0.85, 1.0, 1.12, 0.93)  # injected per subband: the sky in MS k is multiplied by it


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from hpcddf.lofar.simulate import (
        DEFAULT_SOURCES,
        SimSpec,
        simulate_field,
        write_catalogue,
        write_tgss_catalogue,
    )
    home = tmp_path_factory.mktemp("bootstrap")
    work = home / "work"
    wd = work / "SIMB"
    sim = simulate_field(wd, SimSpec(n_ms=4, ntime=30, flux_scale=FLUX_SCALE))
    (wd / "mslist.txt").write_text("".join(f"{p.name}\n" for p in sim.ms))  # the bootstrap needs >= 4 subbands
    cats = home / "cats"
    cats.mkdir()
    write_catalogue(cats / "VLSS.fits", DEFAULT_SOURCES)
    write_catalogue(cats / "WENSS.fits", DEFAULT_SOURCES)
    write_tgss_catalogue(cats / "TGSS.fits", DEFAULT_SOURCES)
    cfg = (wd / "hpcddf.cfg").read_text().replace("bootstrap = False", "bootstrap = True")
    # ddf-pipeline masks the bootstrap clean with TGSS sources: without them the fainter
    # sources stay uncleaned and PyBDSF finds a third of their flux
    cfg = cfg.replace("tgss = None", f"tgss = {cats}/TGSS.fits")
    # the bootstrap's "low resolution" is the simulated field's own grid (a coarser one makes
    # DDFacet's padded 4-band convolution functions take ~20 GB), and its beam the ~50" PSF of
    # this 16-station array: a restoring beam much wider than the PSF weights the residual by
    # their area ratio and PyBDSF's integrated fluxes then scatter by tens of per cent
    cfg = cfg.replace("[image]\n", "[image]\nlow_psf_arcsec = 60\nlow_cell = 20\nlow_imsize = 600\nlow_robust = -0.5\n")
    cfg += (f"\n[bootstrap]\ncatalogues = ['{cats}/VLSS.fits', '{cats}/WENSS.fits']\n"
            "names = ['VLSS', 'WENSS']\nradii = [40, 40]\nfrequencies = [74e6, 327e6]\n")
    (wd / "hpcddf.cfg").write_text(cfg)
    out = hpcddf("submit", "SIMB", "--site", "local", "--work-root", str(work),
                 "--control-exitafter=bootstrap", home=home, timeout=3400)
    return {"wd": wd, "sim": sim, "out": out}


def test_bootstrap_step_runs_in_the_reduction(field):
    wd, out = field["wd"], field["out"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the step's done-marker (written last, when its commands ran and its outputs exist)
    done = wd / ".hpcddf" / "done"
    assert (done / "bootstrap.done.json").is_file(), sorted(p.name for p in done.glob("*"))
    marker = json.loads((done / "bootstrap.done.json").read_text())
    assert (marker["step"], marker["stage"]) == ("bootstrap", "bootstrap"), marker
    products = {"image_bootstrap_SIM.cube.int.restored.fits", "image_bootstrap.app.mean.fits",
                "SIM-bootstrap-factors.json"}
    assert set(marker["outputs"]) == products, marker["outputs"]
    ran = {arg for argv in marker["commands"] for arg in argv}
    assert {"bootstrap-fit", "bootstrap-apply"} <= ran, marker["commands"]
    for name in products:
        assert (wd / name).is_file(), name


def test_scaled_data_carries_the_true_flux_scale(field):
    from casacore.tables import table
    wd, sim = field["wd"], field["sim"]
    doc = json.loads((wd / "SIM-bootstrap-factors.json").read_text())
    assert doc["n_sources"] >= 4
    for ms, injected in zip(sim.ms, FLUX_SCALE):
        with table(str(ms), ack=False) as t:
            raw = t.getcol("CORRECTED_DATA", 0, 2000)
            scaled = t.getcol("SCALED_DATA", 0, 2000)
            assert "DATA_DI_CORRECTED_SCALED" in t.colnames()
        ok = np.abs(raw) > 0
        factor = np.median((scaled[ok] / raw[ok]).real)
        assert np.allclose(scaled, raw * factor, rtol=1e-5, atol=1e-6)
        # the data's flux scale is the truth again: injected x fitted within 5 %
        assert injected * factor == pytest.approx(1.0, abs=0.05), (ms.name, injected, factor, doc["factors"])


def test_scaled_data_is_the_fitted_factor_times_the_source_column(field):
    from casacore.tables import table

    from hpcddf.lofar.bootstrap import load_result
    wd, sim = field["wd"], field["sim"]
    fit, _ = load_result(str(wd / "SIM-bootstrap-factors.json"))
    assert fit.n_sources >= 4 and np.all((fit.factors > 0.5) & (fit.factors < 2.0))
    for ms in sim.ms:
        with table(str(ms), ack=False) as t:
            raw = t.getcol("CORRECTED_DATA", 0, 2000)
            scaled = t.getcol("SCALED_DATA", 0, 2000)
            di, di_scaled = t.getcol("DATA_DI_CORRECTED", 0, 2000), t.getcol("DATA_DI_CORRECTED_SCALED", 0, 2000)
            with table(f"{ms}::SPECTRAL_WINDOW", ack=False) as spw:
                freq = float(spw.getcol("REF_FREQUENCY")[0])
        factor = fit.factor_at(freq)
        assert np.allclose(scaled, raw * factor, rtol=1e-5, atol=1e-6), ms.name
        assert np.allclose(di_scaled, di * factor, rtol=1e-5, atol=1e-6), ms.name


def test_a_rerun_of_the_apply_never_scales_twice(field):
    from casacore.tables import table

    from hpcddf.lofar.bootstrap import apply_factors
    wd, sim = field["wd"], field["sim"]
    ms = str(sim.ms[0])
    with table(ms, ack=False) as t:
        before = t.getcol("SCALED_DATA", 0, 100)
    apply_factors(str(wd / "SIM-bootstrap-factors.json"), [ms], "CORRECTED_DATA", "DATA_DI_CORRECTED")
    with table(ms, ack=False) as t:
        assert np.array_equal(t.getcol("SCALED_DATA", 0, 100), before)


def test_plot_factors_draws_the_spectra(field, tmp_path):
    out = hpcddf("plot-factors", "SIMB", "--work-root", str(field["wd"].parent), "--out",
                 str(tmp_path / "f.png"), home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
