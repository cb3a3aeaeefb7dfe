"""TLS and mutual TLS credentials from PEM file paths."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """Server TLS; with a client CA, every client must present a certificate it signed (mTLS)."""
    return grpc.ssl_server_credentials(
        [(_read(key_file), _read(cert_file))],
        root_certificates=_read(client_ca_file),
        require_client_auth=client_ca_file is not None,
    )


def channel_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS trusting `ca_file` (system roots when None), presenting a cert for mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )
