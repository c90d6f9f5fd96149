"""Model factories: the user's own code that builds the network a state dict is loaded into."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from torch import nn


def resolve_factory(spec: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A model factory from ``"package.module:function"``, ``"path/file.py:function"``, or
    ``"path/file.py"`` (function ``make_model``); callables are returned unchanged.

    The factory is the user's own code and runs in this process; checkpoints never do.
    """
    if callable(spec):
        return spec
    text = str(spec)
    target, sep, attr = text.rpartition(":")
    if not sep:
        target, attr = text, ""
    if target.endswith(".py"):
        file = Path(target).resolve()
        if not file.is_file():
            raise FileNotFoundError(f"model factory file {file} does not exist")
        name = "_traindyn_factory_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        attr = attr or "make_model"
    else:
        if not attr:
            raise ValueError(f"model factory {text!r} must look like 'package.module:function' "
                             f"or 'path/to/file.py:function'")
        module = importlib.import_module(target)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{target} has no attribute {attr!r} (model factory {text!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"model factory {text!r} is not callable")
    return obj
