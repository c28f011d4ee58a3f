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


def test_gpu_idle_by_phase_splits_the_gaps_by_the_innermost_host_range(monkeypatch):
    """benchmarks/profile_speculative.py: the GPU's busy time is the union of its (overlapping) kernels; its
    idle time between them goes to the innermost labeled host range running meanwhile, "other" outside any."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "profile_speculative",
        os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "profile_speculative.py"),
    )
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)

    def ev(device, start, end, name="kernel"):
        return NS(device_type=device, time_range=NS(start=start, end=end), name=name)

    gpu, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [
        ev(gpu, 0, 100), ev(gpu, 50, 150), ev(gpu, 200, 300), ev(gpu, 340, 400), ev(gpu, 420, 500),
        ev(cpu, 0, 410, "@step"), ev(cpu, 140, 190, "@launch"), ev(cpu, 10, 20, "aten::mm"),
    ]  # fmt: skip
    r = ps.gpu_idle_by_phase(NS(events=lambda: events), 2)
    assert r["span_ms_per_step"] == pytest.approx(0.25) and r["busy_ms_per_step"] == pytest.approx(0.195)
    # gaps 150-200 (launch 150-190, step 190-200), 300-340 (step), 400-420 (step 400-410, other 410-420)
    assert r["idle_ms_per_step_by_host_phase"] == pytest.approx(
        {"step": 0.03, "launch": 0.02, "other": 0.005}
    )
    assert r["gaps_over_20us_per_step"] == 1.0
