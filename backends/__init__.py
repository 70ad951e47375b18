"""Backend lookup: the built-in table, then the `pkisvc.backends` entry-point group."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from pkisvc.backends.base import Backend
from pkisvc.errors import ConfigError
from pkisvc.settings import Settings

ENTRY_POINT_GROUP = "pkisvc.backends"
BUILTIN = {
    "files": ("pkisvc.backends.files:FilesBackend", None),
    "vault": ("pkisvc.backends.vault:VaultBackend", "vault"),
}

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "Backend", "backend_class", "load_backend"]


def backend_class(name: str) -> Any:
    """Return the backend class registered under name.

    Raises: ConfigError for an unknown name or a missing optional dependency.
    """
    if name in BUILTIN:
        target, extra = BUILTIN[name]
        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            hint = f" (pip install 'pkisvc[{extra}]')" if extra else ""
            raise ConfigError(f"backend {name!r} cannot be loaded: {e}{hint}") from None
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as e:
                raise ConfigError(f"backend {name!r} ({ep.value}) cannot be loaded: {e}") from None
    known = sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
    raise ConfigError(f"setting 'backend': unknown backend {name!r} (known: {', '.join(known)})")


def load_backend(settings: Settings, name: str | None = None) -> Backend:
    """Build the backend the settings name (or `name`)."""
    backend: Backend = backend_class(name or settings.backend).from_settings(settings)
    return backend
