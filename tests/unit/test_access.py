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
