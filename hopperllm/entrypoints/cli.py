"""The `hopperllm` command: generate, serve, bench, quantize, eval.

Errors a user can cause print one line (`error: ...`) and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_PROMPT = "What is the capital of France?"


class CLIError(Exception):
    """A user error: one line on stderr, exit code 2."""


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument(
        "--seed-sampling", dest="sampling_seed", type=int, default=None, help="per-request sampling seed"
    )
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args):
    from hopperllm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


# -- generate -------------------------------------------------------------------------------
def _generate_parser(sub) -> None:
    from hopperllm.engine.arg_utils import EngineArgs

    p = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    p.add_argument(
        "prompt", nargs="?", default=None, help=f"the prompt ('-' reads stdin; default: {DEFAULT_PROMPT!r})"
    )
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument(
        "--input",
        default=None,
        help="JSONL of prompts ({'prompt': ...} or {'messages': [...]}) to run as one batch",
    )
    p.add_argument("--output", default=None, help="JSONL to write the batch's results to (with --input)")
    _add_sampling_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_generate)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise CLIError(f"input file {path!r} does not exist")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if isinstance(row, str):
                row = {"prompt": row}
            if not isinstance(row, dict) or not ({"prompt", "messages", "prompt_token_ids"} & row.keys()):
                raise CLIError(f"{path}:{i}: each line needs 'prompt', 'messages' or 'prompt_token_ids'")
            rows.append(row)
    if not rows:
        raise CLIError(f"{path} holds no prompts")
    return rows


def cmd_generate(args) -> int:
    from hopperllm.engine.arg_utils import EngineArgs
    from hopperllm.engine.llm_engine import LLMEngine

    params = _sampling_params(args)
    if args.output and not args.input:
        raise CLIError("--output goes with --input")
    rows = _read_jsonl(args.input) if args.input else None
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    use_chat = args.chat or (args.prompt is None and rows is None)
    prompt_text = args.prompt if args.prompt is not None else DEFAULT_PROMPT

    import torch

    torch.manual_seed(args.seed)
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args), show_progress=sys.stderr.isatty())
    tok = engine.tokenizer

    def to_prompt(text=None, messages=None, token_ids=None, chat=False):
        if token_ids is not None:
            return {"prompt_token_ids": token_ids}
        if messages is not None or chat:
            msgs = messages or ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": text}
            ]
            if tok.chat_template is None:
                raise CLIError("this model has no chat template: drop --chat")
            return {"prompt": text, "prompt_token_ids": tok.encode_chat(msgs)}
        return text

    if rows is not None:
        return _generate_batch(engine, rows, params, to_prompt, args)

    t0 = time.perf_counter()
    engine.add_request("cli", to_prompt(prompt_text, chat=use_chat), params)
    first = None
    final = None
    out_stream = sys.stdout
    while engine.has_unfinished_requests():
        for ro in engine.step():
            c = ro.outputs[0]
            if c.delta_text:
                out_stream.write(c.delta_text)
                out_stream.flush()
            if first is None and c.token_ids:
                first = time.perf_counter()
            if ro.finished:
                final = ro
    elapsed = time.perf_counter() - t0
    out_stream.write("\n")
    n = len(final.outputs[0].token_ids) if final else 0
    decode_s = elapsed - ((first or t0) - t0)
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    print(
        f"[{n} tokens in {elapsed:.2f} s: {rate:.1f} tokens/s after the first; time to first token "
        f"{((first or t0) - t0) * 1000:.0f} ms; finish reason: {final.outputs[0].finish_reason if final else '-'}]",
        file=sys.stderr,
    )
    return 0


def _generate_batch(engine, rows, params, to_prompt, args) -> int:
    from tqdm.auto import tqdm

    ids = []
    for i, row in enumerate(rows):
        rid = str(row.get("id", i))
        prompt = to_prompt(
            row.get("prompt"), row.get("messages"), row.get("prompt_token_ids"), chat=args.chat
        )
        engine.add_request(rid, prompt, params)
        ids.append(rid)
    results = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
    n_in = n_out = 0
    while engine.has_unfinished_requests():
        for ro in engine.step():
            if ro.finished:
                results[ro.request_id] = ro
                n_in += len(ro.prompt_token_ids)
                n_out += len(ro.outputs[0].token_ids)
                bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    out_f = open(args.output, "w") if args.output else None
    try:
        for rid in ids:
            ro = results[rid]
            c = ro.outputs[0]
            rec = {
                "id": rid,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "num_prompt_tokens": len(ro.prompt_token_ids),
            }
            if out_f:
                out_f.write(json.dumps(rec) + "\n")
            else:
                print(json.dumps(rec))
    finally:
        if out_f:
            out_f.close()
    print(
        f"[{len(ids)} requests in {elapsed:.2f} s: {len(ids) / elapsed:.2f} req/s, {n_in / elapsed:.0f} input "
        f"tok/s, {n_out / elapsed:.0f} output tok/s]",
        file=sys.stderr,
    )
    return 0


# -- main -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hopperllm", description="LLM inference for NVIDIA Hopper GPUs")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    for mod in ("serve", "bench", "quantize", "eval"):
        try:
            m = __import__(f"hopperllm.entrypoints.cli_{mod}", fromlist=["add_parser"])
        except ImportError as e:
            if f"cli_{mod}" not in str(e):
                raise
            continue
        m.add_parser(sub)
    return parser


def _version() -> str:
    from hopperllm import __version__

    return f"hopperllm {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (CLIError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
