"""Settings of the inference service (env prefix MAAS_INFERENCE_)."""

from __future__ import annotations

from typing import Literal

from maas_runtime.settings import ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class InferenceSettings(ServiceSettings):
    """Inference settings; everything in `ServiceSettings` plus Triton, registry and traffic."""

    model_config = SettingsConfigDict(
        env_prefix="MAAS_INFERENCE_", use_attribute_docstrings=True, extra="ignore"
    )

    port: int = 50054
    """TCP port of the gateway (InferenceService and KServe-v2 on the same port)."""

    triton_url: str = ""
    """host:port of an external Triton's gRPC endpoint (remote mode); empty starts the bundled
    `tritonserver` under the state directory (local mode)."""

    triton_grpc_port: int = Field(default=0, ge=0, le=65535)
    """Local mode: fixed gRPC port for the bundled Triton (loopback only); 0 picks a free one."""

    triton_model_repository: str = ""
    """Remote mode: the model repository path shared with the external Triton."""

    triton_http: bool = False
    """Local mode: also open the bundled Triton's HTTP endpoint (loopback, administrative APIs
    restricted like gRPC's). Off by default: the gateway is the way in."""

    triton_tls: bool = False
    """Remote mode: dial the external Triton over TLS with the peer settings (`peer_tls_ca_file`,
    and `peer_tls_cert_file`/`peer_tls_key_file` for mTLS, `peer_tls_server_name`), as every
    other peer is dialled."""

    triton_control_key_file: str = ""
    """Remote mode: file holding the key the external Triton's administrative protocols demand
    (started with `--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:`
    `maas-control-key=<key>`); empty sends none. Local mode makes a random key per start."""

    registry_target: str = ""
    """host:port of the registry; empty resolves "registry" through discovery."""

    rollout_drain_seconds: float = Field(default=30.0, ge=0)
    """Longest a rollout waits for in-flight requests on the old version before unloading."""

    model_load_timeout_seconds: float = Field(default=120.0, gt=0)
    """Longest a deployment waits for Triton to report a model READY."""

    shadow_max_in_flight: int = Field(default=64, ge=1)
    """Mirrored requests allowed at once; beyond it shadow copies are skipped, never queued."""

    coalesce_calls_per_instance: int = Field(default=1, ge=0)
    """Calls open to Triton per model instance before concurrent alike requests wait and share
    the next call (concatenated by rows, answered separately); 0 sends every request alone."""

    data_plane: Literal["native", "python"] = "native"
    """"native": the C++ data plane (`maas-inference-dataplane`) owns the public port, serves
    plain Predict and KServe ModelInfer requests itself and relays everything else to this
    process on a loopback port; "python": this process serves the public port alone."""

    data_plane_binary: str = ""
    """Path of `maas-inference-dataplane`; empty looks beside the interpreter, then on PATH."""

    default_max_batch_size: int = Field(default=32, ge=0)
    """max_batch_size written into config.pbtxt when a deployment does not say."""

    default_max_queue_delay_microseconds: int = Field(default=100, ge=0)
    """Dynamic-batching queue delay when a deployment does not say."""

    access_log_sample_every: int = Field(default=100, ge=0)
    """One in this many requests the native data plane serves gets an access log line here
    (principal, deployment, outcome, trace id, duration); 0 logs none. Requests it relays are
    logged like every other call."""

    triton_metrics_url: str = ""
    """Triton's Prometheus endpoint (e.g. http://triton:8002/metrics) in remote mode; the
    bundled Triton's is known. Its series are re-exported on `metrics_port` with deployment
    labels; empty in remote mode re-exports none."""

    triton_metrics_poll_seconds: float = Field(default=5.0, gt=0)
    """How often Triton's metrics and the data plane's counters are fetched for re-export."""

    database_url: str = ""
    """SQLAlchemy URL of the service's shared database (postgresql+psycopg://…) for state that
    replicas share, the usage ledger among it; empty keeps it in SQLite files in the state
    directory (the usage ledger in `usage.db`). The deployment table lives there too
    (`deployments.db` by default): every replica follows the others' deployment changes
    (LISTEN/NOTIFY) and loads them on its own Triton."""

    deployment_resync_seconds: float = Field(default=30.0, gt=0)
    """Replicas: how often the whole deployment table is compared with the live routes, a
    safety net for change notifications missed while the listener reconnected."""

    deployment_create_lease_seconds: float = Field(default=15.0, gt=0)
    """Replicas: how long the lease of a replica creating a deployment, or rolling one out to
    new versions (an update, an alias move), lasts unrenewed (it is renewed every third of it
    while the versions load). Should that replica die midway, another takes the create or
    rollout over within about this long after its last renewal. (Named for creates, which it
    guarded first.)"""

    deployment_create_max_takeovers: int = Field(default=2, ge=0)
    """Replicas: how many times a create or rollout whose replica died is taken over by
    another; one interrupted more often (a model that brings down whichever replica loads it)
    is given up without loading it: a create recorded FAILED with the reason, for the user to
    delete; a rollout rolled back to what the deployment served before it."""

    tenancy_file: str = ""
    """YAML or JSON file of per-tenant limits (requests and tokens per minute, concurrent
    streams, daily quotas; see `maas_inference.tenancy`), re-read when it changes; empty
    limits nobody (usage is still recorded)."""

    tenancy_recheck_seconds: float = Field(default=1.0, gt=0)
    """How often the limits file's mtime is looked at: a change applies within this delay."""

    tenancy_stream_lease_seconds: float = Field(default=15.0, gt=0)
    """With a shared (PostgreSQL) `database_url`: how long a running stream's slot under a
    tenant's concurrent_streams limit lasts unrenewed (its replica renews it every third of
    this). A replica that dies frees its streams' slots for the others within this long."""

    usage_flush_seconds: float = Field(default=1.0, gt=0)
    """Longest a Predict usage record waits in memory before it is written (a kill -9 loses
    at most this much Predict usage); finished generations are written at once."""

    usage_share_seconds: float = Field(default=5.0, gt=0)
    """With a shared (PostgreSQL) `database_url`: how often today's usage of every replica is
    read back, so the daily quotas count what the other replicas served too."""

    usage_metrics_tenants: list[str] = Field(default_factory=list)
    """Tenants given their own `tenant` label on the usage metrics; empty: the first
    `usage_metrics_max_tenants` (name order) of those the limits file names. Others: "other"."""

    usage_metrics_max_tenants: int = Field(default=20, ge=0)
    """At most this many tenant label values besides "other" when none are configured."""

    generation_default_max_tokens: int = Field(default=512, ge=1)
    """Tokens a generation may produce when the request sets no max_tokens (capped by the room
    its prompt leaves in the model's context)."""

    generation_max_stop_strings: int = Field(default=4, ge=0)
    """Stop strings a generation may name (each at most 64 characters)."""

    openai_port: int | None = Field(default=None, ge=0, le=65535)
    """TCP port of the OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions,
    /v1/models) on `host`, same tokens and scopes as gRPC; unset: no HTTP endpoint; 0 picks a
    free port."""

    generation_max_running_streams: int = Field(default=8, ge=1, le=256)
    """Generations one generative deployment decodes together (one forward pass per step)."""

    generation_max_waiting_streams: int = Field(default=32, ge=0, le=10_000)
    """Generations queued for a running slot per generative deployment; one more is refused
    with RESOURCE_EXHAUSTED."""

    generation_torch_threads: int = Field(default=0, ge=0, le=256)
    """torch threads of a generative deployment's engine; 0 uses every core."""
