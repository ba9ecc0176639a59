from qmpfd.hotplug.policies import POLICIES, policy_for
from qmpfd.hotplug.policies.base import SlotMember
from qmpfd.hotplug.policies.spapr import SpaprPolicy

MEMBERS = [SlotMember("f0", 0), SlotMember("f1", 1), SlotMember("f2", 2)]


def test_every_policy_plugs_function_zero_last() -> None:
    for arch, mech in (("x86_64", "acpi-pcihp"), ("x86_64", "pcie-native"),
                       ("aarch64", "pcie-native"), ("ppc64", "spapr")):
        p = policy_for(arch, "m", mech)
        assert p.name == mech
        assert p.plug_order([0, 3, 1, 2]) == [1, 2, 3, 0]


def test_spapr_unplugs_function_zero_which_cascades() -> None:
    p = policy_for("ppc64", "pseries-7.2", "spapr", qemu_version=(7, 2, 0))
    assert isinstance(p, SpaprPolicy) and p.unplug_targets(MEMBERS) == ["f0"]
    assert p.timeouts.unplug > POLICIES["acpi-pcihp"].timeouts.unplug  # RTAS is slow


def test_spapr_before_4_2_unplugs_nonzero_functions_first() -> None:
    for version in ((4, 1, 0), (3, 1, 1)):
        p = policy_for("ppc64", "pseries-4.1", "spapr", qemu_version=version)
        assert p.unplug_targets(MEMBERS) == ["f2", "f1", "f0"]
    assert policy_for("ppc64", "pseries-4.2", "spapr",
                      qemu_version=(4, 2, 0)).unplug_targets(MEMBERS) == ["f0"]


def test_spapr_rollback_without_function_zero_removes_each() -> None:
    p = policy_for("ppc64", "pseries", "spapr")
    assert p.rollback_targets([SlotMember("f1", 1), SlotMember("f3", 3)]) == ["f3", "f1"]


def test_spapr_keeps_configured_timeouts() -> None:
    table = dict(POLICIES)
    table["spapr"] = POLICIES["spapr"].with_timeouts(None, 300)
    assert policy_for("ppc64", "pseries", "spapr", table, (4, 1, 0)).timeouts.unplug == 300


def test_mechanism_not_driven_on_an_architecture_is_unsupported() -> None:
    assert policy_for("aarch64", "virt", "acpi-pcihp").name == "unsupported"
    assert policy_for("riscv64", "virt", "pcie-native").name == "unsupported"
    s390 = policy_for("s390x", "s390-ccw-virtio", None)
    assert not s390.multifunction and "s390" in s390.unsupported_reason
