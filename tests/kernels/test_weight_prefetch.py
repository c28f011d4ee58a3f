"""The decode GEMVs' L2 weight prefetch (fp8.prefetch_weight_lines, WeightPrefetch): which bytes it touches,
against a plain-torch reference of the lines a split-K GEMV reads first, and how gemv_weight_prefetch sizes it.

The addresses run through the Triton interpreter on the CPU (MARK counts each touched line instead of
prefetching it); that the prefetch changes no output of the kernels that issue it is a GPU test
(tests/gpu: the norms, the decode attention, the model's tokens).
"""

import pytest
import torch
import triton
import triton.language as tl

from hopperllm.kernels import fp8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _mark_kernel(mark_ptr, stride, rows, K, k_per_split, SPLITS: tl.constexpr, LINES: tl.constexpr,
                 BLOCK_R: tl.constexpr):  # fmt: skip
    fp8.prefetch_weight_lines(mark_ptr, stride, rows, K, k_per_split, tl.program_id(0), tl.num_programs(0),
                              mark_ptr, SPLITS, LINES, BLOCK_R, True)  # fmt: skip


def ref_marks(rows: int, K: int, k_per_split: int, splits: int, lines: int) -> torch.Tensor:
    """Which bytes of a [rows, K] weight the prefetch addresses: the starts of the first `lines` 128-byte
    lines of each K slice of every row, a line past the end of a short slice taking the slice's last byte.
    (The kernel may address a line twice: the padding rows of a program's last row block repeat its first
    row; a repeated prefetch is the same hint again.)"""
    marks = torch.zeros(rows, K, dtype=torch.bool)
    for s in range(splits):
        end = min((s + 1) * k_per_split, K)
        for line in range(lines):
            marks[:, min(s * k_per_split + line * 128, end - 1)] = True
    return marks


@pytest.mark.parametrize(
    "rows, K, k_per_split, splits, lines, programs, block_r",
    [
        (40, 1024, 1024, 1, 2, 3, 8),  # one slice, rows not a multiple of the programs
        (33, 1536, 512, 3, 4, 5, 4),  # three equal slices, every line of each
        (17, 1280, 512, 3, 4, 2, 16),  # the last slice (256 bytes) shorter than its 4 lines: repeats
        (9, 768, 768, 1, 8, 16, 2),  # more programs than rows: some programs have none
    ],
)
def test_prefetch_touches_the_first_lines_of_each_k_slice(
    rows, K, k_per_split, splits, lines, programs, block_r
):
    marks = torch.zeros(rows, K, dtype=torch.int32, device=DEVICE)
    _mark_kernel[(programs,)](marks, K, rows, K, k_per_split, SPLITS=splits, LINES=lines, BLOCK_R=block_r)
    assert torch.equal(marks.cpu() > 0, ref_marks(rows, K, k_per_split, splits, lines))


@pytest.mark.parametrize(
    "M, N, K, budget_mb, gated",
    [
        (1, 8192, 4096, 32, False),  # 70B o_proj at TP=2: the whole weight
        (1, 8192, 4096, 8, False),
        (1, 5120, 8192, 16, False),  # 70B qkv at TP=2, split 3 ways
        (1, 28672, 8192, 16, True),  # 70B gate/up at TP=2, the fused launch
        (5, 28672, 8192, 16, True),
        (1, 4096, 4096, 100, False),  # 7B o_proj: a budget above the weight takes all of it
        (16, 22016, 4096, 0.1, False),  # below one line a slice: one line
    ],
)
def test_plan_follows_the_gemv_slices_and_the_budget(M, N, K, budget_mb, gated):
    budget = int(budget_mb * 2**20)
    k_per_split, splits, lines = fp8.weight_prefetch_plan(M, N, K, budget, gated, 132)
    cfg = fp8.fp8_gemv_config(M, N, K, 132)
    if gated:
        cfg = fp8.gated_config(cfg)
    assert (k_per_split, splits) == fp8._k_slices(K, cfg["BLOCK_K"], cfg["SPLIT_K"])
    assert lines & (lines - 1) == 0  # a power of two (the kernel's arange)
    slice_lines = triton.cdiv(k_per_split, 128)
    nbytes = N * splits * min(lines, slice_lines) * 128
    if lines < slice_lines:
        assert nbytes <= budget or lines == 1
        assert N * splits * 2 * lines * 128 > budget  # the most that fits: twice as many would not
    else:
        assert lines < 2 * slice_lines  # the whole slice, rounded up to a power of two, no more


def test_no_prefetch_off_the_decode_path():
    w = torch.zeros(64, 256, dtype=fp8.FP8_DTYPE)
    assert fp8.gemv_weight_prefetch(w, 1, 2**20) is None  # CPU weights: the kernels skip inline PTX there
    if torch.cuda.is_available():
        wc = w.cuda()
        assert fp8.gemv_weight_prefetch(wc, 1, 0) is None
        assert fp8.gemv_weight_prefetch(wc, fp8.GEMV_MAX_M + 1, 2**20) is None
        assert fp8.gemv_weight_prefetch(wc, 1, 2**20) is not None
