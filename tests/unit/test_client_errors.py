"""One error hierarchy: what the client raises is what the daemon raises."""

from qmpfd import errors as daemon
from qmpfd.client import errors


def test_client_errors_are_the_daemons_classes() -> None:
    assert errors.Conflict is daemon.Conflict and errors.QmpfdClientError is daemon.QmpfdError
    err = errors.from_reply("Conflict", "slot: pci.0 slot 5 is taken")
    assert isinstance(err, daemon.Conflict) and err.desc == "slot: pci.0 slot 5 is taken"
    # the guest-ejected refusal travels as Conflict and is caught as one
    assert issubclass(daemon.GuestEjected, errors.Conflict)


def test_an_unknown_class_keeps_its_name() -> None:
    err = errors.from_reply("SomethingNew", "later contract")
    assert isinstance(err, errors.QmpfdError) and err.error_class == "SomethingNew"
    assert errors.from_reply("GenericError", "x").error_class == "GenericError"
