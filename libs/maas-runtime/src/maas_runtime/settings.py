"""Settings every MaaS service shares; each service subclasses with its own env prefix.

Built in a service's `main()` and passed down: no module reads the environment on import.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Server, security, telemetry and discovery settings (env prefix set by each service)."""

    model_config = SettingsConfigDict(use_attribute_docstrings=True, extra="ignore")

    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 in containers."""

    port: int = 0
    """TCP port to listen on; 0 picks a free one (tests)."""

    advertise_host: str = ""
    """Host other services should dial, registered in discovery; defaults to `host`."""

    state_dir: Path = Path(".maas")
    """Directory holding this deployment's state (databases, blobs, tokens)."""

    auth_enabled: bool = True
    """Require `authorization: Bearer <token>` on every RPC except health and reflection."""

    tokens_file: Path | None = None
    """JSON file of token hashes and roles; defaults to `<state_dir>/tokens.json`."""

    tls_cert_file: Path | None = None
    """PEM certificate chain; with `tls_key_file` the server speaks TLS only."""

    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""

    tls_client_ca_file: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate signed by it (mTLS)."""

    peer_tls: bool = False
    """Dial other services (the registry, a remote Triton) over TLS; implied by any
    `peer_tls_*` file. Trusts `peer_tls_ca_file`, or the system roots when that is empty."""

    peer_tls_ca_file: Path | None = None
    """PEM CA bundle this service trusts when it dials another service over TLS."""

    peer_tls_cert_file: Path | None = None
    """PEM client certificate chain this service presents to peers that require mTLS."""

    peer_tls_key_file: Path | None = None
    """PEM private key of `peer_tls_cert_file`."""

    peer_tls_server_name: str = ""
    """Name expected in the peers' certificates when it differs from the host dialled
    (e.g. dialling a pod IP whose certificate names the Service)."""

    registry_timeout_seconds: float = Field(default=120.0, gt=0)
    """Deadline of each registry call this service makes (a whole download or upload is one
    call)."""

    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest single gRPC message accepted or sent; larger ones fail RESOURCE_EXHAUSTED."""

    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """How long in-flight RPCs may finish after a shutdown signal."""

    otlp_endpoint: str = ""
    """OTLP/gRPC collector for traces and metrics, e.g. http://127.0.0.1:4317; off when empty."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the Prometheus endpoint (`http://<host>:<port>/metrics`) exposing this
    service's OpenTelemetry metrics; off when unset, 0 picks a free port (tests). `maas up`
    sets a fixed one per service."""

    log_level: str = "INFO"
    """Root log level."""

    consul_http_addr: str = Field(default="", validation_alias="CONSUL_HTTP_ADDR")
    """Consul agent address (the standard CONSUL_HTTP_ADDR); static discovery when empty."""

    consul_token: str = Field(default="", validation_alias="CONSUL_HTTP_TOKEN")
    """Consul ACL token (the standard CONSUL_HTTP_TOKEN)."""

    static_endpoints: str = Field(default="", validation_alias="MAAS_STATIC_ENDPOINTS")
    """Static discovery: `registry=127.0.0.1:50051;inference=127.0.0.1:50054`."""

    admin_token_file: Path | None = None
    """Where the first start writes the admin token; defaults to `<state_dir>/admin.token`.
    Services of one installation may share it (and the tokens file)."""

    client_token_file: Path | None = None
    """Token this service presents to the others; defaults to the admin token file."""

    page_token_secret_file: Path | None = None
    """File holding the HMAC key of page tokens; defaults to `<state_dir>/page-token.key`.
    Replicas of a service must share it (a listing paged through one continues through
    another)."""

    @property
    def resolved_tokens_file(self) -> Path:
        return self.tokens_file or self.state_dir / "tokens.json"

    @property
    def resolved_client_token_file(self) -> Path:
        return self.client_token_file or self.resolved_admin_token_file

    @property
    def resolved_admin_token_file(self) -> Path:
        return self.admin_token_file or self.state_dir / "admin.token"

    @property
    def resolved_page_token_secret_file(self) -> Path:
        return self.page_token_secret_file or self.state_dir / "page-token.key"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def peer_tls_enabled(self) -> bool:
        return self.peer_tls or any(path is not None for path in (
            self.peer_tls_ca_file, self.peer_tls_cert_file, self.peer_tls_key_file))

    def grpc_message_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
