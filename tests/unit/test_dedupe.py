"""The dedupe window: the first copy of an id passes, later ones within the window do
not; it forgets by age and by count."""

from __future__ import annotations

import time

import pytest

from nats_adapter.dedupe import DedupeWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def test_only_the_first_copy_passes() -> None:
    window = DedupeWindow()
    assert window.first("a")
    assert not window.first("a")
    assert window.first("b")
    assert len(window) == 2


def test_an_id_is_forgotten_once_its_window_passed(clock: Clock) -> None:
    window = DedupeWindow(window=10.0)
    assert window.first("a")
    clock.now += 5
    assert window.first("b")
    assert not window.first("a")
    clock.now += 6  # "a" is 11 s old, "b" 6 s: the next id sweeps "a" out
    assert window.first("c")
    assert len(window) == 2
    assert window.first("a")
    assert not window.first("b")


def test_the_oldest_ids_go_past_max_ids(clock: Clock) -> None:
    window = DedupeWindow(window=60.0, max_ids=3)
    for i in range(5):
        clock.now += 1
        assert window.first(str(i))
    assert len(window) == 3
    assert window.first("0") and window.first("1")  # forgotten, though in the window
    assert not window.first("4")


@pytest.mark.parametrize("window", [0.0, -1.0])
def test_a_window_that_is_not_positive_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="window must be > 0"):
        DedupeWindow(window=window)
