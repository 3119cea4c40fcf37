"""The real stack: `docker compose up` on a real Docker engine, checked from the host through the
port it publishes on 127.0.0.1, as a user meets the product.

Run by `make test-docker` (tests/container/run.sh): it gets an engine, builds the images from
the project's Dockerfile (docker/build-airgapped.sh) and runs this module with `-m container`.
Never part of `make test`, never skipped: without an engine or images this fails and says why.
The export job exports only what is checked here (cifar_resnet20, from the checkpoint shipped
in weights/), with the official-weights download off (no internet in CI).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ..conftest import CIFAR_TEST, ROOT, SHARED_DATA, require

pytestmark = pytest.mark.container

PROJECT = os.environ.get("RESNET_SERVE_TEST_PROJECT", "resnet-serve-ci")
MODEL = "cifar_resnet20"
SAMPLES = SHARED_DATA / "cifar10-test" / "samples"
READY_DEADLINE_S = 300.0
RECOVERY_DEADLINE_S = 120.0


def docker() -> str:
    """Debian's client where installed (it speaks to the daemon's own BuildKit), else PATH's."""
    found = os.environ.get("DOCKER") or (
        "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    )
    if not found:
        pytest.fail("no docker client: run `make test-docker`, which installs the engine")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def phase(name: str, seconds: float) -> None:
    print(f"\n[container] {name}: {seconds:.1f} s", flush=True)


@dataclass
class Stack:
    port: int
    grpc_port: int
    env: dict[str, str]
    project: str = PROJECT

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def compose(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        command = [docker(), "compose", "-p", self.project, "-f", "docker-compose.yml"]
        command += ["-f", "docker-compose.cpu.yml", *args]
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if result.returncode != 0:
            logs = subprocess.run(
                [*command[:7], "logs", "--no-color", "--tail", "40"],
                cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            pytest.fail(
                f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n--- logs ---\n{logs.stdout}{logs.stderr}"
            )
        return result

    def up(self) -> float:
        start = time.monotonic()
        self.compose("up", "-d", "--wait", "--no-build", timeout_s=READY_DEADLINE_S)
        return time.monotonic() - start

    def api_container(self) -> str:
        (container,) = self.compose("ps", "-a", "-q", "api").stdout.split()
        return container

    def inspect(self, template: str) -> str:
        command = [docker(), "inspect", "-f", template, self.api_container()]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind in ("container", "volume", "network"):
            command = [docker(), kind, "ls", "-q", "--filter", label]
            if kind == "container":
                command.insert(3, "-a")
            found[kind] = subprocess.run(
                command, capture_output=True, text=True, check=True
            ).stdout.split()
        return found


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_SERVE_", "EXPORT_"))}
    port, grpc_port = free_port(), free_port()
    empty = Path(os.environ.get("STATE_DIR", ROOT / ".docker-ci")) / "calibration-empty"
    empty.mkdir(parents=True, exist_ok=True)  # no representative images: fp32, and one line
    env.update(
        COMPOSE_PROJECT_NAME=PROJECT,
        API_BIND="127.0.0.1",
        API_PORTS=str(port),
        API_GRPC_PORTS=str(grpc_port),
        EXPORT_ARCHS=MODEL,
        EXPORT_PRETRAINED="never",
        CALIBRATION_DIR=str(empty),
        RESNET_SERVE_MAX_QUEUE_IMAGES="4096",
        # Two front-end workers and the engine process: every test below, the crash and the
        # stop under load included, runs the multi-process service (the swarm stack and the
        # rest of the suite run one process).
        RESNET_SERVE_WORKERS="2",
    )
    stack = Stack(port, grpc_port, env)
    stack.compose("down", "-v", "--remove-orphans")  # what an interrupted earlier run left
    phase("first `up -d --wait` (export job, then api healthy)", stack.up())
    try:
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def classify(client: httpx.Client, url: str, blobs: list[bytes], top_k: int = 1) -> list:
    files = [("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    response = client.post(f"{url}/classify", params={"model": MODEL, "top_k": top_k}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["trained"] is True
    return body["predictions"]


def test_ready_and_serving_the_shipped_trained_model(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/readyz", timeout=10).status_code == 200
    assert stack.inspect("{{.State.Health.Status}}") == "healthy"
    models = httpx.get(f"{stack.url}/models", timeout=10).json()
    (model,) = models["models"] if isinstance(models, dict) else models
    assert model["name"] == MODEL
    assert model["metadata"]["weights"]["trained"] is True
    assert model["metadata"]["weights"]["source"].endswith("resnet20-12fca82f.th")


def test_one_engine_process_and_two_front_end_workers_run_in_the_container(stack: Stack) -> None:
    top = subprocess.run(
        [docker(), "top", stack.api_container(), "-eo", "pid,args"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[1:]  # fmt: skip
    engines = [line for line in top if re.search(r"-m service(\s|$)", line)]
    workers = [line for line in top if "-m service.worker" in line]
    assert (len(engines), len(workers)) == (1, 2), top


def test_without_calibration_images_the_export_says_in_one_line_what_is_missing(
    stack: Stack,
) -> None:
    logs = stack.compose("logs", "--no-color", "export").stdout.splitlines()
    hints = [line for line in logs if "put a few hundred images like your traffic in" in line]
    print(f"\n[container] without calibration images: {hints}", flush=True)
    (hint,) = hints
    assert f"{MODEL}: fp32 (no images in calibration/ suit its 32x32 input)" in hint
    assert hint.rstrip().endswith("for the fastest precision that passes the gate")
    model = httpx.get(f"{stack.url}/models/{MODEL}", timeout=10).json()["metadata"]
    assert model["precision"] == "fp32" and model.get("precision_choice") is None


def test_the_shipped_resnet20_classifies_2000_real_images_as_pytorch_does(stack: Stack) -> None:
    with np.load(require(CIFAR_TEST)) as data:
        images, labels = data["images"], data["labels"]
    blobs = [png(image) for image in images]
    chunks = [list(range(i, i + 25)) for i in range(0, len(blobs), 25)]
    predicted = np.full(len(blobs), -1)

    def run(chunk: list[int]) -> None:
        with httpx.Client(timeout=120) as client:
            predictions = classify(client, stack.url, [blobs[i] for i in chunk])
        for i, top in zip(chunk, predictions, strict=True):
            predicted[i] = top[0]["index"]

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # 8 requests of 25 images in flight
        for future in [pool.submit(run, chunk) for chunk in chunks]:
            future.result()  # a failed request fails the test here
    correct = int((predicted == labels).sum())
    print(f"\naccuracy through the container: {correct}/{len(labels)}", flush=True)
    phase("2000 images classified over HTTP", time.monotonic() - start)
    assert (predicted >= 0).all()
    assert correct == 1813  # the PyTorch count of this checkpoint (shared/data/README.md)


def sample_blobs() -> list[tuple[bytes, int]]:
    rows = (require(SAMPLES) / "labels.csv").read_text("utf-8").splitlines()[1:]
    return [((SAMPLES / row.split(",")[0]).read_bytes(), int(row.split(",")[1])) for row in rows]


def test_embed_returns_64_dimensional_vectors(stack: Stack) -> None:
    blobs = [blob for blob, _ in sample_blobs()[:4]]
    files = [("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    response = httpx.post(f"{stack.url}/embed", params={"model": MODEL}, files=files, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["trained"] is True and body["dim"] == 64
    vectors = np.asarray(body["embeddings"])
    assert vectors.shape == (4, 64) and np.isfinite(vectors).all()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_open_inference_protocol_agrees_with_classify(stack: Stack, protocol: str) -> None:
    """`/v2/.../infer` over HTTP (port 8000) and ModelInfer over gRPC (port 8001)."""
    if protocol == "http":
        import tritonclient.http as triton

        oip = triton.InferenceServerClient(url=f"127.0.0.1:{stack.port}")
    else:
        import tritonclient.grpc as triton

        oip = triton.InferenceServerClient(url=f"127.0.0.1:{stack.grpc_port}")
    samples = sample_blobs()
    blobs = [blob for blob, _ in samples]
    with httpx.Client(timeout=60) as client:
        expected = classify(client, stack.url, blobs, top_k=10)
    assert oip.is_model_ready(MODEL)
    image = triton.InferInput("image_bytes", [len(blobs)], "BYTES")
    image.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    result = oip.infer(MODEL, [image], outputs=[triton.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    scores = np.exp(logits - logits.max(1, keepdims=True))
    scores /= scores.sum(1, keepdims=True)
    for row, ranked in zip(scores, expected, strict=True):
        assert int(row.argmax()) == ranked[0]["index"]
        for entry in ranked:
            assert abs(float(row[entry["index"]]) - entry["score"]) < 1e-5
    assert [r[0]["index"] for r in expected] == [label for _, label in samples]


@dataclass
class Load:
    """Closed-loop clients, one new connection per request (so that a refused connection and
    an accepted-then-dropped request are told apart), each outcome timed."""

    url: str
    clients: int = 6
    outcomes: list[tuple[float, float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._blob = sample_blobs()[0][0]
        self._lock = threading.Lock()

    def _one(self) -> str:
        files = [("file", ("0.png", self._blob, "image/png"))]
        timeout = httpx.Timeout(60.0, connect=2.0)
        try:
            with httpx.Client(timeout=timeout, headers={"Connection": "close"}) as client:
                response = client.post(f"{self.url}/classify", params={"model": MODEL}, files=files)
            return "ok" if response.status_code == 200 else f"http_{response.status_code}"
        except httpx.ConnectError:
            return "refused"  # never accepted: nothing listens (or nothing is routed) there
        except httpx.ConnectTimeout:
            return "connect_timeout"
        except httpx.ReadError:
            # reset by the peer's kernel: the connection sat in the listen backlog when the
            # listener closed, unread by the service
            return "reset_unread"
        except httpx.RemoteProtocolError:
            return "dropped"  # accepted, read, then closed without an answer: a lost request
        except httpx.TimeoutException:
            return "timeout"

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            outcome = self._one()
            with self._lock:
                self.outcomes.append((start, time.monotonic(), outcome))
            if outcome != "ok":
                time.sleep(0.05)  # a client backing off, not spinning on a dead port

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._loop) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def wait_for(self, count: int, deadline_s: float = 60) -> None:
        end = time.monotonic() + deadline_s
        while sum(o == "ok" for _, _, o in self.outcomes) < count:
            assert time.monotonic() < end, f"load made no progress: {Counter(self.counts())}"
            time.sleep(0.05)

    def counts(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        """Outcomes of the requests that ended in [since, until)."""
        with self._lock:
            return Counter(o for _, e, o in self.outcomes if since <= e < until)

    def started_after(self, since: float) -> Counter[str]:
        with self._lock:
            return Counter(o for s, _, o in self.outcomes if s >= since)


def wait_until(predicate: Callable[[], bool], deadline_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < deadline_s, f"not true within {deadline_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # no name resolves
]


def test_docs_render_offline_in_headless_chromium_and_try_it_out_finds_the_cat(
    stack: Stack,
) -> None:
    """Debian's Chromium (installed by tests/container/run.sh), driven by Playwright, with every
    request that leaves 127.0.0.1 refused and recorded: Swagger UI renders from the image's own
    assets, "Try it out" on /classify with a CIFAR-10 cat answers `cat`, and ReDoc renders."""
    from urllib.parse import urlsplit

    from playwright.sync_api import Route, sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).exists(), "no chromium: tests/container/run.sh installs Debian's"
    cat = SAMPLES / "cat_domestic_cat_s_000907.png"
    outside: list[str] = []
    blocked: list[str] = []  # what the pages' Content-Security-Policy stopped in the browser

    def local_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    start = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1400})
        context.route("**/*", local_only)
        page = context.new_page()
        page.on("console", lambda m: blocked.append(m.text) if "Security Policy" in m.text else 0)
        page.goto(f"{stack.url}/docs")
        page.wait_for_selector(".swagger-ui .information-container .title", timeout=30_000)
        assert "resnet-serve" in page.inner_text(".swagger-ui .information-container .title")
        path = page.locator(".opblock-summary-path[data-path='/classify']")
        path.click()
        operation = page.locator(".opblock", has=path)
        operation.locator("button.try-out__btn").click()
        operation.locator("input[placeholder='model']").fill(MODEL)
        operation.locator("input[placeholder='top_k']").fill("1")
        operation.locator("input[type='file']").set_input_files(require(cat))
        operation.locator("button.execute").click()
        answer = operation.locator(".live-responses-table .response-col_description pre").first
        answer.wait_for(timeout=30_000)
        body = json.loads(answer.inner_text())
        answer.scroll_into_view_if_needed()
        shot = Path(os.environ.get("STATE_DIR", ROOT / ".docker-ci")) / "docs-try-it-out.png"
        page.screenshot(path=shot)
        page.goto(f"{stack.url}/redoc")
        page.get_by_text("Top-k classes per image").first.wait_for(timeout=30_000)
        browser.close()
    phase(f"headless Chromium: /docs, Try it out, /redoc ({shot})", time.monotonic() - start)
    print(f"[container] blocked by the docs pages' Content-Security-Policy: {blocked}", flush=True)
    assert body["predictions"][0][0]["label"] == "cat", body
    assert outside == [], f"the docs pages asked for the network: {outside}"


def test_a_crash_under_load_is_restarted_by_the_restart_policy(stack: Stack) -> None:
    """SIGKILL to the service's process from the host, as a crash would (`docker kill` would
    mark the container manually stopped, and `unless-stopped` would then never restart it)."""
    restarts = int(stack.inspect("{{.RestartCount}}"))
    top = subprocess.run(
        [docker(), "top", stack.api_container(), "-eo", "pid,args"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[1:]  # fmt: skip
    # The engine process (`-m service`; its workers run `-m service.worker`): its death takes
    # the workers with it, and the container exits.
    (pid,) = [int(line.split()[0]) for line in top if re.search(r"-m service(\s|$)", line)]
    with Load(stack.url) as load:
        load.wait_for(20)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        down = wait_until(lambda: not ready(stack.url), 30)
        back = wait_until(lambda: ready(stack.url), RECOVERY_DEADLINE_S) + down
        recovered = time.monotonic()
        load.wait_for(sum(load.counts().values()) // 2 + 20)
    before = load.counts(0, killed)
    during = load.counts(killed, recovered)  # the crash loses what was in flight, by nature
    after = load.started_after(recovered)
    failed = sum(n for outcome, n in during.items() if outcome != "ok")
    print(
        f"\n[container] SIGKILL under load: ready again after {back:.1f} s; while down "
        f"{failed} requests failed ({dict(during)}); after recovery {dict(after)}",
        flush=True,
    )
    assert int(stack.inspect("{{.RestartCount}}")) == restarts + 1
    assert stack.inspect("{{.State.Status}}") == "running"
    assert set(before) == {"ok"}, before
    assert set(after) == {"ok"}, after


def test_stop_under_load_answers_every_accepted_request_and_exits_0(stack: Stack) -> None:
    container = stack.api_container()
    with Load(stack.url) as load:
        load.wait_for(20)
        start = time.monotonic()
        stack.compose("stop", "api", timeout_s=120)
        stopped = time.monotonic()
        time.sleep(0.5)  # the clients meet the closed port at least once
    counts = load.counts()
    phase("`docker compose stop api` under load", stopped - start)
    print(f"[container] stop under load: outcomes {dict(counts)}", flush=True)
    exit_code = subprocess.run(
        [docker(), "inspect", "-f", "{{.State.ExitCode}}", container],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert exit_code == "0"
    # every request the service read was answered, and answered 200; the rest were refused
    # at the closed port (or reset unread in the kernel's backlog)
    assert counts["ok"] > 0
    assert set(counts) <= {"ok", "refused", "reset_unread"}, counts


def test_a_second_up_keeps_the_volume_and_only_rechecks(stack: Stack) -> None:
    seconds = stack.up()
    phase("second `up -d --wait` (volume kept)", seconds)
    logs = stack.compose("logs", "--no-color", "export").stdout
    assert "already present with the same weights, skipped" in logs
    assert ready(stack.url)


def test_down_v_leaves_nothing_behind(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans")
    assert stack.leftovers() == {"container": [], "volume": [], "network": []}


def test_the_gpu_image_without_a_gpu_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    """The compose default (RESNET_SERVE_REQUIRE_CUDA=true) on a host with no GPU."""
    image = os.environ.get("RESNET_SERVE_GPU_IMAGE", "resnet-serve:gpu")
    found = subprocess.run([docker(), "image", "inspect", image], capture_output=True)
    assert found.returncode == 0, f"{image} is not built: docker/build-airgapped.sh --gpu"
    repo = tmp_path / "models"
    repo.mkdir(mode=0o755)
    start = time.monotonic()
    result = subprocess.run(
        [docker(), "run", "--rm", "-v", f"{repo}:/models:ro",
         "-e", "RESNET_SERVE_REQUIRE_CUDA=true", "-e", "RESNET_SERVE_PROVIDERS=cuda,cpu", image],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = (result.stdout + result.stderr).strip().splitlines()
    print(f"\n[container] {image} without a GPU ({time.monotonic() - start:.1f} s): {lines}")
    assert result.returncode == 2
    (critical,) = [line for line in lines if "CRITICAL" in line]
    assert "CUDA is required" in critical and "no CUDA device is usable" in critical
    assert critical == lines[-1]
    assert not any("onnxruntime" in line for line in lines), "no onnxruntime noise before it"


def test_manifest_of_the_run() -> None:
    """The images this run used, with their sizes, for the record."""
    listing = subprocess.run(
        [docker(), "image", "ls", "--format", "{{json .}}", "resnet-serve"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    images = {f"{i['Repository']}:{i['Tag']}": i["Size"] for i in map(json.loads, listing)}
    print(f"\n[container] images: {images}", flush=True)
    assert {"resnet-serve:cpu", "resnet-serve:export"} <= set(images)
