"""The base of every error a user can fix (a config key, a dataset file, a model path, ...).

A leaf: no raydetr or third-party imports, so ``raydetr.commands.cli`` catches one type and
prints its message (exit 2, no traceback) without importing torch, Ray or MLflow first.

    class DatasetError(UserError, ValueError): ...
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says what was wrong, where, and what to do."""

    kind = "error"  # how the command line labels it: "<kind>: <message>"
