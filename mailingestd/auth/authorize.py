"""OAuth2 onboarding: the authorization-code flow with PKCE and a loopback redirect (RFC 6749
section 4.1, RFC 7636, RFC 8252), as a command-line tool does it for a person at a browser.

``mailingestctl account authorize`` prints the provider's authorization URL; the person signs in
and consents; the provider redirects the browser to ``http://127.0.0.1:PORT/`` where
:class:`LoopbackReceiver` takes the code (checking ``state``); :func:`exchange_code` trades it,
with the PKCE verifier, for a refresh token at the token endpoint. Nothing here stores anything.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import msgspec

# Authorization endpoints of the presets (the token endpoints and scopes are credentials.PRESETS).
# Google gives a refresh token only with access_type=offline, and again on a second consent only
# with prompt=consent; Microsoft gives one for the offline_access scope (in its preset).
AUTHORIZATION_URLS = {
    "google": "https://accounts.google.com/o/oauth2/v2/auth",
    "microsoft": "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
}
EXTRA_PARAMETERS = {
    "google": {"access_type": "offline", "prompt": "consent"},
    "microsoft": {"prompt": "select_account"},
}
HTTP_TIMEOUT = 15.0
MAX_REPLY = 64 * 1024


class AuthorizeError(Exception):
    """The flow did not end with a refresh token; the message says why, without any secret."""


class Pkce(msgspec.Struct, frozen=True):
    verifier: str
    challenge: str  # S256


def new_pkce() -> Pkce:
    """A verifier of 64 URL-safe characters (RFC 7636 allows 43..128) and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return Pkce(verifier=verifier, challenge=challenge)


def authorization_url(auth_url: str, client_id: str, redirect_uri: str, scopes: list[str], state: str,
                      pkce: Pkce, provider: str, login_hint: str = "") -> str:
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
             "scope": " ".join(scopes), "state": state, "code_challenge": pkce.challenge,
             "code_challenge_method": "S256", **EXTRA_PARAMETERS.get(provider, {})}
    if login_hint:
        query["login_hint"] = login_hint
    return auth_url + ("&" if "?" in auth_url else "?") + urllib.parse.urlencode(query)


class LoopbackReceiver:
    """One HTTP server on 127.0.0.1 that waits for the provider's redirect with ``code`` and ``state``."""

    def __init__(self, state: str, port: int = 0) -> None:
        self.state = state
        self.code: str | None = None
        self.error: str | None = None
        self.done = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}
                if "code" not in query and "error" not in query:
                    self._reply(404, "Not the authorization redirect.")  # a favicon, a probe
                    return
                if query.get("state") != receiver.state:
                    receiver.error = "the redirect's state does not match this request (a stale or forged redirect)"
                elif "error" in query:
                    receiver.error = f"the provider answered {query['error'][:100]}: " \
                                     f"{query.get('error_description', '')[:300]}"
                else:
                    receiver.code = query["code"]
                self._reply(400 if receiver.error else 200, receiver.error or
                            "mailingestd has the authorization; you can close this window.")
                receiver.done.set()

            def _reply(self, status: int, text: str) -> None:
                body = f"<!doctype html><title>mailingestd</title><p>{text}</p>\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="oauth2-redirect", daemon=True)
        self.thread.start()

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def wait(self, timeout: float) -> str:
        """The authorization code, or AuthorizeError after ``timeout`` seconds or on a bad redirect."""
        deadline = time.monotonic() + timeout
        while not self.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise AuthorizeError(f"no redirect within {timeout:g}s")
        if self.error or not self.code:
            raise AuthorizeError(self.error or "the redirect carried no code")
        return self.code

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Grant(msgspec.Struct, frozen=True):
    refresh_token: str
    access_token: str
    expires_in: float


def exchange_code(token_url: str, client_id: str, client_secret: str, code: str, redirect_uri: str,
                  pkce: Pkce) -> Grant:
    """Trade the code for tokens (grant_type=authorization_code with the PKCE verifier)."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "client_id": client_id,
            "code_verifier": pkce.verifier}
    if client_secret:
        form["client_secret"] = client_secret
    request = urllib.request.Request(token_url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            reply = _json(response.read(MAX_REPLY))
    except urllib.error.HTTPError as exc:
        reply = _json(exc.read(MAX_REPLY))
        raise AuthorizeError(f"the token endpoint refused the code: {str(reply.get('error', exc.code))[:100]} "
                             f"{str(reply.get('error_description', ''))[:300]}".rstrip()) from None
    except (OSError, urllib.error.URLError) as exc:
        raise AuthorizeError(f"token endpoint {urllib.parse.urlsplit(token_url).netloc} unreachable: "
                             f"{getattr(exc, 'reason', exc)}") from None
    refresh, access = reply.get("refresh_token"), reply.get("access_token")
    if not isinstance(refresh, str) or not refresh:
        raise AuthorizeError("the token endpoint gave no refresh token (Google: the consent must be given again, "
                             "which prompt=consent asks for; Microsoft: the offline_access scope is needed)")
    return Grant(refresh_token=refresh, access_token=access if isinstance(access, str) else "",
                 expires_in=float(reply.get("expires_in", 3600) or 3600))


def _json(body: bytes) -> dict:
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}
