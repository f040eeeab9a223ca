"""A loopback HTTP endpoint whose every answer a test decides: a gateway, proxy or OTLP/HTTP receiver answering
the way a test needs (413 over a body limit, 429/503 with Retry-After, an error body, JSON) where the real sink
in harness.otlp cannot be made to.

    from harness.otlp_http import HttpEndpoint

    def answer(body, headers):                   # each POST: the body (gunzipped), its headers (case-insensitive)
        return 503, {"Retry-After": "1"}, b""    # -> (status, reply headers, reply body)

    with HttpEndpoint(answer) as http:           # serving on http.port / http.endpoint ("http://127.0.0.1:PORT")
        ... push to http.endpoint
    http.stop()                                  # or stop() it yourself
"""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HttpEndpoint:
    def __init__(self, answer) -> None:
        self.answer = answer
        lock = threading.Lock()  # one answer at a time: a scripted `answer` needs no lock of its own

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with lock:
                    status, headers, reply = answer(body, self.headers)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: no race for a free port
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HttpEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
