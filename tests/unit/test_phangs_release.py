"""The PHANGS release stage through the planner and the runner, on small FITS files (no CASA).

The example key set (tests/data/phangs_keys, release_root ../work/release/) with the products
of ngc1087 (7m: co21 and cont) written as tiny FITS files where postprocess and derived would
write them: the release tasks are planned after those stages, copy every product into
release_root/ngc1087/ under its own name (PHANGS' layout), atomically, mark the release done,
and a second run is a skip. A copy that fails midway leaves whole files only and no marker.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from hpcddf.errors import ConfigError
from hpcddf.phangs import plan as P
from hpcddf.phangs import run_release
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.project import Project
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_common import PhangsRunError, read_task_state
from tests.unit.test_phangs_plan import make_ms

DATA = Path(__file__).resolve().parents[1] / "data" / "phangs_keys"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(DATA, target)
    make_ms(target)
    return target


@pytest.fixture
def project(keys: Path) -> Project:
    return load_project(keys / "master_key.txt")


def _write_products(paths: list[str]) -> None:
    """A distinct small FITS image at every path (the value says which file it is)."""
    for i, path in enumerate(paths):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fits.PrimaryHDU(np.full((4, 5), float(i), dtype=np.float32)).writeto(path)


def _release_tasks(project: Project) -> dict[str, P.Task]:
    """Plan the whole project, write what the ngc1087 release tasks copy, then plan the
    release stage alone (which checks those files exist)."""
    full = {t.id: t for t in P.plan_tasks(P.plan_project(project, targets=["ngc1087"]))}
    _write_products([p for t in full.values() if t.stage == "release" for p in t.inputs])
    plan = P.plan_project(project, targets=["ngc1087"], stages=["release"])
    assert [a.name for a in plan] == ["release"]
    return {t.id: t for t in P.plan_tasks(plan)}


def test_release_tasks_are_planned_last_on_what_they_copy(project: Project) -> None:
    tasks = {t.id: t for t in P.plan_tasks(P.plan_project(project, targets=["ngc1087"]))}
    line, cont = tasks["release/ngc1087/co21/7m"], tasks["release/ngc1087/cont/7m"]
    derived = tasks["derived/ngc1087/co21/7m"]
    assert line.depends == ("postprocess/ngc1087/co21/7m", "derived/ngc1087/co21/7m")
    assert cont.depends == ("postprocess/ngc1087/cont/7m",)  # continuum: no derived task
    cube = project.postprocess_dir("ngc1087") / "ngc1087_7m_co21_pbcorr_trimmed_k.fits"
    assert line.inputs == [str(cube), *derived.outputs]
    # moment maps are among them (the derived task was planned in detail for the release)
    assert any(p.endswith("_mom0.fits") for p in line.inputs)
    release_dir = project.target_dir("ngc1087", "release")
    assert release_dir == project.roots["release_root"] / "ngc1087"
    assert line.outputs[:-1] == [str(release_dir / Path(p).name) for p in line.inputs]
    assert line.outputs[-1] == str(release_dir / ".ngc1087_7m_co21.release.json")


def test_release_copies_atomically_marks_and_skips(project: Project, tmp_path: Path) -> None:
    tasks = _release_tasks(project)
    work = tmp_path / "state"
    for task in tasks.values():
        out = run_task(task, work)
        assert out["skipped"] is False and out["products"] == task.outputs
        for src, dst in task.params["copies"]:
            assert Path(dst).parent == project.target_dir("ngc1087", "release")
            assert Path(dst).read_bytes() == Path(src).read_bytes()
        marker = json.loads(Path(task.params["marker"]).read_text())
        assert [f["release"] for f in marker["files"]] == task.outputs[:-1]
        state = read_task_state(work, task.id)
        assert state["state"] == "done" and state["steps"]["release"]["copied"] == len(
            task.params["copies"])
    release_dir = project.target_dir("ngc1087", "release")
    assert not [p for p in release_dir.iterdir() if p.name.endswith(".tmp")]
    # a second run is a skip: nothing is copied again
    for task in tasks.values():
        assert run_task(task, work)["skipped"] is True


def test_a_failed_copy_leaves_whole_files_and_no_marker(
        project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = _release_tasks(project)["release/ngc1087/co21/7m"]
    real, calls = shutil.copyfile, []

    def copy_then_fail(src: str, dst: str) -> str:
        calls.append(dst)
        if len(calls) == 3:
            Path(dst).write_bytes(b"half a file")  # killed while writing the third
            raise OSError("no space left on device")
        return real(src, dst)

    monkeypatch.setattr(run_release.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="no space"):
        run_task(task, tmp_path / "state")
    released = sorted(p.name for p in project.target_dir("ngc1087", "release").iterdir())
    assert released == sorted(Path(dst).name for _, dst in task.params["copies"][:2])
    assert not Path(task.params["marker"]).exists()
    # the rerun completes the release
    monkeypatch.setattr(run_release.shutil, "copyfile", real)
    assert run_task(task, tmp_path / "state")["skipped"] is False
    assert all(Path(p).is_file() for p in task.outputs)


def test_a_missing_product_stops_the_release_with_one_line(project: Project,
                                                           tmp_path: Path) -> None:
    task = _release_tasks(project)["release/ngc1087/co21/7m"]
    Path(task.inputs[-1]).unlink()
    with pytest.raises(PhangsRunError, match="does not exist") as exc:
        run_task(task, tmp_path / "state")
    assert "\n" not in str(exc.value) and not Path(task.params["marker"]).exists()


def test_release_without_release_root(keys: Path) -> None:
    master = keys / "master_key.txt"
    master.write_text("".join(line for line in master.read_text().splitlines(keepends=True)
                              if not line.startswith("release_root")))
    project = load_project(master)
    # the master key asks for no release: the stage plans nothing
    plan = P.plan_project(project, targets=["ngc1087"])
    assert [a.size for a in plan if a.name == "release"] == [0]
    with pytest.raises(ConfigError, match="no release_root is set") as exc:
        P.plan_project(project, targets=["ngc1087"], stages=["release"])
    assert "master_key.txt" in str(exc.value)
