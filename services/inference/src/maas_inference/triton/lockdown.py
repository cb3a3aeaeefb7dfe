"""Triton behind the gateway only: the control key that guards Triton's administrative calls.

Triton can refuse whole protocol groups unless a request carries a header with an agreed
value (`--grpc-restricted-protocol=<protocols>:<key>=<value>`; on gRPC the caller sends the
header `triton-grpc-protocol-<key>`). The bundled Triton is started with the groups that
change or reveal the server itself — model load/unload and the repository index, shared-memory
registration, trace and log settings — restricted to a key only the inference service holds:
random per service start for the bundled process, read from a file for a remote Triton started
with the same flag. Anyone else on the machine who reaches Triton's loopback port is refused
(UNAVAILABLE "This protocol is restricted"), so MaaS auth, scopes and audit cannot be bypassed
through it. Inference, health, metadata, model-config and statistics stay open to the gateway
and its data plane.

Limit: Triton takes the key on its command line, which other local users can read from
/proc unless it is mounted with `hidepid=2` (containers and pods do not share it). The key
is never written to the service's or Triton's log.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from maas_runtime.errors import FailedPrecondition

RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
"""Triton protocol groups only the inference service may call."""

CONTROL_KEY_NAME = "maas-control-key"
"""The restricted-protocol key; Triton reads it from the gRPC header `GRPC_HEADER_PREFIX + key`."""

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


def new_control_key() -> str:
    """A fresh random key (256 bits), for a Triton this service starts itself."""
    return secrets.token_urlsafe(32)


def read_control_key(path: Path) -> str:
    """The key a remote Triton was started with, from a file only the service can read."""
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the Triton control key file {path}: {exc}",
                                 reason="TRITON_CONTROL_KEY_UNREADABLE") from None
    if not key:
        raise FailedPrecondition(f"the Triton control key file {path} is empty",
                                 reason="TRITON_CONTROL_KEY_UNREADABLE")
    return key


def restricted_protocol_args(control_key: str, *, http: bool) -> list[str]:
    """`tritonserver` flags restricting `RESTRICTED_PROTOCOLS` to callers with the key."""
    setting = f"{','.join(RESTRICTED_PROTOCOLS)}:{CONTROL_KEY_NAME}={control_key}"
    args = [f"--grpc-restricted-protocol={setting}"]
    if http:
        args.append(f"--http-restricted-api={setting}")
    return args


def redacted(args: list[str], control_key: str) -> list[str]:
    """`args` with the key replaced, for logs."""
    return [arg.replace(control_key, "<redacted>") if control_key else arg for arg in args]


def control_headers(control_key: str) -> dict[str, str] | None:
    """gRPC metadata that opens the restricted protocols (None when there is no key)."""
    return {GRPC_HEADER_PREFIX + CONTROL_KEY_NAME: control_key} if control_key else None
