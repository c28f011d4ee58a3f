"""The server runs on uvloop and httptools (dependencies, as in vLLM), and uvicorn's "auto" picks them."""

from __future__ import annotations

import sys

import pytest

from hopperllm.entrypoints.cli_serve import server_stack


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not a dependency on Windows")
def test_uvicorn_picks_uvloop_and_httptools():
    import uvicorn
    from fastapi import FastAPI

    assert server_stack() == ("uvloop", "httptools")
    config = uvicorn.Config(FastAPI(), log_level="warning")
    config.load()
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"


def test_the_engine_core_runs_in_a_process_of_its_own_by_default(monkeypatch, capsys):
    from hopperllm.entrypoints.cli import main
    from hopperllm.entrypoints.cli_serve import engine_process

    monkeypatch.delenv("HOPPERLLM_ENABLE_MULTIPROCESSING", raising=False)
    assert engine_process()
    monkeypatch.setenv("HOPPERLLM_ENABLE_MULTIPROCESSING", "0")
    assert not engine_process()
    monkeypatch.setenv("HOPPERLLM_ENABLE_MULTIPROCESSING", "yes")
    with pytest.raises(ValueError, match="use 0 or 1"):
        engine_process()
    assert main(["serve", "--device", "cpu", "--model", "dummy:tiny", "--port", "0"]) == 2
    assert "HOPPERLLM_ENABLE_MULTIPROCESSING" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_shared_server_names_where_its_engine_core_runs(shared_server):
    assert "engine core in a process of its own" in shared_server.log()
