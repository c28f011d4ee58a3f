"""Which decode batch sizes get CUDA graphs: the default list, --cuda-graph-sizes, and bad values."""

import argparse

import pytest

from hopperllm.engine.arg_utils import EngineArgs
from hopperllm.worker.cuda_graphs import DEFAULT_CAPTURE_SIZES, capture_sizes


def test_default_sizes_stop_at_max_num_seqs():
    assert capture_sizes(8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert capture_sizes(20) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20]
    assert capture_sizes(512)[-1] == 512
    assert capture_sizes(512) == sorted(DEFAULT_CAPTURE_SIZES)
    assert capture_sizes(0) == [1]


def test_given_sizes_are_sorted_deduplicated_and_capped():
    assert capture_sizes(8, (8, 6, 1, 6, 2, 32)) == [1, 2, 6, 8]
    assert capture_sizes(3, (4, 8)) == [4]  # none that small: the smallest, so batch 1-3 still replays one


def test_cli_flag_reaches_the_engine_config():
    p = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(
        p.parse_args(["--model", "dummy:tiny", "--cuda-graph-sizes", "1", "6", "8"])
    )
    assert args.cuda_graph_sizes == [1, 6, 8]
    cfg, _ = args.create_engine_config()
    assert cfg.cuda_graph_sizes == (1, 6, 8)
    assert EngineArgs(model="dummy:tiny").create_engine_config()[0].cuda_graph_sizes is None


@pytest.mark.parametrize("sizes", [[0], [4, -1]])
def test_non_positive_sizes_are_refused(sizes):
    with pytest.raises(ValueError, match="cuda_graph_sizes must be positive"):
        EngineArgs(model="dummy:tiny", cuda_graph_sizes=sizes).create_engine_config()
