"""Per-program phase stamps of the decode kernels, for benchmarks/decode_timeline.py.

With `RECORDS` a list, each GPU launch of an instrumented kernel (the FP8 GEMVs, decode attention) gets a
fresh int64 [programs, 8] tensor from `buffer` and its programs write %globaltimer (ns) at their phases into
it, and their SM id into column 7; the record (kernel name, tensor, whether the launch was captured in a
CUDA graph, launch metadata) is appended to `RECORDS`. A graph replay rewrites the tensors it captured. With
`RECORDS` None (serving) the kernels are compiled without the stamps (TIMESTAMPS=False) and launch as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RECORDS: list[dict] | None = None


def buffer(kernel: str, programs: int, device: torch.device, **meta) -> torch.Tensor | None:
    """The stamps tensor for one launch of `programs` programs, or None when stamps are off."""
    if RECORDS is None or device.type != "cuda":
        return None
    ts = torch.zeros(programs, 8, dtype=torch.int64, device=device)
    RECORDS.append(
        {"kernel": kernel, "ts": ts, "captured": torch.cuda.is_current_stream_capturing(), **meta}
    )
    return ts


@triton.jit
def stamp(ts_ptr, program, phase: tl.constexpr, TIMESTAMPS: tl.constexpr):
    """Program `program` reached `phase` (0-6); phase 0 also records the SM."""
    if TIMESTAMPS:
        row = ts_ptr + program.to(tl.int64) * 8
        tl.store(row + phase, tl.extra.cuda.globaltimer())
        if phase == 0:
            tl.store(row + 7, tl.extra.cuda.smid().to(tl.int64))
