"""The set-up of the symmetric-memory collectives: an object is used only if every rank built it
correctly (`symm_all_reduce._set_up_on_every_rank`), checked here on a one-rank gloo group on the CPU."""

import logging
import tempfile

import pytest
import torch
import torch.distributed as dist

from hopperllm.distributed.symm_all_reduce import _set_up_on_every_rank


@pytest.fixture(scope="module")
def group():
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def _raise():
    raise RuntimeError("no peer access")


@pytest.mark.parametrize(
    ("build", "expect", "logged"),
    [
        (lambda: ("obj", ""), "obj", None),
        (lambda: ("obj", "it summed wrongly"), None, "thing unavailable (it summed wrongly); falling back"),
        (_raise, None, "thing unavailable (RuntimeError: no peer access); falling back"),
    ],
)
def test_set_up_on_every_rank(group, build, expect, logged, caplog):
    with caplog.at_level(logging.WARNING, logger="hopperllm.distributed.symm_all_reduce"):
        got = _set_up_on_every_rank(group, torch.device("cpu"), build, "thing", "falling back")
    assert got == expect
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ([] if logged is None else [logged])


@pytest.mark.parametrize("mode", ["3", "5", "on"])
def test_unknown_fused_mode_is_a_clear_error(monkeypatch, mode):
    from hopperllm.distributed.symm_all_reduce import fused_mode

    monkeypatch.setenv("HOPPERLLM_FUSED_AR_NORM", mode)
    with pytest.raises(ValueError, match="HOPPERLLM_FUSED_AR_NORM must be 0, 1, 2 or 4"):
        fused_mode()
    monkeypatch.setenv("HOPPERLLM_FUSED_AR_NORM", "1")
    assert fused_mode() == "1"
