"""``[control] redo_DI``: a direction-independent phase calibration against a GSM/TGSS sky model,
DATA -> CORRECTED_DATA (``python -m hpcddf.lofar.redodi --skymodel F [--source-format
gsm|tgss|hpcddf] [--beam array_factor|none] MS...``).

ddf-pipeline's ``redo_dppp_di.py`` turns the downloaded sky model into a sourcedb with
``makesourcedb`` and runs the ``DP3`` executable twice per MS (gaincal phaseonly, solint 1,
nchan 0, maxiter 500, Dutch baselines of 150 m and more, array-factor beam; then applycal). DP3
has no executable on PyPI, but the ``dp3`` wheel (6.6.0) carries libDP3 and its Python
bindings, whose ``execute_from_command_line`` runs the same parset keys in this process. DP3 6.6
reads the makesourcedb *text* format itself, so no sourcedb is made: GSM and TGSS answers (both
makesourcedb text) are only checked, and hpcddf's own sky model (``skymodel.txt`` of the
simulated field) is converted.

Differences from the reference, on purpose:

* solutions go to an H5Parm ``<ms>/instrument_new.h5``, written under a temporary name and renamed;
* gaincal writes nothing to the MS (its baseline selection is the solver's, not the reader's);
* per MS a marker -- the column keyword ``HPCDDF_REDO_DI`` of CORRECTED_DATA, recording the sky
  model's digest and the settings -- is written last and removed first. CORRECTED_DATA is always
  rewritten whole from DATA, which is only read, so a run killed anywhere is simply redone, and
  an MS already done with the same sky model and settings is skipped (the reference reruns on
  every start);
* errors stop the run with one line (the reference ignores every exit status).

Needs python-casacore (its measures data: DP3's bundled casacore has none) and, for the beam,
EveryBeam's coefficient files, which the dp3 wheel lacks (the ``everybeam`` wheel installs them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

# numpy, casacore and dp3 are imported where used: DP3 refuses to run unless OpenBLAS is told to
# use one thread before anything loads it (main sets it first)

H5PARM = "instrument_new.h5"
MARKER = "HPCDDF_REDO_DI"        # column keyword of CORRECTED_DATA
DP3_SKYMODEL = "redo_di.skymodel"  # the converted hpcddf sky model, in --workdir
BEAM_FILE = "HamakerHBACoeff.h5"   # one of EveryBeam's coefficient files, to find its directory
DP3_PIN = "dp3==6.6.0"


class RedoDIError(Exception):
    """A sky model, MS or environment the calibration cannot run with (one line says why)."""


@dataclass(frozen=True)
class Settings:
    """The reference's gaincal parameters; recorded in the marker, so changing one redoes the MS."""

    skymodel_sha256: str
    beam: str = "array_factor"       # or "none": an MS without LOFAR station tables (simulations)
    caltype: str = "phaseonly"
    solint: int = 1
    nchan: int = 0
    maxiter: int = 500
    baselines: str = "CS*&;RS*&;CS*&RS*"  # Dutch stations only, no autocorrelations
    blrange_m: tuple[float, float] = (150.0, 999999.0)

    def record(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ------------------------------------------------------------------------------ sky models

_FORMAT_LINE = re.compile(r"^\s*(#\s*\((?P<a>.*)\)\s*=\s*format|format\s*=\s*(?P<b>.*))\s*$", re.I)


def format_fields(line: str) -> list[str] | None:
    """The field names of a makesourcedb format line (``FORMAT = ...`` or ``# (...) = format``),
    defaults stripped; None for any other line."""
    match = _FORMAT_LINE.match(line)
    if not match:
        return None
    spec = match.group("a") if match.group("a") is not None else match.group("b")
    return [f.split("=")[0].strip().lower() for f in spec.split(",") if f.strip()]


def check_makesourcedb(text: str, what: str) -> int:
    """The number of sources in a makesourcedb text sky model (GSM and TGSS cgi answers), or
    RedoDIError for one DP3 cannot use: no format line (an HTML error page), a format without
    position or flux, or no source (an empty cone). Patch lines (empty name) are not sources."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        fields = format_fields(line)
        if fields is not None:
            break
    else:
        raise RedoDIError(f"{what} is not a makesourcedb sky model (no format line; an error page?)")
    missing = [f for f in ("name", "ra", "dec", "i") if f not in fields]
    if missing:
        raise RedoDIError(f"{what}: its format line has no {', '.join(missing)} field")
    n = sum(1 for ln in lines[i + 1:] if not ln.lstrip().startswith("#") and ln.split(",")[0].strip())
    if n == 0:
        raise RedoDIError(f"{what} holds no source (an empty cone?)")
    return n


def hpcddf_to_makesourcedb(path: Path) -> str:
    """hpcddf's sky model (the simulated field's ``skymodel.txt``) as DP3 text: flat-spectrum
    point sources in Stokes I, positions in degrees (casacore reads the ``deg`` suffix). A
    simulated source's polarisation and flare are left out: the solve (one phase per station for
    XX and one for YY, DP3's "diagonalphase") needs positions and Stokes I, not the details."""
    from hpcddf.errors import HpcddfError
    from hpcddf.lofar.simulate import read_skymodel
    try:
        sources = read_skymodel(path)
    except HpcddfError as exc:
        raise RedoDIError(str(exc)) from None
    if not sources:
        raise RedoDIError(f"{path} holds no source")
    lines = ["FORMAT = Name, Type, Ra, Dec, I", ""]
    lines += [f"{s.name}, POINT, {s.ra_deg!r}deg, {s.dec_deg!r}deg, {s.flux_jy!r}" for s in sources]
    return "\n".join(lines) + "\n"


def prepare_skymodel(path: Path, source_format: str, workdir: Path) -> Path:
    """The sky model file DP3 reads: a GSM/TGSS answer as it is, once checked; hpcddf's format
    converted into ``workdir`` (atomically)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RedoDIError(f"cannot read the sky model {path}: {exc.strerror or exc}") from None
    if source_format != "hpcddf":
        check_makesourcedb(text, f"the {source_format.upper()} sky model {path}")
        return path
    from hpcddf.engine.atomic import write_text_atomic
    text = hpcddf_to_makesourcedb(path)
    check_makesourcedb(text, f"the conversion of {path}")
    return write_text_atomic(workdir / DP3_SKYMODEL, text)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ environment

def single_threaded_openblas() -> None:
    """DP3 refuses to run (RuntimeError) unless OPENBLAS_NUM_THREADS is 1; set before numpy loads."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"


def load_dp3() -> Any:
    """The dp3 bindings, with casacore's measures data: python-casacore sets AIPSPATH to the data
    its wheel carries; DP3's own casacore has none and fails on the Observatories table."""
    single_threaded_openblas()
    try:
        import casacore  # noqa: F401  (sets AIPSPATH)
    except ImportError as exc:
        raise RedoDIError(f"python-casacore does not import ({exc}); DP3 needs its measures data") from None
    try:
        import dp3
    except ImportError as exc:
        raise RedoDIError(f"the DP3 Python bindings do not import ({exc}): pip install {DP3_PIN}") from None
    return dp3


def beam_data_dir() -> Path:
    """Where EveryBeam's coefficient files are: $EVERYBEAM_DATADIR, else this environment's
    share/everybeam (where the everybeam wheel puts them); exported for libDP3's EveryBeam."""
    env = os.environ.get("EVERYBEAM_DATADIR")
    for cand in ([Path(env)] if env else []) + [Path(sys.prefix) / "share" / "everybeam"]:
        if (cand / BEAM_FILE).is_file():
            os.environ["EVERYBEAM_DATADIR"] = str(cand)
            return cand
    raise RedoDIError(f"the array-factor beam needs EveryBeam's {BEAM_FILE}, which the dp3 wheel lacks: "
                      "pip install everybeam==0.9.1 (or set EVERYBEAM_DATADIR), or pass --beam none")


def check_ms(ms: Path, beam: str) -> None:
    """DATA must be there; the beam needs the LOFAR station tables (a simulated MS has none)."""
    from casacore.tables import table
    try:
        with table(str(ms), ack=False) as t:
            cols, keys = t.colnames(), t.getkeywords()
    except RuntimeError as exc:
        raise RedoDIError(f"cannot open {ms}: {str(exc).splitlines()[0]}") from None
    if "DATA" not in cols:
        raise RedoDIError(f"{ms} has no DATA column to calibrate")
    if beam != "none" and "LOFAR_ANTENNA_FIELD" not in keys:
        raise RedoDIError(f"{ms} has no LOFAR_ANTENNA_FIELD table, which the {beam} beam needs "
                          "(not a LOFAR MS?): pass --beam none")


# ------------------------------------------------------------------------------ DP3 parsets

def gaincal_keys(ms: Path, sky: Path, h5: Path, s: Settings, threads: int) -> list[str]:
    """The reference's gaincal, solutions only: ``msout=`` (empty) writes nothing to the MS."""
    keys = [f"msin={ms}", "msin.datacolumn=DATA", "msout=", "steps=[gaincal]", f"numthreads={threads}",
            "gaincal.type=gaincal", f"gaincal.sourcedb={sky}", f"gaincal.parmdb={h5}",
            f"gaincal.caltype={s.caltype}", f"gaincal.solint={s.solint}", f"gaincal.nchan={s.nchan}",
            f"gaincal.maxiter={s.maxiter}", f"gaincal.baseline={s.baselines}",
            f"gaincal.blrange=[{s.blrange_m[0]:g},{s.blrange_m[1]:g}]"]
    if s.beam != "none":
        keys += ["gaincal.usebeammodel=true", f"gaincal.beammode={s.beam}"]
    return keys


def applycal_keys(ms: Path, h5: Path, threads: int) -> list[str]:
    """DATA corrected by the phase solutions into CORRECTED_DATA, every row (no selection).
    ``phase000`` is the table a phaseonly gaincal writes to an H5Parm."""
    return [f"msin={ms}", "msin.datacolumn=DATA", "msout=.", "msout.datacolumn=CORRECTED_DATA",
            "steps=[applycal]", f"numthreads={threads}", "applycal.type=applycal",
            f"applycal.parmdb={h5}", "applycal.correction=phase000"]


def run_dp3(dp3: Any, keys: list[str], what: str) -> None:
    sys.stdout.flush()
    try:
        dp3.pydp3.execute_from_command_line(["DP3", *keys])
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise RedoDIError(f"DP3 {what} failed: {lines[-1] if lines else type(exc).__name__}") from None


# ------------------------------------------------------------------------------ per MS

def marker(ms: Path) -> str | None:
    from casacore.tables import table
    with table(str(ms), ack=False) as t:
        if "CORRECTED_DATA" not in t.colnames():
            return None
        value = t.getcolkeywords("CORRECTED_DATA").get(MARKER)
    return value if isinstance(value, str) else None


def set_marker(ms: Path, value: str | None) -> None:
    """Write (or, with None, remove) the marker; nothing to remove without CORRECTED_DATA."""
    from casacore.tables import table
    with table(str(ms), readonly=False, ack=False) as t:
        if value is not None:
            t.putcolkeyword("CORRECTED_DATA", MARKER, value)
        elif "CORRECTED_DATA" in t.colnames() and MARKER in t.getcolkeywords("CORRECTED_DATA"):
            t.removecolkeyword("CORRECTED_DATA", MARKER)


def solve(dp3: Any, ms: Path, sky: Path, s: Settings, threads: int) -> Path:
    """gaincal into a fresh temporary H5Parm (DP3 would add a solset to an existing file),
    renamed to ``<ms>/instrument_new.h5`` once complete."""
    h5, tmp = ms / H5PARM, ms / f".{Path(H5PARM).stem}.tmp.h5"
    tmp.unlink(missing_ok=True)
    run_dp3(dp3, gaincal_keys(ms, sky, tmp, s, threads), f"gaincal of {ms}")
    if not tmp.is_file():
        raise RedoDIError(f"DP3 gaincal of {ms} wrote no solutions")
    os.replace(tmp, h5)
    return h5


def redo_di(dp3: Any, ms: Path, sky: Path, s: Settings, threads: int) -> str:
    """Calibrate one MS unless its marker says it was done with these settings; what was done."""
    check_ms(ms, s.beam)
    record = s.record()
    if marker(ms) == record:
        return "done before with this sky model and these settings, left alone"
    set_marker(ms, None)
    h5 = solve(dp3, ms, sky, s, threads)
    run_dp3(dp3, applycal_keys(ms, h5, threads), f"applycal of {ms}")
    set_marker(ms, record)
    return f"CORRECTED_DATA = DATA corrected by {h5.name}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.redodi", description=__doc__.split("\n")[0])
    ap.add_argument("--skymodel", required=True, type=Path, help="the GSM/TGSS answer (or hpcddf's skymodel.txt)")
    ap.add_argument("--source-format", choices=("gsm", "tgss", "hpcddf"), default="gsm")
    ap.add_argument("--beam", choices=("array_factor", "none"), default="array_factor",
                    help="none for an MS without LOFAR station tables (simulations)")
    ap.add_argument("--workdir", type=Path, default=Path("."), help="where a converted sky model goes")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("ms", nargs="+", type=Path)
    a = ap.parse_args(argv)
    single_threaded_openblas()
    try:
        sky = prepare_skymodel(a.skymodel, a.source_format, a.workdir)
        if a.beam != "none":
            beam_data_dir()
        dp3 = load_dp3()
        settings = Settings(skymodel_sha256=sha256(sky), beam=a.beam)
        for ms in a.ms:
            print(f"{ms}: {redo_di(dp3, ms, sky, settings, a.threads)}", flush=True)
    except RedoDIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
