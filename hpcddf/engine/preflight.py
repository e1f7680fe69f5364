"""Node checks run at the start of every job (and by ``hpcddf preflight`` on any node).

DDFacet and killMS keep their big arrays in ``/dev/shm`` and pin worker processes to cores.
On a shared cluster node that goes wrong in ways that show up hours later as SIGBUS, "File
exists", OOM kills or workers pinned to cores the job does not own (ddf-pipeline #126, #150,
#223, #233; DDFacet #22, #36; killMS #22). Checking the node first turns those into one report
at job start, each failed check with the command that fixes it. Leftover ``/dev/shm`` entries
of killed runs are removed here too, as ``CleanSHM.py`` would, but only the current user's and
only those whose process is gone.

Everything read from the node goes through :class:`NodePaths` and injectable callables, so the
tests run the real code on prepared files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from hpcddf.engine.sites import Site, expand_login_path
from hpcddf.errors import PreflightError

log = logging.getLogger(__name__)

GB = 2**30  # "GB" in site files and reports means GiB, as `df -h` and tmpfs `size=…g` do

_SLURM_CPUS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
_THP_SELECTED = re.compile(r"\[([^\]]+)\]")
_THP_DEFRAG = "/sys/kernel/mm/transparent_hugepage/defrag"
# /dev/shm names DDFacet, killMS and SharedArray leave behind, each with the creating pid
_SHM_PATTERNS = (
    re.compile(r"^ddf\.(\d+)(?:\..*)?$", re.S),         # ddf.<pid> (dir) and ddf.<pid>.<array>
    re.compile(r"^sem\.ddf\.(\d+)(?:\..*)?$", re.S),    # POSIX semaphores
    re.compile(r"^(\d+)\..+$", re.S),                    # <pid>.<name> shared arrays
    re.compile(r"^shared_dict:(\d+)(?:\..*)?$", re.S),  # empty SharedDict folders
)


@dataclass(frozen=True)
class Check:
    """One node property: whether it is fit for DDFacet and, if not, what fixes it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class PreflightReport:
    """All checks of one node, the CPUs the job may use and the stale shm entries removed."""

    checks: tuple[Check, ...]
    cpus: tuple[int, ...]
    removed_shm: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def text(self) -> str:
        """One line per check; a failed one names its fix, so the job log says what to do."""
        lines = []
        for c in self.checks:
            line = f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}"
            if not c.ok and c.fix:
                line += f" (fix: {c.fix})"
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [dataclasses.asdict(c) for c in self.checks],
                "cpus": list(self.cpus), "removed_shm": list(self.removed_shm)}

    def raise_if_failed(self) -> None:
        """Stop the job before DDFacet starts if any check failed."""
        bad = self.failed()
        if bad:
            names = ", ".join(c.name for c in bad)
            fixes = "; ".join(f"{c.name}: {c.fix}" for c in bad if c.fix)
            raise PreflightError(f"node {os.uname().nodename} failed preflight checks: {names}",
                                 fixes or None)


@dataclass(frozen=True)
class NodePaths:
    """Where the node's kernel interfaces are; tests point these at prepared files."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    shm: Path = Path("/dev/shm")


# ------------------------------------------------------------------------------ helpers

def parse_slurm_cpus(value: str) -> list[int]:
    """CPUs per node from ``SLURM_JOB_CPUS_PER_NODE``: ``"24(x2),12"`` -> ``[24, 24, 12]``.

    ddf-pipeline's ``getcpus.py`` calls ``int()`` on this and crashes on multi-node values
    (ddf-pipeline #233), so the repeat syntax is parsed here.
    """
    out: list[int] = []
    for item in value.split(","):
        m = _SLURM_CPUS_ITEM.match(item.strip())
        if m is None:
            raise ValueError(f"{value!r} is not a Slurm CPU count list (like '24(x2),12')")
        count, reps = int(m.group(1)), int(m.group(2) or 1)
        if reps < 1:
            raise ValueError(f"{value!r} repeats a count zero times")
        out.extend([count] * reps)
    return out


def read_meminfo(proc: Path) -> dict[str, int]:
    """``/proc/meminfo`` as name -> kB (lines without a number are skipped)."""
    info: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            info[name.strip()] = int(fields[0])
    return info


def _existing_parent(path: Path) -> Path:
    """The path itself or its nearest existing ancestor (scratch is made by the job later)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fs_space(path: Path) -> tuple[int, int]:
    """(total, free) bytes of the file system holding ``path``; free is what a user may use."""
    st = os.statvfs(_existing_parent(path))
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.1f} GB"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (ours or, PermissionError, someone else's).

    A zombie is dead: in a container whose init does not reap orphans, a killed job's pid
    stays in the process table, and must not keep its field "running" or its /dev/shm alive.
    """
    if pid <= 0:
        return True  # os.kill(0, ...) would signal our process group: never call it "dead"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) S ...": comm may contain spaces and parentheses, the state follows the last ")"
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] in ("Z", "X")


def _default_memlock_kb() -> int | None:
    """The soft ``ulimit -l`` in kB; None means unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft // 1024


def _default_affinity() -> set[int]:
    return set(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- stale shm

def _shm_pid(name: str) -> int | None:
    for pattern in _SHM_PATTERNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def find_stale_shm(shm: Path, uid: int, alive: Callable[[int], bool]) -> list[Path]:
    """``uid``'s DDFacet/killMS entries in ``shm`` whose creating process is gone."""
    stale: list[Path] = []
    try:
        entries = sorted(shm.iterdir())
    except OSError as exc:
        log.warning("cannot list %s: %s", shm, exc)
        return stale
    for entry in entries:
        pid = _shm_pid(entry.name)
        if pid is None:
            continue
        try:
            if entry.lstat().st_uid == uid and not alive(pid):
                stale.append(entry)
        except OSError:
            continue  # removed meanwhile by its owner
    return stale


def clean_stale_shm(shm: Path, uid: int, alive: Callable[[int], bool]) -> list[str]:
    """Remove ``uid``'s DDFacet/killMS entries in ``shm`` whose process is gone; return names.

    A killed DDFacet or killMS leaves thousands of entries behind that fill ``/dev/shm`` and
    make the next run fail with "File exists" (ddf-pipeline #233). Entries of other users and
    of live processes are never touched, so another job on a shared node is safe.
    """
    removed: list[str] = []
    for entry in find_stale_shm(shm, uid, alive):
        try:
            _remove(entry)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale %s: %s", entry, exc)
            continue
        removed.append(entry.name)
    if removed:
        log.info("removed %d stale entries of dead DDFacet/killMS processes from %s",
                 len(removed), shm)
    return removed


# ------------------------------------------------------------------------------ checks

def check_shm(shm: Path, meminfo: dict[str, int] | None, fraction: float) -> Check:
    """/dev/shm must hold ``fraction`` of RAM: DDFacet's shared arrays live there (SIGBUS
    otherwise); its mount size is the admin's to change, its free space is what this job gets."""
    if meminfo is None or "MemTotal" not in meminfo:
        return Check("shm", False, "cannot read MemTotal from meminfo",
                     "run on a Linux node with /proc mounted")
    mount_fix = f"ask your admin to mount a tmpfs on {shm}"
    if not shm.is_dir():
        return Check("shm", False, f"{shm} does not exist", mount_fix)
    try:
        total, free = fs_space(shm)
    except OSError as exc:
        return Check("shm", False, f"cannot stat {shm}: {exc}", mount_fix)
    ram = meminfo["MemTotal"] * 1024
    need = ram * fraction
    detail = (f"{shm} {_gb(total)} total, {_gb(free)} free; needs {_gb(need)} "
              f"({fraction:g} of {_gb(ram)} RAM)")
    if total < need:
        size_g = math.ceil(need / GB)
        return Check("shm", False, detail, f"ask your admin: mount -o remount,size={size_g}g {shm}")
    if free < need:
        return Check("shm", False, detail,
                     f"other processes use {_gb(total - free)} of {shm}: remove leftovers of "
                     f"killed DDFacet/killMS runs (`ls -l {shm}`) or request whole nodes "
                     "(exclusive = true in [slurm])")
    return Check("shm", True, detail)


def check_thp(sys_path: Path, allowed: list[str]) -> Check:
    """Transparent huge page defrag stalls DDFacet's many processes; the manual asks for never."""
    f = sys_path / "kernel" / "mm" / "transparent_hugepage" / "defrag"
    try:
        text = f.read_text()
    except FileNotFoundError:
        return Check("thp", True, f"{f} does not exist (no transparent huge pages)")
    except OSError as exc:
        return Check("thp", True, f"cannot read {f} ({exc}); not checked")
    m = _THP_SELECTED.search(text)
    if m is None:
        return Check("thp", True, f"no selected value in {f} ({text.strip()!r}); not checked")
    value = m.group(1)
    detail = f"defrag is {value!r}, allowed: {', '.join(allowed)}"
    if value in allowed:
        return Check("thp", True, detail)
    return Check("thp", False, detail,
                 f"ask your admin: echo never > {_THP_DEFRAG} (or add {value!r} to "
                 "[preflight] thp_defrag in the site file)")


def check_max_map_count(proc: Path, minimum: int) -> Check:
    """Every shared array is a memory map; the default 65530 maps run out (ddf-pipeline #223)."""
    f = proc / "sys" / "vm" / "max_map_count"
    try:
        value = int(f.read_text().strip())
    except (OSError, ValueError) as exc:
        if minimum <= 0:
            return Check("max_map_count", True, f"cannot read {f} ({exc}); none required")
        return Check("max_map_count", False, f"cannot read {f}: {exc}",
                     "run on a Linux node with /proc mounted")
    detail = f"vm.max_map_count is {value}, needs {minimum}"
    if value >= minimum:
        return Check("max_map_count", True, detail)
    return Check("max_map_count", False, detail,
                 f"ask your admin: sysctl -w vm.max_map_count={minimum} "
                 "(and persist it in /etc/sysctl.d/)")


def check_memlock(memlock_kb: int | None, minimum_kb: int) -> Check:
    """DDFacet warns when it cannot lock its shared memory (DDFacet #22); None = unlimited."""
    shown = "unlimited" if memlock_kb is None else f"{memlock_kb} kB"
    detail = f"ulimit -l is {shown}, needs {minimum_kb} kB"
    if memlock_kb is None or memlock_kb >= minimum_kb:
        return Check("memlock", True, detail)
    return Check("memlock", False, detail,
                 "run `ulimit -l unlimited` before hpcddf if the hard limit allows it; otherwise "
                 "ask your admin (memlock in /etc/security/limits.conf, Slurm "
                 "PropagateResourceLimits)")


def check_swap(meminfo: dict[str, int] | None, required: bool) -> Check:
    """Large images spike past RAM; the ddf-pipeline manual asks for about 100 GB of swap."""
    swap = None if meminfo is None else meminfo.get("SwapTotal")
    shown = "unknown" if swap is None else _gb(swap * 1024)
    if not required:
        return Check("swap", True, f"swap {shown}; not required")
    if swap:
        return Check("swap", True, f"swap {shown}")
    return Check("swap", False, f"swap {shown}, the site requires some",
                 "ask your admin for swap on the node (the ddf-pipeline manual asks for about "
                 "100 GB), or set require_swap = false in [preflight] of the site file")


def granted_cpus(env: Mapping[str, str]) -> int | None:
    """CPUs Slurm granted on this node, or None outside Slurm; bad values raise ValueError."""
    if env.get("SLURM_CPUS_ON_NODE"):
        return int(env["SLURM_CPUS_ON_NODE"].strip())
    if env.get("SLURM_JOB_CPUS_PER_NODE"):
        return parse_slurm_cpus(env["SLURM_JOB_CPUS_PER_NODE"])[0]
    return None


def check_cpus(env: Mapping[str, str], affinity: set[int]) -> tuple[Check, tuple[int, ...]]:
    """The CPUs this job may use, so DDFacet/killMS are not pinned to cores the job does not own
    (DDFacet #36, killMS #22). Slurm's count and the affinity mask must agree."""
    usable = tuple(sorted(affinity))
    try:
        granted = granted_cpus(env)
    except ValueError as exc:
        return Check("cpus", False, f"cannot read the Slurm CPU count: {exc}",
                     "report this Slurm environment to the hpcddf developers"), usable
    if not usable:
        return Check("cpus", False, "the affinity mask allows no CPU",
                     "check the job's --cpus-per-task and the site's CPU binding"), usable
    if granted is None:
        detail = f"not under Slurm; {len(usable)} CPUs in the affinity mask"
        return Check("cpus", True, detail), usable
    detail = f"Slurm granted {granted} CPUs, the affinity mask allows {len(usable)}"
    if len(usable) < granted:
        return Check("cpus", False, detail,
                     "the job is bound to fewer cores than granted: request whole nodes "
                     "(exclusive = true in [slurm]) or ask your admin about the task/affinity "
                     "and cgroup settings"), usable
    if len(usable) > granted:
        # not confined to its cores: use only as many as granted
        usable = usable[:granted]
        detail += f"; using {granted} of them"
    return Check("cpus", True, detail), usable


def check_scratch(scratch: Path, min_free_gb: float) -> Check:
    """The DDFacet cache needs room (about 1 TB for a full field); fail before hours of work."""
    try:
        _total, free = fs_space(scratch)
    except OSError as exc:
        return Check("scratch", False, f"cannot stat {scratch}: {exc}",
                     "fix [node] scratch_dir in the site file")
    detail = f"{scratch}: {_gb(free)} free, needs {min_free_gb:g} GB"
    if free >= min_free_gb * GB:
        return Check("scratch", True, detail)
    return Check("scratch", False, detail,
                 f"free space under {_existing_parent(scratch)}, or point [node] scratch_dir "
                 "at a larger disk in the site file")


def _image_ok(runtime: str, image: Path) -> bool:
    if runtime == "charliecloud" and image.is_dir():
        return os.access(image, os.R_OK | os.X_OK)
    return image.is_file() and os.access(image, os.R_OK)


def check_container(site: Site, env: Mapping[str, str]) -> Check:
    """The science stack runs in the container: its runtime and image must be on this node."""
    from hpcddf.engine.containers import default_executable
    c = site.container
    exe = c.executable or default_executable(c.runtime)
    problems: list[str] = []
    fixes: list[str] = []
    found = shutil.which(exe, path=env.get("PATH"))
    if found is None:
        problems.append(f"{exe} not found on PATH")
        fixes.append(f"load the {c.runtime} module or set [container] executable to its full path")
    image = expand_login_path(c.image) if c.image else None
    if image is None:
        problems.append("no image configured")
        fixes.append("set [container] image in the site file")
    elif not _image_ok(c.runtime, image):
        kind = "file or directory" if c.runtime == "charliecloud" else "file"
        problems.append(f"image {image} is not a readable {kind}")
        fixes.append(f"check [container] image in the site file and that {image} is readable here")
    if problems:
        return Check("container", False, "; ".join(problems), "; ".join(fixes))
    return Check("container", True, f"{c.runtime} at {found}, image {image}")


# ------------------------------------------------------------------------------- entry

def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _stale_shm_check(shm: Path, clean: bool) -> tuple[Check, list[str]]:
    """Remove (or, when not cleaning, only list) stale entries; a passing check either way."""
    if not shm.is_dir():
        return Check("stale_shm", True, f"{shm} does not exist"), []
    if not clean:
        found = [p.name for p in find_stale_shm(shm, os.getuid(), pid_alive)]
        detail = (f"{len(found)} stale entries in {shm}, not removed: {_names(found)}" if found
                  else f"no stale entries of dead processes in {shm}")
        return Check("stale_shm", True, detail), []
    removed = clean_stale_shm(shm, os.getuid(), pid_alive)
    if not removed:
        return Check("stale_shm", True, f"no stale entries of dead processes in {shm}"), removed
    return Check("stale_shm", True,
                 f"removed {len(removed)} stale entries from {shm}: {_names(removed)}"), removed


def run_preflight(site: Site, *, scratch: Path | None = None, env: Mapping[str, str] | None = None,
                  paths: NodePaths = NodePaths(), clean_shm: bool = True,
                  affinity: Callable[[], set[int]] | None = None,
                  memlock_kb: Callable[[], int | None] | None = None) -> PreflightReport:
    """Check this node for ``site`` and return every result; never raises for an unfit node.

    Stale shm entries are removed first (``clean_shm=False``: only listed) so the shm
    free-space check sees what this job gets.
    """
    env = os.environ if env is None else env
    pf = site.preflight
    checks: list[Check] = []
    removed: list[str] = []
    stale, removed = _stale_shm_check(paths.shm, clean_shm)
    checks.append(stale)
    try:
        meminfo: dict[str, int] | None = read_meminfo(paths.proc)
    except OSError as exc:
        log.warning("cannot read meminfo: %s", exc)
        meminfo = None
    checks.append(check_shm(paths.shm, meminfo, pf.shm_min_fraction))
    checks.append(check_thp(paths.sys, list(pf.thp_defrag)))
    checks.append(check_max_map_count(paths.proc, pf.min_max_map_count))
    checks.append(check_memlock((memlock_kb or _default_memlock_kb)(), pf.min_memlock_kb))
    checks.append(check_swap(meminfo, pf.require_swap))
    cpu_check, cpus = check_cpus(env, (affinity or _default_affinity)())
    checks.append(cpu_check)
    if scratch is not None:
        checks.append(check_scratch(Path(scratch), site.node.scratch_min_free_gb))
    if site.container.runtime != "none":
        checks.append(check_container(site, env))
    for c in checks:
        if not c.ok:
            log.warning("preflight %s failed: %s", c.name, c.detail)
    return PreflightReport(checks=tuple(checks), cpus=cpus, removed_shm=tuple(removed))
