"""Named outputs: each handler group returns a NamedTuple whose fields name the components it
fills, and the wiring builds ``outputs=`` from the same names, so nothing is counted by hand."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, TypeVar

import gradio as gr

__all__ = ["skip", "components"]

T = TypeVar("T", bound=NamedTuple)


def skip(cls: type[T]) -> T:
    """Every output left as it is on the page."""
    return cls._make([gr.skip()] * len(cls._fields))


def components(cls: type[NamedTuple], *where: Mapping[str, Any]) -> list[Any]:
    """The components named by ``cls``'s fields, in field order, looked up in ``where``."""
    found = []
    for name in cls._fields:
        holder = next((w for w in where if name in w), None)
        if holder is None:
            raise KeyError(f"no component named {name!r} for {cls.__name__}")
        found.append(holder[name])
    return found
