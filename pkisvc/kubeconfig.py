"""A kubeconfig for the kubecfg user, with the trust bundle and the client pair embedded."""
from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlsplit

from pkisvc.errors import InvalidRequest


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def check_server_url(server: str) -> str:
    """Return server if it is an https URL with a host.

    Raises: InvalidRequest otherwise (kubectl would send the client key over plain HTTP).
    """
    parts = urlsplit(server)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidRequest(f"--server {server!r}: must be an https:// URL with a host")
    return server


def build(*, server: str, trust_pem: bytes, cert_pem: bytes, key_pem: bytes,
          cluster: str, user: str, tls_server_name: str | None = None) -> dict[str, Any]:
    """Make the kubeconfig document (a dict ready for YAML)."""
    cluster_entry: dict[str, Any] = {
        "server": check_server_url(server),
        "certificate-authority-data": _b64(trust_pem),
    }
    if tls_server_name:
        cluster_entry["tls-server-name"] = tls_server_name
    context = f"{user}@{cluster}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": cluster_entry}],
        "users": [{"name": user, "user": {
            "client-certificate-data": _b64(cert_pem),
            "client-key-data": _b64(key_pem),
        }}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
