"""Helpers for the portal and API tests: a server with the HTTPS listener, and a client that
logs in through the real pages (cookies, CSRF tokens) over real TLS."""

from __future__ import annotations

import imaplib
import re
from typing import Any

import aiohttp

from harness import DataDir, client_tls_context

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def base_url(data: DataDir, host: str = "localhost") -> str:
    return f"https://{host}:{data.addr('https')[1]}"


class Browser:
    """An HTTP client that behaves like a browser on the portal: keeps cookies, reads the
    CSRF token from the last page, and sends the Origin header of the page."""

    def __init__(self, data: DataDir) -> None:
        self.base = base_url(data)
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(ssl=client_tls_context()),
        )
        self.csrf = ""
        self.last = ""

    async def close(self) -> None:
        await self.http.close()

    async def _read(self, response: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
        """Keep the page's text and its CSRF token, as a browser keeps the form."""
        self.last = await response.text(errors="replace")
        found = CSRF.search(self.last)
        if found:
            self.csrf = found.group(1)
        return response

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self._read(await self.http.get(self.base + path, **kw))

    async def post(
        self, path: str, form: dict[str, str] | None = None, *, origin: str | None = None, **kw: Any
    ) -> aiohttp.ClientResponse:
        data = {"csrf": self.csrf, **(form or {})}
        headers = {"Origin": origin or self.base}
        return await self._read(
            await self.http.post(self.base + path, data=data, headers=headers, **kw)
        )

    async def login(self, address: str, password: str) -> aiohttp.ClientResponse:
        await self.get("/account/login")
        return await self.login_post(address, password)

    async def login_post(self, address: str, password: str) -> aiohttp.ClientResponse:
        """Post the login form of the page already loaded (and follow to where it leads)."""
        return await self.post("/account/login", {"address": address, "password": password})


def imap_login(data: DataDir, user: str, secret: str) -> str:
    """ "OK", or the server's refusal text."""
    host, port = data.addr("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=20) as conn:
        try:
            conn.login(user, secret)
        except imaplib.IMAP4.error as e:
            return str(e)
        conn.logout()
    return "OK"
