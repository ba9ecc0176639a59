"""One policy per hotplug mechanism; :func:`policy_for` picks one for a bus or VM."""

from qmpfd.hotplug.policies.base import Policy, PolicyTimeouts
from qmpfd.hotplug.policies.registry import POLICIES, policy_for, vm_policy_name

__all__ = ["POLICIES", "Policy", "PolicyTimeouts", "policy_for", "vm_policy_name"]
