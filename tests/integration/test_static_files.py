"""Static files: ``/client.js`` in every mode, the live page only with
``SERVE_DASHBOARD``, with the headers a page carrying a token in its URL needs;
and the files ship in the wheel (package data)."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Iterator

import pytest
from utils import REPO_ROOT, Server, http_get, run_server

from pushsvc.assets import CLIENT_FILES, PAGE_FILES, STATIC_DIR


@pytest.fixture(scope="module")
def dashboard_server() -> Iterator[Server]:
    """A server with the page on (no broker needed: only HTTP is used)."""
    with run_server(None, wait="health", SERVE_DASHBOARD="true") as s:
        yield s


def test_client_js_is_served_in_every_mode(server: Server) -> None:
    status, headers, body = http_get(server.url("/client.js"))
    assert status == 200
    assert headers["content-type"].startswith("application/javascript")
    assert headers["x-content-type-options"] == "nosniff"
    assert b"export class PushClient" in body
    assert body == (STATIC_DIR / "client.js").read_bytes()


@pytest.mark.parametrize("path", sorted(p.decode() for p in PAGE_FILES))
def test_page_is_off_by_default(server: Server, path: str) -> None:
    status, _, body = http_get(server.url(path))
    assert status == 404, body


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html"),
        ("/index.html", "text/html"),
        ("/dashboard.js", "application/javascript"),
        ("/dashboard.css", "text/css"),
        ("/client.js", "application/javascript"),
    ],
)
def test_page_with_serve_dashboard(
    dashboard_server: Server, path: str, content_type: str
) -> None:
    status, headers, body = http_get(dashboard_server.url(path + "?token=x"))
    assert status == 200, body
    assert headers["content-type"].startswith(content_type)
    assert body


def test_page_headers_keep_the_token_in(dashboard_server: Server) -> None:
    _, headers, body = http_get(dashboard_server.url("/"))
    assert headers["referrer-policy"] == "no-referrer"
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert b'<script type="module" src="./dashboard.js">' in body


def test_other_paths_still_404(dashboard_server: Server) -> None:
    for path in ("/nope", "/static/client.js", "/../pyproject.toml", "/client.js/"):
        status, _, _ = http_get(dashboard_server.url(path))
        assert status == 404, path


def test_static_files_are_package_data() -> None:
    """Every served file matches a pattern in [tool.setuptools.package-data]
    and none in exclude-package-data, so a wheel install serves them too.
    (Regression: "*.html" in the exclusions, meant for Cython's annotation
    output, dropped static/index.html from the wheel.)"""
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]
    patterns = setuptools["package-data"]["pushsvc"]
    excluded = setuptools.get("exclude-package-data", {}).get("pushsvc", [])
    for name, _ in {**CLIENT_FILES, **PAGE_FILES}.values():
        path = f"static/{name}"
        assert (STATIC_DIR / name).is_file(), name
        assert any(fnmatch.fnmatch(path, p) for p in patterns), name
        assert not any(fnmatch.fnmatch(path, p) for p in excluded), f"{name} excluded"
