"""Room subscriptions: one broker subscription per channel with local members,
confirmed before a join counts, released after the linger, in order per channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest

from nats_adapter.brokers.base import Broker, BrokerError
from nats_adapter.stats import ManagerStats
from nats_adapter.subscriptions import RoomSubscriptions
from tests.helpers import wait_for_condition

LINGER = 0.05


class RecordingBroker:
    """What RoomSubscriptions uses of a broker (subscribe, unsubscribe), recorded;
    subscribes fail or hang on demand."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []
        self.failures = 0  #: the next this many subscribes fail
        self.hold: asyncio.Event | None = None  #: set: subscribes wait for it

    async def subscribe(self, channel: str) -> None:
        self.ops.append(("subscribe", channel))
        if self.hold is not None:
            await self.hold.wait()
        if self.failures:
            self.failures -= 1
            raise BrokerError("refused")

    async def unsubscribe(self, channel: str) -> None:
        self.ops.append(("unsubscribe", channel))


def subscriptions_on(broker: RecordingBroker, linger: float = LINGER,
                     stats: ManagerStats | None = None) -> RoomSubscriptions:
    return RoomSubscriptions(cast(Broker, broker), stats or ManagerStats(), linger=linger)


@pytest.fixture
async def subs() -> AsyncIterator[tuple[RoomSubscriptions, RecordingBroker, ManagerStats]]:
    broker, stats = RecordingBroker(), ManagerStats()
    subscriptions = subscriptions_on(broker, stats=stats)
    try:
        yield subscriptions, broker, stats
    finally:
        await subscriptions.close()


Subs = tuple[RoomSubscriptions, RecordingBroker, ManagerStats]


async def test_a_channel_is_subscribed_once_and_ready_once_confirmed(subs: Subs) -> None:
    subscriptions, broker, stats = subs
    subscriptions.acquire("room.a")
    assert "room.a" in subscriptions and len(subscriptions) == 1
    assert await subscriptions.ready("room.a", 1.0)
    assert await subscriptions.ready("room.a", 1.0)  # already held: no second subscribe
    assert broker.ops == [("subscribe", "room.a")]
    assert stats.subscribe_ops == 1


async def test_a_released_channel_lingers_then_is_unsubscribed(subs: Subs) -> None:
    subscriptions, broker, stats = subs
    subscriptions.acquire("room.a")
    assert await subscriptions.ready("room.a", 1.0)
    subscriptions.release("room.a")
    assert "room.a" in subscriptions and subscriptions.lingering == 1
    await wait_for_condition(lambda: ("unsubscribe", "room.a") in broker.ops,
                             "the unsubscribe after the linger")
    assert "room.a" not in subscriptions and len(subscriptions) == 0
    assert stats.unsubscribe_ops == 1


async def test_a_channel_acquired_again_within_the_linger_costs_no_broker_op(
        subs: Subs) -> None:
    subscriptions, broker, _ = subs
    subscriptions.acquire("room.a")
    assert await subscriptions.ready("room.a", 1.0)
    subscriptions.release("room.a")
    subscriptions.acquire("room.a")
    assert subscriptions.lingering == 0
    # a later channel's whole linger passing shows this one's would have passed too
    subscriptions.acquire("room.b")
    assert await subscriptions.ready("room.b", 1.0)
    subscriptions.release("room.b")
    await wait_for_condition(lambda: ("unsubscribe", "room.b") in broker.ops, "room.b to go")
    assert broker.ops.count(("subscribe", "room.a")) == 1
    assert ("unsubscribe", "room.a") not in broker.ops
    assert await subscriptions.ready("room.a", 1.0)


async def test_without_a_linger_a_release_unsubscribes_at_once() -> None:
    broker = RecordingBroker()
    subscriptions = subscriptions_on(broker, linger=0)
    try:
        subscriptions.acquire("room.a")
        assert await subscriptions.ready("room.a", 1.0)
        subscriptions.release("room.a")
        assert "room.a" not in subscriptions
        await wait_for_condition(lambda: ("unsubscribe", "room.a") in broker.ops,
                                 "the unsubscribe")
    finally:
        await subscriptions.close()


async def test_a_failed_subscribe_is_counted_and_tried_again_by_ready(subs: Subs) -> None:
    subscriptions, broker, stats = subs
    broker.failures = 2
    subscriptions.acquire("room.a")
    assert await subscriptions.ready("room.a", 5.0)
    assert broker.ops == [("subscribe", "room.a")] * 3
    assert stats.subscription_errors == 2


async def test_ready_gives_up_after_its_timeout_while_the_broker_does_not_confirm(
        subs: Subs) -> None:
    subscriptions, broker, _ = subs
    broker.hold = asyncio.Event()
    subscriptions.acquire("room.a")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await subscriptions.ready("room.a", 0.2)
    assert loop.time() - started >= 0.2
    broker.hold.set()  # the broker answers after all: the channel counts from then on
    assert await subscriptions.ready("room.a", 1.0)


async def test_ready_is_false_for_a_channel_nobody_holds(subs: Subs) -> None:
    subscriptions, broker, _ = subs
    assert not await subscriptions.ready("room.never", 1.0)
    assert broker.ops == []


async def test_operations_reach_the_broker_in_the_order_requested(subs: Subs) -> None:
    subscriptions, broker, _ = subs
    broker.hold = asyncio.Event()
    subscriptions.acquire("room.a")  # its subscribe waits for the broker
    await wait_for_condition(lambda: bool(broker.ops), "the subscribe to start")
    subscriptions.release("room.a")
    await wait_for_condition(lambda: subscriptions.lingering == 0,
                             "the linger to run out while the subscribe waits")
    assert broker.ops == [("subscribe", "room.a")]
    broker.hold.set()
    await wait_for_condition(lambda: len(broker.ops) == 2, "the unsubscribe")
    assert broker.ops == [("subscribe", "room.a"), ("unsubscribe", "room.a")]
    assert len(subscriptions) == 0


def test_a_negative_linger_is_refused() -> None:
    with pytest.raises(ValueError, match="linger must be >= 0"):
        subscriptions_on(RecordingBroker(), linger=-1)
