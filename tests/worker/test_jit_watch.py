"""JitWatch records the Triton kernel variants a region compiles, and nothing outside it."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
knobs = pytest.importorskip("triton.knobs")

from hopperllm.worker.jit_watch import JitWatch  # noqa: E402


def _add(n: int):
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(x_ptr + offs, x + 1, mask=offs < n)

    return add_one


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs a GPU or the Triton interpreter")  # fmt: skip
def test_counts_new_variants_only_inside_the_region():
    kernel = _add(0)
    x = torch.zeros(16, device="cuda" if torch.cuda.is_available() else "cpu")
    prev = knobs.runtime.jit_cache_hook
    with JitWatch() as watch:
        kernel[(1,)](x, 16, BLOCK=16)
        kernel[(1,)](x, 16, BLOCK=16)  # same variant: no second compile
        kernel[(1,)](x, 16, BLOCK=32)  # a new constexpr: a new variant
    assert knobs.runtime.jit_cache_hook is prev  # restored
    kernel[(1,)](x, 16, BLOCK=64)  # outside: not recorded
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert watch.summary()["count"] == 0  # the interpreter compiles nothing
    else:
        assert watch.summary()["count"] == 2
        assert all("add_one" in k for k in watch.summary()["kernels"])
    assert torch.equal(x, torch.full_like(x, 4))


def test_summary_caps_the_list():
    watch = JitWatch()
    watch.compiled = [f"k{i}" for i in range(30)]
    assert watch.summary(limit=5) == {"count": 30, "kernels": ["k0", "k1", "k2", "k3", "k4"]}
