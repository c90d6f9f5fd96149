"""Keyword arguments accepted under an older spelling, with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def rename_kwargs(kwargs: dict[str, Any], renamed: Mapping[str, str], where: str,
                  stacklevel: int = 3) -> dict[str, Any]:
    """Move each deprecated keyword of ``kwargs`` to the one it stands for, with a warning.

    Parameters
    ----------
    kwargs : the keyword arguments of a call (changed in place and returned).
    renamed : ``{deprecated keyword: the keyword it stands for}``.
    where : the callable's name, for the messages.
    stacklevel : passed to :func:`warnings.warn` so the warning points at the caller.

    Raises
    ------
    TypeError
        Both spellings of one argument were given.
    """
    for old, new in renamed.items():
        if old not in kwargs:
            continue
        if new in kwargs:
            raise TypeError(f"{where}: give {new}= only ({old}= is its deprecated spelling)")
        warnings.warn(f"{where}: {old}= is deprecated; use {new}=", DeprecationWarning,
                      stacklevel=stacklevel)
        kwargs[new] = kwargs.pop(old)
    return kwargs


def renamed_kwargs(**renamed: str) -> Callable[[F], F]:
    """Decorator: ``old=`` keyword arguments of the call are passed on as ``new=``
    (``@renamed_kwargs(labels="probe_labels")``), with a ``DeprecationWarning`` naming the
    new spelling.  The decorated signature shows only the new names."""

    def decorate(func: F) -> F:
        where = func.__qualname__.replace(".__init__", "")

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **rename_kwargs(kwargs, renamed, where))

        return wrapper  # type: ignore[return-value]

    return decorate
