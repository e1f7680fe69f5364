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

Noise: simobserve's ``thermalnoise='tsys-atm'`` (ALMA's atmosphere model, pwv 1 mm) gives a
realistic level that is not known beforehand; with ``noise_jy`` CASA adds no noise and
casa_tasks adds Gaussian noise of exactly that sigma to the real and imaginary part of every
visibility (numpy through the casatools table tool, WEIGHT and SIGMA set to match), so a test
can predict the noise of the cubes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from scipy.special import erf

from hpcddf.atomic import atomic_path, write_json_atomic, write_text_atomic
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

    @property
    def config(self) -> str:
        return "12m"

    @property
    def product(self) -> str:
        return "co21"


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


def key_files(spec: GalaxySpec, ms_name: str, vfield_name: str) -> dict[str, str]:
    """name -> text of every key file (and recipe) of the simulated project, keyed relative
    to the key directory; roots are relative to it too, so the tree can be moved whole."""
    t, cfg, prod = spec.target, spec.config, spec.product
    pix = 0.3  # recipe cell: five pixels across the ~1.5" C-1 beam at 230 GHz
    scales = [0.0, 1.5, 3.0, 6.0]  # arcsec: 0, 5, 10, 20 pixels as measured in casa-here.md
    cube = {"specmode": "cube", "outframe": "LSRK", "veltype": "radio", "restfreq": f"{spec.restfreq_ghz}GHz",
            "gridder": "mosaic", "weighting": "briggs", "robust": 0.5, "perchanweightdensity": True,
            "pblimit": 0.2, "restoringbeam": "common", "cell": f"{pix}arcsec", "imsize": [180, 180],
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
            "all  all  phys_res  {'150pc':150.0}\n"
            "all  all  noise_kw  {'spec_box':5,'iterations':3}\n"
            "all  all_line  strictmask_kw  {'hi_thresh':4.0,'hi_nchan':2,'lo_thresh':2.0,'lo_nchan':2}\n"
            "all  all_line  broadmask_kw  {'recipe':'anyscale'}\n"
            "all  all_line  moments  ['strictmom0','strictmom1','strictmom2','broadmom0','broadtpeak']\n",
        "moment_key.txt": "# moment  param  value\n" + "".join(
            f"{name}  algorithm  {alg}\n{name}  mask  {mask}\n{name}  ext  _{ext}\n"
            f"{name}  ext_error  _{ext.replace('_', '_e', 1)}\n{name}  round  1\n"
            for name, alg, mask, ext in (
                ("strictmom0", "mom0", "strictmask", "strict_mom0"),
                ("strictmom1", "mom1", "strictmask", "strict_mom1"),
                ("strictmom2", "mom2", "strictmask", "strict_mom2"),
                ("broadmom0", "mom0", "broadmask", "broad_mom0"),
                ("broadtpeak", "tpeak", "broadmask", "broad_tpeak"))),
        "distance_key.txt": f"galaxy,dist\n{t},{spec.distance_mpc}\n",
        "window_key.txt": f"galaxy,window,vfield\n{t},50.0,{vfield_name}\n",
    }
    return keys


def write_keys(spec: GalaxySpec, keydir: Path, ms_name: str, vfield_name: str) -> Path:
    for name, text in key_files(spec, ms_name, vfield_name).items():
        path = keydir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return keydir / "master_key.txt"


# ------------------------------------------------------------------------------ the whole


def simulate_galaxy(outdir: str | Path, spec: GalaxySpec = GalaxySpec(), *,
                    casa_env: CasaEnv | None = None) -> GalaxyResult:
    """Model, truth, simulated MS (via simobserve in the CASA environment) and keys in
    ``outdir``. An existing MS is kept (simobserve is the slow part); everything else is
    rewritten. ``casa_env`` defaults to ``$HPCDDF_CASA_ENV`` (ConfigError when missing)."""
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
    truth_path = write_json_atomic(modeldir / "model_truth.json", truth)
    master = write_keys(spec, keydir, ms_name, mom1.name)
    return GalaxyResult(outdir=outdir, model=model, true_mom0=mom0, true_mom1=mom1,
                        truth=truth_path, ms=ms, master_key=master, simobserve=sim)
