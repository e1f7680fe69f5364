"""``[spectra] do_dynspec``: dynamic spectra of catalogued targets and of off positions, from
the calibrated residual visibilities (``python -m hpcddf.lofar.dynspec --ms mslist-<obsid>.txt
--data COL --model COL --sols SOLS ...``).

ddf-pipeline runs DynSpecMS's ``ms2dynspec.py``, which needs DDFacet internals, SkyModel,
Polygon3 and /dev/shm and cannot be installed here; this module computes what it computes
(see the dynspec_* modules for each part) and takes its option names, so the step's argv reads
like ddf-pipeline's. Per observing period (MSs with the same first and last TIME):

1. targets (``--FitsCatalog``, ``--srclist``) within ``--rad`` degrees, and off positions
   (per facet of ``--DicoFacet``, else uniform in the ``--rad`` circle);
2. every MS, one chunk of rows at a time: ``--data`` minus ``--model``, rows outside ``--uv``
   km flagged, phased to each direction, corrected by the killMS scalar gains of ``--sols``
   and summed over the baselines of each integration and channel;
3. Stokes I, Q, U, V per direction, written to ``DynSpecs_<obsid>/`` (``dynspec_output``) with
   Catalog.npy (fluxes from ``--imageI``/``--imageV``) and packed as ``DynSpecs_<obsid>.tgz``.

The directory is built under a hidden temporary name beside its final one and renamed into
place only when complete: a killed run leaves the previous output (or none), never half of one.

No beam is applied: hpcddf's simulated fields use no beam model (``--BeamModel None``); any
other beam is refused. The LOFAR beam would need EveryBeam on the station tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from hpcddf.engine.atomic import atomic_path
from hpcddf.errors import ExitCode, HpcddfError
from hpcddf.lofar import dynspec_output as out
from hpcddf.lofar import dynspec_targets as tg
from hpcddf.lofar.dynspec_ms import (
    Columns,
    DynSpecError,
    Grid,
    MSInfo,
    check_columns,
    check_period,
    group_periods,
    make_grid,
    read_ms_info,
    read_ms_list,
)
from hpcddf.lofar.dynspec_sols import Gains, gains_for, missing_sols, parse_sols
from hpcddf.lofar.dynspec_stack import Stack, stack_period, stokes, weights
from hpcddf.lofar.mstables import obsid_of

# options ms2dynspec.py takes that change nothing here, and why (printed when given)
UNUSED = {
    "LogBoring": "progress is one plain line per chunk of rows",
    "BeamNBand": "no beam is applied (--BeamModel None)",
    "TChunkHours": "the MSs are read in chunks of rows (--ChunkRows), which bounds memory already",
    "NMaxTargets": "all directions are stacked in one pass",
    "SourceCatOff": "off positions come from --DicoFacet or are uniform in the --rad circle",
    "CacheDir": "nothing is cached between runs",
    "DDFParset": "the MS columns and solutions are given directly",
}


class OptionError(DynSpecError):
    """An option this implementation refuses (exit code 2, as argparse's usage errors)."""

    exit_code = ExitCode.CONFIG


def _pair(text: str) -> tuple[float, float]:
    a, b = (float(x) for x in text.strip("[]() ").split(","))
    return a, b


def _none(text: str) -> str | None:
    return None if text in ("", "None", "none") else text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.dynspec", description=__doc__.split("\n")[0])
    a = ap.add_argument
    a("--ms", required=True, type=Path, help="an MS or a list of MSs (mslist-<obsid>.txt)")
    a("--data", default="CORRECTED", help="the calibrated data column")
    a("--model", default="", type=_none, help="the model column subtracted from it (none: nothing)")
    a("--sols", default="", help="killMS solution names, '[A,B]' multiplies two sets")
    a("--SolsDir", default="", type=_none, help="where <MS>/killMS.<name>.sols.npz are")
    a("--FitsCatalog", default="", type=_none, help="targets: DESIGNATION, ra, dec, pmra, pmdec, ...")
    a("--srclist", default="", type=_none, help="more targets: a CSV of Name,ra,dec,Type (degrees)")
    a("--rad", type=float, default=3.0, help="degrees from the phase centre to keep targets")
    a("--tolerance", type=float, default=0.1, help="arcsec the MS phase centres may differ by")
    a("--noff", type=int, default=-1, help="off positions (-1: twice the number of targets)")
    a("--nMinOffPerFacet", type=int, default=5)
    a("--DicoFacet", default="", type=_none, help="the final image's .DicoFacet (off positions per facet)")
    a("--CutGainsMinMax", default=None, type=lambda s: None if _none(s) is None else _pair(s),
      help="a,b: gains with amplitude outside [a, b] drop their samples")
    a("--uv", default=(1.0, 1000.0), type=_pair, help="km: baselines whose 3-D |uvw| is outside are dropped")
    a("--WeightCol", default=None, type=_none, help="weights, averaged over polarisations (none: 1)")
    a("--SplitNonContiguous", type=int, default=1, help="1: one output per (start, end) time of the MSs")
    a("--BeamModel", default="None", help="only None: no beam is applied")
    a("--imageI", default="", type=_none, help="the Stokes I image for FluxI/sigFluxI")
    a("--imageV", default="", type=_none, help="the Stokes V image for FluxV/sigFluxV")
    a("--OutDirName", default="MSName", help="MSName: DynSpecs_<obsid>; else the output directory")
    a("--SavePDF", type=int, default=0, help="1: <obsid>_TARGET.pdf and _OFF.pdf, a page per direction")
    a("--DoTar", type=int, default=1, help="1: also pack the directory as <dir>.tgz")
    a("--Seed", type=int, default=0, help="seed of the off positions (reruns draw the same ones)")
    a("--ChunkRows", type=int, default=0, help="rows read at once (0: what fits 256 MB)")
    a("--NCPU", type=int, default=0, help="threads over directions (0: the CPUs this job may use)")
    for name in UNUSED:
        a(f"--{name}", default=None)
    return ap


def _check_options(args: argparse.Namespace) -> None:
    if _none(args.BeamModel) is not None:
        raise OptionError(f"--BeamModel {args.BeamModel}: no beam model is implemented here (only the "
                           "killMS gains are applied), so only --BeamModel None is accepted")
    for name, why in UNUSED.items():
        if getattr(args, name) is not None:
            print(f"--{name} {getattr(args, name)}: not used: {why}", flush=True)


# ------------------------------------------------------------------------------ directions


def _targets(args: argparse.Namespace, grid: Grid) -> list[tg.Direction]:
    found: list[tg.Direction] = []
    if args.FitsCatalog:
        found += tg.read_fits_catalogue(Path(args.FitsCatalog), grid.t0 / 86400.0)
    if args.srclist:
        found += tg.read_srclist(Path(args.srclist))
    kept = tg.within(found, grid.ra0, grid.dec0, args.rad)
    print(f"targets: {len(kept)} of {len(found)} within {args.rad} deg of the phase centre", flush=True)
    return kept


def _offs(args: argparse.Namespace, grid: Grid, facets: list[tg.Facet], ntarget: int) -> list[tg.Direction]:
    noff = args.noff if args.noff >= 0 else 2 * ntarget
    rng = np.random.default_rng(args.Seed)
    if facets:
        lm = tg.off_in_facets(facets, args.rad, noff, args.nMinOffPerFacet, rng)
        ra, dec = tg.lm_to_radec(lm[:, 0], lm[:, 1], grid.ra0, grid.dec0) if len(lm) else ([], [])
        how = f"per facet of {args.DicoFacet}"
    else:
        ra, dec = tg.off_random(grid.ra0, grid.dec0, args.rad, noff, rng)
        how = f"uniform random in the {args.rad} deg circle (no --DicoFacet)"
    print(f"off positions: {len(ra)}, {how}", flush=True)
    return tg.off_directions(np.asarray(ra), np.asarray(dec))


def directions(args: argparse.Namespace, grid: Grid) -> list[tg.Direction]:
    """The targets, then the off positions, tagged with their facets."""
    facets = tg.load_facets(Path(args.DicoFacet), grid.ra0, grid.dec0) if args.DicoFacet else []
    targets = _targets(args, grid)
    return tg.tag(targets + _offs(args, grid, facets, len(targets)), facets, grid.ra0, grid.dec0)


# ------------------------------------------------------------------------------ one period


def _with_tessels(dirs: list[tg.Direction], tessel: np.ndarray | None) -> list[tg.Direction]:
    """Without facets, each direction's tessel is its nearest solution direction."""
    if tessel is None:
        return dirs
    return [d if d.tessel >= 0 else replace(d, tessel=int(t)) for d, t in zip(dirs, tessel)]


def _fluxes(image: str | None, dirs: list[tg.Direction], stokes_value: int) -> tuple[np.ndarray, np.ndarray]:
    if not image:
        return np.full(len(dirs), np.nan), np.full(len(dirs), np.nan)
    return out.image_fluxes(Path(image), dirs, stokes_value)


def write_period(tmp: Path, args: argparse.Namespace, grid: Grid, meta: out.Meta,
                 dirs: list[tg.Direction], stack: Stack) -> None:
    """Every file of one period's output directory, written into ``tmp``."""
    names, hdrs = out.unique_names(meta.obsid, dirs), out.headers(grid, meta)
    pages: dict[str, list[tuple[tg.Direction, np.ndarray]]] = {"TARGET": [], "OFF": []}
    for i, (d, name) in enumerate(zip(dirs, names)):
        spec = stokes(stack, i)
        out.write_direction(tmp, name, hdrs, d, spec, *weights(stack, i))
        if args.SavePDF:
            pages[d.kind].append((d, spec))
    files = [f"{d.kind}/{n}" for d, n in zip(dirs, names)]
    cat = out.catalogue(dirs, files, _fluxes(args.imageI, dirs, out.STOKES_I),
                        _fluxes(args.imageV, dirs, out.STOKES_V))
    np.save(tmp / "Catalog.npy", cat)
    (tmp / f"{meta.obsid}.reg").write_text(out.region_text(dirs))
    if args.DicoFacet:
        np.save(tmp / "DDF.DicoFacet.npy", tg.read_dicofacet(Path(args.DicoFacet)), allow_pickle=True)
    for kind, items in pages.items():
        if items:
            out.plot_pdf(tmp / f"{meta.obsid}_{kind}.pdf", grid, items)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete ``tmp`` at ``final``; a previous ``final`` is removed only after."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def _clear_leftovers(final: Path) -> None:
    """Temporary directories and tarballs of killed runs (ours by their names)."""
    for p in final.parent.glob(f".{final.name}.*"):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            print(f"{p}: left by an interrupted run, removed", flush=True)
            shutil.rmtree(p)
        elif p.name.startswith(f".{final.name}.tgz.") and p.name.endswith(".tmp"):
            p.unlink()


def publish(tmp: Path, final: Path, do_tar: bool) -> None:
    """The tarball (packed from ``tmp`` under the final name), then the directory, each
    renamed into place."""
    if not do_tar:
        _replace_dir(tmp, final)
        return
    with atomic_path(final.with_name(final.name + ".tgz")) as tgz:
        out.write_tarball(tmp, tgz, final.name)
        _replace_dir(tmp, final)


def _columns(args: argparse.Namespace) -> Columns:
    return Columns(data=args.data, model=args.model, weight=args.WeightCol, uv_km=args.uv)


def run_period(args: argparse.Namespace, period: list[MSInfo], final: Path, obsid: str) -> None:
    grid = make_grid(period, check_period(period, args.tolerance))
    dirs = directions(args, grid)
    ra, dec = np.array([d.ra for d in dirs]), np.array([d.dec for d in dirs])
    print(f"{final.name}: {len(dirs)} directions x {grid.nchan} channels x {grid.ntime} times "
          f"({Stack.nbytes(len(dirs), grid) / 2**30:.2f} GiB of sums)", flush=True)
    cols = _columns(args)
    names, tessel = parse_sols(args.sols), None

    def gains_of(info: MSInfo) -> Gains | None:  # one MS's gains, loaded in its turn
        nonlocal tessel
        g = gains_for(info, names, args.SolsDir, ra, dec, args.CutGainsMinMax)
        tessel = g.dirs[0] if g is not None and tessel is None else tessel
        return g

    threads = args.NCPU if args.NCPU > 0 else len(os.sched_getaffinity(0))
    stack = stack_period(period, grid, ra, dec, cols, gains_of, threads, args.ChunkRows or None)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        write_period(tmp, args, grid, out.Meta(obsid, period[0].telescope), _with_tessels(dirs, tessel), stack)
        publish(tmp, final, bool(args.DoTar))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def output_dirs(args: argparse.Namespace, obsid: str, nperiod: int) -> list[Path]:
    """``DynSpecs_<obsid>`` (or ``--OutDirName``); with several periods ``..._T<k>``, which
    ddf-pipeline's ``DynSpec*<obsid>*`` skip check and its obsid parsing both still match."""
    base = Path(f"DynSpecs_{obsid}" if args.OutDirName == "MSName" else args.OutDirName)
    return [base] if nperiod == 1 else [base.with_name(f"{base.name}_T{k}") for k in range(nperiod)]


def run(args: argparse.Namespace) -> list[Path]:
    _check_options(args)
    mss = read_ms_list(args.ms)
    missing = missing_sols(mss, parse_sols(args.sols), args.SolsDir)
    if missing:
        raise DynSpecError(f"solution files missing: {', '.join(map(str, missing[:3]))}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    infos = [read_ms_info(ms) for ms in mss]
    check_columns(mss, _columns(args))
    obsid = obsid_of(mss[0])
    periods = group_periods(infos, bool(args.SplitNonContiguous))
    finals = output_dirs(args, obsid, len(periods))
    for period, final in zip(periods, finals):
        _clear_leftovers(final)
        run_period(args, period, final, obsid)
    return finals


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    start = time.monotonic()
    try:
        finals = run(args)
    except HpcddfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(f"dynamic spectra written to {', '.join(map(str, finals))} in {time.monotonic() - start:.1f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
