"""benchmarks/simulate_schedule.py drives the engine's Scheduler through a throughput run without a model."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "simulate_schedule",
    os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "simulate_schedule.py"),
)
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


@pytest.mark.parametrize("max_num_seqs,max_num_batched_tokens", [(4, 128), (16, 96), (64, 1024)])
def test_every_token_scheduled_once(max_num_seqs, max_num_batched_tokens):
    n, inp, out = 24, 50, 6
    r = sim.simulate(n, inp, out, max_num_seqs, max_num_batched_tokens, num_kv_blocks=1000, block_size=16)
    c = r["classes"]
    assert sum(x["prefill_tokens"] for x in c.values()) == n * inp
    # the first output token comes from the prompt's last chunk; each later one from a decode
    assert sum(x["decodes"] for x in c.values()) == n * (out - 1)
    # decode i (0-based) of a sequence attends to its prompt and the i + 1 tokens generated before it
    assert r["decode_keys"] == n * sum(inp + i + 1 for i in range(out - 1))
    assert r["preemptions"] == 0
    for x in c.values():
        assert x["mean_decodes"] <= max_num_seqs


def test_the_cap_on_sequences_leaves_decode_only_steps():
    # at 8 sequences the 9th prompt waits for one to finish: decode-only stretches between waves; at 32 the
    # prefills of later prompts ride along with the decodes
    few = sim.simulate(32, 64, 16, 8, 256, num_kv_blocks=1000)["classes"]
    many = sim.simulate(32, 64, 16, 32, 256, num_kv_blocks=1000)["classes"]
    assert few["decode"]["steps"] > many["decode"]["steps"]


_spec2 = importlib.util.spec_from_file_location(
    "host_overhead",
    os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "host_overhead.py"),
)


def test_host_overhead_runs_every_request_through_the_engine(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    ho = importlib.util.module_from_spec(_spec2)
    _spec2.loader.exec_module(ho)
    r = ho.run(12, 40, 5, 8, 64, "final", profile_steps=2)
    c = r["classes"]
    assert set(c) == {"decode", "mixed"}
    assert sum(b["steps"] for b in c["decode"]["by_batch"].values()) == c["decode"]["steps"]
    assert r["profile_top"]
