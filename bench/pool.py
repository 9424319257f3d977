"""A pool of ten million unlabelled images, through the CLI: how the driver's cost grows with the pool.

    python bench/pool.py [--sizes 1000000,10000000] [--keep DIR]

For each size, a synthetic manifest in `pool build`'s schema (no image is read: a human-mode run that has no
labels yet waits for the initial set's labels before it trains or scores) and a human-mode job. Each
command runs in a fresh process under `/usr/bin/time -v`: `run` up to the first labels wait (freezing the
pool, drawing the initial set), `labels export`, `status` and `report`. Printed: wall seconds and peak RSS of
each, side by side per pool size, and the ratio between the sizes. Goals (issue 11): `run` and `labels
export` < 120 s and < 3 GB peak RSS at 10 M rows on 2 cores; `status` / `report` in seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "almdn-ray")
SHARD = 1_000_000


def write_manifest(folder: Path, rows: int) -> None:
    from almdn_ray.data.manifest import write_manifest_table

    tables = []
    for start in range(0, rows, SHARD):
        n = min(SHARD, rows - start)
        numbers = pc.cast(pa.array(range(start, start + n), pa.int64()), pa.string())
        padded = pc.utf8_lpad(numbers, 9, "0")
        ids = pc.binary_join_element_wise("cam-a/", padded, "")
        tables.append(
            pa.table(
                {
                    "image_id": ids,
                    "uri": pc.binary_join_element_wise("s3://team-bucket/raw/", ids, ".jpg", ""),
                    "width": pa.array([1280] * n, pa.int32()),
                    "height": pa.array([720] * n, pa.int32()),
                }
            )
        )
    write_manifest_table(pa.concat_tables(tables), str(folder), rows_per_shard=SHARD)


def timed(*args: str) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (GB) and exit status of one CLI command in a fresh process."""
    done = subprocess.run(["/usr/bin/time", "-v", CLI, *args], capture_output=True, text=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    tail = (done.stdout + done.stderr).strip().splitlines()
    return hours * 3600 + minutes * 60 + seconds, rss / 2**20, done.returncode, tail[-1] if tail else ""


def one_size(root: Path, rows: int) -> dict[str, tuple[float, float, int, str]]:
    import yaml

    manifest, run = root / f"manifest-{rows}", root / f"run-{rows}"
    write_manifest(manifest, rows)
    test = root / "test.json"
    test.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "t.jpg", "width": 64, "height": 64}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}],
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(("car", "person", "bike"))],
            }
        )
    )
    job = {
        "storage": {"uri": str(run)},
        "dataset": {"train": str(manifest), "test": str(test), "classes": ["car", "person", "bike"]},
        "acquisition": {"initial_labeled": 1000, "budget": 1000, "cycles": 4},
        "labels": {"mode": "human"},
    }
    (root / f"job-{rows}.yaml").write_text(yaml.safe_dump(job))
    return {
        "run (to the first labels wait)": timed("run", str(root / f"job-{rows}.yaml")),
        "labels export": timed("labels", "export", str(run)),
        "status": timed("status", str(run)),
        "report": timed("report", str(run)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--keep", default=None, help="Folder to work in and keep (default: a temporary one).")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="almdn-pool-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = {rows: one_size(root, rows) for rows in sizes}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("Human-mode pool without labels, through the CLI, each command in a fresh process (/usr/bin/time -v).")
    print("")
    header = "| command | " + " | ".join(f"{r:,} rows: s, peak RSS GB" for r in sizes)
    header += " | ratio (largest / smallest): s, RSS |" if len(sizes) > 1 else " |"
    print(header)
    print("|---" * (len(sizes) + 1 + (len(sizes) > 1)) + "|")
    failed = False
    for command in results[sizes[0]]:
        cells = []
        for rows in sizes:
            wall, rss, code, last = results[rows][command]
            cells.append(f"{wall:.1f} s, {rss:.2f} GB" + ("" if code == 0 else f" (exit {code}: {last})"))
            failed |= code != 0
        line = f"| {command} | " + " | ".join(cells)
        if len(sizes) > 1:
            (w0, r0, *_), (w1, r1, *_) = results[sizes[0]][command], results[sizes[-1]][command]
            line += f" | {w1 / w0:.1f}x, {r1 / r0:.1f}x"
        print(line + " |")
    big = results[sizes[-1]]
    goals = [
        all(big[c][0] < 120 and big[c][1] < 3.0 for c in ("run (to the first labels wait)", "labels export")),
        all(big[c][0] < 10 for c in ("status", "report")),
    ]
    print("")
    print(
        f"goals at {sizes[-1]:,} rows: run and labels export < 120 s and < 3 GB: "
        f"{'met' if goals[0] else 'NOT met'}; status and report < 10 s: {'met' if goals[1] else 'NOT met'}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
