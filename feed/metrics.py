"""Counters and gauges rendered in the Prometheus text format.

Hand-rolled rather than prometheus_client: the feed needs a dozen series, and one module of
forty lines is cheaper to own than a dependency.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: list[Callable[[], Iterable[tuple[str, Labels, float]]]] = []

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._counters[name][tuple(sorted(labels.items()))] += amount

    def counter(self, name: str, **labels: str) -> Counter:
        """One series bound once, for paths that count every change (no label sorting per call)."""
        return Counter(self._counters[name], tuple(sorted(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def gauges(self, collect: Callable[[], Iterable[tuple[str, Labels, float]]]) -> None:
        """Register a callback read at scrape time (for values the hub already knows)."""
        self._gauges.append(collect)

    def render(self) -> str:
        series: dict[str, dict[Labels, float]] = defaultdict(dict)
        for name, by_labels in self._counters.items():
            series[name].update(by_labels)
        for collect in self._gauges:
            for name, labels, value in collect():
                series[name][labels] = value
        lines: list[str] = []
        for name in sorted(series.keys() | self._help.keys()):
            kind, text = self._help.get(name, ("untyped", ""))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(series.get(name, {}).items()):
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                number = _number(value)
                lines.append(f"{name}{{{rendered}}} {number}" if rendered else f"{name} {number}")
        return "\n".join(lines) + "\n"


class Counter:
    """One series of a counter. `series[key] += n` is `inc(n)` without the call, for the hub's
    per-change path."""

    __slots__ = ("key", "series")

    def __init__(self, series: dict[Labels, float], key: Labels) -> None:
        self.series = series
        self.key = key
        series.setdefault(key, 0.0)

    def inc(self, amount: float = 1.0) -> None:
        self.series[self.key] += amount


def _number(value: float) -> str:
    """A sample's value, exactly: `:g` kept six significant digits, so a counter past a million
    showed 1.23457e+06 and moved only in steps of ten (of a hundred past ten million), and
    `rate()` read a busy feed's deliveries as still or in bursts."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer():
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
