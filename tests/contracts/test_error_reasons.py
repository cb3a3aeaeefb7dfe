"""`ErrorInfo.reason` names the problem, never the status code again: every raise of a
MaasError subclass in libs/ and services/ is read (ast) and the reason it would carry, given or
derived, is compared with its class's code."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

from maas_runtime import errors

REPO = Path(__file__).resolve().parents[2]
ERROR_CLASSES = {name: cls for name, cls in vars(errors).items()
                 if inspect.isclass(cls) and issubclass(cls, errors.MaasError)}


def error_call(node: ast.Call) -> tuple[type[errors.MaasError], bool] | None:
    """(class, is for_field) of `Cls(...)`, `errors.Cls(...)` or `Cls.for_field(...)`."""
    func = node.func
    for_field = isinstance(func, ast.Attribute) and func.attr == "for_field"
    if for_field:
        func = func.value  # type: ignore[attr-defined]
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    cls = ERROR_CLASSES.get(name or "")
    return (cls, for_field) if cls is not None else None


def reason_of(node: ast.Call, cls: type[errors.MaasError], for_field: bool) -> str | None:
    """The reason the raise carries, or None when it is computed at run time."""
    given = next((k.value for k in node.keywords if k.arg == "reason"), None)
    if given is not None:
        return given.value if isinstance(given, ast.Constant) else None
    if for_field:
        return errors.InvalidArgument.for_field("field", "description").reason
    if cls in (errors.NotFound, errors.AlreadyExists):
        first = node.args[0] if node.args else None
        resource_type = first.value if isinstance(first, ast.Constant) else "resource"
        return cls(resource_type, "name").reason
    return cls("message").reason


def error_calls() -> Iterator[tuple[str, ast.Call, type[errors.MaasError], bool]]:
    """(`path:line`, call, class, is for_field) of every MaasError call in libs/ and services/."""
    sources = [p for root in ("libs", "services") for p in (REPO / root).rglob("*.py")
               if "maas-api" not in p.parts and "errors.py" != p.name]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found = isinstance(node, ast.Call) and error_call(node)
            if found:
                yield f"{path.relative_to(REPO)}:{node.lineno}", node, *found


def test_no_raise_of_a_maas_error_carries_its_code_as_reason():
    checked, wrong = 0, []
    for where, node, cls, for_field in error_calls():
        reason = reason_of(node, cls, for_field)
        checked += 1
        if reason == cls.code:
            wrong.append(f"{where}: {cls.__name__} with reason {reason}")
    assert checked > 200  # the scan sees the raises (there are about 250)
    assert not wrong, "\n".join(wrong)


def test_no_invalid_argument_or_failed_precondition_falls_back_on_the_default_reason():
    """A generic REQUEST_INVALID or PRECONDITION_UNMET tells a caller nothing the code did not;
    each raise names its problem (`.for_field` derives FIELD_INVALID)."""
    generic = [f"{where}: {cls.__name__} without reason= (would be {cls.default_reason})"
               for where, node, cls, for_field in error_calls()
               if cls in (errors.InvalidArgument, errors.FailedPrecondition) and not for_field
               and not any(k.arg == "reason" for k in node.keywords)]
    assert not generic, "\n".join(generic)


def test_derived_reasons_name_the_problem():
    assert errors.InvalidArgument.for_field("inputs[0].shape", "expected [64]").reason == \
        "FIELD_INVALID"
    assert errors.NotFound("model version", "models/x/versions/1").reason == \
        "MODEL_VERSION_NOT_FOUND"
    assert errors.AlreadyExists("model", "models/x").reason == "MODEL_ALREADY_EXISTS"
    assert errors.InvalidArgument("bad", reason="SHAPE_MISMATCH").reason == "SHAPE_MISMATCH"
    for cls in ERROR_CLASSES.values():
        assert cls.default_reason != cls.code, cls
