"""Metrics endpoints that misbehave as real ones do: they hang, drip (the body or the headers), close the
connection, speak no HTTP, answer garbage or far too much. Each serves on a given address until stopped; shared by
the scrape unit tests and the operator's end-to-end fault test (where it answers on a kwok pod's loopback IP)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

OK = b"# TYPE finetune_trainer_step gauge\nfinetune_trainer_step 7.0\n"


def _http(body: bytes) -> bytes:
    return b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def _hang(conn: socket.socket, stop: threading.Event) -> None:
    stop.wait(30)


def _drip(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    while not stop.wait(0.2):
        conn.sendall(b"# still here\n")


def _drip_headers(conn: socket.socket, stop: threading.Event) -> None:
    """A header a byte at a time, then the answer: http.client's line and header limits allow days of it."""
    conn.sendall(b"HTTP/1.0 200 OK\r\nX-Drip: ")
    for _ in range(25):  # 5 s, then a good answer: a read that waits for it is late, not stuck
        if stop.wait(0.2):
            return
        conn.sendall(b"a")
    conn.sendall(b"\r\n" + _http(OK).partition(b"\r\n")[2])


def _flood_continue(conn: socket.socket, stop: threading.Event) -> None:
    """Interim `100 Continue` answers without end (http.client skips each and reads on), then the answer."""
    for _ in range(500):  # 5 s, as _drip_headers
        if stop.wait(0.01):
            return
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 100)
    conn.sendall(_http(OK))


def _close(conn: socket.socket, stop: threading.Event) -> None:
    conn.close()


def _reply(payload: bytes) -> Callable[[socket.socket, threading.Event], None]:
    return lambda conn, stop: conn.sendall(payload)


def serving(body: bytes) -> Callable[[socket.socket, threading.Event], None]:
    """Answers 200 with `body`."""
    return _reply(_http(body))


def redirect(location: str) -> Callable[[socket.socket, threading.Event], None]:
    """Answers 302 to `location`: a trainer sending the operator elsewhere (a cloud's metadata address)."""
    return _reply(b"HTTP/1.0 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % location.encode())


BEHAVIOURS: dict[str, Callable[[socket.socket, threading.Event], None]] = {
    "ok": _reply(_http(OK)),
    "hang": _hang,  # accepts, never answers
    "drip": _drip,  # answers a byte stream that never ends
    "header-drip": _drip_headers,
    "continue-flood": _flood_continue,
    "close": _close,  # closes the connection without a word
    # closes it within the body its Content-Length promised: "finetune_trainer_step 7.0" read as step 7, 123 as 12
    "cut-short": _reply(_http(OK)[:-5]),
    "not-http": _reply(b"\x00\x01garbage\r\n\r\n"),
    "garbage": _reply(_http(b"finetune_trainer_step {{{ not a number\n")),
    "foreign": _reply(_http(b"# TYPE up gauge\nup 1\n")),  # valid Prometheus text, none of ours
    "huge": _reply(_http(b"#" * (2 << 20))),
    "error": _reply(b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
    "forbidden": _reply(b"HTTP/1.0 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),  # an apiserver without our Role
    "not-found": _reply(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"),  # a group version not served
    # a proxy in front of the apiserver, or the apiserver's own overload answer, asking for a wait
    "unavailable": _reply(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 600\r\nContent-Length: 0\r\n\r\n"),
}


class FaultServer:
    """Answers every connection on (host, port) with one behaviour (a BEHAVIOURS name or its own), each in its own
    thread. With port 0 the kernel picks the port, bound from then on, and `port` says which: no other socket can
    take it between a pick and the bind, as one can a free_port() in the kernel's ephemeral range."""

    def __init__(self, host: str, port: int, behaviour: str | Callable[[socket.socket, threading.Event], None]) -> None:
        self.behaviour = BEHAVIOURS[behaviour] if isinstance(behaviour, str) else behaviour
        self.stop = threading.Event()
        self.sock = socket.create_server((host, port))
        self.port: int = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.accepted: list[float] = []  # when each connection came (time.monotonic)
        self.serving = threading.Thread(target=self._serve, daemon=True)
        self.serving.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            self.accepted.append(time.monotonic())
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @property
    def connections(self) -> int:
        return len(self.accepted)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(4096)  # the request
                self.behaviour(conn, self.stop)
                time.sleep(0.05)
            except OSError:
                pass  # the client gave up first: what a timeout does

    def close(self) -> None:
        """Stops listening: the port is free once the accept under way returns (its 0.2 s timeout)."""
        self.stop.set()
        self.sock.close()
        self.serving.join()

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
