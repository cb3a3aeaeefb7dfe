"""`ErrorInfo.reason` names the problem, never the status code again: every raise of a
MaasError subclass in libs/ and services/ is read (ast) and the reason it would carry, given or
derived, is compared with its class's code."""

from __future__ import annotations

import ast
import inspect
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


def test_no_raise_of_a_maas_error_carries_its_code_as_reason():
    sources = [p for root in ("libs", "services") for p in (REPO / root).rglob("*.py")
               if "maas-api" not in p.parts and "errors.py" != p.name]
    checked, wrong = 0, []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            found = isinstance(node, ast.Call) and error_call(node)
            if not found:
                continue
            reason = reason_of(node, *found)
            checked += 1
            if reason == found[0].code:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: {found[0].__name__} "
                             f"with reason {reason}")
    assert checked > 200  # the scan sees the raises (there are about 250)
    assert not wrong, "\n".join(wrong)


def test_derived_reasons_name_the_problem():
    assert errors.InvalidArgument.for_field("inputs[0].shape", "expected [64]").reason == \
        "FIELD_INVALID"
    assert errors.NotFound("model version", "models/x/versions/1").reason == \
        "MODEL_VERSION_NOT_FOUND"
    assert errors.AlreadyExists("model", "models/x").reason == "MODEL_ALREADY_EXISTS"
    assert errors.InvalidArgument("bad", reason="SHAPE_MISMATCH").reason == "SHAPE_MISMATCH"
    for cls in ERROR_CLASSES.values():
        assert cls.default_reason != cls.code, cls
