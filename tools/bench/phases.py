"""The measured phases of a report's results, and its runs: what the tables
(``report.py``) and the targets' verdicts (``targets.py``) both read."""

from __future__ import annotations

from typing import Any

from . import recovery_report, runs

BASELINE = "stock-redis"


def phase_paths(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(scenario/phase, backend, path in the results) for every measured phase."""
    rows: list[tuple[str, str, tuple[str, ...]]] = []
    for backend, scenarios in results.items():
        for scenario, data in scenarios.items():
            if scenario in ("memory", "idle", "cluster-api", "scale", "no-affinity",
                            *recovery_report.OWN_TABLES) or "skipped" in data:
                continue  # tables of their own
            if scenario == "reference":
                for phase in data:
                    rows.append((f"reference/{phase}", backend, (backend, scenario, phase)))
            else:
                rows.append((scenario, backend, (backend, scenario)))
    return rows


def phase_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(scenario/phase, backend, figures) for every measured phase."""
    return [(label, backend, runs.get(results, path))
            for label, backend, path in phase_paths(results)]


def measured(values: list[float | None] | None) -> list[float]:
    """The figures of the runs that measured one (a failed measurement is None)."""
    return [v for v in values or [] if v is not None]


def all_runs(report: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
    """Every run's results (a report of one run has no ``runs``)."""
    return list(report.get("runs") or [report["results"]])
