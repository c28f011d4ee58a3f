"""The wrappers' launch arithmetic equals Triton's (which costs ~5 us a host call as a constexpr function)."""

from __future__ import annotations

import triton

from hopperllm.kernels.launch import cdiv, next_power_of_2


def test_equal_to_triton():
    for n in [*range(0, 70), 127, 128, 129, 1000, 1024, 1025, 4095, 4096, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
