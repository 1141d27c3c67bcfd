"""Errors a user can act on: each names the fix and carries a distinct exit status for scripts and the manifest."""

from __future__ import annotations


class WsiError(Exception):
    """Base of every error the pipeline reports to a user (never a traceback)."""

    exit_code = 1
    kind = "error"


class SlideNotFoundError(WsiError):
    exit_code = 3
    kind = "slide-not-found"


class SlideUnreadableError(WsiError):
    exit_code = 4
    kind = "slide-unreadable"


class SlideTruncatedError(WsiError):
    exit_code = 5
    kind = "slide-truncated"


class MissingMppError(WsiError):
    exit_code = 6
    kind = "missing-mpp"


class ConfigError(WsiError):
    exit_code = 7
    kind = "bad-config"


class NoTissueError(WsiError):
    exit_code = 8
    kind = "no-tissue"


class OutputError(WsiError):
    exit_code = 9
    kind = "output"
