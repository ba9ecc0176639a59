"""Multifunction hotplug: pure planning, per-mechanism policies, and the executor that talks to QEMU."""
