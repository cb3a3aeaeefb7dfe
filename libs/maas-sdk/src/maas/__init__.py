"""The MaaS Python SDK: `import maas; client = maas.Client()`.

`maas` is also the namespace of the generated stubs (`maas.registry.v1`, ... in maas-api):
this regular package extends its `__path__` over every `maas` folder on `sys.path`, so the
stubs import as before. The SDK itself lives in `maas_sdk`; its public names are loaded on
first use, which keeps `import maas.registry.v1...` free of the SDK's imports (no cycles).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

__path__ = pkgutil.extend_path(__path__, __name__)

_PUBLIC = {
    "Client": "maas_sdk.client",
    "LineageTree": "maas_sdk.lineage",
    "Prediction": "maas_sdk.client",
    "ServiceStatus": "maas_sdk.client",
    "RetryPolicy": "maas_sdk.retries",
    "Generation": "maas_sdk.generation",
    "GenerationUsage": "maas_sdk.generation",
    "JobProgress": "maas_sdk.jobs",
    "JobFailed": "maas_sdk.errors",
    "MaasError": "maas_sdk.errors",
    "InvalidArgument": "maas_sdk.errors",
    "NotFound": "maas_sdk.errors",
    "AlreadyExists": "maas_sdk.errors",
    "FailedPrecondition": "maas_sdk.errors",
    "Aborted": "maas_sdk.errors",
    "OutOfRange": "maas_sdk.errors",
    "Unauthenticated": "maas_sdk.errors",
    "PermissionDenied": "maas_sdk.errors",
    "ResourceExhausted": "maas_sdk.errors",
    "Unavailable": "maas_sdk.errors",
    "DeadlineExceeded": "maas_sdk.errors",
    "Cancelled": "maas_sdk.errors",
    "Unimplemented": "maas_sdk.errors",
    "Internal": "maas_sdk.errors",
    "FieldViolation": "maas_sdk.errors",
}

__all__ = [
    "Aborted", "AlreadyExists", "Cancelled", "Client", "DeadlineExceeded", "FailedPrecondition",
    "FieldViolation", "Generation", "GenerationUsage", "Internal", "InvalidArgument",
    "JobFailed", "JobProgress", "LineageTree",
    "MaasError", "NotFound", "OutOfRange", "PermissionDenied", "Prediction", "ResourceExhausted",
    "RetryPolicy", "ServiceStatus", "Unauthenticated", "Unavailable", "Unimplemented",
]

if TYPE_CHECKING:
    from maas_sdk.client import Client, Prediction, ServiceStatus
    from maas_sdk.errors import (
        Aborted,
        AlreadyExists,
        Cancelled,
        DeadlineExceeded,
        FailedPrecondition,
        FieldViolation,
        Internal,
        InvalidArgument,
        JobFailed,
        MaasError,
        NotFound,
        OutOfRange,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
        Unimplemented,
    )
    from maas_sdk.generation import Generation, GenerationUsage
    from maas_sdk.jobs import JobProgress
    from maas_sdk.lineage import LineageTree
    from maas_sdk.retries import RetryPolicy


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'maas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
