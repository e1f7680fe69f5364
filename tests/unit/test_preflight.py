"""Preflight checks on prepared /proc, /sys and /dev/shm trees in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hpcddf.engine.preflight import (
    Check,
    NodePaths,
    PreflightReport,
    clean_stale_shm,
    find_stale_shm,
    fs_space,
    parse_slurm_cpus,
    pid_alive,
    run_preflight,
)
from hpcddf.engine.sites import ContainerSection, NodeSection, PreflightSection, Site
from hpcddf.errors import PreflightError

THP_MADVISE = "always defer defer+madvise [madvise] never\n"


def make_node(root: Path, *, mem_kb: int = 1024, swap_kb: int = 0, map_count: int | None = 262144,
              thp: str | None = THP_MADVISE) -> NodePaths:
    """A fake node: meminfo, max_map_count and THP defrag files, and an empty shm directory.

    MemTotal defaults to 1 MB so that any real directory passes the shm size check.
    """
    proc, sys_, shm = root / "proc", root / "sys", root / "shm"
    (proc / "sys" / "vm").mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {mem_kb} kB\nMemFree:        {mem_kb // 2} kB\n"
        f"HugePages_Total:       0\nSwapTotal:      {swap_kb} kB\nSwapFree:       {swap_kb} kB\n")
    if map_count is not None:
        (proc / "sys" / "vm" / "max_map_count").write_text(f"{map_count}\n")
    thp_dir = sys_ / "kernel" / "mm" / "transparent_hugepage"
    thp_dir.mkdir(parents=True)
    if thp is not None:
        (thp_dir / "defrag").write_text(thp)
    shm.mkdir()
    return NodePaths(proc=proc, sys=sys_, shm=shm)


def make_site(*, container: ContainerSection | None = None, min_free_gb: float = 0.0,
              **preflight: object) -> Site:
    return Site(name="test", path="test.toml",
                node=NodeSection(cpus=4, mem_gb=4, scratch_min_free_gb=min_free_gb),
                preflight=PreflightSection(**preflight),  # type: ignore[arg-type]
                container=container or ContainerSection())


def run(site: Site, paths: NodePaths, *, env: dict[str, str] | None = None,
        cpus: set[int] | None = None, memlock: int | None = None, **kw: object) -> PreflightReport:
    return run_preflight(site, paths=paths, env={} if env is None else env,
                         affinity=lambda: {0, 1, 2, 3} if cpus is None else cpus,
                         memlock_kb=lambda: memlock, **kw)  # type: ignore[arg-type]


def by_name(report: PreflightReport, name: str) -> Check:
    (check,) = [c for c in report.checks if c.name == name]
    return check


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


# ------------------------------------------------------------------------- the whole run

def test_fit_node_passes_and_reports_every_check(tmp_path: Path) -> None:
    report = run(make_site(), make_node(tmp_path), scratch=tmp_path / "scratch")
    assert report.ok, report.text()
    assert report.failed() == ()
    assert [c.name for c in report.checks] == [
        "stale_shm", "shm", "thp", "max_map_count", "memlock", "swap", "cpus", "scratch"]
    assert len(report.text().splitlines()) == len(report.checks)
    assert report.cpus == (0, 1, 2, 3)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["cpus"] == [0, 1, 2, 3]
    assert {c["name"] for c in data["checks"]} >= {"shm", "cpus"}
    report.raise_if_failed()


def test_unfit_node_names_each_failed_check_with_its_fix(tmp_path: Path) -> None:
    paths = make_node(tmp_path, mem_kb=2**40, map_count=65530, thp="always [defer] never\n")
    site = make_site(shm_min_fraction=0.9, thp_defrag=["never"], min_max_map_count=1_000_000,
                     min_memlock_kb=65536, require_swap=True)
    report = run(site, paths, memlock=8192)
    assert not report.ok
    assert {c.name for c in report.failed()} == {"shm", "thp", "max_map_count", "memlock", "swap"}
    text = report.text()
    for c in report.failed():
        assert c.fix
        assert f"FAIL {c.name}: {c.detail} (fix: {c.fix})" in text.splitlines()
    with pytest.raises(PreflightError) as exc:
        report.raise_if_failed()
    assert "max_map_count" in str(exc.value)
    assert "sysctl -w vm.max_map_count=1000000" in str(exc.value)


def test_default_memlock_and_affinity_are_read_from_this_process(tmp_path: Path) -> None:
    report = run_preflight(make_site(), env={}, paths=make_node(tmp_path), clean_shm=False)
    assert by_name(report, "memlock").ok
    assert set(report.cpus) == os.sched_getaffinity(0)


# ------------------------------------------------------------------------------------ shm

def test_shm_mount_smaller_than_required_fraction_of_ram(tmp_path: Path) -> None:
    paths = make_node(tmp_path, mem_kb=2**40)  # 1 PiB of RAM: no directory here is that big
    check = by_name(run(make_site(shm_min_fraction=0.5), paths), "shm")
    assert not check.ok
    assert check.fix == f"ask your admin: mount -o remount,size={2**19}g {paths.shm}"


def test_shm_big_enough_but_too_full(tmp_path: Path) -> None:
    """Another process's 16 MiB in shm: RAM of the mount's size less 8 MiB fits the mount but
    not its free space, whatever else the file system holds (free <= total - 16 MiB while the
    file is there; random bytes, so that no file system stores them in less)."""
    used = 2**24
    total, _ = fs_space(tmp_path)
    paths = make_node(tmp_path, mem_kb=(total - used // 2) // 1024)
    with open(paths.shm / "other-process.bin", "wb") as f:
        f.write(os.urandom(used))
        f.flush()
        os.fsync(f.fileno())
    check = by_name(run(make_site(shm_min_fraction=1.0), paths), "shm")
    assert not check.ok, check
    assert "other processes use" in (check.fix or ""), check


def test_shm_missing(tmp_path: Path) -> None:
    paths = make_node(tmp_path)
    paths.shm.rmdir()
    check = by_name(run(make_site(), paths), "shm")
    assert not check.ok and "does not exist" in check.detail


# ------------------------------------------------------------------- THP, maps, memlock, swap

@pytest.mark.parametrize("content, ok", [
    ("always defer defer+madvise madvise [never]\n", True),
    (THP_MADVISE, True),
    ("[always] defer defer+madvise madvise never\n", False),
    (None, True),  # kernel without transparent huge pages
])
def test_thp_defrag(tmp_path: Path, content: str | None, ok: bool) -> None:
    check = by_name(run(make_site(), make_node(tmp_path, thp=content)), "thp")
    assert check.ok is ok, check
    if not ok:
        assert "echo never > /sys/kernel/mm/transparent_hugepage/defrag" in (check.fix or "")
        assert "'always'" in check.detail


@pytest.mark.parametrize("value, ok", [(65530, False), (262144, True), (10**6, True)])
def test_max_map_count(tmp_path: Path, value: int, ok: bool) -> None:
    check = by_name(run(make_site(min_max_map_count=262144), make_node(tmp_path, map_count=value)),
                    "max_map_count")
    assert check.ok is ok
    assert ok or check.fix and "sysctl -w vm.max_map_count=262144" in check.fix


def test_max_map_count_unreadable_fails_only_when_required(tmp_path: Path) -> None:
    paths = make_node(tmp_path, map_count=None)
    assert not by_name(run(make_site(min_max_map_count=65530), paths), "max_map_count").ok
    assert by_name(run(make_site(min_max_map_count=0), paths), "max_map_count").ok


@pytest.mark.parametrize("limit, ok", [(8192, False), (65536, True), (None, True)])
def test_memlock(tmp_path: Path, limit: int | None, ok: bool) -> None:
    check = by_name(run(make_site(min_memlock_kb=65536), make_node(tmp_path), memlock=limit),
                    "memlock")
    assert check.ok is ok
    assert ("unlimited" in check.detail) is (limit is None)


@pytest.mark.parametrize("swap_kb, required, ok", [(0, True, False), (100 * 2**20, True, True),
                                                   (0, False, True)])
def test_swap(tmp_path: Path, swap_kb: int, required: bool, ok: bool) -> None:
    check = by_name(run(make_site(require_swap=required), make_node(tmp_path, swap_kb=swap_kb)),
                    "swap")
    assert check.ok is ok


# ------------------------------------------------------------------------------------ cpus

@pytest.mark.parametrize("value, expected", [
    ("24(x2),12", [24, 24, 12]),
    ("32", [32]),
    ("4(x3)", [4, 4, 4]),
    (" 8 , 2(x1)", [8, 2]),
])
def test_parse_slurm_cpus(value: str, expected: list[int]) -> None:
    assert parse_slurm_cpus(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "24(x)", "24(2)", "4(x0)", "24,,12", "-1", "4x3"])
def test_parse_slurm_cpus_rejects_bad_text(value: str) -> None:
    with pytest.raises(ValueError):
        parse_slurm_cpus(value)


@pytest.mark.parametrize("env, affinity, ok, cpus", [
    ({}, {3, 1}, True, (1, 3)),                                          # outside Slurm
    ({"SLURM_CPUS_ON_NODE": "4"}, {4, 5, 6, 7}, True, (4, 5, 6, 7)),   # a subset of cores
    ({"SLURM_CPUS_ON_NODE": "4"}, {0, 1}, False, (0, 1)),               # bound to fewer
    ({"SLURM_JOB_CPUS_PER_NODE": "2(x2)"}, set(range(8)), True, (0, 1)),  # unconfined: first 2
    ({"SLURM_JOB_CPUS_PER_NODE": "24(x2),12"}, set(range(24)), True, tuple(range(24))),
    ({"SLURM_CPUS_ON_NODE": "many"}, {0}, False, (0,)),
    ({"SLURM_CPUS_ON_NODE": "2"}, set(), False, ()),
])
def test_cpus(tmp_path: Path, env: dict[str, str], affinity: set[int], ok: bool,
              cpus: tuple[int, ...]) -> None:
    report = run(make_site(), make_node(tmp_path), env=env, cpus=affinity)
    check = by_name(report, "cpus")
    assert check.ok is ok, check
    assert report.cpus == cpus
    assert ok or check.fix


# --------------------------------------------------------------------------------- scratch

def test_scratch_free_space(tmp_path: Path) -> None:
    paths = make_node(tmp_path)
    not_yet_made = tmp_path / "scratch" / "job-1"
    assert by_name(run(make_site(min_free_gb=0.001), paths, scratch=not_yet_made), "scratch").ok
    check = by_name(run(make_site(min_free_gb=1e12), paths, scratch=not_yet_made), "scratch")
    assert not check.ok and "scratch_dir" in (check.fix or "")


def test_no_scratch_no_check(tmp_path: Path) -> None:
    assert "scratch" not in {c.name for c in run(make_site(), make_node(tmp_path)).checks}


# ------------------------------------------------------------------------------- container

def fake_runtime(tmp_path: Path) -> Path:
    exe = tmp_path / "bin" / "apptainer"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return exe


def test_container_found_by_path_and_image_readable(tmp_path: Path) -> None:
    exe = fake_runtime(tmp_path)
    image = tmp_path / "ddf.sif"
    image.write_bytes(b"SIF")
    site = make_site(container=ContainerSection(runtime="apptainer", image=str(image)))
    check = by_name(run(site, make_node(tmp_path), env={"PATH": str(exe.parent)}), "container")
    assert check.ok, check
    assert str(exe) in check.detail


def test_container_missing_runtime_and_image(tmp_path: Path) -> None:
    site = make_site(container=ContainerSection(runtime="apptainer",
                                                image=str(tmp_path / "missing.sif")))
    check = by_name(run(site, make_node(tmp_path), env={"PATH": str(tmp_path / "nothing")}),
                    "container")
    assert not check.ok
    assert "apptainer not found" in check.detail and "missing.sif" in check.detail
    assert check.fix and "executable" in check.fix


def test_container_image_kind_depends_on_runtime(tmp_path: Path) -> None:
    exe = fake_runtime(tmp_path)
    image_dir = tmp_path / "ddf-image"
    image_dir.mkdir()
    paths = make_node(tmp_path)
    apptainer = make_site(container=ContainerSection(runtime="apptainer", executable=str(exe),
                                                     image=str(image_dir)))
    assert not by_name(run(apptainer, paths), "container").ok
    charlie = make_site(container=ContainerSection(runtime="charliecloud", executable=str(exe),
                                                   image=str(image_dir)))
    assert by_name(run(charlie, paths), "container").ok


def test_no_container_no_check(tmp_path: Path) -> None:
    assert "container" not in {c.name for c in run(make_site(), make_node(tmp_path)).checks}


# ------------------------------------------------------------------------------- stale shm

def shm_entries(shm: Path, pid: int) -> list[str]:
    """The names DDFacet/killMS leave for ``pid``: a directory, arrays, semaphores, a dict."""
    names = [f"ddf.{pid}", f"ddf.{pid}.DATA:chunk_0", f"sem.ddf.{pid}.lock", f"{pid}.Grid",
             f"shared_dict:{pid}"]
    (shm / names[0]).mkdir()
    (shm / names[0] / "array").write_bytes(b"x")
    (shm / names[4]).mkdir()
    for name in names[1:4]:
        (shm / name).write_bytes(b"x")
    return names


def test_clean_stale_shm_removes_only_dead_processes_entries(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    dead = shm_entries(shm, dead_pid())
    live = shm_entries(shm, os.getpid())
    unrelated = ["psm_shm.1", "sem.other", "ddf.notapid"]
    for name in unrelated:
        (shm / name).write_bytes(b"x")
    assert sorted(p.name for p in find_stale_shm(shm, os.getuid(), pid_alive)) == sorted(dead)
    removed = clean_stale_shm(shm, os.getuid(), pid_alive)
    assert sorted(removed) == sorted(dead)
    assert sorted(p.name for p in shm.iterdir()) == sorted(live + unrelated)


def test_clean_stale_shm_never_touches_other_users_entries(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    dead = shm_entries(shm, dead_pid())
    # as another user, every entry here belongs to someone else
    assert clean_stale_shm(shm, os.getuid() + 1, pid_alive) == []
    if os.geteuid() == 0:  # root can give an entry away and check it is left alone
        os.chown(shm / dead[3], 12345, 12345)
        removed = clean_stale_shm(shm, os.getuid(), pid_alive)
        assert sorted(removed) == sorted(set(dead) - {dead[3]})
        assert [p.name for p in shm.iterdir()] == [dead[3]]


def test_preflight_cleans_shm_and_reports_it(tmp_path: Path) -> None:
    paths = make_node(tmp_path)
    dead = shm_entries(paths.shm, dead_pid())
    live = shm_entries(paths.shm, os.getpid())

    kept = run(make_site(), paths, clean_shm=False)  # only lists them
    assert kept.removed_shm == ()
    listed = by_name(kept, "stale_shm")
    assert listed.ok and "not removed" in listed.detail
    assert f"{len(dead)} stale entries" in listed.detail
    assert len(list(paths.shm.iterdir())) == len(dead + live)

    report = run(make_site(), paths)
    assert sorted(report.removed_shm) == sorted(dead)
    check = by_name(report, "stale_shm")
    assert check.ok and f"removed {len(dead)} stale entries" in check.detail
    assert sorted(p.name for p in paths.shm.iterdir()) == sorted(live)


def test_a_zombie_is_not_alive() -> None:
    """A killed job whose parent died stays a zombie where init does not reap orphans."""
    import subprocess
    import time

    from hpcddf.engine.preflight import pid_alive
    child = subprocess.Popen(["true"])
    try:
        for _ in range(100):  # until it has exited (and, unreaped, become a zombie)
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                break
            time.sleep(0.02)
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid)
    import os
    assert pid_alive(os.getpid())
