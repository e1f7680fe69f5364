"""The visibilities of the simulated field and the Measurement Sets that hold them.

Part of :mod:`hpcddf.lofar.simulate` (which re-exports every public name here). For the row of
stations p = ANTENNA1, q = ANTENNA2, with (u, v, w) in wavelengths and ``d(s)`` the node
(calibration direction) nearest to source ``s``::

    V_pq = sum_s B_s(t, nu) * exp(i (phi_p,d(s)(t) - phi_q,d(s)(t))) * exp(+2 pi i (u l + v m + w (n - 1)))

for each Stokes parameter B = I, Q, U, V of the source (:mod:`hpcddf.lofar.sim_sky`: its
polarisation per channel and its light curve per integration), then XX = I + Q, XY = U + iV,
YX = U - iV, YY = I - Q and gaussian noise on every correlation. The direction-dependent phases
are a scalar Jones ``J = exp(i phi)``, the same on every correlation (``J_p B J_q^H``). With
``exp(-...)`` instead, DDFacet would put every source at ``(-l, -m)``.

Every MS is built under a temporary name beside its final one and renamed into place when
complete, so a killed simulation never leaves half an MS.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hpcddf.lofar.mstables import casacore_tables
from hpcddf.lofar.sim_geometry import (
    DISH_DIAMETER_M,
    STREAM_DDE,
    STREAM_NOISE,
    Nodes,
    baseline_pairs,
    lmn,
)
from hpcddf.lofar.sim_sky import C_LIGHT, linear_correlations, stokes_spectrum
from hpcddf.lofar.sim_spec import SimSpec

MEAS_FREQ_REF_TOPO = 5  # casacore MFrequency::Types: REST 0, LSRK 1, LSRD 2, BARY 3, GEO 4, TOPO 5
CORR_TYPES = (9, 10, 11, 12)  # casacore Stokes::StokesTypes XX, XY, YX, YY
CORR_PRODUCT = ((0, 0), (0, 1), (1, 0), (1, 1))


# ------------------------------------------------------------------------------ corruptions


def dde_phases(spec: SimSpec, times: np.ndarray, en: np.ndarray | None = None) -> np.ndarray:
    """Direction-dependent station phases (radians), shape (ntime, nant, ndir).

    One ionosphere: the same for every channel and every MS. For each station and direction,
    an offset plus a linear drift over the observation, both drawn from a standard normal (station
    0 too: only differences are visible); then each direction is scaled so that its rms over
    stations and times is exactly ``dde_rms_deg``. All zero when ``dde_rms_deg`` is 0.

    With the stations' east/north positions ``en`` (nant, 2), the part of each phase screen that
    is linear across the array is removed first: a phase gradient only moves a source, which
    self-calibration cannot see (the model inherits the shift) and which ddf-pipeline corrects
    with its astrometric offsets step against an optical catalogue instead.
    """
    phases = np.zeros((spec.ntime, spec.nant, spec.ndir))
    if spec.dde_rms_deg <= 0:
        return phases
    rng = np.random.default_rng([spec.seed, STREAM_DDE])
    offset = rng.standard_normal((spec.nant, spec.ndir))
    drift = rng.standard_normal((spec.nant, spec.ndir))
    half = (times[-1] - times[0]) / 2.0
    tau = (times - times.mean()) / half if half > 0 else np.zeros_like(times)  # -1 .. 1
    phases = offset[None, :, :] + drift[None, :, :] * tau[:, None, None]
    if en is not None:
        design = np.column_stack([np.ones(len(en)), en[:, 0], en[:, 1]])
        coef, *_ = np.linalg.lstsq(design, phases.transpose(1, 0, 2).reshape(len(en), -1), rcond=None)
        plane = (design @ coef).reshape(len(en), spec.ntime, spec.ndir).transpose(1, 0, 2)
        phases = phases - plane
    rms = np.sqrt((phases**2).mean(axis=(0, 1)))
    return phases * (math.radians(spec.dde_rms_deg) / np.where(rms > 0, rms, 1.0))


def channel_freqs(spec: SimSpec, ms_index: int) -> np.ndarray:
    """Channel centres (Hz) of MS ``ms_index``: the subbands follow on without gaps."""
    first = spec.freq0_hz + ms_index * spec.nchan * spec.chan_width_hz
    return first + np.arange(spec.nchan) * spec.chan_width_hz


def predict(uvw: np.ndarray, freqs: np.ndarray, row_time: np.ndarray, a1: np.ndarray,
            a2: np.ndarray, spec: SimSpec, nodes: Nodes, phases: np.ndarray,
            curves: np.ndarray | None = None) -> np.ndarray:
    """Noise-free XX, XY, YX, YY of every row and channel, (nrow, nchan, 4), by a direct
    Fourier sum with the sign convention and Jones model of the module docstring; ``curves``
    (ntime, nsrc) are the sources' light curves (None: all constant)."""
    ra0, dec0 = math.radians(spec.ra_deg), math.radians(spec.dec_deg)
    stokes = np.zeros((4, len(uvw), len(freqs)), dtype=np.complex128)  # I, Q, U, V
    wavenumber = 2 * np.pi * freqs / C_LIGHT  # rad per metre
    for s, src in enumerate(spec.sources):
        l_, m_, n_ = lmn(np.radians(src.ra_deg), np.radians(src.dec_deg), ra0, dec0)
        path = uvw[:, 0] * l_ + uvw[:, 1] * m_ + uvw[:, 2] * (n_ - 1.0)  # metres
        d = nodes.source_node[s]
        gain = np.exp(1j * (phases[row_time, a1, d] - phases[row_time, a2, d]))
        vis = src.flux_jy * gain[:, None] * np.exp(1j * path[:, None] * wavenumber[None, :])
        if curves is not None and src.variable:
            vis = vis * curves[row_time, s][:, None]
        stokes[0] += vis
        if src.polarised:  # Q, U, V as fractions of I per channel: the same gain and curve
            frac = stokes_spectrum(replace(src, flux_jy=1.0), freqs)[1:]
            stokes[1:] += vis[None, :, :] * frac[:, None, :]
    return linear_correlations(*stokes)


# ------------------------------------------------------------------------------ the MS


@dataclass(frozen=True)
class Obs:
    """What every MS of the field shares."""

    names: list[str]
    itrf: np.ndarray
    times: np.ndarray  # (ntime,) MJD seconds
    ant_uvw: np.ndarray  # (ntime, nant, 3)
    nodes: Nodes
    phases: np.ndarray  # (ntime, nant, ndir)
    curves: np.ndarray | None = None  # (ntime, nsrc) light curves; None: all constant


def write_ms(path: Path, spec: SimSpec, ms_index: int, obs: Obs) -> None:
    """Build one MS under ``.<name>.tmp`` and rename it into place when complete."""
    ct = casacore_tables()
    tmp = path.parent / f".{path.name}.tmp"
    if tmp.exists():  # left by an interrupted run: ours by its name
        shutil.rmtree(tmp)
    nchan = spec.nchan
    desc = ct.maketabdesc([
        ct.makearrcoldesc("DATA", 0j, shape=[nchan, 4], valuetype="complex", options=4),
        ct.makearrcoldesc("FLAG", False, shape=[nchan, 4], valuetype="boolean", options=4),
        ct.makearrcoldesc("SIGMA", 1.0, shape=[4], valuetype="float", options=4),
        ct.makearrcoldesc("WEIGHT", 1.0, shape=[4], valuetype="float", options=4),
    ])
    ms = ct.default_ms(str(tmp), desc)
    try:
        ms.addcols(ct.maketabdesc([
            ct.makearrcoldesc(name, 0j, shape=[nchan, 4], valuetype="complex", options=4)
            for name in ("CORRECTED_DATA", "MODEL_DATA")]))
        ms.addcols(ct.maketabdesc([ct.makearrcoldesc("WEIGHT_SPECTRUM", 1.0, shape=[nchan, 4],
                                                     valuetype="float", options=4)]))
        _fill_main(ms, spec, ms_index, obs)
    finally:
        ms.close()
    _fill_subtables(ct, tmp, spec, ms_index, obs)
    os.rename(tmp, path)


def _fill_main(ms: Any, spec: SimSpec, ms_index: int, obs: Obs) -> None:
    a1, a2 = baseline_pairs(spec.nant)
    nbl = len(a1)
    nrow = spec.ntime * nbl
    row_time = np.repeat(np.arange(spec.ntime), nbl)
    ant1, ant2 = np.tile(a1, spec.ntime), np.tile(a2, spec.ntime)
    uvw = obs.ant_uvw[row_time, ant2] - obs.ant_uvw[row_time, ant1]
    freqs = channel_freqs(spec, ms_index)
    corr = predict(uvw, freqs, row_time, ant1, ant2, spec, obs.nodes, obs.phases, obs.curves)
    if spec.flux_scale:
        corr = corr * np.float32(spec.flux_scale[ms_index])
    data = corr.astype(np.complex64)
    if spec.noise_jy > 0:
        rng = np.random.default_rng([spec.seed, STREAM_NOISE, ms_index])
        noise = rng.standard_normal((nrow, spec.nchan, 4, 2)) * spec.noise_jy
        data += (noise[..., 0] + 1j * noise[..., 1]).astype(np.complex64)

    ms.addrows(nrow)
    t = obs.times[row_time]
    zeros = np.zeros(nrow, dtype=np.int32)
    columns: dict[str, Any] = {
        "TIME": t, "TIME_CENTROID": t,
        "INTERVAL": np.full(nrow, spec.dt_s), "EXPOSURE": np.full(nrow, spec.dt_s),
        "ANTENNA1": ant1, "ANTENNA2": ant2, "FEED1": zeros, "FEED2": zeros,
        "UVW": uvw, "DATA_DESC_ID": zeros, "FIELD_ID": zeros, "SCAN_NUMBER": zeros + 1,
        "ARRAY_ID": zeros, "OBSERVATION_ID": zeros, "STATE_ID": zeros, "PROCESSOR_ID": zeros,
        "FLAG_ROW": np.zeros(nrow, dtype=bool),
        "FLAG": np.zeros((nrow, spec.nchan, 4), dtype=bool),
        "WEIGHT": np.ones((nrow, 4), dtype=np.float32),
        "SIGMA": np.ones((nrow, 4), dtype=np.float32),
        "WEIGHT_SPECTRUM": np.ones((nrow, spec.nchan, 4), dtype=np.float32),
        "DATA": data, "CORRECTED_DATA": data,  # the pipeline reads CORRECTED_DATA
        "MODEL_DATA": np.zeros_like(data),
    }
    for name, values in columns.items():
        ms.putcol(name, values)
    # default_ms labels UVW as ITRF; ours are in the J2000 frame of PHASE_DIR, as in real MSs
    ms.putcolkeyword("UVW", "MEASINFO", {"type": "uvw", "Ref": "J2000"})


def _put_rows(ct: Any, path: Path, nrow: int, columns: dict[str, Any],
              cells: dict[str, list[Any]] | None = None) -> None:
    """Add ``nrow`` rows to a subtable and fill it: whole columns, then per-row cells (for the
    variable-shape array columns, whose shape casacore learns from the first value put)."""
    with ct.table(str(path), readonly=False, ack=False) as sub:
        sub.addrows(nrow)
        for name, values in columns.items():
            sub.putcol(name, values)
        for name, values in (cells or {}).items():
            for row, value in enumerate(values):
                sub.putcell(name, row, value)


def _fill_subtables(ct: Any, ms: Path, spec: SimSpec, ms_index: int, obs: Obs) -> None:
    nant = spec.nant
    t0 = obs.times[0] - spec.dt_s / 2
    t1 = obs.times[-1] + spec.dt_s / 2
    _put_rows(ct, ms / "ANTENNA", nant, {
        "NAME": obs.names, "STATION": ["LOFAR"] * nant, "TYPE": ["GROUND-BASED"] * nant,
        "MOUNT": ["X-Y"] * nant, "POSITION": obs.itrf, "OFFSET": np.zeros((nant, 3)),
        "DISH_DIAMETER": np.full(nant, DISH_DIAMETER_M), "FLAG_ROW": np.zeros(nant, dtype=bool),
    })
    _put_rows(ct, ms / "FEED", nant, {
        "ANTENNA_ID": np.arange(nant, dtype=np.int32), "FEED_ID": np.zeros(nant, dtype=np.int32),
        "SPECTRAL_WINDOW_ID": np.full(nant, -1, dtype=np.int32),
        "TIME": np.full(nant, (t0 + t1) / 2), "INTERVAL": np.full(nant, t1 - t0),
        "NUM_RECEPTORS": np.full(nant, 2, dtype=np.int32),
        "BEAM_ID": np.full(nant, -1, dtype=np.int32), "POSITION": np.zeros((nant, 3)),
    }, {
        "BEAM_OFFSET": [np.zeros((2, 2))] * nant,
        "POLARIZATION_TYPE": [np.array(["X", "Y"])] * nant,
        "POL_RESPONSE": [np.eye(2, dtype=np.complex64)] * nant,
        "RECEPTOR_ANGLE": [np.array([0.0, math.pi / 2])] * nant,  # orthogonal X and Y dipoles
    })
    freqs = channel_freqs(spec, ms_index)
    width = np.full(spec.nchan, spec.chan_width_hz)
    _put_rows(ct, ms / "SPECTRAL_WINDOW", 1, {
        "NAME": [f"SB-{ms_index:03d}"], "NUM_CHAN": [spec.nchan],
        "REF_FREQUENCY": [float(freqs.mean())],
        "TOTAL_BANDWIDTH": [spec.nchan * spec.chan_width_hz],
        "MEAS_FREQ_REF": [MEAS_FREQ_REF_TOPO], "NET_SIDEBAND": [1], "FREQ_GROUP": [0],
        "FREQ_GROUP_NAME": [""], "IF_CONV_CHAIN": [0], "FLAG_ROW": [False],
    }, {
        "CHAN_FREQ": [freqs], "CHAN_WIDTH": [width], "EFFECTIVE_BW": [width],
        "RESOLUTION": [width],
    })
    _put_rows(ct, ms / "POLARIZATION", 1, {"NUM_CORR": [4], "FLAG_ROW": [False]}, {
        "CORR_TYPE": [np.array(CORR_TYPES, dtype=np.int32)],
        "CORR_PRODUCT": [np.array(CORR_PRODUCT, dtype=np.int32)],
    })
    _put_rows(ct, ms / "DATA_DESCRIPTION", 1, {
        "SPECTRAL_WINDOW_ID": [0], "POLARIZATION_ID": [0], "FLAG_ROW": [False]})
    direction = np.array([[math.radians(spec.ra_deg), math.radians(spec.dec_deg)]])
    _put_rows(ct, ms / "FIELD", 1, {
        "NAME": ["SIM"], "CODE": [""], "TIME": [(t0 + t1) / 2], "NUM_POLY": [0],
        "SOURCE_ID": [-1], "FLAG_ROW": [False],
    }, {"PHASE_DIR": [direction], "DELAY_DIR": [direction], "REFERENCE_DIR": [direction]})
    _put_rows(ct, ms / "OBSERVATION", 1, {
        "TELESCOPE_NAME": ["LOFAR"], "TIME_RANGE": np.array([[t0, t1]]),
        "OBSERVER": ["hpcddf.lofar.simulate"], "PROJECT": ["hpcddf-sim"], "SCHEDULE_TYPE": [""],
        "RELEASE_DATE": [0.0], "FLAG_ROW": [False],
    }, {"LOG": [np.array(["simulated by hpcddf.lofar.simulate"])], "SCHEDULE": [np.array([""])]})
    _put_rows(ct, ms / "STATE", 1, {
        "SIG": [True], "REF": [False], "CAL": [0.0], "LOAD": [0.0], "SUB_SCAN": [0],
        "OBS_MODE": [""], "FLAG_ROW": [False]})
    _put_rows(ct, ms / "PROCESSOR", 1, {
        "TYPE": ["CORRELATOR"], "SUB_TYPE": [""], "TYPE_ID": [-1], "MODE_ID": [-1],
        "FLAG_ROW": [False]})


