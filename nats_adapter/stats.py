"""Counters a manager keeps; the service exports them (the library installs no registry)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class ManagerStats:
    """Monotonic counters since the manager started (gauges are read elsewhere)."""

    #: envelopes handed to the transport
    published: int = 0
    #: envelopes the transport refused (broker down, buffer full): lost, not silent
    publish_errors: int = 0
    #: envelopes received from the broker
    received: int = 0
    #: bytes received from the broker
    received_bytes: int = 0
    #: bytes handed to the transport
    published_bytes: int = 0
    #: packets written to local sockets (one per recipient)
    delivered: int = 0
    #: received room messages this node had no local recipient for (wasted receptions)
    unwanted: int = 0
    #: payloads from the bus that failed to decode (dropped)
    dropped_malformed: int = 0
    #: envelopes of a newer format than this release reads (a mixed-release cluster)
    dropped_newer: int = 0
    #: payloads whose handling raised (dropped)
    dropped_failed: int = 0
    #: own publications handed back by a broker without no-echo (dropped)
    dropped_echo: int = 0
    #: second copies of a multi-channel emit (dropped by design)
    dropped_duplicate: int = 0
    #: envelopes no node could legitimately send: a non-event packet, a namespace
    #: mismatch, an ack nobody asked for, a room operation past the client limits
    dropped_invalid: int = 0
    #: with a cluster key: envelopes without a seal, with a wrong one, with a
    #: timestamp too far from this clock, or seen before (replayed)
    dropped_unsigned: int = 0
    dropped_forged: int = 0
    dropped_stale: int = 0
    dropped_replayed: int = 0
    #: writes to local sockets that were already closed
    delivery_errors: int = 0
    #: subscribe / unsubscribe operations sent to the broker
    subscribe_ops: int = 0
    unsubscribe_ops: int = 0
    #: subscribe / unsubscribe operations that failed
    subscription_errors: int = 0
    #: times the broker connection was lost
    disconnects: int = 0
    #: cluster-wide calls made by this node (fetch_sockets, sockets_join ...), and
    #: those that ended with a node not answering in time
    cluster_requests: int = 0
    cluster_timeouts: int = 0
    #: envelopes of the cluster API received (heartbeats included; part of received)
    cluster_received: int = 0
    #: their bytes (part of received_bytes)
    cluster_received_bytes: int = 0
    #: connection state recovery: reconnects that asked to restore a session, those
    #: refused (a new session instead), and sessions restored
    recovery_attempts: int = 0
    recovery_refused: int = 0
    recovered: int = 0
    #: sockets disconnected (recoverably) because stored messages meant for them were
    #: lost past repair (see nats_adapter.brokers.gaps)
    gap_disconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
