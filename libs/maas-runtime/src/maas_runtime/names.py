"""Resource ids and names (AIP-122): validation and parsing, safe to use in file paths.

An id is 1-63 characters of lower-case letters, digits, '-', '_' and '.', starting with a
letter or digit, never containing '..'; so an id can never climb out of a directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maas_runtime.errors import InvalidArgument

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_ID_LENGTH = 63
MAX_VERSION = 2**63 - 1


def validate_id(value: str, field_path: str) -> str:
    """Return `value` when it is a valid resource id, else raise INVALID_ARGUMENT naming it."""
    if not value:
        raise InvalidArgument.for_field(field_path, "is required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument.for_field(
            field_path, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}"
        )
    if ".." in value or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument.for_field(
            field_path,
            f"{value!r} is not a valid id: use 1-{MAX_ID_LENGTH} of [a-z0-9._-], starting with "
            "a letter or digit, without '..'",
        )
    return value


def validate_alias(value: str, field_path: str, what: str = "alias") -> str:
    """Aliases start with a letter, so they can never be confused with a version number."""
    if not value:
        raise InvalidArgument.for_field(field_path, "is required")
    if len(value) > MAX_ID_LENGTH or not ALIAS_PATTERN.fullmatch(value):
        raise InvalidArgument.for_field(
            field_path,
            f"{value!r} is not a valid {what}: 1-{MAX_ID_LENGTH} of [a-z0-9_-], starting with a "
            "letter",
        )
    return value


def validate_deployment_id(value: str, field_path: str) -> str:
    """Deployment ids follow the alias rules: no '.', so Triton model names built from them
    (`{deployment}.{model}.v{n}`) can never collide."""
    return validate_alias(value, field_path, "deployment id")


@dataclass(frozen=True)
class VersionRef:
    """A reference to a version of a collection: by number, or by alias."""

    collection: str
    """"models" or "datasets"."""
    parent_id: str
    version_id: int | None = None
    alias: str | None = None

    @property
    def parent(self) -> str:
        return f"{self.collection}/{self.parent_id}"

    @property
    def name(self) -> str:
        if self.alias is not None:
            return f"{self.parent}@{self.alias}"
        return f"{self.parent}/versions/{self.version_id}"


def parse_parent(name: str, collection: str, field_path: str) -> str:
    """`{collection}/{id}` → id."""
    prefix = f"{collection}/"
    if not name.startswith(prefix) or "/" in name[len(prefix):]:
        raise InvalidArgument.for_field(field_path, f"must look like '{collection}/{{id}}', got {name!r}")
    return validate_id(name[len(prefix):], field_path)


def parse_version_name(
    name: str, collection: str, field_path: str, *, allow_alias: bool = True
) -> VersionRef:
    """`{collection}/{id}/versions/{n}` or `{collection}/{id}@{alias}` → VersionRef."""
    prefix = f"{collection}/"
    if not name.startswith(prefix):
        raise InvalidArgument.for_field(
            field_path, f"must look like '{collection}/{{id}}/versions/{{n}}', got {name!r}"
        )
    rest = name[len(prefix):]
    if "@" in rest and allow_alias:
        parent_id, _, alias = rest.partition("@")
        return VersionRef(collection, validate_id(parent_id, field_path),
                          alias=validate_alias(alias, field_path))
    parts = rest.split("/")
    number = parts[2] if len(parts) == 3 else ""
    if parts[1:2] != ["versions"] or not (number.isascii() and number.isdigit()) \
            or not 1 <= int(number) <= MAX_VERSION:
        raise InvalidArgument.for_field(
            field_path, f"must look like '{collection}/{{id}}/versions/{{n}}' with n ≥ 1, got {name!r}"
        )
    return VersionRef(collection, validate_id(parts[0], field_path), version_id=int(parts[2]))
