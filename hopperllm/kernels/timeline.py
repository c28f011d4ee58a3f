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
    # empty, not zeros: a fill kernel here would sit between the instrumented launches and break their PDL
    # chain (each program writes its whole row at phase 0: the start, zeros, its SM)
    ts = torch.empty(programs, 8, dtype=torch.int64, device=device)
    RECORDS.append({"kernel": kernel, "ts": ts, "captured": torch.cuda.is_current_stream_capturing(), **meta})
    return ts


@triton.jit
def stamp(ts_ptr, program, phase: tl.constexpr, TIMESTAMPS: tl.constexpr):
    """Program `program` reached `phase` (0-6); phase 0 writes the whole row: the time, zeros for the phases
    to come (a phase a program skips stays 0), its SM in column 7."""
    if TIMESTAMPS:
        row = ts_ptr + program.to(tl.int64) * 8
        if phase == 0:
            cols = tl.arange(0, 8)
            now = tl.extra.cuda.globaltimer()
            sm = tl.extra.cuda.smid().to(tl.int64)
            tl.store(row + cols, tl.where(cols == 0, now, tl.where(cols == 7, sm, 0)))
        else:
            tl.store(row + phase, tl.extra.cuda.globaltimer())
