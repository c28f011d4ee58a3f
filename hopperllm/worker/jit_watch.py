"""Which Triton kernels compile while a region runs.

Every kernel variant a step launches should be compiled before serving starts (decode graphs are captured at
start-up; the warm-up request runs a prefill): a variant first met while serving costs a compile (~1 s with
an empty Triton disk cache) or a cache load in the middle of a step. `JitWatch` records each new
specialization the process compiles or loads (Triton's `jit_cache_hook`: a miss in the in-memory kernel
cache) between `__enter__` and `__exit__`, so benchmarks can report them. Ranks of a tensor-parallel
engine run in their own processes and are not seen here.
"""

from __future__ import annotations


class JitWatch:
    def __init__(self) -> None:
        self.compiled: list[str] = []
        self._prev = None
        self._knobs = None

    def _hook(self, *args, **kwargs):
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or getattr(getattr(fn, "jit_function", None), "__name__", None)
        self.compiled.append(str(kwargs.get("repr") or name or "triton kernel")[:300])
        return self._prev(*args, **kwargs) if self._prev is not None else None

    def __enter__(self) -> JitWatch:
        try:
            from triton import knobs
        except ImportError:  # a Triton without knobs (< 3.4): nothing is watched
            return self
        self._knobs = knobs
        self._prev = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = self._hook
        return self

    def __exit__(self, *exc) -> None:
        if self._knobs is not None:
            self._knobs.runtime.jit_cache_hook = self._prev
            self._knobs = None

    def summary(self, limit: int = 20) -> dict:
        """{"count": n, "kernels": the first `limit` specializations (name and argument types)}."""
        return {"count": len(self.compiled), "kernels": self.compiled[:limit]}
