"""The CASA half of the PHANGS chain on a simulated galaxy, with the real CASA 6.7 from PyPI.

A rotating exponential CO(2-1) disk (150 Jy km/s, 160x160 pixels of 0.2", 40 channels of
5 km/s, a 5 mJy continuum point source) is observed by simobserve with ALMA's C-1 12m
configuration for 2400 s in 60 s integrations (3-pointing mosaic, 36,120 rows: half the rows of
casa-here.md's 30 s, to halve the imaging time) with Gaussian noise of 0.14 Jy per visibility
part (about the image noise of casa-here.md's tsys-atm run). The stages then run as hpcddf runs them, each its own process in the separate
CASA environment, driven by the key files the simulation wrote: split, contsub, extract_line
(19 channels of 10 km/s), dirty, clean_mask, multiscale, singlescale, export_image and
postprocess. About 1 minute on 2 otherwise idle cores.

The CASA environment is $HPCDDF_CASA_ENV (default /work/casa-env, built by
containers/make-casa-env.sh). Without it the CASA tests are skipped, or fail when
HPCDDF_REQUIRE_CASA=1.
"""

from __future__ import annotations

import ast
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy import units as u
from astropy.convolution import Gaussian2DKernel, convolve_fft
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_interp
from scipy import ndimage

from hpcddf.errors import ConfigError, StepFailed
from hpcddf.phangs import (
    casa_common,
    casa_imaging,
    casa_postprocess,
    casa_tasks,
    casa_visibilities,
    casaenv,
)
from hpcddf.phangs.casaenv import (
    CasaEnv,
    casa_argv,
    casa_environ,
    find_casa_env,
    run_casa,
)
from hpcddf.phangs.galaxy import (
    CO21_REST_GHZ,
    GalaxySpec,
    channel_velocities,
    disk_maps,
    model_cube,
    simulate_galaxy,
)
from hpcddf.phangs.keys import load_project

CASA_ENV = Path(os.environ.get("HPCDDF_CASA_ENV", "/work/casa-env"))
NOISE_JY = 0.14
INTEGRATION = "60s"
TARGET, CONFIG, PRODUCT = "simgal", "12m", "co21"
STEM = f"{TARGET}_{CONFIG}_{PRODUCT}"


# ------------------------------------------------------------------ without CASA


def test_find_casa_env_names_the_build_script(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        find_casa_env(tmp_path / "nowhere")
    assert "does not exist" in str(exc.value) and "make-casa-env.sh" in exc.value.hint
    (tmp_path / "env" / "bin").mkdir(parents=True)
    (tmp_path / "env" / "bin" / "python").touch()
    (tmp_path / "env" / "casasiteconfig.py").touch()
    with pytest.raises(ConfigError, match="has no casatools"):
        find_casa_env(tmp_path / "env")


def test_casa_argv_and_environ(tmp_path: Path) -> None:
    env = CasaEnv(python=Path("/e/bin/python"), siteconfig=Path("/e/casasiteconfig.py"))
    argv = casa_argv(env, "extract_line", vis=[Path("a.ms"), "b.ms"], channel_kms=10.0,
                     overwrite=True, statwt_timebin=None, tclean={"robust": 0.5},
                     exclude_kms=[(100, 200.5)])
    assert argv == ["/e/bin/python", "-m", "hpcddf.phangs.casa_tasks", "extract_line",
                    "--vis", "a.ms", "--vis", "b.ms", "--channel-kms", "10.0", "--overwrite",
                    "--tclean", '{"robust": 0.5}', "--exclude-kms", "100,200.5"]
    argv = casa_argv(env, "contsub", vis="a.ms", outputvis="b.ms", restfreq_ghz=230.538,
                     vsys_kms=500, vwidth_kms=100, exclude_kms=[(300, 350), (600, 650)])
    parsed = casa_tasks.build_parser().parse_args(argv[3:])
    assert parsed.stage == "contsub" and parsed.vsys_kms == 500.0
    assert parsed.exclude_kms == [(300.0, 350.0), (600.0, 650.0)]
    environ = casa_environ(env, tmp_path / "logs", threads=2,
                           base={"PATH": "/bin", "PYTHONPATH": "/other/site", "VIRTUAL_ENV": "/v",
                                 "DISPLAY": ":0"})
    assert environ["CASASITECONFIG"] == "/e/casasiteconfig.py"
    assert (Path(environ["PYTHONPATH"]) / "hpcddf" / "phangs" / "casa_tasks.py").is_file()
    assert environ["OMP_NUM_THREADS"] == "2" and environ["MPLBACKEND"] == "Agg"
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE" and environ["OPENBLAS_NUM_THREADS"] == "1"
    assert environ["HPCDDF_CASA_LOGDIR"] == str((tmp_path / "logs").resolve())
    assert "VIRTUAL_ENV" not in environ and "DISPLAY" not in environ and environ["PATH"] == "/bin"


def test_installed_hpcddf_does_not_leak_its_site_packages(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """From site-packages, PYTHONPATH gets a directory holding only a link to hpcddf: the
    main environment's numpy must not shadow the CASA environment's."""
    fake = tmp_path / "lib" / "site-packages" / "hpcddf" / "phangs" / "casaenv.py"
    fake.parent.mkdir(parents=True)
    fake.touch()
    monkeypatch.setattr(casaenv, "__file__", str(fake))
    env = CasaEnv(python=Path("/e/bin/python"), siteconfig=Path("/e/casasiteconfig.py"))
    path = Path(casa_environ(env, tmp_path / "logs", threads=1, base={})["PYTHONPATH"])
    assert [p.name for p in path.iterdir() if not p.name.startswith(".")] == ["hpcddf"]
    assert (path / "hpcddf").resolve() == fake.parents[1]
    casa_environ(env, tmp_path / "logs", threads=1, base={})  # again: the link is kept


def test_casa_tasks_pure_helpers() -> None:
    assert casa_common.ranges_text([5, 0, 1, 2, 7, 6, 9]) == "0~2;5~7;9~9"
    # 415..585 plus 20 km/s edges, cut to the 402.5..597.5 covered: 19 channels from 410
    start, nchan = casa_visibilities.velocity_grid([(402.5, 597.5)], 500.0, 170.0, 20.0, 10.0)
    assert nchan == 19 and start == pytest.approx(410.0)
    assert casa_imaging.good_imsize(181) == 192 and casa_imaging.good_imsize(180) == 180
    beam = {"bmaj": 1.6, "bmin": 1.4, "bpa": 0.0}
    assert casa_postprocess.round_beam_arcsec(beam, None) == pytest.approx(1.64)
    with pytest.raises(casa_common.StageError):
        casa_postprocess.round_beam_arcsec(beam, 1.5)


def test_model_galaxy_is_the_specified_disk() -> None:
    spec = GalaxySpec()
    cube = model_cube(spec)
    assert cube.shape == (40, 160, 160)
    # erf channels: the band (402.5..597.5 km/s centres) holds the whole line
    assert cube.sum() * spec.channel_kms == pytest.approx(150.0, rel=1e-3)
    flux, vlos = disk_maps(spec)
    c = spec.npix // 2
    assert flux[c, c] == flux.max() and vlos[c, c] == pytest.approx(500.0)
    # 10" out along PA 30 deg east of north (the receding side): vsys + V(R) sin i
    east, north = 10 * math.sin(math.radians(30)), 10 * math.cos(math.radians(30))
    y, x = c + round(north / 0.2), c - round(east / 0.2)
    expected = 500.0 + 90.0 * (1 - math.exp(-10 / 3)) * math.sin(math.radians(40))
    assert vlos[y, x] == pytest.approx(expected, abs=1.0)
    v = channel_velocities(spec)
    assert v[0] == pytest.approx(597.5) and v[-1] == pytest.approx(402.5)


# ------------------------------------------------------------------ the chain


@pytest.fixture(scope="module")
def casa_env() -> CasaEnv:
    try:
        return find_casa_env(CASA_ENV)
    except ConfigError as exc:
        if os.environ.get("HPCDDF_REQUIRE_CASA") == "1":
            pytest.fail(f"the CASA environment is required here but not usable: {exc}")
        pytest.skip(f"no CASA environment ({exc})")


def read_recipe(path: Path) -> dict[str, Any]:
    """A .clean recipe: ``name = python literal`` lines, ``#`` comments."""
    params = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, value = line.split("=", 1)
            params[name.strip()] = ast.literal_eval(value.strip())
    return params


@dataclass
class Chain:
    root: Path
    logs: Path
    truth: Path
    staged: list[Path]
    base: Path
    post: dict[str, Path]
    summaries: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def chain(casa_env: CasaEnv, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    root = tmp_path_factory.mktemp("phangs")
    sim = simulate_galaxy(root / "sim", GalaxySpec(noise_jy=NOISE_JY, integration=INTEGRATION), casa_env=casa_env)
    project = load_project(sim.master_key)
    target = project.target_defs[TARGET]
    line = project.configs.line_product[PRODUCT]
    recipes = {k: read_recipe(v) for k, v in project.imaging_recipes(CONFIG, PRODUCT).items()}
    logs = sim.outdir / "logs"
    staging = sim.outdir / "staging"
    staging.mkdir()
    win = {"restfreq_ghz": CO21_REST_GHZ, "vsys_kms": target.vsys_kms,
           "vwidth_kms": target.vwidth_kms}
    out: dict[str, dict[str, Any]] = {}

    def run(stage: str, **params: Any) -> dict[str, Any]:
        out[stage] = run_casa(casa_env, stage, logs, timeout=600, **params)
        return out[stage]

    contsubbed = []
    for entry in project.input_ms(TARGET):
        split = staging / f"{TARGET}_{entry.array_tag}_{entry.obsnum}_{PRODUCT}.ms"
        run("split", vis=entry.path, outputvis=split, margin_kms=line.statwt_edge_kms, **win)
        contsubbed.append(split.with_name(split.stem + "_contsub.ms"))
        run("contsub", vis=split, outputvis=contsubbed[-1], fitorder=line.fitorder, **win)
    extracted = staging / f"{STEM}.ms"
    run("extract_line", vis=contsubbed, outputvis=extracted, channel_kms=line.channel_kms,
        statwt_edge_kms=line.statwt_edge_kms, **win)
    base = project.imaging_dir(TARGET) / STEM
    base.parent.mkdir(parents=True, exist_ok=True)
    img = {"vis": [extracted], "imagename": base, "restfreq_ghz": CO21_REST_GHZ}
    run("dirty", tclean=recipes["dirty"], **img)
    run("clean_mask", imagename=base)
    scales = project.configs.interf_config[CONFIG].clean_scales_arcsec
    run("multiscale", tclean=recipes["multiscale"], scales_arcsec=",".join(map(str, scales)),
        **img)
    run("singlescale", tclean=recipes["singlescale"], **img)
    run("export_image", imagename=base)
    postdir = project.postprocess_dir(TARGET)
    run("postprocess", imagename=base, outdir=postdir, stem=STEM)
    post = {k: Path(v) for k, v in out["postprocess"]["fits"].items()}
    return Chain(root=sim.outdir, logs=logs, truth=sim.truth, staged=[*contsubbed, extracted],
                 base=base, post=post, summaries=out)


def test_every_product_is_there(chain: Chain) -> None:
    base = str(chain.base)
    expected = [*chain.staged, *(Path(f"{base}_{s}.image") for s in
                                 ("dirty", "multiscale", "singlescale")),
                Path(f"{base}_cleanmask.im"), Path(f"{base}_singlescale_mask.im"),
                Path(f"{base}.image"), Path(f"{base}.pb"), Path(f"{base}.fits"),
                Path(f"{base}_pb.fits"), Path(f"{base}_residual.fits"), Path(f"{base}_model.fits"),
                *chain.post.values()]
    missing = [str(p) for p in expected if not p.exists()]
    assert not missing
    assert chain.post["pbcorr_trimmed_k"].name == f"{STEM}_pbcorr_trimmed_k.fits"
    # no half-written product, no CASA log outside the log directory
    leftovers = [p for p in chain.root.rglob(".*") if ".tmp" in p.name or ".work" in p.name]
    assert not leftovers
    logs = list(chain.root.rglob("casa-*.log"))
    assert logs and all(p.parent == chain.logs for p in logs)


def test_fits_products_are_k_round_beam_velocity(chain: Chain) -> None:
    native = chain.summaries["dirty"]
    cube = fits.getheader(chain.post["pbcorr_trimmed_k"])
    flat = fits.getheader(chain.post["flat_trimmed_k"])
    pb = fits.getheader(chain.post["pb_trimmed"])
    for h in (cube, flat):
        assert h["BUNIT"].strip() == "K"
        assert h["BMAJ"] == pytest.approx(h["BMIN"], rel=1e-6)
        assert native["bmaj"] <= h["BMAJ"] * 3600 <= native["bmaj"] * 1.1
        assert h["CTYPE3"].startswith(("VRAD", "VELO"))
        assert h["SPECSYS"].strip() == "LSRK"
        assert h["NAXIS"] == 3 and h["NAXIS3"] == chain.summaries["extract_line"]["nchan"] == 19
    assert abs(cube["CDELT3"]) == pytest.approx(10_000.0, rel=1e-6)  # m/s
    assert (pb["NAXIS1"], pb["NAXIS2"]) == (cube["NAXIS1"], cube["NAXIS2"])
    data = fits.getdata(chain.post["pbcorr_trimmed_k"])
    assert np.isfinite(data).any(axis=(1, 2)).all()  # no channel lost to the regrid edges
    assert cube["NAXIS1"] < 180  # trimmed to the primary-beam cutoff


@dataclass
class Measured:
    velocity: np.ndarray  # km/s per channel
    jy_beam: np.ndarray  # the pb-corrected cube back in Jy/beam
    noise_jy_beam: np.ndarray  # per channel, from the flat cube
    mask: np.ndarray
    beam_arcsec: float
    pixel_arcsec: float
    wcs: WCS


@pytest.fixture(scope="module")
def measured(chain: Chain) -> Measured:
    """The cube back in Jy/beam (astropy's brightness temperature equivalency, independent of
    casa_tasks' conversion), its noise and a simple S/N > 3 in two channels mask."""
    hdu = fits.open(chain.post["pbcorr_trimmed_k"])[0]
    flat = fits.getdata(chain.post["flat_trimmed_k"]).astype(float)
    h = hdu.header
    vel = ((np.arange(h["NAXIS3"]) + 1 - h["CRPIX3"]) * h["CDELT3"] + h["CRVAL3"]) / 1000.0
    beam = h["BMAJ"] * 3600.0
    area = (math.pi * (beam * u.arcsec) ** 2 / (4 * math.log(2))).to(u.sr)
    nu = h["RESTFRQ"] * (1 - vel / 299_792.458) * u.Hz
    k_per_jy = np.array([(1 * u.Jy).to(u.K, u.brightness_temperature(f, area)).value for f in nu])
    jy = hdu.data.astype(float) / k_per_jy[:, None, None]
    flat_jy = flat / k_per_jy[:, None, None]
    noise = np.array([1.4826 * np.nanmedian(np.abs(ch - np.nanmedian(ch))) for ch in flat_jy])
    snr = np.nan_to_num(flat_jy / noise[:, None, None])
    mask = ndimage.binary_opening(snr > 3, structure=np.ones((2, 1, 1), bool)) & np.isfinite(jy)
    return Measured(vel, jy, noise, mask, beam, abs(h["CDELT2"]) * 3600.0, WCS(h).celestial)


def truth_on_cube_grid(chain: Chain, m: Measured) -> tuple[np.ndarray, np.ndarray]:
    """True mom0 (Jy km/s per cube pixel) and mom1, convolved to the cube's beam and
    reprojected onto its grid (mom1 intensity-weighted, as the beam averages it)."""
    t0 = fits.open(chain.root / "model" / f"{TARGET}_true_mom0.fits")[0]
    t1 = fits.getdata(chain.root / "model" / f"{TARGET}_true_mom1.fits")
    tpix = abs(t0.header["CDELT2"]) * 3600.0
    kernel = Gaussian2DKernel(m.beam_arcsec / tpix / math.sqrt(8 * math.log(2)))
    mom0 = np.nan_to_num(t0.data)
    c0 = convolve_fft(mom0, kernel)
    c1 = convolve_fft(mom0 * np.nan_to_num(t1), kernel) / np.where(c0 > 0, c0, np.nan)
    shape = m.jy_beam.shape[1:]
    r0, _ = reproject_interp((c0, WCS(t0.header)), m.wcs, shape_out=shape)
    r1, _ = reproject_interp((c1, WCS(t0.header)), m.wcs, shape_out=shape)
    return r0 * (m.pixel_arcsec / tpix) ** 2, r1


def test_moment0_flux_matches_the_model(chain: Chain, measured: Measured) -> None:
    m = measured
    ppbeam = math.pi * m.beam_arcsec ** 2 / (4 * math.log(2)) / m.pixel_arcsec ** 2
    dv = abs(m.velocity[1] - m.velocity[0])
    flux = float(np.where(m.mask, m.jy_beam, 0.0).sum() / ppbeam * dv)
    truth = fits.getdata(chain.root / "model" / f"{TARGET}_true_mom0.fits").sum()
    assert truth == pytest.approx(150.0, rel=1e-3)
    # 12m-only data miss a little of the extended flux: casa-here.md measured 0.917 in a S/N > 4
    # mask and 0.979 as the bright region's median pixel ratio; this cube gives 0.933 (the
    # same in every run: fixed seeds; the noise in the mask moves it ~0.1 %). Two-sided, 0.90-0.98: 12 m data cannot hold more, and
    # losing more than a tenth is a fault of the imaging, not the array.
    print(f"moment-0 flux in the S/N mask: {flux / truth:.3f} of the model")
    assert 0.90 <= flux / truth <= 0.98


def test_moment1_matches_the_rotation_curve(chain: Chain, measured: Measured) -> None:
    m = measured
    t = np.where(m.mask, m.jy_beam, 0.0)
    sum_t = t.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mom1 = (t * m.velocity[:, None, None]).sum(axis=0) / np.where(sum_t > 0, sum_t, np.nan)
    true0, true1 = truth_on_cube_grid(chain, m)
    bright = (true0 > 0.2 * np.nanmax(true0)) & np.isfinite(mom1) & np.isfinite(true1)
    assert bright.sum() > 500
    diff = mom1[bright] - true1[bright]
    assert np.sqrt(np.mean(diff ** 2)) < 2.0
    # the disk rotates: the field spans about +-58 km/s around vsys
    assert np.nanpercentile(mom1[bright], 99) - np.nanpercentile(mom1[bright], 1) > 80.0


def test_noise_is_the_injected_noise(chain: Chain, measured: Measured) -> None:
    """Natural-weighting point-source noise of one pointing: sigma per visibility part, halved
    for Stokes I from two correlations and for 10 km/s channels from two 5 km/s ones (the
    regrid averages them), over sqrt(rows per pointing). Briggs 0.5 weighting, the mosaic
    overlap and the round-beam smoothing move it by well under 25 %."""
    truth = json.loads(chain.truth.read_text())
    rows_per_pointing = truth["simobserve"]["nrows"] / truth["simobserve"]["nfields"]
    assert truth["noise"]["jy_per_visibility_part"] == NOISE_JY
    expected = NOISE_JY / 2.0 / math.sqrt(rows_per_pointing)
    interior = measured.noise_jy_beam[2:-2]  # the regrid's edge channels are quieter
    assert float(np.median(interior)) == pytest.approx(expected, rel=0.25)


def test_continuum_is_subtracted(chain: Chain, measured: Measured) -> None:
    """The 5 mJy continuum source at the centre is gone from the line-free edge channels."""
    c = measured.wcs.world_to_array_index_values(150.0, -30.0)
    for chan in (0, -1):
        box = measured.jy_beam[chan, c[0] - 3:c[0] + 4, c[1] - 3:c[1] + 4]
        assert np.nanmax(np.abs(box)) < 0.0025


def test_cleaning_converged(chain: Chain) -> None:
    for stage in ("multiscale", "singlescale"):
        loops = chain.summaries[stage]["loops"]
        assert loops, stage
        last = loops[-1]
        assert last["stopcode"] != 1 or last["fractional_change"] < 0.01, stage
        assert last["model_flux"] >= loops[0]["model_flux"] > 0
    assert chain.summaries["singlescale"]["mask_voxels"] > 0


def test_stages_rerun_as_skips(chain: Chain, casa_env: CasaEnv) -> None:
    again = run_casa(casa_env, "dirty", chain.logs, vis=[chain.staged[-1]],
                     imagename=chain.base, restfreq_ghz=CO21_REST_GHZ)
    assert again["skipped"] is True
    before = chain.post["pbcorr_trimmed_k"].stat().st_mtime_ns
    again = run_casa(casa_env, "postprocess", chain.logs, imagename=chain.base,
                     outdir=chain.post["pbcorr_trimmed_k"].parent, stem=STEM)
    assert again["skipped"] is True
    assert chain.post["pbcorr_trimmed_k"].stat().st_mtime_ns == before


def _channels(selection: str) -> list[int]:
    """The channel indices of a one-spw CASA selection such as '0:2~7;9~11'."""
    _, ranges = selection.split(":")
    out: list[int] = []
    for run in ranges.split(";"):
        lo, hi = run.split("~")
        out += range(int(lo), int(hi) + 1)
    return out


def test_flag_edge_fraction_leaves_the_spw_edges_out_of_the_split(chain: Chain,
                                                                   casa_env: CasaEnv) -> None:
    """A line_product's flag_edge_fraction (keyschema: used): the split of the chain's own
    split MS (one spw, the window) drops that fraction of its channels at both ends. One
    extra split: ~2 s. (An array_tag's timebin is not checked here: each scan of this
    simulated mosaic is one 60 s integration, and split does not average across scans.)"""
    split = chain.staged[0].with_name(chain.staged[0].name.replace("_contsub.ms", ".ms"))
    win = {"restfreq_ghz": CO21_REST_GHZ, "vsys_kms": 500.0, "vwidth_kms": 170.0}
    out = run_casa(casa_env, "split", chain.logs, vis=split, outputvis=chain.root / "edge.ms",
                   margin_kms=50.0, flag_edge_fraction=0.1, **win)
    kept = _channels(out["spw"])
    nchan = len(_channels(chain.summaries["split"]["spw"]))   # the split MS's channels
    edge = math.ceil(0.1 * nchan)
    assert min(kept) == edge and max(kept) == nchan - 1 - edge
    assert out["timebin"] == "0s" and out["nrows"] > 0


def test_stage_errors_are_one_line(chain: Chain, casa_env: CasaEnv) -> None:
    with pytest.raises(StepFailed) as exc:
        run_casa(casa_env, "contsub", chain.logs, vis=chain.staged[-1],
                 outputvis=chain.root / "none.ms", restfreq_ghz=CO21_REST_GHZ,
                 vsys_kms=500.0, vwidth_kms=400.0)
    assert "no line-free channel" in str(exc.value)
    assert not (chain.root / "none.ms").exists()
    # feather is implemented: called without its inputs, argparse's last stderr line says so
    with pytest.raises(StepFailed, match="required: --imagename, --outdir, --stem, "
                                         "--singledish") as exc:
        run_casa(casa_env, "feather", chain.logs)
    assert exc.value.returncode == 2 and "\n" not in exc.value.message


def test_casa_output_goes_to_a_log_file_per_stage(chain: Chain, casa_env: CasaEnv) -> None:
    """CASA commands run through the engine's runner: each stage's output (its summary line,
    its errors) is in ``casa-<stage>.log`` in the task's log folder, with the command line."""
    log = chain.logs / "casa-contsub.log"
    text = log.read_text()
    assert text.startswith("# hpcddf ") and "casa_tasks" in text.splitlines()[0]
    assert "no line-free channel" in text
    assert '"stage": "postprocess"' in (chain.logs / "casa-postprocess.log").read_text()
    assert not list(chain.logs.glob(".*.summary.json*"))  # read, then removed


# ------------------------------------------------------------------ a clean mask from the key


def _east_half_mask(path: Path) -> Path:
    """A cube mask on its own grid (0.5" pixels, 5 km/s VRAD channels over 380-620 km/s, LSRK)
    covering the half of the galaxy east of its centre, at every velocity."""
    h = fits.Header()
    h.update({"CTYPE1": "RA---SIN", "CRVAL1": 150.0, "CDELT1": -0.5 / 3600, "CRPIX1": 40.5,
              "CUNIT1": "deg", "CTYPE2": "DEC--SIN", "CRVAL2": -30.0, "CDELT2": 0.5 / 3600,
              "CRPIX2": 40.5, "CUNIT2": "deg", "CTYPE3": "VRAD", "CRVAL3": 380e3,
              "CDELT3": 5e3, "CRPIX3": 1, "CUNIT3": "m/s", "SPECSYS": "LSRK",
              "RESTFRQ": CO21_REST_GHZ * 1e9, "RADESYS": "ICRS"})
    mask = np.zeros((49, 80, 80), np.uint8)
    mask[:, :, :40] = 1  # x below the centre: RA above it (CDELT1 < 0), the east half
    fits.writeto(path, mask, h)
    return path


def _export(casa_env: CasaEnv, logs: Path, images: dict[str, str], base: Path
            ) -> dict[str, np.ndarray]:
    """CASA images read back as [chan, y, x] arrays through one export_image call, which
    exports the four images of a base (image, pb, residual, model): the test puts its images
    in those four slots."""
    import shutil

    slots = {"image": "", "pb": "_pb", "residual": "_residual", "model": "_model"}
    for slot, image in zip(slots, images.values(), strict=True):
        shutil.copytree(image, f"{base}.{slot}")
    run_casa(casa_env, "export_image", logs, imagename=base)
    return {name: np.nan_to_num(np.asarray(fits.getdata(f"{base}{suffix}.fits"), dtype=float))
            for name, suffix in zip(images, slots.values(), strict=True)}


def test_a_clean_mask_from_the_key_decides_what_is_cleaned(chain: Chain, casa_env: CasaEnv
                                                           ) -> None:
    """The cleanmask_key's mask (another grid, another channel width) is put on the cube's grid
    and cleaned inside: the east half of the galaxy is cleaned, the west half keeps its dirty
    residual and gets (nearly) no clean components. About 25 s of CASA on 2 idle cores."""
    import shutil

    from hpcddf.phangs.plan_casa import cleanmask_path

    keydir = chain.root / "keys"
    masks = chain.root / "cleanmasks"
    masks.mkdir(exist_ok=True)
    _east_half_mask(masks / "simgal_east.fits")
    (keydir / "cleanmask_key.txt").write_text(f"# target product file\n{TARGET} all "
                                              f"simgal_east.fits\n")
    master = keydir / "master_key.txt"
    master.write_text(master.read_text() + "cleanmask_key       cleanmask_key.txt\n")
    project = load_project(master)
    path = cleanmask_path(project, TARGET, PRODUCT)
    assert path == masks / "simgal_east.fits"

    # a fresh imaging base that starts from the chain's dirty cube
    t0 = time.monotonic()
    base = Path(f"{chain.base}_keymask")
    for ext in ("psf", "pb", "sumwt", "weight"):
        shutil.copytree(f"{chain.base}.{ext}", f"{base}.{ext}")
    for ext in casa_imaging.SNAPSHOT_EXTS:
        shutil.copytree(f"{chain.base}_dirty.{ext}", f"{base}_dirty.{ext}")
    recipes = {k: read_recipe(v) for k, v in project.imaging_recipes(CONFIG, PRODUCT).items()}
    summary = run_casa(casa_env, "clean_mask", chain.logs, imagename=base, from_fits=path)
    assert summary["from_fits"] == str(path)
    # the same sky area as a 2-D mask applies to every channel: the same voxels
    sky = fits.open(path)[0]
    header2d = WCS(sky.header).celestial.to_header()
    fits.writeto(masks / "simgal_east_2d.fits", sky.data[0], header2d)
    flat = run_casa(casa_env, "clean_mask", chain.logs, imagename=base,
                    mask=Path(f"{base}_sky.im"), from_fits=masks / "simgal_east_2d.fits")
    assert flat["mask_voxels"] == summary["mask_voxels"] > 0
    run_casa(casa_env, "multiscale", chain.logs, tclean=recipes["multiscale"],
             vis=[chain.staged[-1]], imagename=base, restfreq_ghz=CO21_REST_GHZ,
             scales_pix="0,5,10", max_loops=3)
    out = chain.root / "keymask" / "export"
    out.parent.mkdir()
    arrays = _export(casa_env, chain.logs, {"mask": f"{base}_cleanmask.im",
                                            "dirty": f"{base}_dirty.residual",
                                            "residual": f"{base}_multiscale.residual",
                                            "model": f"{base}_multiscale.model"}, out)
    header = fits.getheader(f"{out}.fits")
    mask = arrays["mask"] > 0.5
    # the mask is the east half on the cube's grid (within the mask file's 40" square), at
    # every channel of the cube, and nothing of the west half
    wcs = WCS(header).celestial
    ny, nx = mask.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    ra, dec = wcs.pixel_to_world_values(xx, yy)
    dx, dy = (ra - 150.0) * math.cos(math.radians(-30.0)) * 3600, (dec + 30.0) * 3600
    good = (arrays["dirty"] != 0).any(axis=0)
    east = good & (dx > 1) & (dx < 19) & (np.abs(dy) < 19)
    west = good & (dx < -1)
    assert east.sum() > 5000 and west.sum() > 5000
    assert mask[:, east].all() and not mask[:, west].any()
    # clean components sit in the mask (multiscale components spill a little over its edge)
    model = arrays["model"]
    assert np.abs(model[~mask]).sum() < 0.05 * model[mask].sum()
    # the east half is cleaned, the west half keeps its dirty residual
    line = slice(3, -3)  # the channels with emission
    rms = {side: [float(np.sqrt(np.mean(arrays[k][line][:, sel] ** 2)))
                  for k in ("dirty", "residual")] for side, sel in (("east", east), ("west", west))}
    print(f"residual rms (Jy/beam), dirty -> cleaned: {rms}; {time.monotonic() - t0:.0f} s")
    assert rms["east"][1] < 0.5 * rms["east"][0]
    assert 0.9 < rms["west"][1] / rms["west"][0] < 1.1

# ------------------------------------------------------------------ chunked imaging


@dataclass
class Chunked:
    tasks: list[Any]        # the chunks' last-phase tasks, then the gather (the cube's task)
    base: Path              # the gathered cube's imagename
    work: Path              # the task states
    seconds: float          # CASA time of the chunks and the gather


@pytest.fixture(scope="module")
def chunked(chain: Chain, casa_env: CasaEnv) -> Chunked:
    """The chain's staged cube imaged in 3 chunks of its 19 channels (the line product's
    chunksize 7) by the node-side runner, each chunk its own task in its own directory, then
    gathered: the tasks the planner makes, run one after another as `--site local` would."""
    import time

    from hpcddf.phangs.plan_chunks import chunk_tasks, gather_params
    from hpcddf.phangs.plan_common import Task
    from hpcddf.phangs.run import run_task

    project = load_project(chain.root / "keys" / "master_key.txt")
    project.configs.line_product[PRODUCT].chunksize = 7
    out = chain.root / "chunked"
    base = out / STEM
    params = {"target": TARGET, "product": PRODUCT, "config": CONFIG, "kind": "line",
              "imagename": str(base), "vis": [str(chain.staged[-1])],
              "recipes": {k: read_recipe(v)
                          for k, v in project.imaging_recipes(CONFIG, PRODUCT).items()},
              "restfreq_ghz": CO21_REST_GHZ,
              "clean_scales_arcsec": list(project.configs.interf_config[CONFIG]
                                          .clean_scales_arcsec),
              "inputs": [str(chain.staged[-1])],
              "outputs": [f"{base}.image", f"{base}.pb", f"{base}_singlescale.image",
                          f"{base}.fits"]}
    key = (TARGET, PRODUCT, CONFIG)
    phases = chunk_tasks(project, key, params, ["stage_line/x"], None)
    chunks = phases[-1]
    gather = Task("imaging", key, tuple(t.id for t in chunks), gather_params(params, chunks))
    t0 = time.monotonic()
    for t in (*(t for phase in phases for t in phase), gather):
        run_task(t, out, casa_env=str(CASA_ENV))
    return Chunked([*chunks, gather], base, out, time.monotonic() - t0)


def test_three_chunks_give_the_cube_of_one_call(chain: Chain, chunked: Chunked) -> None:
    """Same grid, channels, beam and units as the single tclean call, per channel the same
    image rms within 1 % and the same image within a few % of that rms: the chunks clean to
    the whole cube's noise, but their clean masks and convergence are their own."""
    print(f"\nchunked imaging: {len(chunked.tasks) - 1} chunks + gather in "
          f"{chunked.seconds:.0f} s of CASA")
    assert [t.params.get("chunk") for t in chunked.tasks] == [[0, 3], [1, 3], [2, 3], None]
    one = fits.open(f"{chain.base}.fits")[0]
    many = fits.open(f"{chunked.base}.fits")[0]
    for card in ("NAXIS1", "NAXIS2", "NAXIS3", "CTYPE1", "CTYPE2", "CTYPE3", "BUNIT"):
        assert many.header[card] == one.header[card], card
    # the same sky and channels (the headers may write them from another reference pixel)
    n = one.header["NAXIS3"]
    grid = np.array([[0, 0, 0], [17, 101, 0], [0, 0, n - 1], [170, 3, n // 2]], dtype=float)
    np.testing.assert_allclose(WCS(many.header).wcs_pix2world(grid, 0),
                               WCS(one.header).wcs_pix2world(grid, 0), rtol=1e-9, atol=1e-7)
    assert many.header["BMAJ"] == pytest.approx(one.header["BMAJ"], rel=0.01)
    assert many.header["BMIN"] == pytest.approx(one.header["BMIN"], rel=0.01)
    a, b = one.data.astype(float), many.data.astype(float)
    assert a.shape[0] == 19 and np.isfinite(a).sum() == np.isfinite(b).sum()
    pb = fits.getdata(f"{chain.base}_pb.fits").astype(float)
    inner = np.isfinite(a) & np.isfinite(b) & (np.nan_to_num(pb) > 0.5)
    for c in range(a.shape[0]):
        m = inner[c]
        rms_one = float(np.sqrt(np.mean(a[c][m] ** 2)))
        rms_many = float(np.sqrt(np.mean(b[c][m] ** 2)))
        diff = float(np.sqrt(np.mean((a[c][m] - b[c][m]) ** 2)))
        print(f"channel {c:2d}: rms one call {rms_one:.5f}, chunked {rms_many:.5f} "
              f"({rms_many / rms_one - 1:+.4f}), rms of the difference {diff / rms_one:.4f}")
        assert rms_many == pytest.approx(rms_one, rel=0.01), c
        # measured: at most 0.02 (the chunk boundaries' channels 5, 6 and 11, whose clean
        # mask's dilation and two-channel runs cannot see the next chunk, and faint channels)
        assert diff <= 0.05 * rms_one, c
    flux_one, flux_many = np.nansum(a[inner]), np.nansum(b[inner])
    assert flux_many == pytest.approx(flux_one, rel=0.01)


def test_each_chunk_ran_alone_in_its_own_directory(chunked: Chunked) -> None:
    """Each chunk's working images, CASA's temporary products and its done-marker are in its
    own directory; the gather's products carry the single call's names."""
    from hpcddf.phangs.run_common import read_task_state

    dirs = set()
    for t in chunked.tasks[:-1]:
        d = Path(t.params["imagename"]).parent
        dirs.add(d)
        marker = json.loads(Path(t.params["marker"]).read_text())
        assert marker["chunk"] == t.params["chunk"][0] and marker["of"] == 3
        assert Path(f"{t.params['imagename']}_singlescale.image").is_dir()
        state = read_task_state(chunked.work, t.id)
        assert state["state"] == "done" and state["products"] == [t.params["marker"]]
    assert len(dirs) == 3
    base = str(chunked.base)
    for ext in (".image", ".pb", ".residual", ".model", ".psf", "_singlescale.image", ".fits"):
        assert Path(base + ext).exists(), ext
    assert read_task_state(chunked.work, chunked.tasks[-1].id)["state"] == "done"
