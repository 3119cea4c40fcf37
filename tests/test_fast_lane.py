"""The fast lane (service/protocols/fast_lane.py) answers the hot routes exactly as the FastAPI
routes that document them do: the same request through each gives the same status, headers that
matter and body (422s: the same status and code; the lane words the message itself)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.protocols.app import create_app
from service.protocols.fast_lane import FastLane

from .support.images import solid
from .support.service import multipart, wait_ready, write_tiny_model

PNG = {"content-type": "image/png"}
TENSOR = {"name": "images", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.5] * 192}
CASES: list[tuple[str, dict[str, Any]]] = [
    ("/classify", {"files": multipart([solid(90), solid(30)])}),
    ("/classify?top_k=2&model=tiny", {"content": solid(90), "headers": PNG}),
    ("/classify?top_k=4", {"content": solid(90), "headers": PNG}),
    ("/classify?top_k=5", {"content": solid(90), "headers": PNG}),
    ("/classify?top_k=0", {"content": solid(90), "headers": PNG}),
    ("/classify?top_k=x", {"content": solid(90), "headers": PNG}),
    ("/classify?top_k=" + "9" * 40, {"content": solid(90), "headers": PNG}),
    ("/classify?model=nope", {"content": solid(90), "headers": PNG}),
    ("/classify", {"content": b"not an image", "headers": PNG}),
    ("/classify", {"content": b"", "headers": PNG}),
    ("/classify", {"content": b"{}", "headers": {"content-type": "application/json"}}),
    ("/embed?normalize=true", {"content": solid(90), "headers": PNG}),
    ("/embed?normalize=off", {"content": solid(90), "headers": PNG}),
    ("/embed?normalize=maybe", {"content": solid(90), "headers": PNG}),
    ("/embed", {"content": solid(90), "headers": {**PNG, "accept": "application/x-npy"}}),
    ("/v2/models/tiny/infer", {"json": {"inputs": [TENSOR]}}),
    ("/v2/models/tiny/versions/1/infer", {"json": {"inputs": [TENSOR], "id": "a"}}),
    ("/v2/models/tiny/versions/7/infer", {"json": {"inputs": [TENSOR]}}),
    ("/v2/models/nope/infer", {"json": {"inputs": [TENSOR]}}),
    ("/v2/models/tiny/infer", {"content": b"[1, 2", "headers": {"content-type": "text/json"}}),
]


BYPASS = (b"x-test-bypass-fast-lane", b"1")


class Either:
    """The app, whose fast lane a request bypasses with the BYPASS header (the FastAPI routes
    then answer it), on one event loop for both."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and BYPASS in scope["headers"]:
            await FastAPI.__call__(self.app, scope, receive, send)  # type: ignore[arg-type]
        else:
            await self.app(scope, receive, send)


class Documented:
    """Posts through the FastAPI routes."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def post(self, path: str, **kwargs: Any) -> Any:
        headers = {**kwargs.pop("headers", {}), BYPASS[0].decode(): BYPASS[1].decode()}
        return self.client.post(path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Documented]]:
    repo = tmp_path_factory.mktemp("repo")
    write_tiny_model(repo, "tiny", num_classes=4)
    app = create_app(Settings(model_repository=repo, intra_op_threads=1))
    with TestClient(Either(app)) as lane:
        wait_ready(lane)
        yield lane, Documented(lane)


@pytest.mark.parametrize(("path", "request_kwargs"), CASES, ids=[c[0] for c in CASES])
def test_the_fast_lane_answers_as_the_documented_routes(
    clients: tuple[TestClient, Documented], path: str, request_kwargs: dict[str, Any]
) -> None:
    lane, documented = clients
    assert FastLane.takes({"type": "http", "method": "POST", "path": path.split("?")[0]})
    ours, theirs = lane.post(path, **request_kwargs), documented.post(path, **request_kwargs)
    assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    if ours.status_code == 422:
        assert ours.json()["error"]["code"] == theirs.json()["error"]["code"]
    elif "json" in ours.headers["content-type"]:
        assert json.loads(ours.content) == json.loads(theirs.content)
    else:
        assert ours.content == theirs.content


def test_other_paths_go_to_fastapi(clients: tuple[TestClient, Documented]) -> None:
    lane, _ = clients
    for method, path in (("GET", "/classify"), ("POST", "/v2/models//infer"),
                         ("POST", "/v2/models/a/b/infer"), ("POST", "/models")):  # fmt: skip
        assert not FastLane.takes({"type": "http", "method": method, "path": path})
    assert lane.get("/classify").status_code == 405
    assert lane.post("/v2/models/a/b/infer").json() == {"error": "Not Found"}


def test_openapi_still_documents_the_hot_routes(clients: tuple[TestClient, Documented]) -> None:
    lane, _ = clients
    paths = lane.get("/openapi.json").json()["paths"]
    assert {"/classify", "/embed", "/v2/models/{name}/infer"} <= set(paths)
    params = {p["name"] for p in paths["/classify"]["post"]["parameters"]}
    assert params == {"model", "top_k"}


def test_tokens_and_tracing_guard_the_lane(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "repo", "tiny", num_classes=4)
    token = "lane-token-0123456789abcdef"
    settings = Settings(model_repository=tmp_path / "repo", inference_token=token)
    with TestClient(create_app(settings)) as client:
        refused = client.post("/classify", content=solid(90), headers=PNG)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        wait_ready(client)
        auth = {**PNG, "authorization": f"Bearer {token}"}
        assert client.post("/classify", content=solid(90), headers=auth).status_code == 200
