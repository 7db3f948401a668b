"""A small OAuth2 authorization server of the test suite's own, on loopback.

It plays both sides a real deployment has: the provider's authorization endpoint (a person who
consents at once as ``authorize_as``; authorization code with PKCE S256 to a loopback redirect) and
token endpoint (authorization-code and refresh-token grants, with optional refresh-token rotation
and revocation), and the introspection endpoint Dovecot's
``oauth2`` passdb asks whether an access token is valid, so XOAUTH2/OAUTHBEARER logins are checked
by the real IMAP server.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
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
        self.authorize_as: str | None = None  # who signs in and consents at /authorize (None: denied)
        self.codes: dict[str, tuple[str, str, str]] = {}  # code -> (username, redirect_uri, S256 challenge)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                split = urllib.parse.urlsplit(self.path)
                query = {k: v[0] for k, v in urllib.parse.parse_qs(split.query).items()}
                if split.path != "/authorize":
                    self.send_error(404)
                    return
                location = server.authorize(query)
                if location is None:
                    self.send_error(400, "bad authorization request")
                    return
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

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

    def authorize(self, query: dict[str, str]) -> str | None:
        """The redirect for an authorization request, or None for one no provider would accept."""
        redirect = query.get("redirect_uri", "")
        if (query.get("response_type") != "code" or query.get("client_id") != self.client_id
                or query.get("code_challenge_method") != "S256" or not query.get("code_challenge")
                or not redirect.startswith("http://127.0.0.1:")):
            return None
        if self.authorize_as is None:
            reply = {"error": "access_denied", "state": query.get("state", "")}
        else:
            code = "ac-" + secrets.token_hex(12)
            with self.lock:
                self.codes[code] = (self.authorize_as, redirect, query["code_challenge"])
            reply = {"code": code, "state": query.get("state", "")}
        return redirect + "?" + urllib.parse.urlencode(reply)

    def _authorization_code_grant(self, form: dict[str, str]) -> tuple[int, dict]:
        with self.lock:
            username, redirect, challenge = self.codes.pop(form.get("code", ""), ("", "", ""))
        verifier = form.get("code_verifier", "").encode()
        if not username or form.get("redirect_uri") != redirect or challenge != \
                base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode():
            return 400, {"error": "invalid_grant", "error_description": "bad code, redirect_uri or code_verifier"}
        return 200, {"token_type": "Bearer", "expires_in": self.expires_in,
                     "access_token": self.issue_access_token(username),
                     "refresh_token": self.new_refresh_token(username)}

    def handle(self, path: str, form: dict[str, str]) -> tuple[int, dict]:
        if path == "/token" and form.get("grant_type") == "authorization_code":
            if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
                return 401, {"error": "invalid_client"}
            return self._authorization_code_grant(form)
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


@contextlib.contextmanager
def provider_and_dovecot(root: Path, **server_options: Any) -> Iterator[tuple[OAuth2Server, Any]]:
    """An OAuth2Server and a Dovecot whose oauth2 passdb asks it, under ``root``; both stopped after."""
    from devtools.devservers import Dovecot

    server = OAuth2Server(**server_options)
    root.chmod(0o755)
    dovecot = Dovecot(root / "dovecot", users=0, extra_conf=server.dovecot_conf(root / "conf"))
    try:
        dovecot.start()
        yield server, dovecot
    finally:
        dovecot.stop()
        server.close()
