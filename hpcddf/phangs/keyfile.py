"""Reading one PHANGS key file: its lines and columns, and errors that name ``file:line``.

The line rules every key shares (``#`` comments and blank lines skipped, whitespace or comma
separated columns, the last column optionally taking the rest of the line, literals through
``ast.literal_eval``) and the one kind of error they raise: a ``ConfigError`` naming the line
and the fix (see :mod:`hpcddf.phangs.keys` for why nothing is silently skipped). Used by the
key parsers (:mod:`hpcddf.phangs.keys`, :mod:`hpcddf.phangs.keyreaders`), the project model
(:mod:`hpcddf.phangs.project`), whose lookups fail the same way, and the moment planner
(:mod:`hpcddf.phangs.plan_moments`), which names the moment key line an error comes from.
"""


from __future__ import annotations

import ast
import csv
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

from hpcddf.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Errors and line reading
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Where:
    """A line of a key file: every error names one so the user can go straight to it."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def _fail(where: Where | Path, problem: str, hint: str) -> NoReturn:
    raise ConfigError(f"{where}: {problem}", hint)


def _suggest(name: str, known: Iterable[str], what: str) -> str:
    """A hint naming the closest known name, or listing them when nothing is close."""
    known = list(known)
    best = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if best:
        return f"did you mean {best[0]!r}?"
    return f"use one of the known {what}: {', '.join(known) or '(none)'}"


def _lines(path: Path) -> Iterator[tuple[Where, str]]:
    """The non-blank, non-comment lines of a key file, stripped, with their line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(path, f"cannot read key file ({exc})", "check the path and that it is a text file")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield Where(path, number), line


def _columns(path: Path, columns: tuple[str, ...], rest: bool = False,
             ) -> Iterator[tuple[Where, list[str]]]:
    """Whitespace-separated columns; with ``rest`` the last column takes the rest of the line.

    Reference quirk: a line with the wrong word count is only warned about and skipped; fixed
    here (ConfigError) because the line was meant to do something.
    """
    n = len(columns)
    for where, line in _lines(path):
        words = line.split(None, n - 1) if rest else line.split()
        if len(words) != n:
            _fail(where, f"expected {n} columns ({' '.join(columns)}), got {len(words)}: {line!r}",
                  "fix the line to have exactly these columns, or comment it out with '#'")
        yield where, words


def _csv_rows(path: Path, columns: tuple[str, ...], optional: int = 0,
              ) -> Iterator[tuple[Where, list[str], bool]]:
    """Comma-separated rows (``#`` lines such as an ECSV header skipped); flags the first row.

    The first row may be a column-name header; the caller decides, since only it knows which
    column must be numeric.
    """
    first = True
    for where, line in _lines(path):
        row = [cell.strip() for cell in next(csv.reader([line]))]
        if not len(columns) - optional <= len(row) <= len(columns):
            count = f"{len(columns) - optional} or {len(columns)}" if optional else len(columns)
            _fail(where, f"expected {count} comma-separated columns "
                         f"({','.join(columns)}), got {len(row)}: {line!r}",
                  "fix the line, or comment it out with '#'")
        yield where, row + [""] * (len(columns) - len(row)), first
        first = False


def _float(where: Where, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        _fail(where, f"{what} must be a number, got {text!r}", f"write {what} as e.g. 10.5")


def _literal(where: Where, text: str, kind: type, what: str, example: str) -> Any:
    """A Python literal of type ``kind`` via ``ast.literal_eval`` (never ``eval``)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        _fail(where, f"{what}: cannot read {text!r} as a literal {kind.__name__}",
              f"write a Python literal {kind.__name__}, e.g. {example}")
    if not isinstance(value, kind):
        _fail(where, f"{what} must be a {kind.__name__}, got {type(value).__name__} {value!r}",
              f"write e.g. {example}")
    return value


def _natural(text: str) -> list[Any]:
    """Sort key putting obsnum '2' before '10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
