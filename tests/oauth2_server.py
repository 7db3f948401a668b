"""A small OAuth2 authorization server of the test suite's own, on loopback.

It plays both sides a real deployment has: the provider's token endpoint (refresh-token grant,
with optional refresh-token rotation and revocation) and the introspection endpoint Dovecot's
``oauth2`` passdb asks whether an access token is valid, so XOAUTH2/OAUTHBEARER logins are checked
by the real IMAP server.
"""

from __future__ import annotations

import collections
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from typing import Any


class OAuth2Server:
    def __init__(self, expires_in: float = 3600, rotate: bool = False) -> None:
        self.expires_in = expires_in
        self.rotate = rotate
        self.lock = threading.Lock()
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> username
        self.revoked: set[str] = set()
        self.access: dict[str, tuple[str, float]] = {}  # access token -> (username, expires at)
        self.token_requests: collections.Counter[str] = collections.Counter()  # by refresh token
        self.introspections = 0
        self.client_id = "mailingestd-test"
        self.client_secret = "client-" + secrets.token_hex(8)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                form = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
                status, body = server.handle(self.path, form)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def new_refresh_token(self, username: str) -> str:
        token = "rt-" + secrets.token_hex(12)
        with self.lock:
            self.refresh_tokens[token] = username
        return token

    def revoke(self, refresh_token: str) -> None:
        with self.lock:
            self.revoked.add(refresh_token)

    def issue_access_token(self, username: str) -> str:
        token = "at-" + secrets.token_hex(16)
        with self.lock:
            self.access[token] = (username, time.time() + self.expires_in)
        return token

    def handle(self, path: str, form: dict[str, str]) -> tuple[int, dict]:
        if path == "/token":
            refresh = form.get("refresh_token", "")
            with self.lock:
                self.token_requests[refresh] += 1
                if form.get("grant_type") != "refresh_token" or form.get("client_id") != self.client_id \
                        or form.get("client_secret") != self.client_secret:
                    return 401, {"error": "invalid_client"}
                if refresh not in self.refresh_tokens or refresh in self.revoked:
                    return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
                username = self.refresh_tokens[refresh]
                reply = {"token_type": "Bearer", "expires_in": self.expires_in}
                if self.rotate:
                    self.revoked.add(refresh)
                    rotated = "rt-" + secrets.token_hex(12)
                    self.refresh_tokens[rotated] = username
                    reply["refresh_token"] = rotated
            reply["access_token"] = self.issue_access_token(username)
            return 200, reply
        if path == "/introspect":
            with self.lock:
                self.introspections += 1
                username, expires = self.access.get(form.get("token", ""), ("", 0.0))
            if username and expires > time.time():
                return 200, {"active": True, "username": username}
            return 200, {"active": False}
        return 404, {"error": "not_found"}

    def dovecot_conf(self, root: Any, mechanisms: str = "xoauth2 oauthbearer") -> str:
        """extra_conf for devservers.Dovecot: an oauth2 passdb asking this server's introspection."""
        ext = root / "dovecot-oauth2.conf.ext"
        ext.parent.mkdir(parents=True, exist_ok=True)
        ext.write_text(f"introspection_mode = post\nintrospection_url = {self.url}/introspect\n"
                       "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
                       "force_introspection = yes\n")
        ext.chmod(0o644)
        return (f"auth_mechanisms = plain login {mechanisms}\n"
                f"passdb {{\n  driver = oauth2\n  mechanisms = {mechanisms}\n  args = {ext}\n}}\n")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
