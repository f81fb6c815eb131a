"""PostgREST-style row filters: `status=eq.paid&amount=gt.100&id=in.(1,2,3)`.

Clients that send the same conditions in any order share one canonical filter, hence one room:
routing cost grows with the number of distinct filters, not with the number of clients. A change
matches a filter when its before image or its after image does, so a row that stops matching is
still delivered once and the client can drop it.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote

from feed.change import Change
from feed.errors import ProtocolError

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}
MAX_CONDITIONS = 20
MAX_IN_VALUES = 100


@dataclass(frozen=True, order=True)
class Condition:
    field: str
    op: str
    values: tuple[str, ...]

    def text(self) -> str:
        if self.op == "in":
            inner = ",".join(_quote_value(v) for v in self.values)
            return f"{quote(self.field, safe='._-')}=in.({inner})"
        return f"{quote(self.field, safe='._-')}={self.op}.{_quote_value(self.values[0])}"

    def holds(self, image: Mapping[str, Any]) -> bool:
        found, value = _lookup(image, self.field)
        if not found:
            return False
        if self.op == "in":
            return any(_compare(operator.eq, value, literal) for literal in self.values)
        if self.op == "neq" and value is None:
            return self.values[0] != "null"
        return _compare(OPERATORS[self.op], value, self.values[0])


@dataclass(frozen=True)
class RowFilter:
    """A conjunction of conditions, in canonical (sorted) order."""

    conditions: tuple[Condition, ...]

    @property
    def canonical(self) -> str:
        return "&".join(c.text() for c in self.conditions)

    def matches_image(self, image: Mapping[str, Any] | None) -> bool:
        return image is not None and all(c.holds(image) for c in self.conditions)

    def matches(self, change: Change) -> bool:
        return self.matches_image(change.before) or self.matches_image(change.after)

    def merged(self, other: RowFilter) -> RowFilter:
        """Both filters at once (used to force an authorization filter onto a client's own)."""
        return RowFilter(tuple(sorted(set(self.conditions) | set(other.conditions))))


def parse_filter(text: str, *, max_length: int = 1024) -> RowFilter:
    """Parse a filter string; raise ProtocolError("bad_filter") saying what is wrong."""
    if not isinstance(text, str):
        raise ProtocolError("bad_filter", "filter must be a string like 'status=eq.paid'")
    if len(text) > max_length:
        raise ProtocolError("bad_filter", f"filter is longer than {max_length} characters")
    parts = [p for p in text.split("&") if p]
    if not parts:
        raise ProtocolError(
            "bad_filter", "filter is empty; use field=op.value, e.g. status=eq.paid"
        )
    if len(parts) > MAX_CONDITIONS:
        raise ProtocolError("bad_filter", f"filter has more than {MAX_CONDITIONS} conditions")
    conditions = {_parse_condition(p) for p in parts}
    return RowFilter(tuple(sorted(conditions)))


def _parse_condition(part: str) -> Condition:
    field, eq, rest = part.partition("=")
    field = unquote(field)
    if not eq or not field:
        raise ProtocolError("bad_filter", f"{part!r} is not field=op.value (e.g. status=eq.paid)")
    op, dot, raw = rest.partition(".")
    if not dot:
        raise ProtocolError("bad_filter", f"{part!r} has no operator: write {field}=eq.<value>")
    if op == "in":
        if not (raw.startswith("(") and raw.endswith(")")):
            raise ProtocolError("bad_filter", f"{part!r}: in takes a list, e.g. {field}=in.(1,2)")
        values = tuple(unquote(v) for v in raw[1:-1].split(",") if v != "")
        if not values or len(values) > MAX_IN_VALUES:
            raise ProtocolError("bad_filter", f"{part!r}: in takes 1 to {MAX_IN_VALUES} values")
        return Condition(field, op, tuple(sorted(set(values))))
    if op not in OPERATORS:
        known = ", ".join([*OPERATORS, "in"])
        raise ProtocolError("bad_filter", f"{part!r}: unknown operator {op!r} (use one of {known})")
    return Condition(field, op, (unquote(raw),))


def _quote_value(value: str) -> str:
    return quote(value, safe="._-:+@ ")


def _lookup(image: Mapping[str, Any], field: str) -> tuple[bool, Any]:
    """A top-level field, or a nested one by dotted path (MongoDB documents, jsonb columns)."""
    if field in image:
        return True, image[field]
    value: Any = image
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _compare(op: Callable[[Any, Any], bool], value: Any, literal: str) -> bool:
    """Compare a row value with a filter literal, reading the literal as the value's type."""
    if literal == "null" and op in (operator.eq, operator.ne):
        return op(value, None)
    if value is None:
        return False
    try:
        if isinstance(value, bool):
            if literal not in ("true", "false"):
                return False
            return op(value, literal == "true")
        if isinstance(value, int | float | Decimal):
            return op(Decimal(str(value)), Decimal(literal))
        if isinstance(value, dt.datetime):
            other = dt.datetime.fromisoformat(literal.replace("Z", "+00:00"))
            if (value.tzinfo is None) != (other.tzinfo is None):
                return False
            return op(value, other)
        if isinstance(value, dt.date):
            return op(value, dt.date.fromisoformat(literal))
        if isinstance(value, str):
            return op(value, literal)
        return op(str(value), literal)
    except (InvalidOperation, ValueError, TypeError):
        # A literal that is not of the column's type matches nothing rather than failing the
        # routing of this change for every other room.
        return False
