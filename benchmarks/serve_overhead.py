"""The serving front end's share of a step, without a GPU: `hopperllm serve`'s process (FastAPI, uvicorn, the
asyncio engine loop, every stream's SSE chunks) on `dummy:tiny` with the model's forward and LM head replaced
by zeros (host_overhead.py's `_ZeroModel`), loaded by `hopperllm bench serve` from a second process. The
server records each engine step's own time (in its worker thread) and the time from one step's end to the
next one's start (the event loop handing the step's outputs to the streams and running their handlers while
the engine waits); the client reports TPOT. Where the gap approaches a GPU step's milliseconds at the same
batch, serving is host-bound.

    python benchmarks/serve_overhead.py --num-prompts 200 --input-len 1024 --output-len 128
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

BUCKETS = ((1, 16), (16, 64), (64, 128), (128, 256), (256, 1 << 30))


def _word_model(runner, tokenizer):
    """Zeros for the model, but the greedy token is a word's (a stream with no text fails the client's check)."""
    from host_overhead import _ZeroModel  # benchmarks/ is on sys.path when run as a script

    word = tokenizer.encode("a", add_special_tokens=False)[-1]

    class _WordModel(_ZeroModel):
        def compute_logits(self, hidden):
            logits = super().compute_logits(hidden)
            logits[:, word] = 1.0
            return logits

    return _WordModel(runner.model, runner.vocab_size)


def _time_steps(engine, steps: list, profile: bool):
    """Wrap engine.step to record (start, end, outputs); a cProfile of the steps when `profile`."""
    step = engine.step
    step_prof = cProfile.Profile() if profile else None

    def timed_step():
        if step_prof is not None:
            step_prof.enable()  # the thread that steps the engine
        t = time.perf_counter()
        out = step()
        steps.append((t, time.perf_counter(), len(out)))
        if step_prof is not None:
            step_prof.disable()
        return out

    engine.step = timed_step
    return step_prof


def core_hook(engine) -> None:
    """--engine-process: run in the engine core's process (core_proc.py's hook) to install the zero model
    and time the steps there; the steps (and the steps' profile) are written when the engine shuts down."""
    runner = engine.executor.runner
    runner.model = _word_model(runner, engine.tokenizer)
    steps: list = []
    step_prof = _time_steps(engine, steps, os.environ.get("SERVE_OVERHEAD_PROFILE") == "1")
    shutdown = engine.shutdown

    def write_and_shutdown():
        top = []
        if step_prof is not None:
            buf = io.StringIO()
            buf.write("engine steps (the engine core's process):\n")
            pstats.Stats(step_prof, stream=buf).sort_stats("tottime").print_stats(25)
            top = buf.getvalue().splitlines()
        with open(os.environ["SERVE_OVERHEAD_STATS"], "w") as f:
            json.dump({"steps": steps, "profile_top": top}, f)
        shutdown()

    engine.shutdown = write_and_shutdown


def serve(
    port: int,
    stats_json: str,
    max_num_seqs: int,
    num_kv_blocks: int,
    profile: bool = False,
    engine_process: bool = False,
) -> None:
    """The server process: `hopperllm serve`'s engine and app with a zero model, its step times kept."""
    import torch

    from hopperllm.engine.arg_utils import EngineArgs
    from hopperllm.engine.async_engine import AsyncLLMEngine
    from hopperllm.entrypoints.openai.api_server import ServerSettings, bind_socket, build_app, make_server

    torch.manual_seed(0)
    args = EngineArgs(model="dummy:tiny", device="cpu", dtype="float32", max_num_seqs=max_num_seqs,
                      num_kv_blocks=num_kv_blocks)  # fmt: skip
    steps: list[tuple[float, float, int]] = []  # (start, end, outputs) of each step, perf_counter seconds
    step_prof = None
    if engine_process:  # the core writes its steps to stats_json at shutdown
        from hopperllm.engine.core_client import MPAsyncLLMEngine

        os.environ["SERVE_OVERHEAD_STATS"] = stats_json
        os.environ["SERVE_OVERHEAD_PROFILE"] = "1" if profile else "0"
        engine = MPAsyncLLMEngine.from_engine_args(args, log_stats=False, hook="serve_overhead:core_hook")
    else:
        engine = AsyncLLMEngine.from_engine_args(args, show_progress=False, log_stats=False)
        runner = engine.engine.executor.runner
        runner.model = _word_model(runner, engine.tokenizer)
        step_prof = _time_steps(engine.engine, steps, profile)
    sock = bind_socket("127.0.0.1", port)
    app = build_app(engine, ServerSettings(served_model_names=["dummy:tiny"]))
    server = make_server(app, log_level="warning", access_log=False)
    prof = cProfile.Profile() if profile else None
    try:
        if prof is not None:
            prof.enable()  # the event loop's thread: the HTTP handlers and the streams, not the engine's step
        server.run(sockets=[sock])
    finally:
        sock.close()
        top = []
        if prof is not None:
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            if step_prof is not None:
                buf.write("engine steps (worker thread):\n")
                pstats.Stats(step_prof, stream=buf).sort_stats("tottime").print_stats(25)
            top = buf.getvalue().splitlines()
        if engine_process:  # the core's record, written as it stopped, with the loop's profile added
            with open(stats_json) as f:
                rec = json.load(f)
            steps, top = rec["steps"], top + rec["profile_top"]
        with open(stats_json, "w") as f:
            json.dump({"steps": steps, "profile_top": top}, f)


def summarize(steps: list) -> dict:
    """Per batch bucket (outputs a step): steps, median step ms, median gap ms to the next step's start."""
    if len(steps) < 2:
        return {}
    a = np.array(steps)
    start, end, n = a[:-1, 0], a[:-1, 1], a[:-1, 2]
    gap = a[1:, 0] - end  # the loop's time between this step's end and the next one's start
    res = {}
    for lo, hi in BUCKETS:
        sel = (n >= lo) & (n < hi)
        if sel.any():
            name = f"{lo}-{hi - 1}" if hi < 1 << 30 else f"{lo}-"
            res[name] = {
                "steps": int(sel.sum()),
                "step_ms": float(np.median(end[sel] - start[sel]) * 1e3),
                "gap_ms": float(np.median(gap[sel]) * 1e3),
                "gap_us_per_output": float(np.median(gap[sel] / n[sel]) * 1e6),
            }
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", default="inf", help="req/s (inf: all at once)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--output-json", default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the server's event-loop thread")
    p.add_argument(
        "--pin", action="store_true", help="server on CPU 0, client on CPU 1 (less noise on a small machine)"
    )
    p.add_argument(
        "--engine-process",
        action="store_true",
        help="the engine core in a process of its own (HOPPERLLM_ENABLE_MULTIPROCESSING=1's server)",
    )
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stats-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-kv-blocks", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.server:
        serve(a.port, a.stats_json, a.max_num_seqs, a.num_kv_blocks, a.profile, a.engine_process)
        return 0

    blocks = -(-a.num_prompts * (a.input_len + a.output_len) // 16) + 16
    with tempfile.TemporaryDirectory() as tmp:
        stats = os.path.join(tmp, "steps.json")
        client_json = os.path.join(tmp, "client.json")
        cmd = [sys.executable, __file__, "--server", "--port", str(a.port), "--stats-json", stats,
               "--max-num-seqs", str(a.max_num_seqs), "--num-kv-blocks", str(blocks)] + ["--profile"] * a.profile \
              + ["--engine-process"] * a.engine_process  # fmt: skip
        pin = (lambda cpu: ["taskset", "-c", str(cpu)]) if a.pin else (lambda cpu: [])
        srv = subprocess.Popen(pin(0) + cmd)
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=2)
                    break
                except OSError:
                    if srv.poll() is not None:
                        raise SystemExit("the server exited before it answered /health") from None
                    time.sleep(0.5)
            client = [sys.executable, "-m", "hopperllm.entrypoints.cli", "bench", "serve", "--port", str(a.port),
                      "--endpoint", a.endpoint, "--num-prompts", str(a.num_prompts), "--input-len",
                      str(a.input_len), "--output-len", str(a.output_len), "--request-rate", a.request_rate,
                      "--disable-tqdm", "--output-json", client_json]  # fmt: skip
            subprocess.run(pin(1) + client, check=True)
        finally:
            srv.send_signal(signal.SIGINT)
            srv.wait(timeout=60)
        server_rec = json.load(open(stats))
        steps = server_rec["steps"]
        rec = json.load(open(client_json))
    from hopperllm.bench.common import git_commit, versions

    res = {
        "benchmark": "serve_overhead",
        "device": f"cpu, {os.cpu_count()} cores (host work only: the model is zeros)",
        "versions": versions(),
        "git_commit": git_commit(),
        "args": vars(a),
        "client": {k: v for k, v in rec.get("results", rec).items() if isinstance(v, int | float)},
        "steps": len(steps),
        "by_batch": summarize(steps),
        "profile_top": server_rec["profile_top"],
    }
    print("\n".join(res["profile_top"]))
    print(f"{'outputs a step':>15s} {'steps':>6s} {'step ms':>8s} {'gap ms':>7s} {'gap us/output':>14s}")
    for name, b in res["by_batch"].items():
        print(
            f"{name:>15s} {b['steps']:6d} {b['step_ms']:8.2f} {b['gap_ms']:7.2f} {b['gap_us_per_output']:14.1f}"
        )
    c = res["client"]
    print(f"client: TPOT mean {c.get('mean_tpot_ms', float('nan')):.2f} ms, TTFT mean "
          f"{c.get('mean_ttft_ms', float('nan')):.1f} ms, {c.get('request_throughput', float('nan')):.1f} req/s")  # fmt: skip
    if a.output_json:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
