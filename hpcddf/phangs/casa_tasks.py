"""The CASA stage units of the PHANGS-ALMA chain, run INSIDE the separate CASA environment.

hpcddf's node job runs ``<casa-env>/bin/python -m hpcddf.phangs.casa_tasks STAGE --options`` (see
:mod:`hpcddf.phangs.casaenv`). This module therefore imports only the standard library at the top;
numpy, scipy, casatools and casatasks are imported inside the stages, after the arguments are
parsed and CASA's log file is chosen, so ``--help`` and argument errors need no CASA.
Parameters arrive as options (paths, numbers, JSON for tclean recipes); key files are read on
the hpcddf side, never here.

Stages (one per PHANGS unit of work; loops over targets/products/configs live in hpcddf):

* ``simobserve``  model cube -> MS (ALMA antenna list from casadata), optional Gaussian noise of
  known sigma added with numpy instead of CASA's atmosphere model
* ``split``       per MS x product: the channels of the line window (LSRK radio velocity), or
  with ``--continuum`` those of a continuum product's frequency ranges
* ``contsub``     uvcontsub on the line-free channels outside the window
* ``extract_line`` per target x product x config: regrid to channel_kms (LSRK, radio), concat
  several MS, statwt on the edge channels
* ``extract_continuum`` per target x continuum product x config: flag the lines' channels,
  average to channel_ghz, concat several MS
* ``dirty``, ``clean_mask``, ``multiscale``, ``singlescale``, ``export_image``: imaging (a
  cube, or one plane when the recipe says specmode 'mfs')
* ``postprocess``  impbcor, round beam, Jy/beam -> K, trim, FITS export
* ``feather``     the same with the round-beam cube feathered with a single-dish cube (imported,
  made Jy/beam, regridded onto the interferometric grid) before the conversion to K. The
  linear mosaic of parts is not a CASA stage: hpcddf combines the parts' postprocessed FITS
  cubes itself (:func:`hpcddf.phangs.run.linear_mosaic`)

Every product is written under a temporary name and renamed into place, so a killed stage
never leaves a product that looks finished; a stage whose product exists is skipped unless
``--overwrite``. The imaging stages keep a snapshot of the working images after each step
(``BASE_dirty.*``, ``BASE_multiscale.*``, ``BASE_singlescale.*``) and restart from the previous
snapshot, as PHANGS's "revert to imaging" does. The last line of stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

C_KMS = 299_792.458
C_M_S = 299_792_458.0
K_BOLTZMANN = 1.380649e-23
ARCSEC_RAD = math.pi / (180.0 * 3600.0)
SNAPSHOT_EXTS = ("residual", "model", "image")  # image last: it marks the snapshot complete
TCLEAN_PRODUCTS = ("image", "model", "residual", "psf", "pb", "sumwt", "mask", "weight", "gridwt",
                   "image.pbcor", "workdirectory")
MIN_STATWT_SAMPLES = 40
EXIT_USAGE = 2
EXIT_NOT_IMPLEMENTED = 3

# tclean settings of the PHANGS cube imaging that a recipe may override (casa-here.md §3).
TCLEAN_DEFAULTS: dict[str, Any] = {
    "specmode": "cube", "outframe": "LSRK", "veltype": "radio", "gridder": "mosaic",
    "weighting": "briggs", "robust": 0.5, "perchanweightdensity": True, "pblimit": 0.2,
    "restoringbeam": "common", "datacolumn": "data", "interactive": False, "parallel": False}
# Set by the stages themselves; a recipe that sets them is overridden.
TCLEAN_OWNED = ("vis", "imagename", "niter", "threshold", "mask", "usemask", "deconvolver",
                "calcres", "calcpsf", "restart", "interactive", "parallel")


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


def window_selection(vis: Path, restfreq_hz: float, vlo: float, vhi: float) -> str:
    """CASA spw:channel selection of the channels overlapping [vlo, vhi], plus one channel on
    each side: the later regrid interpolates linearly and needs a neighbour at the edges."""
    parts = []
    for spw, (vel, dv) in channel_velocities(vis, restfreq_hz).items():
        lo, hi = vlo - dv, vhi + dv
        chans = [i for i, v in enumerate(vel) if v + dv / 2.0 > lo and v - dv / 2.0 < hi]
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


# --------------------------------------------------------------------------- simobserve

def stage_simobserve(a: argparse.Namespace) -> dict[str, Any]:
    """simobserve of a model cube; the MS lands at ``--outputvis``.

    simobserve writes ``<project>/`` into the working directory, so it runs in a private
    directory beside the product. With ``--noise-jy`` CASA's thermal noise is off and Gaussian
    noise of exactly that sigma (each of real and imaginary part, every correlation and channel)
    is added with numpy, and WEIGHT/SIGMA are set to match: a test can then predict the noise."""
    out = Path(a.outputvis).resolve()
    if skip_existing(out, a.overwrite):
        return {"outputvis": str(out), "skipped": True}
    skymodel = need(Path(a.skymodel).resolve(), "sky model")
    tools, tasks = casa()
    antennalist = a.antennalist
    if not os.path.isabs(antennalist):
        antennalist = tools.ctsys.resolve(f"alma/simmos/{antennalist}")
    need(Path(antennalist), "antenna list")
    thermal = "" if a.noise_jy is not None or a.thermalnoise in ("", "none") else a.thermalnoise
    work = out.with_name(f".{out.name}.sim{os.getpid()}")
    remove(work)
    work.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        tasks.simobserve(
            project="sim", skymodel=str(skymodel), inbright="", indirection="", incell="",
            incenter="", inwidth="", setpointings=True, integration=a.integration,
            direction=a.direction, mapsize=[a.mapsize, a.mapsize], maptype="hexagonal",
            pointingspacing="", obsmode="int",
            antennalist=antennalist, hourangle="transit", totaltime=a.totaltime,
            thermalnoise=thermal, user_pwv=a.user_pwv, t_ground=a.t_ground, seed=a.seed,
            graphics="none", overwrite=True)
    finally:
        os.chdir(cwd)
    made = sorted((work / "sim").glob("*.noisy.ms")) or sorted((work / "sim").glob("*.ms"))
    if not made:
        raise StageError(f"simobserve wrote no measurement set under {work / 'sim'}")
    tmp = tmp_name(out)
    remove(tmp)
    os.rename(made[0], tmp)
    summary: dict[str, Any] = {"outputvis": str(out), "thermalnoise": thermal or None}
    drop_model_columns(tmp)
    if a.noise_jy is not None:
        summary.update(add_gaussian_noise(tmp, a.noise_jy, a.seed))
    summary.update(ms_summary(tmp))
    publish(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def drop_model_columns(vis: Path) -> None:
    """simobserve leaves MODEL_DATA (the noise-free model) and CORRECTED_DATA (a copy of DATA,
    noise-free when CASA adds none). The staging reads CORRECTED_DATA when it exists, so DATA,
    where the noise is, is made the only data column, as in a calibrated split MS."""
    tools, _ = casa()
    tb = tools.table()
    tb.open(str(vis), nomodify=False)
    try:
        extra = [c for c in ("CORRECTED_DATA", "MODEL_DATA") if c in tb.colnames()]
        if extra:
            tb.removecols(extra)
    finally:
        tb.close()


def add_gaussian_noise(vis: Path, sigma_jy: float, seed: int) -> dict[str, Any]:
    """DATA += N(0, sigma) + i N(0, sigma); SIGMA = sigma, WEIGHT = 1/sigma^2 (per correlation)."""
    import numpy as np

    tools, _ = casa()
    rng = np.random.default_rng(seed)
    tb = tools.table()
    tb.open(str(vis), nomodify=False)
    try:
        nrow = tb.nrows()
        cols = set(tb.colnames())
        for start in range(0, nrow, 20_000):
            n = min(20_000, nrow - start)
            data = tb.getcol("DATA", start, n)
            noise = rng.normal(0.0, sigma_jy, data.shape) + 1j * rng.normal(0.0, sigma_jy, data.shape)
            tb.putcol("DATA", data + noise, start, n)
            ncorr = data.shape[0]
            tb.putcol("SIGMA", np.full((ncorr, n), sigma_jy), start, n)
            tb.putcol("WEIGHT", np.full((ncorr, n), sigma_jy ** -2), start, n)
            for col, value in (("SIGMA_SPECTRUM", sigma_jy), ("WEIGHT_SPECTRUM", sigma_jy ** -2)):
                if col in cols and tb.iscelldefined(col, start):
                    tb.putcol(col, np.full(data.shape, value), start, n)
        tb.flush()
    finally:
        tb.close()
    return {"noise_jy_per_visibility": sigma_jy, "noise_seed": seed}


def ms_summary(vis: Path) -> dict[str, Any]:
    tools, _ = casa()
    md = tools.msmetadata()
    md.open(str(vis))
    try:
        return {"nrows": int(md.nrows()), "nfields": int(md.nfields()),
                "nchan": [int(md.nchan(s)) for s in range(md.nspw())],
                "nantennas": int(md.nantennas())}
    finally:
        md.close()


# --------------------------------------------------------------------------- uv staging

def stage_split(a: argparse.Namespace) -> dict[str, Any]:
    """The channels of one line product's window (vsys +- vwidth/2, widened by ``--margin-kms``
    so that uvcontsub and statwt keep line-free channels) of one input MS; with
    ``--continuum`` the channels of a continuum product's ``--freq-range-ghz`` ranges (every
    channel without one: PHANGS stages the whole band and flags the lines later)."""
    out = Path(a.outputvis).resolve()
    if skip_existing(out, a.overwrite):
        return {"outputvis": str(out), "skipped": True}
    vis = need(Path(a.vis).resolve(), "measurement set")
    spw = (continuum_selection(vis, a.freq_range_ghz) if a.continuum
           else line_split_selection(vis, a))
    _, tasks = casa()
    tmp = tmp_name(out)
    remove(tmp)
    tasks.split(vis=str(vis), outputvis=str(tmp), field=a.field, spw=spw,
                datacolumn=datacolumn_of(vis), keepflags=False)
    publish(tmp, out)
    return {"outputvis": str(out), "spw": spw}


def line_split_selection(vis: Path, a: argparse.Namespace) -> str:
    """The spw:channel selection of a line product's window plus its margin."""
    missing = [f"--{n.replace('_', '-')}" for n in ("restfreq_ghz", "vsys_kms", "vwidth_kms")
               if getattr(a, n) is None]
    if missing:
        raise StageError(f"a line split needs {', '.join(missing)} (or --continuum)")
    half = a.vwidth_kms / 2.0 + a.margin_kms
    spw = window_selection(vis, a.restfreq_ghz * 1e9, a.vsys_kms - half, a.vsys_kms + half)
    if not spw:
        raise StageError(f"{vis} has no channel within {a.vsys_kms:g} +- {half:g} km/s of "
                         f"{a.restfreq_ghz:g} GHz (LSRK, radio)")
    return spw


def channels_in_ranges(freqs_hz: Sequence[float], width_hz: float,
                       ranges_ghz: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the channels (centre, width) that overlap any [low, high] GHz range."""
    half = width_hz / 2.0
    return [i for i, f in enumerate(freqs_hz)
            if any(f + half > lo * 1e9 and f - half < hi * 1e9 for lo, hi in ranges_ghz)]


def frequency_selection(vis: Path, ranges_ghz: Sequence[tuple[float, float]]
                        ) -> tuple[str, int]:
    """(CASA spw:channel selection of the channels overlapping the LSRK ranges, '' if none;
    the number of channels outside them)."""
    parts, outside = [], 0
    for spw, (freqs, width) in lsrk_channels(vis).items():
        chans = channels_in_ranges(freqs, width, ranges_ghz)
        outside += len(freqs) - len(chans)
        if chans:
            parts.append(f"{spw}:{ranges_text(chans)}")
    return ",".join(parts), outside


def continuum_selection(vis: Path, ranges_ghz: Sequence[tuple[float, float]]) -> str:
    """A continuum product's channels: those in its frequency ranges, or all ('')."""
    if not ranges_ghz:
        return ""
    spw, _ = frequency_selection(vis, ranges_ghz)
    if not spw:
        text = ", ".join(f"{lo:g}-{hi:g}" for lo, hi in ranges_ghz)
        raise StageError(f"{vis} has no channel within the continuum ranges {text} GHz (LSRK)")
    return spw


def channel_bins(nchans: Sequence[int], widths_hz: Sequence[float], channel_ghz: float
                 ) -> list[int]:
    """mstransform's chanbin per spw: the whole number of native channels nearest to
    ``channel_ghz`` (at least 1, at most the spw), or the whole spw when it is 0 (PHANGS
    collapses each spw to one channel when a continuum product gives no width)."""
    if channel_ghz <= 0:
        return [int(n) for n in nchans]
    return [max(1, min(int(n), round(channel_ghz * 1e9 / w))) for n, w in zip(nchans, widths_hz)]


def stage_extract_continuum(a: argparse.Namespace) -> dict[str, Any]:
    """A continuum product's MS from its staged MSs: on a copy of each, flag the channels of
    the lines (``--flag-ghz LO,HI`` LSRK ranges: the lines named by the product at the
    target's window), average ``--channel-ghz`` wide channels (flagged channels do not enter
    the average; an output channel with none left is flagged), then concat. No statwt:
    PHANGS runs none on continuum data either, and the weights follow the averaging."""
    out = Path(a.outputvis).resolve()
    if skip_existing(out, a.overwrite):
        return {"outputvis": str(out), "skipped": True}
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    _, tasks = casa()
    work = out.with_name(f".{out.name}.work{os.getpid()}")
    remove(work)
    work.mkdir()
    parts, flagged, bins = [], [], []
    for i, v in enumerate(vis):
        copy = work / f"copy{i}.ms"
        shutil.copytree(v, copy)  # the staged MS belongs to stage_ms: never flag it in place
        flags, kept = frequency_selection(copy, a.flag_ghz)
        if not kept:
            raise StageError(f"every channel of {v} lies within a flagged line window")
        if flags:
            tasks.flagdata(vis=str(copy), mode="manual", spw=flags, flagbackup=False)
        chans = lsrk_channels(copy)
        spw_bins = channel_bins([len(f) for f, _ in chans.values()],
                                [w for _, w in chans.values()], a.channel_ghz)
        part = work / f"part{i}.ms"
        average = {"chanaverage": True, "chanbin": spw_bins} if max(spw_bins) > 1 else {}
        tasks.mstransform(vis=str(copy), outputvis=str(part), datacolumn=datacolumn_of(copy),
                          keepflags=False, **average)
        remove(copy)
        parts.append(part)
        flagged.append(flags)
        bins.append(spw_bins)
    tmp = tmp_name(out)
    remove(tmp)
    if len(parts) == 1:
        os.rename(parts[0], tmp)
    else:
        tasks.concat(vis=[str(p) for p in parts], concatvis=str(tmp))
    publish(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    return {"outputvis": str(out), "flagged": flagged, "chanbin": bins,
            "channel_ghz": a.channel_ghz}


def stage_contsub(a: argparse.Namespace) -> dict[str, Any]:
    """uvcontsub with a polynomial of ``--fitorder`` through the channels outside the line
    window (and outside every ``--exclude-kms lo,hi`` range, e.g. other lines)."""
    out = Path(a.outputvis).resolve()
    if skip_existing(out, a.overwrite):
        return {"outputvis": str(out), "skipped": True}
    vis = need(Path(a.vis).resolve(), "measurement set")
    restfreq = a.restfreq_ghz * 1e9
    vlo, vhi = a.vsys_kms - a.vwidth_kms / 2.0, a.vsys_kms + a.vwidth_kms / 2.0
    fitspec = line_free_selection(vis, restfreq, [(vlo, vhi), *a.exclude_kms])
    if not fitspec:
        raise StageError(f"{vis} has no line-free channel outside {vlo:g}..{vhi:g} km/s; "
                         "widen the split margin or narrow vwidth")
    _, tasks = casa()
    tmp = tmp_name(out)
    remove(tmp)
    tasks.uvcontsub(vis=str(vis), outputvis=str(tmp), fitspec=fitspec, fitorder=a.fitorder,
                    fitmethod="gsl", datacolumn=datacolumn_of(vis))
    publish(tmp, out)
    return {"outputvis": str(out), "fitspec": fitspec}


def line_free_selection(vis: Path, restfreq_hz: float,
                        windows: Sequence[tuple[float, float]]) -> str:
    parts = []
    for spw, (vel, dv) in channel_velocities(vis, restfreq_hz).items():
        half = dv / 2.0
        chans = [i for i, v in enumerate(vel)
                 if all(v + half <= lo or v - half >= hi for lo, hi in windows)]
        if chans:
            parts.append(f"{spw}:{ranges_text(chans)}")
    return ",".join(parts)


def velocity_grid(coverages: Iterable[tuple[float, float]], vsys: float, vwidth: float,
                  edge: float, channel: float) -> tuple[float, int]:
    """(first channel centre, nchan) of the output grid: vsys +- (vwidth/2 + edge), cut to the
    velocities every input covers, centred in what is left."""
    lo, hi = vsys - vwidth / 2.0 - edge, vsys + vwidth / 2.0 + edge
    for clo, chi in coverages:
        lo, hi = max(lo, clo), min(hi, chi)
    nchan = math.floor((hi - lo) / channel + 1e-6)
    if nchan < 1:
        raise StageError(f"the inputs share no {channel:g} km/s channel within "
                         f"{vsys:g} +- {vwidth / 2 + edge:g} km/s")
    lo += (hi - lo - nchan * channel) / 2.0
    return lo + channel / 2.0, nchan


def stage_extract_line(a: argparse.Namespace) -> dict[str, Any]:
    """Regrid every input to ``--channel-kms`` channels in LSRK radio velocity, concat them,
    then statwt from the ``--statwt-edge-kms`` at each end of the window (line-free by
    construction: they lie outside vsys +- vwidth/2)."""
    out = Path(a.outputvis).resolve()
    if skip_existing(out, a.overwrite):
        return {"outputvis": str(out), "skipped": True}
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    restfreq = a.restfreq_ghz * 1e9
    # Between the first and last input channel centres: linear interpolation has data on both
    # sides there (an output channel reaching the outer half of an edge channel is flagged).
    coverages = []
    for v in vis:
        chans = channel_velocities(v, restfreq)
        coverages.append((min(min(c) for c, _ in chans.values()),
                          max(max(c) for c, _ in chans.values())))
    start, nchan = velocity_grid(coverages, a.vsys_kms, a.vwidth_kms, a.statwt_edge_kms,
                                 a.channel_kms)
    _, tasks = casa()
    work = out.with_name(f".{out.name}.work{os.getpid()}")
    remove(work)
    work.mkdir()
    regridded = []
    for i, v in enumerate(vis):
        part = work / f"part{i}.ms"
        tasks.mstransform(
            vis=str(v), outputvis=str(part), datacolumn=datacolumn_of(v), keepflags=False,
            combinespws=len(channel_velocities(v, restfreq)) > 1, regridms=True,
            mode="velocity", outframe="LSRK", veltype="radio", restfreq=f"{restfreq}Hz",
            start=f"{start}km/s", width=f"{a.channel_kms}km/s", nchan=nchan,
            interpolation="linear")
        regridded.append(part)
    tmp = tmp_name(out)
    remove(tmp)
    if len(regridded) == 1:
        os.rename(regridded[0], tmp)
    else:
        tasks.concat(vis=[str(p) for p in regridded], concatvis=str(tmp))
    # statwt's channels: those of the edges added around the window, wholly outside
    # vsys +- vwidth/2 (only the part of the edges the inputs cover is in the grid).
    vlo, vhi = a.vsys_kms - a.vwidth_kms / 2.0, a.vsys_kms + a.vwidth_kms / 2.0
    centres = [start + i * a.channel_kms for i in range(nchan)]
    half = a.channel_kms / 2.0
    edges = [i for i, v in enumerate(centres) if v + half <= vlo + 1e-6 or v - half >= vhi - 1e-6]
    fitspw, timebin = "", None
    if a.statwt_edge_kms > 0 and not edges:
        log(f"no regridded channel lies outside {vlo:g}..{vhi:g} km/s: statwt skipped")
    if a.statwt_edge_kms > 0 and edges:
        fitspw = f"0:{ranges_text(edges)}"
        # A handful of edge channels gives a very noisy variance per integration, and such
        # noisy weights cost more sensitivity than they gain. statwt therefore bins enough
        # integrations for MIN_STATWT_SAMPLES real+imaginary values per weight, across scan
        # and field changes (mosaics change field every few integrations): the edge channels
        # hold only noise after uvcontsub, the same in every field.
        timebin = a.statwt_timebin or max(1, math.ceil(MIN_STATWT_SAMPLES / (2 * len(edges))))
        tasks.statwt(vis=str(tmp), fitspw=fitspw, datacolumn="data", timebin=timebin,
                     combine="field,scan", flagbackup=False)
    publish(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    return {"outputvis": str(out), "start_kms": start, "nchan": nchan,
            "channel_kms": a.channel_kms, "statwt_fitspw": fitspw,
            "statwt_timebin": timebin if fitspw else None}


# --------------------------------------------------------------------------- imaging

def tclean_params(a: argparse.Namespace, vis: Sequence[Path]) -> dict[str, Any]:
    """PHANGS defaults, then the recipe (``--tclean`` JSON), then what the stage owns."""
    params = {**TCLEAN_DEFAULTS, **parse_json_dict(a.tclean, "--tclean")}
    for key in TCLEAN_OWNED:
        params.pop(key, None)
    # a continuum image (specmode 'mfs', one plane) has no line: it is sized for the highest
    # frequency of its data, where the beam is finest
    sizing_ghz = a.restfreq_ghz
    if params.get("specmode") == "mfs":
        sizing_ghz = None
    elif a.restfreq_ghz is None:
        raise StageError(f"a cube (specmode {params.get('specmode')!r}) needs --restfreq-ghz; "
                         "a continuum image sets specmode 'mfs' in --tclean")
    if a.restfreq_ghz is not None:
        params["restfreq"] = f"{a.restfreq_ghz}GHz"
    if not params.get("imsize") or not params.get("cell") or not params.get("phasecenter"):
        sizing_ghz = sizing_ghz or highest_frequency_ghz(vis)
        params.update({k: v for k, v in pick_cell_and_imsize(vis, sizing_ghz).items()
                       if not params.get(k)})
    params["vis"] = [str(v) for v in vis]
    params["imagename"] = str(Path(a.imagename).resolve())
    return params


def good_imsize(n: int) -> int:
    """The smallest size >= n whose prime factors are 2, 3, 5 (fast FFTs, as CASA advises)."""
    m = max(n, 8)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1 and m % 2 == 0:
            return m
        m += 1


def highest_frequency_ghz(vis: Sequence[Path]) -> float:
    """The highest LSRK channel frequency of the inputs (GHz)."""
    return max(max(freqs) for v in vis for freqs, _ in lsrk_channels(v).values()) / 1e9


def pick_cell_and_imsize(vis: Sequence[Path], restfreq_ghz: float) -> dict[str, Any]:
    """Dynamic sizing when the recipe leaves it open: five pixels across the beam (lambda over
    the 95th-percentile baseline) and a field covering every pointing plus the primary beam
    to its 20 % level, centred on the mean pointing direction."""
    import numpy as np

    tools, _ = casa()
    lam = C_M_S / (restfreq_ghz * 1e9)
    uvdist, dirs, diam = [], [], 12.0
    for v in vis:
        tb = tools.table()
        tb.open(str(v))
        try:
            uvw = tb.getcol("UVW")
        finally:
            tb.close()
        uvdist.append(np.hypot(uvw[0], uvw[1]))
        md = tools.msmetadata()
        md.open(str(v))
        try:
            diam = max(float(md.antennadiameter(0)["value"]), 1.0)
            for f in range(md.nfields()):
                d = md.phasecenter(f)
                dirs.append((d["m0"]["value"], d["m1"]["value"]))
        finally:
            md.close()
    bmax = float(np.percentile(np.concatenate(uvdist), 95))
    cell = lam / bmax / 5.0 / ARCSEC_RAD
    cell = float(f"{cell:.2g}")
    ra = np.unwrap(np.array([d[0] for d in dirs]))
    dec = np.array([d[1] for d in dirs])
    ra0, dec0 = float(np.mean(ra)), float(np.mean(dec))
    extent = max(np.max(np.abs((ra - ra0) * math.cos(dec0))), np.max(np.abs(dec - dec0)))
    pb_fwhm = 1.13 * lam / diam
    half_width = extent + 1.1 * pb_fwhm  # PB(r) of a Gaussian falls to ~0.1 at 1.1 FWHM
    imsize = good_imsize(math.ceil(2 * half_width / (cell * ARCSEC_RAD)))
    qa = tools.quanta()
    center = (f"J2000 {qa.formxxx(f'{ra0 % (2 * math.pi)}rad', format='hms', prec=4)} "
              f"{qa.formxxx(f'{dec0}rad', format='dms', prec=3)}")
    return {"cell": f"{cell}arcsec", "imsize": [imsize, imsize], "phasecenter": center}


def snapshot(base: str, stage: str) -> None:
    for ext in SNAPSHOT_EXTS:
        final = Path(f"{base}_{stage}.{ext}")
        tmp = tmp_name(final)
        remove(tmp)
        shutil.copytree(f"{base}.{ext}", tmp)
        publish(tmp, final)


def restore(base: str, stage: str) -> None:
    """Put the working images back to the end of ``stage`` (a killed later step is undone)."""
    for ext in SNAPSHOT_EXTS:
        need(Path(f"{base}_{stage}.{ext}"), f"the {stage} image")
    for ext in (*SNAPSHOT_EXTS, "mask"):
        remove(Path(f"{base}.{ext}"))
    for ext in SNAPSHOT_EXTS:
        shutil.copytree(f"{base}_{stage}.{ext}", f"{base}.{ext}")


IMAGING_STEPS = ("dirty", "cleanmask", "multiscale", "singlescale")
EXPORTED = ("", "_pb", "_residual", "_model")


def invalidate_after(base: str, step: str) -> None:
    """Remove what later imaging steps made from the previous result of ``step``: a redone
    dirty cube must not be followed by a stale clean mask or a skipped, stale clean."""
    later = IMAGING_STEPS[IMAGING_STEPS.index(step) + 1:]
    for name in later:
        if name == "cleanmask":
            remove(Path(f"{base}_cleanmask.im"))
            continue
        for ext in SNAPSHOT_EXTS:
            remove(Path(f"{base}_{name}.{ext}"))
    remove(Path(f"{base}_singlescale_mask.im"))
    for suffix in EXPORTED:
        remove(Path(f"{base}{suffix}.fits"))


def residual_noise(base: str, stage: str) -> float:
    """Noise of a snapshot's residual; tclean's flat-noise normalisation makes it uniform."""
    data, _ = read_image(Path(f"{base}_{stage}.residual"))
    return chauvenet_mad_noise(data)


def stage_dirty(a: argparse.Namespace) -> dict[str, Any]:
    base = str(Path(a.imagename).resolve())
    if skip_existing(Path(f"{base}_dirty.image"), a.overwrite):
        return {"imagename": base, "skipped": True}
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    params = tclean_params(a, vis)
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    # tclean's own products of an earlier attempt (only its extensions: the staged MS may be
    # called <base>.ms, and PHANGS names the cube like the MS it images)
    for ext in TCLEAN_PRODUCTS:
        remove(Path(f"{base}.{ext}"))
    invalidate_after(base, "dirty")
    _, tasks = casa()
    tasks.tclean(**params, niter=0, deconvolver="hogbom", calcres=True, calcpsf=True,
                 restart=True)
    snapshot(base, "dirty")
    sigma = residual_noise(base, "dirty")
    return {"imagename": base, "noise_jy_beam": sigma, **beam_of(Path(f"{base}.image")),
            **{k: params[k] for k in ("cell", "imsize", "phasecenter")}}


def stage_clean_mask(a: argparse.Namespace) -> dict[str, Any]:
    """A clean mask from the dirty cube: Gaussian-smooth each channel by ``--smooth-pix``,
    keep S/N > ``--snr`` of the smoothed cube, dilate ``--grow`` times in x, y and v.

    Never named ``<imagename>.mask``: tclean refuses a user mask of its own mask's name."""
    import numpy as np
    from scipy import ndimage

    base = str(Path(a.imagename).resolve())
    out = Path(a.mask).resolve() if a.mask else Path(f"{base}_cleanmask.im")
    if out == Path(f"{base}.mask"):
        raise StageError(f"the clean mask cannot be named {out} (tclean's own mask)")
    if skip_existing(out, a.overwrite):
        return {"mask": str(out), "skipped": True}
    dirty = need(Path(f"{base}_dirty.image"), "dirty cube")
    data, good = read_image(dirty)
    filled = np.where(good, data, 0.0)
    smooth = ndimage.gaussian_filter(filled, sigma=(a.smooth_pix, a.smooth_pix, 0, 0))
    smooth[~good] = np.nan
    sigma = chauvenet_mad_noise(smooth)
    mask = np.nan_to_num(smooth) > a.snr * sigma
    if a.grow > 0:
        mask = ndimage.binary_dilation(mask, iterations=a.grow,
                                       structure=ndimage.generate_binary_structure(4, 1))
    mask &= good
    if out == Path(f"{base}_cleanmask.im"):
        invalidate_after(base, "cleanmask")
    write_mask_image(out, dirty, mask)
    return {"mask": str(out), "mask_voxels": int(mask.sum()), "smoothed_noise": sigma}


def clean_until_converged(params: dict[str, Any], *, deconvolver: str, mask: Path,
                          threshold_jy: float, niter_start: int, niter_growth: float,
                          max_loops: int, fracflux: float, extra: dict[str, Any]
                          ) -> list[dict[str, Any]]:
    """PHANGS's clean loop: repeated tclean calls, each continuing from the last model with a
    larger niter, until the model flux changes by less than ``fracflux`` between calls, tclean
    stops for another reason than its niter (threshold, empty mask, ...), or ``max_loops``
    calls are done. For cubes, CASA 6.7 applies niter to each channel (iterdone is the sum)."""
    _, tasks = casa()
    base = params["imagename"]
    history = []
    flux_before = model_flux(base)
    niter = niter_start
    for loop in range(max_loops):
        # The first call copies the user mask to BASE.mask; later calls must reuse that one
        # (tclean refuses a user mask while BASE.mask exists).
        rec = tasks.tclean(**params, **extra, deconvolver=deconvolver, niter=niter,
                           threshold=f"{threshold_jy}Jy", usemask="user",
                           mask=str(mask) if loop == 0 else "",
                           calcres=False, calcpsf=False, restart=True) or {}
        flux = model_flux(base)
        done = int(rec.get("iterdone", niter))
        # stopcode 1: niter used up, so more iterations could still clean; any other code
        # (threshold, zero mask, divergence, ...) means another call would not help.
        stopcode = int(rec.get("stopcode", 1 if done >= niter else 2))
        change = abs(flux - flux_before) / abs(flux) if flux else math.inf
        history.append({"loop": loop, "niter": niter, "iterdone": done, "model_flux": flux,
                        "fractional_change": change, "stopcode": stopcode})
        log(f"{deconvolver} loop {loop}: niter {niter}, done {done}, model flux {flux:.4g}, "
            f"change {change:.3g}")
        if stopcode != 1 or change < fracflux:
            break
        flux_before = flux
        niter = math.ceil(niter * niter_growth)
    return history


def stage_multiscale(a: argparse.Namespace) -> dict[str, Any]:
    """Multiscale clean inside the clean mask down to ``--threshold-snr`` x the dirty noise."""
    base = str(Path(a.imagename).resolve())
    if skip_existing(Path(f"{base}_multiscale.image"), a.overwrite):
        return {"imagename": base, "skipped": True}
    mask = need(Path(a.mask).resolve() if a.mask else Path(f"{base}_cleanmask.im"), "clean mask")
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    params = tclean_params(a, vis)
    invalidate_after(base, "multiscale")
    restore(base, "dirty")
    sigma = residual_noise(base, "dirty")
    scales = multiscale_scales(a, params)
    extra = {"scales": scales, "smallscalebias": params.pop("smallscalebias", 0.6),
             "cyclefactor": params.pop("cyclefactor", 1.5)}
    history = clean_until_converged(
        params, deconvolver="multiscale", mask=mask, threshold_jy=a.threshold_snr * sigma,
        niter_start=a.niter_start, niter_growth=a.niter_growth, max_loops=a.max_loops,
        fracflux=a.convergence_fracflux, extra=extra)
    snapshot(base, "multiscale")
    return {"imagename": base, "noise_jy_beam": sigma, "loops": history}


def multiscale_scales(a: argparse.Namespace, params: dict[str, Any]) -> list[int]:
    """Scales in pixels: ``--scales-pix``, else ``--scales-arcsec`` (an interf_config's
    clean_scales_arcsec) over the cell, else the recipe's, else casa-here.md's 0, 5, 10, 20."""
    recipe = params.pop("scales", None)
    if a.scales_pix:
        return [int(s) for s in a.scales_pix.split(",")]
    if a.scales_arcsec:
        tools, _ = casa()
        cell = float(tools.quanta().convert(params["cell"], "arcsec")["value"])
        return sorted({round(float(s) / cell) for s in a.scales_arcsec.split(",")})
    return [int(s) for s in recipe] if recipe else [0, 5, 10, 20]


def singlescale_mask(base: str, hi_snr: float, lo_snr: float, within: Path | None) -> Any:
    """Bright emission of the multiscale result: S/N > hi seeds grown through S/N > lo (both
    in two consecutive channels of a cube; a continuum image has one plane, where the S/N
    alone decides), optionally inside the prior clean mask."""
    import numpy as np
    from scipy import ndimage

    sigma = residual_noise(base, "multiscale")
    image, good = read_image(Path(f"{base}_multiscale.image"))
    snr = np.nan_to_num(image) / sigma
    run = np.zeros((1, 1, 1, 2), dtype=bool)
    run[..., :] = True

    def in_two_channels(m: Any) -> Any:
        return ndimage.binary_opening(m, structure=run) if m.shape[3] > 1 else m
    hi = in_two_channels(snr > hi_snr)
    lo = in_two_channels(snr > lo_snr)
    mask = ndimage.binary_propagation(hi, mask=lo) & good
    if within is not None:
        prior, _ = read_image(within)
        mask &= np.nan_to_num(prior) > 0.5
    return mask


def stage_singlescale(a: argparse.Namespace) -> dict[str, Any]:
    """Single-scale (Hogbom) clean inside the S/N mask down to ``--threshold-snr`` x noise."""
    base = str(Path(a.imagename).resolve())
    if skip_existing(Path(f"{base}_singlescale.image"), a.overwrite):
        return {"imagename": base, "skipped": True}
    vis = [need(Path(v).resolve(), "measurement set") for v in a.vis]
    params = tclean_params(a, vis)
    for key in ("scales", "smallscalebias"):
        params.pop(key, None)
    invalidate_after(base, "singlescale")
    restore(base, "multiscale")
    within = Path(a.within_mask).resolve() if a.within_mask else None
    mask = singlescale_mask(base, a.hi_snr, a.lo_snr, within)
    mask_path = write_mask_image(Path(f"{base}_singlescale_mask.im"),
                                 Path(f"{base}_multiscale.image"), mask)
    sigma = residual_noise(base, "multiscale")
    history: list[dict[str, Any]] = []
    if mask.any():
        history = clean_until_converged(
            params, deconvolver="hogbom", mask=mask_path, threshold_jy=a.threshold_snr * sigma,
            niter_start=a.niter_start, niter_growth=a.niter_growth, max_loops=a.max_loops,
            fracflux=a.convergence_fracflux, extra={})
    else:
        log("the single-scale mask is empty; the multiscale result stands")
    snapshot(base, "singlescale")
    return {"imagename": base, "noise_jy_beam": sigma, "mask_voxels": int(mask.sum()),
            "loops": history}


def single_plane_frequency_hz(image: Path) -> float | None:
    """The frequency of an image with one spectral plane (a continuum image), else None."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        csys = ia.coordsys()
        spec = csys.findcoordinate("spectral")
        if not spec["return"]:
            return None
        axis = int(spec["pixel"][0])
        if ia.shape()[axis] != 1:
            return None
        return float(csys.toworld([0.0] * len(ia.shape()), format="n")["numeric"][axis])
    finally:
        ia.close()


def export_fits(image: Path, fits: Path) -> Path:
    """exportfits with velocity axes and degenerate axes dropped, atomically.

    Dropping the degenerate axes drops a continuum image's one-plane spectral axis, and with
    it the frequency its Kelvin scale (and any spectral index) refers to: it is kept as the
    header card FREQ (Hz), written from the image's miscinfo."""
    freq = single_plane_frequency_hz(image)
    if freq is not None:
        tools, _ = casa()
        ia = tools.image()
        ia.open(str(image))
        try:
            ia.setmiscinfo({**ia.miscinfo(), "FREQ": freq})
        finally:
            ia.close()
    _, tasks = casa()
    tmp = fits.with_name(f".tmp{os.getpid()}.{fits.name}")
    remove(tmp)
    tasks.exportfits(imagename=str(image), fitsimage=str(tmp), velocity=True, dropdeg=True,
                     dropstokes=True, overwrite=True)
    return publish(tmp, fits)


def stage_export_image(a: argparse.Namespace) -> dict[str, Any]:
    """The imaging products as FITS: BASE.fits (image), BASE_pb/_residual/_model.fits."""
    base = str(Path(a.imagename).resolve())
    written = []
    for ext, suffix in (("pb", "_pb"), ("residual", "_residual"), ("model", "_model"),
                        ("image", "")):
        src = need(Path(f"{base}.{ext}"), f"the {ext} image")
        final = Path(f"{base}{suffix}.fits")
        if not skip_existing(final, a.overwrite):
            export_fits(src, final)
        written.append(str(final))
    return {"fits": written}


# --------------------------------------------------------------------------- postprocess

def round_beam_arcsec(beam: dict[str, float], forced: float | None) -> float:
    """The round target beam: forced, or the major axis rounded up to the next 0.01"
    after widening it 2 % (imsmooth cannot deconvolve a kernel of zero width)."""
    if forced:
        if forced < beam["bmaj"]:
            raise StageError(f"--round-beam-arcsec {forced} is finer than the beam's major "
                             f"axis {beam['bmaj']:.3f} arcsec")
        return forced
    return math.ceil(beam["bmaj"] * 1.02 * 100.0) / 100.0


def convert_to_kelvin(image: Path) -> list[float]:
    """Jy/beam -> K (Rayleigh-Jeans) in place, channel by channel at each channel's frequency:
    T = S c^2 / (2 k nu^2 Omega_beam), Omega = pi bmaj bmin / (4 ln 2)."""
    return rescale_brightness(image, to_kelvin=True)


def rescale_brightness(image: Path, to_kelvin: bool) -> list[float]:
    """Jy/beam <-> K in place with the image's beam; the K per Jy/beam factor of each channel.
    The inverse direction stages a single-dish cube delivered in K (feather needs Jy/beam)."""
    import numpy as np

    tools, _ = casa()
    beam = beam_of(image)
    omega = math.pi * beam["bmaj"] * beam["bmin"] * ARCSEC_RAD ** 2 / (4.0 * math.log(2.0))
    ia = tools.image()
    ia.open(str(image))
    factors = []
    try:
        csys = ia.coordsys()
        spec = csys.findcoordinate("spectral")
        axis = int(spec["pixel"][0])
        shape = list(ia.shape())
        for chan in range(shape[axis]):
            pix = [0.0] * len(shape)
            pix[axis] = float(chan)
            world = csys.toworld(pix, format="n")["numeric"]
            nu = float(world[axis])
            factor = 1e-26 * C_M_S ** 2 / (2.0 * K_BOLTZMANN * nu ** 2 * omega)
            blc = [0] * len(shape)
            trc = [s - 1 for s in shape]
            blc[axis] = trc[axis] = chan
            plane = ia.getchunk(blc=blc, trc=trc)
            ia.putchunk(np.asarray(plane) * (factor if to_kelvin else 1.0 / factor), blc=blc)
            factors.append(factor)
        ia.setbrightnessunit("K" if to_kelvin else "Jy/beam")
    finally:
        ia.close()
    return factors


def trim_box(pb: Path, cutoff: float, pad: int) -> str:
    """Pixel box around every pixel with pb >= cutoff in any channel, padded by ``pad``."""
    import numpy as np

    data, good = read_image(pb)
    cover = (np.nan_to_num(data) >= cutoff) & good
    cover2d = cover.any(axis=tuple(range(2, cover.ndim)))
    xs, ys = np.nonzero(cover2d)
    if xs.size == 0:
        raise StageError(f"no pixel of {pb} reaches the primary-beam cutoff {cutoff}")
    nx, ny = cover2d.shape
    x0, x1 = max(0, xs.min() - pad), min(nx - 1, xs.max() + pad)
    y0, y1 = max(0, ys.min() - pad), min(ny - 1, ys.max() + pad)
    return f"{x0},{y0},{x1},{y1}"


def stage_postprocess(a: argparse.Namespace) -> dict[str, Any]:
    """impbcor, imsmooth to a round beam, Jy/beam -> K, trim to the pb cutoff, export:
    ``{stem}_pbcorr_trimmed_k.fits`` (the input of the derived products),
    ``{stem}_flat_trimmed_k.fits`` (not pb-corrected: flat noise) and ``{stem}_pb_trimmed.fits``."""
    return postprocess(a, singledish=None)


def stage_feather(a: argparse.Namespace) -> dict[str, Any]:
    """The postprocess of a feather config: as ``postprocess``, with the round-beam cubes
    feathered with the single-dish cube ``--singledish`` before the conversion to K (the
    feathered cube keeps the interferometric round beam), so the products have the same
    names, units and trim and the derived products treat them like any other cube."""
    return postprocess(a, singledish=need(Path(a.singledish).resolve(), "single-dish cube"))


def postprocess(a: argparse.Namespace, singledish: Path | None) -> dict[str, Any]:
    base = str(Path(a.imagename).resolve())
    outdir = Path(a.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    finals = {k: outdir / f"{a.stem}_{k}.fits"
              for k in ("pbcorr_trimmed_k", "flat_trimmed_k", "pb_trimmed")}
    if all(f.exists() for f in finals.values()) and not a.overwrite:
        log(f"{finals['pbcorr_trimmed_k']} exists, skipped (use --overwrite to redo it)")
        return {"fits": {k: str(v) for k, v in finals.items()}, "skipped": True}
    image = need(Path(f"{base}.image"), "the cleaned cube")
    pb = need(Path(f"{base}.pb"), "the primary beam")
    _, tasks = casa()
    work = outdir / f".{a.stem}.post{os.getpid()}"
    remove(work)
    work.mkdir()
    beam = beam_of(image)
    target = round_beam_arcsec(beam, a.round_beam_arcsec)
    # a single-dish cube feather cannot use fails here, before the interferometric steps
    sd = import_singledish(singledish, work) if singledish is not None else None
    tasks.impbcor(imagename=str(image), pbimage=str(pb), outfile=str(work / "pbcor.im"),
                  cutoff=a.pb_cutoff, overwrite=True)
    for name, src in (("pbcorr", work / "pbcor.im"), ("flat", image)):
        tasks.imsmooth(imagename=str(src), kernel="gauss", targetres=True,
                       major=f"{target}arcsec", minor=f"{target}arcsec", pa="0deg",
                       outfile=str(work / f"{name}_round.im"), overwrite=True)
    sources = {"pbcorr_trimmed_k": work / "pbcorr_round.im", "flat_trimmed_k": work / "flat_round.im",
               "pb_trimmed": pb}
    summary: dict[str, Any] = {}
    if sd is not None:
        cubes, summary["singledish"] = feather_with_singledish(
            sd, sources["pbcorr_trimmed_k"], sources["flat_trimmed_k"], pb, work,
            cutoff=a.pb_cutoff, apodize=a.apodize, sdfactor=a.sdfactor)
        sources.update(cubes)
    for key in ("pbcorr_trimmed_k", "flat_trimmed_k"):
        convert_to_kelvin(sources[key])
    box = trim_box(pb, a.pb_cutoff, a.trim_pad)
    for key, src in sources.items():
        trimmed = work / f"{key}.im"
        tasks.imsubimage(imagename=str(src), outfile=str(trimmed), box=box, overwrite=True)
        export_fits(trimmed, finals[key])
    shutil.rmtree(work, ignore_errors=True)
    return {"fits": {k: str(v) for k, v in finals.items()}, "round_beam_arcsec": target,
            "native_beam": beam, "trim_box": box, **summary}


# --------------------------------------------------------------------------- feather

def dropdeg(image: Path, out: Path) -> Path:
    """``image`` without its length-1 axes (Stokes): single-dish cubes come as RA, Dec,
    spectral, and imregrid and the pixel arithmetic below need the same axes on both sides."""
    _, tasks = casa()
    tasks.imsubimage(imagename=str(image), outfile=str(out), dropdeg=True, overwrite=True)
    return out


def image_like(path: Path, template: Path, data: Any) -> Path:
    """A new unmasked image of ``data`` with ``template``'s coordinates, beam and unit (NaN
    marks blanks: exportfits writes them as NaN, as it writes masked pixels)."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(template))
    try:
        csys, beam, unit = ia.coordsys().torecord(), ia.restoringbeam(), ia.brightnessunit()
    finally:
        ia.close()
    out = tools.image()
    out.fromarray(outfile=str(path), pixels=data.astype("float32"), csys=csys, overwrite=True)
    try:
        if "major" in beam:
            out.setrestoringbeam(beam=beam)
        out.setbrightnessunit(unit)
    finally:
        out.close()
    return path


def singledish_unit(image: Path, source: Path) -> str:
    """Check the imported single-dish cube has a beam and a brightness unit feather can use;
    a cube in K is converted to Jy/beam in place. Returns the unit it came in."""
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        beam, unit = ia.restoringbeam(), ia.brightnessunit().strip()
        ndim = len(ia.shape())
    finally:
        ia.close()
    if "major" not in beam and "beams" not in beam:
        raise StageError(f"single-dish cube {source} has no beam (BMAJ/BMIN): feather needs it")
    if ndim != 3:
        raise StageError(f"single-dish cube {source} has {ndim} non-degenerate axes; "
                         "expected RA, Dec and a spectral axis")
    key = unit.replace(" ", "").lower()
    if key == "k":
        rescale_brightness(image, to_kelvin=False)
    elif key != "jy/beam":
        raise StageError(f"single-dish cube {source} has brightness unit {unit or '(none)'!r}; "
                         "feather needs Jy/beam (or K, converted with its beam)")
    return unit


@dataclass(frozen=True)
class SingleDish:
    """An imported single-dish cube: its CASA image (Jy/beam, no degenerate axes), the FITS
    file it came from and the brightness unit it came in."""

    image: Path
    source: Path
    unit_in: str


def import_singledish(sd_fits: Path, work: Path) -> SingleDish:
    _, tasks = casa()
    raw = work / "sd_import.im"
    tasks.importfits(fitsimage=str(sd_fits), imagename=str(raw), overwrite=True)
    sd = dropdeg(raw, work / "sd.im")
    return SingleDish(sd, sd_fits, singledish_unit(sd, sd_fits))


def regrid_singledish(sd: SingleDish, template: Path, work: Path
                      ) -> tuple[Path, dict[str, Any]]:
    """The single-dish cube on ``template``'s grid (the interferometric round-beam cube),
    spatially and spectrally (imregrid, linear): feather and the apodisation need both cubes
    pixel for pixel on one grid. Channels the single dish does not cover are an error; pixels
    outside its map are zero (no single-dish information).

    Feather takes the total flux from the single dish on this grid, so the single-dish emission
    outside the interferometric image is lost: the image must hold the galaxy plus about a
    single-dish beam (a 28.6" TP beam spreads a 26" disk over some 80"). Channels are
    interpolated, not averaged: a cube at (or finer than half) the product's channel width
    keeps the line's flux."""
    import numpy as np

    _, tasks = casa()
    regridded = work / "sd_regrid.im"
    tasks.imregrid(imagename=str(sd.image), template=str(template), output=str(regridded),
                   interpolation="linear", overwrite=True)
    data, good = read_image(regridded)
    covered = good & np.isfinite(data)
    per_chan = covered.reshape(-1, covered.shape[-1]).any(axis=0)
    if not per_chan.all():
        missing = [int(i) for i in np.nonzero(~per_chan)[0]]
        raise StageError(f"single-dish cube {sd.source} does not cover channel(s) "
                         f"{ranges_text(missing)} of the interferometric cube (compare their "
                         "velocity ranges)")
    info = {"file": str(sd.source), "unit_in": sd.unit_in,
            **{f"sd_{k}": v for k, v in beam_of(sd.image).items()},
            "uncovered_fraction": round(float(1.0 - covered.mean()), 4)}
    return image_like(work / "sd_on_grid.im", regridded, np.where(covered, data, 0.0)), info


def feather_with_singledish(sd_in: SingleDish, pbcorr: Path, flat: Path, pb: Path,
                            work: Path, *, cutoff: float, apodize: bool, sdfactor: float
                            ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Feathered (pbcorr, flat) round-beam cubes in Jy/beam.

    Plain: feather(pb-corrected interferometric, single dish); the flat cube is that times pb.
    Apodised (PHANGS' option): feather(flat interferometric, single dish x pb), then divide by
    pb, so both inputs taper to the same footprint before the Fourier combination and the edge
    noise of the pb-corrected cube does not enter it. That treats (sky * SD beam) x pb as
    (sky x pb) * SD beam, true only where pb varies slowly across the single-dish beam; with
    ALMA's TP beam about as wide as the 12 m primary beam it is not (on the simulated galaxy
    the apodised cube keeps under half the flux), hence off by default. Blanked
    interferometric pixels (pb below the cutoff) are zero inside feather and blank again after
    it: the feathered cube keeps the interferometric footprint."""
    import numpy as np

    _, tasks = casa()
    hi_pbcorr, hi_flat, pb3 = (dropdeg(img, work / f"{name}_3d.im") for img, name in
                               ((pbcorr, "pbcorr"), (flat, "flat"), (pb, "pb")))
    sd, info = regrid_singledish(sd_in, hi_pbcorr, work)
    pbcorr_data, _ = read_image(hi_pbcorr)
    flat_data, _ = read_image(hi_flat)
    pb_data = np.nan_to_num(read_image(pb3)[0])
    sd_data, _ = read_image(sd)
    valid = np.isfinite(pbcorr_data) & (pb_data >= cutoff)
    if apodize:
        high = np.where(valid & np.isfinite(flat_data), flat_data, 0.0)
        low = sd_data * pb_data
    else:
        high, low = np.where(valid, pbcorr_data, 0.0), sd_data
    high_im = image_like(work / "feather_high.im", hi_pbcorr, high)
    low_im = image_like(work / "feather_low.im", sd, low)
    out = work / "feathered.im"
    tasks.feather(imagename=str(out), highres=str(high_im), lowres=str(low_im), sdfactor=sdfactor,
                  lowpassfiltersd=False)
    feathered, _ = read_image(out)
    # feather writes a degenerate Stokes axis back; the pixels are those of its inputs
    feathered = feathered.reshape(pb_data.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        pbcorr_out = feathered / pb_data if apodize else feathered
        flat_out = feathered if apodize else feathered * pb_data
    cubes = {"pbcorr_trimmed_k": image_like(work / "pbcorr_feathered.im", hi_pbcorr,
                                            np.where(valid, pbcorr_out, np.nan)),
             "flat_trimmed_k": image_like(work / "flat_feathered.im", hi_pbcorr,
                                          np.where(valid, flat_out, np.nan))}
    return cubes, {**info, "apodize": apodize, "sdfactor": sdfactor}


# --------------------------------------------------------------------------- command line

def _velocity_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LO,HI in km/s, got {text!r}") from exc
    return (min(lo, hi), max(lo, hi))


def _frequency_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LO,HI in GHz, got {text!r}") from exc
    return (min(lo, hi), max(lo, hi))


def _timebin(text: str) -> str | int:
    """statwt's timebin: a number of integrations, or a time quantity such as '60s'."""
    return int(text) if text.isdigit() else text


def _line_options(p: argparse.ArgumentParser, vwidth: bool = True,
                  required: bool = True) -> None:
    p.add_argument("--restfreq-ghz", type=float, required=required,
                   help="rest frequency of the line")
    p.add_argument("--vsys-kms", type=float, required=required,
                   help="target systemic velocity (LSRK, radio)")
    if vwidth:
        p.add_argument("--vwidth-kms", type=float, required=required,
                       help="full width of the line window")


def _clean_options(p: argparse.ArgumentParser, threshold_snr: float) -> None:
    p.add_argument("--threshold-snr", type=float, default=threshold_snr,
                   help="clean threshold in units of the residual noise")
    p.add_argument("--niter-start", type=int, default=200, help="niter of the first tclean call")
    p.add_argument("--niter-growth", type=float, default=2.0, help="niter factor per call")
    p.add_argument("--max-loops", type=int, default=10, help="most tclean calls")
    p.add_argument("--convergence-fracflux", type=float, default=0.01,
                   help="stop when the model flux changes less than this between calls")


def _imaging_options(p: argparse.ArgumentParser, with_vis: bool = True) -> None:
    p.add_argument("--imagename", required=True, help="image base name (tclean imagename)")
    if with_vis:
        p.add_argument("--vis", action="append", required=True, help="input MS (repeatable)")
        p.add_argument("--restfreq-ghz", type=float,
                       help="the line's rest frequency (a cube; not for specmode 'mfs')")
        p.add_argument("--tclean", help="JSON object of tclean parameters (the recipe)")


STAGES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "simobserve": stage_simobserve, "split": stage_split, "contsub": stage_contsub,
    "extract_line": stage_extract_line, "extract_continuum": stage_extract_continuum,
    "dirty": stage_dirty, "clean_mask": stage_clean_mask,
    "multiscale": stage_multiscale, "singlescale": stage_singlescale,
    "export_image": stage_export_image, "postprocess": stage_postprocess,
    "feather": stage_feather,
}


def _postprocess_options(p: argparse.ArgumentParser) -> None:
    _imaging_options(p, with_vis=False)
    p.add_argument("--outdir", required=True)
    p.add_argument("--stem", required=True, help="{target}_{config}_{product}")
    p.add_argument("--pb-cutoff", type=float, default=0.2)
    p.add_argument("--round-beam-arcsec", type=float)
    p.add_argument("--trim-pad", type=int, default=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hpcddf.phangs.casa_tasks",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--overwrite", action="store_true", help="redo an existing product")
        return p

    p = add("simobserve", "simulate an ALMA observation of a model cube")
    p.add_argument("--skymodel", required=True)
    p.add_argument("--outputvis", required=True)
    p.add_argument("--antennalist", default="alma.cycle10.1.cfg",
                   help="a file, or a name under casadata's alma/simmos")
    p.add_argument("--totaltime", default="2400s")
    p.add_argument("--integration", default="30s")
    p.add_argument("--thermalnoise", default="tsys-atm", help="tsys-atm, tsys-manual or none")
    p.add_argument("--noise-jy", type=float, help="instead: Gaussian noise of this sigma per "
                   "visibility (real and imaginary part each)")
    p.add_argument("--user-pwv", type=float, default=1.0)
    p.add_argument("--t-ground", type=float, default=269.0)
    p.add_argument("--seed", type=int, default=11111)
    p.add_argument("--direction", default="", help="map centre, e.g. 'J2000 10h00m00.5s "
                   "-30d00m00s' (default: the model's centre)")
    p.add_argument("--mapsize", default="", help="size of the pointing pattern, e.g. '0arcsec' "
                   "for one pointing at --direction (default: the model's size)")

    p = add("split", "the line window (or a continuum product's channels) of one MS")
    p.add_argument("--vis", required=True)
    p.add_argument("--outputvis", required=True)
    p.add_argument("--field", default="")
    _line_options(p, required=False)
    p.add_argument("--margin-kms", type=float, default=50.0,
                   help="extra velocity kept on each side for uvcontsub and statwt")
    p.add_argument("--continuum", action="store_true",
                   help="a continuum product: the channels of --freq-range-ghz, else all")
    p.add_argument("--freq-range-ghz", type=_frequency_range, action="append", default=[],
                   help="LO,HI LSRK frequencies a continuum product keeps (repeatable)")

    p = add("contsub", "uvcontsub on the line-free channels")
    p.add_argument("--vis", required=True)
    p.add_argument("--outputvis", required=True)
    _line_options(p)
    p.add_argument("--fitorder", type=int, default=0)
    p.add_argument("--exclude-kms", type=_velocity_range, action="append", default=[],
                   help="LO,HI velocity range also kept out of the fit (repeatable)")

    p = add("extract_line", "regrid, concat and statwt one line product")
    p.add_argument("--vis", action="append", required=True, help="input MS (repeatable)")
    p.add_argument("--outputvis", required=True)
    _line_options(p)
    p.add_argument("--channel-kms", type=float, required=True)
    p.add_argument("--statwt-edge-kms", type=float, default=50.0)
    p.add_argument("--statwt-timebin", type=_timebin, help="statwt timebin (a time, or a number of "
                   f"integrations); default: enough for {MIN_STATWT_SAMPLES} samples per weight")

    p = add("extract_continuum", "flag the lines, average and concat one continuum product")
    p.add_argument("--vis", action="append", required=True, help="input MS (repeatable)")
    p.add_argument("--outputvis", required=True)
    p.add_argument("--channel-ghz", type=float, default=0.0,
                   help="averaged channel width; 0: one channel per spectral window")
    p.add_argument("--flag-ghz", type=_frequency_range, action="append", default=[],
                   help="LO,HI LSRK frequencies of a line to flag (repeatable)")

    p = add("dirty", "tclean niter=0")
    _imaging_options(p)

    p = add("clean_mask", "clean mask from the dirty cube")
    _imaging_options(p, with_vis=False)
    p.add_argument("--mask", help="output mask image (default BASE_cleanmask.im)")
    p.add_argument("--smooth-pix", type=float, default=4.0)
    p.add_argument("--snr", type=float, default=3.0)
    p.add_argument("--grow", type=int, default=3)

    p = add("multiscale", "multiscale clean to convergence")
    _imaging_options(p)
    p.add_argument("--mask", help="clean mask (default BASE_cleanmask.im)")
    p.add_argument("--scales-pix", help="comma-separated scales in pixels (else the recipe's)")
    p.add_argument("--scales-arcsec", help="comma-separated scales in arcsec (converted with "
                   "the cell)")
    _clean_options(p, threshold_snr=4.0)

    p = add("singlescale", "single-scale clean inside the S/N mask")
    _imaging_options(p)
    p.add_argument("--hi-snr", type=float, default=4.0)
    p.add_argument("--lo-snr", type=float, default=2.0)
    p.add_argument("--within-mask", help="keep the S/N mask inside this mask image")
    _clean_options(p, threshold_snr=1.0)

    p = add("export_image", "imaging products to FITS")
    _imaging_options(p, with_vis=False)

    p = add("postprocess", "pbcor, round beam, K, trim, FITS")
    _postprocess_options(p)

    p = add("feather", "postprocess with the round-beam cube feathered with single-dish data")
    _postprocess_options(p)
    p.add_argument("--singledish", required=True, help="single-dish FITS cube (Jy/beam or K, "
                   "with BMAJ/BMIN), regridded here onto the interferometric grid")
    p.add_argument("--apodize", action="store_true", help="feather the flat cube with the "
                   "single dish times pb, then divide by pb")
    p.add_argument("--sdfactor", type=float, default=1.0, help="single-dish flux scale factor")
    return parser


def set_log_file(stage: str) -> None:
    """Choose CASA's log file before casatools is imported (the site config reads it then):
    ``$HPCDDF_CASA_LOGDIR/casa-<stage>-<time>-<pid>.log`` when a log directory is given."""
    logdir = os.environ.get("HPCDDF_CASA_LOGDIR")
    if logdir and not os.environ.get("HPCDDF_CASA_LOGFILE"):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        os.environ["HPCDDF_CASA_LOGFILE"] = str(Path(logdir) / f"casa-{stage}-{stamp}-{os.getpid()}.log")
    logfile = os.environ.get("HPCDDF_CASA_LOGFILE")
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_log_file(args.stage)
    t0 = time.monotonic()
    try:
        summary = STAGES[args.stage](args)
    except StageError as exc:
        print(f"error: casa_tasks {args.stage}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NotImplementedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    summary = {"stage": args.stage, "seconds": round(time.monotonic() - t0, 2), **summary}
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
