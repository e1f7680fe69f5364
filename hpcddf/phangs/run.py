"""Run ONE PHANGS task on a node (``run_task``, or the submitit callable ``PhangsTask``).

A task carries everything it needs, taken from the key files when it was planned
(:mod:`hpcddf.phangs.plan`): the CASA stages map those values to ``casa_tasks`` options and run
them in the separate CASA environment (:func:`hpcddf.phangs.casaenv.run_casa`); ``derived``
calls the pure-Python noise, mask, moment and convolution functions here.

Each task records its state in ``<project work dir>/.hpcddf/phangs/<task id>.json`` (state,
attempts, started, ended, error, products, notes), replaced atomically under the project lock
so that ``hpcddf phangs status`` always reads a whole file. Re-running is cheap and safe: a
task whose state is done and whose products are all present is skipped, every CASA stage skips
a product that exists, and every derived product is made only when missing. When Slurm kills
a task at its walltime, submitit requeues it (``PhangsTask`` is Checkpointable) and the next
attempt continues after the last product made.

Derived products a task may share with another task (a linked config's strict masks, see the
dependency rule in :mod:`hpcddf.phangs.plan`) are made under a per-file lock: the task that
comes second waits for the first one and then finds the file there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from hpcddf.atomic import write_json_atomic
from hpcddf.errors import HpcddfError
from hpcddf.phangs.plan import Task
from hpcddf.state import locked, now_iso

STATE_DIR = Path(".hpcddf") / "phangs"
LOCK_DIR = Path(".hpcddf") / "phangs-locks"
FINAL_STATES = ("done", "failed", "cancelled")


class PhangsRunError(HpcddfError):
    """A PHANGS task cannot run (a stage this version does not implement, a bad input)."""


# ---------------------------------------------------------------------------------------------
# Task state
# ---------------------------------------------------------------------------------------------

def task_state_path(workdir: Path, task_id: str) -> Path:
    return Path(workdir) / STATE_DIR / f"{task_id}.json"


def read_task_state(workdir: Path, task_id: str) -> dict[str, Any] | None:
    """A task's recorded state, or None if it was never submitted (or the file is unreadable,
    which only a crashed writer on a broken file system could leave)."""
    try:
        return json.loads(task_state_path(workdir, task_id).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def update_task_state(workdir: Path, task: Task, timeout: float | None = None,
                      **values: Any) -> dict[str, Any]:
    """Merge ``values`` into the task's state under the project lock; write it atomically."""
    workdir = Path(workdir)
    path = task_state_path(workdir, task.id)
    with locked(workdir, timeout):
        state = read_task_state(workdir, task.id) or {
            "task": task.id, "stage": task.stage, "key": list(task.key), "attempts": 0,
            "created": now_iso()}
        state.update(values)
        state["updated"] = now_iso()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, state)
    return state


def products_present(state: dict[str, Any] | None) -> bool:
    """The task finished and every product it recorded is still there."""
    if not state or state.get("state") != "done":
        return False
    return all(Path(p).exists() for p in state.get("products") or [])


# ---------------------------------------------------------------------------------------------
# Running one task
# ---------------------------------------------------------------------------------------------

@dataclass
class RunContext:
    """What the stage runners share: where to log and lock, the CASA env, what was done."""

    workdir: Path
    task: Task
    casa_env_path: str | None = None
    previous_steps: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    _env: Any = None

    @property
    def logdir(self) -> Path:
        return self.workdir / ".hpcddf" / "logs" / self.task.id

    def casa(self, stage: str, **params: Any) -> dict[str, Any]:
        """One casa_tasks stage in the CASA environment; its JSON summary is recorded."""
        from hpcddf.phangs.casaenv import find_casa_env, run_casa
        if self._env is None:
            self._env = find_casa_env(self.casa_env_path)
        summary = run_casa(self._env, stage, self.logdir, **params)
        self.steps[stage] = summary
        return summary

    @contextlib.contextmanager
    def product_lock(self, path: str) -> Iterator[None]:
        """An exclusive lock named after a product file (shared file system, like the state)."""
        d = self.workdir / LOCK_DIR
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{Path(path).name}.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def ensure(self, paths: list[str], make: Callable[[], Any]) -> bool:
        """Make ``paths`` with ``make`` unless all exist; True when made here."""
        if all(Path(p).exists() for p in paths):
            return False
        with self.product_lock(paths[0]):
            if all(Path(p).exists() for p in paths):
                return False
            for p in paths:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
            make()
        self.made += paths
        return True


def _job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def _error_doc(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, HpcddfError):
        doc: dict[str, Any] = {"message": exc.message, "hint": exc.hint}
        tail = getattr(exc, "log_tail", None)
        if tail:
            doc["log_tail"] = tail[-2000:]
        return doc
    return {"message": f"{type(exc).__name__}: {exc}"}


def run_task(task: Task, workdir: str | Path, casa_env: str | None = None) -> dict[str, Any]:
    """Run (or skip) one task, recording its state; exceptions propagate after recording."""
    workdir = Path(workdir)
    prev = read_task_state(workdir, task.id) or {}
    if products_present(prev):
        return {"task": task.id, "skipped": True, "products": prev.get("products", [])}
    if task.outputs and all(Path(p).exists() for p in task.outputs):
        # made by an earlier run (or outside hpcddf): nothing to do, but say so
        update_task_state(workdir, task, state="done", ended=now_iso(), error=None,
                          products=task.outputs, note="products already present: skipped")
        return {"task": task.id, "skipped": True, "products": task.outputs}
    job = _job_id()
    update_task_state(workdir, task, state="running", started=now_iso(), ended=None,
                      error=None, attempts=int(prev.get("attempts", 0)) + 1,
                      host=socket.gethostname(), **({"job_id": job} if job else {}))
    ctx = RunContext(workdir, task, casa_env, previous_steps=dict(prev.get("steps") or {}))
    t0 = time.time()
    try:
        products = RUNNERS[task.stage](ctx)
    except Exception as exc:
        update_task_state(workdir, task, state="failed", ended=now_iso(),
                          elapsed_s=round(time.time() - t0, 1), error=_error_doc(exc),
                          steps={**ctx.previous_steps, **ctx.steps}, notes=ctx.notes)
        raise
    update_task_state(workdir, task, state="done", ended=now_iso(),
                      elapsed_s=round(time.time() - t0, 1), error=None, products=products,
                      steps={**ctx.previous_steps, **ctx.steps}, notes=ctx.notes,
                      note="; ".join(ctx.notes[:2]))
    return {"task": task.id, "skipped": False, "products": products, "notes": ctx.notes}


class PhangsTask(submitit.helpers.Checkpointable):
    """One PHANGS task as a submitit job; a walltime kill requeues it whole (every step it
    already finished is then skipped)."""

    def __init__(self, task: Task, workdir: str, casa_env: str | None = None) -> None:
        self.task = task
        self.workdir = str(workdir)
        self.casa_env = casa_env

    def __call__(self) -> dict[str, Any]:
        return run_task(self.task, self.workdir, self.casa_env)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Called from submitit's signal handler: never wait long for the lock there.
        with contextlib.suppress(Exception):
            update_task_state(Path(self.workdir), self.task, timeout=5.0, state="requeued",
                              note="walltime reached: requeued, resumes after the last product")
        return super().checkpoint(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# CASA stages
# ---------------------------------------------------------------------------------------------

def _not_implemented(what: str, hint: str) -> PhangsRunError:
    return PhangsRunError(f"{what} is not implemented in this version's casa_tasks", hint)


def _line_only(ctx: RunContext) -> dict[str, Any]:
    p = ctx.task.params
    if p.get("kind") != "line":
        raise _not_implemented(f"task {ctx.task.id}: continuum product {p.get('product')}",
                               "leave continuum products out of the CASA stages for now "
                               "(only line cubes are imaged)")
    return p


def _mkparents(*paths: str) -> None:
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _window(p: dict[str, Any]) -> dict[str, Any]:
    return {"restfreq_ghz": p["restfreq_ghz"], "vsys_kms": p["vsys_kms"],
            "vwidth_kms": p["vwidth_kms"]}


def run_stage_ms(ctx: RunContext) -> list[str]:
    p = _line_only(ctx)
    _mkparents(p["split"], p["contsub"])
    ctx.casa("split", vis=p["vis"], outputvis=p["split"], field=p["field"] or None,
             margin_kms=p["margin_kms"], **_window(p))
    ctx.casa("contsub", vis=p["split"], outputvis=p["contsub"], fitorder=p["fitorder"],
             exclude_kms=[f"{lo},{hi}" for lo, hi in p["exclude_kms"]], **_window(p))
    return [p["contsub"]]


def run_stage_line(ctx: RunContext) -> list[str]:
    p = _line_only(ctx)
    _mkparents(p["outputvis"])
    ctx.casa("extract_line", vis=p["vis"], outputvis=p["outputvis"],
             channel_kms=p["channel_kms"], statwt_edge_kms=p["statwt_edge_kms"], **_window(p))
    return [p["outputvis"]]


_ARCSEC = re.compile(r"^\s*([0-9.eE+-]+)\s*arcsec\s*$")


def _cell_arcsec(value: Any) -> float | None:
    """'0.3arcsec' (or a list of two of them) as a number; None when not in arcsec."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    m = _ARCSEC.match(str(value)) if value else None
    return float(m.group(1)) if m else None


def scales_in_pixels(scales_arcsec: list[float], cell_arcsec: float | None) -> str | None:
    """The interf config's clean_scales_arcsec as casa_tasks' ``--scales-pix`` text."""
    if not scales_arcsec or not cell_arcsec:
        return None
    pix = sorted({round(float(s) / cell_arcsec) for s in scales_arcsec})
    return ",".join(str(s) for s in pix)


def run_imaging(ctx: RunContext) -> list[str]:
    p = _line_only(ctx)
    base, recipes = p["imagename"], p["recipes"]
    _mkparents(base)
    img = {"vis": p["vis"], "imagename": base, "restfreq_ghz": p["restfreq_ghz"]}
    dirty = ctx.casa("dirty", tclean=recipes["dirty"], **img)
    ctx.casa("clean_mask", imagename=base)
    scales = None
    if "scales" not in recipes["multiscale"]:
        # the dirty stage reports the cell it chose; a rerun that skipped it has it recorded
        cell = (dirty.get("cell") or ctx.previous_steps.get("dirty", {}).get("cell")
                or recipes["multiscale"].get("cell"))
        scales = scales_in_pixels(p["clean_scales_arcsec"], _cell_arcsec(cell))
    ctx.casa("multiscale", tclean=recipes["multiscale"], scales_pix=scales, **img)
    ctx.casa("singlescale", tclean=recipes["singlescale"], **img)
    ctx.casa("export_image", imagename=base)
    return [f"{base}.image", f"{base}.pb", f"{base}_singlescale.image", f"{base}.fits"]


def run_postprocess(ctx: RunContext) -> list[str]:
    p = _line_only(ctx)
    if p["mosaic"]:
        raise _not_implemented(f"task {ctx.task.id}: the linear mosaic of {', '.join(p['parts'])}",
                               "image the parts and mosaic them outside hpcddf for now")
    if p["feather"]:
        raise _not_implemented(f"task {ctx.task.id}: feathering with single-dish data",
                               "leave feather configs out (select interferometric configs)")
    ctx.casa("postprocess", imagename=p["imagenames"][0], outdir=p["outdir"], stem=p["stem"])
    return list(ctx.task.outputs)


# ---------------------------------------------------------------------------------------------
# Derived products
# ---------------------------------------------------------------------------------------------

def _native_beam(path: str) -> Any:
    from astropy.io import fits
    from radio_beam import Beam

    from hpcddf.errors import ConfigError
    try:
        return Beam.from_fits_header(fits.getheader(path))
    except Exception as exc:
        raise ConfigError(f"{path} has no restoring beam ({exc})",
                          "the postprocessed cube needs BMAJ/BMIN/BPA") from exc


def _target_beam(level: dict[str, Any], distance_mpc: float | None) -> Any:
    from hpcddf.phangs.convolution import target_beam
    if "ang_arcsec" in level:
        return target_beam(ang_res_arcsec=level["ang_arcsec"])
    return target_beam(phys_res_pc=level["phys_pc"], distance_mpc=distance_mpc)


def _levels_made(ctx: RunContext, chain: dict[str, Any], distance: float | None
                 ) -> list[dict[str, Any]]:
    """Convolve (native copy + each resolution); the levels that can exist. A resolution finer
    than the native beam is left out with a note (PHANGS cannot make it either)."""
    from hpcddf.phangs.convolution import smooth_cube

    tol = float(chain.get("convolve_kw", {}).get("tol", 0.1))
    native = chain["levels"][0]
    cube_in = chain["cube_in"]
    ctx.ensure([native["cube"], native["coverage"], native["coverage2d"]],
               lambda: smooth_cube(cube_in, native["cube"], _native_beam(cube_in), tol,
                                   coverage_path=native["coverage"],
                                   coverage2d_path=native["coverage2d"]))
    bmaj = float(_native_beam(native["cube"]).major.to("arcsec").value)
    levels = [native]
    for lvl in chain["levels"][1:]:
        beam = _target_beam(lvl, distance)
        theta = float(beam.major.to("arcsec").value)
        if (theta - bmaj) / bmaj < -tol:
            ctx.notes.append(f"{chain['config']} {lvl['tag']}: {theta:.3g}\" is finer than the "
                             f"native {bmaj:.3g}\" beam, not made")
            continue
        ctx.ensure([lvl["cube"], lvl["coverage"], lvl["coverage2d"]],
                   lambda lvl=lvl, beam=beam: smooth_cube(
                       native["cube"], lvl["cube"], beam, tol, coverage_path=lvl["coverage"],
                       coverage2d_path=lvl["coverage2d"],
                       distance_mpc=distance if "phys_pc" in lvl else None))
        levels.append(lvl)
    return levels


def _strict_chain(ctx: RunContext, chain: dict[str, Any], distance: float | None
                  ) -> list[dict[str, Any]]:
    """Convolution, noise and strict mask of one config at every level it can have."""
    from hpcddf.phangs.masks import strict_mask
    from hpcddf.phangs.noise import phangs_noise

    levels = _levels_made(ctx, chain, distance)
    for lvl in levels:
        ctx.ensure([lvl["noise"]], lambda lvl=lvl: phangs_noise(
            lvl["cube"], lvl["noise"], **chain.get("noise_kw", {})))
        ctx.ensure([lvl["strictmask"]], lambda lvl=lvl: strict_mask(
            lvl["cube"], lvl["noise"], lvl["coverage"], out_path=lvl["strictmask"],
            **chain.get("strictmask_kw", {})))
    return levels


def _level_products(levels: list[dict[str, Any]]) -> list[str]:
    return [lvl[k] for lvl in levels
            for k in ("cube", "coverage", "coverage2d", "noise", "strictmask")]


def run_derived(ctx: RunContext) -> list[str]:
    """Convolve, noise, strict masks (this config and the linked ones), broad mask, moments."""
    from hpcddf.phangs.masks import broad_mask
    from hpcddf.phangs.moments import write_moment

    p = ctx.task.params
    distance = p.get("distance_mpc")
    levels = {p["config"]: _strict_chain(ctx, p["chains"][p["config"]], distance)}
    for c in p["linked"]:
        # the linked config's own task may be running too: the product locks let whichever
        # comes second find the masks made
        before = len(ctx.made)
        levels[c] = _strict_chain(ctx, p["chains"][c], distance)
        if len(ctx.made) > before:
            ctx.notes.append(f"made {len(ctx.made) - before} products of linked config {c}")
    own = levels[p["config"]]
    strict = [lvl["strictmask"] for c in [p["config"], *p["linked"]] for lvl in levels[c]]
    broad = p["broadmask"]
    ctx.ensure([broad["out"]], lambda: broad_mask(own[0]["cube"], strict, out_path=broad["out"],
                                                  **broad["kw"]))
    made_tags = {lvl["tag"] for lvl in own}
    products = _level_products(own) + [broad["out"]]
    for m in p["moments"]:
        if m["tag"] not in made_tags:
            continue
        outs = [m["out"]] + ([m["err"]] if m["err"] else [])
        ctx.ensure(outs, lambda m=m: write_moment(m["cube"], m["noise"], m["mask"],
                                                  m["algorithm"], m["out"], m["err"],
                                                  **m["kwargs"]))
        products += outs
    for s in p.get("skipped_moments", []):
        ctx.notes.append(f"moment {s['moment']} not made: {s['reason']}")
    return products


RUNNERS: dict[str, Callable[[RunContext], list[str]]] = {
    "stage_ms": run_stage_ms, "stage_line": run_stage_line, "imaging": run_imaging,
    "postprocess": run_postprocess, "derived": run_derived,
}
