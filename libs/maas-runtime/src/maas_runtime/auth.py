"""Bearer-token authentication and role-based authorisation, without any transport code.

Tokens live in a JSON tokens file that stores only sha256 hashes:

    {"tokens": [{"sha256": "<hex>", "principal": "alice", "role": "editor",
                 "models": ["digits", "mnist-*"], "tenant": "acme"}]}

`models` (optional) scopes a token to model ids (shell-style patterns). `tenant` (optional)
names whose limits and usage the token's calls count against; its principal when absent. On first start a
service writes an admin token into the state directory (mode 0600) and its hash into the
tokens file, so auth is on by default and the operator can still get in.
"""

from __future__ import annotations

import contextvars
import enum
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from maas_runtime.errors import PermissionDenied, Unauthenticated

TOKENS_FILENAME = "tokens.json"


class Role(enum.IntEnum):
    """Ordered access levels; values match `maas.common.v1.Role`."""

    VIEWER = 1
    EDITOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}; expected viewer, editor or admin") from None


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: Role
    model_scopes: tuple[str, ...] = ()
    tenant: str = ""
    """Whose limits and usage the calls count against ("" for the principal's own)."""

    def require(self, role: Role, action: str) -> None:
        if self.role < role:
            raise PermissionDenied(
                f"{self.name} ({self.role.name.lower()}) may not {action}: "
                f"needs {role.name.lower()}",
                reason="INSUFFICIENT_ROLE",
                metadata={"principal": self.name, "required_role": role.name.lower()},
            )

    def may_access_model(self, model_id: str) -> bool:
        return not self.model_scopes or any(
            fnmatch.fnmatchcase(model_id, pattern) for pattern in self.model_scopes
        )

    def require_model(self, model_id: str) -> None:
        if not self.may_access_model(model_id):
            raise PermissionDenied(
                f"{self.name} is not scoped to model {model_id!r}",
                reason="MODEL_OUT_OF_SCOPE",
                metadata={"principal": self.name, "model": model_id},
            )


ANONYMOUS_ADMIN = Principal("anonymous", Role.ADMIN)
"""The principal of every call when auth is switched off."""

_current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "maas_current_principal", default=ANONYMOUS_ADMIN
)


def current_principal() -> Principal:
    """The caller of the RPC being handled (set by the auth interceptor)."""
    return _current_principal.get()


def set_current_principal(principal: Principal) -> contextvars.Token:
    return _current_principal.set(principal)


def reset_current_principal(token: contextvars.Token) -> None:
    _current_principal.reset(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenStore:
    """Token hashes → principals, loaded from the tokens file and reloaded when it changes."""

    path: Path
    recheck_seconds: float = 1.0
    """How often the file's mtime is looked at: a new token works within this delay, and the
    hot path does not pay a stat() per request."""
    _by_hash: dict[str, Principal] = field(default_factory=dict)
    _loaded_mtime: float | None = None
    _checked_at: float = float("-inf")

    def authenticate(self, authorization: str | None) -> Principal:
        # Header values are taken trimmed: some clients (perf_analyzer's `-H`) send the value
        # with the space after the colon still in front of it.
        authorization = (authorization or "").strip()
        if not authorization:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata",
                                  reason="MISSING_TOKEN")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization must be `Bearer <token>`",
                                  reason="MALFORMED_TOKEN")
        digest = hash_token(token.strip())
        self._reload_if_changed()
        principal = self._lookup(digest)
        if principal is None:
            # A token minted a moment ago: look at the file now rather than after the delay.
            self._reload_if_changed(force=True)
            principal = self._lookup(digest)
        if principal is not None:
            return principal
        raise Unauthenticated("unknown token", reason="INVALID_TOKEN")

    def _lookup(self, digest: str) -> Principal | None:
        for known_hash, principal in self._by_hash.items():
            if hmac.compare_digest(known_hash, digest):
                return principal
        return None

    def _reload_if_changed(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.recheck_seconds:
            return
        self._checked_at = now
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._by_hash, self._loaded_mtime = {}, None
            return
        if mtime != self._loaded_mtime:
            self._by_hash = _parse_tokens_file(self.path)
            self._loaded_mtime = mtime


def _parse_tokens_file(path: Path) -> dict[str, Principal]:
    document = json.loads(path.read_text())
    principals = {}
    for entry in document.get("tokens", []):
        principals[entry["sha256"]] = Principal(
            name=entry["principal"],
            role=Role.parse(entry["role"]),
            model_scopes=tuple(entry.get("models", ())),
            tenant=entry.get("tenant", ""),
        )
    return principals


def add_token(
    tokens_file: Path, principal: str, role: Role, models: Iterable[str] = (), tenant: str = ""
) -> str:
    """Mint a token for `principal`, record its hash in the tokens file and return it."""
    token = secrets.token_urlsafe(32)
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    document = json.loads(tokens_file.read_text()) if tokens_file.exists() else {"tokens": []}
    entry: dict[str, str | list[str]] = {
        "sha256": hash_token(token), "principal": principal, "role": role.name.lower()}
    if models:
        entry["models"] = list(models)
    if tenant:
        entry["tenant"] = tenant
    document["tokens"].append(entry)
    _write_private(tokens_file, json.dumps(document, indent=2))
    return token


def ensure_admin_token(token_path: Path, tokens_file: Path) -> Path:
    """On first start, mint an admin token into `token_path` (0600); return its path."""
    if not token_path.exists():
        token = add_token(tokens_file, "admin", Role.ADMIN)
        _write_private(token_path, token + "\n")
    return token_path


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600: a reader never sees a half-written tokens file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class TokenInfo:
    """What the tokens file knows of a token: never the token itself, only its hash."""

    sha256: str
    principal: str
    role: str
    models: tuple[str, ...] = ()
    tenant: str = ""


def list_tokens(tokens_file: Path) -> list[TokenInfo]:
    """Every token recorded in the tokens file (none when it does not exist)."""
    if not tokens_file.exists():
        return []
    return [TokenInfo(entry["sha256"], entry["principal"], entry["role"],
                      tuple(entry.get("models", ())), entry.get("tenant", ""))
            for entry in json.loads(tokens_file.read_text()).get("tokens", [])]


def revoke_tokens(tokens_file: Path, principal_or_hash: str) -> int:
    """Remove every token of a principal, or the one whose sha256 starts with the given hex
    prefix (at least 8 characters); returns how many were removed. Services stop accepting
    them within their `recheck_seconds`."""
    if not tokens_file.exists():
        return 0
    document = json.loads(tokens_file.read_text())
    wanted = principal_or_hash.strip()
    by_hash = len(wanted) >= 8 and all(c in "0123456789abcdef" for c in wanted.lower())

    def revoked(entry: dict) -> bool:
        return entry["principal"] == wanted or (
            by_hash and entry["sha256"].startswith(wanted.lower()))

    kept = [entry for entry in document.get("tokens", []) if not revoked(entry)]
    removed = len(document.get("tokens", [])) - len(kept)
    if removed:
        document["tokens"] = kept
        _write_private(tokens_file, json.dumps(document, indent=2))
    return removed
