"""The small part of MongoDB's query, update and aggregation languages the tests need.

Filters: equality (array fields match any element), dotted paths, $eq $ne $gt $gte $lt $lte $in
$nin $exists $type (by alias), and $and $or $nor. Updates: replacement documents, the operators $set $unset $inc
$push $pop, and pipeline updates made of $set/$addFields/$unset stages whose expressions are
literals, "$field" paths, $literal and $slice. Anything else is refused with the server's own
error code, so a test that strays outside the subset fails loudly instead of passing by accident.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from bson.binary import Binary
from bson.code import Code
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp

MISSING = object()


class QueryError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def get_path(doc: Any, path: str) -> Any:
    current = doc
    for part in path.split("."):
        if isinstance(current, Mapping):
            if part not in current:
                return MISSING
            current = current[part]
        elif isinstance(current, list) and part.isdigit():
            index = int(part)
            if index >= len(current):
                return MISSING
            current = current[index]
        else:
            return MISSING
    return current


def _compare(a: Any, b: Any, op: str) -> bool:
    try:
        if op == "$gt":
            return bool(a > b)
        if op == "$gte":
            return bool(a >= b)
        if op == "$lt":
            return bool(a < b)
        return bool(a <= b)
    except TypeError:
        return False


def _candidates(value: Any) -> list[Any]:
    if value is MISSING:
        return []
    if isinstance(value, list):
        return [value, *value]
    return [value]


def _match_condition(value: Any, condition: Any) -> bool:
    if isinstance(condition, Mapping) and condition and all(k.startswith("$") for k in condition):
        return all(_match_operator(value, op, arg) for op, arg in condition.items())
    if condition is None:
        return value is MISSING or value is None or None in _candidates(value)
    return any(candidate == condition for candidate in _candidates(value))


def _match_operator(value: Any, op: str, arg: Any) -> bool:
    if op == "$eq":
        return _match_condition(value, arg) if not isinstance(arg, Mapping) else value == arg
    if op == "$ne":
        return not _match_operator(value, "$eq", arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return any(_compare(c, arg, op) for c in _candidates(value))
    if op == "$in":
        return any(_match_condition(value, item) for item in arg)
    if op == "$nin":
        return not any(_match_condition(value, item) for item in arg)
    if op == "$exists":
        return (value is not MISSING) == bool(arg)
    if op == "$type":
        wanted = set(arg) if isinstance(arg, list) else {arg}
        if "array" in wanted and isinstance(value, list):
            return True
        return any(type_alias(c) in wanted for c in _candidates(value) if not isinstance(c, list))
    raise QueryError(2, f"unknown operator: {op}")


def type_alias(value: Any) -> str:
    """The BSON type alias of a decoded value, as `$type` names it (symbols decode to `str`
    and are `string` here; the server stores nothing else as a symbol)."""
    checks: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "bool"),
        (Int64, "long"),
        (int, "int"),
        (float, "double"),
        (Decimal128, "decimal"),
        (Code, "javascriptWithScope" if isinstance(value, Code) and value.scope else "javascript"),
        (str, "string"),
        ((Binary, uuid.UUID, bytes), "binData"),
        (ObjectId, "objectId"),
        (dt.datetime, "date"),
        (Timestamp, "timestamp"),
        (Regex, "regex"),
        (MinKey, "minKey"),
        (MaxKey, "maxKey"),
        ((Mapping, DBRef), "object"),
        (list, "array"),
    ]
    if value is None:
        return "null"
    for kind, alias in checks:
        if isinstance(value, kind):
            return alias
    raise QueryError(2, f"no BSON type alias for {type(value).__name__}")


def matches(doc: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    for key, condition in query.items():
        if key == "$and":
            if not all(matches(doc, sub) for sub in condition):
                return False
        elif key == "$or":
            if not any(matches(doc, sub) for sub in condition):
                return False
        elif key == "$nor":
            if any(matches(doc, sub) for sub in condition):
                return False
        elif key.startswith("$"):
            raise QueryError(2, f"unknown top level operator: {key}")
        elif not _match_condition(get_path(doc, key), condition):
            return False
    return True


# -- updates -----------------------------------------------------------------------------------


def _parent(doc: dict[str, Any], path: str, create: bool) -> tuple[Any, str]:
    parts = path.split(".")
    current: Any = doc
    for part in parts[:-1]:
        if isinstance(current, list) and part.isdigit():
            current = current[int(part)]
            continue
        if part not in current:
            if not create:
                return None, parts[-1]
            current[part] = {}
        current = current[part]
    return current, parts[-1]


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    parent, last = _parent(doc, path, True)
    if isinstance(parent, list) and last.isdigit():
        index = int(last)
        while len(parent) <= index:
            parent.append(None)
        parent[index] = value
    else:
        parent[last] = value


def _unset(doc: dict[str, Any], path: str) -> None:
    parent, last = _parent(doc, path, False)
    if isinstance(parent, dict):
        parent.pop(last, None)


def is_operator_update(update: Any) -> bool:
    return isinstance(update, Mapping) and any(k.startswith("$") for k in update)


def apply_update(doc: dict[str, Any], update: Any) -> tuple[dict[str, Any], bool]:
    """Return the new document and whether arrays may have been truncated (pipeline updates)."""
    if isinstance(update, list):
        return _apply_pipeline(doc, update), True
    if not is_operator_update(update):
        replacement = dict(update)
        replacement["_id"] = doc["_id"]
        return replacement, False
    new = copy.deepcopy(doc)
    for op, fields in update.items():
        for path, arg in fields.items():
            if path == "_id" or path.startswith("_id."):
                raise QueryError(66, "Performing an update on the path '_id' would modify the _id")
            if op == "$set":
                _set(new, path, copy.deepcopy(arg))
            elif op == "$unset":
                _unset(new, path)
            elif op == "$inc":
                current = get_path(new, path)
                _set(new, path, (0 if current is MISSING else current) + arg)
            elif op == "$push":
                current = get_path(new, path)
                items = arg["$each"] if isinstance(arg, Mapping) and "$each" in arg else [arg]
                _set(new, path, [*([] if current is MISSING else current), *items])
            elif op == "$pop":
                current = get_path(new, path)
                if isinstance(current, list) and current:
                    _set(new, path, current[1:] if arg == -1 else current[:-1])
            else:
                raise QueryError(9, f"Unknown modifier: {op}")
    return new, False


def _evaluate(doc: Mapping[str, Any], expr: Any) -> Any:
    if isinstance(expr, str) and expr.startswith("$"):
        value = get_path(doc, expr[1:])
        return None if value is MISSING else copy.deepcopy(value)
    if isinstance(expr, Mapping) and len(expr) == 1:
        ((op, arg),) = expr.items()
        if op == "$literal":
            return copy.deepcopy(arg)
        if op == "$slice":
            array = _evaluate(doc, arg[0])
            n = _evaluate(doc, arg[1])
            return array[:n] if n >= 0 else array[n:]
        if op.startswith("$"):
            raise QueryError(168, f"Unrecognized expression '{op}'")
    if isinstance(expr, Mapping):
        return {k: _evaluate(doc, v) for k, v in expr.items()}
    if isinstance(expr, list):
        return [_evaluate(doc, v) for v in expr]
    return copy.deepcopy(expr)


def _apply_pipeline(doc: dict[str, Any], pipeline: list[Mapping[str, Any]]) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    for stage in pipeline:
        ((name, spec),) = stage.items()
        if name in ("$set", "$addFields"):
            for path, expr in spec.items():
                _set(new, path, _evaluate(new, expr))
        elif name == "$unset":
            for path in [spec] if isinstance(spec, str) else spec:
                _unset(new, path)
        else:
            raise QueryError(72, f"{name} is not allowed to be used within an update")
    return new


def describe_update(
    old: Mapping[str, Any], new: Mapping[str, Any], truncations: bool
) -> dict[str, Any]:
    """An updateDescription computed by diffing the two images, as the server's delta does."""
    updated: dict[str, Any] = {}
    removed: list[str] = []
    truncated: list[dict[str, Any]] = []

    def walk(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str) -> None:
        for key in a:
            if key not in b:
                removed.append(prefix + key)
        for key, value in b.items():
            path = prefix + key
            if key not in a:
                updated[path] = value
                continue
            before = a[key]
            if before == value and type(before) is type(value):
                continue
            if isinstance(before, Mapping) and isinstance(value, Mapping):
                walk(before, value, path + ".")
            elif isinstance(before, list) and isinstance(value, list):
                if truncations and len(value) < len(before) and before[: len(value)] == value:
                    truncated.append({"field": path, "newSize": len(value)})
                elif len(value) > len(before) and value[: len(before)] == before:
                    for i in range(len(before), len(value)):
                        updated[f"{path}.{i}"] = value[i]
                else:
                    updated[path] = value
            else:
                updated[path] = value

    walk(old, new, "")
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": truncated}


def project(doc: Mapping[str, Any], projection: Mapping[str, Any] | None) -> dict[str, Any]:
    if not projection:
        return dict(doc)
    include = {k for k, v in projection.items() if v and k != "_id"}
    if include:
        out = {k: doc[k] for k in doc if k in include}
        if projection.get("_id", 1) and "_id" in doc:
            out = {"_id": doc["_id"], **out}
        return out
    return {k: v for k, v in doc.items() if k not in projection}


def sort_docs(docs: list[dict[str, Any]], spec: Mapping[str, int] | None) -> list[dict[str, Any]]:
    if not spec:
        return docs
    for path, direction in reversed(list(spec.items())):

        def key(doc: dict[str, Any], path: str = path) -> tuple[int, Any]:
            value = get_path(doc, path)
            return (0, None) if value is MISSING or value is None else (1, value)

        docs = sorted(docs, key=key, reverse=direction < 0)
    return docs
