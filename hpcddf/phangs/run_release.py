"""The runner of the ``release`` stage of one PHANGS task: copy products into release_root.

Each planned (source, destination) pair is copied to a temporary name beside the destination,
flushed to disk and renamed over it (:func:`copy_atomic`), so a reader of the release directory
sees an old file or the whole new one, never half of one, and a task killed halfway leaves
only whole files. The done marker (the list of released files with their sizes and the
sources' modification times) is written last, the same way: a release without its marker is
incomplete and is simply run again (copying is cheap next to what made the products). When
the marker of an earlier release is there (a task re-run after its marker was kept, e.g. with
new derived products added), a file released from the same, unchanged source (same size and
modification time as the marker records) is not copied again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hpcddf.engine.atomic import atomic_path, write_json_atomic
from hpcddf.phangs.run_common import PhangsRunError, RunContext

MARKER_VERSION = 1


def copy_atomic(src: Path, dst: Path) -> Path:
    """``src`` to ``dst`` through a temporary name in ``dst``'s directory, fsynced, renamed."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    return dst


def _signature(src: Path) -> dict[str, Any]:
    st = src.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _previous(marker: Path) -> dict[str, Any]:
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {f["release"]: f for f in doc.get("files", [])} if isinstance(doc, dict) else {}


def run_release(ctx: RunContext) -> list[str]:
    p = ctx.task.params
    copies = [(Path(src), Path(dst)) for src, dst in p.get("copies", [])]
    if not copies or "marker" not in p:
        raise PhangsRunError(f"task {ctx.task.id} was planned without its release copies",
                             "plan the project again with this version (hpcddf phangs submit)")
    missing = [str(src) for src, _ in copies if not src.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PhangsRunError(f"task {ctx.task.id}: {missing[0]} does not exist{more}",
                             "run the postprocess and derived stages of this target first")
    marker = Path(p["marker"])
    before = _previous(marker)
    Path(p["release_dir"]).mkdir(parents=True, exist_ok=True)
    files, copied = [], 0
    for src, dst in copies:
        sig = _signature(src)
        old = before.get(str(dst), {})
        same = (dst.is_file() and old.get("source") == str(src)
                and {k: old.get(k) for k in sig} == sig and dst.stat().st_size == sig["size"])
        if not same:
            copy_atomic(src, dst)
            copied += 1
        files.append({"release": str(dst), "source": str(src), **sig})
    write_json_atomic(marker, {"version": MARKER_VERSION, "task": ctx.task.id,
                               "target": p["target"], "product": p["product"],
                               "config": p["config"], "files": files})
    ctx.steps["release"] = {"files": len(files), "copied": copied,
                            "release_dir": p["release_dir"]}
    ctx.notes.append(f"released {len(files)} files to {p['release_dir']} "
                     f"({copied} copied, {len(files) - copied} unchanged)")
    return [dst for _, dst in p["copies"]] + [str(marker)]
