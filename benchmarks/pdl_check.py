"""Does programmatic dependent launch overlap two of our kernels, eagerly and in a CUDA graph? Two FP8 GEMVs
back to back with phase stamps (kernels/timeline.py): the second's first program start and its release (past
its PDL wait) against the first's last program end, with PDL on and off. With PDL working, the second's
programs start while the first still runs (where an SM has room for them) and only wait for its end.

    python benchmarks/pdl_check.py --output-json out.json
"""

from __future__ import annotations

import argparse
import os

import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from hopperllm.kernels import fp8, timeline


def run_pair(graph: bool, pdl: bool, first_cfg: dict, second_cfg: dict, args) -> dict:
    os.environ["HOPPERLLM_PDL"] = "1" if pdl else "0"
    x, xs, w1, w2, ws = args

    def pair():
        fp8.fp8_gemv(x, xs, w1, ws, config=first_cfg)
        fp8.fp8_gemv(x, xs, w2, ws, config=second_cfg)

    timeline.RECORDS = []
    pair()  # compile the stamped variants (TIMESTAMPS=True) before the pair that is read
    torch.cuda.synchronize()
    timeline.RECORDS = []
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            pair()
        for _ in range(3):
            g.replay()
    else:
        pair()
    torch.cuda.synchronize()
    a, b = (r["ts"].cpu() for r in timeline.RECORDS[-2:])
    timeline.RECORDS = None
    a_end = int(a[:, 1:7].max())
    a_first_end = int(a[:, 1:7].max(dim=1).values.min())
    return {
        "graph": graph,
        "pdl": pdl,
        "first_programs": a.shape[0],
        "second_programs": b.shape[0],
        "first_busy_us": (a_end - int(a[:, 1].min())) / 1e3,
        "first_program_end_spread_us": (a_end - a_first_end) / 1e3,
        "second_start_after_first_end_us": (int(b[:, 0].min()) - a_end) / 1e3,
        "second_release_after_first_end_us": (int(b[:, 1].min()) - a_end) / 1e3,
        "second_started_before_first_end": int((b[:, 0] < a_end).sum()),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    K = 4096
    x = torch.randn(1, K, generator=g, device="cuda").to(torch.float8_e4m3fn)
    xs = torch.tensor([0.01], device="cuda")
    w1 = torch.randn(4096, K, generator=g, device="cuda").to(torch.float8_e4m3fn)
    w2 = torch.randn(4096, K, generator=g, device="cuda").to(torch.float8_e4m3fn)
    ws = torch.ones(4096, device="cuda")
    base = {k: v for k, v in fp8.fp8_gemv_config(1, 4096, K, 132).items() if k != "STREAM_K"}
    # a first kernel of few programs (most SMs idle: room for the second's), and the model's o_proj launch
    cases = {"few-programs-first": {**base, "SPLIT_K": 1, "BLOCK_N": 128}, "model-config-first": {**base}}
    rows = []
    for name, first in cases.items():
        for graph in (False, True):
            for pdl in (False, True):
                row = {"case": name, **run_pair(graph, pdl, first, base, (x, xs, w1, w2, ws))}
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                )
    emit({"rows": rows}, a.output_json)


if __name__ == "__main__":
    main()
