"""Print the environment assignment of the fastest A/B variant (lowest mean TPOT) if it beats the baseline
variant by more than --min-gain-ms, else nothing: lets one device call run a long benchmark (the budget)
only when an A/B found a gain. Usage: python3 benchmarks/pick_ab.py --baseline FILE CANDIDATE_FILE..."""

from __future__ import annotations

import argparse
import json
import sys


def tpot(path: str) -> float:
    with open(path) as f:
        return json.load(f)["results"]["tpot_ms"]["mean"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", required=True)
    p.add_argument("--min-gain-ms", type=float, default=0.1)
    p.add_argument("candidates", nargs="+")
    a = p.parse_args()
    base = tpot(a.baseline)
    best = min(a.candidates, key=tpot)
    gain = base - tpot(best)
    print(f"baseline {base:.3f} ms, best {tpot(best):.3f} ms ({best}), gain {gain:.3f} ms", file=sys.stderr)
    if gain > a.min_gain_ms:
        with open(best) as f:
            env = json.load(f).get("env", {})
        print(" ".join(f"{k}={v}" for k, v in env.items()) or "HOPPERLLM_AB=default")


if __name__ == "__main__":
    main()
