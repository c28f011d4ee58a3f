"""The offline `LLM` API (vLLM's names): `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import copy
import time
from typing import Any

from tqdm.auto import tqdm

from hopperllm.engine.arg_utils import EngineArgs
from hopperllm.engine.beam_search import BeamSearchInstance, BeamSearchOutput, BeamSearchParams
from hopperllm.engine.llm_engine import LLMEngine, PromptType
from hopperllm.outputs import RequestOutput
from hopperllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        max_num_seqs: int = 512,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        cuda_graph_sizes: list[int] | None = None,
        seed: int = 0,
        device: str = "auto",
        enable_chunked_prefill: bool = True,
        show_progress: bool = True,
        generation_config: str = "auto",
        speculative_config: dict | str | None = None,
        max_logprobs: int = 20,
        scheduling_policy: str = "fcfs",
    ):
        import torch

        torch.manual_seed(seed)
        args = EngineArgs(
            model=model,
            dtype=dtype,
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill,
            num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            cuda_graph_sizes=cuda_graph_sizes,
            seed=seed,
            device=device,
            generation_config=generation_config,
            speculative_config=speculative_config,
            max_logprobs=max_logprobs,
            scheduling_policy=scheduling_policy,
        )
        self.engine = LLMEngine.from_engine_args(args, show_progress=show_progress)
        self._next_id = 0
        self.last_summary: dict[str, float] = {}

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine (`LLM.engine` here)."""
        return self.engine

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix (benchmarks of cold prompts); False, doing nothing, while
        requests are unfinished."""
        return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the model's generation_config.json defaults (temperature, top_p, top_k,
        min_p, repetition_penalty, max_new_tokens as max_tokens) unless --generation-config vllm."""
        return SamplingParams(**self.engine.default_sampling)

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt as one continuous batch; outputs come back in prompt order. `priority` (one a
        prompt, lower first) needs the engine's scheduling_policy="priority", as vLLM's."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # one prompt (text, dict, or a list of token ids)
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(priorities)} priorities")
        # only finished outputs are returned: the engine builds none before (vLLM's LLM does the same)
        final = {}
        for p in params:
            if id(p) not in final and isinstance(p, SamplingParams):
                final[id(p)] = copy.copy(p)
                final[id(p)].output_kind = RequestOutputKind.FINAL_ONLY
        params = [final.get(id(p), p) for p in params]
        ids = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities, strict=True):
                rid = f"llm-{self._next_id}"
                self._next_id += 1
                self.engine.add_request(rid, prompt, p, priority=prio)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)  # nothing half-added stays behind
            raise
        return self._run(ids, use_tqdm)

    def beam_search(
        self, prompts: PromptType | list[PromptType], params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: per prompt the beam_width best beams (hopperllm.engine.beam_search);
        each beam's `tokens` and `text` hold the prompt and the generated tokens, as vLLM's do."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        eng = self.engine
        instances = []
        for prompt in prompts:
            _, ids = eng.tokenize_prompt(prompt)
            eng.validate_prompt(ids, params.step_params())
            instances.append(BeamSearchInstance(ids, params, eng.eos_token_ids, eng.max_model_len))
        step = params.step_params()
        for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
            live = [(inst, beam) for inst in instances for beam in inst.live]
            if not live:
                break
            outs = self.generate([{"prompt_token_ids": b.tokens} for _, b in live], step, use_tqdm=False)
            for inst in instances:
                n = len(inst.live)
                mine, outs = outs[:n], outs[n:]
                inst.advance([o.outputs[0].logprobs[0] if o.outputs[0].logprobs else None for o in mine])
        results = []
        for inst in instances:
            best = inst.best()
            for b in best:
                b.text = eng.tokenizer.decode(b.tokens)
            results.append(BeamSearchOutput(best))
        return results

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation or a list of them; `chat_template` replaces the tokenizer's;
        `tools` (OpenAI's function definitions) and `chat_template_kwargs` reach the template;
        `continue_final_message` (with add_generation_prompt=False) lets the model continue the last message."""
        kwargs = dict(chat_template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        if tools is not None:
            kwargs["tools"] = tools
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [
            {
                "prompt": None,
                "prompt_token_ids": tok.encode_chat(
                    c, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
                ),
            }
            for c in convs
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm or len(ids) < 2)
        t0 = time.perf_counter()
        n_in = n_out = 0
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        n_in += len(out.prompt_token_ids)
                        n_out += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix_str(f"in {n_in / elapsed:.0f} tok/s, out {n_out / elapsed:.0f} tok/s")
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        self.last_summary = {
            "num_requests": len(ids),
            "elapsed_s": elapsed,
            "requests_per_s": len(ids) / elapsed if elapsed else 0.0,
            "input_tokens_per_s": n_in / elapsed if elapsed else 0.0,
            "output_tokens_per_s": n_out / elapsed if elapsed else 0.0,
        }
        if use_tqdm and len(ids) > 1:
            s = self.last_summary
            print(
                f"{len(ids)} requests in {elapsed:.2f} s: {s['requests_per_s']:.2f} req/s, "
                f"{s['input_tokens_per_s']:.0f} input tok/s, {s['output_tokens_per_s']:.0f} output tok/s"
            )
        return [done[i] for i in ids]
