"""Errors of the registry side: what a user can fix, and where.
"""

from __future__ import annotations

from raydetr.artifacts import ModelDirError
from raydetr.errors import UserError


class RegistryError(UserError, RuntimeError):
    """A registry/model problem a user can fix; the message says what and where."""


class RegistryUnavailable(RegistryError):
    """The tracking server does not answer."""


class ModelLoadError(RegistryError, ModelDirError):
    """A model URI or registered artifact that cannot be resolved or loaded (a ModelDirError too,
    so a caller that loads "a model dir or a URI" catches one type)."""
