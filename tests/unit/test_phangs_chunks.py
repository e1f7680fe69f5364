"""Chunked imaging, planned: a cube's channels as chunk tasks of one array plus a gather task.

On the example key set (tests/data/phangs_keys): ngc0628's co21 window is 120 km/s plus 50 km/s
of statwt edge on each side in 2.54 km/s channels, 86 channels, so ``chunksize`` 30 makes 3
chunks. No CASA, no Slurm (the CASA chunks are tested in tests/science/test_phangs_casa.py,
the array on Slurm in tests/integration/test_phangs_chunks_slurm.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpcddf.engine.sites import load_site
from hpcddf.errors import ConfigError
from hpcddf.phangs import plan as P
from hpcddf.phangs.casa_imaging import chunk_range
from hpcddf.phangs.keys import load_project
from hpcddf.phangs.plan_chunks import MARKER, PHASES, array_groups, nominal_nchan
from hpcddf.phangs.run import run_task
from hpcddf.phangs.run_common import PhangsRunError, read_task_state
from hpcddf.phangs.submit import _arrays
from tests.unit.test_phangs_plan import make_ms

DATA = Path(__file__).resolve().parents[1] / "data" / "phangs_keys"
CUBE = "imaging/ngc0628/co21/12m"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    target = tmp_path / "keys"
    shutil.copytree(DATA, target)
    make_ms(target)  # the input data the example keys name
    return target


def set_chunksize(keys: Path, value: int) -> None:
    with open(keys / "config_definitions.txt", "a") as fh:
        fh.write(f"line_product co21 {{'chunksize':{value}}}\n")


def imaging(keys: Path, node_mem_gb: float | None = None) -> list:
    plan = P.plan_project(load_project(keys / "master_key.txt"), node_mem_gb=node_mem_gb)
    return list(next(a for a in plan if a.name == "imaging").tasks)


def test_a_cube_becomes_chunk_tasks_and_a_gather(keys: Path) -> None:
    project = load_project(keys / "master_key.txt")
    assert nominal_nchan(project, "ngc0628", "co21") == 86
    imaging_unchunked = imaging(keys)
    before = {t.id: t for t in imaging_unchunked}
    set_chunksize(keys, 30)
    tasks = imaging(keys)
    ids = {t.id: t for t in tasks}
    phases = [[ids[f"{CUBE}/{phase}{k}"] for k in range(3)] for phase in PHASES]
    chunks = phases[-1]
    assert not any(f"{CUBE}/{phase}3" in ids for phase in PHASES)
    gather = ids[CUBE]
    # the dirty chunks wait for the staged cube, every later phase's chunk for all chunks of
    # the phase before (it works to the whole cube's noise), the gather for the last phase
    before = {t.id: t for t in imaging_unchunked}
    for n, phase in enumerate(phases):
        waits = before[CUBE].depends if n == 0 else tuple(t.id for t in phases[n - 1])
        for k, t in enumerate(phase):
            assert t.depends == waits, t.id
            assert t.params["chunk"] == [k, 3] and t.params["chunk_phase"] == PHASES[n]
            assert t.params["imagename"] == chunks[k].params["imagename"]
            assert t.params["noise_from"] == [c.params["imagename"] for c in chunks]
            assert t.params["recipes"] == before[CUBE].params["recipes"]  # the same recipe
            if n < 2:
                assert t.outputs == [f"{t.params['imagename']}_{PHASES[n]}.image"]
    for c in chunks:
        assert c.outputs == [c.params["marker"]] and c.params["marker"].endswith(MARKER)
        assert Path(c.params["marker"]).parent == Path(c.params["imagename"]).parent
    assert len({Path(c.params["imagename"]).parent for c in chunks}) == 3  # own directories
    assert gather.depends == tuple(c.id for c in chunks)
    assert gather.inputs == [c.params["marker"] for c in chunks]
    assert gather.params["gather"] == [c.params["imagename"] for c in chunks]
    # the cube's products, names and layout are those of the single call
    assert gather.outputs == before[CUBE].outputs
    assert gather.params["imagename"] == before[CUBE].params["imagename"]
    # chunks first, then every cube's own task; the continuum image is never chunked
    assert all("chunk" in t.params for t in tasks[:len(tasks) - len(before)])
    assert [t.id for t in tasks[len(tasks) - len(before):]] == list(before)
    assert not any("chunk" in t.params for t in tasks if "/cont" in t.id or "cont" in t.key[1])
    # postprocess still waits for the cube's task: nothing downstream changes
    full = {t.id: t for t in P.plan_tasks(P.plan_project(load_project(keys / "master_key.txt")))}
    assert CUBE in full["postprocess/ngc0628/co21/12m"].depends


def test_each_cubes_chunks_are_one_array(keys: Path) -> None:
    set_chunksize(keys, 30)
    tasks = imaging(keys)
    groups = array_groups(tasks)
    cubes = sorted({t.key[:3] for t in tasks if "chunk" in t.params})
    assert len(cubes) >= 3 and len(groups) == 3 * len(cubes) + 1
    for g in groups[:-1]:
        assert len({(t.key[:3], t.params["chunk_phase"]) for t in g}) == 1
        assert [t.params["chunk"] for t in g] == [[k, len(g)] for k in range(len(g))]
    assert [g[0].params["chunk_phase"] for g in groups[:-1]] == \
        [phase for phase in PHASES for _ in cubes]
    assert not any("chunk" in t.params for t in groups[-1])
    site = load_site("local")
    arrays = _arrays(site, [("imaging", tasks)], Path("/nowhere"), None)
    assert [len(a.calls) for a in arrays] == [len(g) for g in groups]
    assert [c.task.id for a in arrays for c in a.calls] == [t.id for t in tasks]  # job id order


def test_chunk_ranges_cover_every_channel_once() -> None:
    for nchan in (3, 19, 86, 1000):
        for count in range(1, min(nchan, 12) + 1):
            ranges = [chunk_range(k, count, nchan) for k in range(count)]
            covered = [c for first, n in ranges for c in range(first, first + n)]
            assert covered == list(range(nchan)), (nchan, count)
            assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
    assert [chunk_range(k, 3, 19) for k in range(3)] == [(0, 6), (6, 6), (12, 7)]


def test_chunk_size_from_the_nodes_memory_when_the_recipe_fixes_imsize(keys: Path) -> None:
    # no imsize (dynamic sizing): the image size is unknown when planning: one task per cube
    # (the example override key gives one cube an imsize: without it here)
    (keys / "overrides.txt").write_text("# no overrides\n")
    assert not any("chunk" in t.params for t in imaging(keys, node_mem_gb=0.001))
    for path in (keys / "recipes").glob("*.clean"):
        path.write_text(path.read_text() + "imsize = [1000, 1000]\n")
    # 86 channels x 1000^2 px x 64 B = 5.5 GB: whole on a 64 GB node; in half of a 1 GB
    # node's memory, 12 chunks
    whole = imaging(keys, node_mem_gb=64)
    assert not any("chunk" in t.params for t in whole)
    small = imaging(keys, node_mem_gb=1)
    assert {t.params["chunk"][1] for t in small if t.id.startswith(CUBE + "/")} == {12}
    assert len([t for t in small if t.id.startswith(CUBE + "/")]) == 36
    # a key's chunksize wins over the node's memory
    set_chunksize(keys, 43)
    assert {t.params["chunk"][1] for t in imaging(keys, node_mem_gb=1)
            if t.id.startswith(CUBE + "/")} == {2}


def test_bad_chunk_settings_are_one_line_errors(keys: Path) -> None:
    set_chunksize(keys, -1)
    with pytest.raises(ConfigError, match="chunksize -1 is negative"):
        imaging(keys)
    set_chunksize(keys, 30)
    path = keys / "recipes" / "phangsalma_cube.clean"  # the line products' recipe
    path.write_text(path.read_text() + "nchan = 10\n")
    with pytest.raises(ConfigError) as exc:
        imaging(keys)
    assert str(path) in str(exc.value) and "nchan is set" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_chunk_with_its_done_marker_is_skipped_and_a_gather_needs_them_all(
        keys: Path) -> None:
    """A requeued or resubmitted chunk redoes only itself: one whose marker exists is done
    without CASA; the gather refuses while a chunk's marker is missing."""
    set_chunksize(keys, 30)
    project = load_project(keys / "master_key.txt")
    ids = {t.id: t for t in imaging(keys)}
    work = P.project_work_dir(project)
    done = ids[f"{CUBE}/singlescale1"]
    Path(done.params["marker"]).parent.mkdir(parents=True)
    Path(done.params["marker"]).write_text("{}")
    out = run_task(done, work, casa_env="/no/casa/needed")
    assert out["skipped"] is True
    assert read_task_state(work, done.id)["state"] == "done"
    with pytest.raises(PhangsRunError, match="a chunk is not done: no .*chunk0of3/chunk.done.json"):
        run_task(ids[CUBE], work, casa_env="/no/casa/needed")
    assert read_task_state(work, CUBE)["state"] == "failed"


def test_chunk_and_gather_options_reach_casa_tasks() -> None:
    """What the runner passes (casaenv.casa_argv) is what casa_tasks parses."""
    from hpcddf.phangs.casa_tasks import build_parser
    from hpcddf.phangs.casaenv import CasaEnv, casa_argv

    env = CasaEnv(python=Path("/e/bin/python"), siteconfig=Path("/e/casasiteconfig.py"))
    argv = casa_argv(env, "dirty", vis=["/d/a.ms"], imagename="/d/c/x_chunk1", restfreq_ghz=230.5,
                     chunk="1,3", tclean={"robust": 0.5})
    a = build_parser().parse_args(argv[3:])
    assert (a.stage, a.chunk, a.vis) == ("dirty", "1,3", ["/d/a.ms"])
    argv = casa_argv(env, "multiscale", vis=["/d/a.ms"], imagename="/d/x", chunk=None)
    assert build_parser().parse_args(argv[3:]).chunk is None and "--chunk" not in argv
    argv = casa_argv(env, "gather_chunks", imagename="/d/x", chunk_imagename=["/d/0/a", "/d/1/b"])
    a = build_parser().parse_args(argv[3:])
    assert a.chunk_imagename == ["/d/0/a", "/d/1/b"]
