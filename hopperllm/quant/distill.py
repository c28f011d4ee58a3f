"""Quantization-aware distillation (QAD) of the parameters an FP8 checkpoint keeps in higher precision.

`hopperllm quantize --distill-tokens N` runs it after writing the checkpoint. The FP8 weight codes and the
KV-cache scales stay as quantization chose them; what is trained:

- the RMSNorm gains (every layer's input_layernorm and post_attention_layernorm, and the final norm), as
  g = g0 * (1 + d) with d starting at 0;
- each linear layer's per-output-channel weight scale, s = s0 * (1 + e) (with `train_scales`).

The student is the checkpoint's FP8 pipeline as the engine runs it on a CPU, written out in plain
differentiable torch (float32): weights dequantized (codes * scale), every linear layer's input given its
per-token FP8 e4m3 round trip (`kernels.fp8.ref_per_token_quant_fp8`), and K (after rotary) and V given the
FP8 KV cache's round trip with the checkpoint's k / v scales (x / scale saturated to e4m3, times scale).
Each round trip has a straight-through gradient, x + (q(x) - x).detach(). The teacher is the unquantized
model: its next-token log-probabilities on the training text are computed once, before quantization. Loss:
KL(teacher || student) at every position. Adam over `accum` chunks a step; after each epoch the student is
scored on validation chunks (calibration text after the training tokens, never the held-out evaluation
text). Kept: the mean of the last `average_last` epochs' parameters (default 3 of 6), or with
average_last=0 those of the epoch with the lowest validation KL. The validation KL did not predict the
held-out perplexity (docs/fp8-accuracy.md): picking by it left the outcome to the chunk order.

Measured on SmolLM2-135M (GPTQ + FP8 KV, 16,384 tokens, 6 epochs, lr 1e-3, 4 chunks a step, the mean of
the last 3 epochs): held-out perplexity +1.74% over bfloat16, from +2.41% for GPTQ alone; keeping the best
epoch by validation KL instead gave +1.83%, +1.83% and +2.34% in three chunk orders (docs/fp8-accuracy.md).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hopperllm.kernels.fp8 import FP8_DTYPE, FP8_MAX, ref_per_token_quant_fp8
from hopperllm.layers.rotary import apply_rotary_native, build_cos_sin_cache

PROJ = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",)}
PROJ |= {"gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class DistillConfig:
    tokens: int = 16384  # calibration tokens to train on
    val_tokens: int = 2048  # the calibration tokens after them, to pick the best epoch
    chunk: int = 512
    epochs: int = 6
    lr: float = 1e-3
    accum: int = 4  # chunks averaged into each Adam step
    train_scales: bool = True
    seed: int = 0
    # the parameters kept: the mean of the last N epochs' (0: the best epoch's; None: 3, or every epoch if fewer)
    average_last: int | None = None

    @property
    def kept_last(self) -> int:
        """average_last resolved: how many of the last epochs are averaged (0: the best epoch is kept)."""
        return min(3, self.epochs) if self.average_last is None else self.average_last

    def check(self) -> None:
        for name in ("tokens", "val_tokens", "epochs", "accum"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--distill-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not 0 <= self.kept_last <= self.epochs:
            raise ValueError(
                f"--distill-average-last must be between 0 and --distill-epochs ({self.epochs}), got {self.average_last}"
            )
        if self.chunk < 2:
            raise ValueError(
                f"the distillation chunk (--calib-seq-len) must be at least 2 tokens, got {self.chunk}"
            )
        if not self.lr > 0:
            raise ValueError(f"--distill-lr must be positive, got {self.lr}")


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def fq_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic FP8 round trip of a linear layer's input (the engine's CPU FP8 linear)."""
    with torch.no_grad():
        q, s = ref_per_token_quant_fp8(x)
        q = q.float() * s
    return _ste(x, q)


def fq_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 KV cache round trip: stored as x / scale in e4m3 (saturated), read back as code * scale."""
    with torch.no_grad():
        q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale
    return _ste(x, q)


class FP8Student:
    """A float32 Llama forward over one chunk (positions 0..T-1) through the FP8 pipeline of a ModelOpt
    checkpoint (HF-named `tensors`, `cfg` its config.json), with trainable gain and scale deltas."""

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu"):
        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"distillation needs checkpoint tensor {name!r}, which is missing")
            return tensors[name].to(device=device, dtype=torch.float32)

        self.cfg = cfg
        self.L = cfg["num_hidden_layers"]
        self.nh, self.nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.nh
        self.eps = cfg["rms_norm_eps"]
        max_pos = cfg.get("max_position_embeddings", 4096)
        self.cos_sin = build_cos_sin_cache(
            self.hd, max_pos, cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
        )
        self.cos_sin = self.cos_sin.to(device)
        self.embed = get("model.embed_tokens.weight")
        self.lm_head = get("lm_head.weight") if "lm_head.weight" in tensors else self.embed
        self.final_norm = get("model.norm.weight")
        self.kv_fp8 = "model.layers.0.self_attn.k_proj.k_scale" in tensors
        self.layers = []
        for i in range(self.L):
            p = f"model.layers.{i}."
            layer = {n: get(p + n + ".weight") for n in NORMS}
            for merged, parts in PROJ.items():
                scales = [get(p + n + ".weight_scale").reshape(-1) for n in parts]
                codes = [get(p + n + ".weight") for n in parts]
                for n, s, c in zip(parts, scales, codes, strict=True):
                    if s.numel() != c.shape[0]:
                        raise ValueError(
                            f"distillation needs per-channel weight scales; {p + n}.weight_scale has "
                            f"{s.numel()} values for {c.shape[0]} rows"
                        )
                layer[merged + ".codes"] = torch.cat(codes)
                layer[merged + ".scale"] = torch.cat(scales)
                biases = [tensors.get(p + n + ".bias") for n in parts]
                if biases[0] is not None:
                    layer[merged + ".bias"] = torch.cat(
                        [b.to(device=device, dtype=torch.float32) for b in biases]
                    )
            if self.kv_fp8:
                layer["k_scale"] = get(p + "self_attn.k_proj.k_scale").reshape(())
                layer["v_scale"] = get(p + "self_attn.v_proj.v_scale").reshape(())
            self.layers.append(layer)
        self.device = device
        self.d_norm: list[list[torch.Tensor]] | None = None
        self.d_final: torch.Tensor | None = None
        self.d_scale: list[dict[str, torch.Tensor]] | None = None

    def make_trainable(self, scales: bool) -> list[torch.Tensor]:
        d = self.cfg["hidden_size"]

        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, device=self.device, requires_grad=True)

        self.d_norm = [[zeros(d) for _ in NORMS] for _ in range(self.L)]
        self.d_final = zeros(d)
        params = [t for pair in self.d_norm for t in pair] + [self.d_final]
        if scales:
            self.d_scale = [{m: zeros(ly[m + ".scale"].shape[0]) for m in PROJ} for ly in self.layers]
            params += [t for ds in self.d_scale for t in ds.values()]
        return params

    def _norm_gain(self, i: int, j: int) -> torch.Tensor:
        g = self.layers[i][NORMS[j]]
        return g if self.d_norm is None else g * (1 + self.d_norm[i][j])

    def _final_gain(self) -> torch.Tensor:
        return self.final_norm if self.d_final is None else self.final_norm * (1 + self.d_final)

    def _scale(self, i: int, m: str) -> torch.Tensor:
        s = self.layers[i][m + ".scale"]
        return s if self.d_scale is None else s * (1 + self.d_scale[i][m])

    def _rms(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _linear(self, i: int, m: str, x: torch.Tensor) -> torch.Tensor:
        ly = self.layers[i]
        y = fq_act(x) @ (ly[m + ".codes"] * self._scale(i, m)[:, None]).t()
        b = ly.get(m + ".bias")
        return y if b is None else y + b

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[0]
        pos = torch.arange(T, device=self.device)
        x = self.embed[ids]
        qs, kvs = self.nh * self.hd, self.nkv * self.hd
        for i, ly in enumerate(self.layers):
            h = self._rms(x, self._norm_gain(i, 0))
            q, k, v = self._linear(i, "qkv", h).split([qs, kvs, kvs], dim=-1)
            q = apply_rotary_native(q.reshape(T, self.nh, self.hd), pos, self.cos_sin)
            k = apply_rotary_native(k.reshape(T, self.nkv, self.hd), pos, self.cos_sin)
            v = v.reshape(T, self.nkv, self.hd)
            if self.kv_fp8:
                k, v = fq_kv(k, ly["k_scale"]), fq_kv(v, ly["v_scale"])
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                is_causal=True,
                scale=self.hd**-0.5,
                enable_gqa=self.nh != self.nkv,
            )
            x = x + self._linear(i, "o", o.transpose(0, 1).reshape(T, qs))
            h = self._rms(x, self._norm_gain(i, 1))
            gate, up = self._linear(i, "gate_up", h).chunk(2, dim=-1)
            x = x + self._linear(i, "down", F.silu(gate) * up)
        return self._rms(x, self._final_gain()) @ self.lm_head.t()

    def tuned_tensors(self) -> dict[str, torch.Tensor]:
        """HF-named tensors of the trained parameters (float32, on the CPU)."""
        out = {"model.norm.weight": self._final_gain().detach().cpu()}
        for i in range(self.L):
            p = f"model.layers.{i}."
            for j, n in enumerate(NORMS):
                out[p + n + ".weight"] = self._norm_gain(i, j).detach().cpu()
            if self.d_scale is None:
                continue
            for m, parts in PROJ.items():
                rows = [self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd] if m == "qkv" else None
                s = self._scale(i, m).detach().cpu()
                pieces = s.split(rows) if rows else s.chunk(len(parts))
                for n, piece in zip(parts, pieces, strict=True):
                    out[p + n + ".weight_scale"] = piece.clone()
        return out


def kl_and_nll(student_logits: torch.Tensor, teacher_logp: torch.Tensor, ids: torch.Tensor):
    """Mean KL(teacher || student) over all positions, and the student's mean NLL of the next tokens."""
    logp = F.log_softmax(student_logits, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
    return kl, F.nll_loss(logp[:-1], ids[1:])


def split_text(ids: list[int], config: DistillConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Training and validation chunks: the first `tokens` tokens, then the next `val_tokens`."""
    from hopperllm.quant.calibrate import chunk_tokens

    need = config.tokens + config.val_tokens
    if len(ids) < need:
        raise ValueError(
            f"distillation needs {need} calibration tokens ({config.tokens} to train, {config.val_tokens} to "
            f"validate); the text has {len(ids)}"
        )
    train = chunk_tokens(ids[: config.tokens], config.chunk)
    val = chunk_tokens(ids[config.tokens : need], config.chunk)
    return train, val


def teacher_log_probs(
    logits_fn: Callable[[list[int]], torch.Tensor], chunks: list[list[int]]
) -> list[torch.Tensor]:
    """The unquantized model's next-token log-probabilities for each chunk (float32, on the CPU)."""
    with torch.no_grad():
        return [F.log_softmax(logits_fn(c).float().cpu(), dim=-1) for c in chunks]


def distill(
    student: FP8Student,
    train: list[list[int]],
    val: list[list[int]],
    t_train: list[torch.Tensor],
    t_val: list[torch.Tensor],
    config: DistillConfig,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the student's deltas (module docstring); leaves it holding the best epoch's. Returns a summary."""
    config.check()
    dev = student.device
    train_t = [torch.tensor(c, device=dev) for c in train]
    val_t = [torch.tensor(c, device=dev) for c in val]
    t_train = [t.to(dev) for t in t_train]
    t_val = [t.to(dev) for t in t_val]

    def evaluate() -> tuple[float, float]:
        kls, nlls = [], []
        with torch.no_grad():
            for c, tlp in zip(val_t, t_val, strict=True):
                kl, nll = kl_and_nll(student.logits(c), tlp, c)
                kls.append(kl.item())
                nlls.append(nll.item())
        return sum(kls) / len(kls), sum(nlls) / len(nlls)

    torch.manual_seed(config.seed)
    params = student.make_trainable(config.train_scales)
    opt = torch.optim.Adam(params, lr=config.lr)
    kl0, nll0 = evaluate()
    log(f"distill epoch 0: validation KL {kl0:.5f}, perplexity {math.exp(nll0):.4f}")
    last = config.kept_last
    # the best epoch's parameters are copied only when they are the ones kept
    best = (kl0, 0, None if last else [p.detach().clone() for p in params])
    averaged = [torch.zeros_like(p) for p in params]
    order_gen = torch.Generator().manual_seed(config.seed)
    t_start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        total = 0.0
        order = torch.randperm(len(train_t), generator=order_gen).tolist()
        opt.zero_grad()
        for n, k in enumerate(order):
            kl, _ = kl_and_nll(student.logits(train_t[k]), t_train[k], train_t[k])
            (kl / config.accum).backward()
            if (n + 1) % config.accum == 0 or n + 1 == len(order):
                opt.step()
                opt.zero_grad()
            total += kl.item()
        kl_v, nll_v = evaluate()
        log(
            f"distill epoch {epoch}: train KL {total / len(train_t):.5f}, validation KL {kl_v:.5f}, "
            f"perplexity {math.exp(nll_v):.4f} ({time.perf_counter() - t0:.0f} s)"
        )
        if kl_v < best[0]:
            best = (kl_v, epoch, None if last else [p.detach().clone() for p in params])
        if epoch > config.epochs - last:
            for a, p in zip(averaged, params, strict=True):
                a += p.detach() / last
    with torch.no_grad():
        for p, kept in zip(params, averaged if last else best[2], strict=True):
            p.copy_(kept)
    result = {
        "best_epoch": best[1],
        "val_kl_before": kl0,
        "val_kl": best[0],
        "parameters": sum(p.numel() for p in params),
        "seconds": time.perf_counter() - t_start,
    }
    if last:
        kl_a, nll_a = evaluate()
        log(
            f"distill: the mean of the last {last} epochs: validation KL {kl_a:.5f}, perplexity {math.exp(nll_a):.4f}"
        )
        result.update(val_kl=kl_a, kept=f"the mean of epochs {config.epochs - last + 1}-{config.epochs}")
    else:
        result["kept"] = f"epoch {best[1]}"
    return result


def _shard_files(ckpt_dir: str) -> list[str]:
    files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {ckpt_dir!r}")
    return [os.path.join(ckpt_dir, f) for f in files]


def load_checkpoint_tensors(ckpt_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in _shard_files(ckpt_dir):
        tensors.update(load_file(path))
    return tensors


def write_tuned_tensors(ckpt_dir: str, tuned: dict[str, torch.Tensor]) -> int:
    """Replace the tuned tensors in the checkpoint's shard files in place (each cast to the dtype it is
    stored in; shapes must match). Returns how many were replaced."""
    from safetensors.torch import load_file, save_file

    done = 0
    for path in _shard_files(ckpt_dir):
        shard = load_file(path)
        hit = [n for n in shard if n in tuned]
        if not hit:
            continue
        for n in hit:
            if shard[n].shape != tuned[n].shape:
                raise ValueError(
                    f"tuned tensor {n!r} has shape {tuple(tuned[n].shape)}, the checkpoint's {tuple(shard[n].shape)}"
                )
            shard[n] = tuned[n].to(shard[n].dtype).contiguous()
        save_file(shard, path, metadata={"format": "pt"})
        done += len(hit)
    if done != len(tuned):
        raise ValueError(f"{len(tuned) - done} tuned tensors are not in the checkpoint {ckpt_dir!r}")
    return done
