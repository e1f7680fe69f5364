"""Real containers: Charliecloud's ch-run runs commands in a minimal Debian image built by
containers/build-test-rootfs.sh, through the same launcher and runner a stage uses.

What is checked is what goes wrong on clusters: binds at the same path, the host's /dev/shm,
a clean environment with only what the science needs, the working directory, exit codes,
signals reaching the contained process, output in the step log; and a scaled stage running
its commands in the container under the real local Slurm.

Not skipped quietly: with HPCDDF_REQUIRE_CONTAINER=1 (set by .ci/run) a missing ch-run or
image is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

import hpcddf
from hpcddf.engine.contained import check_image
from hpcddf.engine.containers import make_launcher, spec_for
from hpcddf.engine.runner import Command, RunContext, Step, run_command
from hpcddf.errors import PreflightError, StepFailed

from .conftest import hpcddf as run_hpcddf
from .conftest import read_state, require_image, wait_for

IMAGE = Path(os.environ.get("HPCDDF_TEST_ROOTFS", "/var/cache/hpcddf/test-rootfs"))
IN_IMAGE_ONLY = "/.hpcddf-stamp"  # written by the build script; the host has no such file

PROBE = r"""
import json, os, sys
from pathlib import Path
shm = Path("/dev/shm") / sys.argv[1]
shm.write_text("from the container")
tmp = Path(os.environ["TMPDIR"]) / "probe.tmp"
tmp.write_text("tmp")
st = os.statvfs("/dev/shm")
json.dump({"cwd": os.getcwd(), "env": dict(os.environ), "python": sys.executable,
           "in_image": Path(sys.argv[2]).exists(),
           "catalog": Path(sys.argv[3]).read_text(),
           "shm_bytes": st.f_blocks * st.f_frsize},
          open("probe.json", "w"))
print("probe done")
"""

TRAP = r"""
import signal, sys, time
from pathlib import Path
def on_term(signum, frame):
    Path("got-signal").write_text(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
Path("ready").write_text("1")
time.sleep(120)
"""


@pytest.fixture(scope="module")
def image() -> Path:
    return require_image(IMAGE, "usr/bin/python3", "containers/build-test-rootfs.sh")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A field directory, its scratch and a catalogue directory, as a stage job has them."""
    monkeypatch.setenv("USER", os.environ.get("USER") or "root")
    dirs = {k: tmp_path / k for k in ("field", "scratch", "catalogs")}
    for d in dirs.values():
        d.mkdir()
    (dirs["scratch"] / "tmp").mkdir()
    (dirs["field"] / "logs").mkdir()
    return dirs


def context(node: dict[str, Path], image: Path) -> RunContext:
    spec = spec_for("charliecloud", str(image), None, [], node["field"], node["scratch"],
                    str(node["catalogs"]), node["scratch"] / "tmp", {"SITE_VAR": "site"})
    return RunContext(workdir=node["field"], log_dir=node["field"] / "logs",
                      marker_dir=node["field"] / "done", launcher=make_launcher(spec),
                      env={"OMP_NUM_THREADS": "1"})


def test_binds_shm_env_and_cwd_inside_a_real_container(image, node, monkeypatch):
    monkeypatch.setenv("HOST_ONLY_SECRET", "leak")
    (node["catalogs"] / "cat.txt").write_text("catalogue from the host")
    (node["field"] / "probe.py").write_text(PROBE)
    shm_name = f"hpcddf-probe-{os.getpid()}"
    cmd = Command(("python3", "probe.py", shm_name, IN_IMAGE_ONLY, str(node["catalogs"] / "cat.txt")),
                  "probe.log", env={"STEP_VAR": "step"})
    try:
        run_command(context(node, image), "probe", cmd)
        assert (Path("/dev/shm") / shm_name).read_text() == "from the container"
    finally:
        (Path("/dev/shm") / shm_name).unlink(missing_ok=True)
    got = json.loads((node["field"] / "probe.json").read_text())
    assert got["in_image"] and got["python"] == "/usr/bin/python3"
    assert got["cwd"] == str(node["field"])
    assert got["catalog"] == "catalogue from the host"
    host = os.statvfs("/dev/shm")
    assert got["shm_bytes"] == host.f_blocks * host.f_frsize
    env = got["env"]
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["TMPDIR"] == env["HOME"] == str(node["scratch"] / "tmp")  # casacore needs a HOME
    assert (node["scratch"] / "tmp" / "probe.tmp").read_text() == "tmp"
    assert env["STEP_VAR"] == "step" and env["SITE_VAR"] == "site"
    assert "HOST_ONLY_SECRET" not in env and "VIRTUAL_ENV" not in env
    log = (node["field"] / "logs" / "probe.log").read_text()
    assert '["ch-run"' in log and log.rstrip().endswith("probe done")


def test_the_exit_code_of_the_contained_command_is_the_steps(image, node):
    cmd = Command(("python3", "-c", "import sys; print('about to fail'); sys.exit(7)"), "fail.log")
    with pytest.raises(StepFailed) as err:
        run_command(context(node, image), "fail", cmd)
    assert err.value.returncode == 7 and "about to fail" in err.value.log_tail


def test_a_missing_program_in_the_image_fails_the_step(image, node):
    with pytest.raises(StepFailed) as err:
        run_command(context(node, image), "nope", Command(("DDF.py", "--help"), "nope.log"))
    assert err.value.returncode not in (0, None)


def _hpcddf_copy(dest: Path) -> Path:
    """hpcddf laid out as its wheel installs it (site configs inside the package), for an
    image that gets it on PYTHONPATH instead of installed."""
    from hpcddf import site_configs
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(hpcddf.__file__).parent, dest / "hpcddf", ignore=skip, dirs_exist_ok=True)
    shutil.copytree(Path(site_configs.__file__).parent, dest / "hpcddf" / "site_configs", ignore=skip,
                    dirs_exist_ok=True)
    return dest


def _probe_context(node: dict[str, Path], image: Path, src: Path | None) -> RunContext:
    env = {"PYTHONPATH": str(src)} if src else {}
    spec = spec_for("charliecloud", str(image), None, [str(src)] if src else [], node["field"], node["scratch"],
                    str(node["catalogs"]), node["scratch"] / "tmp", env)
    return RunContext(workdir=node["field"], log_dir=node["field"] / "logs",
                      marker_dir=node["field"] / "done", launcher=make_launcher(spec))


def _steps(*programs: str) -> list[Step]:
    return [Step(name=f"s{i}", stage="x", commands=(Command((p, "--help"), f"s{i}.log"),), outputs=())
            for i, p in enumerate(programs)]


def test_the_image_probe_names_what_the_image_lacks(image, node, tmp_path):
    """Before a stage's first step the node job asks the image (through the stage's own
    launcher) for every program the steps start and for its hpcddf: a missing one, or an
    hpcddf whose sources differ from the job's, stops the stage with the reason and the fix."""
    same = _hpcddf_copy(tmp_path / "same")
    check_image(_probe_context(node, image, same), _steps("python3"), str(image))  # all there
    with pytest.raises(PreflightError, match=r"DDF\.py is not in the image; kMS\.py is not in the image"):
        check_image(_probe_context(node, image, same), _steps("python3", "DDF.py", "kMS.py"), str(image))
    with pytest.raises(PreflightError, match="no Python or no hpcddf in it") as err:
        check_image(_probe_context(node, image, None), _steps("python3"), str(image))
    assert "rebuild the image" in err.value.hint
    older = _hpcddf_copy(tmp_path / "older")
    (older / "hpcddf" / "errors.py").write_text((older / "hpcddf" / "errors.py").read_text() + "\n# older\n")
    with pytest.raises(PreflightError, match=r"the image has hpcddf [0-9.]+ \(\w+\), the job hpcddf"):
        check_image(_probe_context(node, image, older), _steps("python3"), str(image))


def test_signals_reach_the_contained_process(image, node):
    """The runner's stop (walltime, timeout, SIGUSR1) SIGTERMs the command's process group:
    the process inside the container must get it and can clean up."""
    (node["field"] / "trap.py").write_text(TRAP)
    t0 = time.time()
    with pytest.raises(StepFailed, match="timed out"):
        run_command(context(node, image), "trap", Command(("python3", "trap.py"), "trap.log", timeout_s=4))
    assert (node["field"] / "ready").exists()
    assert (node["field"] / "got-signal").read_text() == "15"
    assert time.time() - t0 < 30  # it ended on SIGTERM, not after the 120 s sleep or a SIGKILL grace


CONTAINER_SITE = """
[container]
runtime = "charliecloud"
image = "{image}"
binds = ["{src}"]
env = {{ PYTHONPATH = "{src}" }}
"""


def test_a_scaled_stage_runs_in_the_container_under_slurm(image, tmp_path, slurm_site, monkeypatch):
    """The done-criterion of the containers issue: a stage's commands run inside a real
    Charliecloud container as a real Slurm job, and the products land in the field directory.
    hpcddf itself is given to the image as a bound copy of this source tree on PYTHONPATH
    (the production image installs it). USER is unset on purpose: batch jobs do not always
    carry it, and ch-run refuses to start without it."""
    monkeypatch.delenv("USER", raising=False)
    src = _hpcddf_copy(tmp_path / "src")
    site = slurm_site()
    site.write_text(site.read_text() + CONTAINER_SITE.format(image=image, src=src))
    work = tmp_path / "work"
    run_hpcddf("submit", "F1", "--site-file", str(site), "--pipeline", "scaled",
               "--control-exitafter=dirin", "--pipeline-opt", "seconds=1")

    def finished():
        st = read_state(work, "F1")
        states = {s["state"] for s in st["stages"].values()}
        assert "failed" not in states, json.dumps(st, indent=1)
        return states == {"done"}
    wait_for(finished, 240, "the contained stage to finish")
    outs = sorted(p.name for p in (work / "F1" / "scaled").glob("*.out"))
    assert outs, "no products in the field directory"
    logs = [p for p in (work / "F1" / "logs").glob("*.log") if p.stem + ".out" in outs]
    assert logs
    for log in logs:
        text = log.read_text()
        assert '["ch-run"' in text and "python /usr/bin/python3" in text, text
    assert sys.executable != "/usr/bin/python3"
