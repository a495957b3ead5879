"""Brokers: each moves envelopes between nodes over one kind of pub/sub system.

``base`` holds the interface the node core programs against; ``nats``,
``redis_sharded`` and ``memory`` implement it. No broker imports the core.
"""

from .base import Broker, BrokerError, BrokerHandler

__all__ = ["Broker", "BrokerError", "BrokerHandler"]
