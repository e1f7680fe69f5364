"""``redofrom`` and ``restart=False``: start a field again, keeping what came before.

ddf-pipeline applies ``redofrom`` every time the pipeline starts, so a requeued job would
archive the products it just made; its author says not to pass it twice. hpcddf applies it
once, at submit time on the login node, under the field lock and before anything is queued:
later products move to ``archive_dir`` and the done-markers of the steps to redo are removed.
Node jobs and ``hpcddf resubmit`` never look at it again.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from hpcddf.engine.paths import HIDDEN, unit_paths
from hpcddf.errors import FieldError
from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.steps import STEP_NAMES

log = logging.getLogger(__name__)

# What ``redofrom=dirin`` keeps besides the inputs: the initial DI images and masks.
DIRIN_KEEP = ("image_dirin_SSD_init.*", "image_dirin_SSD.*", "image_dirin_SSD_m.*",
              "MaskDiffuse*", "Noise*.fits", "external_mask.*")
DIRIN_STEPS = ("image_dirin_SSD_init", "external_mask", "image_dirin_SSD", "mask_diffuse",
               "image_dirin_SSD_m")
ALWAYS_KEEP = ("*.ms", "*.MS", "*.cfg", HIDDEN, "hpcddf.cfg", "panstarrs")  # panstarrs: downloaded at submit


def _keep_patterns(cfg: PipelineConfig, point: str) -> list[str]:
    keep = list(ALWAYS_KEEP) + [cfg.get("control", "archive_dir")]
    keep += [n for n in (cfg.get("data", "mslist"), cfg.get("data", "full_mslist"),
                         cfg.get("image", "clusterfile")) if n]
    if point == "dirin":
        keep += list(DIRIN_KEEP)
    return keep


def _archive_target(root: Path, names: Iterable[str]) -> Path:
    """``archive_dir`` itself, or a fresh numbered folder inside it if a name would collide."""
    if not any((root / n).exists() or (root / n).is_symlink() for n in names):
        return root
    n = 2
    while (root / f"redo-{n}").exists():
        n += 1
    return root / f"redo-{n}"


def apply_redofrom(workdir: Path, cfg: PipelineConfig, point: str) -> list[str]:
    """Move products made after ``point`` into the archive and forget their steps.

    Returns what was moved. Nothing is deleted: a name already in the archive sends this
    batch to ``<archive_dir>/redo-N``.
    """
    keep = _keep_patterns(cfg, point)
    movable = sorted(p.name for p in workdir.iterdir()
                     if not any(fnmatch.fnmatch(p.name, pat) for pat in keep))
    archive = workdir / cfg.get("control", "archive_dir")
    target = _archive_target(archive, movable) if movable else archive
    if movable:
        target.mkdir(parents=True, exist_ok=True)
    for name in movable:
        os.replace(workdir / name, target / name)
    kept_steps = DIRIN_STEPS if point == "dirin" else ()
    forget_steps(workdir, [s for s in STEP_NAMES if s not in kept_steps])
    dropped = drop_scaled_columns(workdir)
    _record(workdir, point, target, movable, dropped)
    log.info("redofrom=%s: archived %d item(s) to %s", point, len(movable), target)
    return movable


def drop_scaled_columns(workdir: Path) -> dict[str, list[str]]:
    """Every redofrom point comes before the bootstrap: drop its scaled columns from the
    field's MSs so the redone bootstrap writes them from its own factors."""
    dropped: dict[str, list[str]] = {}
    mss = sorted(p for p in workdir.iterdir() if p.is_dir() and p.suffix in (".ms", ".MS")
                 and (p / "table.dat").exists())
    if not mss:
        return dropped
    try:
        import casacore.tables  # noqa: F401  (the science extra)

        from hpcddf.lofar.bootstrap import remove_scaled_columns
    except ImportError:
        log.warning("python-casacore is not installed here: any SCALED_DATA column in the MSs "
                    "stays (the bootstrap would keep its old factors)")
        return dropped
    for ms in mss:
        gone = remove_scaled_columns(str(ms))
        if gone:
            dropped[ms.name] = gone
            log.info("redofrom: removed %s from %s", ", ".join(gone), ms.name)
    return dropped


def forget_steps(workdir: Path, steps: Iterable[str]) -> None:
    """Remove done-markers so these steps run again."""
    for name in steps:
        unit_paths(workdir).marker(name).unlink(missing_ok=True)


def _record(workdir: Path, point: str, target: Path, moved: list[str],
            dropped: dict[str, list[str]]) -> None:
    paths = unit_paths(workdir)
    paths.hidden.mkdir(parents=True, exist_ok=True)
    with open(paths.redo_log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "redofrom": point,
                             "archive": str(target), "moved": moved,
                             "dropped_columns": dropped}) + "\n")


def apply_restart_policy(workdir: Path, cfg: PipelineConfig) -> str | None:
    """Apply ``redofrom`` / ``restart=False`` for a new submission; says what was done."""
    point = cfg.get("control", "redofrom")
    if point:
        if not workdir.is_dir():
            raise FieldError(f"redofrom={point} but {workdir} does not exist yet",
                             "drop --control-redofrom for a first run")
        moved = apply_redofrom(workdir, cfg, point)
        return f"redofrom={point}: archived {len(moved)} item(s) to {cfg.get('control', 'archive_dir')}"
    if not cfg.get("control", "restart"):
        forget_steps(workdir, STEP_NAMES)
        return "restart=False: every step runs again (products are overwritten)"
    return None
