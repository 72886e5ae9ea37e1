"""Exceptions raised by nidask.

Every error about a file names that file and the problem, so a message can be shown
to a user as is.
"""

from __future__ import annotations

import os


class NidaskError(Exception):
    """Base class of every error nidask raises on purpose."""


class InputError(NidaskError, ValueError):
    """An input file or value is missing, unreadable or inconsistent.

    Parameters
    ----------
    problem : str
        What is wrong, as a sentence fragment.
    path : path-like, optional
        The file the problem is about; it leads the message.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


class OutputError(NidaskError, OSError):
    """An output cannot be written (missing or read-only directory, disk full, ...)."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        NidaskError.__init__(self, problem if path is None else f"{self.path}: {problem}")

    def __str__(self) -> str:
        return self.problem if self.path is None else f"{self.path}: {self.problem}"
