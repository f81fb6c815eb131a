"""What a connector's status tells a client: the detail for operators, a generic line for others.

A connector's status detail is an error message from its driver, and those name hosts, ports,
databases, roles and sometimes queries ("connection to db.internal:5432 refused for role feed").
Operators need that (and still get it at /readyz, in the logs and the metrics); a tenant only
needs to know that its data is not flowing, so `status` events and the catalog carry a generic
line for identities without an operator role (`[auth] operator_roles`, docs/security.md).
"""

from __future__ import annotations

from typing import Any

GENERIC = {
    "starting": "starting",
    "up": "",
    "down": "the source is unavailable; changes resume when it is back",
    "lagging": "the source is behind; changes are delayed",
    "stopped": "stopped",
}


def _without_reader(entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` without the cluster node that reads the connector: a node's name is by default
    its host name and process id."""
    return {key: value for key, value in entry.items() if key != "reader"}


def generic(status: dict[str, Any]) -> dict[str, Any]:
    """A status body (`Status.to_json()`) with its detail replaced by the line for its state,
    and without its reader."""
    return {**_without_reader(status), "detail": GENERIC.get(str(status.get("state")), "")}


def generic_catalog(catalog: dict[str, Any]) -> dict[str, Any]:
    """The catalog with every connector's status made generic, and without their readers."""
    connectors = [
        {
            **_without_reader(entry),
            **({"status": generic(entry["status"])} if "status" in entry else {}),
        }
        for entry in catalog.get("connectors", [])
    ]
    return {**catalog, "connectors": connectors}
