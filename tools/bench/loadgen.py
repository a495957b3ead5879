"""The benchmark's load generator: many lean Socket.IO clients in one asyncio process.

A python-socketio ``AsyncClient`` per socket costs too much CPU and memory to
measure a server with, so this speaks just enough Engine.IO v4 / Socket.IO v5
over websocket itself: one ``asyncio.Protocol`` per socket, no task per socket,
client frames masked with a zero key (a valid key that makes masking free).

It runs as its own process (``python -m tools.bench.loadgen``) and is driven
by the benchmark over stdin/stdout, one JSON object per line, so that the CPU it
spends is never counted as the gateways'.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import socket
import struct
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

_ZERO_MASK = b"\x00\x00\x00\x00"
#: Linux's SO_TIMESTAMPNS (the asm-generic value; the socket module does not name it)
_SO_TIMESTAMPNS = 35 if sys.platform == "linux" else None
_STAMP_SPACE = socket.CMSG_SPACE(16)


class StampedSocket(socket.socket):
    """A client TCP socket whose ``recv`` (what asyncio's transport reads with) also
    keeps when the kernel received the last packet it returned (SO_TIMESTAMPNS, wall
    clock). One process reads for every socket of the benchmark: a chat fanned out to
    100 of them is handled one socket after the other, so the time it is handled
    here grows with the socket's place in that line, a wait no browser has. The
    kernel's time is when the message reached the client."""

    __slots__ = ("arrived_ns",)

    def __init__(self, family: int) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.arrived_ns = 0
        if _SO_TIMESTAMPNS is not None:
            with contextlib.suppress(OSError):
                self.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.arrived_ns = 0  # a read without a stamp must not keep the previous one
        data, ancdata, _, _ = self.recvmsg(bufsize, _STAMP_SPACE, flags)
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack_from("qq", value)
                self.arrived_ns = sec * 1_000_000_000 + nsec
        return data


def _frame(payload: bytes) -> bytes:
    """A masked (with a zero key), final text frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


class SocketOwner(Protocol):
    """What a :class:`LeanSocket` reports to: :class:`LoadGen`, or the soak's clients."""

    pings_answered: int

    def on_event(self, sock: LeanSocket, data: list[Any], now: int) -> None: ...

    def on_closed(self, sock: LeanSocket) -> None: ...


class LeanSocket(asyncio.Protocol):
    """One Engine.IO/Socket.IO websocket client connection."""

    def __init__(self, index: int, host: str, port: int, gen: SocketOwner, deflate: bool,
                 upgrade: Upgrade | None = None, auth: dict[str, str] | None = None,
                 sock: StampedSocket | None = None) -> None:
        self.index = index
        #: the socket under the transport, which knows when what it read arrived
        self.sock = sock
        self.host = host
        self.port = port
        self.gen = gen
        self.offer_deflate = deflate
        #: set when this websocket upgrades a session that connected by polling
        self.upgrade = upgrade
        self.deflated = False
        self.inflater: Any = None
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshaken = False
        self.sid: str | None = None
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks: dict[int, asyncio.Future[Any]] = {}
        self.next_ack = 0
        self.closed = False
        self.fragments: list[bytes] = []
        #: connection state recovery, as socket.io-client keeps it: the pid of the
        #: CONNECT reply and the offset of the last event (kept across a reconnect,
        #: which sends them back as its CONNECT ``auth``)
        self.auth = auth
        self.pid: str | None = auth.get("pid") if auth else None
        self.offset: str | None = None
        #: the CONNECT reply gave back the pid sent: the session was restored
        self.recovered = False
        self.connected_ns = 0
        #: events received before the CONNECT reply (what a restore replays)
        self.before_connect = 0

    # -- connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        ext = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" \
            if self.offer_deflate else ""
        query = "" if self.upgrade is None else f"&sid={self.upgrade.eio_sid}"
        transport.write(
            f"GET /socket.io/?EIO=4&transport=websocket{query} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}"
            f"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{ext}\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"socket {self.index} closed"))
        for fut in self.acks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("closed"))
        self.gen.on_closed(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            if not head.startswith("HTTP/1.1 101"):
                self.connected.set_exception(ConnectionError(head.splitlines()[0]))
                assert self.transport is not None
                self.transport.close()
                return
            self.handshaken = True
            if "permessage-deflate" in head.lower():
                self.deflated = True
                self.inflater = zlib.decompressobj(-15)
            if self.upgrade is not None:
                self.send_text("2probe")
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = struct.unpack_from("!H", buf, 2)[0]
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = struct.unpack_from("!Q", buf, 2)[0]
                pos = 10
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos : pos + n])
            del buf[: pos + n]
            opcode = b0 & 0x0F
            if b0 & 0x40:  # RSV1: compressed message
                payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
            if opcode == 0x8:
                assert self.transport is not None
                self.transport.close()
                return
            if opcode == 0x9:  # ping
                self._write_raw(0x8A, payload)
                continue
            if opcode in (0x1, 0x0):
                if not b0 & 0x80:
                    self.fragments.append(payload)
                    continue
                if self.fragments:
                    payload = b"".join(self.fragments) + payload
                    self.fragments = []
                self.on_text(payload.decode())

    def _write_raw(self, opcode_byte: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(struct.pack("!BB", opcode_byte, 0x80 | len(payload))
                                 + _ZERO_MASK + payload)

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(text.encode()))

    # -- Engine.IO / Socket.IO ---------------------------------------------------

    def on_text(self, text: str) -> None:
        kind = text[0]
        if kind == "4":
            body = text[1:]
            sio = body[0]
            if sio == "2":  # EVENT
                self.gen.on_event(self, json.loads(body[1:]), time.monotonic_ns())
            elif sio == "3":  # ACK
                i = 1
                while body[i].isdigit():
                    i += 1
                fut = self.acks.pop(int(body[1:i]), None)
                if fut is not None and not fut.done():
                    fut.set_result(json.loads(body[i:])[0])
            elif sio == "0":  # CONNECT
                reply = json.loads(body[1:])
                self.sid = reply["sid"]
                pid = reply.get("pid")
                self.recovered = pid is not None and pid == self.pid  # as socket.io-client
                self.pid = pid
                self.connected_ns = time.monotonic_ns()
                if not self.connected.done():
                    self.connected.set_result(None)
            elif sio in "14" and not self.connected.done():
                self.connected.set_exception(ConnectionError(body))
        elif kind == "2":  # engine.io ping
            self.send_text("3")
            self.gen.pings_answered += 1
        elif text == "3probe" and self.upgrade is not None:
            upgrade = self.upgrade
            upgrade.probed(self)
        elif kind == "0":  # engine.io open
            self.send_text("40" + (json.dumps(self.auth) if self.auth else ""))

    def call(self, event: str, *args: Any) -> asyncio.Future[Any]:
        self.next_ack += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks[self.next_ack] = fut
        self.send_text(f"42{self.next_ack}" + json.dumps([event, *args], separators=(",", ":")))
        return fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def drop(self) -> None:
        """Lose the connection as a network does: no close frame, no DISCONNECT, the
        TCP connection reset (SO_LINGER 0)."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class Upgrade:
    """socket.io-client's default start: connect over HTTP long-polling, then upgrade.

    :meth:`poll_then_upgrade` does what the client does: handshake and Socket.IO
    CONNECT by polling, a long-poll left pending, a websocket with the session id,
    ``2probe``/``3probe``, then (once the pending poll has returned, ended by the
    server's NOOP) ``5``. The polling connection is closed once upgraded.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.eio_sid = ""
        self.sio_sid: str | None = None
        self.pid: str | None = None
        self.pending_poll: asyncio.Task[str] | None = None

    async def poll_then_upgrade(self, session: Any, make_socket: Any) -> LeanSocket:
        url = f"{self.base}/socket.io/?EIO=4&transport=polling"
        async with session.get(url) as resp:
            opened = await resp.text()
        if not opened.startswith("0"):
            raise ConnectionError(f"polling handshake answered {opened[:80]!r}")
        self.eio_sid = json.loads(opened[1:])["sid"]
        url += f"&sid={self.eio_sid}"
        async with session.post(url, data="40") as resp:
            await resp.read()
        received = ""
        while "40{" not in received:
            async with session.get(url) as resp:
                received += await resp.text()
        sio = json.loads(received[received.index("40{") + 2:].split("\x1e", 1)[0])
        self.sio_sid, self.pid = sio["sid"], sio.get("pid")

        async def poll() -> str:
            async with session.get(url) as resp:
                return str(await resp.text())

        self.pending_poll = asyncio.get_running_loop().create_task(poll())
        sock: LeanSocket = await make_socket(self)
        return sock

    def probed(self, sock: LeanSocket) -> None:
        """``3probe`` came: send ``5`` once the pending poll has returned."""
        def upgrade(_: Any = None) -> None:
            sock.send_text("5")
            sock.sid, sock.pid = self.sio_sid, self.pid
            if not sock.connected.done():
                sock.connected.set_result(None)

        if self.pending_poll is None or self.pending_poll.done():
            upgrade()
        else:
            self.pending_poll.add_done_callback(upgrade)


@dataclass
class Sent:
    sender: int
    room: str
    send_ns: int
    #: when its ack came (with recovery on: once it was stored)
    ack_ns: int = 0
    #: ``send_ns`` on the wall clock, which the kernel's receive times are on
    send_wall_ns: int = 0


@dataclass
class LoadGen:
    """All sockets of this process and what they sent and received."""

    sockets: list[LeanSocket] = field(default_factory=list)
    gateway_of: list[int] = field(default_factory=list)
    members: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    sent: dict[str, Sent] = field(default_factory=dict)
    #: (msg id, recipient index, time handled here ns, time it reached the socket: the
    #: kernel's, wall clock ns, or 0 when the platform gives none)
    received: list[tuple[str, int, int, int]] = field(default_factory=list)
    #: (msg id, recipient index, offset) of every chat that came with an offset, in the
    #: order received
    offsets: list[tuple[str, int, int]] = field(default_factory=list)
    unexpected_closes: int = 0
    #: engine.io pings the sockets answered
    pings_answered: int = 0
    closing: bool = False
    #: gateways the sockets are spread over (the urls of the last connect)
    gateways: int = 0
    #: the reconnect storm: drop time per dropped socket, background chat traffic
    dropped_ns: dict[int, int] = field(default_factory=dict)
    reconnect_ns: dict[int, int] = field(default_factory=dict)
    previous_sid: dict[int, str] = field(default_factory=dict)
    traffic: Traffic | None = None
    #: the index of each gateway (by node tag) the sockets' sids named (owner_from_sid)
    owners: dict[str, int] = field(default_factory=dict)

    def on_event(self, sock: LeanSocket, data: list[Any], now: int) -> None:
        if not sock.connected.done():
            sock.before_connect += 1
        # socket.io-client's rule: with a pid, a last argument that is a string is the
        # offset (and not one of the event's arguments)
        offset = data[-1] if sock.pid is not None and len(data) > 1 \
            and isinstance(data[-1], str) else None
        if offset is not None:
            sock.offset = offset
        if data and data[0] == "chat":
            arrived = sock.sock.arrived_ns if sock.sock is not None else 0
            self.received.append((data[1]["id"], sock.index, now, arrived))
            if offset is not None:
                self.offsets.append((data[1]["id"], sock.index, int(offset)))

    def on_closed(self, sock: LeanSocket) -> None:
        if not self.closing:
            self.unexpected_closes += 1

    async def connect(self, urls: list[str], count: int, deflate: bool,
                      concurrency: int = 200, upgrade: bool = False,
                      local_host: str | None = None, fresh: bool = False,
                      owner_from_sid: bool = False) -> dict[str, Any]:
        """Connect ``count`` sockets round-robin over ``urls``: on websocket from the
        start, or (``upgrade``) by polling and then upgrading, as socket.io-client
        does by default. ``fresh``: every polling request on a TCP connection of its
        own (a balancer in front then spreads them one by one). ``owner_from_sid``:
        a socket's gateway is the one its engine.io sid names (``urls`` is then a
        balancer's), numbered in the order they are first seen."""
        import aiohttp

        sem = asyncio.Semaphore(concurrency)
        start = len(self.sockets)
        t0 = time.monotonic()

        async def one(i: int) -> None:
            url = urls[(i - start) % len(urls)]

            async def open_ws(up: Upgrade | None) -> LeanSocket:
                return await self.open_socket(i, url, deflate, up, local_host)

            async with sem:
                if not upgrade:
                    await open_ws(None)
                    return
                # one polling connection per socket, as a browser tab has, closed once
                # the socket is upgraded (``fresh``: one per request)
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=1, force_close=fresh)) as own:
                    upgrading = Upgrade(url)
                    await upgrading.poll_then_upgrade(own, open_ws)
                if owner_from_sid:
                    tag = upgrading.eio_sid[:8]  # nats_adapter.sids.NODE_TAG_CHARS
                    self.gateway_of[i] = self.owners.setdefault(tag, len(self.owners))

        self.gateways = max(self.gateways, len(urls))
        self.sockets.extend([None] * count)  # type: ignore[list-item]
        self.gateway_of.extend((i % len(urls)) for i in range(count))
        await asyncio.gather(*(one(start + i) for i in range(count)))
        self.gateways = max(self.gateways, len(self.owners))
        return {"connected": count, "deflate": sum(s.deflated for s in self.sockets[start:]),
                "upgraded": count if upgrade else 0,
                "seconds": round(time.monotonic() - t0, 3)}

    async def open_socket(self, i: int, url: str, deflate: bool = False,
                          upgrade: Upgrade | None = None, local_host: str | None = None,
                          auth: dict[str, str] | None = None) -> LeanSocket:
        """Socket ``i`` on websocket to ``url``, once its CONNECT reply came."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        loop = asyncio.get_running_loop()
        sock = await self._connected_socket(host, port, local_host)
        try:
            _, proto = await loop.create_connection(
                lambda: LeanSocket(i, host, port, self, deflate, upgrade, auth, sock),
                sock=sock)
        except BaseException:
            sock.close()
            raise
        self.sockets[i] = proto
        async with asyncio.timeout(30):
            await proto.connected
        return proto

    @staticmethod
    async def _connected_socket(host: str, port: int, local_host: str | None
                                ) -> StampedSocket:
        """A :class:`StampedSocket` connected to the first address of ``host`` that
        answers (as ``create_connection`` tries them)."""
        loop = asyncio.get_running_loop()
        error: OSError | None = None
        for family, _, _, _, address in await loop.getaddrinfo(host, port,
                                                                type=socket.SOCK_STREAM):
            sock = StampedSocket(family)
            try:
                sock.setblocking(False)
                if local_host:
                    sock.bind((local_host, 0))
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error or OSError(f"no address for {host}")

    async def join(self, pairs: list[tuple[int, str]], leave: bool = False,
                   concurrency: int = 500) -> int:
        sem = asyncio.Semaphore(concurrency)
        failures = 0

        async def one(i: int, room: str) -> None:
            nonlocal failures
            async with sem:
                ack = await asyncio.wait_for(self.sockets[i].call("leave" if leave else "join",
                                                                  room), 30)
            if not ack.get("ok"):
                failures += 1
            elif leave:
                self.members[room].discard(i)
            else:
                self.members[room].add(i)

        await asyncio.gather(*(one(i, r) for i, r in pairs))
        return failures

    async def send_one(self, i: int, room: str, text: str) -> bool:
        send_wall_ns, send_ns = time.time_ns(), time.monotonic_ns()
        ack = await asyncio.wait_for(self.sockets[i].call("chat", {"room": room, "text": text}),
                                     30)
        if not ack.get("ok"):
            return False
        self.sent[ack["id"]] = Sent(i, room, send_ns, time.monotonic_ns(), send_wall_ns)
        return True

    async def burst(self, plan: list[tuple[int, str, int]], text: str, window: int = 1) -> int:
        """Each (sender, room, n): n chats, each after an ack, with ``window`` chats of
        a sender in flight at once (1: each after the previous one's ack)."""
        failures = 0

        async def sender(i: int, room: str, n: int) -> None:
            nonlocal failures
            for _ in range(n):
                if not await self.send_one(i, room, text):
                    failures += 1

        await asyncio.gather(*(sender(i, r, n // window + (k < n % window))
                               for i, r, n in plan for k in range(window)))
        return failures

    async def paced(self, plan: list[tuple[float, int, str]], text: str) -> int:
        """Each (offset seconds, sender, room): one chat at that time from the start."""
        start = time.monotonic()
        failures = 0
        pending: set[asyncio.Task[bool]] = set()
        for offset, i, room in plan:
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.get_running_loop().create_task(self.send_one(i, room, text))
            pending.add(task)
            task.add_done_callback(pending.discard)
        results = await asyncio.gather(*pending)
        failures += sum(not r for r in results)
        return failures

    def expected_pairs(self) -> int:
        return sum(len(self.members_at_send(s)) for s in self.sent.values())

    def members_at_send(self, s: Sent) -> set[int]:
        return self.members[s.room] - {s.sender}

    async def settle(self, timeout: float, quiet: float = 0.5) -> None:
        """Wait until every expected delivery arrived, or nothing arrived for ``quiet``."""
        deadline = time.monotonic() + timeout
        expected = self.expected_pairs()
        last_count, last_change = len(self.received), time.monotonic()
        while time.monotonic() < deadline:
            if len(self.received) >= expected:
                await asyncio.sleep(0.2)  # a little longer, to see duplicates
                return
            await asyncio.sleep(0.05)
            if len(self.received) != last_count:
                last_count, last_change = len(self.received), time.monotonic()
            elif time.monotonic() - last_change > max(quiet, 2.0):
                return

    def tally(self) -> dict[str, Any]:
        seen: dict[tuple[str, int], int] = defaultdict(int)
        local: list[int] = []
        cross: list[int] = []
        handled_local: list[int] = []
        handled_cross: list[int] = []
        stray = 0
        for msg_id, rcpt, now, arrived in self.received:
            s = self.sent.get(msg_id)
            if s is None:
                stray += 1
                continue
            seen[(msg_id, rcpt)] += 1
            if seen[(msg_id, rcpt)] == 1:
                handled = now - s.send_ns
                same = self.gateway_of[s.sender] == self.gateway_of[rcpt]
                (local if same else cross).append(
                    arrived - s.send_wall_ns if arrived and s.send_wall_ns else handled)
                (handled_local if same else handled_cross).append(handled)
        expected = 0
        lost = 0
        unexpected = 0
        for msg_id, s in self.sent.items():
            want = self.members_at_send(s)
            expected += len(want)
            lost += sum(1 for r in want if (msg_id, r) not in seen)
        for (msg_id, rcpt), _count in seen.items():
            if rcpt not in self.members_at_send(self.sent[msg_id]):
                unexpected += 1
        duplicated = sum(c - 1 for c in seen.values() if c > 1)
        # what each gateway had to receive from the broker: one copy of each chat to a
        # room with a member there besides the sender, sent from another gateway
        needed = [0] * self.gateways
        # ... and with connection state recovery, where every copy comes from the
        # store, the sender's own gateway too when it has another member there
        needed_stored = [0] * self.gateways
        sent_per_room: dict[str, int] = defaultdict(int)
        for s in self.sent.values():
            sent_per_room[s.room] += 1
            origin = self.gateway_of[s.sender]
            targets = {self.gateway_of[m] for m in self.members_at_send(s)}
            for g in targets:
                needed_stored[g] += 1
                if g != origin:
                    needed[g] += 1
        return {
            "messages": len(self.sent),
            "expected": expected,
            "delivered": sum(1 for _ in seen),
            "lost": lost,
            "duplicated": duplicated,
            "misdelivered": unexpected + stray,
            "out_of_order": self.out_of_order(),
            "with_offsets": len(self.offsets),
            # from the send to the kernel's receive time at the recipient's socket ...
            "latency_ms": {"local": percentiles(local), "cross": percentiles(cross),
                           "all": percentiles(local + cross)},
            # ... and to when this process had handled it (see StampedSocket)
            "latency_handled_ms": {"cross": percentiles(handled_cross),
                                   "all": percentiles(handled_local + handled_cross)},
            "needed_per_gateway": needed,
            "needed_per_gateway_stored": needed_stored,
            "sent_per_room": dict(sent_per_room),
        }

    def out_of_order(self) -> int:
        """Chats that came with an offset not above the recipient's previous one, or
        with another offset than the same chat had elsewhere (0 without recovery)."""
        last: dict[int, int] = {}
        offset_of: dict[str, int] = {}
        bad = 0
        for msg_id, rcpt, offset in self.offsets:
            if offset <= last.get(rcpt, -1) or offset_of.setdefault(msg_id, offset) != offset:
                bad += 1
            last[rcpt] = offset
        return bad

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.offsets.clear()


class Traffic:
    """Chats sent in the background at ``rate`` per second, cycling through ``pairs``
    (sender, room), until :meth:`stop`."""

    def __init__(self, gen: LoadGen, pairs: list[tuple[int, str]], rate: float,
                 text: str) -> None:
        self.gen = gen
        self.stopping = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(pairs, rate, text))

    async def _run(self, pairs: list[tuple[int, str]], rate: float, text: str) -> int:
        start = time.monotonic()
        pending: set[asyncio.Task[bool]] = set()
        sent = 0
        while not self.stopping.is_set():
            i, room = pairs[sent % len(pairs)]
            task = asyncio.get_running_loop().create_task(self.gen.send_one(i, room, text))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
        return sum(not ok for ok in await asyncio.gather(*pending))

    async def stop(self) -> int:
        """Stop sending; the sends that were refused."""
        self.stopping.set()
        return await self.task


async def drop(gen: LoadGen, sockets: list[int], reset: bool, timeout: float = 10.0
               ) -> dict[str, Any]:
    """``sockets`` lose their connections: reset here (``reset``), or closed by the
    other end (a killed gateway: wait until they are). Each keeps its pid and offset."""
    now = time.monotonic_ns()
    for i in sockets:
        gen.dropped_ns[i] = now
        if reset:
            gen.sockets[i].drop()
    async with asyncio.timeout(timeout):
        while not all(gen.sockets[i].closed for i in sockets):
            await asyncio.sleep(0.01)
    return {"dropped": len(sockets)}


async def recover(gen: LoadGen, targets: list[tuple[int, int]], urls: list[str],
                  spread: float, seed: int) -> dict[str, Any]:
    """Reconnect each (socket, gateway index into ``urls``) after a random delay within
    ``spread`` seconds, sending the pid and offset it kept in its CONNECT auth as
    socket.io-client does; returns once every one has its CONNECT reply."""
    rng = random.Random(seed)

    async def one(i: int, gw: int, delay: float) -> None:
        await asyncio.sleep(delay)
        old = gen.sockets[i]
        auth = None
        if old.pid is not None:
            auth = {"pid": old.pid} if old.offset is None else \
                {"pid": old.pid, "offset": old.offset}
        gen.reconnect_ns[i] = time.monotonic_ns()
        gen.previous_sid[i] = old.sid or ""
        await gen.open_socket(i, urls[gw], auth=auth)
        gen.gateway_of[i] = gw

    t0 = time.monotonic()
    await asyncio.gather(*(one(i, gw, rng.uniform(0, spread)) for i, gw in targets))
    socks = [gen.sockets[i] for i, _ in targets]
    return {"reconnected": len(socks), "seconds": round(time.monotonic() - t0, 3),
            "recovered": sum(s.recovered and s.sid == gen.previous_sid[s.index]
                             for s in socks)}


def recovery_tally(gen: LoadGen) -> dict[str, Any]:
    """What the reconnected sockets got: recovered or refused, what was replayed before
    their CONNECT reply, and how long until each had caught up (its CONNECT reply
    came, and every chat for it stored before then had arrived)."""
    recovered = {i for i in gen.reconnect_ns if gen.sockets[i].recovered
                 and gen.sockets[i].sid == gen.previous_sid[i]}
    connected = {i: gen.sockets[i].connected_ns for i in recovered}
    caught_up = dict(connected)
    # chats stored while a socket was away (acked between its drop and its reconnect):
    # a restore must replay every one of them before its CONNECT reply
    away = away_replayed = 0
    for msg_id, rcpt, now, _ in gen.received:
        if rcpt in recovered:
            s = gen.sent.get(msg_id)
            if s is not None and s.ack_ns <= connected[rcpt]:
                caught_up[rcpt] = max(caught_up[rcpt], now)
    first_seen: dict[tuple[str, int], int] = {}
    for msg_id, rcpt, now, _ in gen.received:
        first_seen.setdefault((msg_id, rcpt), now)
    for msg_id, s in gen.sent.items():
        for rcpt in gen.members_at_send(s):
            if rcpt in recovered and gen.dropped_ns[rcpt] <= s.ack_ns \
                    <= gen.reconnect_ns[rcpt]:
                away += 1
                got = first_seen.get((msg_id, rcpt))
                away_replayed += got is not None and got < connected[rcpt]
    since_drop = [caught_up[i] - gen.dropped_ns[i] for i in recovered]
    since_reconnect = [caught_up[i] - gen.reconnect_ns[i] for i in recovered]
    first = min(gen.reconnect_ns.values(), default=0)
    return {
        "sessions": len(gen.reconnect_ns),
        "recovered": len(recovered),
        "refused": len(gen.reconnect_ns) - len(recovered),
        "replayed": sum(gen.sockets[i].before_connect for i in gen.reconnect_ns),
        "sent_while_away": away,
        "replayed_while_away": away_replayed,
        "recovery_ms": percentiles(since_reconnect),
        "since_drop_ms": percentiles(since_drop),
        "storm_seconds": round((max(caught_up.values(), default=first) - first) / 1e9, 3),
    }


def percentiles(values_ns: list[int]) -> dict[str, float | None]:
    if not values_ns:
        return {"n": 0, "p50": None, "p99": None, "p999": None, "max": None}
    v = sorted(values_ns)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))] / 1e6, 3)

    return {"n": len(v), "p50": at(0.5), "p99": at(0.99), "p999": at(0.999),
            "max": round(v[-1] / 1e6, 3)}


async def churn(gen: LoadGen, sockets: list[int], rooms: list[str], ops_per_s: float,
                seconds: float, seed: int) -> dict[str, Any]:
    """Sockets join and leave ``rooms`` at ``ops_per_s`` for ``seconds``."""
    rng = random.Random(seed)
    start = time.monotonic()
    ops = failures = 0
    joined: dict[int, set[str]] = defaultdict(set)
    pending: set[asyncio.Task[int]] = set()
    while time.monotonic() - start < seconds:
        i = rng.choice(sockets)
        room = rng.choice(rooms)
        leave = room in joined[i]
        (joined[i].discard if leave else joined[i].add)(room)
        task = asyncio.get_running_loop().create_task(gen.join([(i, room)], leave=leave))
        pending.add(task)
        task.add_done_callback(pending.discard)
        ops += 1
        next_at = start + ops / ops_per_s
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    failures = sum(await asyncio.gather(*pending))
    # leave everything so the next phase starts clean
    await gen.join([(i, r) for i, rs in joined.items() for r in rs], leave=True)
    return {"ops": ops, "failures": failures, "seconds": round(time.monotonic() - start, 3)}


async def serve() -> None:
    """Read commands from stdin, answer on stdout (see tools/bench/runner.py)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=256 * 1024 * 1024)  # plans can be large
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gen = LoadGen()

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "connect":
                reply(await gen.connect(cmd["urls"], cmd["count"], cmd.get("deflate", False),
                                        concurrency=cmd.get("concurrency", 200),
                                        upgrade=cmd.get("upgrade", False),
                                        local_host=cmd.get("local_host"),
                                        fresh=cmd.get("fresh", False),
                                        owner_from_sid=cmd.get("owner_from_sid", False)))
            elif op == "status":
                reply({"open": sum(1 for s in gen.sockets if s is not None and not s.closed),
                       "unexpected_closes": gen.unexpected_closes})
            elif op == "join":
                failures = await gen.join([tuple(p) for p in cmd["pairs"]],
                                          leave=cmd.get("leave", False),
                                          concurrency=cmd.get("concurrency", 500))
                reply({"failures": failures})
            elif op == "burst":
                t0 = time.monotonic()
                failures = await gen.burst([tuple(p) for p in cmd["plan"]],
                                           cmd.get("text", "hello"), cmd.get("window", 1))
                sent_s = time.monotonic() - t0
                await gen.settle(cmd.get("timeout", 60))
                reply({"failures": failures, "send_seconds": round(sent_s, 4),
                       "seconds": round(time.monotonic() - t0, 4), **gen.tally()})
                gen.reset()
            elif op == "paced":
                t0 = time.monotonic()
                failures = await gen.paced([tuple(p) for p in cmd["plan"]],
                                           cmd.get("text", "hello"))
                await gen.settle(cmd.get("timeout", 60))
                reply({"failures": failures, "seconds": round(time.monotonic() - t0, 4),
                       **gen.tally()})
                gen.reset()
            elif op == "churn":
                task = loop.create_task(churn(gen, cmd["sockets"], cmd["rooms"], cmd["ops_per_s"],
                                              cmd["seconds"], cmd.get("seed", 1)))
                failures = await gen.paced([tuple(p) for p in cmd["plan"]],
                                           cmd.get("text", "hello"))
                churned = await task
                await gen.settle(cmd.get("timeout", 60))
                reply({"failures": failures, "churn": churned, **gen.tally()})
                gen.reset()
            elif op == "say":  # each (sender, room): one chat, acked
                reply({"failures": await gen.burst([(i, r, 1) for i, r in cmd["pairs"]],
                                                   cmd.get("text", "hello"))})
            elif op == "traffic":
                gen.traffic = Traffic(gen, [tuple(p) for p in cmd["pairs"]], cmd["rate"],
                                      cmd.get("text", "hello"))
                reply({"started": True})
            elif op == "drop":
                reply(await drop(gen, cmd["sockets"], cmd.get("reset", True)))
            elif op == "recover":
                reply(await recover(gen, [tuple(t) for t in cmd["targets"]], cmd["urls"],
                                    cmd.get("spread", 0.0), cmd.get("seed", 1)))
            elif op == "finish":  # stop the traffic; what everyone got, what was restored
                failures = await gen.traffic.stop() if gen.traffic is not None else 0
                gen.traffic = None
                await gen.settle(cmd.get("timeout", 60))
                reply({"failures": failures, **gen.tally(), "recovery": recovery_tally(gen)})
                gen.reset()
                gen.dropped_ns.clear()
                gen.reconnect_ns.clear()
                gen.previous_sid.clear()
            elif op == "close":
                gen.closing = True
                for s in gen.sockets:
                    if s is not None:
                        s.close()
                await asyncio.sleep(0.2)
                reply({"closed": len(gen.sockets), "unexpected_closes": gen.unexpected_closes})
                gen.sockets.clear()
                gen.gateway_of.clear()
                gen.members.clear()
                gen.gateways = 0
                gen.owners.clear()
                gen.unexpected_closes = 0
                gen.closing = False
            elif op == "quit":
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as exc:  # report any failure to the driver instead of hanging it
            reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    asyncio.run(serve())
