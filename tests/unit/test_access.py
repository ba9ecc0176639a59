import os
from pathlib import Path

import pytest

from qmpfd.access.peer import Peer
from qmpfd.access.policy import AccessPolicy
from qmpfd.errors import InvalidRequest


def policy(tmp_path: Path) -> AccessPolicy:
    return AccessPolicy(frozenset({0}), frozenset({990}), (tmp_path.resolve(),), False)


def test_admission_by_uid_or_group(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert p.admit(Peer(1, 0, 0)) is None
    assert p.admit(Peer(1, 4242, 990)) is None
    reason = p.admit(Peer(1, 4242, 4242))
    assert reason is not None and "uid 4242" in reason
    assert p.admit(Peer(None, None, None)) is not None


def test_qmp_paths(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert p.check_qmp_path(tmp_path / "vm.qmp") == tmp_path.resolve() / "vm.qmp"
    with pytest.raises(InvalidRequest, match="outside"):
        p.check_qmp_path(Path("/etc/passwd"))
    with pytest.raises(InvalidRequest, match="outside"):
        p.check_qmp_path(tmp_path / ".." / "elsewhere.qmp")
    with pytest.raises(InvalidRequest, match="absolute"):
        p.check_qmp_path(Path("relative.qmp"))


def test_a_socket_is_judged_by_what_it_is_not_only_where_its_name_is(tmp_path: Path) -> None:
    """A hard link inside an allowed directory to a socket outside it is refused, and so is a
    name that is not a socket; QEMU's own socket passes."""
    import socket

    allowed, outside = tmp_path / "qemu", tmp_path / "elsewhere"
    allowed.mkdir()
    outside.mkdir()
    p = AccessPolicy(frozenset({0}), frozenset(), (allowed.resolve(),), False)
    with socket.socket(socket.AF_UNIX) as own, socket.socket(socket.AF_UNIX) as foreign:
        own.bind(str(allowed / "vm.qmp"))
        foreign.bind(str(outside / "other.qmp"))
        assert p.check_qmp_path(allowed / "vm.qmp") == (allowed / "vm.qmp").resolve()
        os.link(outside / "other.qmp", allowed / "borrowed.qmp")
        with pytest.raises(InvalidRequest, match="has 2 hard links"):
            p.check_qmp_path(allowed / "borrowed.qmp")
    (allowed / "plain").write_text("")
    with pytest.raises(InvalidRequest, match="is not a socket"):
        p.check_qmp_path(allowed / "plain")
    assert p.check_qmp_path(allowed / "not-yet.qmp")      # QEMU may not have made it yet
