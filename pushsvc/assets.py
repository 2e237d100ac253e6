"""Files served over plain HTTP from ``pushsvc/static``.

``/client.js`` (the browser client) is served always: frontends may load it
straight from the service they connect to. The live page (``/`` and its
script and stylesheet) is served only with ``SERVE_DASHBOARD`` (``pushsvc
demo`` turns it on). Each file is read once, on its first request, and kept.
"""

from __future__ import annotations

import functools
from pathlib import Path

from picows import WSUpgradeResponse, WSUpgradeResponseWithListener

STATIC_DIR = Path(__file__).with_name("static")

_JS = "application/javascript; charset=utf-8"
_COMMON = {
    # The files change with the package; a browser revalidates each load.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}
# The page's URL carries a token: no Referer may take it elsewhere, nothing
# but this origin may run script or be framed around it.
_PAGE_HEADERS = {
    **_COMMON,
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}

CLIENT_FILES: dict[bytes, tuple[str, str]] = {
    b"/client.js": ("client.js", _JS),
}
"""Served in every mode: request path -> (file in ``static/``, Content-Type)."""

PAGE_FILES: dict[bytes, tuple[str, str]] = {
    b"/": ("index.html", "text/html; charset=utf-8"),
    b"/index.html": ("index.html", "text/html; charset=utf-8"),
    b"/dashboard.js": ("dashboard.js", _JS),
    b"/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
"""Served with ``SERVE_DASHBOARD`` only."""


@functools.cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def static_response(
    path: bytes, *, dashboard: bool
) -> WSUpgradeResponseWithListener | None:
    """The HTTP response for ``path`` (without its query), or None when no
    static file is served there.

    :param path: the request path, e.g. ``b"/client.js"``.
    :param dashboard: whether the live page is served (``SERVE_DASHBOARD``).
    """
    entry = CLIENT_FILES.get(path)
    if entry is None and dashboard:
        entry = PAGE_FILES.get(path)
    if entry is None:
        return None
    name, content_type = entry
    headers = _PAGE_HEADERS if name == "index.html" else _COMMON
    response = WSUpgradeResponse.create_ok_response(
        _read(name), {**headers, "Content-Type": content_type}
    )
    return WSUpgradeResponseWithListener(response, None)
