"""Several runs of the same benchmark: medians, ranges, and ratios taken within a run.

A full run repeats every scenario (``--runs N``, default 3) because this machine is
shared: figures drift with its load, so one run proves little. Each run compares the
backends side by side; a ratio against another backend is taken within one run (the
same machine load for both), then summarised over the runs like any figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

Results = dict[str, dict[str, Any]]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def aggregate(runs: Sequence[Results]) -> Results:
    """One results tree with the median of every number over the runs that have it;
    anything else (text, lists) as the first run that has it gives it."""

    def merge(items: list[Any]) -> Any:
        present = [i for i in items if i is not None]
        if not present:
            return None
        if all(isinstance(i, dict) for i in present):
            keys = list(dict.fromkeys(k for i in present for k in i))
            return {k: merge([i.get(k) for i in present]) for k in keys}
        if all(_is_number(i) for i in present):
            middle = statistics.median(present)
            if all(isinstance(i, int) for i in present) and middle == int(middle):
                return int(middle)
            return round(float(middle), 4)
        return present[0]

    out: Results = merge(list(runs)) or {}
    return out


def get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def values(runs: Sequence[Results], path: Sequence[str]) -> list[float]:
    """The figure at ``path`` in each run that measured it."""
    found = (get(run, path) for run in runs)
    return [float(v) for v in found if _is_number(v)]


def ratios(runs: Sequence[Results], path: Sequence[str], base: Sequence[str],
           higher_is_better: bool) -> list[float]:
    """``path`` against ``base`` in each run that measured both (> 1: ``path`` better)."""
    out = []
    for run in runs:
        value, ref = get(run, path), get(run, base)
        if _is_number(value) and _is_number(ref) and value and ref:
            out.append(value / ref if higher_is_better else ref / value)
    return out


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float, digits: int) -> str:
    return f"{x:,.{digits}f}"


def stat(xs: Sequence[float], digits: int = 1, suffix: str = "") -> str:
    """``median`` for one run, ``median [min-max]`` for several, ``n/a`` for none."""
    if not xs:
        return "n/a"
    middle = fmt(statistics.median(xs), digits) + suffix
    if len(xs) == 1:
        return middle
    return f"{middle} [{fmt(min(xs), digits)}-{fmt(max(xs), digits)}]"
