"""List filters: parsing, type checks and their errors, and SQL results cross-checked against
the Python evaluator and against plain-Python expectations on a real SQLite database.

The database mirrors the registry's layout: a `versions` table plus `version_labels` and
`version_metrics` side tables that the resolver turns into EXISTS subqueries.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from maas_runtime.errors import InvalidArgument
from maas_runtime.filtering import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_LENGTH,
    And,
    FieldComparison,
    FilterSchema,
    MapComparison,
    MapField,
    MapHas,
    Not,
    Operator,
    Or,
    ScalarField,
    ValueKind,
    apply_operator,
    compile_filter,
    matches,
    parse_filter,
)
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    exists,
    insert,
    select,
)
from sqlalchemy.engine import Connection

SCHEMA = FilterSchema(
    scalar_fields=[
        ScalarField("format", ValueKind.STRING),
        ScalarField("create_time", ValueKind.TIMESTAMP),
        ScalarField("principal", ValueKind.STRING),
        ScalarField("state", ValueKind.ENUM, frozenset({"READY", "PENDING", "FAILED"})),
        ScalarField("deployed", ValueKind.BOOL),
    ],
    map_fields=[MapField("labels", ValueKind.STRING), MapField("metrics", ValueKind.NUMBER)],
)

metadata = MetaData()
versions = Table(
    "versions", metadata,
    Column("id", Integer, primary_key=True),
    Column("format", String(32), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("principal", String(64), nullable=True),
    Column("state", String(16), nullable=False),
    Column("deployed", Integer, nullable=False),
)
version_labels = Table(
    "version_labels", metadata,
    Column("version_id", Integer, ForeignKey("versions.id"), primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", String(63), nullable=False),
)
version_metrics = Table(
    "version_metrics", metadata,
    Column("version_id", Integer, ForeignKey("versions.id"), primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", Float, nullable=False),
)
SIDE_TABLES = {"labels": version_labels, "metrics": version_metrics}

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
K8S_NAME = "app.kubernetes.io/name"


class VersionsResolver:
    """What a store would supply: scalar columns and EXISTS over the side tables."""

    def scalar(self, field_name: str) -> Any:
        return versions.c[field_name]

    def map_compare(self, map_name: str, key: str, op: Operator, value: Any) -> Any:
        side = SIDE_TABLES[map_name]
        return exists().where(
            side.c.version_id == versions.c.id,
            side.c.key == key,
            apply_operator(side.c.value, op, value),
        )

    def map_has(self, map_name: str, key: str) -> Any:
        side = SIDE_TABLES[map_name]
        return exists().where(side.c.version_id == versions.c.id, side.c.key == key)


def build_records() -> list[dict[str, Any]]:
    """50 versions: six hand-written "golden" ones, then seeded random variety."""
    golden = [
        # id, format, hours after EPOCH, principal, state, labels, metrics
        (1, "onnx", 1, "alice", "READY", {"batch": "golden", "task": "digits", "team": "a"},
         {"accuracy": 0.97, "loss": 0.2}),
        (2, "onnx", 30, None, "READY", {"batch": "golden", "task": "digits"},
         {"accuracy": 0.95, "loss": 0.5}),
        (3, "torchscript", 47, "bob", "FAILED", {"batch": "golden", "task": "faces", "team": "b"},
         {"accuracy": 0.99}),
        (4, "savedmodel", 48, "alice", "PENDING", {"batch": "golden", "task": "digits",
         "team": "c"}, {"accuracy": 0.951, "loss": 0.51}),
        (5, "onnx", 49, "carol", "READY", {"batch": "golden", "team": "a"}, {}),
        (6, "tensorrt", 100, None, "READY", {"batch": "golden", "task": "digits", "team": "b"},
         {"accuracy": 0.96, "loss": 0.1, "delta": -0.25}),
    ]
    records = [
        {"id": id_, "format": fmt, "create_time": EPOCH + timedelta(hours=hours),
         "principal": principal, "state": state, "deployed": id_ % 2 == 0,
         "labels": labels, "metrics": metrics}
        for id_, fmt, hours, principal, state, labels, metrics in golden
    ]
    generator = random.Random(160)
    for id_ in range(7, 51):
        labels = {}
        if generator.random() < 0.7:
            labels["team"] = generator.choice(["a", "b", "c"])
        if generator.random() < 0.8:
            labels["task"] = generator.choice(["digits", "faces", "speech"])
        if generator.random() < 0.2:
            labels[K8S_NAME] = generator.choice(["digits-cnn", "faces-vit"])
        metrics = {}
        if generator.random() < 0.85:
            metrics["accuracy"] = round(generator.uniform(0.85, 1.0), 3)
        if generator.random() < 0.7:
            metrics["loss"] = round(generator.uniform(0.0, 1.0), 2)
        if generator.random() < 0.3:
            metrics["delta"] = round(generator.uniform(-0.5, 0.5), 2)
        if generator.random() < 0.3:
            metrics["epochs"] = generator.randint(1, 20)
        records.append({
            "id": id_,
            "format": generator.choice(["onnx", "torchscript", "savedmodel", "tensorrt"]),
            "create_time": EPOCH + timedelta(minutes=generator.randint(0, 4 * 24 * 60)),
            "principal": generator.choice(["alice", "bob", "carol", None]),
            "state": generator.choice(["READY", "PENDING", "FAILED"]),
            "deployed": generator.random() < 0.5,
            "labels": labels,
            "metrics": metrics,
        })
    return records


RECORDS = build_records()


@pytest.fixture(scope="module")
def connection() -> Iterator[Connection]:
    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    with engine.begin() as setup:
        for record in RECORDS:
            setup.execute(insert(versions).values(
                {column: record[column] for column in versions.c.keys()}
            ))
            for map_name, side in SIDE_TABLES.items():
                for key, value in record[map_name].items():
                    setup.execute(insert(side).values(version_id=record["id"], key=key,
                                                      value=value))
    with engine.connect() as open_connection:
        yield open_connection
    engine.dispose()


def sql_ids(connection: Connection, filter_text: str) -> set[int]:
    expr = parse_filter(filter_text, SCHEMA)
    assert expr is not None
    query = select(versions.c.id).where(compile_filter(expr, VersionsResolver()))
    return set(connection.execute(query).scalars())


def python_ids(filter_text: str) -> set[int]:
    expr = parse_filter(filter_text, SCHEMA)
    return {record["id"] for record in RECORDS if matches(expr, record)}


def expected_ids(predicate: Callable[[dict[str, Any]], bool]) -> set[int]:
    return {record["id"] for record in RECORDS if predicate(record)}


def at(day: int, hour: int = 0) -> datetime:
    return datetime(2026, 1, day, hour, tzinfo=UTC)


def label(record: dict[str, Any], key: str) -> str | None:
    return record["labels"].get(key)


def metric(record: dict[str, Any], key: str) -> float | None:
    return record["metrics"].get(key)


# Each filter with the same question asked in plain Python, independent of the module.
CROSS_CHECKED_FILTERS: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ('metrics.accuracy > 0.95 AND labels.task = "digits"',
     lambda r: (metric(r, "accuracy") or 0) > 0.95 and label(r, "task") == "digits"),
    ('NOT format = "onnx"', lambda r: r["format"] != "onnx"),
    ("-format = onnx", lambda r: r["format"] != "onnx"),
    ('format != "onnx"', lambda r: r["format"] != "onnx"),
    ('(labels.team = "a" OR labels.team = "b") AND create_time >= "2026-01-02T00:00:00Z"',
     lambda r: label(r, "team") in ("a", "b") and r["create_time"] >= at(2)),
    ("labels:team", lambda r: "team" in r["labels"]),
    ("labels.team:*", lambda r: "team" in r["labels"]),
    ("NOT metrics:loss", lambda r: "loss" not in r["metrics"]),
    ("metrics.loss <= 0.5", lambda r: metric(r, "loss") is not None and metric(r, "loss") <= 0.5),
    ('labels.task:"digits"', lambda r: label(r, "task") == "digits"),
    # A missing key makes the comparison false, so NOT keeps versions without a team.
    ('NOT labels.team = "a"', lambda r: label(r, "team") != "a"),
    ('labels.team != "a"', lambda r: label(r, "team") not in (None, "a")),
    # AND binds tighter than OR.
    ('format = "onnx" OR format = "tensorrt" AND metrics.accuracy >= 0.9',
     lambda r: r["format"] == "onnx"
     or (r["format"] == "tensorrt" and (metric(r, "accuracy") or 0) >= 0.9)),
    ('(format = "onnx" OR format = "tensorrt") AND metrics.accuracy >= 0.9',
     lambda r: r["format"] in ("onnx", "tensorrt") and (metric(r, "accuracy") or 0) >= 0.9),
    # NULL principal: unknown, and NOT unknown is still unknown, as in SQL.
    ('principal = "alice"', lambda r: r["principal"] == "alice"),
    ('NOT principal = "alice"', lambda r: r["principal"] not in (None, "alice")),
    ('principal != "alice" OR state = READY',
     lambda r: r["principal"] not in (None, "alice") or r["state"] == "READY"),
    ("state = READY", lambda r: r["state"] == "READY"),
    ('state != "FAILED" AND deployed = true',
     lambda r: r["state"] != "FAILED" and r["deployed"]),
    ('create_time < "2026-01-02T02:00:00+02:00"', lambda r: r["create_time"] < at(2)),
    ('create_time >= "2026-01-03T00:00:00.5Z" AND create_time <= "2026-01-04T12:00:00Z"',
     lambda r: at(3) + timedelta(milliseconds=500) <= r["create_time"] <= at(4, 12)),
    ("metrics.epochs >= 10", lambda r: (metric(r, "epochs") or 0) >= 10),
    ("metrics.delta < -0.1",
     lambda r: metric(r, "delta") is not None and metric(r, "delta") < -0.1),
    (f'labels.`{K8S_NAME}` = "digits-cnn"', lambda r: label(r, K8S_NAME) == "digits-cnn"),
    (f'labels:"{K8S_NAME}"', lambda r: K8S_NAME in r["labels"]),
    ('NOT (labels.team = "a" AND metrics.accuracy > 0.9) AND labels.task = faces',
     lambda r: not (label(r, "team") == "a" and (metric(r, "accuracy") or 0) > 0.9)
     and label(r, "task") == "faces"),
    ('labels.task > "e"', lambda r: label(r, "task") is not None and label(r, "task") > "e"),
]


@pytest.mark.parametrize(("filter_text", "predicate"), CROSS_CHECKED_FILTERS,
                         ids=[text for text, _ in CROSS_CHECKED_FILTERS])
def test_sql_and_python_agree_with_plain_python(
    connection: Connection, filter_text: str, predicate: Callable[[dict[str, Any]], bool]
) -> None:
    expected = expected_ids(predicate)
    # A filter that keeps everything or nothing would not show the condition working.
    assert 0 < len(expected) < len(RECORDS), expected
    assert sql_ids(connection, filter_text) == expected
    assert python_ids(filter_text) == expected


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ('labels.batch = "golden" AND metrics.accuracy > 0.95 AND labels.task = "digits"',
         {1, 4, 6}),
        ('labels.batch = "golden" AND metrics.loss <= 0.5', {1, 2, 6}),
        ('labels.batch = "golden" AND NOT format = "onnx"', {3, 4, 6}),
        ('labels.batch = "golden" AND (labels.team = "a" OR labels.team = "b") '
         'AND create_time >= "2026-01-02T00:00:00Z"', {3, 5, 6}),
        ('labels.batch = "golden" AND NOT principal = "alice"', {3, 5}),
        ('labels.batch = "golden" AND NOT labels:team', {2}),
        # 01:00:01+02:00 is 23:00:01 UTC the day before: just after version 3 (47 h).
        ('labels.batch = "golden" AND create_time < "2026-01-03T01:00:01+02:00"', {1, 2, 3}),
    ],
)
def test_hand_computed_results_on_the_golden_rows(
    connection: Connection, filter_text: str, expected: set[int]
) -> None:
    assert sql_ids(connection, filter_text) == expected
    assert python_ids(filter_text) == expected


def random_filter(generator: random.Random, depth: int = 0) -> str:
    """A random well-typed filter over the test schema, for SQL-versus-Python agreement."""
    if depth < 3 and generator.random() < 0.45:
        joiner = generator.choice([" AND ", " OR "])
        parts = [random_filter(generator, depth + 1) for _ in range(generator.randint(2, 3))]
        return "(" + joiner.join(parts) + ")"
    if depth < 3 and generator.random() < 0.15:
        return generator.choice(["NOT ", "-"]) + random_filter(generator, depth + 1)
    operator = generator.choice(["=", "!=", "<", "<=", ">", ">="])
    terms = [
        lambda: f"metrics.{generator.choice(['accuracy', 'loss', 'delta'])} {operator} "
                f"{generator.choice(['0.9', '0.95', '0.5', '-0.1', '1', '0'])}",
        lambda: f'labels.{generator.choice(["team", "task"])} {operator} '
                f'"{generator.choice(["a", "b", "digits", "faces", "m"])}"',
        lambda: f"{generator.choice(['labels', 'metrics'])}:"
                f"{generator.choice(['team', 'task', 'loss', 'delta'])}",
        lambda: f'principal {operator} "{generator.choice(["alice", "bob", "carol"])}"',
        lambda: f'format {operator} {generator.choice(["onnx", "tensorrt", "savedmodel"])}',
        lambda: f'create_time {operator} "2026-01-0{generator.randint(1, 4)}T12:00:00'
                f'{generator.choice(["Z", "+05:30", "-08:00"])}"',
        lambda: f"state {generator.choice(['=', '!='])} {generator.choice(['READY', 'FAILED'])}",
        lambda: f"deployed {generator.choice(['=', '!='])} {generator.choice(['true', 'false'])}",
    ]
    return generator.choice(terms)()


def test_random_filters_give_the_same_rows_in_sql_and_python(connection: Connection) -> None:
    generator = random.Random(2026)
    distinct_results = set()
    for _ in range(300):
        filter_text = random_filter(generator)
        python_result = python_ids(filter_text)
        assert sql_ids(connection, filter_text) == python_result, filter_text
        distinct_results.add(frozenset(python_result))
    assert len(distinct_results) > 50  # the filters really did select different rows


def test_random_text_parses_or_fails_invalid_argument() -> None:
    pieces = ["format", "labels", "metrics", ".", "team", ":", "=", "!=", "<=", ">", '"',
              '"x"', "\\", "`", "(", ")", " ", "AND", "OR", "NOT", "-", "*", "1", "0.5",
              "e", "state", "READY", "create_time", '"2026-01-02T00:00:00Z"', "true", "\x00"]
    generator = random.Random(160)
    parsed = 0
    for _ in range(5000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(1, 12)))
        try:
            expr = parse_filter(text, SCHEMA)
        except InvalidArgument as error:
            assert error.field_violations[0].field == "filter"
            continue
        parsed += 1
        matches(expr, RECORDS[0])
    assert parsed > 0


def test_and_binds_tighter_than_or() -> None:
    a, b, c = (MapComparison("labels", key, Operator.EQ, "x") for key in "abc")
    assert parse_filter("labels.a = x OR labels.b = x AND labels.c = x", SCHEMA) == Or(
        (a, And((b, c)))
    )
    assert parse_filter("(labels.a = x OR labels.b = x) AND labels.c = x", SCHEMA) == And(
        (Or((a, b)), c)
    )
    assert parse_filter("NOT labels.a = x AND -labels.b:*", SCHEMA) == And(
        (Not(a), Not(MapHas("labels", "b")))
    )


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ('create_time >= "2026-01-02T02:30:00+02:30"',
         FieldComparison("create_time", Operator.GE, datetime(2026, 1, 2, tzinfo=UTC))),
        ('create_time < "2026-01-01t23:00:00.123456789-01:00"',
         FieldComparison("create_time", Operator.LT, datetime(2026, 1, 2, 0, 0, 0, 123456,
                                                              tzinfo=UTC))),
        ("metrics.x > -1.5e2", MapComparison("metrics", "x", Operator.GT, -150.0)),
        ("metrics.x = 5", MapComparison("metrics", "x", Operator.EQ, 5)),
        ("metrics.x != .5", MapComparison("metrics", "x", Operator.NE, 0.5)),
        ("metrics.x:-3", MapComparison("metrics", "x", Operator.EQ, -3)),
        (r'labels.note = "say \"hi\"\\\n\u00e9"',
         MapComparison("labels", "note", Operator.EQ, 'say "hi"\\\n\u00e9')),
        ("labels.version = 1.2.3", MapComparison("labels", "version", Operator.EQ, "1.2.3")),
        ("labels.my-key.v2 = ok", MapComparison("labels", "my-key.v2", Operator.EQ, "ok")),
        ("labels.`odd key/:`:*", MapHas("labels", "odd key/:")),
        ("  state=READY  ", FieldComparison("state", Operator.EQ, "READY")),
        ("deployed = false", FieldComparison("deployed", Operator.EQ, False)),
        ('format = "AND"', FieldComparison("format", Operator.EQ, "AND")),
        ('NOT(format="a")', Not(FieldComparison("format", Operator.EQ, "a"))),
    ],
)
def test_parsed_values_are_typed(filter_text: str, expected: object) -> None:
    parsed = parse_filter(filter_text, SCHEMA)
    assert parsed == expected
    if isinstance(parsed, FieldComparison) and isinstance(parsed.value, datetime):
        assert parsed.value.utcoffset() == timedelta(0)


def test_timestamps_reach_the_resolver_timezone_aware() -> None:
    expr = parse_filter('create_time > "2026-01-02T05:00:00+05:00"', SCHEMA)
    assert expr is not None
    condition = compile_filter(expr, VersionsResolver())
    bound = condition.right.value  # type: ignore[attr-defined]
    assert bound == datetime(2026, 1, 2, tzinfo=UTC)
    assert bound.tzinfo is not None


def test_map_comparisons_are_handed_to_the_resolver() -> None:
    calls: list[tuple[Any, ...]] = []

    class RecordingResolver(VersionsResolver):
        def map_compare(self, map_name: str, key: str, op: Operator, value: Any) -> Any:
            calls.append(("compare", map_name, key, op, value))
            return super().map_compare(map_name, key, op, value)

        def map_has(self, map_name: str, key: str) -> Any:
            calls.append(("has", map_name, key))
            return super().map_has(map_name, key)

    expr = parse_filter("metrics.accuracy > 0.95 OR labels:team", SCHEMA)
    assert expr is not None
    compile_filter(expr, RecordingResolver())
    assert calls == [("compare", "metrics", "accuracy", Operator.GT, 0.95),
                     ("has", "labels", "team")]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_filter_is_none_and_matches_everything(text: str) -> None:
    assert parse_filter(text, SCHEMA) is None
    assert matches(None, RECORDS[0])


def test_matches_treats_naive_datetimes_as_utc_and_missing_fields_as_null() -> None:
    expr = parse_filter('create_time >= "2026-01-02T00:00:00Z"', SCHEMA)
    assert matches(expr, {"create_time": datetime(2026, 1, 2)})
    assert not matches(expr, {"create_time": datetime(2026, 1, 1, 23, 59)})
    assert matches(expr, {"create_time": datetime(2026, 1, 2, 1, tzinfo=timezone(timedelta(
        hours=1)))})
    not_expr = parse_filter('NOT create_time >= "2026-01-02T00:00:00Z"', SCHEMA)
    assert not matches(not_expr, {})
    assert not matches(not_expr, {"create_time": "2026-01-03"})  # wrong type never matches


def test_filter_at_the_length_limit_is_accepted() -> None:
    text = 'format = "' + "x" * (MAX_FILTER_LENGTH - 11) + '"'
    assert len(text) == MAX_FILTER_LENGTH
    assert parse_filter(text, SCHEMA) == FieldComparison(
        "format", Operator.EQ, "x" * (MAX_FILTER_LENGTH - 11)
    )


def test_nesting_at_the_depth_limit_is_accepted() -> None:
    text = "(" * MAX_FILTER_DEPTH + "format = a" + ")" * MAX_FILTER_DEPTH
    assert parse_filter(text, SCHEMA) == FieldComparison("format", Operator.EQ, "a")
    assert parse_filter("NOT " * MAX_FILTER_DEPTH + "format = a", SCHEMA) is not None


@pytest.mark.parametrize(
    ("filter_text", "expected_description"),
    [
        ('foo = "x"', "unknown field 'foo'; allowed: create_time, deployed, format, "
                      "labels.<key>, metrics.<key>, principal, state (at character 1)"),
        ('format.x = "x"', "unknown field 'format.x'"),
        ('labels = "x"', "'labels' is a map"),
        ('metrics.accuracy > "x"', "'metrics.accuracy' holds numbers; \"x\" is not a number "
                                   "(at character 20)"),
        ("metrics.accuracy > high", "holds numbers"),
        ("metrics.accuracy > 1e999", "out of range"),
        ("create_time > 5", "'create_time' holds timestamps"),
        ('create_time > "yesterday"', "holds timestamps"),
        ('create_time > "2026-01-02T00:00:00"', "holds timestamps"),
        ('create_time > "2026-02-30T00:00:00Z"', "holds timestamps"),
        ("format = 5", "holds strings"),
        ("state = DELETED", "DELETED is not a value of 'state'; allowed: FAILED, PENDING, READY"),
        ("state > READY", "can only be compared with = or !="),
        ('deployed = "yes"', "holds booleans"),
        ('format:"onnx"', "has operator ':' applies to map fields only"),
        ('(format = "onnx"', "expected ')' to close the '(' opened at character 1, "
                             "found the end of the filter (at character 17)"),
        ('((format = "onnx")', "expected ')'"),
        ('format = "onnx")', "unexpected ')'; expected AND, OR or the end (at character 16)"),
        ('format = "onnx" garbage', "unexpected 'garbage'; expected AND, OR or the end "
                                    "(at character 17)"),
        ('format = "onnx" AND', "expected a field name, found the end of the filter"),
        ('AND format = "onnx"', "found the keyword AND (at character 1)"),
        ('format = "onnx" OR OR x = 1', "found the keyword OR"),
        ("format = ", "expected a value, found the end of the filter"),
        ("format = OR", "expected a value, found the keyword OR"),
        ('format "onnx"', "expected a comparison operator"),
        ('format == "onnx"', "expected a value"),
        ('format = "onnx', "unterminated string (missing closing '\"') (at character 10)"),
        (r'format = "\q"', "invalid escape sequence '\\q'"),
        (r'format = "\u00"', "invalid escape sequence '\\u'"),
        ("format = *", "'*' is only allowed after ':'"),
        ("labels.`team = x", "unterminated backquoted key"),
        ("labels. = x", "expected a map key"),
        ("labels:", "expected a map key"),
        ("()", "expected a field name"),
        ("-", "expected a field name"),
        ("format = a ; DROP TABLE versions", "unexpected ';"),
        ('format = "' + "x" * (MAX_FILTER_LENGTH - 10) + '"',
         "is 2,001 characters long; the limit is 2,000"),
        ("(" * (MAX_FILTER_DEPTH + 1) + "format = a" + ")" * (MAX_FILTER_DEPTH + 1),
         f"nesting deeper than {MAX_FILTER_DEPTH} levels"),
        ("NOT " * (MAX_FILTER_DEPTH + 1) + "format = a", "nesting deeper"),
        ("-" * 1000 + "format = a", "nesting deeper"),
    ],
)
def test_bad_filters_are_invalid_argument_on_filter(
    filter_text: str, expected_description: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_filter(filter_text, SCHEMA)
    assert raised.value.code == "INVALID_ARGUMENT"
    [violation] = raised.value.field_violations
    assert violation.field == "filter"
    assert expected_description in violation.description
    if "limit is" not in expected_description:
        assert "(at character " in violation.description


def test_schema_rejects_inconsistent_declarations() -> None:
    with pytest.raises(ValueError):
        ScalarField("state", ValueKind.ENUM)
    with pytest.raises(ValueError):
        ScalarField("format", ValueKind.STRING, frozenset({"onnx"}))
    with pytest.raises(ValueError):
        MapField("flags", ValueKind.BOOL)
    with pytest.raises(ValueError):
        FilterSchema([ScalarField("labels", ValueKind.STRING)],
                     [MapField("labels", ValueKind.STRING)])
