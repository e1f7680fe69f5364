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
import math
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from hpcddf.engine.atomic import write_json_atomic
from hpcddf.engine.jobenv import job_id_from_env
from hpcddf.engine.paths import HIDDEN, unit_paths
from hpcddf.engine.state import FINAL, State, locked, now_iso
from hpcddf.errors import HpcddfError
from hpcddf.phangs.plan_common import Task

STATE_DIR = Path(HIDDEN) / "phangs"
LOCK_DIR = Path(HIDDEN) / "phangs-locks"
FINAL_STATES = FINAL


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
    if not state or state.get("state") != State.DONE:
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
        return unit_paths(self.workdir).logs / self.task.id

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
        update_task_state(workdir, task, state=State.DONE, ended=now_iso(), error=None,
                          products=task.outputs, note="products already present: skipped")
        return {"task": task.id, "skipped": True, "products": task.outputs}
    job = job_id_from_env()
    update_task_state(workdir, task, state=State.RUNNING, started=now_iso(), ended=None,
                      error=None, attempts=int(prev.get("attempts", 0)) + 1,
                      host=socket.gethostname(), **({"job_id": job} if job else {}))
    ctx = RunContext(workdir, task, casa_env, previous_steps=dict(prev.get("steps") or {}))
    t0 = time.time()
    try:
        products = RUNNERS[task.stage](ctx)
    except Exception as exc:
        update_task_state(workdir, task, state=State.FAILED, ended=now_iso(),
                          elapsed_s=round(time.time() - t0, 1), error=_error_doc(exc),
                          steps={**ctx.previous_steps, **ctx.steps}, notes=ctx.notes)
        raise
    update_task_state(workdir, task, state=State.DONE, ended=now_iso(),
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
            update_task_state(Path(self.workdir), self.task, timeout=5.0, state=State.REQUEUED,
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


def _product_params(ctx: RunContext) -> dict[str, Any]:
    """The task's parameters; staging and imaging take line and continuum products."""
    p = ctx.task.params
    if p.get("kind") not in ("line", "cont"):
        raise PhangsRunError(f"task {ctx.task.id}: product {p.get('product')} has no kind "
                             f"(line or cont) in its plan",
                             "plan the project again with this version (hpcddf phangs submit)")
    return p


def _mkparents(*paths: str) -> None:
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _window(p: dict[str, Any]) -> dict[str, Any]:
    return {"restfreq_ghz": p["restfreq_ghz"], "vsys_kms": p["vsys_kms"],
            "vwidth_kms": p["vwidth_kms"]}


def run_stage_ms(ctx: RunContext) -> list[str]:
    p = _product_params(ctx)
    if p["kind"] == "cont":
        # the whole band (or the product's frequency ranges): lines are flagged in stage_line
        _mkparents(p["split"])
        ctx.casa("split", vis=p["vis"], outputvis=p["split"], field=p["field"] or None,
                 continuum=True, freq_range_ghz=p["freq_ranges_ghz"])
        return [p["split"]]
    _mkparents(p["split"], p["contsub"])
    ctx.casa("split", vis=p["vis"], outputvis=p["split"], field=p["field"] or None,
             margin_kms=p["margin_kms"], **_window(p))
    ctx.casa("contsub", vis=p["split"], outputvis=p["contsub"], fitorder=p["fitorder"],
             exclude_kms=[f"{lo},{hi}" for lo, hi in p["exclude_kms"]], **_window(p))
    return [p["contsub"]]


def run_stage_line(ctx: RunContext) -> list[str]:
    p = _product_params(ctx)
    _mkparents(p["outputvis"])
    if p["kind"] == "cont":
        ctx.casa("extract_continuum", vis=p["vis"], outputvis=p["outputvis"],
                 channel_ghz=p["channel_ghz"], flag_ghz=p["flag_ghz"])
        return [p["outputvis"]]
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
    # a continuum product's recipes say specmode 'mfs' (the plan sees to it) and it has no
    # rest frequency: the same steps then make one plane
    p = _product_params(ctx)
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


def _postprocess_continuum(ctx: RunContext) -> list[str]:
    """A continuum image through the same casa_tasks postprocess as a cube: pbcor, round
    beam, Jy/beam -> K (PHANGS's cleanup converts every product, continuum included, and the
    products are named ``_k``), trim, and a 2-D FITS image whose FREQ card keeps the
    frequency the K scale refers to. A mosaic's parts are postprocessed one by one and then
    combined by :func:`linear_mosaic` into a 2-D mosaic, as for line cubes. Feathering a
    continuum image with single-dish data is not implemented: that task stops with one line."""
    p = ctx.task.params
    if p["feather"]:
        raise _not_implemented(f"task {ctx.task.id}: feathering a continuum image with "
                               f"single-dish data",
                               "leave continuum products out of feather configs, or feather "
                               "the continuum image outside hpcddf for now")
    return _postprocess_and_mosaic(ctx, "postprocess")


def run_postprocess(ctx: RunContext) -> list[str]:
    if ctx.task.params.get("kind") == "cont":
        return _postprocess_continuum(ctx)
    p = _line_only(ctx)
    # pbcor, round beam (feathered with the single dish for a feather config), K, trim
    return _postprocess_and_mosaic(ctx, "feather" if p["feather"] else "postprocess")


def _postprocess_and_mosaic(ctx: RunContext, stage: str) -> list[str]:
    """One CASA ``stage`` run per imaged target (the plan's ``units``), then for a linear
    mosaic the combination of the parts' products here (:func:`linear_mosaic`). A single
    target's products are the task's own, a mosaic part's go to the part's own directory."""
    p = ctx.task.params
    units = p.get("units")
    if not units:
        raise PhangsRunError(f"task {ctx.task.id} was planned without its postprocess units",
                             "plan the project again with this version (hpcddf phangs submit)")
    for unit in units:
        extra = {"singledish": unit["singledish"]} if stage == "feather" else {}
        summary = ctx.casa(stage, imagename=unit["imagename"], outdir=unit["outdir"],
                           stem=unit["stem"], **extra)
        if p["mosaic"]:
            ctx.steps[f"{stage} {unit['target']}"] = summary
    if p["mosaic"]:
        out = {k: str(Path(p["outdir"]) / f"{p['stem']}_{k}.fits") for k in MOSAIC_PRODUCTS}
        summary = linear_mosaic([u["fits"] for u in units], out, name=p["target"])
        ctx.steps["linear_mosaic"] = summary
        ctx.notes.append(f"linear mosaic of {', '.join(p['parts'])} at a round "
                         f"{summary['beam_arcsec']:.3g}\" beam")
    return list(ctx.task.outputs)


# -- linear mosaic -----------------------------------------------------------------------------
#
# PHANGS combines the postprocessed parts of a mosaic in CASA (imsmooth, imregrid, LEL). Here it
# is numpy on the parts' FITS products (radio_beam, spectral_cube and reproject, as the derived
# products): no CASA session, and the arithmetic can be tested on synthetic cubes with a known
# truth. The parts arrive in K at a round beam, trimmed to their pb cutoff (NaN outside it).

MOSAIC_PRODUCTS = ("pbcorr_trimmed_k", "flat_trimmed_k", "pb_trimmed")


def mosaic_weights(pb: Any, sigma: float) -> Any:
    """PHANGS's interferometric weight w = pb²/σ²: the inverse variance of a pb-corrected
    part whose flat-noise σ grows as σ/pb. Blank or non-positive pb weighs 0."""
    import numpy as np

    pb = np.asarray(pb, dtype=float)
    return np.where(np.isfinite(pb) & (pb > 0), pb, 0.0) ** 2 / sigma ** 2


def cube_noise(flat: Any) -> float:
    """σ of a flat-noise cube as PHANGS weights mosaic parts: 'chauvmad' (the std of what
    Chauvenet's criterion keeps around a MAD start) per channel, the median over channels.
    Faint emission wings survive the clipping and raise it by a few per cent in line
    channels; the weights only need the parts' noise relative to each other. A 2-D image
    (a continuum part) is one plane: its σ is its chauvmad noise."""
    import numpy as np

    from hpcddf.phangs.casa_common import chauvenet_mad_noise

    flat = np.asarray(flat, dtype=float)
    values = [chauvenet_mad_noise(ch) for ch in flat.reshape((-1, *flat.shape[-2:]))
              if np.isfinite(ch).sum() >= 10]
    values = [v for v in values if v > 0]
    if not values:
        raise PhangsRunError("cannot measure the noise of a mosaic part: no channel has 10 "
                             "finite pixels that vary", "check the part's flat_trimmed_k cube")
    return float(np.median(values))


def common_grid(headers: list[Any]) -> tuple[Any, tuple[int, int]]:
    """The first part's celestial grid (projection, tangent point, pixel size) widened to hold
    every part's outline; (2-D WCS, (ny, nx)). Parts imaged on one phase centre and cell land
    on whole-pixel shifts of it, so aligning them moves no flux."""
    import numpy as np
    from astropy.wcs import WCS

    ref = WCS(headers[0]).celestial
    xs, ys = [], []
    for h in headers:
        w = WCS(h).celestial
        nx, ny = int(h["NAXIS1"]), int(h["NAXIS2"])
        ex, ey = np.linspace(-0.5, nx - 0.5, 2 * nx + 1), np.linspace(-0.5, ny - 0.5, 2 * ny + 1)
        px = np.concatenate([ex, ex, np.full_like(ey, -0.5), np.full_like(ey, nx - 0.5)])
        py = np.concatenate([np.full_like(ex, -0.5), np.full_like(ex, ny - 0.5), ey, ey])
        rx, ry = ref.world_to_pixel_values(*w.pixel_to_world_values(px, py))
        xs.append(rx)
        ys.append(ry)
    x, y = np.concatenate(xs), np.concatenate(ys)
    x0, x1 = int(np.floor(x.min() + 0.5 + 1e-6)), int(np.ceil(x.max() - 0.5 - 1e-6))
    y0, y1 = int(np.floor(y.min() + 0.5 + 1e-6)), int(np.ceil(y.max() - 0.5 - 1e-6))
    out = ref.deepcopy()
    out.wcs.crpix = [ref.wcs.crpix[0] - x0, ref.wcs.crpix[1] - y0]
    return out, (y1 - y0 + 1, x1 - x0 + 1)


def _whole_pixel_shift(wcs: Any, grid: Any, header: Any) -> bool:
    """Whether the part's pixels are the grid's shifted by whole pixels (same projection,
    tangent point and cell: the parts of a mosaic imaged on one phase centre)."""
    import numpy as np

    nx, ny = int(header["NAXIS1"]), int(header["NAXIS2"])
    px, py = np.array([0.0, nx - 1.0, 0.0]), np.array([0.0, 0.0, ny - 1.0])
    gx, gy = grid.world_to_pixel_values(*wcs.pixel_to_world_values(px, py))
    dx, dy = gx - px, gy - py
    return bool(np.all(np.abs(dx - np.round(dx[0])) < 1e-3)
                and np.all(np.abs(dy - np.round(dy[0])) < 1e-3))


def channel_axis(header: Any) -> Any:
    """World value of each channel (m/s for the exported VRAD axis)."""
    import numpy as np
    from astropy.wcs import WCS

    return np.asarray(WCS(header).spectral.pixel_to_world_values(np.arange(header["NAXIS3"])))


def on_channels(data: Any, v_in: Any, v_out: Any) -> Any:
    """``data`` [chan, y, x] linearly interpolated from channels ``v_in`` onto ``v_out`` (both
    uniform, same width); NaN outside. The identity when the axes agree (the usual case: the
    parts of a product share its channel grid)."""
    import numpy as np

    v_in, v_out = np.asarray(v_in, float), np.asarray(v_out, float)
    dv_in, dv_out = v_in[1] - v_in[0], v_out[1] - v_out[0]
    if v_in.size == v_out.size and np.allclose(v_in, v_out, atol=1e-3 * abs(dv_out)):
        return data
    if not math.isclose(abs(dv_in), abs(dv_out), rel_tol=0.01):
        raise PhangsRunError(f"mosaic parts have different channel widths ({abs(dv_in):g} and "
                             f"{abs(dv_out):g})", "image every part with the product's "
                                                  "channel width")
    f = (v_out - v_in[0]) / dv_in
    out = np.full((v_out.size,) + data.shape[1:], np.nan)
    for k, fk in enumerate(f):
        i = int(np.floor(fk + 1e-9))
        t = fk - i
        if 0 <= i < v_in.size - 1:
            out[k] = (1.0 - t) * data[i] + t * data[i + 1]
        elif abs(fk - (v_in.size - 1)) < 1e-9:
            out[k] = data[-1]
    return out


def _common_beam(headers: list[Any]) -> Any:
    """The smallest beam every part can be convolved to: for round parts the largest."""
    import astropy.units as u
    from radio_beam import Beams

    beams = Beams(major=[h["BMAJ"] for h in headers] * u.deg,
                  minor=[h["BMIN"] for h in headers] * u.deg,
                  pa=[h.get("BPA", 0.0) for h in headers] * u.deg)
    if all(math.isclose(h["BMAJ"], h["BMIN"], rel_tol=1e-6) for h in headers):
        return beams[int(beams.major.argmax())]
    return beams.common_beam()


def _read_part(path: str) -> Any:
    """A part's product as a ``SpectralCube``, or for a 2-D continuum image a spectral-cube
    ``Projection``: both carry the beam and convolve to another one the same way."""
    from astropy.io import fits
    from spectral_cube import Projection

    from hpcddf.phangs.convolution import read_cube
    if int(fits.getheader(path)["NAXIS"]) != 2:
        return read_cube(path)
    with fits.open(path, memmap=False) as hdul:
        return Projection.from_hdu(hdul[0])


def _planes(image: Any) -> Any:
    """The values of a cube or an image as planes [chan, y, x] (an image is one plane)."""
    import numpy as np

    values = image.unmasked_data[:] if hasattr(image, "unmasked_data") else image
    data = np.asarray(values.value, dtype=float)
    return data.reshape((-1, *data.shape[-2:]))


def _part_on_beam(path: str, beam: Any) -> Any:
    """A part's planes [chan, y, x] (K) at ``beam`` (a 2-D image is one plane), convolved
    only when its own beam is finer (a K map is a surface brightness, so the kernel is
    normalised, no beam-area factor)."""
    import warnings

    import numpy as np

    image = _read_part(path)
    data = _planes(image)
    own = image.beam
    if float(own.major.to("arcsec").value) < float(beam.major.to("arcsec").value) * (1 - 1e-4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = image.convolve_to(beam, nan_treatment="interpolate")
        blank = ~np.isfinite(data)
        data = _planes(conv)
        data[blank] = np.nan
    return data


def linear_mosaic(parts: list[dict[str, str]], out: dict[str, str], name: str | None = None
                  ) -> dict[str, Any]:
    """Mosaic of parts (each a dict of its MOSAIC_PRODUCTS paths) into ``out`` (same keys);
    ``name`` becomes the headers' OBJECT. The parts are all cubes [chan, y, x] or all 2-D
    images (continuum: one plane, no spectral axis; the mosaic is 2-D with the first part's
    cards, its FREQ among them).

    1. Common resolution: the largest part beam; finer parts are convolved to it.
    2. Common grid: :func:`common_grid`; the spectral axis is the first part's (others are
       interpolated onto it, :func:`on_channels`).
    3. Weights w_i = pb_i²/σ_i² (:func:`mosaic_weights`), σ_i from the part's flat cube at the
       common beam (:func:`cube_noise`); blank pixels weigh 0; I = Σ w_i I_i / Σ w_i.
    4. ``pb_trimmed`` of the mosaic is its relative sensitivity sqrt(Σw / max Σw) per channel:
       the pb-corrected mosaic's noise is 1/sqrt(Σw), so this plays the single pointing's pb
       (1 at the best point, and ``flat_trimmed_k`` = mosaic x it has flat noise, as for a
       single field; it exceeds a part's pb where parts overlap).
    5. Trimmed to the pixels the mosaic covers (plus two), written atomically.

    Accumulates part by part, so memory holds the mosaic grid and one part."""
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS
    from reproject import reproject_interp

    headers = [fits.getheader(p["pbcorr_trimmed_k"]) for p in parts]
    images = _parts_are_images(headers)
    beam = _common_beam(headers)
    grid, shape2d = common_grid(headers)
    v_out = None if images else channel_axis(headers[0])
    nplanes = 1 if v_out is None else v_out.size
    num = np.zeros((nplanes, *shape2d))
    wsum = np.zeros_like(num)
    sigmas = []
    for part, header in zip(parts, headers, strict=True):
        cube = _part_on_beam(part["pbcorr_trimmed_k"], beam)
        flat = _part_on_beam(part["flat_trimmed_k"], beam)
        pb = fits.getdata(part["pb_trimmed"]).astype(float).reshape(cube.shape)
        if v_out is not None:
            v_in = channel_axis(header)
            cube, flat, pb = (on_channels(a, v_in, v_out) for a in (cube, flat, pb))
        sigmas.append(cube_noise(flat))
        w = np.where(np.isfinite(cube), mosaic_weights(pb, sigmas[-1]), 0.0)
        celestial = WCS(header).celestial
        shape = (nplanes, *shape2d)
        # a whole-pixel shift is copied (bilinear weights of ~0 would still spread blanks)
        order = "nearest-neighbor" if _whole_pixel_shift(celestial, grid, header) else "bilinear"
        cube_r, _ = reproject_interp((cube, celestial), grid, shape_out=shape, order=order)
        w_r, _ = reproject_interp((w, celestial), grid, shape_out=shape, order=order)
        w_r = np.where(np.isfinite(cube_r) & np.isfinite(w_r), w_r, 0.0)
        num += w_r * np.nan_to_num(cube_r)
        wsum += w_r
    with np.errstate(invalid="ignore", divide="ignore"):
        mosaic = np.where(wsum > 0, num / wsum, np.nan)
        peak = wsum.reshape(wsum.shape[0], -1).max(axis=1)[:, None, None]
        coverage = np.where(wsum > 0, np.sqrt(wsum / np.where(peak > 0, peak, np.nan)), np.nan)
    ys, xs = np.nonzero(np.isfinite(mosaic).any(axis=0))
    if ys.size == 0:
        raise PhangsRunError("the mosaic parts share no finite pixel", "check the parts' cubes")
    y0, y1 = max(0, ys.min() - 2), min(shape2d[0], ys.max() + 3)
    x0, x1 = max(0, xs.min() - 2), min(shape2d[1], xs.max() + 3)
    header = _mosaic_header(headers[0], grid, x0, y0, beam, len(parts), sigmas)
    if name:
        header["OBJECT"] = name
    products = {"pbcorr_trimmed_k": mosaic, "flat_trimmed_k": mosaic * coverage,
                "pb_trimmed": coverage}
    for key, data in products.items():
        box = data[:, y0:y1, x0:x1]
        _write_mosaic_product(out[key], box[0] if images else box, header, key)
    shape_out = [int(y1 - y0), int(x1 - x0)] if images else [nplanes, int(y1 - y0), int(x1 - x0)]
    return {"fits": dict(out), "beam_arcsec": float(beam.major.to("arcsec").value),
            "noise_k": sigmas, "shape": shape_out}


def _parts_are_images(headers: list[Any]) -> bool:
    """Whether the mosaic parts are 2-D images (continuum) rather than cubes; a mix of the
    two, or another dimensionality, has no one mosaic."""
    dims = sorted({int(h["NAXIS"]) for h in headers})
    if len(dims) != 1 or dims[0] not in (2, 3):
        raise PhangsRunError(f"mosaic parts have {' and '.join(map(str, dims))} axes: they "
                             f"must all be 2-D images or all cubes",
                             "postprocess every part of the mosaic as the same product")
    return dims == [2]


def _mosaic_header(first: Any, grid: Any, x0: int, y0: int, beam: Any, nparts: int,
                   sigmas: list[float]) -> Any:
    """The first part's header on the trimmed mosaic grid, with the common beam."""
    header = first.copy()
    header["CRPIX1"] = float(grid.wcs.crpix[0] - x0)
    header["CRPIX2"] = float(grid.wcs.crpix[1] - y0)
    beam.attach_to_header(header, copy=False)
    header["HISTORY"] = (f"hpcddf linear mosaic of {nparts} parts, weights pb^2/sigma^2, "
                         f"sigma (K) " + ", ".join(f"{s:.4g}" for s in sigmas))
    return header


def _write_mosaic_product(path: str, data: Any, header: Any, key: str) -> None:
    import numpy as np

    from hpcddf.phangs.convolution import set_data_range, write_fits_atomic
    h = header.copy()
    if key == "pb_trimmed":
        h["BUNIT"] = ""
        h["BTYPE"] = "Coverage"
        h["COMMENT"] = "relative sensitivity sqrt(sum w / max sum w) of the linear mosaic"
    data = data.astype(np.float32)
    set_data_range(h, data)
    write_fits_atomic(path, data, h)


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


def _moment_outputs(m: dict[str, Any]) -> list[str]:
    return [m["out"]] + ([m["err"]] if m["err"] else [])


def _write_cube_moment(m: dict[str, Any]) -> Any:
    from hpcddf.phangs.moments import write_moment
    return write_moment(m["cube"], m["noise"], m["mask"], m["algorithm"], m["out"], m["err"],
                        **m["kwargs"])


def _make_other_prior(ctx: RunContext, prior: dict[str, Any], distance: float | None) -> None:
    """A prior map of another config, made here (its cube, noise, strict mask at that level
    and the moment) under the product locks, as linked strict masks are: whichever task
    comes second finds it made."""
    before = len(ctx.made)
    levels = _strict_chain(ctx, prior["chain"], distance)
    m = prior["moment"]
    if m["tag"] in {lvl["tag"] for lvl in levels}:
        ctx.ensure(_moment_outputs(m), lambda: _write_cube_moment(m))
    if len(ctx.made) > before:
        ctx.notes.append(f"made {len(ctx.made) - before} products of config {prior['config']} "
                         f"for the prior {Path(m['out']).name}")


def _prior_map(ctx: RunContext, m: dict[str, Any]) -> str:
    """The prior velocity field of a mom1wprior map. When the planned prior is missing (or
    none is named) the fallback is the broad mom1 of the coarsest level made: smooth enough to
    reject outliers of the finer broad maps, and present wherever the chain ran. At the
    coarsest level the broad mom1 is then its own prior, so there every detected broad value
    (broad mom0 above its S/N cut) fills a gap."""
    prior = m["prior"]
    path = prior.get("path")
    if prior["source"] != "fallback" and path and Path(path).exists():
        return path
    fallback = next((f for f in prior["fallback"] if Path(f).exists()), None)
    if fallback is None:
        raise PhangsRunError(f"moment {m['moment']}: no prior velocity field (none of "
                             f"{', '.join(Path(f).name for f in prior['fallback'])} exists)",
                             "make the broad mom1 maps first (round 1)")
    why = f"{Path(path).name} is missing" if path else "the moment key names no prior"
    note = (f"moment {m['moment']}: {why}; the prior is {Path(fallback).name} (broad mom1 "
            f"of the coarsest level made)")
    if note not in ctx.notes:
        ctx.notes.append(note)
    return fallback


def _make_moment(ctx: RunContext, m: dict[str, Any], p: dict[str, Any],
                 distance: float | None) -> list[str]:
    """One moment map (and its error map) of any round."""
    from hpcddf.phangs.moments import write_moment
    from hpcddf.phangs.plan_common import FLAT_MASKS

    outs = _moment_outputs(m)
    if m["algorithm"] == "mom1wprior":
        if m["prior"]["source"] == "config" and not all(Path(o).exists() for o in outs):
            # before taking this map's lock: making the prior takes the other config's locks
            _make_other_prior(ctx, p["priors"][m["prior"]["path"]], distance)
        ctx.ensure(outs, lambda: write_moment(
            None, None, None, "mom1wprior", m["out"], m["err"],
            maps_to_pass={**m["maps"], "prior_mom1": _prior_map(ctx, m)}, **m["kwargs"]))
        return outs
    if m.get("mask_kind") in FLAT_MASKS and not Path(m["mask"]).exists():
        ctx.notes.append(f"moment {m['moment']} {m['tag'] or 'native'}: its "
                         f"{m['mask_kind']} was not made (no velocity field), not made")
        return []
    ctx.ensure(outs, lambda: _write_cube_moment(m))
    return outs


def _vfield_and_flat_masks(ctx: RunContext, p: dict[str, Any], made_tags: set[str]
                           ) -> list[str]:
    """The velocity field from the mom1wprior maps made (finest first, then the window key's
    field), then the flat masks that follow it within the window."""
    from hpcddf.phangs.masks import flat_mask
    from hpcddf.phangs.moments import write_velocity_field

    v = p.get("vfield")
    if not v:
        return []
    layers = [f for f in v["layers"] if Path(f).exists()]
    if v.get("external"):
        if Path(v["external"]).exists():
            layers.append(v["external"])
        else:
            ctx.notes.append(f"velocity field {v['external']} (window key) is missing: not used")
    if not layers:
        ctx.notes.append("velocity field not made: none of its maps exists, so no flat masks")
        return []
    ctx.ensure([v["out"]], lambda: write_velocity_field(layers, v["out"], v["template"]))
    products = [v["out"]]
    for f in p.get("flatmasks", []):
        if f["tag"] not in made_tags:
            continue
        ctx.ensure([f["out"]], lambda f=f: flat_mask(f["cube"], v["out"], out_path=f["out"],
                                                     window=f["window_kms"],
                                                     mask_path=f["mask"]))
        products.append(f["out"])
    return products


def run_derived(ctx: RunContext) -> list[str]:
    """Convolve, noise, strict masks (this config and the linked ones), broad mask, then the
    moments round by round: round 1 from the masks, round 2 (mom1wprior) from round-1 maps,
    then the velocity field and flat masks, then round 3 (flat-mask moments)."""
    from hpcddf.phangs.masks import broad_mask

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
    ctx.notes += p.get("notes", [])
    vfield_after = (p.get("vfield") or {}).get("after_round")
    rounds = sorted({m.get("round", 1) for m in p["moments"]})
    for rnd in rounds:
        if vfield_after is not None and rnd > vfield_after:
            products += _vfield_and_flat_masks(ctx, p, made_tags)
            vfield_after = None
        for m in p["moments"]:
            if m.get("round", 1) == rnd and m["tag"] in made_tags:
                products += _make_moment(ctx, m, p, distance)
    if vfield_after is not None:
        products += _vfield_and_flat_masks(ctx, p, made_tags)
    for s in p.get("skipped_moments", []):
        ctx.notes.append(f"moment {s['moment']} not made: {s['reason']}")
    return products


RUNNERS: dict[str, Callable[[RunContext], list[str]]] = {
    "stage_ms": run_stage_ms, "stage_line": run_stage_line, "imaging": run_imaging,
    "postprocess": run_postprocess, "derived": run_derived,
}
