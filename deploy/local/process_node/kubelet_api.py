"""The slice of the kubelet's HTTPS API that `kubectl logs` needs: the apiserver calls
GET /containerLogs/<namespace>/<pod>/<container> on the node (with `follow`, `tailLines`,
`limitBytes`, `previous`). Only clients with a cert from the cluster CA get in.

Logs are streamed from one open file in chunks, never read whole, and a follow keeps
reading that same file from where the first part ended, so no line falls between."""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("process_node")

# (namespace, pod, container, previous) -> (the run's log file, whether more output may come)
FindLog = Callable[[str, str, str, bool], "tuple[Path, Callable[[], bool]] | None"]
CHUNK = 64 * 1024
FOLLOW_POLL = 0.1


def tail_offset(f: BinaryIO, lines: int) -> int:
    """Where the last `lines` lines of the file start, read backwards a chunk at a time."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return 0 if lines < 0 else end
    position, newlines = end, 0
    f.seek(end - 1 if end else 0)
    skip_final = end > 0 and f.read(1) == b"\n"  # a trailing newline ends the last line, starts none
    while position > 0:
        start = max(0, position - CHUNK)
        f.seek(start)
        block = f.read(position - start)
        for index in range(len(block) - 1, -1, -1):
            if block[index:index + 1] == b"\n":
                if skip_final and start + index == end - 1:
                    continue
                newlines += 1
                if newlines == lines:
                    return start + index + 1
        position = start
    return 0


def _handler(find_log: FindLog) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            log.debug("kubelet api: " + format, *args)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            previous = query.get("previous") == "true"
            found = find_log(*parts[1:4], previous) if len(parts) == 4 and parts[0] == "containerLogs" else None
            if found is None:
                what = "previous terminated container" if previous else "container"
                self.send_error(404, f"no {what} {parts[-1]!r} in this pod on this node")
                return
            path, running = found
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
            with path.open("rb") as f:
                f.seek(tail_offset(f, int(query.get("tailLines", -1))))
                limit = self._copy(f, limit)
                if query.get("follow") == "true":
                    self._follow(f, running, limit)

        def _copy(self, f: BinaryIO, limit: int | None) -> int | None:
            """Send from f's position to its end (at most `limit` bytes); returns what is left."""
            while limit is None or limit > 0:
                chunk = f.read(CHUNK if limit is None else min(CHUNK, limit))
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
                limit = None if limit is None else limit - len(chunk)
            return limit

        def _follow(self, f: BinaryIO, running: Callable[[], bool], limit: int | None) -> None:
            """Stream what the container appends until it stopped for good."""
            while limit is None or limit > 0:
                alive = running()  # asked before reading: what it wrote before exiting is sent
                before = f.tell()
                limit = self._copy(f, limit)
                if f.tell() == before:
                    if not alive:
                        return
                    time.sleep(FOLLOW_POLL)

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
