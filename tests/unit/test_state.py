"""Field state: one JSON file per field, updated under a lock and replaced atomically."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from hpcddf.engine.state import (
    STATE_VERSION,
    empty_state,
    find_fields,
    locked,
    read_state,
    state_path,
    update_state,
)
from hpcddf.errors import FieldError

WRITERS = 20


def test_no_state_yet(tmp_path: Path):
    assert read_state(tmp_path / "L1") is None
    assert not (tmp_path / "L1").exists()


def test_empty_state_shape():
    st = empty_state("L1")
    assert st["version"] == STATE_VERSION and st["field"] == "L1"
    assert st["submissions"] == [] and st["stages"] == {} and st["steps"] == {}
    assert st["site"] is None


def test_update_creates_and_changes_state(tmp_path: Path):
    wd = tmp_path / "L1"
    st = update_state(wd, "L1", lambda s: s.update(site="spider"))
    assert state_path(wd) == wd / ".hpcddf" / "state.json"
    on_disk = json.loads(state_path(wd).read_text())
    assert on_disk == st and on_disk["site"] == "spider" and on_disk["field"] == "L1"
    created = on_disk["created"]
    update_state(wd, "L1", lambda s: s["submissions"].append({"job": 1}))
    again = read_state(wd)
    assert again["site"] == "spider" and again["submissions"] == [{"job": 1}]
    assert again["created"] == created
    assert sorted(p.name for p in (wd / ".hpcddf").iterdir()) == ["lock", "state.json"]


def test_failed_change_writes_nothing(tmp_path: Path):
    wd = tmp_path / "L1"
    update_state(wd, "L1", lambda s: s.update(site="a"))
    before = state_path(wd).read_bytes()

    def bad(s):
        s["site"] = "half-done"
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        update_state(wd, "L1", bad)
    assert state_path(wd).read_bytes() == before
    # and the lock was released: a second update does not hang
    update_state(wd, "L1", lambda s: s.update(site="b"))
    assert read_state(wd)["site"] == "b"


def test_corrupt_state_is_a_clear_error(tmp_path: Path):
    path = state_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"field": "L1", ')
    with pytest.raises(FieldError, match="is corrupt") as info:
        read_state(tmp_path)
    assert str(path) in str(info.value) and "move it aside" in str(info.value)


def test_find_fields(tmp_path: Path):
    for fid in ("L2", "L1"):
        update_state(tmp_path / fid, fid, lambda s: None)
    (tmp_path / "L3").mkdir()  # never submitted
    assert find_fields(tmp_path) == [tmp_path / "L1", tmp_path / "L2"]
    assert find_fields(tmp_path / "missing") == []


def _hold_lock(wd: str, held: "multiprocessing.synchronize.Event", release) -> None:
    with locked(Path(wd)):
        held.set()
        release.wait(10)


def test_lock_excludes_other_processes(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), held, release))
    proc.start()
    try:
        assert held.wait(10)
        done = threading.Event()

        def writer():
            update_state(tmp_path, "L1", lambda s: s.update(site="x"))
            done.set()
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        assert not done.wait(0.3), "update_state did not wait for the lock"
        assert read_state(tmp_path) is None
        release.set()
        assert done.wait(10)
        assert read_state(tmp_path)["site"] == "x"
    finally:
        release.set()
        proc.join(10)


def _append(wd: str, i: int, start) -> None:
    start.wait(10)

    def change(state):
        entries = list(state.setdefault("entries", []))
        time.sleep(0.005)  # widen the read-modify-write window: unlocked writers would lose updates
        state["entries"] = entries + [i]
    update_state(Path(wd), "L1", change)


def test_concurrent_updates_lose_nothing_and_file_is_always_valid(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_append, args=(str(tmp_path), i, start)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    path = state_path(tmp_path)
    bad: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader():  # lock-free reader, as `hpcddf status` is
        nonlocal reads
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                json.loads(text)
                reads += 1
            except json.JSONDecodeError:
                bad.append(text)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    start.set()
    for p in procs:
        p.join(30)
    stop.set()
    t.join(5)
    assert all(p.exitcode == 0 for p in procs)
    assert bad == []
    assert reads > 0
    st = read_state(tmp_path)
    assert sorted(st["entries"]) == list(range(WRITERS))
    leftovers = [p.name for p in path.parent.iterdir() if p.name not in ("lock", "state.json")]
    assert leftovers == []  # no temporary files left behind
