"""`bin/render-config dev --check` wall time against the interpreter's own start-up, in one run.

    .venv/bin/python bench/render_bench.py [--runs 15]

Target (foundation issue): --check under 0.5 s wall. Writes bench/results/render.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    python = sys.executable
    cases = {
        "python -c pass": [python, "-c", "pass"],
        "bin/render-config dev --check": [str(ROOT / "bin" / "render-config"), "dev", "--check", "-q"],
        "bin/render-config dev (write, unchanged)": [str(ROOT / "bin" / "render-config"), "dev", "-q", "--no-mkdirs"],
    }
    results = {}
    # interleave the cases so background load hits them alike
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, argv in cases.items():
            samples[name].extend(wall(argv, 1))
    base = statistics.median(samples["python -c pass"])
    print(f"| case | median | p90 | ratio to python -c pass |\n| --- | --- | --- | --- |")
    for name, times in samples.items():
        times.sort()
        median, p90 = statistics.median(times), times[int(0.9 * (len(times) - 1))]
        results[name] = {"median_s": median, "p90_s": p90, "ratio": median / base, "runs": len(times)}
        print(f"| {name} | {median * 1000:.0f} ms | {p90 * 1000:.0f} ms | {median / base:.1f}x |")
    check = results["bin/render-config dev --check"]["median_s"]
    print(f"\ntarget --check < 0.5 s: {'met' if check < 0.5 else 'MISSED'} ({check:.3f} s)")
    out = ROOT / "bench" / "results" / "render.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
