"""The contract's error classes as exceptions: ``except NotFound`` instead of string matching."""

from __future__ import annotations


class QmpfdClientError(Exception):
    """An error reply from qmpfd (``error_class`` and ``desc`` as on the wire)."""

    error_class = "GenericError"

    def __init__(self, desc: str, error_class: str | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        if error_class is not None:
            self.error_class = error_class


class GenericError(QmpfdClientError):
    error_class = "GenericError"


class CommandNotFound(QmpfdClientError):
    error_class = "CommandNotFound"


class InvalidRequest(QmpfdClientError):
    error_class = "InvalidRequest"


class NotFound(QmpfdClientError):
    error_class = "NotFound"


class Conflict(QmpfdClientError):
    error_class = "Conflict"


class Unsupported(QmpfdClientError):
    error_class = "Unsupported"


class Timeout(QmpfdClientError):
    error_class = "Timeout"


class HostDeviceUnavailable(QmpfdClientError):
    error_class = "HostDeviceUnavailable"


class QemuError(QmpfdClientError):
    error_class = "QemuError"


class Unreachable(QmpfdClientError):
    """qmpfd could not be reached, or it turned the connection away (``desc`` says why: its
    own reason when it gave one)."""


BY_CLASS: dict[str, type[QmpfdClientError]] = {
    c.error_class: c for c in (GenericError, CommandNotFound, InvalidRequest, NotFound,
                               Conflict, Unsupported, Timeout, HostDeviceUnavailable,
                               QemuError)}


def from_reply(error_class: str, desc: str) -> QmpfdClientError:
    cls = BY_CLASS.get(error_class, QmpfdClientError)
    return cls(desc, error_class)
