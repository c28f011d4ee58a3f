"""Does rotating SmolLM2's residual stream (QuaRot / SpinQuant style) make FP8 activations cost less?

Folds every RMSNorm weight into the linear layers after it, then rotates the residual stream by a random
orthogonal matrix (576 is not a power of two: no plain Hadamard) and, with `resid+v`, each V head by a
Hadamard matrix (folded into v_proj and o_proj). The result is an unquantized HF checkpoint equal to the
original model in exact arithmetic (its float32 perplexity is the GGUF's). Then evaluate, e.g.:

    python benchmarks/fp8_rotation_experiment.py /tmp/ck-resid resid [seed]
    hopperllm eval perplexity --model /tmp/ck-resid --max-tokens 16384 --context-len 1024 --device cpu \
        -q fp8-activation-only --kv-cache-dtype fp8

Modes: none (fold only), resid, resid+v, v. Results in docs/fp8-accuracy.md (it made FP8 worse here).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from hopperllm.loader.gguf import default_gguf_path, iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config
from hopperllm.quant.checkpoint import _write_tokenizer

out, mode = sys.argv[1], sys.argv[2]  # mode: none | resid | resid+v | v
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
src = default_gguf_path()
cfg = read_gguf_config(src)
W = {k: v.double() for k, v in iter_gguf_tensors(src)}
d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
nkv, nh = cfg["num_key_value_heads"], cfg["num_attention_heads"]
g = torch.Generator().manual_seed(seed)


def rand_orth(n):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


if "lm_head.weight" not in W:
    W["lm_head.weight"] = W["model.embed_tokens.weight"].clone()
# fold norms
for i in range(L):
    p = f"model.layers.{i}."
    gi = W.pop(p + "input_layernorm.weight")
    for n in ("q", "k", "v"):
        W[p + f"self_attn.{n}_proj.weight"] = W[p + f"self_attn.{n}_proj.weight"] * gi[None, :]
    gp = W.pop(p + "post_attention_layernorm.weight")
    for n in ("gate", "up"):
        W[p + f"mlp.{n}_proj.weight"] = W[p + f"mlp.{n}_proj.weight"] * gp[None, :]
    W[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.float64)
    W[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.float64)
gf = W["model.norm.weight"]
W["lm_head.weight"] = W["lm_head.weight"] * gf[None, :]
W["model.norm.weight"] = torch.ones(d, dtype=torch.float64)

if "resid" in mode:
    Q = hadamard(d) if (d & (d - 1)) == 0 else rand_orth(d)
    W["model.embed_tokens.weight"] = W["model.embed_tokens.weight"] @ Q
    W["lm_head.weight"] = W["lm_head.weight"] @ Q
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            W[p + n + ".weight"] = W[p + n + ".weight"] @ Q
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            W[p + n + ".weight"] = Q.T @ W[p + n + ".weight"]
if "v" in mode.split("+") or mode == "v":
    H = hadamard(hd) if (hd & (hd - 1)) == 0 else rand_orth(hd)
    grp = nh // nkv
    for i in range(L):
        p = f"model.layers.{i}.self_attn."
        wv, wo = W[p + "v_proj.weight"], W[p + "o_proj.weight"]
        for j in range(nkv):
            wv[j * hd : (j + 1) * hd] = H.T @ wv[j * hd : (j + 1) * hd]
        for h in range(nh):
            wo[:, h * hd : (h + 1) * hd] = wo[:, h * hd : (h + 1) * hd] @ H
os.makedirs(out, exist_ok=True)
save_file({k: v.float().contiguous() for k, v in W.items()}, os.path.join(out, "model.safetensors"))
cfg = dict(cfg, tie_word_embeddings=False, torch_dtype="float32")
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
_write_tokenizer(load_gguf_tokenizer(src), out, None)
print("wrote", out, mode)
