"""The metrics connectors report about their own capture, named in one place.

The hub describes them for /metrics (so they show with help text even before a connector has a
value) and each connector fills in its own through `Connector.gauges()`. docs/operations.md
("What the feed watches, and what it tells you") lists them with the alerts to set.
"""

from __future__ import annotations

CAPTURE_METRICS: dict[str, tuple[str, str]] = {
    "feed_capture_faults_total": (
        "counter",
        "Times a connector's own check found its capture stopped or at risk, by kind",
    ),
    "feed_capture_ok": (
        "gauge",
        "1 when the connector's last capture check found nothing wrong, 0 while a fault stands",
    ),
    "feed_postgres_journal_rows": ("gauge", "Rows in the notify-mode journal"),
    "feed_postgres_journal_bytes": ("gauge", "Size of the journal table and its indexes"),
    "feed_postgres_journal_undelivered_age_seconds": (
        "gauge",
        "Age of the oldest journal change this connector has not delivered yet",
    ),
    "feed_postgres_journal_over_ceiling": (
        "gauge",
        "1 when the journal is past journal_warn_rows or journal_warn_age",
    ),
    "feed_postgres_stale_consumers": (
        "gauge",
        "Other positions in the journal not saved for journal_warn_age (they hold back pruning)",
    ),
    "feed_postgres_slot_retained_wal_bytes": (
        "gauge",
        "WAL the logical replication slot keeps the server from recycling",
    ),
    "feed_redis_keyspace_flags_ok": (
        "gauge",
        "1 when notify-keyspace-events covers what the connector needs",
    ),
}
