"""A minimal stand-in for ``ml_collections.ConfigDict``, for images without ml_collections (the GPU image).

Only what the config files and ``lit_jax`` use: nested attribute / item access, ``in``, ``get``, ``keys`` /
``items`` / ``values``, ``to_dict``, ``copy_and_resolve_references`` and dict construction (nested dicts become
ConfigDicts). No locking, references or type checks (``lit_jax.config`` checks override types itself).

:func:`install_if_missing` registers it as the ``ml_collections`` module when the real one cannot be imported;
``scripts/benchmark.py`` calls it so that its synthetic modes run where only jax / flax / optax are installed.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
from typing import Any, Optional

__all__ = ["ConfigDict", "install_if_missing"]


class ConfigDict:
    """Attribute-access dict; nested plain dicts are converted on assignment."""

    def __init__(self, initial: Optional[dict] = None, **kwargs):
        object.__setattr__(self, "_fields", {})
        for k, v in dict(initial or {}, **kwargs).items():
            self[k] = v

    @staticmethod
    def _wrap(value):
        if isinstance(value, dict):
            return ConfigDict(value)
        return value

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        raise AttributeError(f"ConfigDict has no field {name!r} (known: {sorted(fields)})")

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._fields[key] = self._wrap(value)

    def __delitem__(self, key: str) -> None:
        del self._fields[key]

    def __contains__(self, key) -> bool:
        return key in self._fields

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other) -> bool:
        return isinstance(other, ConfigDict) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ConfigDict({self.to_dict()!r})"

    def __deepcopy__(self, memo):
        return ConfigDict(copy.deepcopy(self.to_dict(), memo))

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def keys(self):
        return self._fields.keys()

    def values(self):
        return self._fields.values()

    def items(self):
        return self._fields.items()

    def update(self, other=None, **kwargs) -> None:
        for k, v in dict(other or {}, **kwargs).items():
            self[k] = v

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self._fields.items()}

    def copy_and_resolve_references(self) -> "ConfigDict":
        return copy.deepcopy(self)


def install_if_missing() -> bool:
    """Registers this module's ConfigDict as ``ml_collections`` if that package is not importable.

    Returns True when the stand-in was installed (or already is)."""
    current = sys.modules.get("ml_collections")
    if current is not None:
        return getattr(current, "__lit_jax_standin__", False)
    try:
        if importlib.util.find_spec("ml_collections") is not None:
            return False
    except (ImportError, ValueError):
        pass
    module = types.ModuleType("ml_collections")
    module.ConfigDict = ConfigDict
    module.FrozenConfigDict = ConfigDict
    module.__lit_jax_standin__ = True
    sys.modules["ml_collections"] = module
    return True
