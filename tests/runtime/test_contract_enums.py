"""Every enum value name the code spells out exists in the contracts' descriptors."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import maas
from maas_runtime import contract_enums

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "libs" / "maas-api"


def contract_enum_names() -> tuple[set[str], set[str]]:
    """(every value name, every value-name prefix) of the enums in the maas.* contracts."""
    names, prefixes = set(), set()
    for module_info in pkgutil.walk_packages(maas.__path__, "maas."):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(module_info.name)
        enums = list(module.DESCRIPTOR.enum_types_by_name.values())
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            message = pending.pop()
            enums.extend(message.enum_types)
            pending.extend(message.nested_types)
        for enum in enums:
            names.update(value.name for value in enum.values)
            zero = enum.values_by_number[0].name
            if zero.endswith("UNSPECIFIED"):
                prefixes.add(zero.removesuffix("UNSPECIFIED"))
    return names, prefixes


def enum_like_strings(source: str, prefixes: set[str]) -> set[str]:
    """String constants (f-string parts too) in `source` that start with an enum prefix."""
    tree = ast.parse(source)
    exported = {id(element) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                for element in ast.walk(node.value)}  # names of Python objects, not enums
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in exported):
            word = node.value
            if word.isupper() and any(word.startswith(prefix) for prefix in prefixes):
                found.add(word)
    return found


def unknown_names(source: str) -> set[str]:
    names, prefixes = contract_enum_names()
    return {word for word in enum_like_strings(source, prefixes)
            if word not in names and word not in prefixes}


def test_the_scan_finds_a_misspelled_enum_name_and_accepts_real_ones():
    source = ('FORMAT = "MODEL_FORMAT_ONXX"\nOK = "MODEL_FORMAT_ONNX"\n'
              'PREFIX = f"DATA_TYPE_{kind}"\nSTATE = "JOB_STATE_RUNING"\n')
    assert unknown_names(source) == {"MODEL_FORMAT_ONXX", "JOB_STATE_RUNING"}


def test_every_enum_name_in_libs_and_services_exists_in_the_contracts():
    names, prefixes = contract_enum_names()
    sources = [path for root in ("libs", "services") for path in (REPO / root).rglob("*.py")
               if GENERATED not in path.parents and ".egg-info" not in str(path)]
    used: dict[str, set[Path]] = {}
    for path in sources:
        for word in enum_like_strings(path.read_text(), prefixes):
            used.setdefault(word, set()).add(path.relative_to(REPO))
    unknown = {word: sorted(map(str, paths)) for word, paths in used.items()
               if word not in names and word not in prefixes}
    assert sources and not unknown, unknown


def test_the_constants_module_matches_the_descriptors():
    names, prefixes = contract_enum_names()
    constants = {value for key, value in vars(contract_enums).items()
                 if key.isupper() and isinstance(value, str)}
    assert constants and constants <= names | prefixes
    assert set(contract_enums.DATA_TYPES) <= names
    assert "DATA_TYPE_UNSPECIFIED" not in contract_enums.DATA_TYPES
