"""A minimal JSON client for the Kubernetes API, enough for a kubelet stand-in.

Plain dicts in camelCase (as in YAML and the API docs), explicit patch types, and a
line-by-line watch; the stdlib does the HTTPS with the kubeconfig's client certificate.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import yaml

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


def warning_event(obj: dict, kind: str, reason: str, message: str, component: str) -> dict:
    """A Warning Event about `obj` (a `kind` such as Pod), as kubelets and provisioners record them."""
    meta = obj["metadata"]
    return {
        "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{meta['name']}.",
                                                          "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": "v1", "kind": kind, "name": meta["name"], "namespace": meta["namespace"],
                           "uid": meta["uid"]},
        "reason": reason, "message": message, "type": "Warning", "source": {"component": component},
    }


class KubeAPI:
    def __init__(self, kubeconfig: Path) -> None:
        """From a kubeconfig whose first cluster and user carry embedded certs (ours do)."""
        config = yaml.safe_load(kubeconfig.read_text())
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        url = urlparse(cluster["server"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self._tls = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        # ssl wants the client cert and key as files.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "client.crt", Path(tmp) / "client.key"
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            self._tls.load_cert_chain(cert, key)

    def _send(self, method: str, path: str, body: dict | None, content_type: str,
              timeout: float) -> http.client.HTTPResponse:
        connection = http.client.HTTPSConnection(self.host, self.port, context=self._tls, timeout=timeout)
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers={"Content-Type": content_type, "Accept": "application/json"})
        return connection.getresponse()

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json", missing_ok: bool = False) -> dict | None:
        """One call; returns the decoded body, or None for 404/409 when `missing_ok`."""
        response = self._send(method, path, body, content_type, timeout=30)
        text = response.read().decode()
        if missing_ok and response.status in (404, 409):
            return None
        if response.status >= 300:
            raise ApiError(response.status, text)
        return json.loads(text) if text else {}

    def get(self, path: str) -> dict | None:
        return self.request("GET", path, missing_ok=True)

    def watch(self, path: str, timeout_seconds: int = 300) -> Iterator[dict]:
        """Events of a watch (`path` carries the query, including resourceVersion)."""
        separator = "&" if "?" in path else "?"
        response = self._send("GET", f"{path}{separator}watch=true&timeoutSeconds={timeout_seconds}",
                              None, "application/json", timeout=timeout_seconds + 30)
        if response.status >= 300:
            raise ApiError(response.status, response.read().decode())
        for line in response:
            if line.strip():
                yield json.loads(line)
