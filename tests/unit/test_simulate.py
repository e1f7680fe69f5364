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
