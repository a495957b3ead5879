"""Prometheus metrics for one gateway node, read from the manager at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from nats_adapter.handover import MOVE_FAILURES, Handover

from .chat import ChatProtocol
from .forwarding import Forwarder
from .guards import RequestGuard
from .serving import GC_PAUSES, ConnectionCounts
from .types import GatewayManager

# manager stats field -> (metric name, help); all counters
_COUNTERS = {
    "published": ("gateway_broker_messages_published", "Envelopes published to the broker"),
    "published_bytes": ("gateway_broker_bytes_published", "Bytes published to the broker"),
    "publish_errors": ("gateway_broker_publish_errors",
                       "Envelopes the broker refused or that could not be encoded (lost)"),
    "received": ("gateway_broker_messages_received", "Envelopes received from the broker"),
    "received_bytes": ("gateway_broker_bytes_received", "Bytes received from the broker"),
    "delivered": ("gateway_messages_delivered", "Packets written to local sockets"),
    "unwanted": ("gateway_broker_messages_unwanted",
                 "Broker messages for rooms or sids with no local member (wasted receptions)"),
    "dropped_malformed": ("gateway_broker_messages_malformed",
                          "Broker payloads that failed to decode (dropped)"),
    "dropped_newer": ("gateway_broker_messages_newer",
                      "Envelopes of a newer format than this release reads, from a gateway "
                      "of a newer release (dropped, also counted as malformed; finish the "
                      "upgrade)"),
    "dropped_failed": ("gateway_broker_messages_failed",
                       "Broker payloads whose handling raised (dropped)"),
    "dropped_echo": ("gateway_broker_messages_echo", "Own publications handed back (dropped)"),
    "dropped_duplicate": ("gateway_broker_messages_duplicate",
                          "Second copies of multi-room emits (dropped by design)"),
    "delivery_errors": ("gateway_delivery_errors", "Writes to sockets that had closed"),
    "subscribe_ops": ("gateway_broker_subscribe_ops", "Subscribe operations sent to the broker"),
    "unsubscribe_ops": ("gateway_broker_unsubscribe_ops",
                        "Unsubscribe operations sent to the broker"),
    "subscription_errors": ("gateway_broker_subscription_errors",
                            "Subscribe/unsubscribe operations that failed"),
    "disconnects": ("gateway_broker_disconnects", "Times the broker connection was lost"),
    "cluster_requests": ("gateway_cluster_requests",
                         "Cluster-wide calls made by this node (fetch_sockets, room sizes ...)"),
    "cluster_timeouts": ("gateway_cluster_timeouts",
                         "Cluster-wide calls in which some node did not answer in time"),
    "cluster_received": ("gateway_cluster_messages_received",
                         "Envelopes of the cluster-wide API received from the broker, "
                         "heartbeats included (also in gateway_broker_messages_received)"),
    "cluster_received_bytes": ("gateway_cluster_bytes_received",
                               "Their bytes (also in gateway_broker_bytes_received)"),
    "recovery_attempts": ("gateway_sessions_recovery_attempts",
                          "Reconnects that asked to restore a session (--recovery)"),
    "recovered": ("gateway_sessions_recovered", "Sessions restored, missed packets replayed"),
    "recovery_refused": ("gateway_sessions_recovery_refused",
                         "Restores refused or failed (the client got a new session)"),
    "gap_disconnects": ("gateway_sessions_gap_disconnects",
                        "Sockets disconnected to recover because stored messages for them "
                        "were lost past repair (--recovery)"),
}


#: gap repair of stored traffic delivered live (--recovery; nats_adapter.brokers.gaps)
_REPAIRS = {
    "gaps_detected": ("gateway_stream_gaps_detected",
                      "Gaps in a subject's stored traffic as it came live (copies lost on the "
                      "way, or missed while the broker connection was down)"),
    "messages_repaired": ("gateway_stream_messages_repaired",
                          "Stored messages read back from the stream to fill those gaps"),
    "gaps_unrepairable": ("gateway_stream_gaps_unrepairable",
                          "Gaps whose messages the stream no longer holds (or could not be "
                          "read): the sockets they were for are disconnected to recover"),
}


class GatewayCollector(Collector):
    def __init__(self, node_id: str, manager: GatewayManager, chat: ChatProtocol,
                 guard: RequestGuard | None = None,
                 connections: ConnectionCounts | None = None,
                 forwarder: Forwarder | None = None) -> None:
        self.node_id = node_id
        self.forwarder = forwarder
        self.manager = manager
        self.chat = chat
        self.guard = guard
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        labels = ["node", "backend"]
        values = [self.node_id, m.broker.name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        yield gauge("gateway_connections", "Connected Socket.IO sockets", m.participants_count())
        yield gauge("gateway_rooms", "Rooms with local members", m.room_count())
        yield gauge("gateway_broker_subscriptions",
                    "Room/namespace channels this node holds broker interest in",
                    len(m.subscriptions))
        yield gauge("gateway_broker_subscriptions_lingering",
                    "Subscriptions kept after their last member left (linger)",
                    getattr(m.subscriptions, "lingering", 0))
        yield gauge("gateway_broker_connected", "1 when the broker connection is up",
                    1 if m.broker.connected else 0)
        server_count = getattr(m, "server_count", None)
        if server_count is not None:
            yield gauge("gateway_cluster_nodes", "Gateways alive in the cluster, this one "
                        "included (from their heartbeats)", server_count())
        stats = m.stats.as_dict()
        for field, (name, doc) in _COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, stats[field])
            yield c
        fanout = getattr(m, "fanout", None)
        writes = getattr(m, "websocket_writes", None)
        for name, doc, value in (
            ("gateway_slow_consumers_dropped", "Sockets dropped for not reading (send buffer full)",
             getattr(fanout, "slow_consumers_dropped", 0)),
            ("gateway_fanout_direct_writes", "Deliveries written straight to the websocket",
             getattr(fanout, "direct", 0)),
            ("gateway_fanout_queued_writes", "Deliveries that went through engine.io's queue",
             getattr(fanout, "queued", 0)),
            ("gateway_websocket_frames_written", "Websocket frames written to lean websocket "
             "connections (deliveries, acks, pings)", getattr(writes, "frames", 0)),
            ("gateway_websocket_sends", "Socket sends that carried them (frames written to "
             "one connection in one turn of the event loop go out together)",
             getattr(writes, "sends", 0)),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            yield c
        losses = CounterMetricFamily(
            "gateway_broker_losses", "Messages the broker client lost, by reason "
            "(slow_consumer: inbound messages dropped because this node fell behind; "
            "reconnect_buffer_full: publishes refused while no broker node was reachable, "
            "also counted in gateway_broker_publish_errors)", labels=[*labels, "reason"])
        for reason, count in sorted(m.broker.losses().items()):
            losses.add_metric([*values, reason], count)
        yield losses
        repairs = m.broker.repairs()
        for field, (name, doc) in _REPAIRS.items():
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, repairs.get(field, 0))
            yield c
        chats = CounterMetricFamily("gateway_chat_messages", "Chat messages accepted",
                                    labels=labels)
        chats.add_metric(values, self.chat.chats)
        yield chats
        published = getattr(self.chat, "publish_seconds", None)
        if published is not None:
            latency = HistogramMetricFamily(
                "gateway_chat_publish_seconds", "Time from a chat's publish to the answer its "
                "ack reports (the broker took it; with --recovery, the stream stored it)",
                labels=labels)
            latency.add_metric(values, published.cumulative(), published.total)
            yield latency
        for name, doc, value in (
            ("gateway_http_misdirected", "Requests refused for a Host this gateway does not "
             "serve (421)", self.guard.refused if self.guard else 0),
            ("gateway_connections_refused", "Connections refused over --max-connections (503)",
             self.connections.refused if self.connections else 0),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            yield c
        yield from _gc_metrics(labels, values)
        rejected = CounterMetricFamily(
            "gateway_broker_messages_rejected", "Envelopes from the broker dropped as not "
            "from a legitimate node, by reason (invalid: nothing a node could send; "
            "unsigned / forged / stale / replayed: with a cluster key)",
            labels=[*labels, "reason"])
        for reason in ("invalid", "unsigned", "forged", "stale", "replayed"):
            rejected.add_metric([*values, reason], stats[f"dropped_{reason}"])
        yield rejected
        refused = CounterMetricFamily("gateway_requests_refused",
                                      "Client requests answered ok:false, by reason",
                                      labels=[*labels, "reason"])
        for reason, count in sorted(self.chat.refused.items()):
            refused.add_metric([*values, reason], count)
        yield refused
        proxy = getattr(self.chat, "proxy", None)
        if proxy is not None:
            requests = CounterMetricFamily(
                "gateway_proxy_requests", "Questions to the application's connect and join "
                "proxies, by outcome (allowed, refused, cached; timeout, unreachable, "
                "status_<code>, circuit_open: refused as unavailable)",
                labels=[*labels, "proxy", "outcome"])
            answered = CounterMetricFamily("gateway_proxy_answers", "Answers the proxies "
                                           "gave (200, 401, 403)", labels=[*labels, "proxy"])
            seconds = CounterMetricFamily("gateway_proxy_answer_seconds", "Time those "
                                          "answers took", labels=[*labels, "proxy"])
            for kind, st in proxy.stats.items():
                for outcome, count in sorted(st.outcomes.items()):
                    requests.add_metric([*values, kind, outcome], count)
                answered.add_metric([*values, kind], st.answered)
                seconds.add_metric([*values, kind], st.seconds)
            yield from (requests, answered, seconds)
        forwarded = CounterMetricFamily(
            "gateway_forwarded_requests", "Requests of sessions another gateway owns, by "
            "outcome (polling / websocket: served through the owner; moved: a websocket "
            "upgrade whose session moved here; refused_unknown_node, refused_second_hop, "
            "failed: answered 400 Session ID unknown)",
            labels=[*labels, "kind"])
        counts = self.forwarder.counts if self.forwarder is not None else {}
        for kind in ("polling", "websocket", "moved", "refused_unknown_node",
                     "refused_second_hop", "failed"):
            forwarded.add_metric([*values, kind], counts.get(kind, 0))
        yield forwarded
        moves = CounterMetricFamily(
            "gateway_session_moves", "Sessions moved between gateways on a websocket "
            "upgrade: taken here (moved), given to another gateway (given), and upgrades "
            "whose session could not move here, by reason (then spliced to the owner)",
            labels=[*labels, "outcome"])
        handover = getattr(self.manager, "handover", None)  # (a cluster manager's)
        move_counts = handover.counts if isinstance(handover, Handover) else {}
        for outcome in ("moved", "given", *(f"failed_{r}" for r in MOVE_FAILURES)):
            moves.add_metric([*values, outcome], move_counts.get(outcome, 0))
        yield moves


def _gc_metrics(labels: list[str], values: list[str]) -> Iterator[Metric]:
    by_gen = [*labels, "generation"]
    collections = CounterMetricFamily("gateway_gc_collections",
                                      "Garbage collections, by generation", labels=by_gen)
    paused = CounterMetricFamily("gateway_gc_pause_seconds", "Time the event loop stood "
                                 "still for garbage collection, by generation", labels=by_gen)
    longest = GaugeMetricFamily("gateway_gc_longest_pause_seconds",
                                "The longest such pause, by generation", labels=by_gen)
    for gen in range(3):
        at = [*values, str(gen)]
        collections.add_metric(at, GC_PAUSES.collections[gen])
        paused.add_metric(at, GC_PAUSES.seconds[gen])
        longest.add_metric(at, GC_PAUSES.longest[gen])
    frozen = GaugeMetricFamily("gateway_gc_frozen_objects", "Objects of the start-up kept "
                               "out of garbage collection (gc.freeze)", labels=labels)
    frozen.add_metric(values, GC_PAUSES.frozen)
    yield from (collections, paused, longest, frozen)


def make_registry(node_id: str, manager: GatewayManager, chat: ChatProtocol,
                  guard: RequestGuard | None = None,
                  connections: ConnectionCounts | None = None,
                  forwarder: Forwarder | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(node_id, manager, chat, guard, connections, forwarder))
    # process_open_fds / process_max_fds (each socket holds one), memory, CPU
    ProcessCollector(registry=registry)
    return registry
