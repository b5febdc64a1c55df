"""Registry of training methods, picked by the string in the config.

Each method is a module `conceptbench.methods.<name>` that defines `METHOD`, a subclass of
`conceptbench.train.Method`. Adding a method means adding its module; nothing here changes.
Modules are imported only when asked for, so listing methods stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil


def available_methods() -> list[str]:
    """Names of the method modules in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_method(name: str):
    """The Method subclass registered under `name` (e.g. "dreambooth")."""
    from ..train.method import MethodError

    known = available_methods()
    if name not in known:
        raise MethodError(f"unknown method {name!r}; known: {known}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(module, "METHOD"):
        raise MethodError(f"{module.__name__} defines no METHOD")
    return module.METHOD
