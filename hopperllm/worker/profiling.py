"""Rank-side measurements for the profiling benchmarks, called on every rank at once through
`Executor.collective_rpc(decode_step_profile, ...)`: where a decode step's GPU time goes, and what its
tensor-parallel all-reduces cost.

Three views of the all-reduces of one decode step (batch `bs`, the captured graph's state as the last
real step left it):

- in place: the decode graph's replay time against a second graph of the same forward captured with the
  all-reduces left out (every rank runs it alone: no collective inside). The difference is what the
  all-reduces add to the step, waits for the other ranks included;
- alone: a graph of just that step's all-reduces (same count, shapes and implementation), replayed;
- eager: one profiled eager forward; the collective kernels' share of the kernel time (this includes
  each rank waiting for the others' launches, so it overstates).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist


def timed_replays(graph: torch.cuda.CUDAGraph, iters: int = 100, sync=torch.cuda.synchronize) -> float:
    """Mean ms per replay over `iters` replays, after 5 untimed ones and `sync` (all ranks start together)."""
    for _ in range(5):
        graph.replay()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def kernel_times(prof) -> dict[str, list]:
    """{kernel name: [launches, total us]} of a torch.profiler run's CUDA events."""
    agg: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            agg[ev.name][0] += 1
            agg[ev.name][1] += (
                ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            )
    return dict(agg)


@contextlib.contextmanager
def _patched_collectives(tp, all_reduce, all_gather):
    """Swap the group's collectives (instance attributes shadow the methods) for the block."""
    tp.all_reduce, tp.all_gather_last_dim = all_reduce, all_gather
    try:
        yield
    finally:
        del tp.all_reduce, tp.all_gather_last_dim


@contextlib.contextmanager
def _patched_fused_norm(tp, fused):
    """Swap the group's fused all-reduce + RMSNorm (the model reads `tp.fused_norm` every forward)."""
    saved, tp.fused_norm = tp.fused_norm, fused
    try:
        yield
    finally:
        tp.fused_norm = saved


class _LocalNorm:
    """The fused all-reduce + RMSNorm without its all-reduce: the add + RMSNorm kernel on this rank's own
    partial sums (what the step costs with the communication taken out of that kernel)."""

    def __init__(self, real):
        self.real = real

    def supports(self, x):
        return self.real.supports(x)

    def __call__(self, x, residual, weight, eps, out_fp8=False, static_scale=None):
        from hopperllm.kernels.norm import rms_norm

        out = rms_norm(x, weight, eps, residual=residual, out_fp8=out_fp8, static_scale=static_scale)
        return out, residual


class _RecordedNorm(_LocalNorm):
    """The real fused all-reduce + RMSNorm, recording each call's (shape, dtype)."""

    def __init__(self, real, calls):
        super().__init__(real)
        self.calls = calls

    def __call__(self, x, residual, weight, eps, out_fp8=False, static_scale=None):
        self.calls.append(("fused_all_reduce_norm", tuple(x.shape), x.dtype))
        return self.real(x, residual, weight, eps, out_fp8=out_fp8, static_scale=static_scale)


def decode_step_profile(worker, batch_size: int = 1, iters: int = 100, top: int = 15) -> dict:
    runner, tp = worker.runner, worker.tp
    gr = runner.graph_runner
    if gr is None:
        raise ValueError("decode_step_profile needs the CUDA graphs (not enforce_eager)")
    bs = next(s for s in gr.sizes if s >= batch_size)
    model, kv = runner.model, runner.kv_caches
    meta = gr._meta(bs)

    def forward():
        return model(gr.input_ids[:bs], gr.positions[:bs], kv, meta)

    def sync():
        torch.cuda.synchronize()
        if tp.world_size > 1:
            dist.barrier(group=tp.group)
            torch.cuda.synchronize()

    res: dict = {"rank": tp.rank, "world_size": tp.world_size, "batch_size": bs}
    res["graph_step_ms"] = timed_replays(gr.graphs[bs], iters, sync)

    # the step's collectives, as one eager forward calls them
    calls: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    real_ar, real_ag = tp.all_reduce, tp.all_gather_last_dim

    def rec_ar(x):
        calls.append(("all_reduce", tuple(x.shape), x.dtype))
        return real_ar(x)

    def rec_ag(x):
        calls.append(("all_gather", tuple(x.shape), x.dtype))
        return real_ag(x)

    fused = getattr(tp, "fused_norm", None)
    recorded = _RecordedNorm(fused, calls) if fused is not None else None
    with torch.inference_mode():
        with _patched_collectives(tp, rec_ar, rec_ag), _patched_fused_norm(tp, recorded):
            hidden = forward()
            runner.model.compute_logits(hidden[:batch_size])
        sync()
        in_graph = [c for c in calls if c[0] == "all_reduce"]
        fused_calls = [c for c in calls if c[0] == "fused_all_reduce_norm"]
        res["collectives"] = {
            "all_reduce": len(in_graph),
            "fused_all_reduce_norm": len(fused_calls),
            "all_gather": len(calls) - len(in_graph) - len(fused_calls),
            "bytes_per_all_reduce": sorted(
                {
                    torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                    for _, s, d in in_graph + fused_calls
                }
            ),
        }

        # in place: the same forward without its all-reduces (a fused all-reduce + RMSNorm becomes the
        # plain add + RMSNorm of this rank's partial sums), captured and replayed on this rank alone
        local = _LocalNorm(fused) if fused is not None else None
        with _patched_collectives(tp, lambda x: x, lambda x: x), _patched_fused_norm(tp, local):
            for _ in range(2):
                forward()
            torch.cuda.synchronize()
            g_no = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_no):
                forward()
        res["graph_step_no_allreduce_ms"] = timed_replays(g_no, iters, sync)
        del g_no
        res["allreduce_in_step_ms"] = res["graph_step_ms"] - res["graph_step_no_allreduce_ms"]

        # alone: just the step's all-reduces, back to back, through the group's all-reduce (for the fused
        # calls: what they would cost unfused), and the fused calls against the plain norms they replace
        if tp.world_size > 1 and fused_calls:
            xs = [(0.01 * torch.randn(s, device=runner.device)).to(d) for _, s, d in fused_calls]
            rs = [torch.zeros_like(x) for x in xs]
            w = torch.ones(xs[0].shape[-1], device=runner.device, dtype=xs[0].dtype)
            for name, impl in (("fused_ar_norm", fused), ("norm", _LocalNorm(fused))):
                for x, r in zip(xs, rs, strict=True):
                    impl(x, r, w, 1e-5)
                torch.cuda.synchronize()
                g_f = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g_f):
                    for x, r in zip(xs, rs, strict=True):
                        impl(x, r, w, 1e-5)
                res[f"{name}_alone_ms"] = timed_replays(g_f, iters, sync)
                res[f"{name}_alone_us_each"] = res[f"{name}_alone_ms"] * 1e3 / len(xs)
                del g_f
            del xs, rs
        if tp.world_size > 1 and in_graph + fused_calls:
            bufs = [torch.randn(s, device=runner.device).to(d) for _, s, d in in_graph + fused_calls]
            for b in bufs:
                tp.all_reduce(b)
            torch.cuda.synchronize()
            g_ar = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_ar):
                for b in bufs:
                    tp.all_reduce(b)
            res["allreduce_alone_ms"] = timed_replays(g_ar, iters, sync)
            res["allreduce_alone_us_each"] = res["allreduce_alone_ms"] * 1e3 / len(bufs)
            res["allreduce_impl"] = (
                "nccl" if tp.small_all_reduce is None else "symm_mem one-shot (small), nccl"
            ) + (", fused all-reduce + RMSNorm (decode)" if fused is not None else "")
            g_nccl = torch.cuda.CUDAGraph()  # the same calls through NCCL alone, for comparison
            with torch.cuda.graph(g_nccl):
                for b in bufs:
                    dist.all_reduce(b, group=tp.group)
            res["allreduce_alone_nccl_ms"] = timed_replays(g_nccl, iters, sync)
            res["allreduce_alone_nccl_us_each"] = res["allreduce_alone_nccl_ms"] * 1e3 / len(bufs)
            del g_ar, g_nccl, bufs
        res["allreduce_share_in_step"] = res["allreduce_in_step_ms"] / res["graph_step_ms"]

        # eager: one profiled forward
        from torch.profiler import ProfilerActivity, profile

        forward()
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
    agg = kernel_times(prof)
    total = sum(t for _, t in agg.values())
    coll = sum(t for name, (_, t) in agg.items() if "nccl" in name.lower() or "all_reduce" in name.lower())
    res["eager_kernel_sum_us"] = total
    res["eager_collective_us"] = coll
    res["eager_top_kernels_us"] = {
        k[:80]: {"count": c, "total_us": round(t, 1)}
        for k, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    }
    return res
