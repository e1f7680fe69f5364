"""The visibility stages of the PHANGS CASA chain, run INSIDE the separate CASA environment.

``simobserve`` (a model cube to an MS), and the uv staging PHANGS runs before imaging:
``split`` (a line window or a continuum product's channels of one MS), ``contsub``
(uvcontsub on the line-free channels), ``extract_line`` (regrid to the product's channels,
concat, statwt) and ``extract_continuum`` (flag the lines, average, concat). Standard library
only at the top, as everything :mod:`hpcddf.phangs.casa_tasks` runs.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hpcddf.phangs.casa_common import (
    StageError,
    casa,
    channel_velocities,
    datacolumn_of,
    log,
    lsrk_channels,
    need,
    publish,
    ranges_text,
    remove,
    skip_existing,
    tmp_name,
    window_selection,
)

MIN_STATWT_SAMPLES = 40


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
    so that uvcontsub and statwt keep line-free channels) of one input MS, averaged over
    ``--timebin`` (an array_tag config's; '0s' none); with
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
    tasks.split(vis=str(vis), outputvis=str(tmp), field=a.field, spw=spw, timebin=a.timebin,
                datacolumn=datacolumn_of(vis), keepflags=False)
    publish(tmp, out)
    return {"outputvis": str(out), "spw": spw, "timebin": a.timebin,
            "nrows": ms_summary(out)["nrows"]}


def line_split_selection(vis: Path, a: argparse.Namespace) -> str:
    """The spw:channel selection of a line product's window plus its margin."""
    missing = [f"--{n.replace('_', '-')}" for n in ("restfreq_ghz", "vsys_kms", "vwidth_kms")
               if getattr(a, n) is None]
    if missing:
        raise StageError(f"a line split needs {', '.join(missing)} (or --continuum)")
    half = a.vwidth_kms / 2.0 + a.margin_kms
    spw = window_selection(vis, a.restfreq_ghz * 1e9, a.vsys_kms - half, a.vsys_kms + half,
                           a.flag_edge_fraction)
    if not spw:
        edge = (f" outside the {a.flag_edge_fraction:g} edge fraction of each spw"
                if a.flag_edge_fraction else "")
        raise StageError(f"{vis} has no channel within {a.vsys_kms:g} +- {half:g} km/s of "
                         f"{a.restfreq_ghz:g} GHz (LSRK, radio){edge}")
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
    _, tasks = casa()
    combined = None
    if a.combinespw and len(lsrk_channels(vis)) > 1:
        # one continuum fit across the spws (PHANGS's combinespw): uvcontsub fits each spw
        # on its own, so the spws are first merged into one
        combined = out.with_name(f".{out.name}.combined{os.getpid()}")
        remove(combined)
        tasks.mstransform(vis=str(vis), outputvis=str(combined), datacolumn=datacolumn_of(vis),
                          combinespws=True, keepflags=False)
        vis = combined
    try:
        fitspec = line_free_selection(vis, restfreq, [(vlo, vhi), *a.exclude_kms])
        if not fitspec:
            raise StageError(f"{a.vis} has no line-free channel outside {vlo:g}..{vhi:g} km/s; "
                             "widen the split margin or narrow vwidth")
        tmp = tmp_name(out)
        remove(tmp)
        tasks.uvcontsub(vis=str(vis), outputvis=str(tmp), fitspec=fitspec, fitorder=a.fitorder,
                        fitmethod="gsl", datacolumn=datacolumn_of(vis))
        publish(tmp, out)
    finally:
        if combined is not None:
            remove(combined)
    return {"outputvis": str(out), "fitspec": fitspec, "combinespw": combined is not None}


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
