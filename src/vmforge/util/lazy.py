"""Names that a package exports but imports only when first used (PEP 562).

Every vmforge command pays for what ``import vmforge.cli.main`` loads, and most commands
need a small part of it: ``vmforge --version`` needs nothing, ``vmforge info`` one
reader. A package facade (``vmforge``, ``vmforge.ops``, each format package) therefore
lists its public names with the module that defines them, and that module is imported
on first attribute access. Type checkers see the same names through
``if TYPE_CHECKING:`` imports in the facade.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any


class LazyPackage(ModuleType):
    """A package whose exported names are imported from their modules on first use.

    The import system binds each submodule to its parent once it is loaded
    (``ops.convert = <module vmforge.ops.convert>``), which would hide a function of
    the same name that the package exports (``ops.convert()``). An eager facade avoids
    that by importing everything up front; this one keeps the function instead.
    """

    _lazy_exports: Mapping[str, str]

    def __getattr__(self, name: str) -> Any:
        table: Mapping[str, str] = self.__dict__.get("_lazy_exports", {})
        where = table.get(name)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where, self.__name__), name)
        ModuleType.__setattr__(self, name, value)  # later look-ups skip this hook
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        table: Mapping[str, str] = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, ModuleType) and value.__name__ == f"{self.__name__}.{name}" \
                and name in table:
            value = getattr(value, name)
        ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("_lazy_exports", {})))


def lazy_package(name: str, exports: Mapping[str, str]) -> None:
    """Make the module ``name`` (call with ``__name__``) a :class:`LazyPackage`.

    ``exports`` maps each exported name to the module defining it, relative to the
    package (".reader") or absolute. Call it before the package imports anything of
    its own, so that no submodule can be bound over an exported name first.
    """
    module = sys.modules[name]
    module.__class__ = LazyPackage
    ModuleType.__setattr__(module, "_lazy_exports", dict(exports))


class LazyModule:
    """Stands for a module that is imported on first attribute access.

    For a costly dependency used by a few code paths of an otherwise cheap module
    (numpy in a reader whose ``info`` needs none of it)::

        if TYPE_CHECKING:
            import numpy as np
        else:
            np = LazyModule("numpy")
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r}, {state}>"
