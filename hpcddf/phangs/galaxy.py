"""A simulated PHANGS target: a rotating exponential CO(2-1) disk observed by ALMA's 12m array.

``simulate_galaxy(outdir)`` writes everything the PHANGS chain needs to be checked against the
truth (casa-here.md §2):

* ``model/simgal_model.fits``: the sky model cube in Jy/pixel (RA---SIN, DEC--SIN, FREQ, STOKES;
  SPECSYS LSRK; channels integrate the Gaussian line profile with erf), with a flat-spectrum
  continuum point source at the centre that uvcontsub must remove;
* ``model/simgal_true_mom0.fits`` (Jy km/s per pixel), ``model/simgal_true_mom1.fits`` (km/s,
  radio LSRK) and ``model/model_truth.json`` (total line flux, geometry, injected noise);
* ``ms/simgal_12m_1.ms`` from CASA's simobserve, run in the separate CASA environment;
* ``keys/``: a complete PHANGS key directory (master key and every key file the chain reads,
  plus the tclean recipe files), in the formats of algorithms.md B1.

Two options add what the postprocess stage combines (both off by default):

* ``with_tp=True``: ``singledish/simgal_tp_co21.fits``, the total-power cube a single 12 m dish
  sees: the line model convolved with the ALMA TP beam (28.6" at 230 GHz) and sampled on a
  coarse 4" grid, in Jy/beam with BMAJ/BMIN, plus beam-smoothed Gaussian noise; the singledish
  key and a feather config ``12m+tp`` (of ``12m``) in config_definitions. The convolution is
  evaluated exactly at the coarse pixel centres (separable Gaussian sums over the model
  pixels), so the cube's flux is the model's to rounding, with no resampling error. Feather
  takes the total flux from the TP cube on the interferometric grid: the default 54" image
  holds 93.5 % of it, ``imsize=256`` (77") 99.4 %.
* ``mosaic_parts=N``: the same galaxy observed in N single 12 m pointings (targets
  ``simgal_1`` .. ``simgal_N``, one MS each, offsets ``mosaic_spacing_arcsec`` apart in RA,
  about half a primary beam), listed under the mosaic target ``simgal_mosaic`` in the
  linearmosaic key. With ``with_tp`` the mosaic gets the single-dish cube too.

Noise: simobserve's ``thermalnoise='tsys-atm'`` (ALMA's atmosphere model, pwv 1 mm) gives a
realistic level that is not known beforehand; with ``noise_jy`` CASA adds no noise and
casa_tasks adds Gaussian noise of exactly that sigma to the real and imaginary part of every
visibility (numpy through the casatools table tool, WEIGHT and SIGMA set to match), so a test
can predict the noise of the cubes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from scipy.special import erf

from hpcddf.engine.atomic import atomic_path, write_json_atomic, write_text_atomic
from hpcddf.errors import HpcddfError
from hpcddf.phangs.casaenv import CasaEnv, find_casa_env, run_casa

C_KMS = 299_792.458
CO21_REST_GHZ = 230.538


@dataclass(frozen=True)
class GalaxySpec:
    """The simulated target. Defaults are the measured setup of casa-here.md §2."""

    target: str = "simgal"
    ra_deg: float = 150.0  # 10h00m00s
    dec_deg: float = -30.0
    npix: int = 160
    pixel_arcsec: float = 0.2
    nchan: int = 40
    channel_kms: float = 5.0
    restfreq_ghz: float = CO21_REST_GHZ
    vsys_kms: float = 500.0
    disk_scale_arcsec: float = 4.0
    disk_cutoff_arcsec: float = 13.0
    vflat_kms: float = 90.0
    rturn_arcsec: float = 3.0
    incl_deg: float = 40.0
    pa_deg: float = 30.0  # of the receding major axis, east of north
    dispersion_kms: float = 8.0
    line_flux_jykms: float = 150.0
    continuum_jy: float = 0.005
    # observation
    antennalist: str = "alma.cycle10.1.cfg"
    totaltime: str = "2400s"
    integration: str = "30s"
    noise_jy: float | None = None  # None: simobserve's tsys-atm; else sigma per visibility part
    seed: int = 11111
    # the PHANGS keys written for it
    vwidth_kms: float = 170.0
    product_channel_kms: float = 10.0
    statwt_edge_kms: float = 10.0
    distance_mpc: float = 10.0
    imsize: int = 180  # pixels of 0.3"; feathering needs ~256 to hold the TP-smeared emission
    # the total-power cube (with_tp): ALMA's 12 m TP antennas at 230 GHz
    tp_beam_arcsec: float = 28.6
    tp_pixel_arcsec: float = 4.0
    tp_npix: int = 40  # 160": the disk convolved with the TP beam falls to < 1e-4 at the edge
    tp_noise_jy_beam: float = 0.01
    # the linear mosaic (mosaic_parts): single pointings this far apart in RA (about half the
    # 12 m primary beam's 25" FWHM at 230 GHz, so neighbours overlap well above the pb cutoff)
    mosaic_spacing_arcsec: float = 12.5

    @property
    def config(self) -> str:
        return "12m"

    @property
    def feather_config(self) -> str:
        return f"{self.config}+tp"

    @property
    def product(self) -> str:
        return "co21"

    @property
    def mosaic(self) -> str:
        return f"{self.target}_mosaic"

    @property
    def tp_file(self) -> str:
        return f"{self.target}_tp_{self.product}.fits"


@dataclass(frozen=True)
class MosaicPart:
    """One pointing of the simulated linear mosaic: a target of its own with its own MS."""

    target: str
    ra_deg: float
    dec_deg: float
    ms_name: str


@dataclass(frozen=True)
class GalaxyResult:
    outdir: Path
    model: Path
    true_mom0: Path
    true_mom1: Path
    truth: Path
    ms: Path
    master_key: Path
    simobserve: dict[str, Any] = field(default_factory=dict)
    singledish: Path | None = None
    part_ms: tuple[Path, ...] = ()


# ------------------------------------------------------------------------------ the model


def channel_velocities(spec: GalaxySpec) -> np.ndarray:
    """Radio LSRK velocity of each model channel, in FREQ order (velocity falls with channel)."""
    half = (spec.nchan - 1) / 2.0
    return spec.vsys_kms + (half - np.arange(spec.nchan)) * spec.channel_kms


def disk_maps(spec: GalaxySpec) -> tuple[np.ndarray, np.ndarray]:
    """(line flux per pixel in Jy km/s, line-of-sight velocity in km/s), arrays [y, x].

    x grows to the west (RA falls), as in the FITS grid; the disk centre is pixel npix//2."""
    offs = (np.arange(spec.npix) - spec.npix // 2) * spec.pixel_arcsec
    north, west = np.meshgrid(offs, offs, indexing="ij")
    east = -west
    pa, inc = math.radians(spec.pa_deg), math.radians(spec.incl_deg)
    major = east * math.sin(pa) + north * math.cos(pa)
    minor = (-east * math.cos(pa) + north * math.sin(pa)) / math.cos(inc)
    radius = np.hypot(major, minor)
    flux = np.where(radius <= spec.disk_cutoff_arcsec, np.exp(-radius / spec.disk_scale_arcsec), 0.0)
    flux *= spec.line_flux_jykms / flux.sum()
    vrot = spec.vflat_kms * (1.0 - np.exp(-radius / spec.rturn_arcsec))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos_theta = np.where(radius > 0, major / radius, 0.0)
    vlos = spec.vsys_kms + vrot * math.sin(inc) * cos_theta
    return flux, vlos


def model_cube(spec: GalaxySpec) -> np.ndarray:
    """The line cube [chan, y, x] in Jy/pixel: each channel holds the part of every pixel's
    Gaussian line that falls inside it (difference of erfs), divided by the channel width."""
    flux, vlos = disk_maps(spec)
    v = channel_velocities(spec)
    lo = (v - spec.channel_kms / 2.0)[:, None, None]
    hi = (v + spec.channel_kms / 2.0)[:, None, None]
    s = spec.dispersion_kms * math.sqrt(2.0)
    frac = 0.5 * (erf((hi - vlos) / s) - erf((lo - vlos) / s))
    return flux * frac / spec.channel_kms


def _celestial_header(spec: GalaxySpec) -> fits.Header:
    h = fits.Header()
    c = spec.npix // 2 + 1  # FITS pixels count from 1: the disk centre is the reference pixel
    h.update({"CTYPE1": "RA---SIN", "CRVAL1": spec.ra_deg, "CDELT1": -spec.pixel_arcsec / 3600.0,
              "CRPIX1": float(c), "CUNIT1": "deg",
              "CTYPE2": "DEC--SIN", "CRVAL2": spec.dec_deg, "CDELT2": spec.pixel_arcsec / 3600.0,
              "CRPIX2": float(c), "CUNIT2": "deg", "EQUINOX": 2000.0, "RADESYS": "FK5"})
    return h


def model_header(spec: GalaxySpec) -> fits.Header:
    h = _celestial_header(spec)
    rest = spec.restfreq_ghz * 1e9
    f0 = rest * (1.0 - channel_velocities(spec)[0] / C_KMS)
    h.update({"CTYPE3": "FREQ", "CRVAL3": f0, "CDELT3": rest * spec.channel_kms / C_KMS,
              "CRPIX3": 1.0, "CUNIT3": "Hz", "SPECSYS": "LSRK", "RESTFRQ": rest,
              "CTYPE4": "STOKES", "CRVAL4": 1.0, "CDELT4": 1.0, "CRPIX4": 1.0,
              "BUNIT": "Jy/pixel", "OBJECT": spec.target, "TELESCOP": "ALMA"})
    return h


def _write_fits(path: Path, data: np.ndarray, header: fits.Header) -> Path:
    with atomic_path(path) as tmp:
        fits.PrimaryHDU(data=data.astype(np.float32), header=header).writeto(tmp, overwrite=True)
    return path


def write_model(spec: GalaxySpec, modeldir: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """The model cube, the true moment maps and the numbers of the truth."""
    modeldir.mkdir(parents=True, exist_ok=True)
    line = model_cube(spec)
    cube = line.copy()
    c = spec.npix // 2
    cube[:, c, c] += spec.continuum_jy
    model = _write_fits(modeldir / f"{spec.target}_model.fits", cube[None], model_header(spec))
    mom0 = line.sum(axis=0) * spec.channel_kms
    _, vlos = disk_maps(spec)
    mom1 = np.where(mom0 > 0, vlos, np.nan)
    h2 = _celestial_header(spec)
    mom0_path = _write_fits(modeldir / f"{spec.target}_true_mom0.fits", mom0,
                            _with(h2, BUNIT="Jy km/s/pixel"))
    mom1_path = _write_fits(modeldir / f"{spec.target}_true_mom1.fits", mom1, _with(h2, BUNIT="km/s"))
    truth = {"total_line_flux_jykms": float(mom0.sum()), "continuum_jy": spec.continuum_jy,
             "peak_jy_per_pixel": float(line.max()), "channel_velocities_kms":
             channel_velocities(spec).tolist()}
    return model, mom0_path, mom1_path, truth


def _with(header: fits.Header, **cards: Any) -> fits.Header:
    out = header.copy()
    out.update(cards)
    return out


# ------------------------------------------------------------------------------ total power


def total_power_cube(spec: GalaxySpec, noise_seed: int | None = None) -> np.ndarray:
    """The line model as a single dish sees it, [chan, y, x] in Jy/beam on the TP grid.

    A pixel of flux S at offset d from a TP pixel centre adds S·exp(-d²/2σ²) there (a
    peak-normalised beam: a point source of S Jy reads S Jy/beam). A round Gaussian separates
    in the two offsets, so the whole map is G·M·Gᵀ per channel, exact at every coarse pixel.
    The continuum source is left out, as a baseline-subtracted TP cube has none. With a seed,
    Gaussian noise smoothed by the same beam (rms ``tp_noise_jy_beam``) is added."""
    sigma = spec.tp_beam_arcsec / math.sqrt(8.0 * math.log(2.0))
    model = (np.arange(spec.npix) - spec.npix // 2) * spec.pixel_arcsec
    tp = (np.arange(spec.tp_npix) - spec.tp_npix // 2) * spec.tp_pixel_arcsec
    g = np.exp(-((tp[:, None] - model[None, :]) ** 2) / (2.0 * sigma ** 2))
    cube = np.einsum("yi,cij,xj->cyx", g, model_cube(spec), g)
    if noise_seed is not None and spec.tp_noise_jy_beam > 0:
        from scipy.ndimage import gaussian_filter
        rng = np.random.default_rng(noise_seed)
        noise = gaussian_filter(rng.normal(size=cube.shape),
                                sigma=(0.0, sigma / spec.tp_pixel_arcsec,
                                       sigma / spec.tp_pixel_arcsec), mode="wrap")
        cube = cube + noise * (spec.tp_noise_jy_beam / noise.std())
    return cube


def total_power_header(spec: GalaxySpec) -> fits.Header:
    """3-D (RA, Dec, FREQ: no Stokes axis, as TP cubes come) in Jy/beam with the TP beam."""
    coarse = replace(spec, npix=spec.tp_npix, pixel_arcsec=spec.tp_pixel_arcsec)
    h = model_header(coarse)
    for key in ("CTYPE4", "CRVAL4", "CDELT4", "CRPIX4"):
        del h[key]
    beam = spec.tp_beam_arcsec / 3600.0
    h.update({"BUNIT": "Jy/beam", "BMAJ": beam, "BMIN": beam, "BPA": 0.0})
    return h


def write_total_power(spec: GalaxySpec, path: Path) -> dict[str, Any]:
    """The TP cube at ``path``, and what a test needs to know about it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = total_power_cube(spec)
    _write_fits(path, total_power_cube(spec, noise_seed=spec.seed + 97), total_power_header(spec))
    ppbeam = (math.pi * spec.tp_beam_arcsec ** 2 / (4.0 * math.log(2.0))
              / spec.tp_pixel_arcsec ** 2)
    return {"file": path.name, "beam_arcsec": spec.tp_beam_arcsec,
            "pixel_arcsec": spec.tp_pixel_arcsec, "noise_jy_beam": spec.tp_noise_jy_beam,
            "line_flux_in_map_jykms": float(clean.sum() / ppbeam * spec.channel_kms)}


def mosaic_parts_of(spec: GalaxySpec, n: int) -> list[MosaicPart]:
    """N pointings along RA centred on the galaxy, ``mosaic_spacing_arcsec`` apart."""
    parts = []
    for i in range(n):
        east = (i - (n - 1) / 2.0) * spec.mosaic_spacing_arcsec
        ra = spec.ra_deg + east / 3600.0 / math.cos(math.radians(spec.dec_deg))
        name = f"{spec.target}_{i + 1}"
        parts.append(MosaicPart(name, ra, spec.dec_deg, f"{name}_{spec.config}_1.ms"))
    return parts


# ------------------------------------------------------------------------------ the keys


def _ra_text(ra_deg: float) -> str:
    h = (ra_deg % 360.0) / 15.0
    hh, rem = divmod(h * 3600.0, 3600.0)
    mm, ss = divmod(rem, 60.0)
    return f"{int(hh):02d}h{int(mm):02d}m{ss:06.3f}s"


def _dec_text(dec_deg: float) -> str:
    sign = "-" if dec_deg < 0 else "+"
    dd, rem = divmod(abs(dec_deg) * 3600.0, 3600.0)
    mm, ss = divmod(rem, 60.0)
    return f"{sign}{int(dd):02d}d{int(mm):02d}m{ss:05.2f}s"


def _recipe_text(comment: str, params: dict[str, Any]) -> str:
    width = max(len(k) for k in params)
    return f"# {comment}\n" + "".join(f"{k:<{width}} = {v!r}\n" for k, v in params.items())


# The coarsest resolution of the derived key (150 pc at 10 Mpc is 3.1", coarser than 2as): its
# strict mom1 is mom1wprior's prior velocity field.
PRIOR_RES = "150pc"


def _moment_key_text() -> str:
    """The moment key: round-1 maps on the strict and broad masks, mom1wprior (round 2), and
    mom0 on the flat strict mask (round 3, after the velocity field the flat mask follows).

    mom1wprior is written as PHANGS' current moment key writes it: the three maps it combines
    named by role, and the prior as one of this config's own maps (``vfield_prior`` at
    ``vfield_prior_res``), the strict mom1 at the coarsest resolution. ``other_exts
    {'prior': ...}`` would instead name one file per target, i.e. one config's map (PHANGS'
    7m+tp 15as) for every config: with ``with_tp`` the feather config would then take the 12m
    config's map, made inside its own task, which is not this project's intent."""
    round1 = "".join(
        f"{name}  algorithm  {alg}\n{name}  mask  {mask}\n{name}  ext  _{ext}\n"
        f"{name}  ext_error  _{ext.replace('_', '_e', 1)}\n{name}  round  {rnd}\n"
        for name, alg, mask, ext, rnd in (
            ("strictmom0", "mom0", "strictmask", "strict_mom0", 1),
            ("strictmom1", "mom1", "strictmask", "strict_mom1", 1),
            ("strictmom2", "mom2", "strictmask", "strict_mom2", 1),
            ("broadmom0", "mom0", "broadmask", "broad_mom0", 1),
            ("broadmom1", "mom1", "broadmask", "broad_mom1", 1),
            ("broadtpeak", "tpeak", "broadmask", "broad_tpeak", 1),
            ("flatstrictmom0", "mom0", "flatstrictmask", "flatstrict_mom0", 3)))
    wprior = ("mom1wprior  algorithm  mom1wprior\n"
              "mom1wprior  mask  None\n"
              "mom1wprior  ext  _mom1wprior\n"
              "mom1wprior  ext_error  _emom1wprior\n"
              "mom1wprior  round  2\n"
              "mom1wprior  kwargs  {'strict_vfield':'strictmom1','broad_vfield':'broadmom1',"
              "'broad_signal':'broadmom0'}\n"
              f"mom1wprior  kwargs  {{'vfield_prior':'strictmom1','vfield_prior_res':'{PRIOR_RES}'}}\n"
              "mom1wprior  kwargs  {'vfield_reject_thresh':'30km/s','mom0_thresh_for_mom1':2.0}\n")
    return "# moment  param  value\n" + round1 + wprior


def key_files(spec: GalaxySpec, ms_name: str, vfield_name: str, *, tp_file: str | None = None,
              parts: Sequence[MosaicPart] = ()) -> dict[str, str]:
    """name -> text of every key file (and recipe) of the simulated project, keyed relative
    to the key directory; roots are relative to it too, so the tree can be moved whole.
    ``tp_file`` (under ../singledish/) adds the single-dish key and the feather config;
    ``parts`` the mosaic's targets, MSs and the linearmosaic key."""
    t, cfg, prod = spec.target, spec.config, spec.product
    pix = 0.3  # recipe cell: five pixels across the ~1.5" C-1 beam at 230 GHz
    scales = [0.0, 1.5, 3.0, 6.0]  # arcsec: 0, 5, 10, 20 pixels as measured in casa-here.md
    cube = {"specmode": "cube", "outframe": "LSRK", "veltype": "radio", "restfreq": f"{spec.restfreq_ghz}GHz",
            "gridder": "mosaic", "weighting": "briggs", "robust": 0.5, "perchanweightdensity": True,
            "pblimit": 0.2, "restoringbeam": "common", "cell": f"{pix}arcsec", "imsize": [spec.imsize, spec.imsize],
            "phasecenter": f"J2000 {_ra_text(spec.ra_deg)} {_dec_text(spec.dec_deg)}"}
    scale_text = ",".join(str(s) for s in scales)
    ms_scales = {"deconvolver": "multiscale", "scales": [round(s / pix) for s in scales],
                 "smallscalebias": 0.6, "cyclefactor": 1.5}
    keys = {
        "master_key.txt": "\n".join([
            "# Master key of the simulated PHANGS target written by hpcddf.phangs.galaxy.",
            "# Roots are relative to this directory.",
            "key_dir             ./",
            "imaging_root        ../imaging/",
            "postprocess_root    ../postprocess/",
            "derived_root        ../derived/",
            "release_root        ../release/",
            "cleanmask_root      ../cleanmasks/",
            "vfield_root         ../model/",
            "ms_root             ../ms/",
            "ms_key              ms_file_key.txt",
            "target_key          target_definitions.txt",
            "config_key          config_definitions.txt",
            "imaging_key         imaging_recipes.txt",
            "derived_key         derived_key.txt",
            "moment_key          moment_key.txt",
            "distance_key        distance_key.txt",
            "window_key          window_key.txt", ""]),
        "ms_file_key.txt": "# target  project  field  array_tag  obsnum  file\n"
                           f"{t}  sim  all  {cfg}  1  {ms_name}\n",
        "target_definitions.txt": "# target  RA  Dec  vsys_kms  vwidth_kms\n"
                                  f"{t}  {_ra_text(spec.ra_deg)}  {_dec_text(spec.dec_deg)}  "
                                  f"{spec.vsys_kms}  {spec.vwidth_kms}\n",
        "config_definitions.txt": "# type  name  parameters\n"
            f"interf_config  {cfg}  {{'array_tags':['{cfg}'],'clean_scales_arcsec':[{scale_text}]}}\n"
            + f"line_product  {prod}  {{'line_tag':'co21','channel_kms':{spec.product_channel_kms},"
              f"'statwt_edge_kms':{spec.statwt_edge_kms},'fitorder':0,'combinespw':False}}\n",
        "imaging_recipes.txt": "# config  product  stage  recipe\n"
                               "all  all_line  dirty        recipes/sim_dirty.clean\n"
                               "all  all_line  multiscale   recipes/sim_multiscale.clean\n"
                               "all  all_line  singlescale  recipes/sim_singlescale.clean\n",
        "recipes/sim_dirty.clean": _recipe_text("tclean parameters of the dirty cube", cube),
        "recipes/sim_multiscale.clean": _recipe_text("tclean parameters of the multiscale clean",
                                                     {**cube, **ms_scales}),
        "recipes/sim_singlescale.clean": _recipe_text("tclean parameters of the single-scale clean",
                                                      {**cube, "deconvolver": "hogbom"}),
        "derived_key.txt": "# config  product  param  value\n"
            "all  all  ang_res  {'2as':2.0}\n"
            f"all  all  phys_res  {{'{PRIOR_RES}':150.0}}\n"
            "all  all  noise_kw  {'spec_box':5,'iterations':3}\n"
            "all  all_line  strictmask_kw  {'hi_thresh':4.0,'hi_nchan':2,'lo_thresh':2.0,'lo_nchan':2}\n"
            "all  all_line  broadmask_kw  {'recipe':'anyscale'}\n"
            "all  all_line  shuffle_kw  {}\n"
            "all  all_line  moments  ['strictmom0','strictmom1','strictmom2','broadmom0','broadmom1',"
            "'broadtpeak','mom1wprior','flatstrictmom0']\n",
        "moment_key.txt": _moment_key_text(),
        "distance_key.txt": f"galaxy,dist\n{t},{spec.distance_mpc}\n",
        "window_key.txt": f"galaxy,window,vfield\n{t},50.0,{vfield_name}\n",
    }
    if parts:
        _add_mosaic_keys(spec, keys, parts, vfield_name)
    if tp_file:
        _add_singledish_keys(spec, keys, tp_file, with_mosaic=bool(parts))
    return keys


def _add_mosaic_keys(spec: GalaxySpec, keys: dict[str, str], parts: Sequence[MosaicPart],
                     vfield_name: str) -> None:
    """Each part a target with its own MS; the mosaic in the linearmosaic, distance and window
    keys (derived products need its distance for the physical resolutions)."""
    keys["master_key.txt"] += "linmos_key          linearmosaic_definitions.txt\n"
    keys["linearmosaic_definitions.txt"] = "# mosaic  part\n" + "".join(
        f"{spec.mosaic}  {p.target}\n" for p in parts)
    keys["ms_file_key.txt"] += "".join(f"{p.target}  sim  all  {spec.config}  1  {p.ms_name}\n"
                                       for p in parts)
    keys["target_definitions.txt"] += "".join(
        f"{p.target}  {_ra_text(p.ra_deg)}  {_dec_text(p.dec_deg)}  {spec.vsys_kms}  "
        f"{spec.vwidth_kms}\n" for p in parts)
    keys["distance_key.txt"] += f"{spec.mosaic},{spec.distance_mpc}\n"
    keys["window_key.txt"] += f"{spec.mosaic},50.0,{vfield_name}\n"


def _add_singledish_keys(spec: GalaxySpec, keys: dict[str, str], tp_file: str,
                         with_mosaic: bool) -> None:
    keys["master_key.txt"] += ("singledish_root     ../singledish/\n"
                               "singledish_key      singledish_key.txt\n")
    targets = [spec.target] + ([spec.mosaic] if with_mosaic else [])
    keys["singledish_key.txt"] = "# target  product  file\n" + "".join(
        f"{t}  {spec.product}  {tp_file}\n" for t in targets)
    keys["config_definitions.txt"] += (f"feather_config  {spec.feather_config}  "
                                       f"{{'interf_config':'{spec.config}'}}\n")


def write_keys(spec: GalaxySpec, keydir: Path, ms_name: str, vfield_name: str, *,
               tp_file: str | None = None, parts: Sequence[MosaicPart] = ()) -> Path:
    for name, text in key_files(spec, ms_name, vfield_name, tp_file=tp_file,
                                parts=parts).items():
        path = keydir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return keydir / "master_key.txt"


# ------------------------------------------------------------------------------ the whole


def simulate_galaxy(outdir: str | Path, spec: GalaxySpec = GalaxySpec(), *,
                    casa_env: CasaEnv | None = None, with_tp: bool = False,
                    mosaic_parts: int = 0) -> GalaxyResult:
    """Model, truth, simulated MS (via simobserve in the CASA environment) and keys in
    ``outdir``. An existing MS is kept (simobserve is the slow part); everything else is
    rewritten. ``casa_env`` defaults to ``$HPCDDF_CASA_ENV`` (ConfigError when missing).
    ``with_tp`` adds the total-power cube and the feather config, ``mosaic_parts`` (0 or >= 2)
    a linear mosaic of that many single pointings (see the module docstring)."""
    if mosaic_parts == 1 or mosaic_parts < 0:
        raise HpcddfError(f"mosaic_parts={mosaic_parts}: a linear mosaic needs at least 2 parts",
                          "give 0 (no mosaic) or 2 or more")
    env = casa_env or find_casa_env()
    outdir = Path(outdir).resolve()
    if outdir.exists() and not outdir.is_dir():
        raise HpcddfError(f"{outdir} exists and is not a directory", "give a directory to simulate into")
    modeldir, msdir, keydir, logdir = (outdir / d for d in ("model", "ms", "keys", "logs"))
    for d in (msdir, keydir, logdir, outdir / "imaging", outdir / "postprocess", outdir / "derived"):
        d.mkdir(parents=True, exist_ok=True)
    model, mom0, mom1, truth = write_model(spec, modeldir)
    ms_name = f"{spec.target}_{spec.config}_1.ms"
    ms = msdir / ms_name
    sim = run_casa(env, "simobserve", logdir, skymodel=model, outputvis=ms,
                         antennalist=spec.antennalist, totaltime=spec.totaltime,
                         integration=spec.integration, noise_jy=spec.noise_jy, seed=spec.seed)
    truth.update({
        "spec": asdict(spec), "model": model.name, "true_mom0": mom0.name, "true_mom1": mom1.name,
        "ms": str(ms.relative_to(outdir)), "simobserve": sim,
        "noise": ({"mode": "gaussian", "jy_per_visibility_part": spec.noise_jy,
                   "channel_kms": spec.channel_kms} if spec.noise_jy is not None
                  else {"mode": "tsys-atm", "user_pwv_mm": 1.0, "t_ground_k": 269.0}),
    })
    parts = mosaic_parts_of(spec, mosaic_parts)
    for i, part in enumerate(parts, start=1):
        # one pointing each (mapsize 0), independent noise (its own seed)
        part_sim = run_casa(env, "simobserve", logdir, skymodel=model,
                            outputvis=msdir / part.ms_name, antennalist=spec.antennalist,
                            totaltime=spec.totaltime, integration=spec.integration,
                            noise_jy=spec.noise_jy, seed=spec.seed + i,
                            direction=f"J2000 {_ra_text(part.ra_deg)} {_dec_text(part.dec_deg)}",
                            mapsize="0arcsec")
        truth.setdefault("mosaic", {"target": spec.mosaic, "parts": {}})["parts"][part.target] = {
            "ra_deg": part.ra_deg, "dec_deg": part.dec_deg, "ms": f"ms/{part.ms_name}",
            "simobserve": part_sim}
    tp_path = outdir / "singledish" / spec.tp_file if with_tp else None
    if tp_path is not None:
        truth["singledish"] = write_total_power(spec, tp_path)
    truth_path = write_json_atomic(modeldir / "model_truth.json", truth)
    master = write_keys(spec, keydir, ms_name, mom1.name,
                        tp_file=spec.tp_file if with_tp else None, parts=parts)
    return GalaxyResult(outdir=outdir, model=model, true_mom0=mom0, true_mom1=mom1,
                        truth=truth_path, ms=ms, master_key=master, simobserve=sim,
                        singledish=tp_path,
                        part_ms=tuple(msdir / p.ms_name for p in parts))
