"""Measurement Set helpers shared by the planner and the node tools: python-casacore's tables
module with the install hint, and ddf-pipeline's observation id of an MS.

A module of its own, importing nothing heavy: the node tools (compress, wide_tool, dynspec,
the simulator) must not pull in the planner, and the planner must not need casacore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcddf.errors import HpcddfError

INSTALL_HINT = "install the science stack: pip install 'hpcddf[science]'"


def casacore_tables(error: type[Exception] = HpcddfError) -> Any:
    """``casacore.tables``, or ``error`` (the calling tool's own error class, so its one-line
    report stays the tool's) naming the missing package and the fix."""
    try:
        from casacore import tables
    except ImportError as exc:
        raise error(f"python-casacore is not installed ({exc}); {INSTALL_HINT}") from None
    return tables


def obsid_of(ms: str | Path) -> str:
    """ddf-pipeline's observation id: the MS file name up to its first underscore."""
    return Path(ms).name.split("_", 1)[0]
