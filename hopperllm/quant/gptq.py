"""GPTQ for FP8 weights: choose each e4m3 code so that the layer's output error on calibration inputs is
small, not each weight's own rounding error (Frantar et al., "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", 2022; the FP8 form is llm-compressor's GPTQModifier).

For a linear layer y = x W^T with calibration inputs X [T, K], rounding W to Q costs
||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T), H = X^T X. Rows are independent, columns are not: GPTQ
rounds one column j at a time and subtracts its error (w_j - q_j) / [H^-1]_jj times row j of the upper
Cholesky factor of H^-1 from the columns not yet rounded, which then absorb what column j lost (the
Optimal Brain Surgeon update). Columns go in blocks of 128, whose accumulated error reaches the later
columns in one matrix product. With H diagonal (uncorrelated inputs) there is nothing to feed back and the
codes are those of round to nearest.

As llm-compressor does for FP8: the scales are round to nearest's (amax / 448 per output channel, or per
logical matrix), fixed from the original weights before rounding, so the checkpoint format is unchanged
and only the codes differ; H is dampened by `damp` times its mean diagonal; act-order (columns by
decreasing H_jj) is optional and needs nothing in the checkpoint, since the scales are per row. Unlike
the reference code, a weight column whose input was always zero in calibration (H_jj = 0) keeps its
round-to-nearest code rather than being zeroed.

`gptq_quantize_model` runs the model layer by layer, as llm-compressor's sequential pipeline does: the
inputs of decoder layer i come from layers 0..i-1 with their weights already quantized, so each layer
corrects the error of the ones before it; the layer's linear inputs give the Hessians, then the layer
is quantized and run again to give the next layer its inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hopperllm.quant.fp8 import FP8_DTYPE, dequantize, linear_sizes, round_weight, weight_scales

ALGORITHMS = ("rtn", "gptq")


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # H += damp * mean(diag H) * I
    block_size: int = 128  # columns whose error is fed back to the rest in one product
    act_order: bool = False  # round columns by decreasing H_jj

    def __post_init__(self):
        if not self.damp >= 0:
            raise ValueError(
                f"--gptq-damp must be >= 0 (a fraction of the mean Hessian diagonal), got {self.damp}"
            )
        if self.block_size < 1:
            raise ValueError(f"--gptq-block-size must be at least 1, got {self.block_size}")


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    return algorithm


@torch.no_grad()
def gptq_quantize_weight(
    w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, config: GPTQConfig = GPTQConfig()
) -> torch.Tensor:
    """FP8 codes [N, K] for w [N, K] under per-row float32 scales [N] that minimize the output error on
    inputs with Hessian `hessian` = X^T X [K, K] (module docstring). Dequantized: codes * scale[:, None]."""
    N, K = w.shape
    if hessian.shape != (K, K) or scale.shape != (N,):
        raise ValueError(f"GPTQ of a [{N}, {K}] weight needs a [{K}, {K}] Hessian and [{N}] scales")
    W = w.float().clone()
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True) if config.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(config.damp * H.diagonal().mean())
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"GPTQ: the calibration Hessian is not positive definite even with dampening {config.damp}: "
            "raise --gptq-damp or --calib-tokens"
        ) from e
    s = scale.float().to(W.device)
    codes = torch.empty(N, K, dtype=FP8_DTYPE, device=W.device)
    for i1 in range(0, K, config.block_size):
        i2 = min(i1 + config.block_size, K)
        W1 = W[:, i1:i2]  # a view: the feedback below updates W
        Hinv1 = Hinv[i1:i2, i1:i2]
        err1 = torch.empty(N, i2 - i1, device=W.device)
        for j in range(i2 - i1):
            q = round_weight(W1[:, j], s)
            codes[:, i1 + j] = q
            err = (W1[:, j] - q.float() * s) / Hinv1[j, j]
            W1[:, j + 1 :] -= err[:, None] * Hinv1[j, j + 1 :][None, :]
            err1[:, j] = err
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


# -- the model, layer by layer ---------------------------------------------------------------------------
@dataclass
class _LayerInput:
    """One calibration chunk at the input of a decoder layer."""

    positions: torch.Tensor
    hidden: torch.Tensor
    residual: torch.Tensor | None
    meta: object  # AttentionMetadata


class _Stop(Exception):
    pass


def _capture_first_layer_inputs(model: nn.Module, run_chunk: Callable, chunks: list[list[int]]):
    """Each chunk's input to decoder layer 0 (the forward stops there), and the KV-cache tensor it ran with."""
    inputs: list[_LayerInput] = []
    kv_cache = []

    def hook(module, args):
        positions, hidden, residual, cache, meta = args
        tensors = {  # the runner reuses its metadata buffers for the next chunk
            f.name: getattr(meta, f.name).clone()
            for f in dataclasses.fields(meta)
            if isinstance(getattr(meta, f.name), torch.Tensor)
        }
        inputs.append(
            _LayerInput(positions.clone(), hidden.clone(), residual, dataclasses.replace(meta, **tensors))
        )
        kv_cache[:] = [cache]
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook)
    try:
        for chunk in chunks:
            try:
                run_chunk(chunk)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kv_cache[0]


def _hessian_hook(hessian: torch.Tensor) -> Callable:
    """A forward pre-hook adding X^T X of a linear layer's input X [T, K] into `hessian` [K, K]."""

    def hook(module, args):
        x = args[0].reshape(-1, module.input_size).float()
        hessian.addmm_(x.t(), x)

    return hook


def _run_layer(layer: nn.Module, inp: _LayerInput, kv_cache: torch.Tensor) -> _LayerInput:
    # On CUDA the fused norm adds into `residual` in place; the captured input must survive for the next pass.
    residual = None if inp.residual is None else inp.residual.clone()
    hidden, residual = layer(inp.positions, inp.hidden, residual, kv_cache, inp.meta)
    return _LayerInput(inp.positions, hidden, residual, inp.meta)


def gptq_quantize_model(
    model: nn.Module,
    run_chunk: Callable[[list[int]], object],
    chunks: Iterable[list[int]],
    per_channel: bool = True,
    config: GPTQConfig = GPTQConfig(),
    skip: Iterable[str] = (),
    show_progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ codes and scales for every linear layer of `model` (a hopperllm LlamaForCausalLM) but those in
    `skip`, keyed by module name: {name: (codes [N, K] e4m3, per-row float32 scales [N])}.

    `run_chunk(token_ids)` runs the model over one chunk as a single prompt (the runner's
    `logits_for_tokens`); it is only run up to the first decoder layer, whose inputs are kept. Every chunk
    is a whole prompt, so a layer attends only to the K/V it has just written for that chunk: one KV-cache
    tensor serves all layers. The quantized layers are left holding their dequantized FP8 weights."""
    from hopperllm.layers.linear import LinearBase

    chunks = list(chunks)
    skip = set(skip)
    inputs, kv_cache = _capture_first_layer_inputs(model, run_chunk, chunks)
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = model.model.layers
    bar = tqdm(total=len(layers), desc="GPTQ", unit="layer", disable=not show_progress, leave=False)
    for i, layer in enumerate(layers):
        linears = {
            f"model.layers.{i}.{name}": m
            for name, m in layer.named_modules()
            if isinstance(m, LinearBase) and f"model.layers.{i}.{name}" not in skip
        }
        hessians = {
            name: torch.zeros(m.input_size, m.input_size, device=m.weight.device)
            for name, m in linears.items()
        }
        handles = [m.register_forward_pre_hook(_hessian_hook(hessians[name])) for name, m in linears.items()]
        try:
            with torch.inference_mode():
                for inp in inputs if linears else ():
                    _run_layer(layer, inp, kv_cache)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for name, m in linears.items():
                w = m.weight.data
                scale = weight_scales(w, linear_sizes(m), per_channel)
                q = gptq_quantize_weight(w, hessians.pop(name), scale, config)
                codes[name] = (q, scale)
                w.copy_(dequantize(q, scale).to(w.dtype))
        with torch.inference_mode():
            inputs = [_run_layer(layer, inp, kv_cache) for inp in inputs]
        bar.update(1)
    bar.close()
    return codes
