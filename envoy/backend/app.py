#!/usr/bin/env python3
"""Demo backend that speaks the session-affinity app contract.

It keeps sessions in memory, like a Tomcat or Rails process does, so losing
the process loses its sessions unless the filter moves the state elsewhere.
Every answer says which backend and which instance served it, so a client can
count where each request went.

Contract (header names are the filter's defaults):
  request  x-session-id     the session; absent means "no session"
           x-session-new    1 on the first request of a session: create it
           x-session-state  opaque state to restore before handling
  response x-instance-id    this process, on every response
           x-session-state  base64url of {"sid", "count", "user"} whenever it
                            changed; bound to the session id, so a state
                            restored under any other id is refused
           x-session-unknown 1 (with 409) for an unknown session: nothing done
           x-session-end    1 when the session ended (logout)
           x-session-rotate the session's new id, after a login

Routes: GET|POST / (and any other app path) count one request of the session;
POST /login?user=NAME (or a form body user=NAME) counts, remembers the user and moves the session to a new
id; POST /logout ends the session; POST /slow?ms=N counts, then waits N ms (to
kill a backend mid-request); GET /healthz; GET /stats (what this process saw);
GET /static/... returns a small file-like body.

Options: --idle-timeout S ends sessions idle for S seconds (like a servlet
container's session timeout); --without-unknown makes the process serve an
unknown session as a new one, like an app that does not implement the contract.

Python 3 standard library only, so it runs anywhere without installing.
"""

import argparse
import base64
import binascii
import json
import secrets
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SESSION_ID = "x-session-id"
SESSION_NEW = "x-session-new"
SESSION_STATE = "x-session-state"
SESSION_UNKNOWN = "x-session-unknown"
SESSION_END = "x-session-end"
SESSION_ROTATE = "x-session-rotate"
INSTANCE_ID = "x-instance-id"
SESSION_ROUTE = "x-session-route"
# Reported back in the body so tests can prove what reached the app.
CONTRACT_HEADERS = (SESSION_ID, SESSION_NEW, SESSION_STATE, SESSION_ROUTE)
MAX_SLOW_MS = 60_000
STATIC_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


def encode_state(sid, session):
    """Opaque state for the filter: base64url of compact JSON, no padding,
    naming the session it belongs to."""
    raw = json.dumps({"sid": sid, **session}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class ForeignState(ValueError):
    """A state that belongs to another session."""


def decode_state(value, sid):
    """Inverse of encode_state for session sid; raises ValueError on anything
    malformed and ForeignState for another session's state."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        state = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"undecodable state: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("count"), int):
        raise ValueError("state must be an object with an integer count")
    if state.get("sid") != sid:
        raise ForeignState(f"state of session {state.get('sid')!r} offered for {sid!r}")
    user = state.get("user")
    return {"count": state["count"], "user": user if isinstance(user, str) else None}


def new_session_id():
    """A fresh session id in the filter's format: 16 random bytes, base64url."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


class SessionTable:
    """In-memory sessions of this process; a lock because handlers are threads."""

    def __init__(self, idle_timeout=None, serve_unknown=False):
        self._lock = threading.Lock()
        self._sessions = {}
        self._idle_timeout = idle_timeout
        self._serve_unknown = serve_unknown
        self.foreign_states = 0
        self.restored = 0

    def _live(self, sid):
        """The session, unless it is missing or idle too long (then it ends)."""
        session = self._sessions.get(sid)
        if session and self._idle_timeout and time.monotonic() - session["seen"] > self._idle_timeout:
            del self._sessions[sid]
            return None
        return session

    def count(self, sid, new, restore, user=None, rotate=False):
        """Count one request of session sid.

        Returns (sid, count, public state) or None when the session is unknown,
        in which case nothing changed. restore (a decoded state) replaces
        whatever this process holds, because the filter only sends it when the
        session moved. user logs a user in; rotate moves the session to a new
        id (the returned sid).
        """
        with self._lock:
            if restore is not None:
                self.restored += 1
                self._sessions[sid] = {"count": restore["count"], "user": restore["user"]}
            elif self._live(sid) is None:
                if not new and not self._serve_unknown:
                    return None
                self._sessions[sid] = {"count": 0, "user": None}
            session = self._sessions[sid]
            session["count"] += 1
            session["seen"] = time.monotonic()
            if user is not None:
                session["user"] = user
            if rotate:
                old, sid = sid, new_session_id()
                self._sessions[sid] = self._sessions.pop(old)
            return sid, session["count"], {"count": session["count"], "user": session["user"]}

    def end(self, sid):
        """Ends session sid; False if it was not known here."""
        with self._lock:
            return self._sessions.pop(sid, None) is not None


class Handler(BaseHTTPRequestHandler):
    """One request; the server object carries name, instance and sessions."""

    protocol_version = "HTTP/1.1"
    server_version = "sa-demo-backend"
    # A response leaves in one write when the request is done (headers and
    # body buffered together, as app servers buffer a response): a kill then
    # either precedes the response (the proxy sees a reset before headers,
    # which it may replay) or follows it, never cuts it in half.
    wbufsize = -1
    # With Nagle on, a kept-alive connection could wait for the peer's
    # delayed ACK (about 40 ms) per response.
    disable_nagle_algorithm = True

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def _dispatch(self):
        body = self._read_body()
        if body is None:
            return
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send(200, {"status": "ok", "instance": self.server.instance})
        elif url.path == "/stats":
            sessions = self.server.sessions
            self._send(200, {"instance": self.server.instance, "foreign_states": sessions.foreign_states,
                             "restored": sessions.restored})
        elif url.path.startswith("/static/"):
            self._send_static(url.path)
        elif url.path == "/slow" and self.command == "POST":
            self._count(delay_ms=self._delay_ms(url.query))
        elif url.path == "/logout" and self.command == "POST":
            self._logout()
        elif url.path == "/login" and self.command == "POST":
            # The name may come as a form body too (a long one fits no URL).
            form = parse_qs(body.decode("utf-8", "replace"))
            user = (form.get("user") or parse_qs(url.query).get("user") or ["user"])[0]
            self._count(delay_ms=0, user=user, rotate=True)
        else:
            self._count(delay_ms=0)

    def _count(self, delay_ms, user=None, rotate=False):
        """The app itself: count requests per session and report them."""
        sid = self.headers.get(SESSION_ID)
        received = {name: self.headers[name] for name in CONTRACT_HEADERS if name in self.headers}
        extra = {}
        count, session_user = 1, None
        if sid:
            restore = None
            if SESSION_STATE in self.headers:
                try:
                    restore = decode_state(self.headers[SESSION_STATE], sid)
                except ForeignState as err:
                    # Never use it: that would hand one user another's session.
                    self.server.sessions.foreign_states += 1
                    self.log_message("refused %s", err)
                    self._send(409, {"error": "unknown session", "session": sid}, {SESSION_UNKNOWN: "1"})
                    return
                except ValueError as err:
                    self._send(400, {"error": str(err)})
                    return
            counted = self.server.sessions.count(sid, self.headers.get(SESSION_NEW) == "1", restore, user, rotate)
            if counted is None:
                self._send(409, {"error": "unknown session", "session": sid}, {SESSION_UNKNOWN: "1"})
                return
            new_sid, count, state = counted
            session_user = state["user"]
            extra[SESSION_STATE] = encode_state(new_sid, state)
            if new_sid != sid:
                extra[SESSION_ROTATE] = new_sid
                sid = new_sid
        if delay_ms:
            time.sleep(delay_ms / 1000)
        self._send(200, {
            "backend": self.server.name,
            "instance": self.server.instance,
            "session": sid or None,
            "count": count,
            "user": session_user,
            "received": received,
        }, extra)

    def _logout(self):
        """Ends the session; the filter drops the cookie and the stored copy."""
        sid = self.headers.get(SESSION_ID)
        if not sid or not self.server.sessions.end(sid):
            self._send(409, {"error": "unknown session", "session": sid}, {SESSION_UNKNOWN: "1"})
            return
        self._send(200, {"backend": self.server.name, "instance": self.server.instance, "session": sid,
                         "ended": True}, {SESSION_END: "1"})

    def _delay_ms(self, query):
        """The ms query parameter, clamped so a typo cannot hang a thread."""
        try:
            value = int(parse_qs(query).get("ms", ["0"])[0])
        except ValueError:
            return 0
        return max(0, min(value, MAX_SLOW_MS))

    def _send_static(self, path):
        """A small asset; static paths carry no session at all."""
        suffix = path[path.rfind("."):] if "." in path.rsplit("/", 1)[-1] else ""
        content_type = STATIC_TYPES.get(suffix, "text/plain")
        body = f"/* {path} from {self.server.name} */\n".encode()
        self._send_bytes(200, body, content_type, {"cache-control": "max-age=60"})

    def _read_body(self):
        """Read the request body so the keep-alive connection stays in sync."""
        length = self.headers.get("content-length")
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            return self._read_chunked()
        if length is None:
            return b""
        try:
            return self.rfile.read(int(length))
        except ValueError:
            self._send(400, {"error": "bad content-length"})
            self.close_connection = True
            return None

    def _read_chunked(self):
        chunks = []
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                self._send(400, {"error": "bad chunk"})
                self.close_connection = True
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send(self, status, payload, headers=None):
        body = (json.dumps(payload) + "\n").encode()
        self._send_bytes(status, body, "application/json", headers or {})

    def _send_bytes(self, status, body, content_type, headers):
        self.send_response(status)
        self.send_header(INSTANCE_ID, self.server.instance)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.server.name} {self.server.instance} {format % args}\n")


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True
    # Restarting on the same port right after a SIGKILL must not fail.
    allow_reuse_address = True

    def __init__(self, address, name, instance, idle_timeout=None, serve_unknown=False):
        super().__init__(address, Handler)
        self.name = name
        self.instance = instance
        self.sessions = SessionTable(idle_timeout, serve_unknown)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="backend", help="backend name reported in answers")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--instance", help="instance id (default: name plus random hex, new each start)")
    parser.add_argument("--idle-timeout", type=float, help="end sessions idle for this many seconds")
    parser.add_argument("--without-unknown", action="store_true",
                        help="serve an unknown session as a new one (an app without that part of the contract)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    instance = args.instance or f"{args.name}-{secrets.token_hex(4)}"
    server = BackendServer((args.host, args.port), args.name, instance, args.idle_timeout, args.without_unknown)
    # SIGTERM (docker stop, the testbed) ends serve_forever cleanly.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{args.name} instance {instance} listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
