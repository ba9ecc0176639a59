"""Multifunction hotplug: pure planning, per-mechanism policies, and the executor (QMP I/O)."""
