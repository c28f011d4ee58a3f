"""Dense GEMV (the LM head at batch 1) against its torch reference (CPU: Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hopperllm.kernels import gemv as g  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "K"), [(37, 100), (16, 64), (100, 33)])
def test_gemv_matches_reference(N, K, dtype):
    gen = torch.Generator().manual_seed(N + K)
    x = torch.randn(1, K, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(N, K, generator=gen).to(dtype).to(DEVICE)
    out = g.gemv(x, w)
    ref = g.ref_gemv(x, w)
    assert out.shape == (1, N) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_gemv_rejects_bad_shapes():
    x = torch.zeros(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        g.gemv(x, torch.zeros(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        g.gemv(x[:1], torch.zeros(4, 9, device=DEVICE))
