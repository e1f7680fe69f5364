"""What the simulated field is made of: :class:`SimSpec` and its checks.

Part of :mod:`hpcddf.lofar.simulate` (which re-exports it). A module of its own so that the
geometry and MS modules can name the spec without importing the public module that imports
them (hpcddf.lofar has no import cycles).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcddf.errors import HpcddfError
from hpcddf.lofar.sim_sky import DEFAULT_SOURCES, Source, check_sources


@dataclass(frozen=True)
class SimSpec:
    """What to simulate; the defaults give about 1 s of work and 5.5 MB per MS.

    ``noise_jy`` is the gaussian sigma per real and imaginary part of every correlation of every
    visibility. The default 0.05 Jy leaves each visibility dominated by the sky (15.2 Jy in all
    for the default sources). A noise-dominated field, like raw LOFAR data and what Dysco's
    quantisation is designed for, needs ``noise_jy`` well above the total flux, e.g. 50.
    """

    n_ms: int = 2  # subbands, one MS each
    nant: int = 16
    nchan: int = 4  # channels per MS
    chan_width_hz: float = 0.5e6
    freq0_hz: float = 143.0e6  # first channel of MS 0; MS k starts at freq0 + k*nchan*chan_width
    ntime: int = 60
    dt_s: float = 8.0
    ra_deg: float = 180.0
    dec_deg: float = 60.0
    noise_jy: float = 0.05  # gaussian, per real and imaginary part (see above)
    dde_rms_deg: float = 0.0  # 0: no direction-dependent errors
    ndir: int = 3  # number of DDE directions ("nodes")
    seed: int = 1
    sources: tuple[Source, ...] = DEFAULT_SOURCES
    # a flux-scale error per MS (the sky in MS k is multiplied by flux_scale[k]): what the
    # bootstrap must find and remove; empty = none
    flux_scale: tuple[float, ...] = ()


def check_spec(spec: SimSpec) -> None:
    """Refuse a spec that would give an empty, degenerate or meaningless field."""
    positive = {"n_ms": spec.n_ms, "nchan": spec.nchan, "ntime": spec.ntime, "ndir": spec.ndir,
                "chan_width_hz": spec.chan_width_hz, "freq0_hz": spec.freq0_hz,
                "dt_s": spec.dt_s}
    for name, value in positive.items():
        if not value > 0:
            raise HpcddfError(f"simulation {name} = {value} must be positive")
    if spec.nant < 2:
        raise HpcddfError(f"simulation nant = {spec.nant}: need at least 2 stations")
    if spec.noise_jy < 0 or spec.dde_rms_deg < 0:
        raise HpcddfError("simulation noise_jy and dde_rms_deg must not be negative")
    check_sources(spec.sources)
    if spec.flux_scale and (len(spec.flux_scale) != spec.n_ms or min(spec.flux_scale) <= 0):
        raise HpcddfError(f"flux_scale {spec.flux_scale} must give one positive factor per MS",
                          f"give {spec.n_ms} factors")
    if spec.ndir > len(spec.sources):
        raise HpcddfError(f"ndir = {spec.ndir} directions but only {len(spec.sources)} sources",
                          "use at most one direction per source")
