"""Host-side launch arithmetic for the kernels' wrappers.

Triton's `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent releases: called from
host code each goes through Triton's argument unwrapping, ~5 us a call on a CPU where the same integer
arithmetic takes 0.06 us. A prefill step calls them hundreds of times while enqueueing its launches (the
batch-1 time to first token was host-bound on the H200: perf-notes v26), so the wrappers use these."""

from __future__ import annotations

import functools


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as Triton has it)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device, default: int) -> int:
    """A CUDA device's streaming multiprocessors (cached a device: the property query is slow on the host),
    or `default` for any other device (the interpreter's CPU: the plans' stand-in)."""
    if device.type != "cuda":
        return default
    if device.index is None:
        import torch

        return _sm_count(torch.cuda.current_device())
    return _sm_count(device.index)
