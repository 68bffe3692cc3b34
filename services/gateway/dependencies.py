"""FastAPI dependencies for the objects `create_app` keeps on `app.state`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


def from_state(attribute: str, kind: type[T]) -> Callable[[Request], T]:
    """A dependency returning `app.state.<attribute>`, which must be a `kind`."""

    def dependency(request: Request) -> T:
        value = getattr(request.app.state, attribute)
        if not isinstance(value, kind):
            raise TypeError(f"app.state.{attribute} is a {type(value).__name__}, not a {kind.__name__}")
        return value

    return dependency
