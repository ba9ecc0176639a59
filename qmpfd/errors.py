"""Error classes of the qmpfd contract.

Every failure a client can see is a :class:`QmpfdError` whose ``error_class`` is one of the names
the contract lists; the API layer turns it into ``{"error": {"class", "desc"}}``. Code below the API
raises these directly, so the class a client sees is decided where the cause is known.
"""

from __future__ import annotations


class QmpfdError(Exception):
    """Base: an error reply with a class and one readable sentence."""

    error_class = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class GenericError(QmpfdError):
    """An error the contract gives no narrower class (the base class carries the same name)."""


class CommandNotFound(QmpfdError):
    error_class = "CommandNotFound"


class InvalidRequest(QmpfdError):
    """Bad arguments; the message names the field."""

    error_class = "InvalidRequest"


class NotFound(QmpfdError):
    error_class = "NotFound"


class Conflict(QmpfdError):
    error_class = "Conflict"


class GuestEjected(Conflict):
    """QEMU removed functions of a slot being plugged without a request (the guest ejected
    it); the attach was undone and may be tried again."""


class Unsupported(QmpfdError):
    error_class = "Unsupported"


class Timeout(QmpfdError):
    error_class = "Timeout"


class HostDeviceUnavailable(QmpfdError):
    error_class = "HostDeviceUnavailable"


class QemuError(QmpfdError):
    """QEMU refused a command; ``desc`` carries QEMU's own class and text."""

    error_class = "QemuError"

    def __init__(self, desc: str, qemu_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.qemu_class = qemu_class


class VmGone(QmpfdError):
    """The QMP connection to the VM is closed (QEMU exited or the socket went away)."""

    error_class = "GenericError"
