"""The decode kernels' phase stamps (kernels/timeline.py): with stamps on, outputs are bit-identical to the
plain launches, every program stamps its phases in order, and the records name the launches."""

import pytest
import torch

from hopperllm.kernels import fp8, timeline
from hopperllm.kernels import paged_attention as pa


@pytest.fixture
def records():
    timeline.RECORDS = []
    yield timeline.RECORDS
    timeline.RECORDS = None


def _monotone(ts: torch.Tensor, phases: list[int]) -> bool:
    t = ts[:, phases]
    return bool((t > 0).all() and (t.diff(dim=1) >= 0).all())


@pytest.mark.parametrize("config", [{"SPLIT_K": 1}, {"SPLIT_K": 4}, {"SPLIT_K": 1, "STREAM_K": 132}])
def test_gemv_stamps(records, config):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4096, generator=g, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(12288, 4096, generator=g, device="cuda").to(torch.float8_e4m3fn)
    xs, ws = torch.tensor([0.01], device="cuda"), torch.rand(12288, generator=g, device="cuda") + 0.5
    base = {k: v for k, v in fp8.fp8_gemv_config(1, 12288, 4096, 132).items() if k != "STREAM_K"}
    cfg = {**base, **config}
    timeline.RECORDS = None
    plain = fp8.fp8_gemv(x, xs, w, ws, config=cfg)
    timeline.RECORDS = records
    stamped = fp8.fp8_gemv(x, xs, w, ws, config=cfg)
    torch.cuda.synchronize()
    assert torch.equal(plain, stamped)
    (rec,) = records
    assert rec["kernel"].startswith("fp8_gemv") and rec["N"] == 12288 and not rec["captured"]
    assert _monotone(rec["ts"], [0, 1, 3])


def test_decode_attention_stamps(records):
    B, hq, hkv, d, bs, ctx = 2, 32, 8, 128, 16, 700
    nb = B * (-(-ctx // bs)) + 4
    cache = torch.randn(2, nb, bs, hkv, d, device="cuda").to(torch.float8_e4m3fn)
    tables = torch.randperm(nb, device="cuda", dtype=torch.int32)[: B * (-(-ctx // bs))].view(B, -1)
    seq_lens = torch.tensor([ctx, ctx - 300], dtype=torch.int32, device="cuda")
    q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
    one = torch.ones(1, device="cuda")
    timeline.RECORDS = None
    plain = pa.paged_decode_attention(q, cache[0], cache[1], tables, seq_lens, 0.088, one, one, num_splits=4,
                                      quant_out=True)  # fmt: skip
    timeline.RECORDS = records
    stamped = pa.paged_decode_attention(q, cache[0], cache[1], tables, seq_lens, 0.088, one, one, num_splits=4,
                                        quant_out=True)  # fmt: skip
    torch.cuda.synchronize()
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a, b.view(torch.uint8)
                           if b.dtype == torch.float8_e4m3fn else b) for a, b in zip(plain, stamped, strict=True))  # fmt: skip
    (rec,) = records
    ts = rec["ts"]
    assert rec["kernel"] == "decode_attention" and ts.shape == (B * hkv * 4, 8)
    assert _monotone(ts, [0, 1, 2, 3, 4])
    merged = ts[:, 5] > 0
    assert merged.sum() == B * hkv  # one merge per (sequence, kv head)
    assert (ts[merged, 5] >= ts[merged, 4]).all()
    assert (ts[:, 6] > 0).sum() == B  # one quantizing tail per sequence
