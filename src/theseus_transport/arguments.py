"""Forwarding a subclass's explicit init arguments to its base class by name (datamodules and Lightning modules)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any


def init_arguments(cls: type, values: Mapping[str, Any], **fixed: Any) -> dict[str, Any]:
    """Keyword arguments for ``cls.__init__``, looked up by name in ``fixed``, else in ``values`` (a caller's locals()).

    LightningCLI builds its options from each class's own explicit signature, so subclasses repeat
    their base's arguments there; this keeps the forwarding of those arguments from being written
    out a second time. Every argument of ``cls`` must be found, so a renamed one fails loudly here
    instead of silently falling back to its default.
    """
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    names = [parameter.name for parameter in parameters if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]
    missing = [name for name in names if name not in fixed and name not in values]
    if missing:
        raise TypeError(f"cannot forward {missing} to {cls.__name__}: not among the caller's arguments")
    return {name: fixed[name] if name in fixed else values[name] for name in names}
