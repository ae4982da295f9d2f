"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: the apiserver calls
GET /containerLogs/<namespace>/<pod>/<container> on the node (with `follow`, `tailLines`,
`limitBytes`). Only clients with a cert from the cluster CA get in."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("process_node")

# (namespace, pod, container) -> (the container's log file, whether more output may come)
FindLog = Callable[[str, str, str], "tuple[Path, Callable[[], bool]] | None"]


def _tail(data: bytes, lines: int) -> bytes:
    return b"".join(data.splitlines(keepends=True)[-lines:]) if lines >= 0 else data


def _handler(find_log: FindLog) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            log.debug("kubelet api: " + format, *args)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            found = find_log(*parts[1:4]) if len(parts) == 4 and parts[0] == "containerLogs" else None
            if found is None:
                self.send_error(404, "no such container on this node")
                return
            path, running = found
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            data = _tail(path.read_bytes(), int(query.get("tailLines", -1)))
            if "limitBytes" in query:
                data = data[: int(query["limitBytes"])]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(data)
            if query.get("follow") == "true" and "limitBytes" not in query:
                self._follow(path, running)

        def _follow(self, path: Path, running: Callable[[], bool]) -> None:
            """Stream what the container appends until it stopped for good."""
            with path.open("rb") as f:
                f.seek(0, 2)
                while True:
                    alive = running()
                    chunk = f.read()
                    if chunk:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    elif not alive:
                        return
                    else:
                        time.sleep(0.2)

    return Handler


def serve(find_log: FindLog, cert: Path, key: Path, client_ca: Path) -> int:
    """Serve on a free 127.0.0.1 port in a background thread; returns the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(find_log))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="kubelet api", daemon=True).start()
    return server.server_address[1]
