"""Run every bench script and write one report with the numbers and the machine they came from.

    python bench/run_all.py [--out bench/results/REPORT.md]

Each script prints ratios measured side by side in one run; this collects their output under a header
naming the CPU model, cores, memory, torch and Ray versions, and the GPU if there is one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ("overhead.py", "scoring.py", "train.py", "strategy_cost.py", "pool.py", "anchors.py")
HERE = Path(__file__).resolve().parent


def machine() -> list[str]:
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        memory = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- CPU: {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB memory",
        f"- GPU: {gpu}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results" / "REPORT.md"))
    args = parser.parse_args()
    lines = ["# almdn-ray benchmarks", "", *machine(), ""]
    for script in SCRIPTS:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
        output = [line for line in done.stdout.splitlines() if line.strip()]
        lines += [f"## {script} ({time.perf_counter() - start:.0f} s, exit {done.returncode})", "", *output, ""]
        if done.returncode != 0:
            lines += ["```", *done.stderr.splitlines()[-20:], "```", ""]
        print(f"{script}: exit {done.returncode}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
