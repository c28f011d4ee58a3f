"""Shared by the profiling scripts here: print a result dict and write it as JSON."""

from __future__ import annotations

import json


def emit(res: dict, path: str | None) -> None:
    print(json.dumps(res, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
