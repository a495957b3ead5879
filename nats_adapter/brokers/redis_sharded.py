"""Sharded Redis broker: one shard channel per channel on a Redis 7 Cluster.

``SSUBSCRIBE``/``SPUBLISH`` route by the channel's hash slot, so a message goes to
the one master that owns the slot and only to the nodes subscribed there; classic
``PUBLISH`` on a cluster is copied to every node.

Publishing uses redis-py's ``RedisCluster`` (slot routing, MOVED handling,
topology refresh). Receiving uses one redis-py ``PubSub`` connection per master
with a reader task each. redis-py's own ``ClusterPubSub`` keeps the same per-node
connections but only offers ``get_sharded_message``, which polls the nodes in turn
with a timeout each: that adds up to (masters - 1) x timeout of latency, or busy
polling with a zero timeout. Here each master's connection is read as soon as it
has data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from types import MethodType
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from .. import compat
from .base import Broker, BrokerError, BrokerHandler, BrokerUnconfirmed, FirstConnect

logger = logging.getLogger(__name__)

#: how many channels' last reach (subscribers a publish reached) are remembered
REACH_KEPT = 65536


class _NodeSubscriber:
    """The shard subscriptions this process holds on one master, and their reader."""

    def __init__(self, name: str, host: str, port: int, options: dict[str, Any]) -> None:
        self.name = name
        self.client = Redis(host=host, port=port, **options)
        self.pubsub: PubSub = self.client.pubsub()
        # after a reconnect redis-py re-subscribes in one SSUBSCRIBE, which Redis refuses
        # (CROSSSLOT) when the channels hash to different slots: group them per slot,
        # as redis-py's ClusterPubSub does for its own per-node connections (a private
        # method of redis-py: nats_adapter.compat probes it, else redis-py's own serves)
        if compat.check("redis.resubscribe_per_slot"):
            self.pubsub._resubscribe_shard_channels = MethodType(  # type: ignore[method-assign]
                ClusterPubSub._resubscribe_shard_channels, self.pubsub
            )
        self.reader: asyncio.Task[None] | None = None
        self.up = True
        # PubSub.connect() is not safe to race: two first commands would each open a
        # connection, and the subscription made on the dropped one would never be read
        self.lock = asyncio.Lock()

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


class RedisShardedBroker(Broker):
    """Moves envelopes over Redis Cluster shard channels.

    Delivery is at most once. Redis has no no-echo, so a node subscribed to a room
    receives its own publications there; the core drops them by origin. After a
    master restarts, its connection is re-established and its shard subscriptions
    restored; after a slot moves (resharding), Redis unsubscribes the channel on the
    old owner and this broker subscribes again on the new one.

    A restarted master knows no subscriptions until each node has subscribed again,
    and until then what is published there misses those nodes. ``SPUBLISH`` answers
    with how many subscribed connections it reached: while any master is down and for
    ``settle`` seconds after the last one came back, a publish that reaches fewer
    than the same channel's last publish before raises :class:`BrokerUnconfirmed`
    (a member's node may not have subscribed again yet), never returns as if taken.
    Outside such a window a lower reach is a node that left the room.

    :param url: a cluster seed node, ``redis://host:port``.
    :param connect_options: extra keyword arguments for the redis-py clients
        (``password``, ``username``, ``ssl`` ...).
    """

    name = "redis-sharded"

    def __init__(
        self,
        url: str,
        *,
        connect_options: dict[str, Any] | None = None,
        confirm_timeout: float = 10.0,
        reconnect_wait: float = 0.1,
        settle: float = 10.0,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"url must be a redis:// or rediss:// URL, got {url!r}")
        self.url = url
        self._options = dict(connect_options or {})
        self._confirm_timeout = confirm_timeout
        self._reconnect_wait = reconnect_wait
        self._cluster: RedisCluster | None = None
        self._handler: BrokerHandler | None = None
        self._nodes: dict[str, _NodeSubscriber] = {}
        #: channel -> name of the master it is subscribed on
        self._channel_node: dict[str, str] = {}
        self._wanted: set[str] = set()
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._first_connect = FirstConnect("Redis Cluster", self._connect, (RedisError, OSError),
                                           reconnect_wait)
        self._reroutes: set[asyncio.Task[None]] = set()
        self._closing = False
        self._was_connected = False
        #: channel -> subscribed connections its last taken publish reached
        self._reach: dict[str, int] = {}
        self._settle = settle
        #: until when (monotonic) a lower reach may be a node not yet subscribed again
        #: to a restarted master (infinite while a master is down)
        self._unsure_until = 0.0

    # -- connection --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        if self._cluster is None:
            return False
        return not self._nodes or any(n.up for n in self._nodes.values())

    def _outage_changed(self) -> None:
        """A master went down or came back: a lower reach is unsure until every
        master is up again, and for ``settle`` seconds after."""
        if any(not sub.up for sub in self._nodes.values()):
            self._unsure_until = math.inf
        else:
            self._unsure_until = time.monotonic() + self._settle

    def _notify(self) -> None:
        now = self.connected
        if now != self._was_connected and self._handler is not None and not self._closing:
            self._was_connected = now
            self._handler.on_connection_state(now)

    async def start(self, handler: BrokerHandler, control_channel: str) -> None:
        self._handler = handler
        self._wanted.add(control_channel)
        await self._first_connect.start()

    async def _connect(self) -> None:
        cluster = RedisCluster.from_url(
            self.url,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
            **self._options,
        )
        try:
            await cluster.initialize()
        except BaseException:
            await cluster.aclose()
            raise
        self._cluster = cluster
        for channel in sorted(self._wanted):
            try:
                await self._subscribe(channel)
            except BrokerError as exc:
                logger.warning("%s; restored once its master answers", exc)
        self._notify()

    def _node_options(self) -> dict[str, Any]:
        """Options for the per-master subscriber connections: the same credentials and
        TLS as the cluster client (a rediss:// URL means TLS for every connection)."""
        allowed = ("username", "password", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                   "ssl_cert_reqs", "ssl_check_hostname", "socket_connect_timeout")
        opts = {k: v for k, v in self._options.items() if k in allowed}
        if self.url.startswith("rediss://"):
            opts["ssl"] = True
        opts.setdefault("socket_connect_timeout", 2.0)
        return opts

    def _subscriber(self, node: ClusterNode) -> _NodeSubscriber:
        sub = self._nodes.get(node.name)
        if sub is None:
            sub = _NodeSubscriber(node.name, node.host, int(node.port), self._node_options())
            self._nodes[node.name] = sub
        return sub

    # -- subscriptions -----------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        self._wanted.add(channel)
        if self._cluster is None:
            # made by _connect once a node answers; not confirmed until then
            raise BrokerError("no Redis Cluster connection yet")
        await self._subscribe(channel)

    async def _subscribe(self, channel: str) -> None:
        if self._closing:
            return
        assert self._cluster is not None
        node = self._cluster.get_node_from_key(channel)
        if node is None:
            raise BrokerError(f"no Redis node serves the slot of {channel!r}")
        sub = self._subscriber(node)
        loop = asyncio.get_running_loop()
        confirm = self._confirm.get(channel)
        if confirm is None or confirm.done():
            confirm = self._confirm[channel] = loop.create_future()
        self._channel_node[channel] = node.name
        try:
            async with sub.lock:
                await sub.pubsub.ssubscribe(channel)
        except (RedisError, OSError) as exc:
            # the channel stays in the PubSub's shard_channels: restored on reconnect
            logger.warning("SSUBSCRIBE %s on %s failed (%r); will retry on reconnect",
                           channel, node.name, exc)
            sub.up = False
            self._outage_changed()
            self._notify()
        if sub.reader is None or sub.reader.done():
            sub.reader = loop.create_task(self._read(sub))
        try:
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.shield(confirm)
        except TimeoutError:
            raise BrokerError(f"Redis did not confirm SSUBSCRIBE {channel} in time") from None

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        name = self._channel_node.pop(channel, None)
        self._confirm.pop(channel, None)
        sub = self._nodes.get(name) if name is not None else None
        if sub is None:
            return
        try:
            async with sub.lock:
                await sub.pubsub.sunsubscribe(channel)
        except (RedisError, OSError) as exc:
            sub.pubsub.shard_channels.pop(channel, None)  # do not restore it on reconnect
            logger.warning("SUNSUBSCRIBE %s on %s failed: %r", channel, name, exc)

    async def _read(self, sub: _NodeSubscriber) -> None:
        """Read one master's shard messages until cancelled, reconnecting as needed."""
        assert self._handler is not None
        delay = self._reconnect_wait
        while True:
            try:
                msg = await sub.pubsub.get_message(timeout=None)
            except (RedisError, OSError) as exc:
                if sub.up:
                    logger.warning("lost Redis node %s: %r", sub.name, exc)
                    sub.up = False
                    self._outage_changed()
                    self._notify()
                await asyncio.sleep(delay)
                # a restarted master is usually back within a second: retry often
                delay = min(delay * 2, 1.0)
                continue
            if not sub.up:
                logger.info("Redis node %s is back; shard subscriptions restored", sub.name)
                sub.up = True
                delay = self._reconnect_wait
                self._outage_changed()
                self._notify()
            if msg is None:
                continue
            kind = msg["type"]
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) \
                else str(msg["channel"])
            if kind == "smessage":
                await self._handler.on_message(channel, msg["data"])
            elif kind == "ssubscribe":
                confirm = self._confirm.get(channel)
                if confirm is not None and not confirm.done():
                    confirm.set_result(None)
            elif kind == "sunsubscribe" and channel in self._wanted \
                    and self._channel_node.get(channel) == sub.name:
                # not ours: Redis dropped it because its slot moved to another master
                task = asyncio.get_running_loop().create_task(self._reroute(channel))
                self._reroutes.add(task)
                task.add_done_callback(self._reroutes.discard)

    async def _reroute(self, channel: str) -> None:
        assert self._cluster is not None
        logger.info("shard channel %s moved; subscribing on its new owner", channel)
        try:
            await self._cluster.nodes_manager.initialize()
            if channel in self._wanted:
                await self._subscribe(channel)
        except (RedisError, OSError, BrokerError):
            logger.exception("could not re-subscribe %s after a slot move", channel)

    # -- publish -----------------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> None:
        if self._cluster is None or self._closing:
            raise BrokerError("no Redis Cluster connection")
        try:
            reached = int(await self._cluster.spublish(channel, data))
        except (RedisError, OSError) as exc:
            # a master this node holds no subscription on may be the one that is down
            self._unsure_until = max(self._unsure_until, time.monotonic() + self._settle)
            raise BrokerError(f"SPUBLISH failed: {exc!r}") from exc
        reach = self._reach
        before = reach.pop(channel, 0)
        if reached < before and time.monotonic() < self._unsure_until:
            reach[channel] = before  # still what a whole room reaches
            raise BrokerUnconfirmed(
                f"reached {reached} of the {before} subscribers this channel had before a "
                "Redis master restarted: a node may not have subscribed again yet")
        reach[channel] = reached  # last: the most recently published are kept
        if len(reach) > REACH_KEPT:
            del reach[next(iter(reach))]

    async def close(self) -> None:
        self._closing = True
        await self._first_connect.cancel()
        tasks = list(self._reroutes)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in list(self._nodes.values()):
            await sub.close()
        self._nodes.clear()
        if self._cluster is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._cluster.aclose()
            self._cluster = None

    def info(self) -> dict[str, Any]:
        per_node: dict[str, int] = defaultdict(int)
        for name in self._channel_node.values():
            per_node[name] += 1
        return {
            "seed": self.url.split("@")[-1],
            "subscriptions": len(self._channel_node),
            "nodes": {name: {"up": sub.up, "subscriptions": per_node.get(name, 0)}
                      for name, sub in sorted(self._nodes.items())},
        }
