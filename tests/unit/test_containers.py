"""The container launchers: exact argv for Apptainer/Singularity (built with spython's helpers)
and Charliecloud: binds at the same path, host /dev/shm, a clean environment with what the
science needs, the field directory as working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcddf.engine.containers import (
    ContainerSpec,
    default_executable,
    make_launcher,
    spec_for,
)
from hpcddf.engine.runner import Command
from hpcddf.errors import SiteError

CMD = Command(("DDF.py", "--Data-MS=mslist.txt"), "x.log", env={"DDF_EXTRA": "1"})


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """The node's directories: field, scratch, catalogues, a site bind (spython checks they exist)."""
    for d in ("fields/L1", "scratch/L1.42/tmp", "catalogs", "project/cats"):
        (tmp_path / d).mkdir(parents=True)
    return tmp_path


def spec(root: Path, runtime: str, executable: str | None = None) -> ContainerSpec:
    return spec_for(runtime, "/images/hpcddf.sif", executable,
                    [str(root / "project/cats"), str(root / "fields/L1")], root / "fields/L1",
                    root / "scratch/L1.42", str(root / "catalogs"), root / "scratch/L1.42/tmp")


def env(root: Path) -> list[str]:
    return sorted(["OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1", "MKL_NUM_THREADS=1",
                   f"TMPDIR={root}/scratch/L1.42/tmp", "DDF_EXTRA=1"])


def test_apptainer_argv(node):
    r = str(node)
    argv = make_launcher(spec(node, "apptainer"))(CMD, node / "fields/L1")
    assert argv == ["apptainer", "exec", "--cleanenv", "--pwd", f"{r}/fields/L1",
                    "--bind", f"{r}/fields/L1", "--bind", f"{r}/scratch/L1.42", "--bind", f"{r}/catalogs",
                    "--bind", f"{r}/project/cats", "--bind", "/dev/shm",
                    *[x for e in env(node) for x in ("--env", e)],
                    "/images/hpcddf.sif", "DDF.py", "--Data-MS=mslist.txt"]


def test_singularity_and_a_full_path_executable(node):
    argv = make_launcher(spec(node, "singularity", "/opt/sing/bin/singularity"))(CMD, node / "fields/L1")
    assert argv[:3] == ["/opt/sing/bin/singularity", "exec", "--cleanenv"]
    assert argv[-3:] == ["/images/hpcddf.sif", "DDF.py", "--Data-MS=mslist.txt"]


def test_charliecloud_argv(node):
    r = str(node)
    argv = make_launcher(spec(node, "charliecloud"))(CMD, node / "fields/L1")
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    home = f"HOME={r}/scratch/L1.42/tmp"  # casacore needs one; the stage's TMPDIR, never the host's
    assert argv == ["ch-run", "--unset-env=*", *[f"--set-env={e}" for e in sorted([*env(node), path, home])],
                    "-b", f"{r}/fields/L1:{r}/fields/L1", "-b", f"{r}/scratch/L1.42:{r}/scratch/L1.42",
                    "-b", f"{r}/catalogs:{r}/catalogs", "-b", f"{r}/project/cats:{r}/project/cats",
                    "-b", "/dev/shm:/dev/shm", f"--cd={r}/fields/L1", "/images/hpcddf.sif", "--",
                    "DDF.py", "--Data-MS=mslist.txt"]


def test_a_missing_bind_path_is_a_clear_error_not_an_exit(node):
    (node / "catalogs").rmdir()
    with pytest.raises(SiteError, match="catalogs does not exist on this node"):
        make_launcher(spec(node, "apptainer"))(CMD, node / "fields/L1")


def test_the_step_env_wins_and_nothing_else_from_the_host_leaks(node, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/host/evil.so")
    cmd = Command(("kMS.py",), "k.log", env={"OMP_NUM_THREADS": "4"})
    argv = make_launcher(spec(node, "charliecloud"))(cmd, node / "fields/L1")
    assert "--set-env=OMP_NUM_THREADS=4" in argv and "--set-env=OMP_NUM_THREADS=1" not in argv
    assert not any("LD_PRELOAD" in a for a in argv)


def test_bad_runtime_or_missing_image_is_a_clear_error():
    with pytest.raises(SiteError, match="no launcher"):
        make_launcher(ContainerSpec("docker", "img", "docker"))
    with pytest.raises(SiteError, match="needs an image"):
        spec_for("apptainer", None, None, [], Path("/f"), Path("/s"), None, Path("/s/tmp"))
    assert default_executable("charliecloud") == "ch-run"


def test_site_env_reaches_the_container_but_tmpdir_stays_on_scratch(node):
    s = spec_for("charliecloud", "/img", None, [], node / "fields/L1", node / "scratch/L1.42",
                 None, node / "scratch/L1.42/tmp",
                 {"PYTHONPATH": "/opt/src", "PATH": "/opt/bin:/usr/bin", "TMPDIR": "/host/tmp"})
    argv = make_launcher(s)(CMD, node / "fields/L1")
    assert "--set-env=PYTHONPATH=/opt/src" in argv and "--set-env=PATH=/opt/bin:/usr/bin" in argv
    assert f"--set-env=TMPDIR={node}/scratch/L1.42/tmp" in argv
    assert not any(a.startswith("--set-env=PATH=/usr/local") or "/host/tmp" in a for a in argv)


def test_a_bind_inside_another_bind_is_covered_by_it(node):
    s = spec_for("apptainer", "/img", None, [str(node)], node / "fields/L1", node / "scratch/L1.42",
                 str(node / "catalogs"), node / "scratch/L1.42/tmp")
    assert s.bind_paths() == [str(node), "/dev/shm"]


def test_a_charliecloud_image_without_a_mount_point_is_refused_before_running(node):
    image = node / "image"
    (image / "project").mkdir(parents=True)
    ok = ContainerSpec("charliecloud", str(image), "ch-run", binds=("/project", "/tmp/x/field"))
    make_launcher(ok)  # /project is in the image, /tmp is the host's inside ch-run
    bad = ContainerSpec("charliecloud", str(image), "ch-run", binds=("/project", "/work/L1"))
    with pytest.raises(SiteError, match="no mount point for /work/L1"):
        make_launcher(bad)
    # Apptainer creates its mount points itself
    make_launcher(ContainerSpec("apptainer", str(image), "apptainer", binds=("/work/L1",)))


def test_a_scratch_tmpdir_too_long_for_unix_sockets_gets_a_short_link(tmp_path):
    """PyBDSF's multiprocessing Manager puts a socket in TMPDIR/pymp-*/listener-*: a Unix
    socket path has at most 107 characters, and a scratch under a deep directory (pytest's, a
    site's /scratch/<project>/<user>/<job>/...) exceeds it. The commands get a short link in
    /tmp to the same directory instead, removed at the unit's end."""
    import multiprocessing

    from hpcddf.engine.contained import SOCKET_SAFE_TMPDIR, drop_short_tmpdir, short_tmpdir
    short = tmp_path / "t"
    assert short_tmpdir(short) == short or len(str(short)) > SOCKET_SAFE_TMPDIR
    deep = tmp_path / ("d" * 60) / "scratch" / "12345678" / "L123456.12345678" / "tmp"
    deep.mkdir(parents=True)
    assert len(f"{deep}/pymp-12345678/listener-12345678") > 107  # the socket could not be made there
    link = short_tmpdir(deep)
    assert len(str(link)) <= SOCKET_SAFE_TMPDIR and link.resolve() == deep.resolve()
    assert short_tmpdir(deep) == link  # the same link again, not another
    ctx = multiprocessing.get_context("fork")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(link)
    try:
        import tempfile
        tempfile.tempdir = None
        with ctx.Manager() as manager:  # what failed with the long path
            assert list(manager.list([1, 2])) == [1, 2]
    finally:
        os.environ.pop("TMPDIR") if old is None else os.environ.__setitem__("TMPDIR", old)
        tempfile.tempdir = None
    drop_short_tmpdir(deep)
    assert not link.exists() and not link.is_symlink() and deep.is_dir()
