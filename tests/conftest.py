"""Shared fixtures.

Every test runs with its own empty runs root (CHARLM_RUNS_DIR) and corpus cache
(CHARLM_DATA_DIR) in its tmp_path, the session's own kernel folder (CHARLM_KERNEL_DIR), no
CHARLM_MIRROR, and the registry's URLs pointed at a refused loopback port: no test, nor a
`charlm` process it starts from any cwd, can touch the user's runs/ or home cache or reach the
real corpus servers, and a default corpus that is not cached falls back to python-docs at once.
The session fails if anything outside version control in the repository changed while it ran
(tests/isolation.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

import isolation
from helpers import SHARED_DATA, refused_port, train_runs

REPO = Path(__file__).resolve().parents[1]
_SESSION_ENV = ("CHARLM_RUNS_DIR", "CHARLM_DATA_DIR")


def pytest_configure(config):
    """FastGRU's compiled loops are built once per test session into a temporary folder (and
    subprocesses inherit it), never into the user's ~/.cache. Runs and corpora made outside a
    test (module fixtures, collection) go to a session folder: each test gets its own below."""
    if not os.environ.get("CHARLM_KERNEL_DIR"):
        config._charlm_kernel_dir = tempfile.mkdtemp(prefix="charlm-kernels-")
        os.environ["CHARLM_KERNEL_DIR"] = config._charlm_kernel_dir
    config._charlm_session_dir = tempfile.mkdtemp(prefix="charlm-session-")
    config._charlm_env_before = {name: os.environ.get(name) for name in _SESSION_ENV}
    os.environ["CHARLM_RUNS_DIR"] = os.path.join(config._charlm_session_dir, "runs")
    os.environ["CHARLM_DATA_DIR"] = os.path.join(config._charlm_session_dir, "cache")
    _pin_to_cpu()


def pytest_sessionstart(session):
    session.config._charlm_tree = isolation.tree_state(REPO)


def pytest_sessionfinish(session, exitstatus):
    """No test may leave a trace in the repository (a run, runs/latest, a cache, a kernel)."""
    before = getattr(session.config, "_charlm_tree", None)
    if before is None:
        return
    changed = isolation.changes(before, isolation.tree_state(REPO))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", f"a test wrote outside its tmp_path, into {REPO}", red=True)
            for line in changed:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_REAL: dict = {}  # torch's own device queries and CUDA_VISIBLE_DEVICES, for cuda-marked tests


def _pin_to_cpu() -> None:
    """The suite runs on the CPU unless a test is marked `cuda`: on a GPU machine --device auto
    would pick the GPU (on a Mac, MPS), so torch's device queries answer "no GPU" in this process
    and CUDA_VISIBLE_DEVICES="" hides the GPUs from every process a test starts. CUDA is set up
    here first when there is one, so this process keeps its GPUs for the cuda-marked tests,
    which get the real queries back (`cpu_only_unless_marked_cuda`). Module fixtures, built
    before any test's own fixtures, are pinned too."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    _REAL.update(is_available=torch.cuda.is_available, device_count=torch.cuda.device_count,
                 mps=mps.is_available if mps is not None else None,
                 visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if torch.cuda.is_available():
        torch.cuda.init()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0
    if mps is not None:
        mps.is_available = lambda: False


def _unpin() -> None:
    import torch

    if not _REAL:
        return
    torch.cuda.is_available, torch.cuda.device_count = _REAL["is_available"], _REAL["device_count"]
    if _REAL["mps"] is not None:
        torch.backends.mps.is_available = _REAL["mps"]
    if _REAL["visible"] is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = _REAL["visible"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped, with the reason, where there is none."""
    if _REAL.get("is_available", lambda: False)():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_only_unless_marked_cuda(request, monkeypatch):
    """A cuda-marked test sees the machine's GPUs (in process and in what it starts)."""
    if request.node.get_closest_marker("cuda") is None:
        return
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", _REAL["is_available"])
    monkeypatch.setattr(torch.cuda, "device_count", _REAL["device_count"])
    if _REAL["visible"] is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _REAL["visible"])


def pytest_unconfigure(config):
    _unpin()
    for name, value in getattr(config, "_charlm_env_before", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if getattr(config, "_charlm_session_dir", None):
        shutil.rmtree(config._charlm_session_dir, ignore_errors=True)
    folder = getattr(config, "_charlm_kernel_dir", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("CHARLM_KERNEL_DIR", None)


@pytest.fixture
def shared_data() -> Path:
    """The reference corpora, read in place (never copied into the repo); $CHARLM_SHARED_DATA
    points elsewhere."""
    if not (SHARED_DATA / "timemachine.txt").is_file():
        pytest.skip(f"reference corpora not found in {SHARED_DATA} (set CHARLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def refused_url() -> str:
    return f"http://127.0.0.1:{refused_port()}"


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch) -> Path:
    """A fresh CHARLM_RUNS_DIR per test: training from any cwd, in process or in a `charlm`
    process started with this environment, never writes runs/ or runs/latest elsewhere."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs))
    return runs


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh CHARLM_DATA_DIR per test, and corpus downloads that can only reach loopback."""
    from charlm.data import corpus

    cache = tmp_path / "charlm-cache"
    monkeypatch.setenv("CHARLM_DATA_DIR", str(cache))
    monkeypatch.delenv("CHARLM_MIRROR", raising=False)
    dead = f"http://127.0.0.1:{refused_port()}"
    registry = corpus.registry()
    for name, e in list(registry.items()):
        urls = tuple(f"{dead}/{e.filename}" for _ in e.urls)
        monkeypatch.setitem(registry, name, dataclasses.replace(e, urls=urls))
    monkeypatch.setattr(corpus, "DOWNLOAD_OPTIONS", {"timeout": (2, 2), "retries": 1, "backoff": 0.01})
    return cache


class _Handler(BaseHTTPRequestHandler):
    """Serves files of `server.root`, misbehaving as `server.mode` says.

    files           200, or 206 for `Range: bytes=N-` (416 past the end); 404 for missing files
    norange         like files, but ignores Range and always answers 200 with the whole file
    close_mid_body  ignores Range; announces the whole file, sends half of it, closes
    stall           sends nothing at all until the test ends
    stall_mid_body  announces the whole file, sends its first 1,000 bytes, then nothing
    trickle         announces the whole file, then sends one byte every 0.05 s
    endless         no Content-Length: sends "a" * 64 KiB blocks until the client leaves
    html            like files, but says Content-Type: text/html

    `server.redirects` maps a path to the Location a 302 answer sends instead (any mode).
    """

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv: _Server = self.server  # type: ignore[assignment]
        srv.seen.append({"path": self.path, "range": self.headers.get("Range")})
        if self.headers.get("Authorization"):
            srv.seen[-1]["auth"] = self.headers["Authorization"]
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if srv.mode == "stall":
            srv.release.wait(10)
            return
        if srv.mode == "endless":
            self.send_response(200)
            self.end_headers()
            try:
                while not srv.release.is_set():
                    self.wfile.write(b"a" * 65536)
            except OSError:
                pass
            return
        path = srv.root / unquote(self.path).lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match[1]) if match and srv.mode == "files" else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if srv.mode == "html":
            self.send_header("Content-Type", "text/html; charset=utf-8")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        srv.seen[-1]["status"] = 206 if start else 200
        body = data[start:]
        if srv.mode == "close_mid_body":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif srv.mode == "stall_mid_body":
            self.wfile.write(body[:1000])
            self.wfile.flush()
            srv.release.wait(10)
        elif srv.mode == "trickle":
            try:
                for i in range(len(body)):
                    if srv.release.wait(0.05):
                        break
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
            except OSError:
                pass
        else:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, mode: str, tls=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:  # an ssl.SSLContext: serve https
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.root, self.mode = Path(root), mode
        self.seen: list[dict] = []
        self.redirects: dict[str, str] = {}
        self.release = threading.Event()


@dataclass
class LoopbackServer:
    """A running loopback server: `url(name)` addresses a file, `seen` lists the requests."""

    httpd: _Server
    seen: list[dict] = field(default_factory=list)
    scheme: str = "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def http_server():
    """Start loopback servers: `http_server(root, mode="files", tls=None)` (modes: see _Handler;
    tls: an ssl.SSLContext to serve https with)."""
    started: list[_Server] = []

    def start(root: Path, mode: str = "files", tls=None) -> LoopbackServer:
        httpd = _Server(root, mode, tls)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        started.append(httpd)
        return LoopbackServer(httpd, httpd.seen, "https" if tls is not None else "http")

    yield start
    for httpd in started:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models in this process: one thread is fastest, and on a busy machine a second one
    only spins at barriers (seconds per step with the cores oversubscribed). Modules that train
    tiny models in process take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One real tiny run (10 steps), made in process: root/run/{last,best}.pt, root/small.txt.
    Tests that change it work on copies."""
    root = tmp_path_factory.mktemp("tiny")
    train_runs(root, {"run": ["--layers", "1", "--embed", "8", "--max-steps", "10",
                              "--eval-every", "5", "--checkpoint-every", "5"]}, text_chars=30_000)
    return root
