"""lmrun: the language-model research stack as composable Hydra configs (see README.md)."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """``(__getattr__, __dir__, __all__)`` for a package whose public names live in submodules
    (``exports``: submodule -> names) and are imported on first use, so that importing the
    package (e.g. for its config schema) does not import torch."""
    where = {name: module for module, names in exports.items() for name in names}
    names = [name for module_names in exports.values() for name in module_names]
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__, names
