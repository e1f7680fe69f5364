"""What every PHANGS CASA stage shares, run INSIDE the separate CASA environment.

The stage modules (:mod:`hpcddf.phangs.casa_visibilities`, :mod:`hpcddf.phangs.casa_imaging`,
:mod:`hpcddf.phangs.casa_postprocess`) and their command line (:mod:`hpcddf.phangs.casa_tasks`)
are run by CASA's own interpreter, so like them this module imports only the standard library
at the top; casatools, casatasks, numpy and scipy are imported on first use. Here: the stage
error, atomic publication of products (temporary name, then rename), CASA's lazy import,
channel selections of an MS in LSRK frequency and radio velocity, PHANGS's noise estimate and
reading and writing CASA images.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

C_KMS = 299_792.458
C_M_S = 299_792_458.0
K_BOLTZMANN = 1.380649e-23
ARCSEC_RAD = math.pi / (180.0 * 3600.0)


class StageError(Exception):
    """A problem with the inputs of a stage (printed as one line, exit code 2)."""


# --------------------------------------------------------------------------- small helpers

def log(msg: str) -> None:
    """To stderr and, once CASA is loaded, to CASA's log: the node job's log shows both."""
    print(f"casa_tasks: {msg}", file=sys.stderr, flush=True)
    mod = sys.modules.get("casatasks")
    if mod is not None:
        mod.casalog.post(msg, origin="hpcddf.casa_tasks")


def tmp_name(final: Path) -> Path:
    """A hidden temporary name beside ``final`` (same directory, so the rename is atomic)."""
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: Path, final: Path) -> Path:
    """Rename a finished product into place, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        remove(old)
    else:
        os.rename(tmp, final)
    return final


def skip_existing(final: Path, overwrite: bool) -> bool:
    if final.exists() and not overwrite:
        log(f"{final} exists, skipped (use --overwrite to redo it)")
        return True
    return False


def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise StageError(f"{what} {path} does not exist")
    return path


def casa() -> tuple[Any, Any]:
    """casatools and casatasks, imported on first use (3-5 s, 300 MB)."""
    import casatasks
    import casatools
    return casatools, casatasks


def ranges_text(indices: Sequence[int]) -> str:
    """Channel indices as CASA's ``a~b;c~d`` selection (sorted, contiguous runs)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ";".join(f"{a}~{b}" for a, b in runs)


def radio_velocity_kms(freq_hz: float, restfreq_hz: float) -> float:
    return C_KMS * (1.0 - freq_hz / restfreq_hz)


def parse_json_dict(text: str | None, option: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(f"{option} is not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(value, dict):
        raise StageError(f"{option} must be a JSON object, not {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- MS inspection

def datacolumn_of(vis: Path) -> str:
    """'corrected' when the MS has calibrated data, else 'data' (simulated or split MSs)."""
    tools, _ = casa()
    tb = tools.table()
    tb.open(str(vis))
    try:
        return "corrected" if "CORRECTED_DATA" in tb.colnames() else "data"
    finally:
        tb.close()


def lsrk_channels(vis: Path) -> dict[int, tuple[list[float], float]]:
    """spw id -> (LSRK channel centre frequencies in Hz, |channel width| in Hz).

    Through ``ms.cvelfreqs`` so that TOPO-labelled real data get their LSRK velocities, which
    is the frame PHANGS windows (vsys, vwidth) are given in."""
    tools, _ = casa()
    md = tools.msmetadata()
    md.open(str(vis))
    try:
        spws = list(md.spwsforfield(0)) if md.nfields() else []
        spws = sorted(set(spws) | set(range(md.nspw())))
        widths = {s: abs(float(md.chanwidths(s)[0])) for s in spws}
    finally:
        md.close()
    ms = tools.ms()
    ms.open(str(vis))
    try:
        out = {s: ([float(f) for f in ms.cvelfreqs(spwids=[s], mode="channel", outframe="LSRK")],
                   widths[s]) for s in spws}
    finally:
        ms.close()
    return out


def channel_velocities(vis: Path, restfreq_hz: float) -> dict[int, tuple[list[float], float]]:
    """spw id -> (radio velocity of each channel in km/s, |channel width| in km/s)."""
    return {s: ([radio_velocity_kms(f, restfreq_hz) for f in freqs], C_KMS * w / restfreq_hz)
            for s, (freqs, w) in lsrk_channels(vis).items()}


def edge_channels(nchan: int, fraction: float) -> set[int]:
    """The channels within ``fraction`` of either end of an spw of ``nchan`` channels (a
    line_product's flag_edge_fraction: spw edges, where the bandpass rolls off)."""
    n = math.ceil(nchan * fraction - 1e-9) if fraction > 0 else 0
    return set(range(n)) | set(range(max(n, nchan - n), nchan))


def window_selection(vis: Path, restfreq_hz: float, vlo: float, vhi: float,
                     edge_fraction: float = 0.0) -> str:
    """CASA spw:channel selection of the channels overlapping [vlo, vhi], plus one channel on
    each side: the later regrid interpolates linearly and needs a neighbour at the edges.
    The channels within ``edge_fraction`` of each spw's ends are left out (a split that drops
    them has the effect of flagging them, as PHANGS's flag_edge_fraction does)."""
    parts = []
    for spw, (vel, dv) in channel_velocities(vis, restfreq_hz).items():
        lo, hi = vlo - dv, vhi + dv
        edges = edge_channels(len(vel), edge_fraction)
        chans = [i for i, v in enumerate(vel)
                 if v + dv / 2.0 > lo and v - dv / 2.0 < hi and i not in edges]
        if chans:
            parts.append(f"{spw}:{ranges_text(chans)}")
    return ",".join(parts)


# --------------------------------------------------------------------------- noise and images

def chauvenet_mad_noise(values: Any, niter: int = 5) -> float:
    """PHANGS 'chauvmad': MAD start, keep values Chauvenet's criterion accepts, std of the rest.

    A subsample of at most 4 million finite values keeps this cheap on survey-sized cubes."""
    import numpy as np
    from scipy.special import erfc

    x = np.asarray(values, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if x.size > 4_000_000:
        x = x[:: x.size // 4_000_000 + 1]
    if x.size < 10:
        raise StageError("too few finite pixels to estimate the noise")
    keep = x
    for _ in range(niter):
        med = np.median(keep)
        mad = np.median(np.abs(keep - med)) / 0.6745
        if mad <= 0:
            break
        ok = erfc(np.abs(x - np.mean(keep)) / (mad * math.sqrt(2.0))) > 1.0 / (2.0 * x.size)
        if ok.sum() < 10 or ok.sum() == keep.size:
            keep = x[ok] if ok.sum() >= 10 else keep
            break
        keep = x[ok]
    return float(np.std(keep))


def read_image(path: Path) -> tuple[Any, Any]:
    """(pixels, good) of a CASA image, axes as stored (x, y, stokes, chan); bad pixels NaN."""
    import numpy as np

    tools, _ = casa()
    ia = tools.image()
    ia.open(str(path))
    try:
        data = np.array(ia.getchunk(), dtype=float)
        good = np.array(ia.getchunk(getmask=True), dtype=bool)
    finally:
        ia.close()
    data[~good] = np.nan
    return data, good


def write_mask_image(path: Path, template: Path, mask: Any) -> Path:
    """A 0/1 float image on ``template``'s grid, written atomically (tclean's user mask)."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(template))
    try:
        csys = ia.coordsys().torecord()
    finally:
        ia.close()
    tmp = tmp_name(path)
    remove(tmp)
    out = tools.image()
    out.fromarray(outfile=str(tmp), pixels=mask.astype("float32"), csys=csys, overwrite=True)
    out.close()
    return publish(tmp, path)


def model_flux(base: str) -> float:
    """Sum of the clean model (Jy/pixel over all channels): PHANGS's convergence measure."""
    import numpy as np

    data, _ = read_image(Path(f"{base}.model"))
    return float(np.nansum(data))


def beam_of(image: Path) -> dict[str, float]:
    """Restoring beam in arcsec/deg; the largest per-plane beam when there is no common one."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        rb = ia.restoringbeam()
        if "major" not in rb:
            rb = ia.commonbeam()
    finally:
        ia.close()

    def q(v: dict[str, Any], unit: str) -> float:
        return float(tools.quanta().convert(v, unit)["value"])
    return {"bmaj": q(rb["major"], "arcsec"), "bmin": q(rb["minor"], "arcsec"),
            "bpa": q(rb["positionangle"], "deg")}
