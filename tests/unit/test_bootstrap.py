"""The flux-scale bootstrap on synthetic catalogues with known truth, and SCALED_DATA."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from hpcddf.lofar.bootstrap import (
    Catalogue,
    Matched,
    crossmatch,
    factor_at,
    log_prob,
    outliers,
    profile_chi2,
    run_fit,
)
from hpcddf.sky import unique_matches

CHAN = np.linspace(120e6, 168e6, 6)
CATS = np.array([74e6, 327e6])
TRUE = np.array([1.15, 0.92, 1.08, 0.95, 1.10, 0.88])


def synthetic(nsrc: int = 60, seed: int = 1, n_bad: int = 0) -> tuple[Matched, np.ndarray]:
    """Power-law sources; LOFAR channels observed as truth / TRUE (so the factors are TRUE)."""
    rng = np.random.default_rng(seed)
    norm = np.exp(rng.uniform(np.log(0.5), np.log(5.0), nsrc))
    alpha = rng.normal(-0.8, 0.15, nsrc)
    freqs = np.concatenate([CHAN, CATS])
    true = norm[:, None] * (freqs / 140e6) ** alpha[:, None]
    rel = np.concatenate([np.full(len(CHAN), 0.03), [0.10, 0.05]])
    obs = true * (1 + rel * rng.standard_normal(true.shape))
    obs[:, :len(CHAN)] /= TRUE
    err = true * rel  # quoted errors independent of the noise drawn
    err[:, :len(CHAN)] /= TRUE
    if n_bad:
        obs[:n_bad, -1] *= 3.0   # a variable source or a wrong match: no power law through 327 MHz
    scaled = np.concatenate([np.ones(len(CHAN), bool), np.zeros(len(CATS), bool)])
    return Matched(freqs, scaled, obs, err), alpha


def test_profile_chi2_finds_the_best_power_law():
    freqs = np.array([60e6, 140e6, 300e6, 1400e6])
    flux = 2.0 * (freqs / 140e6) ** -0.7
    assert profile_chi2(flux[None], np.full((1, 4), 0.01), freqs)[0] < 1e-6
    noisy = flux * np.array([1.0, 1.02, 0.99, 1.0])
    from scipy.optimize import curve_fit
    p, _ = curve_fit(lambda f, n, a: n * (f / 140e6) ** a, freqs, noisy, p0=[2, -0.7], sigma=0.01 * noisy)
    best = np.sum(((noisy - p[0] * (freqs / 140e6) ** p[1]) / (0.01 * noisy)) ** 2)
    assert profile_chi2(noisy[None], 0.01 * noisy[None], freqs)[0] == pytest.approx(best, rel=1e-3)


def test_injected_channel_factors_are_recovered_within_their_errors():
    m, _ = synthetic()
    res = run_fit(m, nsteps=400, burn=150, seed=3)
    err = res.errors
    assert res.rejected == 0 and res.n_sources == 60
    assert np.all(np.abs(res.factors - TRUE) < 3 * err + 0.005), (res.factors, err)
    assert np.all(err < 0.05)


def test_outliers_are_rejected_and_the_second_pass_recovers_the_factors():
    m, _ = synthetic(n_bad=5, seed=2)
    res = run_fit(m, nsteps=400, burn=150, seed=4)
    assert res.rejected == 5 and res.n_sources == 55
    assert np.all(np.abs(res.factors - TRUE) < 3 * res.errors + 0.005), (res.factors, res.errors)
    assert outliers(m, res.factors)[:5].all() and not outliers(m, res.factors)[5:].any()


def test_prior_bounds_and_scaled_errors():
    m, _ = synthetic(nsrc=10)
    assert np.isneginf(log_prob(np.full(6, 2.5), m))[0]
    assert np.isneginf(log_prob(np.full(6, 0.4), m))[0]
    assert np.isfinite(log_prob(TRUE, m))[0]
    assert log_prob(TRUE, m)[0] > log_prob(np.ones(6), m)[0]


def test_factors_are_piecewise_linear_and_extrapolate():
    f = np.array([120e6, 140e6, 160e6])
    s = np.array([1.0, 1.2, 1.1])
    assert factor_at(f, s, 130e6) == pytest.approx(1.1)
    assert factor_at(f, s, 170e6) == pytest.approx(1.05)
    assert factor_at(f, s, 110e6) == pytest.approx(0.9)


def write_cat(path, ra, dec, flux, err=None):
    Table({"RA": ra, "DEC": dec, "Total_flux": flux,
           "E_Total_flux": err if err is not None else 0.1 * np.asarray(flux)}).write(path)
    return str(path)


def test_crossmatch_needs_a_unique_match_in_every_group_and_isolation(tmp_path):
    ra = np.array([100.0, 100.5, 101.0, 101.5, 101.5 + 50 / 3600, 99.0, 108.0])
    dec = np.full(7, 40.0)
    total = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 1.0])
    chan = np.ones((7, 2))
    # VLSS (group 1): matches 0, 1, 2 (two entries near 2: not unique); WENSS and NVSS (group 2)
    vlss = write_cat(tmp_path / "vlss.fits", [100.0, 100.5, 101.0, 101.0 + 20 / 3600, 99.0, 108.0],
                     [40.0] * 6, [3.0] * 6)
    wenss = write_cat(tmp_path / "wenss.fits", [100.0 + 3 / 3600, 99.0], [40.0, 40.0], [0.5, 0.5])
    nvss = write_cat(tmp_path / "nvss.fits", [100.5, 101.0, 108.0], [40.0] * 3, [0.1] * 3)
    cats = [Catalogue("VLSS", vlss, 74e6, 40, 1), Catalogue("WENSS", wenss, 327e6, 10, 2),
            Catalogue("NVSS", nvss, 1400e6, 30, 2)]
    m = crossmatch(ra, dec, total, chan, 0.1 * chan, [140e6, 150e6], cats, (100.5, 40.0), radius_deg=2.5)
    # 0: VLSS + WENSS; 1: VLSS + NVSS; 2: VLSS not unique; 3/4: not isolated; 5: too faint; 6: too far
    assert list(np.round(m.ra, 3)) == [100.0, 100.5]
    assert m.freqs.tolist() == [140e6, 150e6, 74e6, 327e6, 1400e6]
    assert m.scaled.tolist() == [True, True, False, False, False]
    assert m.flux[0, 3] == 0.5 and np.isnan(m.flux[0, 4]) and m.flux[1, 4] == 0.1
    assert unique_matches(np.array([101.0]), np.array([40.0]), np.array([101.0, 101.0 + 20 / 3600]),
                          np.array([40.0, 40.0]), 40)[0] == -1


def test_scaled_data_is_the_factor_times_the_column_and_never_applied_twice(tmp_path):
    from casacore.tables import table

    from hpcddf.lofar.bootstrap import apply_scaling
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    ms = str(simulate_field(tmp_path / "sim", SimSpec(n_ms=1, nant=6, ntime=5)).ms[0])
    with table(ms, ack=False) as t:
        data = t.getcol("DATA")
    assert apply_scaling(ms, 1.25, "DATA", rows_per_chunk=7) is True
    with table(ms, ack=False) as t:
        assert "SCALED_DATA" in t.colnames() and "SCALED_DATA_HPCDDF_PARTIAL" not in t.colnames()
        assert np.allclose(t.getcol("SCALED_DATA"), 1.25 * data)
    assert apply_scaling(ms, 1.25, "DATA") is False
    with table(ms, ack=False) as t:
        assert np.allclose(t.getcol("SCALED_DATA"), 1.25 * data)


def test_channel_fluxes_come_from_pybdsf_per_channel_columns():
    from hpcddf.lofar.bootstrap import BootstrapError, channel_fluxes
    t = Table({"RA": [1.0, 2.0], "Total_flux": [1.0, 2.0],
               "Total_flux_ch1": [0.9, 1.8], "E_Total_flux_ch1": [0.1, 0.2], "Freq_ch1": [120e6, 120e6],
               "Total_flux_ch2": [1.1, np.nan], "E_Total_flux_ch2": [0.1, np.nan], "Freq_ch2": [150e6, 150e6]})
    flux, err, freqs = channel_fluxes(t)
    assert flux.shape == (2, 2) and flux[1, 0] == 1.8 and np.isnan(flux[1, 1])
    assert err[0].tolist() == [0.1, 0.1] and freqs.tolist() == [120e6, 150e6]
    with pytest.raises(BootstrapError, match="incl_chan"):
        channel_fluxes(Table({"RA": [1.0], "Total_flux": [1.0]}))
