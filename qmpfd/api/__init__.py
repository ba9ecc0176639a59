"""qmpfd's own API: the QMP wire protocol served on a Unix socket, and the commands behind it."""
