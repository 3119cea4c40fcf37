"""`/docs` and `/redoc` from the service's own install: every script, style sheet and icon the
pages name is served by the service itself (no CDN, no web fonts), against the real service.
A real browser renders them with no network in tests/container/test_docs_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.launcher import Service

from .support.graphs import write_tiny

TOKEN = "inference-token-0123456789abcdef"


def start(root: Path, env: dict[str, str]) -> Service:
    write_tiny(root / "repo", "tiny")
    return Service(root / "repo", root / "server.log", env=env)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with start(tmp_path_factory.mktemp("docs"), {}) as svc:
        svc.wait_ready()
        yield svc
        assert svc.terminate() == 0, svc.log()


def referenced(page: str) -> list[str]:
    """Every URL the page makes the browser load: src, href, ReDoc's spec-url, Swagger's url."""
    attributes = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", page)
    return attributes + re.findall(r"""\burl: ?["']([^"']+)["']""", page)


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png"}),
    ],
)
def test_docs_pages_load_every_asset_from_the_service(
    service: Service, page: str, assets: set[str]
) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        html = client.get(page)
        assert html.status_code == 200
        policy = html.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
        urls = referenced(html.text)
        assert not [u for u in urls if "//" in u], f"{page} names another host: {urls}"
        assert "fonts.googleapis" not in html.text and "cdn." not in html.text
        local = {u.rsplit("/", 1)[-1]: u for u in urls if u.startswith("/docs/assets/")}
        assert assets <= set(local), urls
        for name in assets:
            response = client.get(local[name])
            assert response.status_code == 200, name
            assert len(response.content) > 1000, name
        assert "/openapi.json" in urls
        assert client.get("/openapi.json").json()["info"]["title"] == "resnet-serve"


def test_unprotected_docs_and_their_assets_open_where_inference_needs_a_token(
    tmp_path: Path,
) -> None:
    env = {"RESNET_SERVE_INFERENCE_TOKEN": TOKEN, "RESNET_SERVE_PROTECT_DOCS": "false"}
    with start(tmp_path, env) as svc:
        svc.wait_ready()
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            for path in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/redoc", "/openapi.json"):
                assert client.get(path).status_code == 200, path
            assert client.get("/models").status_code == 401
            assert client.get("/docs/assets/../../models").status_code in (401, 404)
        assert svc.terminate() == 0, svc.log()
