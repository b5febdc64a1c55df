"""conceptbench's training methods, one module each, picked by the string in the config.

A method module defines `METHOD` (a subclass of `conceptbench.train.Method`) and declares its
arguments, its inputs and its cost as literals beside it (`conceptbench/registry.py` says how);
adding a method is adding its module. The `_*.py` modules hold pieces several methods share.
"""

from ..registry import available_methods, get_method

__all__ = ["available_methods", "get_method"]
