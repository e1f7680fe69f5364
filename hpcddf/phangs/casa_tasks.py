"""The CASA stage units of the PHANGS-ALMA chain, run INSIDE the separate CASA environment.

hpcddf's node job runs ``<casa-env>/bin/python -m hpcddf.phangs.casa_tasks STAGE --options`` (see
:mod:`hpcddf.phangs.casaenv`). This module therefore imports only the standard library at the top;
numpy, scipy, casatools and casatasks are imported inside the stages, after the arguments are
parsed and CASA's log file is chosen, so ``--help`` and argument errors need no CASA.
Parameters arrive as options (paths, numbers, JSON for tclean recipes); key files are read on
the hpcddf side, never here. This module is the command line (the options of each stage and
its dispatch); the stages live by family in :mod:`hpcddf.phangs.casa_visibilities`,
:mod:`hpcddf.phangs.casa_imaging` and :mod:`hpcddf.phangs.casa_postprocess`, on the shared
helpers of :mod:`hpcddf.phangs.casa_common`, all under the same standard-library-only rule.

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
  cube, or one plane when the recipe says specmode 'mfs'); with ``--chunk K,N`` a slice of a
  cube's channels, in its own directory
* ``gather_chunks`` the chunks' images of a cube concatenated into the cube
* ``postprocess``  impbcor, round beam, Jy/beam -> K, trim, FITS export
* ``feather``     the same with the round-beam cube feathered with a single-dish cube (imported,
  made Jy/beam, regridded onto the interferometric grid) before the conversion to K; a
  continuum image (one plane) feathers with a one-plane single-dish image, regridded on the
  sky only. The linear mosaic of parts is not a CASA stage: hpcddf combines the parts' postprocessed FITS
  cubes itself (:func:`hpcddf.phangs.linmos.linear_mosaic`)

Every product is written under a temporary name and renamed into place, so a killed stage
never leaves a product that looks finished; a stage whose product exists is skipped unless
``--overwrite``. The imaging stages keep a snapshot of the working images after each step
(``BASE_dirty.*``, ``BASE_multiscale.*``, ``BASE_singlescale.*``) and restart from the previous
snapshot, as PHANGS's "revert to imaging" does. The last line of stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hpcddf.phangs.casa_chunks import stage_gather_chunks
from hpcddf.phangs.casa_common import StageError
from hpcddf.phangs.casa_imaging import (
    stage_clean_mask,
    stage_dirty,
    stage_export_image,
    stage_multiscale,
    stage_singlescale,
)
from hpcddf.phangs.casa_postprocess import stage_feather, stage_postprocess
from hpcddf.phangs.casa_visibilities import (
    MIN_STATWT_SAMPLES,
    stage_contsub,
    stage_extract_continuum,
    stage_extract_line,
    stage_simobserve,
    stage_split,
)

EXIT_USAGE = 2
EXIT_NOT_IMPLEMENTED = 3


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
        p.add_argument("--chunk", help="K,N: image chunk K of N of the cube's channels, in "
                       "the image's own directory (chunked imaging)")


def _noise_from_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noise-from", action="append", default=[],
                   help="a chunk: the image base of every chunk of the cube (repeatable), "
                        "whose residuals give the noise of the whole cube")


STAGES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "simobserve": stage_simobserve, "split": stage_split, "contsub": stage_contsub,
    "extract_line": stage_extract_line, "extract_continuum": stage_extract_continuum,
    "dirty": stage_dirty, "clean_mask": stage_clean_mask,
    "multiscale": stage_multiscale, "singlescale": stage_singlescale,
    "export_image": stage_export_image, "gather_chunks": stage_gather_chunks,
    "postprocess": stage_postprocess,
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
    p.add_argument("--timebin", default="0s",
                   help="average the visibilities in time ('30s'); '0s': no averaging")
    p.add_argument("--flag-edge-fraction", type=float, default=0.0,
                   help="leave out this fraction of each spw's channels at both ends")
    p.add_argument("--continuum", action="store_true",
                   help="a continuum product: the channels of --freq-range-ghz, else all")
    p.add_argument("--freq-range-ghz", type=_frequency_range, action="append", default=[],
                   help="LO,HI LSRK frequencies a continuum product keeps (repeatable)")

    p = add("contsub", "uvcontsub on the line-free channels")
    p.add_argument("--vis", required=True)
    p.add_argument("--outputvis", required=True)
    _line_options(p)
    p.add_argument("--fitorder", type=int, default=0)
    p.add_argument("--combinespw", action="store_true",
                   help="one continuum fit across the spws (merged first)")
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
    _noise_from_option(p)
    p.add_argument("--mask", help="output mask image (default BASE_cleanmask.im)")
    p.add_argument("--from-fits", help="a FITS mask (the cleanmask_key's file) to put on the "
                   "dirty cube's grid instead of the S/N mask")
    p.add_argument("--smooth-pix", type=float, default=4.0)
    p.add_argument("--snr", type=float, default=3.0)
    p.add_argument("--grow", type=int, default=3)

    p = add("multiscale", "multiscale clean to convergence")
    _imaging_options(p)
    p.add_argument("--mask", help="clean mask (default BASE_cleanmask.im)")
    p.add_argument("--scales-pix", help="comma-separated scales in pixels (else the recipe's)")
    p.add_argument("--scales-arcsec", help="comma-separated scales in arcsec (converted with "
                   "the cell)")
    _noise_from_option(p)
    _clean_options(p, threshold_snr=4.0)

    p = add("singlescale", "single-scale clean inside the S/N mask")
    _imaging_options(p)
    p.add_argument("--hi-snr", type=float, default=4.0)
    p.add_argument("--lo-snr", type=float, default=2.0)
    p.add_argument("--within-mask", help="keep the S/N mask inside this mask image")
    _noise_from_option(p)
    _clean_options(p, threshold_snr=1.0)

    p = add("export_image", "imaging products to FITS")
    _imaging_options(p, with_vis=False)

    p = add("gather_chunks", "concatenate the images of a cube's chunks into the cube")
    _imaging_options(p, with_vis=False)
    p.add_argument("--chunk-imagename", action="append", required=True,
                   help="a chunk's image base name, in channel order (repeatable)")

    p = add("postprocess", "pbcor, round beam, K, trim, FITS")
    _postprocess_options(p)

    p = add("feather", "postprocess with the round-beam cube feathered with single-dish data")
    _postprocess_options(p)
    p.add_argument("--singledish", required=True, help="single-dish FITS cube (Jy/beam or K, "
                   "with BMAJ/BMIN), regridded here onto the interferometric grid; for a "
                   "continuum image, a one-plane image (K needs its FREQ axis)")
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
    text = json.dumps(summary, default=str)
    print(text, flush=True)
    out = os.environ.get("HPCDDF_CASA_SUMMARY")
    if out:  # for hpcddf, whose runner sends stdout to the log file: written whole, then renamed
        with open(out + ".part", "w") as fh:
            fh.write(text)
        os.replace(out + ".part", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
