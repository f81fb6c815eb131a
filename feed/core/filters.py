"""PostgREST-style row filters: `status=eq.paid&amount=gt.100&id=in.(1,2,3)`.

Clients that send the same conditions in any order share one canonical filter, hence one room:
routing cost grows with the number of distinct filters, not with the number of clients. A change
matches a filter when its before image or its after image does, so a row that stops matching is
still delivered once and the client can drop it.

Each literal is read once, when the filter is parsed, as every type a row value may turn out to
have (`Literal`): a change then compares typed values instead of parsing text per comparison.
The same reading gives each literal its equality keys (`Literal.equality_keys`, `value_key`),
which is what lets feed.core.filter_index find the filter rooms of a change by value instead of
trying each one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import operator
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, unquote

from feed.core.change import Change
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


@dataclass(frozen=True, slots=True)
class Literal:
    """A filter literal read once as each type a row value may have (None: not of that type).

    `_compare` used to convert the literal on every comparison; the readings here are the same
    conversions done once, so the documented semantics are unchanged: numbers compare as
    `Decimal`, `true`/`false` as booleans, ISO 8601 as dates and times, anything else as text.
    """

    text: str
    null: bool
    boolean: bool | None
    number: Decimal | None
    moment: dt.datetime | None
    day: dt.date | None

    @classmethod
    def parse(cls, text: str) -> Literal:
        boolean = {"true": True, "false": False}.get(text)
        try:
            number: Decimal | None = Decimal(text)
        except (InvalidOperation, ValueError, TypeError):
            number = None
        try:
            moment: dt.datetime | None = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            moment = None
        try:
            day: dt.date | None = dt.date.fromisoformat(text)
        except ValueError:
            day = None
        return cls(text, text == "null", boolean, number, moment, day)

    def equality_keys(self) -> tuple[Hashable, ...]:
        """The equality keys of this literal: `eq` holds for a value only if `value_key(value)`
        is one of them (the reverse need not hold: routing checks its candidates)."""
        if self.null:  # `eq.null` holds for null only, whatever the column's type
            return (NULL_KEY,)
        keys: list[Hashable] = [("s", self.text)]
        if self.boolean is not None:
            keys.append(("b", self.boolean))
        if self.number is not None and not self.number.is_nan():
            keys.append(("n", self.number))
        if self.moment is not None:
            keys.append(_moment_key(self.moment))
        if self.day is not None:
            keys.append(("d", self.day))
        return tuple(k for k in keys if k is not None)


NULL_KEY: Hashable = ("null",)


def _moment_key(moment: dt.datetime) -> Hashable:
    """Naive and aware times never compare equal; aware ones compare as UTC instants."""
    if moment.tzinfo is None:
        return ("t", moment)
    offset = moment.utcoffset()
    if offset is None:  # a tzinfo that gives no offset: equal to nothing
        return None
    return ("tz", moment.replace(tzinfo=None) - offset)


def value_key(value: Any) -> Hashable:
    """The equality key of a row value (None: it equals no literal); see `Literal.equality_keys`.

    Keys are tagged by the type the value is compared as, so `1` and `true` never meet, while
    `1`, `1.0` and `Decimal("1.00")` share one key (equal numbers hash alike in Python).
    """
    if value is None:
        return NULL_KEY
    kind = type(value)
    if kind is str:
        return ("s", value)
    if kind is int:
        return ("n", value)
    try:
        if isinstance(value, bool):
            return ("b", value)
        if isinstance(value, int | float | Decimal):
            number = Decimal(str(value))
            return None if number.is_nan() else ("n", number)
        if isinstance(value, dt.datetime):
            return _moment_key(value)
        if isinstance(value, dt.date):
            return ("d", value)
        if isinstance(value, str):
            return ("s", str.__str__(value))
        return ("s", str(value))
    except (InvalidOperation, ValueError, TypeError):
        return None


@dataclass(frozen=True, order=True)
class Condition:
    field: str
    op: str
    values: tuple[str, ...]
    literals: tuple[Literal, ...] = dataclasses.field(
        init=False, compare=False, repr=False, hash=False
    )
    """`values`, each read once as the types it may be compared with."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "literals", tuple(Literal.parse(v) for v in self.values))

    @property
    def equality(self) -> bool:
        """An `eq` or `in` condition: routing can find its rooms by value."""
        return self.op == "eq" or self.op == "in"

    def text(self) -> str:
        if self.op == "in":
            inner = ",".join(_quote_value(v) if v else '""' for v in self.values)
            return f"{quote(self.field, safe='._-')}=in.({inner})"
        return f"{quote(self.field, safe='._-')}={self.op}.{_quote_value(self.values[0])}"

    def holds(self, image: Mapping[str, Any]) -> bool:
        found, value = lookup(image, self.field)
        return found and self.test(value)

    def test(self, value: Any) -> bool:
        """Whether the condition holds for a value the image has (found by `lookup`)."""
        if self.op == "in":
            return any(_compare(operator.eq, value, literal) for literal in self.literals)
        if self.op == "neq" and value is None:
            return self.values[0] != "null"
        return _compare(OPERATORS[self.op], value, self.literals[0])


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


def parse_filter(
    text: str, *, max_length: int = 1024, max_conditions: int = MAX_CONDITIONS
) -> RowFilter:
    """Parse a filter string; raise ProtocolError("bad_filter") saying what is wrong.

    The limits are a client's; a room's own filter (a client's with a forced one merged in,
    read back from the cluster's registry) may hold more conditions, and is read with them off.
    """
    if not isinstance(text, str):
        raise ProtocolError("bad_filter", "filter must be a string like 'status=eq.paid'")
    if len(text) > max_length:
        raise ProtocolError("bad_filter", f"filter is longer than {max_length} characters")
    parts = [p for p in text.split("&") if p]
    if not parts:
        raise ProtocolError(
            "bad_filter", "filter is empty; use field=op.value, e.g. status=eq.paid"
        )
    if len(parts) > max_conditions:
        raise ProtocolError("bad_filter", f"filter has more than {max_conditions} conditions")
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
        values = tuple(unquote(v) for v in _list_items(raw[1:-1], part))
        if not values or len(values) > MAX_IN_VALUES:
            raise ProtocolError("bad_filter", f"{part!r}: in takes 1 to {MAX_IN_VALUES} values")
        return Condition(field, op, tuple(sorted(set(values))))
    if op not in OPERATORS:
        known = ", ".join([*OPERATORS, "in"])
        raise ProtocolError("bad_filter", f"{part!r}: unknown operator {op!r} (use one of {known})")
    if len(raw) >= 2 and raw.startswith('"') and raw.endswith('"'):
        raw = _unquoted(raw, part)
    return Condition(field, op, (unquote(raw),))


def _list_items(text: str, part: str) -> list[str]:
    """An `in` list's items, as PostgREST reads them: split at commas outside double quotes, a
    quoted item (`"Smith, John"`) with `\\"` and `\\\\` for a quote and a backslash inside.
    Quotes are read before percent-decoding, so a `%22` is a quote character, never a delimiter
    (the canonical names the server returns encode quotes that way)."""
    items: list[str] = []
    i = 0
    while i <= len(text):
        if text.startswith('"', i):
            end = i + 1
            while end < len(text) and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if end >= len(text):
                raise ProtocolError("bad_filter", f"{part!r}: a quote in the list is not closed")
            items.append(_unquoted(text[i : end + 1], part))
            i = end + 1
            if i < len(text) and text[i] != ",":
                raise ProtocolError(
                    "bad_filter", f"{part!r}: a quoted value must be followed by ',' or ')'"
                )
            i += 1
            continue
        comma = text.find(",", i)
        end = len(text) if comma < 0 else comma
        if end > i:
            items.append(text[i:end])
        i = end + 1
    return items


def _unquoted(quoted: str, part: str) -> str:
    """`"..."` without its quotes, `\\x` read as x."""
    out: list[str] = []
    inner = quoted[1:-1]
    i = 0
    while i < len(inner):
        ch = inner[i]
        if ch == "\\" and i + 1 < len(inner):
            out.append(inner[i + 1])
            i += 2
            continue
        if ch == '"':
            raise ProtocolError("bad_filter", f'{part!r}: write a quote inside quotes as \\"')
        out.append(ch)
        i += 1
    return "".join(out)


def _quote_value(value: str) -> str:
    return quote(value, safe="._-:+@ ")


def lookup(image: Mapping[str, Any], field: str) -> tuple[bool, Any]:
    """A top-level field, or a nested one by dotted path (MongoDB documents, jsonb columns)."""
    if field in image:
        return True, image[field]
    value: Any = image
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _compare(op: Callable[[Any, Any], bool], value: Any, literal: Literal) -> bool:
    """Compare a row value with a filter literal, reading the literal as the value's type."""
    if literal.null and (op is operator.eq or op is operator.ne):
        return op(value, None)
    if value is None:
        return False
    kind = type(value)
    if kind is str:  # the common cases first, without the isinstance chain
        return op(value, literal.text)
    try:
        if kind is int:
            # An int compares with a Decimal exactly, as Decimal(str(value)) would.
            return literal.number is not None and op(value, literal.number)
        if isinstance(value, bool):
            return literal.boolean is not None and op(value, literal.boolean)
        if isinstance(value, int | float | Decimal):
            return literal.number is not None and op(Decimal(str(value)), literal.number)
        if isinstance(value, dt.datetime):
            other = literal.moment
            if other is None or (value.tzinfo is None) != (other.tzinfo is None):
                return False
            return op(value, other)
        if isinstance(value, dt.date):
            return literal.day is not None and op(value, literal.day)
        if isinstance(value, str):
            return op(value, literal.text)
        return op(str(value), literal.text)
    except (InvalidOperation, ValueError, TypeError):
        # A literal that is not of the column's type matches nothing rather than failing the
        # routing of this change for every other room.
        return False
