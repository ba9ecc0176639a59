"""The contract's error classes as exceptions: ``except NotFound`` instead of string matching.

They are the daemon's own classes (:mod:`qmpfd.errors`): one hierarchy for both sides, so code
that runs in the daemon and code that calls it catch the same thing.
"""

from __future__ import annotations

from qmpfd.errors import (
    CommandNotFound,
    Conflict,
    GenericError,
    HostDeviceUnavailable,
    InvalidRequest,
    NotFound,
    QemuError,
    QmpfdError,
    Timeout,
    Unsupported,
)

#: The base of every error reply (``error_class`` and ``desc`` as on the wire); the name it had
#: before the client and the daemon shared their classes.
QmpfdClientError = QmpfdError

__all__ = ["BY_CLASS", "CommandNotFound", "Conflict", "GenericError", "HostDeviceUnavailable",
           "InvalidRequest", "NotFound", "QemuError", "QmpfdClientError", "QmpfdError",
           "Timeout", "Unreachable", "Unsupported", "from_reply"]


class Unreachable(QmpfdError):
    """qmpfd could not be reached, or it turned the connection away (``desc`` says why: its
    own reason when it gave one)."""


BY_CLASS: dict[str, type[QmpfdError]] = {
    c.error_class: c for c in (GenericError, CommandNotFound, InvalidRequest, NotFound,
                               Conflict, Unsupported, Timeout, HostDeviceUnavailable,
                               QemuError)}


def from_reply(error_class: str, desc: str) -> QmpfdError:
    """The exception for an error reply; a class this client does not know keeps its name."""
    cls = BY_CLASS.get(error_class)
    if cls is not None:
        return cls(desc)
    err = QmpfdError(desc)
    err.error_class = error_class
    return err
