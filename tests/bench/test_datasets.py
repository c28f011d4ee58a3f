"""ShareGPT sampling (bench/datasets.py) against vLLM's rules, and `bench throughput --dataset-name sharegpt`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hopperllm.bench import datasets
from hopperllm.entrypoints.cli import main


def _write(tmp_path, data, name="sharegpt.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _conv(prompt: str, answer: str, *more: str) -> dict:
    turns = [prompt, answer, *more]
    return {
        "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    }


def words(texts):
    return [len(t.split()) for t in texts]


def test_load_keeps_two_turn_conversations_shuffled_by_seed(tmp_path):
    data = [_conv(f"p{i}", f"a{i}", "later turns are not used") for i in range(20)]
    data += [{"conversations": [{"value": "alone"}]}, {"id": "no conversations"}, "not a dict"]
    path = _write(tmp_path, data)
    a, b, c = (
        datasets.load_sharegpt(path, 0),
        datasets.load_sharegpt(path, 0),
        datasets.load_sharegpt(path, 1),
    )
    assert a == b and a != c  # deterministic per seed
    assert sorted(a) == sorted((f"p{i}", f"a{i}") for i in range(20))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not ShareGPT's JSON"),
        ('{"conversations": []}', "a list of conversations"),
        ('[{"conversations": [{"value": "only one"}]}]', "no conversation with two turns"),
        ('[{"conversations": [{"value": "q"}, {"from": "gpt"}]}]', "entry 0: a turn without a text"),
    ],
)
def test_load_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        datasets.load_sharegpt(str(path), 0)
    assert str(path) in str(e.value)


def test_pruning_follows_vllm():
    w = "w " * 3
    pairs = [
        ("a b c d", "a b c d"),  # 4 / 4: the smallest kept
        ("a b c", "a b c d e"),  # prompt 3: dropped
        ("a b c d e", "a b c"),  # answer 3: dropped (kept with a fixed output length)
        (w * 342, "a b c d"),  # prompt 1026: dropped
        (w * 341, "a b c d " * 256),  # 1023 + 1024 = 2047: kept
        (w * 341, "a b c d " * 257),  # 1023 + 1028: dropped
    ]
    got = datasets.sample_sharegpt(pairs, 10, words)
    assert [(r.prompt_len, r.output_len) for r in got[:2]] == [(4, 4), (1023, 1024)]
    assert len(got) == 10 and got[2] == got[0]  # fewer valid than asked: cycled
    fixed = datasets.sample_sharegpt(pairs, 3, words, output_len=16)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(4, 16), (5, 16), (1023, 16)]
    with pytest.raises(ValueError, match="fits the benchmark's limits"):
        datasets.sample_sharegpt([("a", "b")], 1, words)


def test_tokenizes_only_what_it_needs():
    pairs = [(f"a b c d {i}", "e f g h") for i in range(100)]
    calls = []

    def count(texts):
        calls.append(len(texts))
        return words(texts)

    assert len(datasets.sample_sharegpt(pairs, 3, count, batch=8)) == 3
    assert calls == [16]  # one batch of 8 conversations, prompt and answer each


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 1500)), min_size=1, max_size=40),
    num=st.integers(1, 50),
    fixed=st.one_of(st.none(), st.integers(1, 1200)),
    batch=st.integers(1, 9),
)
def test_sampled_requests_are_the_valid_ones_in_order(lens, num, fixed, batch):
    pairs = [(" ".join(["p"] * a), " ".join(["o"] * b)) for a, b in lens]
    valid = [
        (a, fixed if fixed is not None else b)
        for a, b in lens
        if datasets.is_valid_sequence(a, fixed if fixed is not None else b, check_output=fixed is None)
    ]
    if not valid:
        with pytest.raises(ValueError):
            datasets.sample_sharegpt(pairs, num, words, fixed, batch=batch)
        return
    got = datasets.sample_sharegpt(pairs, num, words, fixed, batch=batch)
    assert [(r.prompt_len, r.output_len) for r in got] == [valid[i % len(valid)] for i in range(num)]
    assert all(r.prompt_len <= 1024 and r.prompt_len + r.output_len <= 2048 for r in got)


def test_throughput_on_sharegpt(tmp_path):
    from hopperllm.bench.datasets import local_token_counter

    data = [
        _conv(f"Question {i}: what is {i} times {i}?", f"It is {i * i}, which is {i} squared.")
        for i in range(6)
    ]
    path = _write(tmp_path, data)
    out = tmp_path / "tp.json"
    base = [
        "bench",
        "throughput",
        "--model",
        "dummy:tiny",
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        path,
    ]
    assert main([*base, "--num-prompts", "8", "--output-json", str(out)]) == 0
    rec = json.loads(out.read_text())
    count = local_token_counter("dummy:tiny")
    want = datasets.sample_sharegpt(datasets.load_sharegpt(path, 0), 8, count)
    r = rec["results"]
    assert r["num_requests"] == 8
    assert r["total_input_tokens"] == sum(w.prompt_len for w in want)
    assert r["total_output_tokens"] == sum(w.output_len for w in want)  # ignore_eos: each answer's length
    assert rec["args"]["dataset_name"] == "sharegpt"

    assert main([*base, "--num-prompts", "3", "--output-len", "2", "--output-json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["total_output_tokens"] == 6  # --output-len overrides


def test_throughput_dataset_flag_errors(tmp_path, capsys):
    path = _write(tmp_path, [_conv("a b c d", "e f g h")])
    base = ["bench", "throughput", "--model", "dummy:tiny", "--num-prompts", "1"]
    assert main([*base, "--dataset-name", "sharegpt"]) == 2
    assert "needs --dataset-path" in capsys.readouterr().err
    assert main([*base, "--dataset-name", "sharegpt", "--dataset-path", path, "--input-len", "8"]) == 2
    assert "--input-len and --prefix-len are for random prompts" in capsys.readouterr().err
    assert main([*base, "--dataset-name", "random", "--dataset-path", path]) == 2
    assert "not random" in capsys.readouterr().err
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"prompt": "hello"}\n{"prompt": "again"}\n')
    assert main([*base, "--dataset-name", "sharegpt", "--dataset-path", str(jsonl)]) == 2
    assert "--dataset-name jsonl" in capsys.readouterr().err


def test_throughput_prefix_len_shares_a_prefix(tmp_path):
    out = tmp_path / "tp.json"
    argv = ["bench", "throughput", "--model", "dummy:tiny", "--num-prompts", "4", "--input-len", "8",
            "--output-len", "2", "--prefix-len", "32", "--output-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())["results"]
    assert r["total_input_tokens"] == 4 * 40 and r["total_output_tokens"] == 8
    # all four admitted in one step: only the warm-up request's first 16-token block was cached before them
    assert r["prefix_cache_hit_rate"] == pytest.approx(4 * 16 / 160)
    # one at a time: the first prompt computes the prefix's two blocks, the next three find them cached
    assert main([*argv, "--max-num-seqs", "1"]) == 0
    assert json.loads(out.read_text())["results"]["prefix_cache_hit_rate"] == pytest.approx(
        (16 + 3 * 32) / 160
    )
    assert main([*argv, "--no-enable-prefix-caching"]) == 0
    assert json.loads(out.read_text())["results"]["prefix_cache_hit_rate"] == 0.0


def test_throughput_prefix_requests():
    import argparse

    import numpy as np

    from hopperllm.bench import throughput

    class Engine:  # what make_requests reads of an engine
        class config:  # noqa: N801
            class model_config:  # noqa: N801
                vocab_size = 1000

        class tokenizer:  # noqa: N801
            vocab_size = 1000

    args = argparse.Namespace(
        dataset=None, dataset_name=None, input_len=8, output_len=3, prefix_len=16, num_prompts=5, seed=0
    )
    reqs = throughput.make_requests(args, Engine, np.random.default_rng(0))
    ids = [p["prompt_token_ids"] for p, _ in reqs]
    assert all(len(x) == 24 for x in ids) and len({tuple(x[:16]) for x in ids}) == 1
    assert len({tuple(x[16:]) for x in ids}) == 5 and {n for _, n in reqs} == {3}
