"""A small simulated LOFAR-like field, written with python-casacore, for tests and the demo.

``simulate_field(outdir, SimSpec(...))`` writes everything a ddf-pipeline style reduction of the
field needs, and the truth to check each of its products against:

* one Measurement Set per subband (``SIM_SB000.ms``, ...; DATA = CORRECTED_DATA, all four
  linear correlations);
* the true sky (``skymodel.txt``: position, Stokes I, linear polarisation with its rotation
  measure, circular polarisation and a flare per source; :func:`read_skymodel` also reads the
  four-column files of earlier versions);
* the calibration directions in killMS/DDFacet ClusterCat format (``nodes.npy``);
* the injected direction-dependent phases (``true_dde_phases.npz``, only when there are any);
* the true light curves per integration (``true_lightcurves.npz``, only when a source flares);
* the MS lists and a scaled-down ``hpcddf.cfg``.

The modules behind it, whose public names are all importable from here too:

* :mod:`hpcddf.lofar.sim_spec`: :class:`SimSpec` and its checks;
* :mod:`hpcddf.lofar.sim_geometry`: stations, times, UVW (casacore's ``uvw(ANTENNA2) -
  uvw(ANTENNA1)`` in J2000) and the calibration directions;
* :mod:`hpcddf.lofar.sim_sky`: sources, polarisation and light curves, and the correlation
  convention XX = I + Q, XY = U + iV, YX = U - iV, YY = I - Q, which DDFacet and DynSpecMS
  invert as V = -i (XY - YX) / 2 (checked with DDFacet 0.9.1's own IV and IQU images);
* :mod:`hpcddf.lofar.sim_ms`: the visibilities, ``V_pq = sum_s B_s exp(i (phi_p - phi_q))
  exp(+2 pi i (u l + v m + w (n - 1)))`` with scalar direction-dependent phases on every
  correlation (with ``exp(-...)`` DDFacet would mirror the sky), and the MSs.

The default field (``SimSpec()``) is unpolarised and constant: its visibilities are bit for bit
those of the versions before polarisation and variability existed (tests/unit/test_simulate.py
holds their checksums).

Run as a program: ``python -m hpcddf.lofar.simulate OUTDIR [--n-ms N --dde-rms-deg D
--skymodel FILE ...]``. Needs the science stack (numpy, python-casacore).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcddf.engine.atomic import write_bytes_atomic, write_text_atomic
from hpcddf.errors import HpcddfError
from hpcddf.lofar.sim_geometry import (
    ARRAY_RADIUS_M,
    CORE_RADIUS_M,
    CS002_ITRF,
    DISH_DIAMETER_M,
    MIN_SEPARATION_M,
    NODES_DTYPE,
    OBS_DAY_MJD,
    WGS84_A,
    WGS84_F,
    Nodes,
    antenna_uvw,
    baseline_pairs,
    choose_nodes,
    collinearity,
    enu_basis,
    gmst_hours,
    integration_times,
    lmn,
    nodes_array,
    station_en,
    station_layout,
    transit_mjd,
)
from hpcddf.lofar.sim_ms import (
    CORR_PRODUCT,
    CORR_TYPES,
    MEAS_FREQ_REF_TOPO,
    Obs,
    casacore_tables,
    channel_freqs,
    dde_phases,
    predict,
    write_ms,
)
from hpcddf.lofar.sim_sky import (
    C_LIGHT,
    DEFAULT_SOURCES,
    Source,
    light_curve,
    linear_correlations,
    read_skymodel,
    skymodel_text,
    stokes_from_linear,
    stokes_spectrum,
    write_catalogue,
    write_tgss_catalogue,
)
from hpcddf.lofar.sim_spec import SimSpec, check_spec

__all__ = [
    "ARRAY_RADIUS_M", "BIG_MSLIST", "CONFIG", "CORE_RADIUS_M", "CORR_PRODUCT", "CORR_TYPES",
    "CS002_ITRF", "C_LIGHT", "DEFAULT_SOURCES", "DISH_DIAMETER_M", "LIGHTCURVES",
    "MEAS_FREQ_REF_TOPO", "MIN_SEPARATION_M", "MSLIST", "MS_PATTERN", "NODES", "NODES_DTYPE",
    "OBS_DAY_MJD", "PHASES", "SIM_CONFIG", "SKYMODEL", "WGS84_A", "WGS84_F", "Nodes", "SimResult",
    "SimSpec", "Source", "antenna_uvw", "baseline_pairs", "channel_freqs", "check_spec",
    "choose_nodes", "collinearity", "config_text", "dde_phases", "enu_basis", "gmst_hours",
    "integration_times", "light_curve", "linear_correlations", "lmn", "main", "ms_paths",
    "nodes_array", "observation", "predict", "read_skymodel", "simulate_field", "skymodel_text", "station_en",
    "station_layout", "stokes_from_linear", "stokes_spectrum", "transit_mjd", "write_catalogue",
    "write_tgss_catalogue",
]

MS_PATTERN = "SIM_SB{:03d}.ms"
SKYMODEL = "skymodel.txt"
NODES = "nodes.npy"
PHASES = "true_dde_phases.npz"
LIGHTCURVES = "true_lightcurves.npz"
MSLIST = "mslist.txt"
BIG_MSLIST = "big-mslist.txt"
CONFIG = "hpcddf.cfg"


# The pipeline config of the simulated field: ddf-pipeline options scaled down to a 600-pixel
# image of 20" pixels (5 km baselines at 143 MHz). [solutions] ndir follows SimSpec.ndir. The
# MSs have no LOFAR station tables, so no beam: [image] beam_model = None ([control] beam_at
# only takes facet or tessel, so "none" cannot be said there). Point sources need no SSD: HMP
# cleans them in a fraction of SSD's time.
# - The restoring beam is the array's PSF (about 55" x 85" at robust -0.5), as a LoTSS user
#   sets psf_arcsec: a beam 1.8x wider (the 120" used before) weights the uncleaned residual by
#   their area ratio, and PyBDSF's integrated fluxes came out up to 10 % low.
# - The DI-calibrated image is masked at ddf-pipeline's default 10 sigma (thresholds[1]), not
#   6: its direction-dependent artefacts (a sidelobe of S2 at 6-7 sigma) then stay out of the
#   mask instead of being cleaned into the model, where self-calibration keeps them as a
#   spurious source.
SIM_CONFIG: dict[str, dict[str, str]] = {
    "data": {"mslist": MSLIST, "full_mslist": BIG_MSLIST, "colname": "CORRECTED_DATA"},
    "image": {"imsize": "600", "cellsize": "20", "psf_arcsec": "70", "final_psf_arcsec": "70",
              "robust": "-0.5", "final_robust": "-0.5", "do_decorr": "False", "uvmin": "0.0",
              "beam_model": "None", "cleanmode": "HMP"},
    # two 2-MHz subbands cannot separate a TEC from a phase offset: apply the raw solutions
    # an 8-minute observation has no room for ddf-pipeline's 43-minute very slow solutions
    # (killMS hangs solving a single interval)
    # no GlobalNorm of the DD solutions, as every shipped production config (tier1, LGPS) says
    "solutions": {"ndir": "3", "NChanSols": "1", "dt_di": "1.0", "uvmin": "0.0",
                  "smoothing": "False", "do_very_slow": "False", "normalize": "['None','None','None']"},
    "masking": {"thresholds": "[10,10,6,6]", "tgss": "None"},
    "control": {"bootstrap": "False", "clearcache": "False", "polcubes": "False",
                "stokesv": "False"},
}


@dataclass(frozen=True)
class SimResult:
    outdir: Path
    ms: tuple[Path, ...]
    skymodel: Path
    nodes: Path
    phases: Path | None
    config: Path
    lightcurves: Path | None = None  # only when a source flares


# ------------------------------------------------------------------------------ text files


def config_text(spec: SimSpec) -> str:
    """The ``hpcddf.cfg`` of the simulated field (SIM_CONFIG, with ``ndir`` from the spec)."""
    values = {section: dict(opts) for section, opts in SIM_CONFIG.items()}
    values["solutions"]["ndir"] = str(spec.ndir)
    lines = ["# ddf-pipeline config for the field simulated by hpcddf.lofar.simulate (scaled down)"]
    for section, opts in values.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {value}" for name, value in opts.items()]
        lines.append("")
    return "\n".join(lines)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------------ the field


def ms_paths(outdir: Path, spec: SimSpec) -> tuple[Path, ...]:
    return tuple(Path(outdir) / MS_PATTERN.format(k) for k in range(spec.n_ms))


def simulate_field(outdir: Path, spec: SimSpec = SimSpec()) -> SimResult:
    """Write the simulated field into ``outdir`` (created if needed); see the module docstring.

    Refuses (HpcddfError) if any of the MSs already exists: the simulation never overwrites
    data. The other files are replaced atomically.
    """
    check_spec(spec)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise HpcddfError(f"{outdir} exists and is not a directory", "give a directory to simulate into")
    paths = ms_paths(outdir, spec)
    for path in paths:
        if os.path.lexists(path):
            raise HpcddfError(f"{path} already exists; the simulation does not overwrite an MS",
                              "remove it or simulate into another directory")
    casacore_tables()  # fail with the install hint before any work
    outdir.mkdir(parents=True, exist_ok=True)
    obs = observation(spec)
    for k, path in enumerate(paths):
        write_ms(path, spec, k, obs)
    return _write_truth(outdir, spec, obs, paths)


def observation(spec: SimSpec) -> Obs:
    """What every MS shares: stations, times, UVW, directions, DD phases and light curves."""
    names, itrf = station_layout(spec)
    times = integration_times(spec)
    nodes = choose_nodes(spec.sources, spec.ndir, spec.ra_deg, spec.dec_deg)
    curves = None
    if any(s.variable for s in spec.sources):
        curves = np.stack([light_curve(s, times - times[0]) for s in spec.sources], axis=1)
    return Obs(names=names, itrf=itrf, times=times,
               ant_uvw=antenna_uvw(itrf, times, spec.ra_deg, spec.dec_deg), nodes=nodes,
               phases=dde_phases(spec, times, station_en(itrf)), curves=curves)


def _write_truth(outdir: Path, spec: SimSpec, obs: Obs, paths: tuple[Path, ...]) -> SimResult:
    """The true sky, directions, phases and light curves, the MS lists and the config."""
    skymodel = write_text_atomic(outdir / SKYMODEL, skymodel_text(spec.sources))
    nodes_path = write_bytes_atomic(outdir / NODES, _npy_bytes(nodes_array(obs.nodes)))
    phases_path = curves_path = None
    if spec.dde_rms_deg > 0:
        phases_path = write_bytes_atomic(outdir / PHASES, _npz_bytes(
            phases_rad=obs.phases, times=obs.times, node_ra_rad=obs.nodes.ra_rad,
            node_dec_rad=obs.nodes.dec_rad))
    if obs.curves is not None:
        curves_path = write_bytes_atomic(outdir / LIGHTCURVES, _npz_bytes(
            names=np.array([s.name for s in spec.sources]), times=obs.times,
            t_s=obs.times - obs.times[0], factor=obs.curves,
            flux_jy=obs.curves * np.array([s.flux_jy for s in spec.sources])))
    write_text_atomic(outdir / MSLIST, paths[0].name + "\n")
    write_text_atomic(outdir / BIG_MSLIST, "".join(p.name + "\n" for p in paths))
    config = write_text_atomic(outdir / CONFIG, config_text(spec))
    return SimResult(outdir=outdir, ms=paths, skymodel=skymodel, nodes=nodes_path,
                     phases=phases_path, config=config, lightcurves=curves_path)


# ------------------------------------------------------------------------------ the program


def _parser() -> argparse.ArgumentParser:
    d = SimSpec()
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.simulate",
                                 description="Write a small simulated LOFAR-like field.")
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--n-ms", type=int, default=d.n_ms, help=f"subbands, one MS each ({d.n_ms})")
    ap.add_argument("--nchan", type=int, default=d.nchan, help=f"channels per MS ({d.nchan})")
    ap.add_argument("--dde-rms-deg", type=float, default=d.dde_rms_deg,
                    help="rms of the direction-dependent phase errors (0: none)")
    ap.add_argument("--ndir", type=int, default=d.ndir, help=f"DDE directions ({d.ndir})")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--noise", type=float, default=d.noise_jy,
                    help=f"Jy per real/imaginary part ({d.noise_jy}; e.g. 50 for noise-dominated "
                         "visibilities)")
    ap.add_argument("--ntime", type=int, default=d.ntime, help=f"integrations of {d.dt_s:g} s")
    ap.add_argument("--skymodel", type=Path, default=None,
                    help="the sources, from a sky model file as written in OUTDIR (polarisation "
                         "and flares included; default: the built-in six sources)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        sources = tuple(read_skymodel(args.skymodel)) if args.skymodel else DEFAULT_SOURCES
        spec = SimSpec(n_ms=args.n_ms, nchan=args.nchan, dde_rms_deg=args.dde_rms_deg,
                       ndir=args.ndir, seed=args.seed, noise_jy=args.noise, ntime=args.ntime,
                       sources=sources)
        res = simulate_field(args.outdir, spec)
    except HpcddfError as exc:
        print(f"hpcddf: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    _report(spec, res)
    return 0


def _report(spec: SimSpec, res: SimResult) -> None:
    nrow = spec.ntime * spec.nant * (spec.nant - 1) // 2
    for k, ms in enumerate(res.ms):
        f = channel_freqs(spec, k) / 1e6
        print(f"wrote {ms} ({nrow} rows, {spec.nchan} channels {f[0]:.3f}-{f[-1]:.3f} MHz)")
    print(f"wrote {res.skymodel} ({len(spec.sources)} sources)")
    print(f"wrote {res.nodes} ({spec.ndir} directions)")
    if res.phases:
        print(f"wrote {res.phases} (rms {spec.dde_rms_deg:g} deg)")
    if res.lightcurves:
        print(f"wrote {res.lightcurves} ({sum(s.variable for s in spec.sources)} flaring sources)")
    print(f"wrote {res.outdir / MSLIST}, {res.outdir / BIG_MSLIST}, {res.config}")


if __name__ == "__main__":
    raise SystemExit(main())
