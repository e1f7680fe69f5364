"""A pipeline's node work inside the site's image: the launcher every command of a unit goes
through, the probe that the image holds what the commands start (and the same hpcddf as the
job), and one command run that way for work that is a Python call on the login node's side
(a mosaic).

Stages get their launcher from the node job; a unit whose work is one call of hpcddf's own
code runs that call as ``python3 -m <module> <args>`` through :func:`run_in_image` when the
site names an image, so that its numpy, astropy and reproject are the image's, as the science
programs' are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import sys
from pathlib import Path
from typing import Sequence

from hpcddf.engine.runner import Command, Launcher, RunContext, Step, run_command
from hpcddf.engine.sites import Site
from hpcddf.errors import PreflightError, StepFailed

log = logging.getLogger("hpcddf.job")

FIX = "rebuild the image from this hpcddf (containers/README.md) or set [container] image"


def science_env() -> dict[str, str]:
    """Thread counts pinned to 1 (DDFacet/killMS parallelise with processes) and the science
    programs of hpcddf's own environment first on PATH (without a container they live there)."""
    bindir = str(Path(sys.executable).parent)
    return {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "/usr/bin:/bin")]),
            # ch-run refuses to start without USER, which batch jobs do not always carry.
            "USER": os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name}


def contained(site: Site) -> bool:
    """Whether the site runs the node's commands in an image."""
    return site.container.runtime != "none"


# multiprocessing puts its sockets in TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX and a Unix socket
# path has at most 107 characters: PyBDSF's MakeCatalog stopped in CI ("_recv_bytes") with a
# 95-character TMPDIR on the scratch
SOCKET_SAFE_TMPDIR = 60
SHORT_TMP_ROOT = Path("/tmp")  # the host's, which ch-run and Apptainer bind into every image


def short_tmpdir(tmp: Path) -> Path:
    """``tmp`` itself, or, when its path is too long for the sockets of the commands'
    multiprocessing, a short link to it in /tmp (named from its path, made atomically)."""
    if len(str(tmp)) <= SOCKET_SAFE_TMPDIR:
        return tmp
    link = short_link(tmp)
    if not (link.is_symlink() and os.readlink(link) == str(tmp)):
        part = link.with_name(f".{link.name}.{os.getpid()}")
        part.unlink(missing_ok=True)
        part.symlink_to(tmp)
        os.replace(part, link)
    return link


def short_link(tmp: Path) -> Path:
    return SHORT_TMP_ROOT / f"hpcddf-{hashlib.sha1(str(tmp).encode()).hexdigest()[:12]}"


def drop_short_tmpdir(tmp: Path) -> None:
    """Remove the link :func:`short_tmpdir` may have made for ``tmp`` (at the unit's end)."""
    link = short_link(tmp)
    if link.is_symlink():
        link.unlink(missing_ok=True)


def site_launcher(site: Site, workdir: Path, scratch: Path) -> Launcher:
    """Every command through the site's container runtime: ``workdir`` and ``scratch`` (its
    ``tmp`` the commands' TMPDIR and HOME, through a short link when its path is long) bound at
    the same paths, with the site's binds and catalogue directory."""
    from hpcddf.engine.containers import make_launcher, spec_for
    c = site.container
    tmp = scratch / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tmp = short_tmpdir(tmp)
    catalog = str(site.catalog_dir) if site.catalog_dir else None
    return make_launcher(spec_for(c.runtime, c.image, c.executable, c.binds, workdir, scratch,
                                  catalog, tmp, c.env))


def check_image(ctx: RunContext, steps: Sequence[Step], image: str) -> None:
    """Before the first step, through the unit's own launcher: the image holds every program
    the steps start and the same hpcddf as this job (hpcddf/engine/imageprobe.py)."""
    from hpcddf.engine import imageprobe as ip
    need = ip.needed_commands(c.argv for s in steps for c in s.commands)
    cmd = Command(("python3", "-m", ip.PROBE_MODULE, *need), "image-probe.log", timeout_s=300)
    try:
        run_command(ctx, "image-probe", cmd)
    except StepFailed as exc:
        raise PreflightError(f"image {image}: python3 -m {ip.PROBE_MODULE} failed there "
                             f"(exit {exc.returncode}): no Python or no hpcddf in it", f"{FIX}; see {exc.log_path}") from None
    found = ip.last_json((ctx.log_dir / cmd.log_name).read_text(errors="replace"))
    if found is None:
        raise PreflightError(f"image {image}: python3 -m {ip.PROBE_MODULE} printed no answer there",
                             f"{FIX}; see {ctx.log_dir / cmd.log_name}")
    bad = ip.problems(found, ip.probe([]))
    if bad:
        raise PreflightError(f"image {image}: " + "; ".join(bad), FIX)
    log.info("image %s holds hpcddf %s and %s", image, found.get("version"), ", ".join(need))


def run_in_image(site: Site, workdir: Path, scratch: Path, name: str, argv: Sequence[str],
                 log_dir: Path, timeout_s: float | None = None) -> float:
    """Run one command (``python3 -m hpcddf...``) in the site's image after probing it; its log
    is ``log_dir/<name>.log``. Returns the seconds it took; a failure raises StepFailed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(workdir=workdir, log_dir=log_dir, marker_dir=log_dir, env=science_env())
    ctx.launcher = site_launcher(site, workdir, scratch)
    cmd = Command(tuple(argv), f"{name}.log", timeout_s=timeout_s)
    try:
        check_image(ctx, [Step(name, "", (cmd,))], str(site.container.image))
        return run_command(ctx, name, cmd)
    finally:
        drop_short_tmpdir(scratch / "tmp")
