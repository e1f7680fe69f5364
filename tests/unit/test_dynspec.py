"""Dynamic spectra (``python -m hpcddf.lofar.dynspec``) of a simulated field whose data are
replaced by a known sky: a flaring, circularly polarised point source off the phase centre,
corrupted by known killMS-format scalar gains (two solution sets, multiplied), plus gaussian
noise. Checked: the light curve and its level (the gains divide out), Stokes V's sign, the
noise of off positions against what the weights predict, the weights themselves (uv cut, gain
cut, time/frequency/direction of the solutions), names, headers, Catalog.npy fluxes, the
facet-based off positions, and the atomic replacement of a previous output."""

from __future__ import annotations

import math
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest

from tests._require import need

np = need("numpy", "science")
ct = need("casacore.tables", "science")
fits = need("astropy.io.fits", "science")
WCS = need("astropy.wcs", "science").WCS

from hpcddf.lofar import dynspec_targets as tg  # noqa: E402
from hpcddf.lofar.dynspec import main, output_dirs, parser  # noqa: E402
from hpcddf.lofar.dynspec_ms import MSInfo, group_periods  # noqa: E402
from hpcddf.lofar.simulate import C_LIGHT, SimSpec, lmn, simulate_field  # noqa: E402

SPEC = SimSpec(n_ms=2, nant=10, nchan=4, ntime=40, noise_jy=0.0)
RA0, DEC0 = math.radians(SPEC.ra_deg), math.radians(SPEC.dec_deg)
TARGET = (180.5, 60.25)  # degrees: 12:02:00.00 +60:15:00.0
TARGET_FILE = "SIM_12:02:00.00_+60:15:00.0.fits"
SIGMA = 0.3  # Jy, per real and imaginary part of every correlation
FLARE_S = 60.0  # the flare's gaussian width in time
V_FRACTION = 0.25  # Stokes V = this x Stokes I
CUT_STATION = 3  # its gain in set A, second interval, is 2.5: cut by --CutGainsMinMax 0.1,1.5
UV_MIN_KM = 0.5


def _light_curve(t: np.ndarray) -> np.ndarray:
    """Stokes I of the target: 1 Jy plus a 4 Jy flare mid-observation."""
    tc = 0.5 * (t.min() + t.max())
    return 1.0 + 4.0 * np.exp(-0.5 * ((t - tc) / FLARE_S) ** 2)


# ------------------------------------------------------------------------------ the field

def _gain_sets(times: np.ndarray, rng: np.random.Generator) -> dict:
    """Set A: two time intervals, one frequency domain; set B: one interval, two frequency
    domains; each with 2 directions (0 near the target, 1 far off). Amplitudes 0.8-1.2 except
    the station to be cut."""
    def rand(shape: tuple[int, ...]) -> np.ndarray:
        return rng.uniform(0.8, 1.2, shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
    a = rand((2, 1, SPEC.nant, 2))
    a[1, 0, CUT_STATION, 0] = 2.5
    tmid = times[19] + SPEC.dt_s / 2
    return {"A": (a, [times[0] - 100, tmid], [tmid, times[-1] + 100], [[142.75e6, 146.75e6]]),
            "B": (rand((1, 2, SPEC.nant, 2)), [times[0] - 100], [times[-1] + 100],
                  [[142.75e6, 144.75e6], [144.75e6, 146.75e6]])}


def _write_sols(path: Path, g: np.ndarray, t0: list, t1: list, domains: list) -> None:
    """A killMS .sols.npz as killMS 3.3 writes it (the keys DDFacet reads, and the rest)."""
    nt, nf, na, nd = g.shape
    sols = np.zeros(nt, dtype=[("t0", "<f8"), ("t1", "<f8"), ("G", "<c8", (nf, na, nd, 2, 2)),
                               ("Stats", "<f4", (nf, na, 4))])
    sols["t0"], sols["t1"] = t0, t1
    sols["G"][..., 0, 0] = g
    sols["G"][..., 1, 1] = g
    cat = np.zeros(nd, dtype=[("Name", "S200"), ("ra", "<f8"), ("dec", "<f8"), ("l", "<f8"),
                              ("m", "<f8"), ("SumI", "<f8"), ("Cluster", "<i8")])
    cat["ra"] = np.radians([TARGET[0] + 0.05, SPEC.ra_deg - 1.0])
    cat["dec"] = np.radians([TARGET[1] + 0.05, SPEC.dec_deg - 0.5])
    cat["Cluster"] = np.arange(nd)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, MSName=path.parent.name, MSNameTime0=t0[0], Sols=sols,
             StationNames=np.array([f"ST{k:03d}" for k in range(na)]), SkyModel=cat, ClusterCat=cat,
             ModelName="", FreqDomains=np.array(domains), BeamTimes=np.zeros(0))


def _station_gain(sets: dict, times: np.ndarray, freqs: np.ndarray, ant: np.ndarray) -> np.ndarray:
    """The true gain towards the target (direction 0) of each row and channel: A x B."""
    a, a_t0 = sets["A"][0], np.array(sets["A"][1])
    b, b_dom = sets["B"][0], np.array(sets["B"][3])
    ia = np.searchsorted(a_t0, times, side="right") - 1
    ib = np.argmin(np.abs(freqs[:, None] - b_dom.mean(axis=1)[None]), axis=1)
    return a[ia, 0, ant, 0][:, None] * b[0][ib][:, ant, 0].T


def _sky(t: dict, freqs: np.ndarray, sets: dict) -> tuple[np.ndarray, np.ndarray]:
    """The corrupted target visibilities (rows, channels, XX XY YX YY): all of it, and its
    constant 1 Jy of Stokes I alone (the 'model')."""
    l, m, n = lmn(np.radians(TARGET[0]), np.radians(TARGET[1]), RA0, DEC0)
    path = t["UVW"] @ np.array([l, m, n - 1])
    gain = (_station_gain(sets, t["TIME"], freqs, t["ANTENNA1"])
            * np.conj(_station_gain(sets, t["TIME"], freqs, t["ANTENNA2"])))
    k = gain * np.exp(2j * np.pi * path[:, None] * freqs[None, :] / C_LIGHT)
    i = _light_curve(t["TIME"])[:, None]
    v = V_FRACTION * i
    # linear feeds: XX = I + Q, YY = I - Q, XY = U + iV, YX = U - iV
    full = np.stack([i * k, 1j * v * k, -1j * v * k, i * k], axis=-1)
    model = np.stack([k, 0 * k, 0 * k, k], axis=-1)
    return full, model


def _fill(ms: Path, sets: dict, rng: np.random.Generator) -> None:
    with ct.table(str(ms), readonly=False, ack=False) as t:
        cols = {c: t.getcol(c) for c in ("UVW", "TIME", "ANTENNA1", "ANTENNA2")}
        with ct.table(str(ms / "SPECTRAL_WINDOW"), ack=False) as spw:
            freqs = spw.getcell("CHAN_FREQ", 0)
        full, model = _sky(cols, freqs, sets)
        noise = SIGMA * (rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape))
        desc = t.getcoldesc("MODEL_DATA")
        desc["name"] = "MODEL_FULL"
        t.addcols(ct.maketabdesc([ct.makecoldesc("MODEL_FULL", desc)]))
        t.putcol("DATA", (full + noise).astype(np.complex64))
        t.putcol("MODEL_DATA", model.astype(np.complex64))
        t.putcol("MODEL_FULL", full.astype(np.complex64))


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> Path:
    """The simulated field with the known sky, its solutions, source list and images."""
    root = tmp_path_factory.mktemp("dynspec")
    res = simulate_field(root, SPEC)
    rng = np.random.default_rng(11)
    with ct.table(str(res.ms[0]), ack=False) as t:
        times = np.unique(t.getcol("TIME"))
    sets = _gain_sets(times, rng)
    for ms in res.ms:
        _fill(ms, sets, rng)
        for name, (g, t0, t1, dom) in sets.items():
            _write_sols(root / "SOLSDIR" / ms.name / f"killMS.{name}.sols.npz", g, t0, t1, dom)
    (root / "mslist-SIM.txt").write_text("".join(f"{ms.name}\n" for ms in res.ms))
    (root / "srclist.csv").write_text(f"Name,ra,dec,Type\nFLARE,{TARGET[0]},{TARGET[1]},Star\n"
                                      f"FAR,{SPEC.ra_deg + 8},{SPEC.dec_deg},Star\n")
    _write_image(root / "I.fits", [1], 3.21, rng)
    _write_image(root / "V.fits", [1, 4], 0.77, rng)
    np.save(root / "sets.npy", np.array(sets, dtype=object), allow_pickle=True)
    return root


IMAGE_NOISE = 0.01


def _write_image(path: Path, stokes: list[int], value: float, rng: np.random.Generator) -> None:
    """A DDF-like (freq, stokes, y, x) image, 10" pixels, noise IMAGE_NOISE, ``value`` at the
    target in the last Stokes plane."""
    w = WCS(naxis=4)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN", "STOKES", "FREQ"]
    w.wcs.crval = [SPEC.ra_deg, SPEC.dec_deg, stokes[0], 144e6]
    w.wcs.cdelt = [-10 / 3600, 10 / 3600, 3, 1e6]
    w.wcs.crpix = [301, 301, 1, 1]
    data = rng.normal(0, IMAGE_NOISE, (1, len(stokes), 600, 600)).astype(np.float32)
    x, y = w.celestial.wcs_world2pix([TARGET[0]], [TARGET[1]], 0)
    data[0, -1, int(round(y[0])), int(round(x[0]))] = value
    fits.PrimaryHDU(data, w.to_header()).writeto(path)


def _argv(field: Path, *extra: str, model: str = "MODEL_DATA", sols: str = "[A,B]",
          sols_dir: Path | None = None) -> list[str]:
    return ["--ms", str(field / "mslist-SIM.txt"), "--data", "DATA", "--model", model,
            "--sols", sols, "--SolsDir", str(sols_dir or field / "SOLSDIR"), "--rad", "2", "--noff", "10",
            "--nMinOffPerFacet", "5", "--CutGainsMinMax", "0.1,1.5", "--SplitNonContiguous", "1",
            "--srclist", str(field / "srclist.csv"), "--uv", f"{UV_MIN_KM},1000",
            "--BeamModel", "None", *extra]


def _run(field: Path, workdir: Path, *extra: str, **kw: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(field)  # the MS list names MSs relative to the field directory
        rc = main(_argv(field, "--OutDirName", str(workdir / "DynSpecs_SIM"), *extra, **kw))
    assert rc == 0
    return workdir / "DynSpecs_SIM"


@pytest.fixture(scope="module")
def flare(field: Path) -> Path:
    return _run(field, field / "flare", "--imageI", str(field / "I.fits"), "--imageV", str(field / "V.fits"))


def _catalogue(out: Path) -> np.ndarray:
    return np.load(out / "Catalog.npy")


# ------------------------------------------------------------------------------ the science

def test_target_follows_the_light_curve_with_the_gains_divided_out(flare: Path) -> None:
    spec = fits.getdata(flare / "TARGET" / TARGET_FILE)
    h = fits.getheader(flare / "TARGET" / TARGET_FILE)
    times = h["CRVAL1"] + h["CDELT1"] * np.arange(h["NAXIS1"])
    # the model (the constant 1 Jy) is subtracted: what is left is the flare
    truth = _light_curve(times) - 1.0
    got = spec[0].mean(axis=0)
    assert np.corrcoef(got, truth)[0, 1] >= 0.9
    assert got.sum() / truth.sum() == pytest.approx(1.0, abs=0.05)


def test_stokes_v_comes_out_with_its_sign(flare: Path) -> None:
    spec = fits.getdata(flare / "TARGET" / TARGET_FILE)
    h = fits.getheader(flare / "TARGET" / TARGET_FILE)
    truth = V_FRACTION * _light_curve(h["CRVAL1"] + h["CDELT1"] * np.arange(h["NAXIS1"]))
    got = spec[3].mean(axis=0)
    assert got.mean() > 0
    assert got.sum() / truth.sum() == pytest.approx(1.0, abs=0.05)
    assert abs(spec[1].mean()) < 0.05 and abs(spec[2].mean()) < 0.05  # no Q, U injected


def test_weights_follow_gains_uv_cut_and_gain_cut(field: Path, flare: Path) -> None:
    """W = sum over baselines longer than uvmin of |g_p g_q|^2, with the gains of the
    solution interval, frequency domain and direction of the target, A x B, and the station
    whose merged gain exceeds 1.5 left out."""
    sets = np.load(field / "sets.npy", allow_pickle=True).item()
    w = fits.getdata(flare / "TARGET_W" / TARGET_FILE.replace(".fits", ".W.fits"))
    expected = []
    for ms in sorted(field.glob("SIM_SB*.ms")):
        with ct.table(str(ms), ack=False) as t:
            c = {k: t.getcol(k) for k in ("UVW", "TIME", "ANTENNA1", "ANTENNA2")}
        with ct.table(str(ms / "SPECTRAL_WINDOW"), ack=False) as spw:
            freqs = spw.getcell("CHAN_FREQ", 0)
        gp = _station_gain(sets, c["TIME"], freqs, c["ANTENNA1"])
        gq = _station_gain(sets, c["TIME"], freqs, c["ANTENNA2"])
        ok = (np.abs(gp) <= 1.5) & (np.abs(gq) <= 1.5)
        ok &= (np.sqrt((c["UVW"] ** 2).sum(axis=1)) / 1e3 >= UV_MIN_KM)[:, None]
        per_row = np.abs(gp * gq) ** 2 * ok
        tidx = np.unique(c["TIME"], return_inverse=True)[1]
        expected.append(np.array([per_row[tidx == k].sum(axis=0) for k in range(SPEC.ntime)]).T)
    np.testing.assert_allclose(w, np.concatenate(expected), rtol=1e-4)
    assert (np.abs(sets["A"][0][1, 0, CUT_STATION, 0]) * 0.8) > 1.5  # the cut really cut


def test_off_positions_are_noise_as_the_weights_predict(field: Path, tmp_path: Path) -> None:
    """With the whole sky in the model, every direction is pure noise: I sqrt(2W)/sigma ~ N(0,1)."""
    out = _run(field, tmp_path, "--noff", "12", model="MODEL_FULL")
    z = []
    for f in sorted((out / "OFF").glob("*.fits")) + [out / "TARGET" / TARGET_FILE]:
        spec = fits.getdata(f)
        w = fits.getdata(str(f).replace("/OFF/", "/OFF_W/").replace("/TARGET/", "/TARGET_W/")
                         .replace(".fits", ".W.fits"))
        z.append((spec[[0, 3]] * np.sqrt(2 * w) / SIGMA)[:, w > 0])
    z = np.concatenate(z, axis=1)
    assert len(list((out / "OFF").glob("*.fits"))) == 12
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert z.std() == pytest.approx(1.0, abs=0.06)


def test_uv_cut_drops_short_baselines(field: Path, tmp_path: Path) -> None:
    """Without gains every kept baseline weighs 1: W is the number of baselines over 1 km."""
    out = _run(field, tmp_path, "--uv", "1,1000", "--noff", "0", sols="")
    w = fits.getdata(out / "TARGET_W" / TARGET_FILE.replace(".fits", ".W.fits"))
    with ct.table(str(field / "SIM_SB000.ms"), ack=False) as t:
        km = np.sqrt((t.getcol("UVW") ** 2).sum(axis=1)) / 1e3
        tidx = np.unique(t.getcol("TIME"), return_inverse=True)[1]
    long_ = np.bincount(tidx, weights=(km >= 1.0).astype(float))
    assert 0 < long_.min() and long_.max() < SPEC.nant * (SPEC.nant - 1) / 2
    np.testing.assert_array_equal(w, np.broadcast_to(long_, w.shape))


# ------------------------------------------------------------------------------ the files

def test_names_headers_catalogue_and_tarball(field: Path, flare: Path) -> None:
    h = fits.getheader(flare / "TARGET" / TARGET_FILE)
    assert (h["NAXIS1"], h["NAXIS2"], h["NAXIS3"]) == (SPEC.ntime, 2 * SPEC.nchan, 4)
    assert (h["CTYPE1"], h["CTYPE2"], h["CTYPE3"]) == ("Time", "Frequency", "Stokes")
    assert (h["CDELT1"], h["CRVAL2"], h["CDELT2"]) == (SPEC.dt_s, 143.0, 0.5)
    assert (h["OBSID"], h["NAME"], h["SRC-TYPE"], h["TEL_NAME"]) == ("SIM", "FLARE", "Star", "LOFAR")
    assert (h["FRQ-MIN"], h["FRQ-MAX"], h["CHAN-WID"]) == (143e6, 146.5e6, 0.5e6)
    assert h["OBS-STAR"] < h["OBS-STOP"] and h["ORIGIN"] == "hpcddf.lofar.dynspec"
    assert h["RA_RAD"] == pytest.approx(math.radians(TARGET[0]))
    assert {"TARGET", "OFF", "TARGET_W", "OFF_W", "Catalog.npy", "SIM.reg"} <= {p.name for p in flare.iterdir()}
    cat = _catalogue(flare)
    assert list(cat["Name"]) == ["FLARE"] + [f"Off{i:04d}" for i in range(10)]  # FAR is outside 2 deg
    assert cat["FileName"][0] == f"TARGET/{TARGET_FILE}" and cat["Type"][1] == "Off"
    for row in cat:
        assert fits.getheader(flare / row["FileName"])["NAME"] == row["Name"]
        assert (flare / row["FileName"].replace(".fits", ".W2.fits").replace("/", "_W/", 1)).exists()
    # fluxes filled before saving: the pixel, and the noise of the 300" box
    assert cat["FluxI"][0] == pytest.approx(3.21) and cat["FluxV"][0] == pytest.approx(0.77)
    assert cat["sigFluxI"][0] == pytest.approx(IMAGE_NOISE, rel=0.2)
    assert cat["IDTessel"][0] == 0  # the target's nearest solution direction
    with tarfile.open(flare.with_name("DynSpecs_SIM.tgz")) as tar:
        assert f"DynSpecs_SIM/TARGET/{TARGET_FILE}" in tar.getnames()


def test_rerun_replaces_the_output_only_when_complete(field: Path, tmp_path: Path) -> None:
    out = _run(field, tmp_path, "--noff", "2")
    (out / "sentinel").write_text("first run")
    broken = tmp_path / "SOLSDIR"
    shutil.copytree(field / "SOLSDIR", broken)
    (broken / "SIM_SB001.ms" / "killMS.B.sols.npz").write_bytes(b"not a solution file")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(field)
        rc = main(_argv(field, "--OutDirName", str(out), "--noff", "2", sols_dir=broken))  # fails on MS 2
    assert rc == 1
    assert (out / "sentinel").exists() and (out / "TARGET" / TARGET_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    _run(field, tmp_path, "--noff", "2")
    assert not (out / "sentinel").exists() and (out / "TARGET" / TARGET_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_default_output_name_and_beam_refused(field: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(field)
    assert main(_argv(field, "--noff", "0", "--BeamModel", "LOFAR")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--BeamModel None" in err[0]
    (field / ".DynSpecs_SIM.tmp-1").mkdir()  # left by a killed run
    assert main(_argv(field, "--noff", "0", "--DoTar", "0", "--LogBoring", "1", "--SavePDF", "1")) == 0
    assert (field / "DynSpecs_SIM" / "TARGET" / TARGET_FILE).exists()
    assert (field / "DynSpecs_SIM" / "SIM_TARGET.pdf").read_bytes().startswith(b"%PDF")
    assert not (field / ".DynSpecs_SIM.tmp-1").exists() and not (field / "DynSpecs_SIM.tgz").exists()
    assert "--LogBoring 1: not used" in capsys.readouterr().out
    shutil.rmtree(field / "DynSpecs_SIM")


# ------------------------------------------------------------------------------ directions

def _square(l0: float, m0: float, half: float) -> np.ndarray:
    return np.array([[l0 - half, m0 - half], [l0 + half, m0 - half], [l0 + half, m0 + half], [l0 - half, m0 + half]])


def test_off_positions_per_facet_tagged_with_their_facets(tmp_path: Path) -> None:
    half = math.radians(0.5)
    dico = {0: {"Polygon": _square(-half, 0, half), "iSol": np.array([3])},
            1: {"Polygon": _square(half, 0, half), "iSol": np.array([7])},
            2: {"Polygon": _square(half, 0, half) + [0.5, 0], "iSol": np.array([9])}}  # far away
    path = tmp_path / "x.DicoFacet"
    path.write_bytes(pickle.dumps(dico))
    facets = tg.load_facets(path, RA0, DEC0)
    lm = tg.off_in_facets(facets, 2.0, noff=6, nmin=5, rng=np.random.default_rng(1))
    assert lm.shape == (10, 2)  # 2 facets meet the 2 deg circle, max(5, 6 // 2) each
    ra, dec = tg.lm_to_radec(lm[:, 0], lm[:, 1], RA0, DEC0)
    dirs = tg.tag(tg.off_directions(ra, dec), facets, RA0, DEC0)
    assert [d.facet for d in dirs] == [0] * 5 + [1] * 5
    assert [d.tessel for d in dirs] == [3] * 5 + [7] * 5
    clear = math.radians(10 / 3600)
    assert (np.abs(lm[:, 1]) <= half - 0.9 * clear).all()  # 10" clear of the facet edges
    l2, m2 = tg.radec_to_lm(ra, dec, RA0, DEC0)
    np.testing.assert_allclose(np.stack([l2, m2], axis=1), lm, atol=1e-12)


def test_dicofacet_of_another_centre_is_refused(tmp_path: Path) -> None:
    dico = {0: {"Polygon": _square(0, 0, 0.01), "l0m0": (0.0, 0.0), "RaDec": (RA0 + 0.01, DEC0)}}
    path = tmp_path / "x.DicoFacet"
    path.write_bytes(pickle.dumps(dico))
    with pytest.raises(tg.TargetError, match="another phase centre"):
        tg.load_facets(path, RA0, DEC0)


def test_random_off_positions_lie_within_the_radius() -> None:
    ra, dec = tg.off_random(RA0, DEC0, 2.0, 200, np.random.default_rng(3))
    l, m = tg.radec_to_lm(ra, dec, RA0, DEC0)
    r = np.degrees(np.arcsin(np.hypot(l, m)))
    assert r.max() <= 2.0 and r.min() < 0.5 and np.median(r) > 1.2  # uniform in area


def test_catalogue_targets_move_by_proper_motion(tmp_path: Path) -> None:
    from astropy.table import Table
    t = Table({"DESIGNATION": ["PM", "STILL"], "ra": [180.2, 180.3], "dec": [60.1, 60.2],
               "pmra": [1000.0, np.nan], "pmdec": [0.0, np.nan], "ref_epoch": [2016.0, 2016.0],
               "parallax": [10.0, np.nan], "Type": ["Star", "Radio"]})
    t.write(tmp_path / "cat.fits")
    mjd_2024 = 60390.0  # 2024-03-21: 8.2 years after 2016.0
    pm, still = tg.read_fits_catalogue(tmp_path / "cat.fits", mjd_2024)
    moved = math.degrees(pm.ra - math.radians(180.2)) * math.cos(math.radians(60.1)) * 3.6e6
    assert moved == pytest.approx(8.22 * 1000, rel=0.01)  # mas
    assert (still.ra, still.type) == (pytest.approx(math.radians(180.3)), "Radio")


def test_periods_and_their_output_names() -> None:
    def info(name: str, t0: float) -> MSInfo:
        return MSInfo(Path(name), RA0, DEC0, np.array([1.0]), False, 1.0, t0, t0 + 100, 1.0,
                      (9, 10, 11, 12), "LOFAR", 2, 1)
    infos = [info("L1_SB1.ms", 0), info("L1_SB2.ms", 500), info("L1_SB3.ms", 0)]
    groups = group_periods(infos, True)
    assert [[i.name for i in g] for g in groups] == [["L1_SB1.ms", "L1_SB3.ms"], ["L1_SB2.ms"]]
    assert len(group_periods(infos, False)) == 1
    args = parser().parse_args(["--ms", "x"])
    assert output_dirs(args, "L1", 2) == [Path("DynSpecs_L1_T0"), Path("DynSpecs_L1_T1")]
    assert output_dirs(args, "L1", 1) == [Path("DynSpecs_L1")]
