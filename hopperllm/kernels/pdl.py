"""Programmatic dependent launch (PDL) for the Triton kernels, on Hopper and newer.

A kernel launched with PDL may start while the kernel before it in the stream is still running: its
programs get resident and wait in `griddepcontrol.wait` until the previous grid has finished and its
memory is visible. The previous kernel lets it launch early with `griddepcontrol.launch_dependents`.
What this buys in a decode step: about 300 short kernels run back to back, and each boundary costs the
launch latency plus the ramp of the next grid; with PDL those overlap the previous kernel's tail.

Rule for every kernel here (`pdl_prologue`): wait before the first global memory write and before
every read of memory an earlier kernel of the step may have written, then release the next kernel.
That keeps every read-after-write and write-after-read ordering of the plain stream; releasing right
after means the chain overlaps by one kernel at most (kernel N+2 cannot launch before kernel N has
finished, because N+1 releases only after its own wait). Reads of what no kernel of the step writes
(weights, scales, the cos / sin cache; the positions, lengths, slots and block tables the host copies in
before the step's first kernel) go before the wait, so that they are not dependent round trips after
it: the decode GEMVs, norms, rotary and attention kernels do that. The fused all-reduce + RMSNorm also
reads its row's residual and call count there: only that kernel's previous call on the row writes them,
at least three launches earlier, hence finished (read from L2, past any stale L1 line).
Kernels from torch or cuBLAS between ours are launched without PDL and order as usual.
CUDA graph capture records these launches as programmatic edges, so the same overlap happens on replay.

Off on CPU (the interpreter), before sm_90, and with HOPPERLLM_PDL=0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL (CUDA sm_90+, unless HOPPERLLM_PDL=0)."""
    if device.type != "cuda" or os.environ.get("HOPPERLLM_PDL", "1") == "0":
        return False
    return _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


# PDL is used for launches of at most this many rows (tokens or sequences): decode steps, where launch
# latency is a large part of each kernel. Prefill-sized launches run long enough that overlap buys
# nothing, and with PDL the 7B prefill's time to first token varied between 35 and 58 ms on the H100
# (35.8 ms steadily without); mixed throughput steps were 4% slower (258 vs 248 ms).
PDL_MAX_ROWS = 512


def pdl_kwargs(device: torch.device, rows: int = 1, use: bool | None = None) -> dict[str, bool]:
    """Launch keyword arguments for a kernel that takes USE_PDL: the constexpr and Triton's launch flag.
    `use` overrides the rows rule (PDL still only where the device has it)."""
    if (rows <= PDL_MAX_ROWS if use is None else use) and pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
