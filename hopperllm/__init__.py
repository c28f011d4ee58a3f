"""hopperllm: an LLM inference engine for NVIDIA Hopper GPUs."""

__version__ = "0.1.0"

from hopperllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from hopperllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams  # noqa: E402


def __getattr__(name):  # LLM imports the whole engine: load it on first use
    if name == "LLM":
        from hopperllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutputKind",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "__version__",
]
