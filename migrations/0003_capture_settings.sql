-- The capture trigger runs in the writer's session, and to_jsonb renders a value the way that
-- session's settings say: with extra_float_digits = 0 (some drivers and tools set it) a double
-- loses its last digits (0.30000000000000004 became 0.3), and TimeZone, DateStyle,
-- IntervalStyle and bytea_output change how timestamps inside composites and ranges, intervals
-- and bytea inside composites read. Pinned on the function, they hold while it runs (and only
-- then), so a live image reads as the feed's own sessions render the same row for a snapshot,
-- whoever wrote it.
ALTER FUNCTION {{schema}}.capture()
    SET extra_float_digits = 3
    SET "TimeZone" = 'UTC'
    SET "DateStyle" = 'ISO, YMD'
    SET "IntervalStyle" = 'postgres'
    SET bytea_output = 'hex';
