"""Everything qmpfd knows about QEMU itself: the QMP link, introspection, the Topology type.

Knows nothing of hotplug: the layers above (hotplug/, vm/) ask it questions and send commands.
"""
