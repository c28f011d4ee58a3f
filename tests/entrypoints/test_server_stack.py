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
