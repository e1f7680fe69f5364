"""A PHANGS continuum product through hpcddf's own plan and task runners, with the real CASA.

The simulated galaxy (hpcddf.phangs.galaxy: a CO(2-1) disk filling 415-585 km/s of a band of
40 channels of 5 km/s, plus a 5 mJy flat-spectrum point source at its centre) is observed with
Gaussian noise of 0.05 Jy per visibility part. Its key files get a continuum product ``cont``
that flags the CO family at the target's window (vsys 500 +- 85 km/s) and averages 0.02 GHz
channels, and an all_cont recipe without a spectral mode or image size (the plan makes it
'mfs', the dirty stage sizes it). The four CASA stages of that product then run as the engine
runs them (``plan_project`` + ``run_task``): split, extract_continuum (flag, average, concat),
imaging of one plane (dirty, clean mask, multiscale, singlescale) and postprocess (pbcor,
round beam, K, trim, 2-D FITS). Checked against the model: the point source's flux within 10 %,
and the disk, whose line emission would outshine the noise 50-fold if it reached the image,
consistent with noise. The simulation also has the total-power keys (``with_tp``): a
one-plane total-power continuum image (the point source seen by the 28.6" TP beam) in the
singledish key makes the feather config ``12m+tp`` postprocess the continuum image by
feathering (one more CASA run of the same chain), and its total flux is the model's within 3 %.
About 100 s on 2 idle cores.

The CASA environment is $HPCDDF_CASA_ENV (default /work/casa-env). Without it the CASA tests are
skipped, or fail when HPCDDF_REQUIRE_CASA=1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy import units as u
from astropy.convolution import Gaussian2DKernel, convolve_fft
from astropy.io import fits
from astropy.wcs import WCS

from hpcddf.errors import ConfigError
from hpcddf.phangs import casa_common, casa_tasks, casa_visibilities, galaxy, plan_common
from hpcddf.phangs import plan as P
from hpcddf.phangs.casaenv import find_casa_env
from hpcddf.phangs.galaxy import GalaxySpec, channel_velocities, simulate_galaxy
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_common import read_task_state

pytestmark = pytest.mark.timeout(1800)

CASA_ENV = Path(os.environ.get("HPCDDF_CASA_ENV", "/work/casa-env"))
SPEC = GalaxySpec(noise_jy=0.05, integration="60s")
STEM = "simgal_12m_cont"
CHANNEL_GHZ = 0.02  # 5.2 native channels of 3.845 MHz: bins of 5


# ------------------------------------------------------------------ without CASA


def test_continuum_channel_helpers() -> None:
    freqs = [100e9 + i * 1e6 for i in range(10)]  # 1 MHz channels from 100 GHz
    # a channel overlapping a range at all is in it; touching its edge is not
    assert casa_visibilities.channels_in_ranges(freqs, 1e6, [(100.0021, 100.0040)]) == [2, 3, 4]
    assert casa_visibilities.channels_in_ranges(freqs, 1e6, [(100.0025, 100.0035)]) == [3]
    assert casa_visibilities.channels_in_ranges(freqs, 1e6, [(99.0, 99.9995)]) == []
    assert casa_visibilities.channels_in_ranges(freqs, 1e6, [(99.0, 100.0001), (100.0085, 101)]) == [
        0, 9]
    assert casa_visibilities.channel_bins([40, 128], [3.845e6, 15.625e6], 0.02) == [5, 1]
    assert casa_visibilities.channel_bins([40, 128], [3.845e6, 15.625e6], 0.0) == [40, 128]
    assert casa_visibilities.channel_bins([4], [1e6], 1.0) == [4]  # never more than the spw


def test_stage_options_for_continuum() -> None:
    parser = casa_tasks.build_parser()
    a = parser.parse_args(["split", "--vis", "a.ms", "--outputvis", "b.ms", "--continuum",
                           "--freq-range-ghz", "235,210", "--freq-range-ghz", "245,260"])
    assert a.continuum and a.freq_range_ghz == [(210.0, 235.0), (245.0, 260.0)]
    a = parser.parse_args(["extract_continuum", "--vis", "a.ms", "--vis", "b.ms",
                           "--outputvis", "c.ms", "--flag-ghz", "230.1,230.2"])
    assert a.channel_ghz == 0.0 and a.flag_ghz == [(230.1, 230.2)] and len(a.vis) == 2
    # a line split without its window is refused before CASA is loaded
    a = parser.parse_args(["split", "--vis", "a.ms", "--outputvis", "b.ms"])
    with pytest.raises(casa_common.StageError, match="--restfreq-ghz, --vsys-kms, --vwidth-kms"):
        casa_visibilities.line_split_selection(Path("a.ms"), a)


# ------------------------------------------------------------------ the chain


@dataclass
class Chain:
    root: Path
    work: Path
    tasks: list[plan_common.Task]
    truth: dict[str, Any]


def _add_continuum_product(keys: Path) -> None:
    """The simulated keys hold the line only: a cont product, its recipe, appended."""
    with open(keys / "config_definitions.txt", "a") as fh:
        fh.write(f"cont_product  cont  {{'lines_to_flag':['co'],'channel_ghz':{CHANNEL_GHZ}}}\n")
    with open(keys / "imaging_recipes.txt", "a") as fh:
        fh.write("all  all_cont  all  recipes/sim_cont.clean\n")
    (keys / "recipes" / "sim_cont.clean").write_text(
        "# continuum: one plane (the plan sets specmode 'mfs'), sized by the dirty stage\n"
        "gridder = 'mosaic'\nweighting = 'briggs'\nrobust = 0.5\npblimit = 0.2\n")


TP_CONT = "simgal_tp_cont.fits"


def _add_total_power_continuum(sim_root: Path, keys: Path) -> Path:
    """The continuum as the total-power antennas see it: the point source (the continuum
    model) times the peak-normalised TP beam on the TP grid, one plane at the band's centre
    (RA, Dec, FREQ of length 1) in Jy/beam; named for ``simgal cont`` in the singledish key."""
    sigma = SPEC.tp_beam_arcsec / math.sqrt(8.0 * math.log(2.0))
    offs = (np.arange(SPEC.tp_npix) - SPEC.tp_npix // 2) * SPEC.tp_pixel_arcsec
    g = np.exp(-(offs ** 2) / (2.0 * sigma ** 2))
    plane = SPEC.continuum_jy * np.outer(g, g)
    h = galaxy.total_power_header(SPEC)
    band = SPEC.restfreq_ghz * 1e9 * (1 - channel_velocities(SPEC) / 299_792.458)
    h.update({"CRPIX3": 1.0, "CRVAL3": float(band.mean()),
              "CDELT3": float(band.max() - band.min())})
    path = sim_root / "singledish" / TP_CONT
    fits.PrimaryHDU(data=plane[None].astype(np.float32), header=h).writeto(path)
    with open(keys / "singledish_key.txt", "a") as fh:
        fh.write(f"{SPEC.target}  cont  {TP_CONT}\n")
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    try:
        env = find_casa_env(CASA_ENV)
    except ConfigError as exc:
        if os.environ.get("HPCDDF_REQUIRE_CASA") == "1":
            pytest.fail(f"the CASA environment is required here but not usable: {exc}")
        pytest.skip(f"no CASA environment ({exc})")
    sim = simulate_galaxy(tmp_path_factory.mktemp("phangs-cont") / "sim", SPEC, casa_env=env,
                          with_tp=True)
    _add_continuum_product(sim.master_key.parent)
    _add_total_power_continuum(sim.outdir, sim.master_key.parent)
    project = load_project(sim.master_key)
    assert project.cont_products == ["cont"]
    plan = P.plan_project(project, stages=list(P.CASA_STAGES))
    tasks = [t for t in P.plan_tasks(plan) if t.key[1] == "cont"]
    work = P.project_work_dir(project)
    for task in tasks:  # in stage order: each one's inputs are the previous one's products
        run_task(task, work, str(CASA_ENV))
    return Chain(root=sim.outdir, work=work, tasks=tasks,
                 truth=json.loads(sim.truth.read_text()))


def _state(chain: Chain, stage: str, config: str = "12m") -> dict[str, Any]:
    task = next(t for t in chain.tasks if t.stage == stage and config in t.key)
    state = read_task_state(chain.work, task.id)
    assert state is not None and state["state"] == "done", (task.id, state)
    return state


def test_every_continuum_task_is_done_and_reruns_as_a_skip(chain: Chain) -> None:
    # the feather config 12m+tp adds a postprocess (feather) of the 12m image
    assert [t.stage for t in chain.tasks] == [*P.CASA_STAGES, "postprocess"]
    assert chain.tasks[-1].key == ("simgal", "cont", "12m+tp")
    for task in chain.tasks:
        state = read_task_state(chain.work, task.id)
        assert state is not None and state["state"] == "done" and state["products"], task.id
        assert all(Path(p).exists() for p in task.outputs), task.id
        assert run_task(task, chain.work, str(CASA_ENV))["skipped"] is True
    staged = Path(next(t for t in chain.tasks if t.stage == "stage_ms").outputs[0])
    assert staged.name == "simgal_sim_12m_1_cont_split.ms"
    leftovers = [p for p in chain.root.rglob(".*") if ".tmp" in p.name or ".work" in p.name]
    assert not leftovers


def test_the_line_channels_are_flagged_and_the_rest_averaged(chain: Chain) -> None:
    """Exactly the channels overlapping vsys +- vwidth/2 are flagged: 3 line-free channels
    are left at each end of the band, then averaged in bins of 5."""
    steps = _state(chain, "stage_line")["steps"]["extract_continuum"]
    vel = channel_velocities(SPEC)  # of the MS channels, in frequency order
    half = SPEC.channel_kms / 2.0
    line = [i for i, v in enumerate(vel)
            if v + half > SPEC.vsys_kms - SPEC.vwidth_kms / 2
            and v - half < SPEC.vsys_kms + SPEC.vwidth_kms / 2]
    assert len(line) == SPEC.nchan - 6
    assert steps["flagged"] == [f"0:{casa_common.ranges_text(line)}"]
    assert steps["chanbin"] == [[5]]
    split = _state(chain, "stage_ms")["steps"]["split"]
    assert split["spw"] == ""  # no freq_ranges_ghz: the whole band is staged


def _post(chain: Chain, kind: str, stem: str = STEM) -> tuple[np.ndarray, fits.Header]:
    path = chain.root / "postprocess" / "simgal" / f"{stem}_{kind}.fits"
    with fits.open(path) as hdul:
        return hdul[0].data.astype(float), hdul[0].header


def test_the_product_is_a_2d_round_beam_kelvin_image(chain: Chain) -> None:
    image, h = _post(chain, "pbcorr_trimmed_k")
    pb, hpb = _post(chain, "pb_trimmed")
    native = _state(chain, "imaging")["steps"]["dirty"]
    assert image.ndim == 2 and h["NAXIS"] == 2 and pb.shape == image.shape
    assert h["BUNIT"].strip() == "K" and h["BMAJ"] == pytest.approx(h["BMIN"], rel=1e-6)
    assert native["bmaj"] <= h["BMAJ"] * 3600 <= native["bmaj"] * 1.1
    # the frequency of the one plane (the band's centre) survives the dropped axis
    band = SPEC.restfreq_ghz * 1e9 * (1 - channel_velocities(SPEC) / 299_792.458)
    assert band.min() < h["FREQ"] < band.max() and hpb["FREQ"] == h["FREQ"]
    assert image.shape[0] < native["imsize"][1]  # trimmed to the primary-beam cutoff


def _jy_per_beam(image: np.ndarray, h: fits.Header) -> np.ndarray:
    """The K image back in Jy/beam (astropy's Rayleigh-Jeans equivalency at FREQ)."""
    area = (math.pi * (h["BMAJ"] * u.deg) * (h["BMIN"] * u.deg) / (4 * math.log(2))).to(u.sr)
    jy_per_k = (1 * u.K).to(u.Jy, u.brightness_temperature(h["FREQ"] * u.Hz, area)).value
    return image * jy_per_k


def _offsets_arcsec(h: fits.Header, shape: tuple[int, ...]) -> np.ndarray:
    """Distance of every pixel centre from the source (the model's centre), in arcsec."""
    x0, y0 = WCS(h).celestial.world_to_pixel_values(SPEC.ra_deg, SPEC.dec_deg)
    yy, xx = np.indices(shape)
    return np.hypot(xx - x0, yy - y0) * abs(h["CDELT2"]) * 3600.0


def test_point_source_flux_is_the_models(chain: Chain) -> None:
    """A least-squares fit of the round beam at the source's known position (no pixel
    sampling bias) to the pb-corrected image in Jy/beam: the point source's flux."""
    image, h = _post(chain, "pbcorr_trimmed_k")
    jy = _jy_per_beam(image, h)
    r = _offsets_arcsec(h, jy.shape)
    beam = h["BMAJ"] * 3600.0
    near = (r < beam) & np.isfinite(jy)
    g = np.exp(-4 * math.log(2) * (r[near] / beam) ** 2)
    flux = float((jy[near] * g).sum() / (g * g).sum())
    assert chain.truth["continuum_jy"] == SPEC.continuum_jy == 0.005
    assert flux == pytest.approx(chain.truth["continuum_jy"], rel=0.10)


def test_the_disk_is_noise_because_its_lines_were_flagged(chain: Chain) -> None:
    """On the flat-noise image, the disk 4-10" from the centre (clear of the point source)
    against the sky outside the disk: same scatter, no mean. Had the line channels been kept,
    the band-averaged line emission there would be ~50 times the noise."""
    flat, h = _post(chain, "flat_trimmed_k")
    jy = _jy_per_beam(flat, h)
    r = _offsets_arcsec(h, jy.shape)
    disk = (r > 4.0) & (r < 10.0) & np.isfinite(jy)
    sky = (r > SPEC.disk_cutoff_arcsec + 3.0) & np.isfinite(jy)
    sigma = float(np.std(jy[sky]))
    assert disk.sum() > 1000 and sky.sum() > 1000
    assert float(np.std(jy[disk])) < 1.3 * sigma
    assert abs(float(np.mean(jy[disk]))) < 0.5 * sigma
    assert float(np.max(np.abs(jy[disk]))) < 5.0 * sigma
    # what the same annulus would hold without the flagging: the model's line flux averaged
    # over the band, at the image's beam
    mom0 = fits.getdata(chain.root / "model" / "simgal_true_mom0.fits").astype(float)
    pix = SPEC.pixel_arcsec
    per_pixel = mom0 / (SPEC.nchan * SPEC.channel_kms)  # Jy per model pixel
    kernel = Gaussian2DKernel(h["BMAJ"] * 3600 / pix / math.sqrt(8 * math.log(2)))
    ppbeam = math.pi * (h["BMAJ"] * 3600 / pix) ** 2 / (4 * math.log(2))
    line_jy_beam = convolve_fft(per_pixel, kernel) * ppbeam
    offs = (np.arange(SPEC.npix) - SPEC.npix // 2) * pix
    rm = np.hypot(*np.meshgrid(offs, offs, indexing="ij"))
    assert float(np.mean(line_jy_beam[(rm > 4.0) & (rm < 10.0)])) > 20 * sigma


# ------------------------------------------------------------------ feathering the continuum


def _total_flux_jy(image: np.ndarray, h: fits.Header) -> float:
    """Every finite pixel of a K image, in Jy (the round beam's area in pixels)."""
    ppbeam = math.pi * h["BMAJ"] * h["BMIN"] / (4 * math.log(2)) / abs(h["CDELT1"] * h["CDELT2"])
    return float(np.nansum(_jy_per_beam(image, h)) / ppbeam)


def test_feathered_continuum_keeps_the_total_flux_and_the_interferometric_image(
        chain: Chain) -> None:
    """The feather config's continuum image: the total-power image's flux on the
    interferometric grid, beam, unit and footprint. Its total flux is the model's within 3 %;
    the 12 m image alone sums the noise's large scales too (its total is what it is: only the
    feathered one is held to 3 %)."""
    state = _state(chain, "postprocess", "12m+tp")
    sd = state["steps"]["feather"]["singledish"]
    assert sd["unit_in"] == "Jy/beam" and sd["sd_bmaj"] == pytest.approx(SPEC.tp_beam_arcsec)
    feathered, h = _post(chain, "pbcorr_trimmed_k", "simgal_12m+tp_cont")
    interf, h12 = _post(chain, "pbcorr_trimmed_k")
    assert feathered.ndim == 2 and h["BUNIT"].strip() == "K"
    for key in ("NAXIS1", "NAXIS2", "CRVAL1", "CRVAL2", "CDELT1", "BMAJ", "BMIN", "FREQ"):
        assert h[key] == pytest.approx(h12[key]), key
    assert (np.isfinite(feathered) == np.isfinite(interf)).all()
    total = _total_flux_jy(feathered, h)
    print(f"total flux: feathered {total * 1e3:.3f} mJy, 12m {_total_flux_jy(interf, h12) * 1e3:.3f}"
          f" mJy, model {SPEC.continuum_jy * 1e3:.3f} mJy")
    assert total == pytest.approx(SPEC.continuum_jy, rel=0.03)
