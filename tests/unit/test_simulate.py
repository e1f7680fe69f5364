"""The simulated field: real casacore MSs in tmp_path, checked against the physics they encode."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests._require import need

np = need("numpy", "science")
ct = need("casacore.tables", "science")

from hpcddf.errors import HpcddfError
from hpcddf.lofar.config import load_config
from hpcddf.lofar.simulate import (
    ARRAY_RADIUS_M,
    CS002_ITRF,
    DEFAULT_SOURCES,
    NODES_DTYPE,
    SimResult,
    SimSpec,
    Source,
    enu_basis,
    read_skymodel,
    simulate_field,
)

C = 299_792_458.0
SMALL = SimSpec(n_ms=2, nant=8, ntime=10)
NBL = SMALL.nant * (SMALL.nant - 1) // 2


def table(path: Path | str, sub: str | None = None):
    return ct.table(str(path) + (f"/{sub}" if sub else ""), ack=False)


def column(path: Path | str, name: str, sub: str | None = None) -> np.ndarray:
    with table(path, sub) as t:
        return t.getcol(name)


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> SimResult:
    """The default sky, small array, 30 deg of DDE phases, with noise."""
    spec = SimSpec(n_ms=2, nant=8, ntime=10, dde_rms_deg=30.0)
    return simulate_field(tmp_path_factory.mktemp("field") / "sim", spec)


def nearest_node(src: Source, nodes: np.ndarray) -> int:
    ra, dec = math.radians(src.ra_deg), math.radians(src.dec_deg)
    cosd = (np.sin(dec) * np.sin(nodes["dec"])
            + np.cos(dec) * np.cos(nodes["dec"]) * np.cos(nodes["ra"] - ra))
    return int(np.argmax(cosd))


def expected_vis(ms: Path, sources: tuple[Source, ...], phases: np.ndarray | None = None,
                 nodes: np.ndarray | None = None, sign: float = +1.0) -> np.ndarray:
    """XX from the MS's own UVW, TIME and CHAN_FREQ with the documented convention."""
    uvw = column(ms, "UVW")
    a1, a2 = column(ms, "ANTENNA1"), column(ms, "ANTENNA2")
    tidx = np.unique(column(ms, "TIME"), return_inverse=True)[1]
    freqs = column(ms, "CHAN_FREQ", "SPECTRAL_WINDOW")[0]
    ra0, dec0 = column(ms, "PHASE_DIR", "FIELD")[0, 0]
    vis = np.zeros((len(uvw), len(freqs)), dtype=complex)
    for src in sources:
        ra, dec = math.radians(src.ra_deg), math.radians(src.dec_deg)
        l_ = math.cos(dec) * math.sin(ra - ra0)
        m_ = math.sin(dec) * math.cos(dec0) - math.cos(dec) * math.sin(dec0) * math.cos(ra - ra0)
        n_ = math.sqrt(1 - l_**2 - m_**2)
        path = uvw @ np.array([l_, m_, n_ - 1])
        term = src.flux_jy * np.exp(sign * 2j * np.pi * path[:, None] * freqs[None, :] / C)
        if phases is not None:
            d = nearest_node(src, nodes)
            term *= np.exp(1j * (phases[tidx, a1, d] - phases[tidx, a2, d]))[:, None]
        vis += term
    return vis


# ------------------------------------------------------------------------------ the files


def test_writes_every_file(field: SimResult) -> None:
    out = field.outdir
    assert [p.name for p in field.ms] == ["SIM_SB000.ms", "SIM_SB001.ms"]
    assert all(p.parent == out and p.is_dir() for p in field.ms)
    for p in (field.skymodel, field.nodes, field.phases, field.config):
        assert p is not None and p.is_file() and p.parent == out
    assert (out / "mslist.txt").read_text() == "SIM_SB000.ms\n"
    assert (out / "big-mslist.txt").read_text() == "SIM_SB000.ms\nSIM_SB001.ms\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_main_table(field: SimResult) -> None:
    ms = field.ms[0]
    with table(ms) as t:
        assert t.nrows() == SMALL.ntime * NBL
        a1, a2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
        assert (a1 < a2).all()  # cross baselines only
        times = t.getcol("TIME")
        assert len(np.unique(times)) == SMALL.ntime
        for tt in np.unique(times):
            pairs = {(p, q) for p, q, x in zip(a1, a2, times) if x == tt}
            assert len(pairs) == NBL
        assert np.allclose(np.diff(np.unique(times)), SMALL.dt_s)
        assert 4.0e9 < times.min() < 6.0e9  # MJD seconds
        assert (t.getcol("INTERVAL") == SMALL.dt_s).all()
        assert (t.getcol("EXPOSURE") == SMALL.dt_s).all()
        assert (t.getcol("TIME_CENTROID") == times).all()
        for name in ("DATA_DESC_ID", "FIELD_ID", "STATE_ID", "PROCESSOR_ID", "ARRAY_ID",
                     "OBSERVATION_ID"):
            assert (t.getcol(name) == 0).all(), name
        data = t.getcol("DATA")
        assert data.shape == (t.nrows(), SMALL.nchan, 4)
        assert (t.getcol("CORRECTED_DATA") == data).all()
        assert (t.getcol("MODEL_DATA") == 0).all()
        assert not t.getcol("FLAG").any() and not t.getcol("FLAG_ROW").any()
        assert (t.getcol("WEIGHT") == 1).all() and (t.getcol("SIGMA") == 1).all()
        assert (t.getcol("WEIGHT_SPECTRUM") == 1).all()
        assert t.getcolkeyword("UVW", "MEASINFO")["Ref"] == "J2000"


def test_subtables(field: SimResult) -> None:
    ms = field.ms[0]
    assert column(ms, "TELESCOPE_NAME", "OBSERVATION") == ["LOFAR"]
    assert column(ms, "CORR_TYPE", "POLARIZATION").tolist() == [[9, 10, 11, 12]]
    assert column(ms, "NUM_CORR", "POLARIZATION").tolist() == [4]
    assert column(ms, "CORR_PRODUCT", "POLARIZATION")[0].tolist() == [[0, 0], [0, 1], [1, 0],
                                                                      [1, 1]]
    assert column(ms, "NUM_CHAN", "SPECTRAL_WINDOW").tolist() == [SMALL.nchan]
    assert column(ms, "MEAS_FREQ_REF", "SPECTRAL_WINDOW").tolist() == [5]  # TOPO
    with table(ms, "SPECTRAL_WINDOW") as spw:
        assert spw.getcolkeyword("CHAN_FREQ", "MEASINFO")["TabRefTypes"][5] == "TOPO"
    assert column(ms, "SPECTRAL_WINDOW_ID", "DATA_DESCRIPTION").tolist() == [0]
    with table(ms, "ANTENNA") as ant:
        assert ant.nrows() == SMALL.nant
        assert set(ant.getcol("STATION")) == {"LOFAR"}
        assert all(n[:2] in ("CS", "RS") for n in ant.getcol("NAME"))
        assert ant.getcol("POSITION").shape == (SMALL.nant, 3)
    assert column(ms, "NUM_RECEPTORS", "FEED").tolist() == [2] * SMALL.nant
    phase_dir = column(ms, "PHASE_DIR", "FIELD")
    assert np.allclose(phase_dir[0, 0], [math.pi, math.radians(60.0)])  # radians
    assert np.allclose(column(ms, "DELAY_DIR", "FIELD"), phase_dir)
    times = column(ms, "TIME")
    t0, t1 = column(ms, "TIME_RANGE", "OBSERVATION")[0]
    assert t0 <= times.min() and times.max() <= t1


def test_subbands_follow_on(field: SimResult) -> None:
    f0 = column(field.ms[0], "CHAN_FREQ", "SPECTRAL_WINDOW")[0]
    f1 = column(field.ms[1], "CHAN_FREQ", "SPECTRAL_WINDOW")[0]
    w = SMALL.chan_width_hz
    assert np.allclose(f0, SMALL.freq0_hz + w * np.arange(SMALL.nchan))
    assert np.allclose(f1, f0 + SMALL.nchan * w)
    assert np.allclose(column(field.ms[1], "CHAN_WIDTH", "SPECTRAL_WINDOW"), w)
    # one sky, one ionosphere: same times and UVW in every subband
    assert (column(field.ms[0], "UVW") == column(field.ms[1], "UVW")).all()


# ------------------------------------------------------------------------------ geometry


def test_stations_on_the_horizon_plane(field: SimResult) -> None:
    pos = column(field.ms[0], "POSITION", "ANTENNA")
    enu = (pos - np.asarray(CS002_ITRF)) @ enu_basis(CS002_ITRF).T
    assert np.abs(enu[:, 2]).max() < 1.0  # metres off the plane
    assert np.hypot(enu[:, 0], enu[:, 1]).max() <= ARRAY_RADIUS_M + 1e-6
    sv = np.linalg.svd(enu[:, :2] - enu[:, :2].mean(axis=0), compute_uv=False)
    assert sv[1] / sv[0] > 0.2  # spread in 2-D, not along a line


def test_uvw_is_casacores(field: SimResult) -> None:
    """casacore's own UVW calculation from ANTENNA, FIELD and TIME gives our UVW column, so
    UVW = uvw(ANTENNA2) - uvw(ANTENNA1) in J2000, as DDFacet and DP3 expect."""
    with table(field.ms[0]) as t:
        q = ct.taql("select mscal.uvwj2000() as J2000UVW, UVW from $1", tables=[t])
        assert np.abs(q.getcol("J2000UVW") - q.getcol("UVW")).max() < 1e-3


def test_uvw_geometry(field: SimResult) -> None:
    """Independently of casacore: the textbook rotation of ITRF baselines X(ant2) - X(ant1)
    (ignoring precession, so to about 1 %), closure, and baseline lengths."""
    ms = field.ms[0]
    uvw, a1, a2 = column(ms, "UVW"), column(ms, "ANTENNA1"), column(ms, "ANTENNA2")
    times = column(ms, "TIME")
    pos = column(ms, "POSITION", "ANTENNA")
    b = pos[a2] - pos[a1]
    gmst = 2 * np.pi * ((18.697374558 + 24.06570982441908 * (times / 86400 - 51544.5)) / 24 % 1)
    h, dec = gmst - math.pi, math.radians(60.0)  # Greenwich hour angle of RA 180
    sd, cd = math.sin(dec), math.cos(dec)
    ref = np.stack([np.sin(h) * b[:, 0] + np.cos(h) * b[:, 1],
                    -sd * np.cos(h) * b[:, 0] + sd * np.sin(h) * b[:, 1] + cd * b[:, 2],
                    cd * np.cos(h) * b[:, 0] - cd * np.sin(h) * b[:, 1] + sd * b[:, 2]], axis=1)
    length = np.linalg.norm(b, axis=1)
    assert (np.linalg.norm(uvw - ref, axis=1) <= 0.01 * length + 0.5).all()
    assert np.allclose(np.linalg.norm(uvw, axis=1), length, rtol=1e-9)
    assert length.max() <= 2 * ARRAY_RADIUS_M and length.max() > 1000
    # per time: UVW(p, q) = UVW(0, q) - UVW(0, p)
    for tt in np.unique(times)[:3]:
        sel = times == tt
        from0 = {int(q): u for p, q, u in zip(a1[sel], a2[sel], uvw[sel]) if p == 0}
        from0[0] = np.zeros(3)
        for p, q, u in zip(a1[sel], a2[sel], uvw[sel]):
            assert np.allclose(u, from0[int(q)] - from0[int(p)], atol=1e-6)


# ------------------------------------------------------------------------------ visibilities


def test_source_at_phase_centre(tmp_path: Path) -> None:
    spec = SimSpec(n_ms=1, nant=6, ntime=4, noise_jy=0.0, ndir=1,
                   sources=(Source("C", 180.0, 60.0, 2.5),))
    res = simulate_field(tmp_path / "c", spec)
    data = column(res.ms[0], "DATA")
    assert np.allclose(data[..., 0], 2.5, atol=1e-5)
    assert np.allclose(data[..., 3], 2.5, atol=1e-5)
    assert (data[..., 1] == 0).all() and (data[..., 2] == 0).all()


def test_sign_convention_end_to_end(tmp_path: Path) -> None:
    """V = S exp(+2 pi i (u l + v m + w (n - 1))) with the stored UVW and CHAN_FREQ."""
    src = Source("A", 181.5, 60.7, 3.0)
    spec = SimSpec(n_ms=1, nant=8, ntime=6, noise_jy=0.0, ndir=1, sources=(src,))
    ms = simulate_field(tmp_path / "a", spec).ms[0]
    data = column(ms, "DATA")
    want = expected_vis(ms, (src,))
    assert np.abs(data[..., 0] - want).max() < 1e-4
    assert np.abs(data[..., 3] - want).max() < 1e-4
    assert (data[..., 1] == 0).all()
    mirrored = expected_vis(ms, (src,), sign=-1.0)
    assert np.abs(data[..., 0] - mirrored).max() > 1.0  # the test can tell the two apart


def test_dde_jones_model(tmp_path: Path) -> None:
    """V_pq = sum_s S_s exp(i(phi_p,d(s) - phi_q,d(s))) exp(+2 pi i ...), d(s) the nearest node."""
    spec = SimSpec(n_ms=1, nant=6, ntime=5, noise_jy=0.0, dde_rms_deg=40.0)
    res = simulate_field(tmp_path / "d", spec)
    phases = np.load(res.phases)["phases_rad"]
    nodes = np.load(res.nodes)
    data = column(res.ms[0], "DATA")
    want = expected_vis(res.ms[0], spec.sources, phases, nodes)
    assert np.abs(data[..., 0] - want).max() < 1e-3
    assert np.abs(data[..., 0] - expected_vis(res.ms[0], spec.sources)).max() > 1.0


def test_noise_level(field: SimResult) -> None:
    xy = column(field.ms[0], "DATA")[..., 1]
    assert np.std(xy.real) == pytest.approx(0.05, rel=0.1)
    assert np.std(xy.imag) == pytest.approx(0.05, rel=0.1)
    # independent noise per subband
    assert not np.allclose(xy, column(field.ms[1], "DATA")[..., 1])


# ------------------------------------------------------------------------------ DDE truth


def test_dde_phases_file(field: SimResult) -> None:
    z = np.load(field.phases)
    ph = z["phases_rad"]
    assert ph.shape == (SMALL.ntime, SMALL.nant, SMALL.ndir)
    rms = math.degrees(float(np.sqrt((ph**2).mean())))
    assert rms == pytest.approx(30.0, rel=0.3)
    assert np.allclose(z["times"], np.unique(column(field.ms[0], "TIME")))
    # offset + linear drift in time
    assert np.allclose(np.diff(ph, n=2, axis=0), 0, atol=1e-12)
    nodes = np.load(field.nodes)
    assert np.allclose(z["node_ra_rad"], nodes["ra"]) and np.allclose(z["node_dec_rad"],
                                                                      nodes["dec"])


def test_nodes(field: SimResult) -> None:
    nodes = np.load(field.nodes)
    assert nodes.dtype == NODES_DTYPE
    assert nodes["Cluster"].tolist() == [0, 1, 2]
    # radians, within 1.5 deg of the phase centre
    assert np.abs(nodes["ra"] - math.pi).max() < math.radians(3.5)
    assert np.abs(nodes["dec"] - math.radians(60)).max() < math.radians(1.5)
    assert nodes["SumI"].sum() == pytest.approx(sum(s.flux_jy for s in DEFAULT_SOURCES))
    groups: dict[int, list[Source]] = {}
    for s in DEFAULT_SOURCES:
        groups.setdefault(nearest_node(s, nodes), []).append(s)
    assert sorted(groups) == [0, 1, 2]
    for d, members in groups.items():
        assert nodes["SumI"][d] == pytest.approx(sum(s.flux_jy for s in members))
        assert max(s.flux_jy for s in members) >= 2.0
    assert sorted(sorted(s.name for s in g) for g in groups.values()) == [
        ["S1", "S5"], ["S2", "S6"], ["S3", "S4"]]
    # not collinear: the triangle of the nodes (tangent plane, degrees) has a real area
    x = np.degrees((nodes["ra"] - math.pi) * np.cos(nodes["dec"]))
    y = np.degrees(nodes["dec"] - math.radians(60))
    area = 0.5 * abs((x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0]))
    assert area > 0.3  # deg^2


def test_no_dde_no_phases_file(tmp_path: Path) -> None:
    res = simulate_field(tmp_path / "n", SimSpec(n_ms=1, nant=4, ntime=2))
    assert res.phases is None and not (tmp_path / "n" / "true_dde_phases.npz").exists()
    assert res.nodes.is_file()


def test_collinear_nodes_refused(tmp_path: Path) -> None:
    line = tuple(Source(f"L{i}", 180.0, 59.0 + 0.4 * i, 2.0) for i in range(6))
    with pytest.raises(HpcddfError, match="line"):
        simulate_field(tmp_path / "l", SimSpec(n_ms=1, nant=4, ntime=2, sources=line))
    assert not (tmp_path / "l" / "SIM_SB000.ms").exists()


def test_bad_spec_refused(tmp_path: Path) -> None:
    with pytest.raises(HpcddfError, match="ndir"):
        simulate_field(tmp_path / "b", SimSpec(ndir=7))
    with pytest.raises(HpcddfError, match="nant"):
        simulate_field(tmp_path / "b", SimSpec(nant=1))


# ------------------------------------------------------------------------------ safety


def test_refuses_to_overwrite_an_ms(tmp_path: Path) -> None:
    spec = SimSpec(n_ms=2, nant=4, ntime=2)
    res = simulate_field(tmp_path / "o", spec)
    before = column(res.ms[0], "DATA")
    with pytest.raises(HpcddfError, match="SIM_SB000.ms already exists") as exc:
        simulate_field(tmp_path / "o", SimSpec(n_ms=2, nant=4, ntime=2, seed=7))
    assert exc.value.hint
    assert (column(res.ms[0], "DATA") == before).all()


def test_refuses_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "p"
    (out / "SIM_SB001.ms").mkdir(parents=True)
    with pytest.raises(HpcddfError, match="SIM_SB001.ms"):
        simulate_field(out, SimSpec(n_ms=2, nant=4, ntime=2))
    assert sorted(p.name for p in out.iterdir()) == ["SIM_SB001.ms"]


def test_leftover_temporary_ms_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "t"
    (out / ".SIM_SB000.ms.tmp").mkdir(parents=True)
    (out / ".SIM_SB000.ms.tmp" / "junk").write_text("half an MS")
    res = simulate_field(out, SimSpec(n_ms=1, nant=4, ntime=2))
    assert not (out / ".SIM_SB000.ms.tmp").exists()
    assert not (res.ms[0] / "junk").exists()
    with table(res.ms[0]) as t:
        assert t.nrows() == 2 * 6


# ------------------------------------------------------------------------------ text files


def test_skymodel_round_trip(field: SimResult, tmp_path: Path) -> None:
    assert read_skymodel(field.skymodel) == list(DEFAULT_SOURCES)
    assert field.skymodel.read_text().startswith("#")
    odd = (Source("X1", 180.123456789012, 59.987654321098, 0.333333333333),)
    res = simulate_field(tmp_path / "s", SimSpec(n_ms=1, nant=4, ntime=2, ndir=1, sources=odd))
    assert read_skymodel(res.skymodel) == list(odd)


def test_skymodel_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("# name ra dec flux\nS1 180 60 1\nS2 180 sixty 1\n")
    with pytest.raises(HpcddfError, match="bad.txt:3"):
        read_skymodel(bad)


def test_config_loads(field: SimResult) -> None:
    cfg = load_config([str(field.config)])
    assert cfg["data"]["mslist"] == "mslist.txt"
    assert cfg["data"]["full_mslist"] == "big-mslist.txt"
    assert cfg["data"]["colname"] == "CORRECTED_DATA"
    assert cfg["image"]["imsize"] == 600 and cfg["image"]["cellsize"] == 20.0
    assert cfg["image"]["do_decorr"] is False and cfg["image"]["uvmin"] == 0.0
    assert cfg["image"]["beam_model"] is None  # no LOFAR station tables in the simulated MSs
    assert cfg["solutions"]["ndir"] == 3 and cfg["solutions"]["NChanSols"] == 1
    assert cfg["masking"]["thresholds"] == [10.0, 10.0, 6.0, 6.0]
    assert cfg["image"]["psf_arcsec"] == cfg["image"]["final_psf_arcsec"] == 70.0  # the PSF
    assert cfg["masking"]["tgss"] is None
    assert cfg["control"]["clearcache"] is False and cfg["control"]["bootstrap"] is False
    for name in ("mslist", "full_mslist"):
        for line in (field.outdir / cfg["data"][name]).read_text().split():
            assert (field.outdir / line).is_dir()


# ------------------------------------------------------------------------------ the program


def test_program(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    out = tmp_path / "cli"
    argv = [sys.executable, "-m", "hpcddf.lofar.simulate", str(out), "--n-ms", "1", "--ntime", "5"]
    proc = subprocess.run(argv, env=isolated_env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "SIM_SB000.ms" in proc.stdout and "skymodel.txt" in proc.stdout
    assert "SEVERE" not in proc.stderr and "Traceback" not in proc.stderr
    with table(out / "SIM_SB000.ms") as t:
        assert t.nrows() == 5 * 16 * 15 // 2
    again = subprocess.run(argv, env=isolated_env, capture_output=True, text=True, timeout=120,
                           check=False)
    assert again.returncode == 1
    assert again.stderr.startswith("hpcddf: error: ") and "already exists" in again.stderr


def test_dde_phase_screens_have_no_gradient_across_the_array() -> None:
    """A linear phase gradient only shifts a source, which self-calibration cannot correct."""
    from hpcddf.lofar.simulate import (
        dde_phases,
        integration_times,
        station_en,
        station_layout,
    )
    spec = SimSpec(nant=12, ntime=8, dde_rms_deg=20.0)
    _, itrf = station_layout(spec)
    en = station_en(itrf)
    assert np.hypot(en[:, 0], en[:, 1]).max() <= 2500.1
    phases = dde_phases(spec, integration_times(spec), en)
    design = np.column_stack([np.ones(len(en)), en])
    for t in range(spec.ntime):
        coef, *_ = np.linalg.lstsq(design, phases[t], rcond=None)
        assert np.abs(coef[1:]).max() < 1e-12  # radians per metre
    assert np.degrees(np.sqrt((phases ** 2).mean())) == pytest.approx(20.0)


def test_a_flux_scale_error_per_ms_scales_the_sky_only(tmp_path):
    base = SimSpec(n_ms=2, nant=6, ntime=4, noise_jy=0.0)
    plain = simulate_field(tmp_path / "a", base)
    scaled = simulate_field(tmp_path / "b", SimSpec(n_ms=2, nant=6, ntime=4, noise_jy=0.0, flux_scale=(1.2, 0.9)))
    for k, f in enumerate((1.2, 0.9)):
        assert np.allclose(column(scaled.ms[k], "DATA"), f * column(plain.ms[k], "DATA"), rtol=1e-5, atol=1e-6)
    with pytest.raises(HpcddfError, match="one positive factor per MS"):
        simulate_field(tmp_path / "c", SimSpec(n_ms=2, flux_scale=(1.0,)))


def test_the_true_sky_as_a_pybdsm_catalogue(tmp_path):
    from astropy.table import Table

    from hpcddf.lofar.simulate import DEFAULT_SOURCES, write_catalogue
    t = Table.read(write_catalogue(tmp_path / "vlss.fits", DEFAULT_SOURCES))
    assert t.colnames == ["RA", "DEC", "Total_flux", "E_Total_flux"] and len(t) == len(DEFAULT_SOURCES)
    assert t["Total_flux"][0] == DEFAULT_SOURCES[0].flux_jy


def test_w_kernels_reach_the_longest_baseline_of_a_short_array(tmp_path, caplog):
    """The simulated 16-station array is 4.5 km across: DDFacet gets that, not 50 km; the bound
    holds for every visibility; an unreadable MS keeps ddf-pipeline's value with a warning."""
    from hpcddf.lofar.ddfcommands import DDF_PIPELINE_WMAX_M, Image, Machine, ddf_image
    from hpcddf.lofar.recipes import cf_wmax_m
    sim = simulate_field(tmp_path / "f", SimSpec(n_ms=2, ntime=4))
    wmax = cf_wmax_m(list(sim.ms))
    with ct.table(str(sim.ms[0]), ack=False) as t:
        assert np.abs(t.getcol("UVW")[:, 2]).max() <= wmax
    assert 1000 < wmax < 10000
    cfg = load_config([str(sim.config)])
    m = Machine(ncpu_ddf=1, ncpu_kms=1, cache_dir=str(tmp_path), cf_wmax_m=wmax)
    assert f"--CF-wmax={wmax:.0f}" in ddf_image(cfg, m, Image("x", "mslist.txt", "DATA")).argv
    assert cf_wmax_m([tmp_path / "missing.ms"]) == DDF_PIPELINE_WMAX_M
    assert "w-kernels reach 50000 m" in caplog.text


# ------------------------------------------------------------------------------ the default field

# sha256 of the DATA column (complex64 bytes) of each MS, computed with the simulator as it was
# before polarisation and light curves were added: the default field must not move by one bit.
# In a fresh process, simulating SMALL and then SMALL with DD phases: casacore's measures reuse
# nutation/precession within an interval of the first epoch a process asks for, so the UVW (and
# DATA) of a field move by ~0.3 micron (1e-6 Jy) with what the same process simulated before.
FRESH_PROCESS_DATA_SHA256 = {
    ("small", "SIM_SB000.ms"): "b3f0541d763eeba851d9bfe9f70b1a65161b22dde1bcd5c11a9d58847a0b797c",
    ("small", "SIM_SB001.ms"): "76962681368e10943a9a91ef2e9b53c1d7c05b9721d432ab9b156dfd472a9821",
    ("dde", "SIM_SB000.ms"): "762c19fc752327c9393d139fcee34f19e18ee9c9f8a48b859b024b7c48927f03",
    ("dde", "SIM_SB001.ms"): "50d5c6ffe82f91fbfa04ea348e015c8cda6c1d2402b60a251c8a5fb256c7fd55",
}
FRESH_PROCESS_SCRIPT = """
import hashlib, sys
from pathlib import Path
from casacore import tables as ct
from hpcddf.lofar.simulate import SimSpec, simulate_field
for name, spec in (("small", SimSpec(n_ms=2, nant=8, ntime=10)),
                   ("dde", SimSpec(n_ms=2, nant=8, ntime=10, dde_rms_deg=30.0))):
    for ms in simulate_field(Path(sys.argv[1]) / name, spec).ms:
        with ct.table(str(ms), ack=False) as t:
            print(name, ms.name, hashlib.sha256(t.getcol("DATA").tobytes()).hexdigest())
"""


def test_the_default_field_is_bit_for_bit_unchanged(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(tmp_path)], env=isolated_env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    got = {(name, ms): digest for name, ms, digest in (line.split() for line in proc.stdout.splitlines())}
    assert got == FRESH_PROCESS_DATA_SHA256


# ------------------------------------------------------------------------------ polarisation


def at_centre(tmp_path: Path, src: Source, **kw) -> tuple[np.ndarray, np.ndarray]:
    """DATA (nrow, nchan, 4) of every MS side by side in frequency, and the frequencies."""
    spec = SimSpec(**{"nant": 4, "ntime": 2, "noise_jy": 0.0, "ndir": 1, "sources": (src,), **kw})
    res = simulate_field(tmp_path / src.name, spec)
    data = np.concatenate([column(ms, "DATA") for ms in res.ms], axis=1)
    freqs = np.concatenate([column(ms, "CHAN_FREQ", "SPECTRAL_WINDOW")[0] for ms in res.ms])
    return data, freqs


def test_rotation_measure_comes_back_from_the_visibilities(tmp_path: Path) -> None:
    """Q + iU = p I exp(2i (chi0 + RM lambda^2)): fit RM and chi0 from XX - YY and XY + YX."""
    src = Source("P", 180.0, 60.0, 2.0, pol_frac=0.6, rm_rad_m2=12.3, chi0_deg=25.0)
    data, freqs = at_centre(tmp_path, src, n_ms=2, nchan=8)
    xx, xy, yx, yy = (data[..., k].mean(axis=0) for k in range(4))  # at the centre: all rows alike
    q, u = (xx - yy) / 2, (xy + yx) / 2
    assert np.abs(q.imag).max() < 1e-5 and np.abs(u.imag).max() < 1e-5
    assert np.allclose((xx + yy) / 2, 2.0, atol=1e-5)
    pol = q.real + 1j * u.real
    assert np.allclose(np.abs(pol), 0.6 * 2.0, atol=1e-5)
    lam2 = (C / freqs) ** 2
    slope, icpt = np.polyfit(lam2, np.unwrap(np.angle(pol)), 1)
    assert slope / 2 == pytest.approx(12.3, abs=1e-3)  # rad/m^2
    assert math.degrees(icpt / 2) % 180 == pytest.approx(25.0, abs=0.05)
    assert np.ptp(np.unwrap(np.angle(pol))) > 2.0  # it did rotate across the band


def test_circular_polarisation_is_xy_minus_yx(tmp_path: Path) -> None:
    """XY - YX = 2iV, so V = -i (XY - YX) / 2 (DDFacet's and DynSpecMS's V) is +V."""
    from hpcddf.lofar.simulate import stokes_from_linear
    data, _ = at_centre(tmp_path, Source("V", 180.0, 60.0, 2.0, circ_frac=0.3), n_ms=1)
    assert np.allclose(data[..., 1] - data[..., 2], 2j * 0.6, atol=1e-5)
    assert np.allclose(data[..., 1] + data[..., 2], 0, atol=1e-6)
    assert np.allclose(data[..., 0], 2.0, atol=1e-5) and np.allclose(data[..., 3], 2.0, atol=1e-5)
    assert np.allclose(stokes_from_linear(data), [2.0, 0, 0, 0.6], atol=1e-5)


def test_dde_phases_are_the_same_on_every_correlation(tmp_path: Path) -> None:
    """An off-centre polarised source under DD phases: every correlation is the scalar-Jones
    XX of an unpolarised source times its own Stokes combination."""
    src = Source("Q", 181.0, 60.4, 3.0, pol_frac=0.5, rm_rad_m2=-4.0, chi0_deg=70.0, circ_frac=0.2)
    spec = SimSpec(n_ms=1, nant=6, ntime=5, noise_jy=0.0, ndir=1, dde_rms_deg=40.0, sources=(src,))
    res = simulate_field(tmp_path / "q", spec)
    ms = res.ms[0]
    freqs = column(ms, "CHAN_FREQ", "SPECTRAL_WINDOW")[0]
    scalar = expected_vis(ms, (src,), np.load(res.phases)["phases_rad"], np.load(res.nodes)) / 3.0
    chi = math.radians(70.0) - 4.0 * (C / freqs) ** 2
    i, q, u, v = 3.0, 1.5 * np.cos(2 * chi), 1.5 * np.sin(2 * chi), 0.6
    data = column(ms, "DATA")
    for k, want in enumerate((i + q, u + 1j * v, u - 1j * v, i - q)):
        assert np.abs(data[..., k] - scalar * want).max() < 1e-3, k
    assert np.abs(scalar - expected_vis(ms, (src,)) / 3.0).max() > 0.3  # the phases are there


# ------------------------------------------------------------------------------ light curves


def test_a_flare_follows_its_light_curve_per_integration(tmp_path: Path) -> None:
    flare = Source("F", 180.0, 60.0, 1.5, circ_frac=-0.4, flare_amp=3.0, flare_t_s=40.0,
                   flare_sigma_s=16.0)
    spec = SimSpec(n_ms=1, nant=4, ntime=12, noise_jy=0.0, ndir=1, sources=(flare,))
    res = simulate_field(tmp_path / "f", spec)
    ms = res.ms[0]
    t = column(ms, "TIME")
    curve = 1.0 + 3.0 * np.exp(-0.5 * ((t - t.min() - 40.0) / 16.0) ** 2)
    data = column(ms, "DATA")
    assert np.allclose(data[..., 0], 1.5 * curve[:, None], rtol=1e-6)
    assert np.allclose(-0.5j * (data[..., 1] - data[..., 2]), -0.4 * 1.5 * curve[:, None], atol=1e-5)
    truth = np.load(res.lightcurves)
    assert truth["names"].tolist() == ["F"]
    assert np.allclose(truth["times"], np.unique(t)) and np.allclose(truth["t_s"], np.unique(t) - t.min())
    assert np.allclose(truth["flux_jy"][:, 0], 1.5 * curve[::6])  # 6 baselines per integration
    assert truth["flux_jy"].max() == pytest.approx(1.5 * 4.0, rel=1e-3)  # the peak, at t = 40 s
    assert read_skymodel(res.skymodel) == [flare]


def test_constant_sources_write_no_light_curves(field: SimResult) -> None:
    assert field.lightcurves is None and not (field.outdir / "true_lightcurves.npz").exists()


# ------------------------------------------------------------------------------ noise


def test_noise_dominated_visibilities(tmp_path: Path) -> None:
    """noise_jy well above the whole sky's flux: each visibility is mostly noise, as Dysco's
    quantisation assumes; the noise is exactly the set level and apart from that the data are
    those of the noise-free field."""
    clean = simulate_field(tmp_path / "c", SimSpec(n_ms=1, nant=8, ntime=10, noise_jy=0.0))
    noisy = simulate_field(tmp_path / "n", SimSpec(n_ms=1, nant=8, ntime=10, noise_jy=50.0))
    model = column(clean.ms[0], "DATA")
    noise = column(noisy.ms[0], "DATA") - model
    for k in range(4):
        assert np.std(noise[..., k].real) == pytest.approx(50.0, rel=0.1)
        assert np.std(noise[..., k].imag) == pytest.approx(50.0, rel=0.1)
    assert np.abs(model).max() <= sum(s.flux_jy for s in DEFAULT_SOURCES) + 1e-3 < 0.5 * 50.0
    assert abs(np.mean(noise)) < 2.0


# ------------------------------------------------------------------------------ sky model files

OLD_SKYMODEL = """# hpcddf.lofar.simulate true sky: flat-spectrum point sources, J2000
# name ra_deg dec_deg flux_jy
S1 180.615 60.799 5.0
S2 178.211 59.788 3.0
"""


def test_a_sky_model_of_the_old_four_columns_still_reads(tmp_path: Path) -> None:
    old = tmp_path / "old.txt"
    old.write_text(OLD_SKYMODEL)
    assert read_skymodel(old) == list(DEFAULT_SOURCES[:2])
    assert not any(s.polarised or s.variable for s in read_skymodel(old))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(OLD_SKYMODEL + "P 180.1 60.1 1.0 0.2 3.5 10.0 -0.1 2.0 100.0 30.0\n")
    assert read_skymodel(mixed)[-1] == Source("P", 180.1, 60.1, 1.0, 0.2, 3.5, 10.0, -0.1, 2.0,
                                              100.0, 30.0)
    bad = tmp_path / "bad.txt"
    bad.write_text("S1 180 60 1 0.2 3.5\n")
    with pytest.raises(HpcddfError, match="bad.txt:1") as exc:
        read_skymodel(bad)
    assert "flare_sigma_s" in exc.value.hint


def test_polarised_and_flaring_sources_round_trip(tmp_path: Path) -> None:
    sky = (Source("A", 180.2, 60.1, 2.0, pol_frac=0.123456789, rm_rad_m2=-33.3, chi0_deg=-12.5),
           Source("B", 179.7, 59.8, 1.0, circ_frac=0.01, flare_amp=0.5, flare_t_s=1.0 / 3,
                  flare_sigma_s=7.0))
    res = simulate_field(tmp_path / "r", SimSpec(n_ms=1, nant=4, ntime=2, ndir=1, sources=sky))
    assert read_skymodel(res.skymodel) == list(sky)


def test_impossible_polarisation_or_flare_refused(tmp_path: Path) -> None:
    for bad in (Source("X", 180, 60, 1, pol_frac=0.9, circ_frac=0.5),
                Source("X", 180, 60, 1, pol_frac=-0.1),
                Source("X", 180, 60, 1, flare_amp=2.0),  # no width
                Source("X", 180, 60, 1, rm_rad_m2=float("nan"))):
        with pytest.raises(HpcddfError, match="source X"):
            simulate_field(tmp_path / "x", SimSpec(n_ms=1, nant=4, ntime=2, ndir=1, sources=(bad,)))
    assert not (tmp_path / "x").exists()


def test_program_simulates_a_sky_model_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hpcddf.lofar.simulate import main
    sky = tmp_path / "sky.txt"
    sky.write_text("F 180.0 60.0 1.0 0.0 0.0 0.0 0.5 1.0 8.0 8.0\n")
    out = tmp_path / "cli"
    assert main([str(out), "--skymodel", str(sky), "--n-ms", "1", "--nchan", "2", "--ntime", "3",
                 "--ndir", "1", "--noise", "0"]) == 0
    assert "true_lightcurves.npz (1 flaring sources)" in capsys.readouterr().out
    data = column(out / "SIM_SB000.ms", "DATA")
    assert data.shape[1] == 2 and np.allclose(-0.5j * (data[..., 1] - data[..., 2]), 0.5 * data[..., 0])
    assert main([str(tmp_path / "none"), "--skymodel", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read sky model" in capsys.readouterr().err


# ------------------------------------------------------------------------------ DDFacet's view


@pytest.mark.parametrize("mode", ["IV", "IQU"])
def test_ddfacet_images_the_injected_stokes(tmp_path: Path, mode: str) -> None:
    """DDFacet 0.9.1's own dirty image (ddf-pipeline's Stokes V image is --RIME-PolMode=IV, its
    Q/U cubes IQU) has the simulated +Q, +U, +V at the source, not their opposites."""
    import shutil

    from astropy.io import fits
    from astropy.wcs import WCS

    from tests._require import missing
    (tmp_path / "cache").mkdir()
    ddf = Path(sys.executable).parent / "DDF.py"
    if not ddf.exists() and shutil.which("DDF.py") is None:
        missing("HPCDDF_REQUIRE_SCIENCE", "DDF.py is not installed; pip install -e '.[science]'")
    src = Source("P", 180.6, 60.3, 2.0, pol_frac=0.5, chi0_deg=30.0, circ_frac=0.4)
    ms = simulate_field(tmp_path / "f", SimSpec(n_ms=1, ntime=20, noise_jy=0.0, ndir=1,
                                                sources=(src,))).ms[0]
    argv = [str(ddf) if ddf.exists() else "DDF.py", f"--Data-MS={ms}", "--Data-ColName=DATA",
            "--Output-Name=img", f"--RIME-PolMode={mode}", "--Output-Mode=Dirty", "--Output-Images=d",
            "--Image-NPix=256", "--Image-Cell=20", "--Facets-NFacets=1", "--Beam-Model=None",
            "--Parallel-NCPU=1", f"--Cache-Dir={tmp_path / 'cache'}", "--Deconv-MaxMajorIter=0",
            "--Freq-NBand=1", "--Log-Boring=1"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with fits.open(tmp_path / "img.dirty.fits") as hdul:
        planes, header = hdul[0].data[0], hdul[0].header
    x, y = (int(round(float(c))) for c in WCS(header).celestial.all_world2pix(180.6, 60.3, 0))
    box = planes[0, y - 2:y + 3, x - 2:x + 3]
    iy, ix = np.unravel_index(np.argmax(box), box.shape)
    at = planes[:, y - 2 + iy, x - 2 + ix]
    assert at[0] > 1.5  # the source is there, not mirrored
    chi = math.radians(30.0)
    want = {"IV": [1.0, 0.4], "IQU": [1.0, 0.5 * math.cos(2 * chi), 0.5 * math.sin(2 * chi)]}[mode]
    assert np.allclose(at / at[0], want, atol=2e-3)
