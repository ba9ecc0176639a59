"""qemu.qmp's ``QMPClient`` with the cost taken off a command's path: a message formatted only
when it will be logged, a command made into JSON once and written at once (no hop through the
library's writer task), and the write and the wait for its reply as two calls, so several
commands can be written before the first reply is awaited (:meth:`QmpLink.execute_batch
<qmpfd.qemu.link.QmpLink.execute_batch>`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from qemu.qmp import ExecuteError, Message, QMPClient, Runstate
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError

from qmpfd.qemu.router import route_directly

_NONE = object()
#: What a command's slot holds when its deadline passed before its reply came.
_EXPIRED = object()
log = logging.getLogger("qmpfd.vm")

#: Called once, in the socket's callback that read a command's successful reply, before the
#: command's caller resumes (and before any later message from QEMU is routed).
OnReturn = Callable[[], None]


class Sent(NamedTuple):
    """A command written by :meth:`DirectClient.send_now`, its reply not read yet."""

    msg: Message
    id: str


class ReplySlot:
    """Where one command's reply waits: what the library's per-command
    ``asyncio.Queue(maxsize=1)`` is used for, with the calls it makes on one (``put_nowait``
    by the router and by the library's disconnect, ``put``, ``get``, ``full``), as one future
    (a queue also makes two deques, an event and a counter per command)."""

    __slots__ = ("_on_return", "_reply", "deadline")

    def __init__(self, on_return: OnReturn | None = None) -> None:
        self._reply: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._on_return = on_return
        #: the loop's time by which the reply must have come (None: no limit; set by
        #: :meth:`DirectClient._keep`)
        self.deadline: float | None = None

    def expire(self) -> None:
        """The deadline passed: the waiting command is told so (a reply after it is dropped,
        as the library drops any reply nobody waits for)."""
        if not self._reply.done():
            self._reply.set_result(_EXPIRED)

    def full(self) -> bool:
        return self._reply.done()

    def put_nowait(self, item: object) -> None:
        if self._reply.done():        # a reply already here stays (a disconnect came after it)
            return
        if self._on_return is not None and isinstance(item, Mapping) and "return" in item:
            try:
                self._on_return()
            except Exception:         # the waiting command still gets its reply
                log.exception("a command's on_return failed")
        self._reply.set_result(item)

    async def put(self, item: object) -> None:
        self.put_nowait(item)

    async def get(self) -> object:
        return await self._reply


class DirectClient(QMPClient):
    """QMPClient whose message hooks format a message only when it will be logged, which
    makes a command's JSON once (:meth:`execute`) and writes it without a hop through its
    writer task (:meth:`_issue`).

    The library's hooks log every message at debug level with ``str(msg)`` evaluated first,
    i.e. a JSON encoding of every QMP message, logged or not. qom-list and query-pci replies
    are large: with 100 VMs that was a sixth of qmpfd's CPU time (bench/, scale). The hooks
    are the library's documented extension points for subclasses.

    Once the session runs, QEMU's messages are routed in the socket's callback
    (:mod:`qmpfd.qemu.router`): a reply straight into its command's slot, an event straight
    to :attr:`on_event`. Events never reach the library's listeners, so its default
    ``events`` listener, which nobody reads here, no longer keeps every event of the
    connection's life.
    """

    #: Called with every QEMU event, in the order QEMU sent it.
    on_event: Callable[[dict[str, Any]], None] | None = None
    #: The one timer that keeps every pending command's deadline (see :meth:`_keep`).
    _timer: asyncio.TimerHandle | None = None

    async def _establish_session(self) -> None:
        await super()._establish_session()
        assert self._writer is not None
        # The library's read limit (its default, 10 MiB, if a release has no such attribute).
        route_directly(self._writer, self._route, getattr(self, "readbuflen", 10 << 20))

    async def _on_message(self, msg: Message) -> None:
        """What the library's reader task still reads (messages that came with the
        negotiation, and what the router passed on) is routed the same way first."""
        if not self._route(dict(msg)):
            await super()._on_message(msg)

    def _route(self, msg: dict[str, Any]) -> bool:
        if "event" in msg:
            if self.on_event is not None:
                self.on_event(msg)
            return True
        queue = self._pending.get(msg.get("id"))
        if queue is None or queue.full():
            return False            # the library's own routing: dropped, or a protocol error
        queue.put_nowait(msg)       # type: ignore[arg-type]  # read as a Mapping, like Message
        return True

    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False, on_return: OnReturn | None = None,
                      timeout: float | None = None) -> object:
        """The library's ``execute``, with the command made into JSON once. The library builds
        a Message (serialised), copies it in ``execute_msg`` (serialised again, through the
        Mapping interface) and serialises it a third time to send it once the id is set: about
        two thirds of a command's cost before it leaves (bench/profile.md). Same checks, same
        errors: not connected is the library's own StateError, QEMU's error reply an
        ExecuteError, a reply with neither member a BadReplyError; no reply within
        ``timeout`` seconds a TimeoutError. ``on_return``: see :data:`OnReturn` (not called on
        the library's own path, before a session runs)."""
        if self.runstate is not Runstate.RUNNING or oob:
            async with asyncio.timeout(timeout):
                return await super().execute(cmd, arguments, oob)
        return await self.returned(self.send_now(cmd, arguments, on_return, timeout))

    def send_now(self, cmd: str, arguments: Mapping[str, object] | None,
                 on_return: OnReturn | None = None, timeout: float | None = None) -> Sent:
        """Write one command at once (the caller checked the runstate); its reply waits in
        its queue until :meth:`returned` (or :meth:`forget`), which raises TimeoutError once
        ``timeout`` seconds have passed without it."""
        msg_id = self._get_exec_id()
        body: dict[str, object] = {"execute": cmd, "id": msg_id}
        if arguments is not None:
            body["arguments"] = arguments
        msg = Message(body, eager=False)       # built whole: no item set through the Mapping
        self._write(msg, msg_id, on_return, timeout)
        return Sent(msg, msg_id)

    async def returned(self, sent: Sent) -> object:
        """The return value of the command ``sent`` (by :meth:`send_now`): one look into the
        reply on success (each look into a Message goes through the Mapping interface)."""
        reply = await self._reply(sent.id)
        if reply is _EXPIRED:
            raise TimeoutError(f"no reply to {sent.msg['execute']} in time")
        value = reply.get("return", _NONE)
        if value is not _NONE:
            return value
        if "error" in reply:
            try:
                error = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, sent.msg) from err
            raise ExecuteError(error, sent.msg, reply)
        raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply,
                            sent.msg)

    def forget(self, sent: Sent) -> None:
        """Stop waiting for ``sent``'s reply (its time ran out): a late one is dropped."""
        self._pending.pop(sent.id, None)

    async def _issue(self, msg: Message) -> str | None:
        """The library's ``_issue``, writing the command at once instead of handing it to its
        writer task: one event-loop turn less between a request and QEMU (a command's turns
        are most of what an attach adds to QEMU's own time; bench/profile.md). The order is
        kept (commands are written in call order, on the loop's thread), so is the matching
        (the reply's queue exists before the bytes leave), and the bytes go through the
        library's own send path (``_cb_outbound``, ``_do_send``). A failed write reaches the
        caller, not the writer task; a lost connection still interrupts every pending reply
        (the reader task's disconnect)."""
        msg_id = msg["id"] if "id" in msg else None
        assert msg_id is None or isinstance(msg_id, str)
        return self._write(msg, msg_id)

    def _write(self, msg: Message, msg_id: str | None, on_return: OnReturn | None = None,
               timeout: float | None = None) -> str | None:
        slot = ReplySlot(on_return)
        self._pending[msg_id] = slot  # type: ignore[assignment]
        try:
            self._do_send(self._cb_outbound(msg))
        except BaseException:
            del self._pending[msg_id]
            raise
        if timeout is not None:
            self._keep(slot, timeout)
        return msg_id

    def _keep(self, slot: ReplySlot, timeout: float) -> None:
        """Give ``slot`` its deadline, kept by the connection's one timer: a timer (or an
        ``asyncio.timeout``) per command cost more before the write than anything else in
        the link (bench/profile.md). The timer is left running when a reply comes; when it
        fires it expires what is overdue and is set again for the earliest deadline still
        pending, so with commands coming steadily a command costs one comparison here."""
        loop = asyncio.get_running_loop()
        slot.deadline = deadline = loop.time() + timeout
        timer = self._timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._expire_overdue)

    def _expire_overdue(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest: float | None = None
        for slot in list(self._pending.values()):
            deadline = getattr(slot, "deadline", None)   # the library's own queues have none
            if deadline is None:
                continue
            if deadline <= now:
                slot.expire()   # type: ignore[attr-defined]
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._timer = loop.call_at(earliest, self._expire_overdue)
