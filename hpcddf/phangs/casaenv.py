"""The separate CASA environment the PHANGS CASA stages run in, seen from hpcddf's side.

CASA 6.7.0.31 (the release with a Python 3.11 wheel that imports on Debian 12) pins its own
numpy and brings 850 MB of measures data; it lives in its own virtual environment, built by
``containers/make-casa-env.sh DEST``, as PHANGS keeps its CASA and Python halves apart. hpcddf
runs ``DEST/bin/python -m hpcddf.phangs.casa_tasks STAGE --options`` with hpcddf importable
through PYTHONPATH (casa_tasks needs nothing of hpcddf's own dependencies) and CASASITECONFIG
pointing at ``DEST/casasiteconfig.py``: no ~/.casa, no network, no logger window, CASA's log
beside the products.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError, StepFailed

ENV_VAR = "HPCDDF_CASA_ENV"
MODULE = "hpcddf.phangs.casa_tasks"
BUILD_HINT = "run containers/make-casa-env.sh {path} (or set HPCDDF_CASA_ENV to an existing one)"
# Variables of the calling environment that would let its packages or settings leak into the
# CASA interpreter (another venv's site-packages, a conda prefix, user site-packages).
LEAKY_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX",
              "PYTHONUSERBASE", "CASASITECONFIG", "HPCDDF_CASA_LOGFILE")


@dataclass(frozen=True)
class CasaEnv:
    """A CASA environment: its interpreter and its site configuration (absolute paths)."""

    python: Path
    siteconfig: Path


def find_casa_env(path: str | os.PathLike[str] | None = None) -> CasaEnv:
    """The CASA environment at ``path`` (default ``$HPCDDF_CASA_ENV``), checked without
    starting it: the interpreter, casasiteconfig.py and the casatools package must exist."""
    where = path if path is not None else os.environ.get(ENV_VAR)
    if not where:
        raise ConfigError(f"no CASA environment given (--casa-env or ${ENV_VAR})",
                          BUILD_HINT.format(path="DEST"))
    root = Path(where).expanduser().resolve()
    python = root / "bin" / "python"
    siteconfig = root / "casasiteconfig.py"
    hint = BUILD_HINT.format(path=root)
    if not python.exists():
        raise ConfigError(f"CASA environment {root} does not exist or has no bin/python", hint)
    if not siteconfig.is_file():
        raise ConfigError(f"CASA environment {root} has no casasiteconfig.py", hint)
    if not any(root.glob("lib/python3*/site-packages/casatools/__init__.py")):
        raise ConfigError(f"CASA environment {root} has no casatools", hint)
    return CasaEnv(python=python, siteconfig=siteconfig)


def _option_args(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, (list, tuple)):
        return [arg for item in value for arg in _option_args(
            name, ",".join(map(str, item)) if isinstance(item, (list, tuple)) else item)]
    if isinstance(value, Mapping):
        return [flag, json.dumps(dict(value), sort_keys=True)]
    return [flag, str(value)]


def casa_argv(env: CasaEnv, stage: str, **params: Any) -> list[str]:
    """argv of one casa_tasks stage: ``foo_bar=x`` becomes ``--foo-bar x``; True a bare flag;
    None/False nothing; a list or tuple repeats the option (a pair inside it is written
    ``lo,hi``, as ``--exclude-kms`` takes it); a dict becomes JSON."""
    argv = [str(env.python), "-m", MODULE, stage]
    for name, value in params.items():
        argv += _option_args(name, value)
    return argv


def _hpcddf_path(logdir: Path) -> Path:
    """A directory to put on the CASA interpreter's PYTHONPATH that holds hpcddf and nothing
    else: the checkout for a source or editable install; for an installed hpcddf, whose
    parent is a site-packages full of this environment's numpy, astropy, ..., which would
    shadow CASA's own, a directory under ``logdir`` with just a link to the package."""
    package = Path(__file__).resolve().parents[1]
    parent = package.parent
    if parent.name not in ("site-packages", "dist-packages"):
        return parent
    shim = logdir / ".hpcddf-path"
    link = shim / "hpcddf"
    if not (link.is_symlink() and link.resolve() == package):
        shim.mkdir(parents=True, exist_ok=True)
        tmp = shim / f".hpcddf.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(package, target_is_directory=True)
        os.replace(tmp, link)
    return shim


def casa_environ(env: CasaEnv, logdir: str | os.PathLike[str], *, threads: int | None = None,
                 base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a casa_tasks process: ``base`` (default os.environ) without the
    variables that leak another Python environment into CASA's, plus CASASITECONFIG, PYTHONPATH
    to hpcddf only, a headless matplotlib and OpenMP limited to the granted cores. CASA's log
    goes to ``logdir`` (one file per stage run), matplotlib's cache under it; HOME is unused.

    OpenMP's idle threads sleep instead of spinning (OMP_WAIT_POLICY) and numpy's BLAS is
    single-threaded: array tasks share a node, and spinning threads took more CPU time for the
    same work in the same wall time: 13 % more alone, 60-70 % more beside other work (CI)."""
    logdir = Path(logdir).resolve()
    environ = {k: v for k, v in (os.environ if base is None else base).items()
               if k not in LEAKY_VARS}
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    environ.update({
        "CASASITECONFIG": str(env.siteconfig),
        "PYTHONPATH": str(_hpcddf_path(logdir)),
        "PYTHONNOUSERSITE": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(logdir / ".matplotlib"),
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "OPENBLAS_NUM_THREADS": "1",
        "HPCDDF_CASA_LOGDIR": str(logdir),
    })
    environ.pop("DISPLAY", None)
    return environ


def run_casa(env: CasaEnv, stage: str, logdir: str | os.PathLike[str], *,
             timeout: float | None = None, threads: int | None = None,
             **params: Any) -> dict[str, Any]:
    """Run one casa_tasks stage through the engine's runner and return its JSON summary.

    As every science command: argv, a timeout, its output in a log file in ``logdir``
    (``casa-<stage>.log``, beside CASA's own log), its own process group. A failure raises
    StepFailed naming the stage's error line and the log."""
    from hpcddf.engine.runner import Command, RunContext, run_command
    argv = casa_argv(env, stage, **params)
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    summary = (logdir / f".{stage}.{os.getpid()}.summary.json").resolve()
    summary.unlink(missing_ok=True)
    environ = {**casa_environ(env, logdir, threads=threads), "HPCDDF_CASA_SUMMARY": str(summary)}
    cmd = Command(tuple(argv), f"casa-{stage}.log", timeout_s=timeout, env=environ, unset_env=LEAKY_VARS)
    ctx = RunContext(workdir=logdir, log_dir=logdir, marker_dir=logdir)
    try:
        run_command(ctx, f"casa {stage}", cmd)
    except StepFailed as exc:
        raise StepFailed(f"casa {stage}", argv, exc.returncode, exc.log_tail, exc.log_path,
                         reason=_error_line(exc.log_tail) or None) from None
    try:
        doc = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise StepFailed(f"casa {stage}", argv, 0, "", str(logdir / cmd.log_name),
                         reason="it wrote no JSON summary") from None
    summary.unlink(missing_ok=True)
    return doc


def _error_line(tail: str) -> str:
    """The stage's own ``error: ...`` line (casa_tasks prints it last), else the last line."""
    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1]
