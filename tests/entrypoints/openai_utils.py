"""Helpers for the OpenAI-server tests: real servers on a free loopback port (`hopperllm serve` in a
subprocess started with `--port 0`, whose log says which port; or uvicorn in a thread of the test
process over an engine the test configures), and reading their /metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

API_KEY = "test-key"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LISTENING = re.compile(r"on http://([\d.]+):(\d+) ")

# The shared server: the tiny random model, a short context (generation stays cheap) and a 1 MiB body limit.
SHARED_SERVER_ARGS = [
    "--model",
    "dummy:tiny",
    "--device",
    "cpu",
    "--max-model-len",
    "64",
    "--api-key",
    API_KEY,
    "--max-request-bytes",
    str(1 << 20),
]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    log_path: str
    base_url: str = ""
    api_key: str | None = None
    auth: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server_process(args: list[str], log_path: str, timeout_s: float = 120.0) -> ServerProcess:
    """Start `hopperllm serve ARGS --port 0` and wait until /health answers 200."""
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HOPPERLLM_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "hopperllm.entrypoints.cli",
        "serve",
        "--port",
        "0",
        "--disable-uvicorn-access-log",
    ]
    proc = subprocess.Popen(cmd + args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    log.close()
    server = ServerProcess(proc, log_path)
    if "--api-key" in args:
        server.api_key = args[args.index("--api-key") + 1]
        server.auth = {"Authorization": f"Bearer {server.api_key}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        m = _LISTENING.search(server.log())
        if m and not server.base_url:
            server.base_url = f"http://{m.group(1)}:{m.group(2)}"
        if server.base_url:
            try:
                if httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become healthy in {timeout_s} s:\n{server.log()}")


class ThreadServer:
    """uvicorn serving build_app(...) in a daemon thread of this process, on a free loopback port."""

    def __init__(
        self, engine_kwargs: dict | None = None, max_waiting_requests: int | None = None, **settings
    ):
        from hopperllm.engine.arg_utils import EngineArgs
        from hopperllm.engine.async_engine import AsyncLLMEngine
        from hopperllm.entrypoints.openai.api_server import (
            ServerSettings,
            bind_socket,
            build_app,
            make_server,
        )

        kwargs = dict(model="dummy:tiny", device="cpu")
        kwargs.update(engine_kwargs or {})
        self.engine = AsyncLLMEngine.from_engine_args(
            EngineArgs(**kwargs), max_waiting_requests=max_waiting_requests, show_progress=False
        )
        settings.setdefault("served_model_names", [kwargs["model"]])
        self.app = build_app(self.engine, ServerSettings(**settings))
        self.server = make_server(self.app, log_level="warning", access_log=False, graceful_timeout_s=5)
        self._sock = bind_socket("127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()


# -- /metrics -------------------------------------------------------------------------------------
def read_metrics(base_url: str) -> dict[str, float]:
    """{'name{label="v",...}': value} of every sample on /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        m = re.match(r"^([\w:]+)(\{[^}]*\})? ([-+\d.eE]+|NaN)$", line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent); `model_name` is matched whatever it is."""
    for key, v in values.items():
        if key == name or key.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', key))
            got.pop("model_name", None)
            if got == labels:
                return v
    return 0.0


def wait_for_idle(base_url: str, timeout_s: float = 60.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and every KV block is free; returns the metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = read_metrics(base_url)
        free, total = (
            metric(m, "hopperllm:kv_cache_free_blocks"),
            metric(m, "hopperllm:kv_cache_total_blocks"),
        )
        running, waiting = metric(m, "vllm:num_requests_running"), metric(m, "vllm:num_requests_waiting")
        if free == total > 0 and running == waiting == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(
                f"KV blocks did not come back: {free}/{total} free, {running} running, {waiting} waiting"
            )
        time.sleep(0.1)


def wait_for(base_url: str, name: str, value: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(read_metrics(base_url), name) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not reach {value}")
        time.sleep(0.05)
