"""Authorization: which rooms an identity may follow, and the shape of what it then receives.

A grant is decided once per subscribe, never per change: the result is a `Shape` (a forced row
filter from the identity's claims, and the fields masked for it) that becomes part of the room's
identity. Clients with the same shape share a room and its one payload per change; clients with
different shapes can never land in the same room, so the hub's fan-out stays one payload per room
and nothing shaped for one identity reaches another.

Why images are checked one by one: a filter room delivers a change when its before image OR its
after image matches, so that clients can drop a row that stops matching. For a forced filter that
would leak: a row moved from tenant B to tenant A carries B's before image. A shaped room therefore
blanks (sets to null) every image that does not satisfy the forced filter itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any
from urllib.parse import quote

from connectors.base import RoomAddress
from feed.core.change import Change
from feed.core.filters import RowFilter, parse_filter
from feed.core.rooms import Room
from feed.errors import ProtocolError
from feed.security.auth import PLACEHOLDER, AuthConfig, Identity, MaskRule, Rule

SPECIAL_LITERALS = frozenset({"null"})
"""Filter literals that are not read as their text (feed.core.filters: `null` is NULL). Claims are
filled percent-encoded, so no claim can add a condition, an operator or a list item; these are
the only values whose meaning would still change, and claims equal to them are refused."""
Path = tuple[str, ...]
SHAPED_GAP_REASON = "the source may have lost changes; reload"
"""A gap's reason in a shaped room, in place of the connector's words (`ShapedRoom.source_gap`)."""


@dataclass(frozen=True)
class Shape:
    """What one group of identities may see of a room's changes."""

    forced: RowFilter | None = None
    masked: tuple[Path, ...] = ()

    @cached_property
    def profile(self) -> str:
        """A short stable name for this shape, appended to room names (`...@<profile>`)."""
        text = (self.forced.canonical if self.forced else "") + "|"
        text += ",".join(sorted(".".join(p) for p in self.masked))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def visible(self, image: Mapping[str, Any] | None) -> bool:
        return image is not None and (self.forced is None or self.forced.matches_image(image))

    def image(self, row: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """A row as this shape shows it (None when it is not visible at all): for snapshots."""
        if not self.visible(row):
            return None
        shown: Mapping[str, Any] = strip(row, self.masked)
        return shown

    def apply(self, change: Change, payload: dict[str, Any]) -> None:
        """Shape a room's copy of the wire payload in place (the change itself is shared)."""
        seen_before = self.visible(change.before)
        seen_after = self.visible(change.after)
        payload["before"] = strip(payload["before"], self.masked) if seen_before else None
        payload["after"] = strip(payload["after"], self.masked) if seen_after else None
        # Source extras (MongoDB's updateDescription, say) can repeat field values that the
        # images above no longer show; they are withheld rather than parsed per source. All but
        # the key a row moved from, when its old row was shown: the client keeps that row
        # under that key and must drop it (a key is never masked: it is in every change).
        meta = payload.pop("meta", None)
        if seen_before and change.moved_from is not None and isinstance(meta, dict):
            payload["meta"] = {"old_key": meta["old_key"]}
            if not seen_after:
                # The row left this shape under a new key, which is the new owner's (a natural
                # key can be their data): it is shown under the key this shape knew it by.
                payload["key"] = meta["old_key"]

    def allows_filter(self, row_filter: RowFilter) -> str | None:
        """Why a client filter is refused (it names a masked field), or None.

        A filter on a masked field would be an oracle: `password_hash=gt.m` tells, by whether
        changes arrive, what the hidden value is.
        """
        for condition in row_filter.conditions:
            path = tuple(condition.field.split("."))
            for masked in self.masked:
                shortest = min(len(path), len(masked))
                if path[:shortest] == masked[:shortest]:
                    return f"filter field {condition.field!r} is masked for you"
        return None


def strip(image: Mapping[str, Any] | None, paths: Iterable[Path]) -> Any:
    """A copy of an image without the masked fields (top-level names or dotted paths)."""
    if image is None:
        return None
    out = dict(image)
    for path in paths:
        _remove(out, path)
    return out


def _remove(image: dict[str, Any], path: Path) -> None:
    image.pop(".".join(path), None)
    if len(path) > 1 and path[0] in image:
        image[path[0]] = _removed(image[path[0]], path[1:])


def _removed(value: Any, path: Path) -> Any:
    """`value` without `path` inside it: through objects, and through arrays of them as a
    MongoDB dotted path reads (`items.price` is the price of every item), at any depth."""
    if isinstance(value, Mapping):
        child = dict(value)
        _remove(child, path)
        return child
    if isinstance(value, list):
        return [_removed(item, path) for item in value]
    return value


@dataclass(eq=False)
class ShapedRoom(Room):
    """A room whose payloads are shaped for one `Shape`; lives only while followed."""

    shape: Shape = field(default_factory=Shape)

    @property
    def ephemeral(self) -> bool:
        return True

    def payload(self, seq: int, change: Change, left: bool) -> dict[str, Any]:
        """Shaped for the live send and for every replay alike (the buffer keeps the change)."""
        payload = super().payload(seq, change, left)
        self.shape.apply(change, payload)
        return payload

    def source_gap(self, reason: str) -> str:
        """A connector's gap reason speaks of the whole source: the Redis key whose value it
        could not read, the partition truncated. Those can be another tenant's (a key holding
        an e-mail, a partition per tenant), so a shaped room says only what to do."""
        return SHAPED_GAP_REASON


# -- rules -------------------------------------------------------------------------------------


def _kind(claim: Any) -> str:
    """How a refusal names an unusable claim, without echoing its value."""
    if isinstance(claim, Mapping):
        return "an object"
    if isinstance(claim, list):
        return "an empty list" if not claim else "a list holding other than strings and numbers"
    if claim == "":
        return "empty"
    return f"a {type(claim).__name__}"


def render_filter(template: str, identity: Identity) -> RowFilter:
    """Fill `{claim}` placeholders from the identity; a missing claim refuses the subscribe."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        claim = identity.claim(name)
        values = claim if isinstance(claim, list) and claim else [claim]
        if claim is None:
            raise ProtocolError(
                "forbidden", f"your identity has no {name!r} claim, which the rules need"
            )
        if not all(_scalar(v) for v in values):
            raise ProtocolError(
                "forbidden",
                f"your {name!r} claim is {_kind(claim)}; the rules need a string or a number "
                "(or a list of them)",
            )
        special = next((v for v in values if _literal(v) in SPECIAL_LITERALS), None)
        if special is not None:
            # Filled in, it would not be data: `tenant=eq.null` matches rows whose tenant is
            # NULL, not the tenant named "null". Such a claim cannot be expressed: refused.
            raise ProtocolError(
                "forbidden",
                f"your {name!r} claim is {special!r}, which the row filter would read as "
                "something other than that text; ask for a token with another value",
            )
        return ",".join(_literal(v) for v in values)

    rendered = parse_filter(PLACEHOLDER.sub(value, template))
    # Claims that only together make a special literal (`{a}{b}` filled with "nu" and "ll").
    if _special_count(rendered) > _special_count(parse_filter(PLACEHOLDER.sub("x", template))):
        raise ProtocolError(
            "forbidden",
            "your claims fill the row filter with a value it would not read as text; "
            "ask for a token with other values",
        )
    return rendered


def _special_count(row_filter: RowFilter) -> int:
    return sum(v in SPECIAL_LITERALS for c in row_filter.conditions for v in c.values)


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and value != ""


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return quote(str(value), safe="")


def may_match_under(pattern: str, prefix: str) -> bool:
    """Whether the glob `pattern` (fnmatch's) may match a name that is `prefix` followed by
    more. Conservative: a `[...]` set is taken to match any character."""
    i = 0
    for char in prefix:
        if i >= len(pattern):
            return False
        token = pattern[i]
        if token == "*":
            return True
        if token == "[":
            close = pattern.find("]", i + (3 if pattern[i + 1 : i + 2] == "!" else 2))
            if close > 0:
                i = close + 1
                continue
        if token != "?" and token != char:
            return False
        i += 1
    return i < len(pattern)


def covers_under(pattern: str, prefix: str) -> bool:
    """Whether the glob `pattern` surely matches every name that is `prefix` followed by more
    (`*`, `shop:*`, `shop:crm.*`; conservative: False when unsure)."""
    head = pattern.rstrip("*")
    if head == pattern:
        return False
    return not any(c in head for c in "*?[") and prefix.startswith(head)


def rule_applies(rule: Rule, identity: Identity) -> bool:
    if rule.identities and not any(fnmatchcase(identity.name, p) for p in rule.identities):
        return False
    if rule.roles and not identity.roles.intersection(rule.roles):
        return False
    for name, accepted in rule.claims.items():
        claim = identity.claim(name)
        values = claim if isinstance(claim, list) else [claim]
        texts = {"true" if v is True else "false" if v is False else str(v) for v in values}
        if claim is None or not texts.intersection(accepted):
            return False
    return True


def mask_applies(mask: MaskRule, identity: Identity) -> bool:
    if mask.roles and not identity.roles.intersection(mask.roles):
        return False
    return not identity.roles.intersection(mask.except_roles)


class Authorizer:
    """Decides subscribes from the `[[auth.rules]]` and `[[auth.masks]]` of the config.

    Rules are read in order and the first rule that matches both the identity and the room
    decides (with its row filter). With auth on and no rule matching, the answer is no. With auth
    off and no rules, every room is open; masks apply in every mode.
    """

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.open = not config.enabled and not config.rules

    def grant(
        self,
        identity: Identity,
        connector: str,
        address: RoomAddress,
        client_filter: RowFilter | None = None,
        inner: str | None = None,
    ) -> Shape | None:
        """The shape this identity gets in this room (None: unshaped); ProtocolError if denied.

        `inner`: the prefix of the targets whose changes this room also carries
        (`Connector.inner_prefix`: a MongoDB database watched whole carries its collections').
        Their masks apply here too, and the room is refused when a rule would filter one of
        them otherwise than this room (`_check_inner`)."""
        target = f"{connector}:{address.target}"
        rule = None if self.open else self._rule(identity, target, address.key)
        inner_name = f"{connector}:{inner}" if inner else None
        if rule is not None and inner_name is not None:
            self._check_inner(identity, rule, target, inner_name)
        forced = render_filter(rule.row_filter, identity) if rule and rule.row_filter else None
        masked = self.masked(identity, target, inner_name)
        if forced is None and not masked:
            return None
        shape = Shape(forced, masked)
        if client_filter is not None:
            problem = shape.allows_filter(client_filter)
            if problem:
                raise ProtocolError("forbidden_filter", problem)
        return shape

    def _rule(self, identity: Identity, target: str, key: str | None) -> Rule:
        row = f"{target}:{key}" if key is not None else None
        for rule in self.config.rules:
            if not rule_applies(rule, identity):
                continue
            for pattern in rule.allow:
                if fnmatchcase(target, pattern) or (row is not None and fnmatchcase(row, pattern)):
                    return rule
        shown = row if row is not None else target
        raise ProtocolError("forbidden", f"{identity.name!r} may not subscribe to {shown[:200]!r}")

    def _check_inner(self, identity: Identity, rule: Rule, target: str, inner: str) -> None:
        """Refuse a room carrying other targets' changes (`inner`: their names' prefix) when
        a rule would give one of them another row filter than `rule` gives this room.

        The rules for the inner targets are those that apply to the identity and allow a name
        under `inner`, in order, up to one that allows every name there (it decides all that
        the later ones would). Targets no rule allows come with the room: allowing the room
        allows what it carries."""
        for other in self.config.rules:
            if not rule_applies(other, identity):
                continue
            reaching = [p for p in other.allow if may_match_under(p, inner)]
            if not reaching:
                continue
            if other.row_filter != rule.row_filter:
                raise ProtocolError(
                    "forbidden",
                    f"{target[:200]!r} carries the changes of {inner[:200]}<collection>, which "
                    f"you may follow only with another row filter: subscribe to the "
                    f"{inner[:200]}<collection> rooms instead",
                )
            if any(covers_under(p, inner) for p in reaching):
                return

    def masked(self, identity: Identity, target: str, inner: str | None = None) -> tuple[Path, ...]:
        """The fields masked for this identity in `target`'s room; with `inner` (the prefix of
        the targets whose changes it also carries) also those masked in any of those."""
        fields: set[str] = set()
        for mask in self.config.masks:
            if mask_applies(mask, identity) and any(
                fnmatchcase(target, p) or (inner is not None and may_match_under(p, inner))
                for p in mask.rooms
            ):
                fields.update(mask.fields)
        return tuple(tuple(f.split(".")) for f in sorted(fields))

    def visible_target(self, identity: Identity, connector: str, target: str) -> bool:
        """Whether the catalog lists this target for this identity."""
        if self.open:
            return True
        address = f"{connector}:{target}"
        for rule in self.config.rules:
            if rule_applies(rule, identity) and any(
                fnmatchcase(address, p) or p.startswith(address + ":") for p in rule.allow
            ):
                return True
        return False

    def catalog(self, identity: Identity, catalog: dict[str, Any]) -> dict[str, Any]:
        """The hub's catalog with only what this identity may follow."""
        if self.open:
            return catalog
        connectors = []
        for entry in catalog.get("connectors", []):
            targets = [
                t for t in entry["targets"] if self.visible_target(identity, entry["name"], t)
            ]
            if targets:
                connectors.append({**entry, "targets": targets})
        return {**catalog, "connectors": connectors}
