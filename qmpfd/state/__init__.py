"""What qmpfd must not forget across a crash: the VMs it manages and the operations in flight."""
