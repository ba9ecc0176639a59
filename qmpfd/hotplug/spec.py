"""One function as a client asks for it (:class:`FunctionSpec`): the input of planning and
of the queues. Its own module so that both import it without importing each other."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FunctionSpec:
    """One function as requested: a QEMU device model and its properties."""

    id: str
    driver: str
    function: int
    properties: Mapping[str, Any] = field(default_factory=dict)
