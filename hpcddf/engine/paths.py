"""Every file hpcddf keeps beside a unit of work, named in one place.

A unit's directory (a field, a mosaic, a PHANGS project's work dir) holds its products; what the
engine needs to resume it lives under its hidden ``.hpcddf/`` folder: the state, its lock, the
done-markers, the job folders, the frozen configuration. The work root keeps what is shared by
its fields (measured step durations, array job folders). No other module spells these names, so
a change of layout is one change here (as submitit's ``JobPaths`` does for its job folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HIDDEN = ".hpcddf"
STATE_FILE = "state.json"
FROZEN_CONFIG = "pipeline.cfg"
# the frozen configuration as node tools started in the unit's directory see it
FROZEN_CONFIG_REL = f"{HIDDEN}/{FROZEN_CONFIG}"
MARKER_SUFFIX = ".done.json"


@dataclass(frozen=True)
class UnitPaths:
    """The engine's files of one unit of work, under ``<root>/.hpcddf/``."""

    root: Path

    @property
    def hidden(self) -> Path:
        return self.root / HIDDEN

    @property
    def state(self) -> Path:
        return self.hidden / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.hidden / "lock"

    @property
    def done_dir(self) -> Path:
        return self.hidden / "done"

    def marker(self, step: str) -> Path:
        """The done-marker of ``step``: written last, atomically, when the step is done."""
        return self.done_dir / f"{step}{MARKER_SUFFIX}"

    @property
    def jobs(self) -> Path:
        """submitit's folders of the unit's own jobs (and links to its array tasks)."""
        return self.hidden / "jobs"

    @property
    def frozen_config(self) -> Path:
        return self.hidden / FROZEN_CONFIG

    @property
    def redo_log(self) -> Path:
        return self.hidden / "redo.log"

    @property
    def logs(self) -> Path:
        return self.hidden / "logs"

    def sub(self, name: str) -> Path:
        """A folder of a pipeline's own under ``.hpcddf/`` (e.g. PHANGS task states)."""
        return self.hidden / name


def unit_paths(root: Path | str) -> UnitPaths:
    return UnitPaths(Path(root))


def step_of_marker(path: Path) -> str:
    """The step name a done-marker file belongs to."""
    return path.name.removesuffix(MARKER_SUFFIX)


def markers_in(root: Path) -> list[Path]:
    """Every done-marker of the unit at ``root``."""
    return sorted(unit_paths(root).done_dir.glob(f"*{MARKER_SUFFIX}"))


def durations_file(work_root: Path) -> Path:
    """Measured step durations, shared by the fields of a work root."""
    return work_root / HIDDEN / "durations.json"


def arrays_dir(work_root: Path) -> Path:
    """submitit's folders of job arrays that span several fields of a work root."""
    return work_root / HIDDEN / "arrays"


def units_under(parent: Path) -> list[Path]:
    """The unit directories directly under ``parent`` that have a recorded state."""
    return sorted(p.parent.parent for p in parent.glob(f"*/{HIDDEN}/{STATE_FILE}"))
