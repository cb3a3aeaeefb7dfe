"""List filters: a subset of AIP-160, parsed once, then compiled to SQL or evaluated in Python.

A filter such as

    metrics.accuracy > 0.95 AND (labels.team = "a" OR labels.team = "b") AND NOT format = onnx

is parsed by `parse_filter` against a `FilterSchema` that declares which fields a List RPC
accepts and what type each holds; every mistake (unknown field, a string compared with a
number, an unbalanced parenthesis) becomes INVALID_ARGUMENT on the field `filter`, naming the
character position (1-based) where it happened. The typed expression tree that comes back is
turned into a SQLAlchemy condition by `compile_filter` (the store supplies a `FilterResolver`
that knows its tables) or evaluated over a plain record by `matches` (event streams, tests).

Grammar (whitespace separates tokens; keywords are upper-case as in AIP-160):

    filter     := [expression]
    expression := conjunction ("OR" conjunction)*
    conjunction:= unary ("AND" unary)*
    unary      := ("NOT" | "-") unary | "(" expression ")" | comparison
    comparison := path op value | map ":" key | map "." key ":" (value | "*")
    op         := "=" | "!=" | "<" | "<=" | ">" | ">="
    path       := name | map "." key          key := [A-Za-z0-9_.-]+ | `backquoted`
    value      := "quoted string" | number | true | false | bare_word

Deliberate differences from AIP-160: AND binds tighter than OR (as in SQL, which is what
callers expect; AIP-160 has it the other way round), terms must be joined by an explicit AND,
there are no functions or wildcards, and `:` is only defined for map fields.

Semantics are SQL's, in both evaluators: a comparison on a map key the record lacks is false
(so `NOT labels.team = "a"` matches records without a team), and a comparison on a scalar
field that is NULL/None is unknown, which NOT leaves unknown, so such records never match.
"""

from __future__ import annotations

import math
import operator as python_operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum, StrEnum
from typing import Any, NoReturn, Protocol

from sqlalchemy import and_, not_, or_
from sqlalchemy.sql.elements import ColumnElement

from maas_runtime.errors import InvalidArgument

FILTER_FIELD = "filter"
MAX_FILTER_LENGTH = 2000
MAX_FILTER_DEPTH = 32
MAX_MAP_KEY_LENGTH = 256

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"[A-Za-z0-9_.\-]+")
_BARE_WORD = re.compile(r"[A-Za-z0-9_.\-]+")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_KEYWORDS = frozenset({"AND", "OR", "NOT"})
_STRING_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "n": "\n", "r": "\r", "t": "\t"}
_INT64_LIMIT = 2**63


class ValueKind(Enum):
    """What a filterable field holds, and so which literals it may be compared with."""

    STRING = "string"
    NUMBER = "number"
    TIMESTAMP = "timestamp"
    ENUM = "enum"
    BOOL = "bool"


class Operator(StrEnum):
    """A comparison operator; its value is the filter syntax, so `Operator("<=")` works."""

    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="


_ORDERING_OPERATORS = frozenset({Operator.LT, Operator.LE, Operator.GT, Operator.GE})
_PYTHON_OPERATORS: dict[Operator, Callable[[Any, Any], Any]] = {
    Operator.EQ: python_operator.eq,
    Operator.NE: python_operator.ne,
    Operator.LT: python_operator.lt,
    Operator.LE: python_operator.le,
    Operator.GT: python_operator.gt,
    Operator.GE: python_operator.ge,
}

FilterValue = str | int | float | bool | datetime


@dataclass(frozen=True)
class ScalarField:
    """A filterable column, e.g. `ScalarField("state", ValueKind.ENUM, {"READY", "FAILED"})`."""

    name: str
    kind: ValueKind
    enum_values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "enum_values", frozenset(self.enum_values))
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"field name {self.name!r} is not an identifier")
        if (self.kind is ValueKind.ENUM) != bool(self.enum_values):
            raise ValueError(
                f"field {self.name!r}: enum_values are required for, and only for, ENUM"
            )


@dataclass(frozen=True)
class MapField:
    """A string-keyed map filtered per key, e.g. `labels.task = "digits"`, `metrics.loss < 1`."""

    name: str
    value_kind: ValueKind

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"map name {self.name!r} is not an identifier")
        if self.value_kind not in (ValueKind.STRING, ValueKind.NUMBER):
            raise ValueError(f"map {self.name!r}: values must be STRING or NUMBER")


class FilterSchema:
    """The fields one List RPC lets callers filter on; built once by the service."""

    def __init__(
        self, scalar_fields: Iterable[ScalarField] = (), map_fields: Iterable[MapField] = ()
    ) -> None:
        self.scalar_fields: dict[str, ScalarField] = {}
        self.map_fields: dict[str, MapField] = {}
        every: list[ScalarField | MapField] = [*scalar_fields, *map_fields]
        for declared in every:
            if declared.name in self.scalar_fields or declared.name in self.map_fields:
                raise ValueError(f"field {declared.name!r} is declared twice")
            if isinstance(declared, ScalarField):
                self.scalar_fields[declared.name] = declared
            else:
                self.map_fields[declared.name] = declared

    def describe_allowed(self) -> str:
        """The allowed field paths, for error messages: `create_time, format, labels.<key>`."""
        names = [*self.scalar_fields, *(f"{name}.<key>" for name in self.map_fields)]
        return ", ".join(sorted(names)) or "none"


@dataclass(frozen=True)
class FieldComparison:
    """`field op value` on a scalar field; timestamps are timezone-aware UTC datetimes."""

    field: str
    operator: Operator
    value: FilterValue


@dataclass(frozen=True)
class MapComparison:
    """`map.key op value`: true only when the key is present and its value compares true."""

    map_name: str
    key: str
    operator: Operator
    value: str | int | float


@dataclass(frozen=True)
class MapHas:
    """`map:key` or `map.key:*`: true when the key is present, whatever its value."""

    map_name: str
    key: str


@dataclass(frozen=True)
class Not:
    """`NOT operand` or `-operand`."""

    operand: FilterExpr


@dataclass(frozen=True)
class And:
    """All operands hold (two or more)."""

    operands: tuple[FilterExpr, ...]


@dataclass(frozen=True)
class Or:
    """At least one operand holds (two or more)."""

    operands: tuple[FilterExpr, ...]


FilterExpr = FieldComparison | MapComparison | MapHas | Not | And | Or


class FilterResolver(Protocol):
    """What a store supplies to `compile_filter`: how each field maps onto its tables."""

    def scalar(self, field_name: str, /) -> ColumnElement[Any]:
        """The column (or SQL expression) holding a scalar field."""
        ...

    def map_compare(
        self, map_name: str, key: str, operator: Operator, value: str | int | float, /
    ) -> ColumnElement[bool]:
        """A condition true when the row's map has `key` and its value compares true."""
        ...

    def map_has(self, map_name: str, key: str, /) -> ColumnElement[bool]:
        """A condition true when the row's map has `key`."""
        ...


def apply_operator(left: Any, operator: Operator, right: Any) -> Any:
    """`left <op> right` with Python's operators; works on SQL columns and plain values alike."""
    return _PYTHON_OPERATORS[operator](left, right)


def parse_filter(text: str, schema: FilterSchema) -> FilterExpr | None:
    """Parse and type-check `text`; None when it is empty. Raises InvalidArgument("filter")."""
    if len(text) > MAX_FILTER_LENGTH:
        raise InvalidArgument.for_field(
            FILTER_FIELD,
            f"is {len(text):,} characters long; the limit is {MAX_FILTER_LENGTH:,}",
        )
    if not text.strip():
        return None
    return _FilterParser(text, schema).parse()


def compile_filter(expr: FilterExpr, resolver: FilterResolver) -> ColumnElement[bool]:
    """Translate a parsed filter into a SQLAlchemy condition for a `WHERE` clause."""
    match expr:
        case FieldComparison(field=field, operator=op, value=value):
            return apply_operator(resolver.scalar(field), op, value)
        case MapComparison(map_name=map_name, key=key, operator=op, value=value):
            return resolver.map_compare(map_name, key, op, value)
        case MapHas(map_name=map_name, key=key):
            return resolver.map_has(map_name, key)
        case Not(operand=operand):
            return not_(compile_filter(operand, resolver))
        case And(operands=operands):
            return and_(*(compile_filter(operand, resolver) for operand in operands))
        case Or(operands=operands):
            return or_(*(compile_filter(operand, resolver) for operand in operands))
    raise TypeError(f"not a filter expression: {expr!r}")


def matches(expr: FilterExpr | None, record: Mapping[str, Any]) -> bool:
    """Whether `record` passes the filter, with the same NULL semantics as the SQL compiled
    by `compile_filter`. Scalars are `record[field]`, maps are `record[map_name][key]`;
    naive datetimes in the record are taken to be UTC. A missing filter matches everything."""
    if expr is None:
        return True
    return _evaluate(expr, record) is True


def _evaluate(expr: FilterExpr, record: Mapping[str, Any]) -> bool | None:
    """Three-valued (SQL) logic: None means unknown, from a comparison with a NULL scalar."""
    match expr:
        case FieldComparison(field=field, operator=op, value=value):
            return _compare(record.get(field), op, value)
        case MapComparison(map_name=map_name, key=key, operator=op, value=value):
            entries = record.get(map_name) or {}
            if key not in entries:
                return False
            return _compare(entries[key], op, value) is True
        case MapHas(map_name=map_name, key=key):
            return key in (record.get(map_name) or {})
        case Not(operand=operand):
            result = _evaluate(operand, record)
            return None if result is None else not result
        case And(operands=operands):
            results = [_evaluate(operand, record) for operand in operands]
            if False in results:
                return False
            return None if None in results else True
        case Or(operands=operands):
            results = [_evaluate(operand, record) for operand in operands]
            if True in results:
                return True
            return None if None in results else False
    raise TypeError(f"not a filter expression: {expr!r}")


def _compare(actual: Any, op: Operator, expected: FilterValue) -> bool | None:
    if actual is None:
        return None
    if isinstance(actual, datetime) and actual.tzinfo is None:
        actual = actual.replace(tzinfo=UTC)
    if isinstance(actual, Enum) and isinstance(expected, str):
        actual = actual.name
    try:
        return bool(apply_operator(actual, op, expected))
    except TypeError:
        # A record whose field holds an unexpected type simply does not match.
        return None


def _parse_timestamp(text: str) -> datetime | None:
    """An RFC 3339 timestamp (offset required) as an aware UTC datetime; None if malformed."""
    parsed = _RFC3339.fullmatch(text)
    if parsed is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = parsed.groups()
    microseconds = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        offset = timedelta(0) if zulu else timedelta(hours=int(off_h), minutes=int(off_m))
        tz = timezone(-offset if sign == "-" else offset)
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            microseconds, tzinfo=tz,
        )
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True)
class _Literal:
    """A value as written; `kind` is "string", "word", "number" or "star"."""

    kind: str
    text: str
    position: int


class _FilterParser:
    """Recursive descent over the raw text (no separate lexer: '-' means NOT before a term
    but a sign inside a number after an operator, which only the parser knows)."""

    def __init__(self, text: str, schema: FilterSchema) -> None:
        self.text = text
        self.schema = schema
        self.position = 0
        self.depth = 0

    def parse(self) -> FilterExpr:
        expr = self._expression()
        self._skip_whitespace()
        if self.position < len(self.text):
            self._fail(f"unexpected {self._describe_next()}; expected AND, OR or the end")
        return expr

    # Grammar rules ------------------------------------------------------------------------

    def _expression(self) -> FilterExpr:
        operands = [self._conjunction()]
        while self._accept_keyword("OR"):
            operands.append(self._conjunction())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def _conjunction(self) -> FilterExpr:
        operands = [self._unary()]
        while self._accept_keyword("AND"):
            operands.append(self._unary())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def _unary(self) -> FilterExpr:
        self._skip_whitespace()
        start = self.position
        if self._accept_keyword("NOT") or self._accept_char("-"):
            with self._nested(start):
                return Not(self._unary())
        if self._accept_char("("):
            with self._nested(start):
                expr = self._expression()
                self._skip_whitespace()
                if not self._accept_char(")"):
                    self._fail(
                        f"expected ')' to close the '(' opened at character {start + 1}, "
                        f"found {self._describe_next()}"
                    )
                return expr
        return self._comparison()

    def _comparison(self) -> FilterExpr:
        self._skip_whitespace()
        start = self.position
        name = self._match(_NAME)
        if name is None:
            self._fail(f"expected a field name, found {self._describe_next()}")
        if name in _KEYWORDS:
            self._fail(f"expected a field name, found the keyword {name}", start)
        key: str | None = None
        if self._peek() == ".":
            self.position += 1
            key = self._map_key()
        self._skip_whitespace()
        operator_position = self.position
        symbol = self._operator()
        if symbol is None:
            self._fail(
                f"expected a comparison operator (= != < <= > >= :), found {self._describe_next()}"
            )
        if name in self.schema.map_fields:
            return self._map_term(self.schema.map_fields[name], key, symbol, start)
        field = self.schema.scalar_fields.get(name)
        if field is None or key is not None:
            path = name if key is None else f"{name}.{key}"
            self._fail(
                f"unknown field '{path}'; allowed: {self.schema.describe_allowed()}", start
            )
        if symbol == ":":
            self._fail(
                f"the has operator ':' applies to map fields only; compare '{name}' with = or !=",
                operator_position,
            )
        operator = Operator(symbol)
        if operator in _ORDERING_OPERATORS and field.kind in (ValueKind.ENUM, ValueKind.BOOL):
            self._fail(
                f"'{name}' can only be compared with = or !=, not {symbol}", operator_position
            )
        literal = self._value()
        return FieldComparison(name, operator, self._typed(literal, field.kind, name, field))

    def _map_term(
        self, map_field: MapField, key: str | None, symbol: str, start: int
    ) -> FilterExpr:
        name = map_field.name
        if key is None:
            if symbol != ":":
                self._fail(
                    f"'{name}' is a map: compare one key ({name}.<key> {symbol} value) or test "
                    f"for a key ({name}:<key>)",
                    start,
                )
            return MapHas(name, self._presence_key())
        if symbol == ":":
            literal = self._value()
            if literal.kind == "star":
                return MapHas(name, key)
            operator = Operator.EQ
        else:
            operator = Operator(symbol)
            literal = self._value()
        value = self._typed(literal, map_field.value_kind, f"{name}.{key}", None)
        return MapComparison(name, key, operator, value)  # type: ignore[arg-type]

    # Values -------------------------------------------------------------------------------

    def _typed(
        self, literal: _Literal, kind: ValueKind, path: str, field: ScalarField | None
    ) -> FilterValue:
        """Check the literal against the field's type and convert it."""
        written = literal.text if literal.kind != "string" else f'"{literal.text}"'
        if literal.kind == "star":
            self._fail(f"'*' is only allowed after ':' on a map key, e.g. {path}:*",
                       literal.position)
        if kind is ValueKind.NUMBER:
            if literal.kind != "number":
                self._fail(f"'{path}' holds numbers; {written} is not a number",
                           literal.position)
            return self._number(literal)
        if kind is ValueKind.TIMESTAMP:
            timestamp = _parse_timestamp(literal.text) if literal.kind == "string" else None
            if timestamp is None:
                self._fail(
                    f"'{path}' holds timestamps; {written} is not a quoted RFC 3339 timestamp "
                    'such as "2026-01-02T15:04:05Z"',
                    literal.position,
                )
            return timestamp
        if kind is ValueKind.BOOL:
            if literal.kind != "word" or literal.text not in ("true", "false"):
                self._fail(f"'{path}' holds booleans; use true or false, not {written}",
                           literal.position)
            return literal.text == "true"
        if literal.kind not in ("string", "word"):
            self._fail(f"'{path}' holds strings; quote the value: \"{literal.text}\"",
                       literal.position)
        if kind is ValueKind.ENUM and field is not None and literal.text not in field.enum_values:
            self._fail(
                f"{written} is not a value of '{path}'; allowed: "
                f"{', '.join(sorted(field.enum_values))}",
                literal.position,
            )
        return literal.text

    def _number(self, literal: _Literal) -> int | float:
        if re.fullmatch(r"-?\d+", literal.text) and abs(int(literal.text)) < _INT64_LIMIT:
            return int(literal.text)
        value = float(literal.text)
        if not math.isfinite(value):
            self._fail(f"number {literal.text} is out of range", literal.position)
        return value

    def _value(self) -> _Literal:
        self._skip_whitespace()
        start = self.position
        next_char = self._peek()
        if next_char == '"':
            return _Literal("string", self._quoted_string(), start)
        if next_char == "*":
            self.position += 1
            return _Literal("star", "*", start)
        number = self._match(_NUMBER)
        if number is not None and self._is_boundary(self.position):
            return _Literal("number", number, start)
        self.position = start  # not a whole number (e.g. 1.2.3): read it as a bare word
        word = self._match(_BARE_WORD)
        if word is None:
            self._fail(f"expected a value, found {self._describe_next()}")
        if word in _KEYWORDS:
            self._fail(f"expected a value, found the keyword {word}", start)
        return _Literal("word", word, start)

    def _quoted_string(self) -> str:
        start = self.position
        self.position += 1
        pieces: list[str] = []
        while self.position < len(self.text):
            char = self.text[self.position]
            if char == '"':
                self.position += 1
                return "".join(pieces)
            if char == "\\":
                pieces.append(self._escape())
                continue
            pieces.append(char)
            self.position += 1
        self._fail("unterminated string (missing closing '\"')", start)

    def _escape(self) -> str:
        start = self.position
        code = self.text[self.position + 1 : self.position + 2]
        if code in _STRING_ESCAPES:
            self.position += 2
            return _STRING_ESCAPES[code]
        if code == "u":
            digits = self.text[self.position + 2 : self.position + 6]
            if re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
                self.position += 6
                return chr(int(digits, 16))
        self._fail(f"invalid escape sequence '\\{code}' in string", start)

    def _map_key(self) -> str:
        """The key after `map.`: a run of [A-Za-z0-9_.-] or a `backquoted` string."""
        start = self.position
        if self._peek() == "`":
            end = self.text.find("`", start + 1)
            if end < 0:
                self._fail("unterminated backquoted key (missing closing '`')", start)
            key = self.text[start + 1 : end]
            self.position = end + 1
        else:
            key = self._match(_KEY) or ""
        if not key:
            self._fail(f"expected a map key after '.', found {self._describe_next()}", start)
        if len(key) > MAX_MAP_KEY_LENGTH:
            self._fail(f"map key is longer than {MAX_MAP_KEY_LENGTH} characters", start)
        if any(not char.isprintable() for char in key):
            self._fail("map key contains a control character", start)
        return key

    def _presence_key(self) -> str:
        """The key after `map:`, written bare, backquoted or double-quoted."""
        self._skip_whitespace()
        if self._peek() == '"':
            start = self.position
            key = self._quoted_string()
            if not key or len(key) > MAX_MAP_KEY_LENGTH:
                self._fail(f"map key must be 1-{MAX_MAP_KEY_LENGTH} characters", start)
            return key
        return self._map_key()

    # Scanning helpers ---------------------------------------------------------------------

    def _operator(self) -> str | None:
        for symbol in ("<=", ">=", "!=", "=", "<", ">", ":"):
            if self.text.startswith(symbol, self.position):
                self.position += len(symbol)
                return symbol
        return None

    def _accept_keyword(self, keyword: str) -> bool:
        self._skip_whitespace()
        end = self.position + len(keyword)
        if self.text.startswith(keyword, self.position) and self._is_boundary(end):
            self.position = end
            return True
        return False

    def _accept_char(self, char: str) -> bool:
        self._skip_whitespace()
        if self._peek() == char:
            self.position += 1
            return True
        return False

    def _match(self, pattern: re.Pattern[str]) -> str | None:
        found = pattern.match(self.text, self.position)
        if found is None:
            return None
        self.position = found.end()
        return found.group()

    def _is_boundary(self, index: int) -> bool:
        return index >= len(self.text) or not (
            self.text[index].isalnum() or self.text[index] in "_.-`"
        )

    def _peek(self) -> str:
        return self.text[self.position : self.position + 1]

    def _skip_whitespace(self) -> None:
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1

    def _describe_next(self) -> str:
        if self.position >= len(self.text):
            return "the end of the filter"
        return repr(self.text[self.position : self.position + 12])

    def _nested(self, start: int) -> _NestingGuard:
        return _NestingGuard(self, start)

    def _fail(self, description: str, position: int | None = None) -> NoReturn:
        """Raise INVALID_ARGUMENT on `filter`, naming the 1-based character of the mistake."""
        where = self.position if position is None else position
        description = f"{description} (at character {where + 1})"
        raise InvalidArgument.for_field(FILTER_FIELD, description)


class _NestingGuard:
    """Counts parentheses and NOTs so a hostile filter cannot exhaust the Python stack."""

    def __init__(self, parser: _FilterParser, start: int) -> None:
        self.parser = parser
        self.start = start

    def __enter__(self) -> None:
        self.parser.depth += 1
        if self.parser.depth > MAX_FILTER_DEPTH:
            self.parser._fail(f"nesting deeper than {MAX_FILTER_DEPTH} levels", self.start)

    def __exit__(self, *exc_info: object) -> None:
        self.parser.depth -= 1
