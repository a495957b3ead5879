"""The pieces of the websocket path (nats_adapter._engineio), each alone.

No server and no socket: the counting queue, the frames, the heartbeat's timing
(short intervals, waited on by condition), and the upgrade probe of a lean
connection driven through a stand-in transport.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import engineio
import pytest
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from nats_adapter._engineio import FastPath, install
from nats_adapter._engineio.connection import LeanWebSocket
from nats_adapter._engineio.frames import (
    PROBE_FRAME,
    accept_key,
    close_frame,
    frame,
    is_pong,
    read_text_frame,
    switching_protocols,
    text_frame,
)
from nats_adapter._engineio.heartbeat import Heartbeat, ping_later
from nats_adapter._engineio.queue import CountingQueue, QueueLimits, self_test
from tests.helpers import wait_for_condition

# -- the counting queue ---------------------------------------------------------------


def test_the_queue_passes_its_self_test() -> None:
    assert self_test() is None


def test_the_queue_counts_what_is_taken_until_done() -> None:
    q = CountingQueue()
    for item in ("a", "b"):
        q.put_nowait(item)
    assert q.qsize() == 2 and not q.empty()
    assert q.get_nowait() == "a" and q.in_flight == 1
    q.task_done()
    assert q.take() == ["b"] and q.empty() and q.items is None
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()
    with pytest.raises(ValueError):
        q.task_done()


async def test_a_getter_waits_for_a_put_and_join_for_done() -> None:
    q = CountingQueue()
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    assert q.polled
    q.put_nowait("x")
    assert await getter == "x" and not q.polled
    joined = asyncio.ensure_future(q.join())
    await asyncio.sleep(0)
    assert not joined.done()
    q.task_done()
    await asyncio.wait_for(joined, 1)


async def test_a_cancelled_getter_passes_its_item_on() -> None:
    q = CountingQueue()
    first = asyncio.ensure_future(q.get())
    second = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.put_nowait("x")  # wakes the first getter...
    first.cancel()  # ...which leaves before it runs
    assert await asyncio.wait_for(second, 1) == "x"


def test_past_its_limits_the_queue_takes_a_final_none_and_counts() -> None:
    limits = QueueLimits(max_items=3, max_bytes=1000)
    q = CountingQueue(limits=limits)
    for _ in range(3):
        q.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, "hi"))
    q.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, "one too many"))
    assert q.overflowed and limits.overflows == 1
    assert q.take()[-1] is None
    q.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, "after"))
    assert q.empty(), "a closing connection takes nothing more"
    by_bytes = CountingQueue(limits=QueueLimits(max_items=100, max_bytes=10))
    by_bytes.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, "x" * 11))
    assert by_bytes.overflowed


def test_the_open_packet_carries_the_interval_in_milliseconds() -> None:
    q = CountingQueue(ping_interval_ms=300)
    q.put_nowait(eio_packet.Packet(eio_packet.OPEN, {"sid": "s", "pingInterval": 0}))
    q.put_nowait(eio_packet.Packet(eio_packet.OPEN, {"sid": "s", "pingInterval": 0}))
    first, second = q.take()
    assert first.data["pingInterval"] == 300 and second.data["pingInterval"] == 0


def test_on_put_is_called_after_each_put() -> None:
    q = CountingQueue()
    seen: list[int] = []
    q.on_put = lambda: seen.append(q.qsize())
    q.put_nowait("a")
    q.put_nowait("b")
    assert seen == [1, 2]


# -- frames ---------------------------------------------------------------------------

def client_events(data: bytes) -> list[Any]:
    """What a websocket client makes of server bytes."""
    conn = Connection(ConnectionType.CLIENT)
    conn.receive_data(data)
    return list(conn.events())


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frames_of_every_length_class_decode(size: int) -> None:
    text = "x" * size
    (event,) = client_events(text_frame(text.encode()))
    assert isinstance(event, TextMessage) and event.data == text and event.message_finished


def test_binary_and_close_frames_decode() -> None:
    payload = bytes(range(200))
    events = client_events(frame(0x2, payload) + close_frame(1008))
    assert bytes(events[0].data) == payload
    assert isinstance(events[1], CloseConnection) and events[1].code == 1008


def masked(payload: bytes, key: bytes) -> bytes:
    return bytes((0x81, 0x80 | len(payload))) + key + bytes(
        b ^ key[i % 4] for i, b in enumerate(payload))


def test_a_pong_is_told_from_anything_else() -> None:
    key = os.urandom(4)
    assert is_pong(masked(b"3", key))
    assert not is_pong(masked(b"4", key))
    assert not is_pong(masked(b"33", key))
    assert not is_pong(b"\x82\x81" + key + bytes((0x33 ^ key[0],)))  # binary


def test_the_handshake_answer() -> None:
    good = {"Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert accept_key("GET", good) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455, 1.3
    assert accept_key("POST", good) is None
    for name, value in (("Upgrade", "h2c"), ("Connection", "close"),
                        ("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Key", "short"),
                        ("Sec-WebSocket-Key", "not base64!")):
        assert accept_key("GET", {**good, name: value}) is None
    answer = switching_protocols(b"KEY")
    assert answer.startswith(b"HTTP/1.1 101 ") and answer.endswith(
        b"Sec-WebSocket-Accept: KEY\r\n\r\n")


# -- the heartbeat --------------------------------------------------------------------

class FakeEio:
    def __init__(self, interval: float, timeout: float) -> None:
        self.ping_interval = interval
        self.ping_timeout = timeout
        self.sockets: dict[str, Any] = {}


class Ticker:
    """A connection the heartbeat drives: records when its timer fires."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.gen = 0
        self.name = name
        self.fired: list[float] = []
        self.hung_up: list[int] = []
        self.fail = fail

    @property
    def sid(self) -> str:
        return self.name

    def on_timer(self) -> None:
        self.fired.append(asyncio.get_running_loop().time())
        if self.fail:
            raise RuntimeError("broken")

    def hang_up(self, code: int = 1000) -> None:
        self.hung_up.append(code)


async def test_pings_and_deadlines_fire_after_their_interval() -> None:
    hb = Heartbeat(FakeEio(0.1, 0.05), lambda sid: True)
    loop = asyncio.get_running_loop()
    pinged, timed = Ticker("p"), Ticker("d")
    start = loop.time()
    hb.ping_later(pinged)
    hb.deadline(timed)
    await wait_for_condition(lambda: pinged.fired and timed.fired, "both timers")
    # each fires no earlier than due (less the slack that groups wake-ups)
    assert pinged.fired[0] - start >= 0.1 - hb.slack
    assert timed.fired[0] - start >= 0.05 - hb.slack
    assert timed.fired[0] <= pinged.fired[0]


async def test_a_rescheduled_connection_fires_once_at_its_latest_time() -> None:
    hb = Heartbeat(FakeEio(0.05, 0.15), lambda sid: True)
    conn = Ticker("c")
    hb.ping_later(conn)
    hb.deadline(conn)  # replaces the ping: the earlier entry is stale
    other = Ticker("other")
    hb.ping_later(other)  # due with conn's stale ping, queued after it
    await wait_for_condition(lambda: other.fired, "the other ping")
    assert conn.fired == [], "a stale entry fired"
    await wait_for_condition(lambda: conn.fired, "the deadline")
    await asyncio.sleep(0.1)  # a window for a second, stale firing to show (not a wait)
    assert len(conn.fired) == 1


async def test_a_connection_whose_timer_fails_is_hung_up_and_the_rest_go_on() -> None:
    hb = Heartbeat(FakeEio(0.05, 0.05), lambda sid: True)
    broken, fine = Ticker("broken", fail=True), Ticker("fine")
    hb.ping_later(broken)
    hb.ping_later(fine)
    await wait_for_condition(lambda: fine.fired, "the second timer")
    assert broken.hung_up == [1011]


class PollingSocket:
    def __init__(self, sid: str, last_ping: float | None) -> None:
        self.sid = sid
        self.last_ping = last_ping
        self.closed = self.closing = False
        self.checked = 0

    async def check_ping_timeout(self) -> None:
        self.checked += 1
        self.closed = True


async def test_the_sweep_times_out_silent_polling_sessions_only() -> None:
    import time

    eio = FakeEio(0.05, 0.05)
    old = time.time() - 10
    silent, lean, fresh = (PollingSocket("silent", old), PollingSocket("lean", old),
                           PollingSocket("fresh", None))
    eio.sockets = {s.sid: s for s in (silent, lean, fresh)}
    hb = Heartbeat(eio, lambda sid: sid == "lean")
    hb.start_sweep()
    await wait_for_condition(lambda: silent.checked and "silent" not in eio.sockets,
                             "the silent session closed and dropped")
    assert lean.checked == 0 and fresh.checked == 0


async def test_the_ping_timer_queues_a_ping_unless_the_connection_is_lean() -> None:
    class Sock:
        sid = "s"
        closing = closed = False
        last_ping: float | None = None
        queue = CountingQueue()

    polling, lean = Sock(), Sock()
    lean.queue = CountingQueue()
    ping_later(polling, 0.01, lambda sid: False)
    ping_later(lean, 0.01, lambda sid: True)
    await wait_for_condition(lambda: not polling.queue.empty(), "the ping")
    (pkt,) = polling.queue.take()
    assert pkt.packet_type == eio_packet.PING and polling.last_ping is not None
    assert lean.queue.empty()


# -- the upgrade probe ----------------------------------------------------------------

class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def frames(self) -> list[Any]:
        return client_events(bytes(self.written))


def polling_session() -> tuple[FastPath, AsyncSocket]:
    eio = engineio.AsyncServer(async_mode="aiohttp", ping_interval=0.2, ping_timeout=0.1)
    fastpath = install(eio)
    assert fastpath is not None and fastpath.heartbeat is not None
    socket = AsyncSocket(eio, "probe-sid")
    socket.connected = True  # it polls
    eio.sockets[socket.sid] = socket
    return fastpath, socket


async def upgrade(messages: list[str], poll_waiting: bool = False
                  ) -> tuple[FastPath, AsyncSocket, LeanWebSocket, FakeTransport]:
    fastpath, socket = polling_session()
    assert fastpath.heartbeat is not None
    transport = FakeTransport()
    conn = LeanWebSocket(socket, transport, fastpath.sessions, fastpath.heartbeat)
    poll = asyncio.ensure_future(socket.queue.get()) if poll_waiting else None
    await asyncio.sleep(0)
    conn.start(upgrading=True)
    assert socket.upgrading
    for message in messages:
        conn.on_message(message)
        if poll is not None and message == "2probe":
            # socket.io-client sends UPGRADE once its last poll has returned
            pkt = await asyncio.wait_for(poll, 1)
            assert pkt.packet_type == eio_packet.NOOP, "the waiting long-poll gets a NOOP"
    fastpath.sessions.writes.flush()
    return fastpath, socket, conn, transport


async def test_the_probe_then_upgrade_moves_the_session_to_the_websocket() -> None:
    fastpath, socket, conn, transport = await upgrade(["2probe", "5"], poll_waiting=True)
    assert bytes(transport.written).startswith(PROBE_FRAME)
    assert socket.upgraded and not socket.upgrading and socket.queue.in_flight == 0
    assert fastpath.sessions.lean(socket.sid) is conn
    assert fastpath.sessions.writers[socket.sid] is conn
    # per-socket state lives in the side table, not on engine.io's socket
    assert set(vars(socket)) == set(vars(AsyncSocket(socket.server, "fresh")))
    socket.queue.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, "after"))
    fastpath.sessions.writes.flush()
    assert [e.data for e in transport.frames()] == ["3probe", "4after"]


async def test_no_noop_is_queued_when_no_poll_waits() -> None:
    _, socket, _, _ = await upgrade(["2probe"])
    assert socket.queue.empty()


@pytest.mark.parametrize("messages", [["2nope"], ["2probe", "4hello"]])
async def test_a_failed_probe_leaves_the_session_polling(messages: list[str]) -> None:
    fastpath, socket, _, transport = await upgrade(messages)
    assert not socket.upgrading and not socket.upgraded
    assert transport.closing
    assert isinstance(transport.frames()[-1], CloseConnection)
    assert transport.frames()[-1].code == 1008
    assert fastpath.sessions.lean(socket.sid) is None


async def test_an_upgrade_that_never_completes_times_out() -> None:
    fastpath, socket, _, transport = await upgrade(["2probe"])
    await wait_for_condition(lambda: transport.closing, "the upgrade's deadline")
    assert not socket.upgrading and not socket.upgraded
    assert fastpath.sessions.lean(socket.sid) is None


def client_frame(first: int, key: bytes, payload: bytes, long: bool = False) -> bytes:
    n = len(payload)
    head = bytes((first, 0x80 | n)) if n < 126 and not long \
        else bytes((first, 0xFE)) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def wsproto_reads(data: bytes) -> list[Any]:
    parser = Connection(ConnectionType.SERVER)
    parser.receive_data(data)
    return list(parser.events())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.binary(min_size=4, max_size=4), st.booleans())
def test_a_one_frame_text_message_reads_as_wsproto_reads_it(text: str, key: bytes,
                                                             long: bool) -> None:
    payload = text.encode("utf-8", "surrogatepass")
    data = client_frame(0x81, key, payload, long and len(payload) < 126)
    read = read_text_frame(data + b"tail", 0, 1 << 20)
    events = wsproto_reads(data)
    if read is None:  # anything this does not read is wsproto's to answer
        assert (long and len(payload) < 126) or not events \
            or not isinstance(events[0], TextMessage)
        return
    assert read == (text, len(data))
    assert len(events) == 1 and isinstance(events[0], TextMessage)
    assert events[0].data == text and events[0].message_finished


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 0xFF), st.integers(0, 0xFF))
def test_whatever_is_read_without_wsproto_is_what_wsproto_reads(
        tail: bytes, first: int, second: int) -> None:
    data = bytes((first, second)) + tail
    read = read_text_frame(data, 0, 1 << 20)
    if read is None:
        return
    text, stop = read
    events = wsproto_reads(data[:stop])
    assert len(events) == 1 and isinstance(events[0], TextMessage), events
    assert events[0].data == text and events[0].message_finished


def test_frames_wsproto_must_read() -> None:
    key = b"\x01\x02\x03\x04"
    for data in (client_frame(0x01, key, b"fragment"),  # not final
                 client_frame(0x82, key, b"binary"),
                 client_frame(0x89, key, b"ping"),
                 client_frame(0xC1, key, b"reserved bit"),
                 bytes((0x81, 0x05)) + b"plain",  # not masked
                 client_frame(0x81, key, b"\xff"),  # not UTF-8
                 client_frame(0x81, key, b"x", long=True),  # not the shortest length
                 client_frame(0x81, key, b"cut")[:-1]):
        assert read_text_frame(data, 0, 1 << 20) is None, data
    assert read_text_frame(client_frame(0x81, key, b"x" * 200), 0, 100) is None  # too big
    two = client_frame(0x81, key, b"one") + client_frame(0x81, key, b"two")
    first = read_text_frame(two, 0, 100)
    assert first is not None and first[0] == "one"
    assert read_text_frame(two, first[1], 100) == ("two", len(two))
