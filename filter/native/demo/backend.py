#!/usr/bin/env python3
"""A tiny HTTP/1.1 backend for the native demo filter (filter/native/demo/envoy.yaml).

    backend.py PORT NAME

Listens on 127.0.0.1:PORT. Every response says which backend answered
(`x-backend-id: NAME`) and carries `x-backend-remove-me`, which the demo
filter removes. Paths:

    /status    200 "sidecar ok" with `x-sidecar: yes` (the callout target)
    /slow      the same after 2 s (a callout that times out)
    /truncated headers promising 100 bytes, 10 bytes, then the connection closes
    /trailers  a chunked body with trailers `x-backend-trailer` and `x-backend-trailer-remove`
    anything   200 with a JSON body: the backend, the path and the request headers it received
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    name = "backend"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def do_GET(self):
        if self.path == "/trailers":
            self.send_trailers()
        elif self.path == "/truncated":
            self.send_response(200)
            self.send_header("content-length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
        elif self.path in ("/status", "/slow"):
            if self.path == "/slow":
                time.sleep(2)
            self.reply(b"sidecar ok\n", "text/plain", [("x-sidecar", "yes")])
        else:
            received = {"backend": self.name, "path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]}
            self.reply(json.dumps(received).encode(), "application/json", [])

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        self.do_GET()

    def reply(self, body: bytes, content_type: str, extra: list):
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-backend-id", self.name)
        self.send_header("x-backend-remove-me", "1")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_trailers(self):
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("trailer", "x-backend-trailer, x-backend-trailer-remove")
        self.send_header("x-backend-id", self.name)
        self.end_headers()
        self.wfile.write(b"6\r\nchunk\n\r\n0\r\nx-backend-trailer: t1\r\nx-backend-trailer-remove: gone\r\n\r\n")


def main():
    port, name = int(sys.argv[1]), sys.argv[2]
    Handler.name = name
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
