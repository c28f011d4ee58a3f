"""The shared `hopperllm serve` subprocess of the OpenAI-server tests."""

from __future__ import annotations

import openai
import pytest

from hopperllm import LLM
from tests.entrypoints.openai_utils import SHARED_SERVER_ARGS, ServerProcess, start_server_process


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory) -> ServerProcess:
    """One `hopperllm serve` for the tests that do not change server state (no signals, no limits hit)."""
    log_path = str(tmp_path_factory.mktemp("openai_server") / "server.log")
    server = start_server_process(SHARED_SERVER_ARGS, log_path)
    yield server
    rc = server.stop()
    assert rc == 0, f"the shared server exited with {rc}:\n{server.log()[-4000:]}"
    assert "Traceback" not in server.log(), server.log()[-4000:]


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The offline reference: the same model, weight seed and max_model_len as the shared server."""
    return LLM(model="dummy:tiny", device="cpu", max_model_len=64, show_progress=False)


@pytest.fixture(scope="module")
def client(shared_server) -> openai.OpenAI:
    """The official client, pointed at the shared server."""
    return openai.OpenAI(
        base_url=f"{shared_server.base_url}/v1", api_key=shared_server.api_key, max_retries=0
    )
