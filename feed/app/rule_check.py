"""`feed check`: the access rules' row filters against the tables a connector has read.

A rule whose `row_filter` names a column that a table it allows lacks refuses every subscribe
to that table (`forbidden`, feed.routing.hub.check_forced), and the operator heard of it only
when a tenant tried. `feed check` reads the tables' columns anyway (Postgres), so it says so
beforehand, as a warning: the rule may mean to keep tenants out of such tables.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from connectors.base import Connector
from feed.core.filters import parse_filter
from feed.errors import ProtocolError
from feed.security.auth import PLACEHOLDER, AuthConfig


def rule_warnings(auth: AuthConfig, connector: Connector) -> list[str]:
    """One line per rule and allowed table whose row filter names a column it lacks."""
    schema = connector.filter_schema() or {}
    lines: list[str] = []
    for rule in auth.rules:
        if not rule.row_filter:
            continue
        try:  # placeholders filled with a stand-in: only the fields matter here
            fields = [
                c.field for c in parse_filter(PLACEHOLDER.sub("x", rule.row_filter)).conditions
            ]
        except ProtocolError:
            continue  # refused at config load already
        for target in connector.targets():
            columns = schema.get(target)
            room = f"{connector.name}:{target}"
            if columns is None or not any(fnmatchcase(room, p) for p in rule.allow):
                continue
            missing = [f for f in fields if f not in columns and f.split(".")[0] not in columns]
            if missing:
                lines.append(
                    f"warning: {rule.key} allows {room} with row_filter {rule.row_filter!r}, "
                    f"but {target} has no column {missing[0]!r}: subscribes to it are refused "
                    "(forbidden)"
                )
    return lines
