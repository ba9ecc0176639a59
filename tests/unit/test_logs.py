"""Logging: lines are made and written by a thread of their own, so a stalled stderr never
stops the caller; messages and exceptions are rendered by the caller; a new setup and the
exit write everything queued before."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from qmpfd import logs


class StalledStderr(io.StringIO):
    """stderr that blocks every write until released (journald busy, a full pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


@pytest.fixture
def stderr() -> Iterator[StalledStderr]:
    out = StalledStderr()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield out
    out.release.set()
    logs.stop()
    root.handlers[:], root.level = handlers, level


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in out.getvalue().splitlines()]


def test_a_stalled_stderr_does_not_stop_the_caller(stderr: StalledStderr) -> None:
    logs.setup("info", "json", stderr)
    log = logging.getLogger("qmpfd.test")
    done = threading.Event()

    def caller() -> None:
        for i in range(3):
            log.info("attach", extra={"vm": "v", "n": i})
        done.set()
    threading.Thread(target=caller, daemon=True).start()
    assert done.wait(5), "a log call waited for stderr"
    assert stderr.getvalue() == ""
    stderr.release.set()
    logs.stop()                                   # writes what was queued, in order
    assert [(x["msg"], x["vm"], x["n"]) for x in lines(stderr)] == [("attach", "v", i)
                                                                      for i in range(3)]


def test_messages_and_exceptions_are_rendered_when_logged(stderr: StalledStderr) -> None:
    stderr.release.set()
    logs.setup("info", "json", stderr)
    log = logging.getLogger("qmpfd.test")
    value = ["before"]
    log.info("value %s", value)
    value[0] = "after"                            # changed once logged: the line keeps it
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    logs.setup("warning", "text", stderr)                 # a reload: the first thread writes first
    log.warning("now text")
    logs.stop()
    first, second = stderr.getvalue().splitlines()[:2]
    assert json.loads(first)["msg"] == "value ['before']"
    failed = json.loads(second)
    assert failed["msg"] == "failed" and "ValueError: boom" in str(failed["exc"])
    assert stderr.getvalue().splitlines()[-1].endswith("WARNING qmpfd.test: now text")
