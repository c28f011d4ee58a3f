"""`--baseline hf`: the same model run by HF transformers' `generate` with a static KV cache.

The model is the same checkpoint (an HF directory or a GGUF file) or, for `dummy:<preset>`, a
`LlamaForCausalLM` of the same config with transformers' own random weights: timings depend on the
shapes, not the values. Greedy, `min_new_tokens = max_new_tokens = output_len`, so every sequence
produces exactly `output_len` tokens, as ours do with `ignore_eos`. FP8 quantization is ours only:
the baseline runs in the unquantized dtype (recorded as `hf_dtype`).
"""

from __future__ import annotations

import time

import torch


def load_hf_model(model: str | None, dtype: torch.dtype, device: str):
    """transformers' LlamaForCausalLM for a hopperllm model spec, in eval mode on `device`."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--baseline hf needs the transformers package: pip install transformers") from None
    from hopperllm.loader.model_loader import resolve_model

    src = resolve_model(model)
    if src.kind == "dummy":
        cfg = transformers.LlamaConfig(**src.hf_config)
        torch.manual_seed(0)
        with torch.device(device):
            m = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    elif src.kind == "hf":
        m = transformers.AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype).to(device)
    else:  # gguf: transformers dequantizes it (needs the gguf package)
        import os

        m = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(src.path)), gguf_file=os.path.basename(src.path), dtype=dtype
        ).to(device)
    m.generation_config.pad_token_id = 0
    return m.eval()


def _streamer_cls():
    from transformers.generation.streamers import BaseStreamer

    class TokenTimes(BaseStreamer):
        """Timestamps of generate's streamer calls: the first is the prompt, then one per step."""

        def __init__(self, sync):
            self.sync = sync
            self.times: list[float] = []

        def put(self, value):
            self.sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return TokenTimes


def _sync_fn(model):
    if next(model.parameters()).is_cuda:
        return torch.cuda.synchronize
    return lambda: None


@torch.inference_mode()
def generate_timed(model, prompts: list[list[int]], output_len: int) -> tuple[float, float, int]:
    """One left-padded batch through `generate`: (e2e seconds, seconds to the first new token, tokens)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync = _sync_fn(model)
    streamer = _streamer_cls()(sync)
    sync()
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        do_sample=False,
        cache_implementation="static",
        streamer=streamer,
    )
    sync()
    e2e = time.perf_counter() - t0
    first = streamer.times[1] - t0 if len(streamer.times) > 1 else e2e
    return e2e, first, int((out.shape[1] - width) * out.shape[0])


def hf_throughput(
    model, prompts: list[list[int]], output_lens: list[int], max_batch_size: int, use_tqdm: bool = True
) -> tuple[float, int, int]:
    """All prompts in batches of at most `max_batch_size` (grouped by output length, in order):
    (elapsed seconds, input tokens, output tokens)."""
    from tqdm.auto import tqdm

    batches: list[tuple[list[list[int]], int]] = []
    cur: list[list[int]] = []
    cur_len = None
    for p, n in zip(prompts, output_lens, strict=True):
        if cur and (len(cur) == max_batch_size or n != cur_len):
            batches.append((cur, cur_len))
            cur = []
        cur.append(p)
        cur_len = n
    if cur:
        batches.append((cur, cur_len))
    bar = tqdm(total=len(prompts), desc="HF baseline", unit="req", disable=not use_tqdm)
    t0 = time.perf_counter()
    n_out = 0
    for batch, n in batches:
        _, _, toks = generate_timed(model, batch, n)
        n_out += toks
        bar.update(len(batch))
    bar.close()
    return time.perf_counter() - t0, sum(len(p) for p in prompts), n_out
