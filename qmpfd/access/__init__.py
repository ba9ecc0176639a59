"""Access control: who may talk to qmpfd, which QMP sockets it may be pointed at, the audit log."""
