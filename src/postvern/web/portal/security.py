"""The portal's own defences: headers, the session cookie, CSRF, and the origin check.

* Content-Security-Policy with no inline script or style at all (CSP Level 3): only the
  one stylesheet and the one script file of ``/account/static/`` load; forms post only to
  this origin; no framing (``frame-ancestors 'none'``, as X-Frame-Options DENY).
* The session cookie is ``__Host-`` prefixed (RFC 6265bis §4.1.3.2: Secure, Path=/, no
  Domain, so no sibling host can set or shadow it), HttpOnly and SameSite=Strict.
* Every state-changing request carries the session's CSRF token (a hidden form field or,
  for the passkey script's JSON, a header) compared in constant time, and a request whose
  Sec-Fetch-Site (W3C Fetch Metadata) or Origin (RFC 6454 §7) names another site is
  refused before that.
"""

from __future__ import annotations

import hmac

from aiohttp import web

COOKIE = "__Host-postvern"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
# Two years with subdomains, the HSTS preload list's requirement. One value for every
# response of the host (web/server.py uses it too): a browser keeps the policy it saw last,
# so two values on one origin would make its lifetime depend on the page visited last.
HSTS = "max-age=63072000; includeSubDomains"
HEADERS = {
    "Content-Security-Policy": CSP,
    "Strict-Transport-Security": HSTS,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def harden(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.update(HEADERS)
    return response


def set_session_cookie(response: web.StreamResponse, token: str) -> None:
    response.set_cookie(COOKIE, token, secure=True, httponly=True, samesite="Strict", path="/")


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")


def same_origin(request: web.Request) -> bool:
    """False for a request another site's page made (a cross-site form post).

    Fetch Metadata's Sec-Fetch-Site, which every current browser sends, is asked first:
    with ``Referrer-Policy: no-referrer`` Chromium sends ``Origin: null`` even for our own
    forms, so Origin decides only when Sec-Fetch-Site is absent (and ``null`` then tells
    nothing either way; the CSRF token still must match).
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin in (None, "null") or origin == f"https://{request.host}"


def csrf_ok(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
