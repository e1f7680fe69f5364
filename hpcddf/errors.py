"""Errors a user can fix, each printed by the CLI as one line with its fix, and exit codes.

Everything raised on purpose derives from :class:`HpcddfError`; the CLI is the only place that
turns these into exit codes, so library code never calls ``sys.exit``.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    CONFIG = 2
    SUBMIT = 3
    PREFLIGHT = 4
    INTERRUPTED = 130


class HpcddfError(Exception):
    """A problem the user can fix: a message naming it and, where there is one, the fix."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.hint})" if self.hint else self.message


class ConfigError(HpcddfError):
    """A pipeline .cfg file or command-line override is wrong."""

    exit_code = ExitCode.CONFIG


class SiteError(HpcddfError):
    """A site config (cluster description) is missing or wrong."""

    exit_code = ExitCode.CONFIG


class FieldError(HpcddfError):
    """A field id, field directory or its measurement sets are wrong."""

    exit_code = ExitCode.CONFIG


class PlanError(HpcddfError):
    """The reduction cannot be split into stages with these inputs."""

    exit_code = ExitCode.CONFIG


class SubmissionError(HpcddfError):
    """The scheduler refused a job or could not be reached."""

    exit_code = ExitCode.SUBMIT


class RunInterrupted(HpcddfError):
    """A foreground local run was interrupted (Ctrl-C, SIGTERM, SIGHUP); its jobs were stopped."""

    exit_code = ExitCode.INTERRUPTED


class PreflightError(HpcddfError):
    """A node is unfit to run DDFacet: the report names every failed check."""

    exit_code = ExitCode.PREFLIGHT


class StagingError(HpcddfError):
    """Node-local scratch cannot be set up, or files cannot be copied to or from it."""


class StepFailed(HpcddfError):
    """A science command of a step failed; carries what the field state records."""

    def __init__(self, step: str, argv: list[str], returncode: int | None, log_tail: str,
                 log_path: str | None = None, reason: str | None = None) -> None:
        why = reason or f"exit code {returncode}"
        super().__init__(f"step {step} failed: {argv[0] if argv else '?'} ({why})",
                         f"see the log {log_path}" if log_path else None)
        self.step = step
        self.argv = argv
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_path = log_path


class SurveyError(HpcddfError):
    """A survey's database, pointings or settings cannot be used as given."""

    exit_code = ExitCode.CONFIG
