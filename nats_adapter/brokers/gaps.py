"""Gap repair for stored traffic delivered live: every subject's messages in the
store's order, none missing, none twice.

The message store re-publishes each stored message on its live subject with its
stream sequence and the sequence of the message stored before it on the same
subject (nats-server's ``Nats-Sequence`` and ``Nats-Last-Sequence`` headers on a
re-published copy; 0 when it is the subject's first). A node that remembers the
last sequence it delivered on a subject can tell that copies went missing on the
way (a partition, a slow-consumer drop, its own connection re-established): the
next copy names a predecessor it never delivered.

:class:`GapRepair` then reads the missing range of that subject from the store and
delivers it before the copy, holding the subject's newer copies meanwhile; other
subjects carry on. Copies it has delivered (by sequence) are dropped if they come
again. Where the range is gone (past the store's retention, or dropped early: a
purge, a size limit), it says so (``lost``) and carries on from the newer copy.

While a node's broker connection is down and until the tail checks after its
reconnect (and the repairs they start) are done, :meth:`GapRepair.hold` keeps every
copy that comes, of every subject; they are then handed on in the store's order. A
socket in several rooms would otherwise get a newer message of one room before an
older one of another read back from the store: its offset would go back, and a
restore from that offset would send it the newer one again (the hour's soak saw 11
such after a NATS node was killed). A gap seen from a later copy (a partition, a
slow-consumer drop) is repaired per subject: other subjects carry on meanwhile.

A subject's first copy sets where it starts: what was stored before a node
subscribed is not its to deliver. Forget a subject when its subscription ends, so
a later subscription starts afresh. A subject silent for longer than the store
keeps messages starts afresh too (and is forgotten meanwhile): a copy lost right
after such a silence is not seen.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: (live subject, after, until) -> the stored (sequence, data) of that subject with
#: ``after < sequence <= until``, in order; raises :class:`RangeLost` when the store
#: no longer holds every message after ``after``, another error when it cannot be read
Fetch = Callable[[str, int, int], Awaitable[list[tuple[int, bytes]]]]
#: (live subject, data, sequence): hand one message on, in order; must not raise
Deliver = Callable[[str, bytes, int], Awaitable[None]]
#: (live subject): messages of it are lost for good; called before anything newer on
#: that subject is delivered
Lost = Callable[[str], None]
#: (live subject) -> the sequence of the last message stored on it, None if none
Tail = Callable[[str], Awaitable["int | None"]]

#: seconds a repair keeps trying to read the store before it calls the range lost
GIVE_UP_AFTER = 10.0
#: tail look-ups under way at once after a reconnect
TAIL_CONCURRENCY = 8
#: rounds of tail look-ups for the subjects the store did not answer for, and the
#: seconds before the first retry (growing)
TAIL_ROUNDS = 3
TAIL_RETRY_AFTER = 2.0
#: seconds at most the copies of every subject are held after a reconnect, waiting
#: for its tail checks and their repairs (then handed on whatever is left undone)
HOLD_AT_MOST = 5.0


#: what to do with a copy (GapRepair._step)
_DUPLICATE, _DELIVER = object(), object()


class RangeLost(Exception):
    """The store no longer holds some of the messages asked for (their start)."""


@dataclass(slots=True)
class _Subject:
    #: the last sequence delivered
    last: int
    #: monotonic time of that delivery
    at: float
    #: copies waiting for a repair: (sequence, tie-break, predecessor, data); data None
    #: for a mark that asks to read up to and including the sequence (a tail check)
    held: list[tuple[int, int, int | None, bytes | None]] = field(default_factory=list)
    repairing: bool = False


class GapRepair:
    """Delivers the stored copies of each subject in order, exactly once, repairing
    gaps from the store (see the module).

    :param fetch: reads a missing range from the store.
    :param deliver: hands one message on (the node's ingest).
    :param lost: told of a subject whose missing range cannot be read.
    :param retention: seconds the store keeps a message at least: a subject silent
        for longer starts afresh with its next copy (what came before is gone).
    :param give_up_after: seconds a repair tries reading the store before it calls
        the range lost (the subject's newer copies wait meanwhile).
    """

    def __init__(self, fetch: Fetch, deliver: Deliver, lost: Lost, retention: float,
                 give_up_after: float = GIVE_UP_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._deliver = deliver
        self._lost = lost
        self.retention = retention
        self.give_up_after = give_up_after
        #: seconds before tail look-ups the store did not answer are asked again
        self.tail_retry_after = TAIL_RETRY_AFTER
        self._clock = clock
        self._subjects: dict[str, _Subject] = {}
        #: the subjects by their last token (see forget)
        self._by_last_token: dict[str, set[str]] = {}
        self._ties = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        #: when subjects silent past the retention are next forgotten (see _sweep)
        self._next_sweep = clock() + retention / 4
        #: gaps seen (a missing range, or messages missing after a reconnect)
        self.gaps = 0
        #: messages read from the store and delivered to fill them
        self.repaired = 0
        #: gaps whose messages could not be read (past retention, purged, unreadable)
        self.unrepairable = 0
        #: copies dropped because their sequence was delivered already
        self.duplicates = 0
        #: holds under way (see hold) and the copies they keep, in the store's order:
        #: (sequence, tie-break, subject, predecessor, data)
        self._holds = 0
        self._held: list[tuple[int, int, str, int | None, bytes]] = []
        self._drain_task: asyncio.Task[None] | None = None

    def stats(self) -> dict[str, int]:
        return {"gaps_detected": self.gaps, "messages_repaired": self.repaired,
                "gaps_unrepairable": self.unrepairable, "duplicates_dropped": self.duplicates}

    @property
    def repairing(self) -> int:
        """Repairs under way."""
        return len(self._tasks)

    @property
    def subjects(self) -> list[str]:
        return list(self._subjects)

    def last(self, subject: str) -> int | None:
        """The last sequence delivered on ``subject`` (None: not tracked)."""
        s = self._subjects.get(subject)
        return s.last if s is not None else None

    async def arrive(self, subject: str, seq: int, previous: int | None, data: bytes) -> None:
        """A copy came live: deliver it now, drop it (delivered already), or hold it
        while the range before it is read from the store."""
        if self._holds or self._drain_task is not None:
            heapq.heappush(self._held, (seq, next(self._ties), subject, previous, data))
            return
        await self._arrive(subject, seq, previous, data)

    def hold(self) -> None:
        """Keep every copy that comes until :meth:`release` (the connection dropped:
        what was stored meanwhile is read back before anything newer)."""
        self._holds += 1

    def release(self) -> None:
        """End one :meth:`hold`; after the last, the copies kept are handed on in the
        store's order (those that come meanwhile join them)."""
        self._holds = max(0, self._holds - 1)
        if not self._holds and self._held and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    @property
    def holding(self) -> bool:
        return bool(self._holds)

    async def _drain(self) -> None:
        try:
            while self._held and not self._holds:
                seq, _, subject, previous, data = heapq.heappop(self._held)
                await self._arrive(subject, seq, previous, data)
        finally:
            self._drain_task = None

    async def check_tails_held(self, tail: Tail) -> None:
        """After a reconnect: every tracked subject's tail checked and what it misses
        read back, then the copies :meth:`hold` kept handed on (ends one hold)."""
        async def checked() -> None:
            await self.check_tails(tail)
            while self._tasks:  # the repairs the checks started
                await asyncio.gather(*self._tasks, return_exceptions=True)

        check = asyncio.get_running_loop().create_task(checked())
        try:
            # past HOLD_AT_MOST (a stream electing its leader answers no tail), newer
            # copies go on and the checks carry on behind them (each subject still in
            # order, the rooms of one socket maybe not)
            done, _ = await asyncio.wait([check], timeout=HOLD_AT_MOST)
        except BaseException:
            check.cancel()
            raise
        finally:
            self.release()
        if not done:
            logger.warning("reading what was stored while disconnected takes over %.0f s: "
                           "newer messages are delivered meanwhile", HOLD_AT_MOST)
        await check  # (cancelled with this one: a later reconnect checks again)

    async def _arrive(self, subject: str, seq: int, previous: int | None,
                      data: bytes) -> None:
        s = self._subjects.get(subject)
        if s is None or self._silent(s):
            now = self._clock()
            if now >= self._next_sweep:
                self._sweep(now)
            if s is None:
                self._by_last_token.setdefault(subject.rpartition(".")[2], set()).add(subject)
            self._subjects[subject] = _Subject(seq, now)
            await self._hand_on(subject, data, seq)
            return
        if s.repairing:
            heapq.heappush(s.held, (seq, next(self._ties), previous, data))
            return
        step = self._step(s, seq, previous, data)
        if step is _DUPLICATE:
            self.duplicates += 1
        elif step is _DELIVER:
            await self._in_order(subject, s, seq, data)
        else:
            self.gaps += 1
            heapq.heappush(s.held, (seq, next(self._ties), previous, data))
            self._start(subject, s)

    def expect(self, subject: str, tail: int) -> None:
        """The store holds messages of ``subject`` up to ``tail``: read what this
        node has not delivered (after its connection was re-established)."""
        s = self._subjects.get(subject)
        if s is None or tail <= s.last or self._silent(s):
            return
        heapq.heappush(s.held, (tail, next(self._ties), None, None))
        if not s.repairing:
            self.gaps += 1
            self._start(subject, s)

    async def check_tails(self, tail: Tail, subjects: list[str] | None = None) -> None:
        """Ask the store for the last sequence of ``subjects`` (every tracked one by
        default) and read what came after the last one delivered (see
        :meth:`expect`). Subjects the store did not answer for (a leader election)
        are asked again, TAIL_ROUNDS times at most."""
        limit = asyncio.Semaphore(TAIL_CONCURRENCY)
        failed: list[str] = []
        problem: Exception | None = None

        async def check(subject: str) -> None:
            nonlocal problem
            async with limit:
                try:
                    last = await tail(subject)
                except Exception as exc:
                    failed.append(subject)
                    problem = exc
                    return
            if last is not None:
                self.expect(subject, last)

        pending = self.subjects if subjects is None else subjects
        for attempt in range(TAIL_ROUNDS):
            failed.clear()
            await asyncio.gather(*(check(subject) for subject in pending
                                   if subject in self._subjects))
            if not failed:
                return
            pending = list(failed)
            if attempt + 1 == TAIL_ROUNDS:
                logger.warning("could not read the last message of %d subject(s) (%r): "
                               "their next copy will show what is missing", len(pending),
                               problem)
                return
            logger.info("could not read the last message of %d subject(s) (%r); asking "
                        "again", len(pending), problem)
            await asyncio.sleep(self.tail_retry_after * (attempt + 1))  # backing off

    def forget(self, pattern: str) -> None:
        """The subscription ``pattern`` (NATS wildcards allowed) ended: forget the
        subjects it matched (a repair under way stops)."""
        if "*" not in pattern and ">" not in pattern:
            if pattern in self._subjects:
                self._drop(pattern)
            return
        last = pattern.rpartition(".")[2]
        # a socket's own subject (one namespace token a wildcard): only those that end
        # as it does are looked at, not every subject (many sockets leave at once)
        candidates = self._subjects if last in ("*", ">") \
            else self._by_last_token.get(last, ())
        for subject in [s for s in candidates if subject_matches(pattern, s)]:
            self._drop(subject)

    def _drop(self, subject: str) -> None:
        del self._subjects[subject]
        last = subject.rpartition(".")[2]
        same = self._by_last_token.get(last)
        if same is not None:
            same.discard(subject)
            if not same:
                del self._by_last_token[last]

    async def close(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            await asyncio.gather(self._drain_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals -------------------------------------------------------------------

    def _step(self, s: _Subject, seq: int, previous: int | None, data: bytes | None
              ) -> object | tuple[int, bool]:
        """What to do with a copy (or a tail mark, ``data`` None): _DUPLICATE,
        _DELIVER, or (until, required): first read the subject's messages after
        ``s.last`` up to ``until``, among which ``until`` must be when ``required``."""
        if seq <= s.last:
            return _DUPLICATE
        if data is None:
            return seq, True  # a tail mark: everything up to the tail
        if previous is None or previous == s.last:
            return _DELIVER
        if previous > s.last:
            return previous, True  # copies went missing on the way
        # A predecessor older than the last one delivered: the subject's history was
        # dropped from the store (a purge, a size limit): the store says whether
        # anything after the last one delivered is gone
        return seq - 1, False

    def _silent(self, s: _Subject) -> bool:
        """Whether nothing was delivered on the subject for longer than the store keeps
        messages: what came before is gone from the store, so it starts afresh."""
        return not s.repairing and self._clock() - s.at > self.retention

    async def _in_order(self, subject: str, s: _Subject, seq: int, data: bytes) -> None:
        s.last, s.at = seq, self._clock()
        await self._hand_on(subject, data, seq)

    def _sweep(self, now: float) -> None:
        """Forget the subjects silent past the retention (a wildcard subscription's,
        such as the sockets' own subjects, are never unsubscribed one by one): their
        next copy starts them afresh, as it would find nothing to read back anyway."""
        self._next_sweep = now + self.retention / 4
        for subject, s in list(self._subjects.items()):
            if self._silent(s):
                self._drop(subject)

    def _start(self, subject: str, s: _Subject) -> None:
        s.repairing = True
        task = asyncio.get_running_loop().create_task(self._repair(subject, s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _repair(self, subject: str, s: _Subject) -> None:
        try:
            while s.held and self._subjects.get(subject) is s:
                seq, _, previous, data = heapq.heappop(s.held)
                step = self._step(s, seq, previous, data)
                if isinstance(step, tuple):
                    await self._fill(subject, s, *step)
                    if data is None or self._subjects.get(subject) is not s:
                        continue
                    step = self._step(s, seq, s.last, data)  # the range before it is done
                if step is _DUPLICATE:
                    self.duplicates += data is not None
                elif step is _DELIVER and data is not None:
                    await self._in_order(subject, s, seq, data)
        except asyncio.CancelledError:
            s.repairing = False
            raise
        except Exception:
            logger.exception("repairing a gap on %s failed", subject)
            s.repairing = False
            if s.held and self._subjects.get(subject) is s:  # start over
                self._start(subject, s)
            return
        s.repairing = False

    async def _fill(self, subject: str, s: _Subject, until: int, required: bool) -> None:
        """Read and deliver ``subject``'s messages after ``s.last`` up to ``until``
        (which must be among them when ``required``); the range is lost when it
        cannot be. Either way ``s.last`` is ``until`` after."""
        after = s.last
        deadline = self._clock() + self.give_up_after
        delay = 0.1
        while True:
            try:
                async with asyncio.timeout(max(0.1, deadline - self._clock())):
                    found = await self._fetch(subject, after, until)
                break
            except asyncio.CancelledError:
                raise
            except RangeLost as exc:
                self._unrepairable(subject, f"messages {after + 1}-{until}: {exc}")
                s.last = until
                return
            except Exception as exc:
                if self._clock() + delay >= deadline:
                    self._unrepairable(subject, f"messages {after + 1}-{until} could not be "
                                       f"read from the store: {exc!r}")
                    s.last = until
                    return
                logger.info("reading messages %d-%d of %s failed (%r); trying again",
                            after + 1, until, subject, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if required and (not found or found[-1][0] != until):
            self._unrepairable(subject, f"messages {after + 1}-{until}: the store no "
                               "longer holds them")
            s.last = until
            return
        for seq, data in found:
            if seq <= s.last or self._subjects.get(subject) is not s:
                continue
            s.last, s.at = seq, self._clock()
            self.repaired += 1
            await self._hand_on(subject, data, seq)
        s.last = max(s.last, until)
        if found:
            logger.info("repaired a gap on %s: %d message(s) of %d-%d", subject, len(found),
                        after + 1, until)

    def _unrepairable(self, subject: str, why: str) -> None:
        self.unrepairable += 1
        logger.warning("lost stored messages on %s: %s", subject, why)
        try:
            self._lost(subject)
        except Exception:
            logger.exception("reporting the loss on %s failed", subject)

    async def _hand_on(self, subject: str, data: bytes, seq: int) -> None:
        try:
            await self._deliver(subject, data, seq)
        except asyncio.CancelledError:
            raise
        except Exception:  # the handler should not raise; the rest still goes on
            logger.exception("delivering message %d on %s failed", seq, subject)


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the NATS subscription ``pattern`` (``*`` one token, ``>`` the rest)
    matches ``subject``."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)
