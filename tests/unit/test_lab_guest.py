"""The lab's guest image assembly: which extra trees a guest architecture needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.guest import LabSetupError, guest_userland, kernel_dir
from lab.qemu import resolve


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


def test_kernel_choice_by_release_or_series(tmp_path: Path) -> None:
    assert kernel_dir("arm64", tmp_path, "6.12") == tmp_path / "kernel-arm64-trixie"
    assert kernel_dir("arm64", tmp_path, "bookworm") == tmp_path / "kernel-arm64-bookworm"
    assert kernel_dir("ppc64el", tmp_path, "host") == tmp_path / "kernel-ppc64el"
    with pytest.raises(LabSetupError, match=r"QMPFD_LAB_KERNEL=5\.10"):
        kernel_dir("amd64", tmp_path, "5.10")


def test_an_unknown_qemu_names_what_is_built() -> None:
    with pytest.raises(LabSetupError, match="no such QEMU here; built: host"):
        resolve("no-such-release")
