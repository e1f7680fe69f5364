"""The one node job class: the life every unit's record goes through (attempts, done, failed,
cancelled kept, walltime checkpoint) whatever the pipeline. The walltime kill itself on the real
Slurm is in tests/integration (a reduction stage and a PHANGS task)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from hpcddf.engine.state import State
from hpcddf.engine.unitjob import UnitJob, error_doc
from hpcddf.errors import HpcddfError


class FileJob(UnitJob):
    """A unit whose record is one JSON file and whose work is a callable."""

    def __init__(self, path: str, fail: str | None = None) -> None:
        self.path = path
        self.fail = fail

    def record(self, change: Any, timeout: float | None = None) -> None:
        p = Path(self.path)
        doc = json.loads(p.read_text()) if p.exists() else {}
        change(doc)
        p.write_text(json.dumps(doc))

    def work(self) -> dict[str, Any]:
        self._scratch = object()  # node-only state: must not travel back into the queue
        if self.fail:
            raise HpcddfError(self.fail, "fix it")
        return {"made": 1}

    def done_values(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"products": [result["made"]]}


def _doc(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_each_attempt_is_counted_and_the_outcome_kept(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    path = tmp_path / "unit.json"
    assert FileJob(str(path))() == {"made": 1}
    first = _doc(path)
    assert (first["state"], first["attempts"], first["products"]) == (State.DONE, 1, [1])
    assert first["error"] is None and first["ended"] and first["elapsed_s"] >= 0 and first["host"]
    FileJob(str(path))()
    assert _doc(path)["attempts"] == 2
    # Slurm's restart count wins when a requeue happened before the record said so
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")
    FileJob(str(path))()
    assert _doc(path)["attempts"] == 5


def test_a_failure_is_recorded_with_its_message_and_hint(tmp_path: Path) -> None:
    path = tmp_path / "unit.json"
    with pytest.raises(HpcddfError):
        FileJob(str(path), fail="no MS")()
    doc = _doc(path)
    assert doc["state"] == State.FAILED and doc["error"] == {"message": "no MS", "hint": "fix it"}


def test_a_cancelled_unit_stays_cancelled_when_its_work_then_fails(tmp_path: Path) -> None:
    path = tmp_path / "unit.json"
    job = FileJob(str(path), fail="killed")
    job.begin()
    job.record(lambda s: s.update(state=State.CANCELLED))  # `hpcddf cancel` said so first
    job.failed(error_doc(HpcddfError("killed")))
    assert _doc(path)["state"] == State.CANCELLED


def test_the_walltime_checkpoint_records_the_requeue_and_ships_only_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "unit.json"
    job = FileJob(str(path))
    job.begin()
    job._started -= 60  # the attempt ran a minute before the walltime signal
    again = job.checkpoint()
    assert again.function is job
    doc = _doc(path)
    assert doc["state"] == State.REQUEUED and doc["requeued_at"]
    assert doc["elapsed_s"] >= 60, "the killed attempt's time counts"
    copy = pickle.loads(pickle.dumps(job))
    assert copy.path == str(path) and not hasattr(copy, "_scratch") and not hasattr(copy, "_started")


def test_an_unexpected_error_says_its_type() -> None:
    assert error_doc(KeyError("x")) == {"message": "KeyError: 'x'"}
