"""The lab's guest image assembly: which extra trees a guest architecture needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.guest import LabSetupError, guest_userland


def test_x86_and_arm_guests_need_only_busybox(tmp_path: Path) -> None:
    assert guest_userland("amd64", tmp_path) == []
    assert guest_userland("arm64", tmp_path) == []


def test_pseries_guest_without_its_hotplug_userland_is_a_setup_error(tmp_path: Path) -> None:
    # Booting it anyway would give a guest that never sees a hotplug: refuse, say what to run.
    with pytest.raises(LabSetupError, match="scripts/setup"):
        guest_userland("ppc64el", tmp_path)


def test_pseries_guest_gets_userland_and_rpa_modules(tmp_path: Path) -> None:
    userland = tmp_path / "userland-ppc64el"
    (userland / "usr" / "sbin").mkdir(parents=True)
    (userland / ".complete").touch()
    with pytest.raises(LabSetupError):  # the RPA modules are still missing
        guest_userland("ppc64el", tmp_path)
    hotplug = tmp_path / "kernel-ppc64el/lib/modules/6.1.0/kernel/drivers/pci/hotplug"
    hotplug.mkdir(parents=True)
    (hotplug / "rpaphp.ko").touch()
    assert guest_userland("ppc64el", tmp_path) == [userland, tmp_path / "kernel-ppc64el"]
