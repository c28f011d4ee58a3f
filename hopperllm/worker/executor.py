"""Executors run the model for the engine behind one interface: one process (this file's
UniprocExecutor), or one worker process per GPU for tensor parallelism (multiproc_executor.py)."""

from __future__ import annotations

from hopperllm.config import EngineConfig
from hopperllm.engine.scheduler import SchedulerOutput
from hopperllm.loader.model_loader import ModelSource
from hopperllm.worker.model_runner import ModelRunner, ModelRunnerOutput


class Executor:
    num_kv_blocks: int
    supports_async: bool = False  # launch()/collect() overlap host work with the device

    def execute_model(self, sched: SchedulerOutput, eos_ids=()) -> ModelRunnerOutput:
        raise NotImplementedError

    def launch(self, sched: SchedulerOutput, eos_ids=(), prev=None):
        """Start a step; the default runs it to completion (executors without overlap)."""
        return self.execute_model(sched, eos_ids)

    def collect(self, launch) -> ModelRunnerOutput:
        return launch

    def release(self, seq_ids) -> None:
        """Forget per-sequence state (RNGs) of finished sequences."""

    def propose_drafts(self, sched: SchedulerOutput) -> list[list[int]]:
        """Speculative decoding with a draft model: each scheduled DraftView's drafts (Worker.propose_drafts)."""
        raise NotImplementedError

    def logits_for_tokens(self, token_ids: list[int]):
        """Full-sequence logits [T, V] (float32) for one prompt, through the paged path (tests, eval)."""
        raise NotImplementedError

    def collective_rpc(self, fn, *args, reply_all: bool = False, **kwargs):
        """Call a Worker method (by name) or `fn(worker, *args, **kwargs)` on every rank; rank 0's value,
        or a list of every rank's with reply_all."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, src: ModelSource, show_progress: bool = True):
        from hopperllm.worker.worker import StepEncoder, Worker

        # a world of one: the same start-up as each tensor-parallel rank (fit check, runner, KV cache, graphs)
        self.worker = worker = Worker(config, src, show_progress=show_progress)
        self.runner: ModelRunner = worker.runner
        self.num_kv_blocks = worker.num_kv_blocks
        self._draft_encoder = StepEncoder()  # the draft model's view of the drafting sequences

    supports_async = True

    def execute_model(self, sched: SchedulerOutput, eos_ids=()) -> ModelRunnerOutput:
        return self.runner.execute_model(sched, eos_ids)

    def launch(self, sched: SchedulerOutput, eos_ids=(), prev=None):
        return self.runner.launch(sched, eos_ids, prev)

    def collect(self, launch) -> ModelRunnerOutput:
        return self.runner.collect(launch)

    def release(self, seq_ids) -> None:
        self._draft_encoder.forget(seq_ids)
        self.worker.release(seq_ids)
        self.worker.release_drafts(seq_ids)

    def propose_drafts(self, sched: SchedulerOutput) -> list[list[int]]:
        return self.worker.propose_drafts(self._draft_encoder.encode(sched))

    def logits_for_tokens(self, token_ids: list[int]):
        return self.runner.logits_for_tokens(token_ids)

    def collective_rpc(self, fn, *args, reply_all: bool = False, **kwargs):
        value = self.worker.call(fn, *args, **kwargs)
        return [value] if reply_all else value


def make_executor(config: EngineConfig, src: ModelSource, show_progress: bool = True) -> Executor:
    if config.parallel_config.tensor_parallel_size > 1:
        from hopperllm.worker.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor(config, src, show_progress=show_progress)
    return UniprocExecutor(config, src, show_progress=show_progress)
