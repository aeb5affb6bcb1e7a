"""A small fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server.

Every ``fail_every``-th request gets ``503 SlowDown`` (as S3 throttling answers), every
``stall_every``-th request is held for ``stall_s`` seconds before it is forwarded (a stalled
connection). Both are bounded in count (``max_failures``, ``max_stalls``), so a client with
retries always gets through; the proxy stops with the test.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultyProxy:
    def __init__(self, upstream: str, *, fail_every: int = 4, max_failures: int = 40,
                 stall_every: int = 9, stall_s: float = 3.0, max_stalls: int = 4):
        self.upstream = urllib.parse.urlparse(upstream)
        self.fail_every, self.max_failures = fail_every, max_failures
        self.stall_every, self.stall_s, self.max_stalls = stall_every, stall_s, max_stalls
        self.lock = threading.Lock()
        self.requests = self.failures = self.stalls = 0
        self._server: http.server.ThreadingHTTPServer | None = None

    # -- decisions ---------------------------------------------------------------------------
    def _decide(self) -> str:
        with self.lock:
            self.requests += 1
            n = self.requests
            if self.failures < self.max_failures and n % self.fail_every == 0:
                self.failures += 1
                return "fail"
            if self.stalls < self.max_stalls and n % self.stall_every == 0:
                self.stalls += 1
                return "stall"
        return "pass"

    # -- server ------------------------------------------------------------------------------
    def start(self) -> FaultyProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                action = proxy._decide()
                if action == "fail":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if action == "stall":
                    time.sleep(proxy.stall_s)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    # a HEAD answer keeps the object's Content-Length; others get the body's
                    if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
