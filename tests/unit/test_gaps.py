"""The gap tracker of stored traffic delivered live (nats_adapter.brokers.gaps), against a
store in a dict: copies out of order, twice, with holes, past retention, after a purge."""

from __future__ import annotations

import asyncio

import pytest

from nats_adapter.brokers.gaps import GapRepair, RangeLost, subject_matches
from tests.helpers import wait_for_condition

A, B = "sio.live.room._2F.a", "sio.live.room._2F.b"


class Store:
    """What the stream holds: subject -> {seq: data}; a fetch may be held by a gate."""

    def __init__(self) -> None:
        self.messages: dict[str, dict[int, bytes]] = {}
        self.seq = 0
        self.last: dict[str, int] = {}
        self.gate: asyncio.Event | None = None
        self.fetches: list[tuple[str, int, int]] = []
        self.failures = 0
        #: the first sequence still stored (older ones expired or purged)
        self.first = 1

    def store(self, subject: str) -> tuple[int, int, bytes]:
        """Store one message: its copy as it comes live (seq, previous, data)."""
        self.seq += 1
        previous = self.last.get(subject, 0)
        self.last[subject] = self.seq
        data = f"{subject}#{self.seq}".encode()
        self.messages.setdefault(subject, {})[self.seq] = data
        return self.seq, previous, data

    def purge(self) -> None:
        self.messages.clear()
        self.last.clear()
        self.first = self.seq + 1

    async def fetch(self, subject: str, after: int, until: int) -> list[tuple[int, bytes]]:
        self.fetches.append((subject, after, until))
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the store did not answer")
        if self.first > after + 1:
            raise RangeLost(f"the stream starts at {self.first}")
        return sorted((s, d) for s, d in self.messages.get(subject, {}).items()
                      if after < s <= until)

    async def tail(self, subject: str) -> int | None:
        held = self.messages.get(subject)
        return max(held) if held else None


class Node:
    def __init__(self, store: Store, retention: float = 600.0, give_up_after: float = 10.0
                 ) -> None:
        self.now = 1000.0
        self.delivered: list[tuple[str, int]] = []
        self.lost: list[str] = []
        #: what the node heard, in order: ("deliver", seq) and ("lost", 0)
        self.heard: list[tuple[str, int]] = []
        self.gaps = GapRepair(store.fetch, self.deliver, self.on_lost, retention,
                              give_up_after=give_up_after, clock=lambda: self.now)

    async def deliver(self, subject: str, data: bytes, seq: int) -> None:
        assert data == f"{subject}#{seq}".encode()
        self.delivered.append((subject, seq))
        self.heard.append(("deliver", seq))

    def on_lost(self, subject: str) -> None:
        self.lost.append(subject)
        self.heard.append(("lost", 0))

    def seqs(self, subject: str = A) -> list[int]:
        return [seq for s, seq in self.delivered if s == subject]

    async def settled(self) -> None:
        await wait_for_condition(lambda: not self.gaps.repairing, "repairs to end", timeout=5)


@pytest.fixture
def store() -> Store:
    return Store()


async def test_copies_in_order_are_delivered_as_they_come(store: Store) -> None:
    node = Node(store)
    for _ in range(5):
        await node.gaps.arrive(A, *store.store(A))
    assert node.seqs() == [1, 2, 3, 4, 5]
    assert store.fetches == [] and node.gaps.gaps == 0


async def test_a_subjects_first_copy_starts_it_whatever_came_before(store: Store) -> None:
    node = Node(store)
    for _ in range(3):
        store.store(A)  # stored before this node subscribed: not its to deliver
    await node.gaps.arrive(A, *store.store(A))
    assert node.seqs() == [4] and store.fetches == []


async def test_a_copy_that_comes_twice_is_delivered_once(store: Store) -> None:
    node = Node(store)
    first, second = store.store(A), store.store(A)
    for copy in (first, second, first, second):
        await node.gaps.arrive(A, *copy)
    assert node.seqs() == [1, 2] and node.gaps.duplicates == 2


async def test_a_hole_is_read_back_before_the_copy_after_it(store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    store.store(A)  # 2 and 3 lost on the way
    store.store(A)
    await node.gaps.arrive(A, *store.store(A))
    await node.settled()
    assert node.seqs() == [1, 2, 3, 4]
    assert store.fetches == [(A, 1, 3)]
    assert (node.gaps.gaps, node.gaps.repaired, node.gaps.unrepairable) == (1, 2, 0)


async def test_newer_copies_wait_for_the_repair_and_come_in_order_once(store: Store) -> None:
    node = Node(store)
    store.gate = asyncio.Event()
    await node.gaps.arrive(A, *store.store(A))
    lost = store.store(A)
    c3, c4, c5 = store.store(A), store.store(A), store.store(A)
    await node.gaps.arrive(A, *c3)  # a gap: held while 2 is read
    await wait_for_condition(lambda: store.fetches, "the repair to read")
    for copy in (c5, c4, lost, c3):  # out of order, and twice, while the repair waits
        await node.gaps.arrive(A, *copy)
    assert node.seqs() == [1]
    store.gate.set()
    await node.settled()
    assert node.seqs() == [1, 2, 3, 4, 5]
    assert store.fetches == [(A, 1, 2)]
    await node.gaps.arrive(A, *store.store(A))
    assert node.seqs() == [1, 2, 3, 4, 5, 6]


async def test_a_gap_holds_only_its_own_subject(store: Store) -> None:
    node = Node(store)
    store.gate = asyncio.Event()
    await node.gaps.arrive(A, *store.store(A))
    await node.gaps.arrive(B, *store.store(B))
    store.store(A)
    await node.gaps.arrive(A, *store.store(A))
    await node.gaps.arrive(B, *store.store(B))
    assert node.seqs(A) == [1] and node.seqs(B) == [2, 5]
    store.gate.set()
    await node.settled()
    assert node.seqs(A) == [1, 3, 4]


async def test_a_range_the_store_no_longer_holds_is_reported_lost(store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    store.store(A)
    del store.messages[A][2]  # dropped from the store (a limit) before it could be read
    await node.gaps.arrive(A, *store.store(A))
    await node.settled()
    assert node.seqs() == [1, 3]
    assert node.lost == [A] and node.gaps.unrepairable == 1
    # told before anything newer: the node can keep it from the sockets concerned
    assert node.heard == [("deliver", 1), ("lost", 0), ("deliver", 3)]


async def test_a_range_whose_start_is_gone_is_reported_lost(store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    store.store(A)  # lost on the way, then purged; then one more lost, and one more
    store.purge()
    store.store(A)
    await node.gaps.arrive(A, *store.store(A))
    await node.settled()
    assert node.seqs() == [1, 4] and node.lost == [A] and node.gaps.repaired == 0


async def test_a_purged_subject_is_reported_lost_within_the_retention(store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    store.store(A)  # lost on the way, then purged: the next copy names no predecessor
    store.purge()
    await node.gaps.arrive(A, *store.store(A))
    await node.settled()
    assert node.seqs() == [1, 3] and node.lost == [A]


async def test_a_purge_after_every_message_was_delivered_loses_nothing(store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    await node.gaps.arrive(A, *store.store(A))
    store.purge()
    await node.gaps.arrive(A, *store.store(A))
    await node.settled()
    assert node.seqs() == [1, 2, 3] and node.lost == []


async def test_a_subject_silent_past_the_retention_starts_again_quietly(store: Store) -> None:
    node = Node(store, retention=600)
    await node.gaps.arrive(A, *store.store(A))
    node.now += 700  # its messages expired: the next copy names no predecessor
    store.purge()
    await node.gaps.arrive(A, *store.store(A))
    assert node.seqs() == [1, 2] and node.lost == []


async def test_a_store_that_fails_is_asked_again_then_given_up_on(store: Store) -> None:
    node = Node(store, give_up_after=0.5)
    await node.gaps.arrive(A, *store.store(A))
    store.store(A)
    store.failures = 1
    await node.gaps.arrive(A, *store.store(A))
    await node.settled()
    assert node.seqs() == [1, 2, 3] and len(store.fetches) == 2 and node.lost == []
    store.store(A)
    store.failures = 1000
    await node.gaps.arrive(A, *store.store(A))
    node.now += 1  # the give-up deadline passes at the next failure
    await node.settled()
    assert node.seqs() == [1, 2, 3, 5] and node.lost == [A]


async def test_after_a_reconnect_what_was_stored_meanwhile_is_read(store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    await node.gaps.arrive(B, *store.store(B))
    store.store(A)  # stored while the connection was down: no copy will come
    store.store(A)
    await node.gaps.check_tails(store.tail)
    await node.settled()
    assert node.seqs(A) == [1, 3, 4] and node.seqs(B) == [2]
    await node.gaps.check_tails(store.tail)  # nothing new: nothing read
    await node.settled()
    assert store.fetches == [(A, 1, 4)]


async def test_tails_the_store_did_not_answer_for_are_asked_again(store: Store) -> None:
    node = Node(store)
    node.gaps.tail_retry_after = 0.01
    await node.gaps.arrive(A, *store.store(A))
    store.store(A)
    asked: list[str] = []

    async def tail(subject: str) -> int | None:
        asked.append(subject)
        if len(asked) == 1:
            raise TimeoutError("no leader")
        return await store.tail(subject)

    await node.gaps.check_tails(tail)
    await node.settled()
    assert asked == [A, A] and node.seqs() == [1, 2]


async def test_a_forgotten_subject_starts_afresh(store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    node.gaps.forget("sio.live.room.*.>")
    store.store(A)  # sent while this node was not subscribed: not its to deliver
    await node.gaps.arrive(A, *store.store(A))
    assert node.seqs() == [1, 3] and store.fetches == []


async def test_subjects_silent_past_the_retention_are_forgotten(store: Store) -> None:
    node = Node(store, retention=600)
    await node.gaps.arrive(A, *store.store(A))
    node.now += 700
    await node.gaps.arrive(B, *store.store(B))
    assert node.gaps.subjects == [B]


async def test_a_sockets_subject_is_forgotten_among_many(store: Store) -> None:
    node = Node(store)
    subjects = [f"sio.live.sid.{ns}.node1.s{i}" for ns in ("_2F", "chat") for i in range(3)]
    for subject in subjects:
        await node.gaps.arrive(subject, *store.store(subject))
    node.gaps.forget("sio.live.sid.*.node1.s1")
    assert sorted(node.gaps.subjects) == sorted(s for s in subjects if not s.endswith("s1"))
    node.gaps.forget("sio.live.sid.*.node1.*")
    node.gaps.forget(A)  # not tracked: nothing to do
    assert node.gaps.subjects == []


def test_subject_patterns() -> None:
    assert subject_matches("a.*.c", "a.b.c")
    assert not subject_matches("a.*.c", "a.b.c.d")
    assert subject_matches("a.>", "a.b.c")
    assert not subject_matches("a.>", "a")
    assert subject_matches("a.b", "a.b") and not subject_matches("a.b", "a.c")


async def test_after_a_reconnect_every_room_waits_for_what_was_missed(store: Store) -> None:
    """A socket in rooms A and B: after the reconnect, B's newer copy must not come
    before A's older messages read back from the store, or the socket's offset would
    go back (and a restore from it would send B's again). The hour's soak saw this
    after a NATS node was killed."""
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    await node.gaps.arrive(B, *store.store(B))
    node.gaps.hold()  # the connection dropped
    store.store(A)  # stored meanwhile: no copy of it will come
    store.store(A)
    # the reconnect: a copy of B comes before the tail checks answer
    await node.gaps.arrive(B, *store.store(B))
    assert node.seqs(B) == [2]
    await node.gaps.check_tails_held(store.tail)
    await wait_for_condition(lambda: node.seqs(B) == [2, 5], "the held copy of B")
    assert [seq for _, seq in node.delivered] == [1, 2, 3, 4, 5]
    # held no more: copies go on
    await node.gaps.arrive(A, *store.store(A))
    await wait_for_condition(lambda: node.delivered[-1] == (A, 6), "the next copy")
    assert not node.gaps.holding


async def test_copies_that_come_while_the_held_ones_drain_keep_the_order(
        store: Store) -> None:
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    node.gaps.hold()
    held = [store.store(A) for _ in range(3)]
    for copy in held:
        await node.gaps.arrive(A, *copy)
    node.gaps.release()
    later = store.store(A)
    await node.gaps.arrive(A, *later)  # while the drain runs
    await wait_for_condition(lambda: len(node.seqs()) == 5, "every copy")
    assert node.seqs() == [1, 2, 3, 4, 5]


async def test_a_tail_check_that_hangs_holds_newer_copies_for_a_bounded_time(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream electing its leader answers no tail: after HOLD_AT_MOST the copies
    kept go on (the check carries on behind them)."""
    from nats_adapter.brokers import gaps

    monkeypatch.setattr(gaps, "HOLD_AT_MOST", 0.05)
    node = Node(store)
    await node.gaps.arrive(A, *store.store(A))
    node.gaps.hold()
    await node.gaps.arrive(A, *store.store(A))
    answer = asyncio.Event()

    async def tail(subject: str) -> int | None:
        await answer.wait()
        return await store.tail(subject)

    check = asyncio.get_running_loop().create_task(node.gaps.check_tails_held(tail))
    await wait_for_condition(lambda: node.seqs() == [1, 2], "the held copy, released")
    answer.set()
    await check
    assert node.seqs() == [1, 2]
