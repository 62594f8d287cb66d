#!/usr/bin/env python3
"""A stock WSGI app on Python's reference server (wsgiref), as a CGI-style
server sees requests: header names become HTTP_* environ keys with `-` and `_`
alike turned into `_`. It answers the HTTP_X_* keys it received, so a test
can see whether a client's `x_session_state` would have reached it as
HTTP_X_SESSION_STATE. Like a careless app, it also echoes the session id
and new-session flag it got back as response headers.

    python3 tests/apps/wsgi_echo.py PORT
"""

import json
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server


def app(environ, start_response):
    received = {key: value for key, value in environ.items() if key.startswith("HTTP_X_")}
    body = json.dumps({"received": received}).encode()
    echoed = [(name, environ[key]) for name, key in (("x-session-id", "HTTP_X_SESSION_ID"),
                                                     ("x-session-new", "HTTP_X_SESSION_NEW")) if key in environ]
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body))),
                              ("x-instance-id", "wsgi")] + echoed)
    return [body]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        sys.stderr.write(f"wsgi {format % args}\n")


if __name__ == "__main__":
    make_server("127.0.0.1", int(sys.argv[1]), app, handler_class=QuietHandler).serve_forever()
