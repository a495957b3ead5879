"""What one small ``send()`` over loopback TCP costs the sender on this machine.

Every server in the benchmark writes a recipient's websocket frame with a send of
its own (ours coalesces only the frames one connection gets in one turn of its
event loop), and on loopback the sender's CPU time also pays for the receiving
side of TCP and for waking the reader. So this is the floor of a delivery's
gateway CPU here, whatever the server does in Python, and it caps how far ahead
of another server's per-delivery cost any of them can be: measured at the start
of every run, next to the figures it bounds.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

#: a process that opens ``connections`` connections to the port and reads them all
#: until each is closed
_READER = """
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
while sel.get_map():
    for key, _ in sel.select():
        try:
            data = key.fileobj.recv(65536)
        except BlockingIOError:
            continue
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""


def loopback_send_us(connections: int = 250, sends: int = 100_000, payload: int = 100
                     ) -> float:
    """CPU microseconds the sender spends per ``send()`` of one ``payload``-byte
    websocket frame, round-robin over ``connections`` loopback TCP connections that
    another process reads (as the benchmark's load generator reads its sockets)."""
    if not 0 < payload < 126:
        raise ValueError("payload must fit a websocket frame's 7-bit length (1-125)")
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    listener.settimeout(30)  # a reader that never connects fails this, not the bench
    reader = subprocess.Popen([sys.executable, "-c", _READER,
                               str(listener.getsockname()[1]), str(connections)])
    socks: list[socket.socket] = []
    try:
        for _ in range(connections):
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(conn)
        frame = bytes([0x81, payload]) + b"x" * payload
        for conn in socks:  # warm up every connection once
            conn.sendall(frame)
        start = time.process_time()
        for i in range(sends):
            socks[i % connections].sendall(frame)
        took = time.process_time() - start
    finally:
        for conn in socks:
            conn.close()
        listener.close()
        try:
            reader.wait(timeout=10)
        except subprocess.TimeoutExpired:
            reader.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                reader.wait(timeout=5)
    return round(1e6 * took / sends, 3)
