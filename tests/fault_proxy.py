"""A fault-injecting HTTP proxy for tests: put it between a client and a real server.

`start(upstream_url)` returns a running `FaultProxy`; point the client at `proxy.url`. Faults:
- `latency_s = (low, high)`: each request waits a random time in that range before it is forwarded;
- `error_rate`, `error_status`: that share of requests is answered with the status, never forwarded;
- `add_rule(path_contains, action, times, method)`: the next `times` matching requests get
  `error` (answered with `status`, not forwarded), `drop_response` (forwarded, the server acts,
  then answered 504 as a gateway that lost the reply would) or `stall` (held, never forwarded, until
  the proxy closes; `stalled` is set, so a test can kill the client at that request).
`requests` records (method, path, status sent back) of every request, in order.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Action = Literal["error", "drop_response", "stall"]


@dataclass
class Rule:
    path_contains: str
    action: Action
    times: int = 1
    method: str | None = None
    status: int = 500


@dataclass
class FaultProxy:
    upstream: str
    latency_s: tuple[float, float] = (0.0, 0.0)
    error_rate: float = 0.0
    error_status: int = 503
    rules: list[Rule] = field(default_factory=list)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)
    url: str = field(init=False, default="")
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)
    _closing: threading.Event = field(init=False, default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_rule(self, path_contains: str, action: Action, times: int = 1, method: str | None = None, status: int = 500) -> None:
        with self._lock:
            self.rules.append(Rule(path_contains, action, times, method, status))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
        self.latency_s, self.error_rate = (0.0, 0.0), 0.0

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.times > 0 and rule.path_contains in path and rule.method in (None, method):
                    rule.times -= 1
                    return rule
        return None

    def _serve(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                low, high = proxy.latency_s
                if high:
                    time.sleep(random.uniform(low, high))
                rule = proxy._match(self.command, self.path)
                if rule is not None and rule.action == "stall":
                    proxy.stalled.set()
                    proxy._closing.wait()
                    return self._reply(503, b"proxy closed")
                if rule is not None and rule.action == "error":
                    return self._reply(rule.status, b"injected error")
                if rule is None and proxy.error_rate and random.random() < proxy.error_rate:
                    return self._reply(proxy.error_status, b"injected error")
                status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                if rule is not None:  # drop_response: the server acted, the client never hears of it
                    return self._reply(504, b"gateway timeout (injected: response dropped)")
                self._reply(status, payload, headers)

            def _reply(self, status: int, payload: bytes, headers: list[tuple[str, str]] | None = None) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, status))
                self.send_response(status)
                for key, value in headers or [("Content-Type", "text/plain")]:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server.RequestHandlerClass = Handler
        self._server.serve_forever(poll_interval=0.05)

    def _forward(self, method: str, path: str, headers: object, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        target = urllib.parse.urlparse(self.upstream)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}  # type: ignore[attr-defined]
            connection.request(method, path, body=body or None, headers=forwarded)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


def start(upstream_url: str) -> FaultProxy:
    """A proxy to `upstream_url` on a free local port, serving in a background thread."""
    proxy = FaultProxy(upstream=upstream_url.rstrip("/"))
    threading.Thread(target=proxy._serve, daemon=True).start()
    return proxy
