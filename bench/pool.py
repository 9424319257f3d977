"""A pool of ten million unlabelled images, through the CLI: how the driver's cost grows with the pool.

    python bench/pool.py [--sizes 1000000,10000000] [--variants sealed,listing] [--keep DIR]

For each size, two ways in, side by side:
- sealed: a synthetic manifest in `pool build`'s schema, sizes included (what `pool build` of a COCO file or an
  image folder writes);
- listing: a team's Parquet listing as a data lake exports it (Spark part files; columns object_key,
  size_bytes, last_modified; no image sizes), made a manifest by `pool build LISTING OUT --uri-column
  object_key --uri-prefix ...`. Its sizes stay empty, so `labels export` reads the headers of the images it
  exports: the bench writes those images (small JPEGs) once `run` has drawn them.
Then a human-mode job (no image is read before labels exist: a run without labels waits for the initial set's
labels before it trains or scores). Each command runs in a fresh process under `/usr/bin/time -v`: `pool
build` (listing only), `run` up to the first labels wait (freezing the pool, drawing the initial set), `labels
export`, `status` and `report`. Printed: wall seconds and peak RSS of each, side by side, and the ratio
between the sizes. Goals: `run` and `labels export` < 120 s and < 3 GB peak RSS at 10 M rows on 2 cores
(issue 11), `pool build` of a 10 M-row listing < 60 s and < 3 GB (issue 24); `status` / `report` in seconds.
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


def write_listing(folder: Path, rows: int) -> None:
    """A data lake's Parquet export of object keys: part files, _SUCCESS, no sizes, columns of its own."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, SHARD)):
        n = min(SHARD, rows - start)
        numbers = pc.utf8_lpad(pc.cast(pa.array(range(start, start + n), pa.int64()), pa.string()), 9, "0")
        keys = pc.binary_join_element_wise("raw/cam-a/", numbers, ".jpg", "")
        table = pa.table(
            {
                "object_key": keys,
                "size_bytes": pa.array(range(start, start + n), pa.int64()),
                "last_modified": pa.array([1_760_000_000_000] * n, pa.timestamp("ms")),
            }
        )
        pq.write_table(table, folder / f"part-{part:05d}-7c1e.c000.snappy.parquet")
    (folder / "_SUCCESS").write_text("")


def write_awaited_images(run: Path) -> int:
    """Small JPEGs at the URIs of the images the run waits labels for (a listing's pool has no sizes: export
    reads them from these)."""
    import numpy as np
    from PIL import Image

    from almdn_ray.cycle import RunLayout
    from almdn_ray.data.manifest import read_manifest
    from almdn_ray.labels import awaited_ids

    ids = awaited_ids(str(run))
    table = read_manifest(RunLayout(str(run)).pool, ids=ids)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 128, 3), dtype=np.uint8))
    for uri in table.column("uri").to_pylist():
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        image.save(uri, quality=80)
    return table.num_rows


def timed(*args: str) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (GB) and exit status of one CLI command in a fresh process."""
    done = subprocess.run(["/usr/bin/time", "-v", CLI, *args], capture_output=True, text=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    tail = (done.stdout + done.stderr).strip().splitlines()
    return hours * 3600 + minutes * 60 + seconds, rss / 2**20, done.returncode, tail[-1] if tail else ""


def one_size(root: Path, rows: int, variant: str) -> dict[str, tuple[float, float, int, str]]:
    import yaml

    manifest, run = root / f"manifest-{variant}-{rows}", root / f"run-{variant}-{rows}"
    results = {}
    if variant == "sealed":
        write_manifest(manifest, rows)
        results["pool build (listing -> manifest)"] = (0.0, 0.0, 0, "")
    else:
        listing, bucket = root / f"listing-{rows}", root / "bucket"
        write_listing(listing, rows)
        results["pool build (listing -> manifest)"] = timed(
            "pool", "build", str(listing), str(manifest), "--uri-column", "object_key", "--uri-prefix", f"{bucket}/"
        )
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
    job_file = root / f"job-{variant}-{rows}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    results["run (to the first labels wait)"] = timed("run", str(job_file))
    if variant == "listing":
        write_awaited_images(run)
    results["labels export"] = timed("labels", "export", str(run))
    results["status"] = timed("status", str(run))
    results["report"] = timed("report", str(run))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--variants", default="sealed,listing")
    parser.add_argument("--keep", default=None, help="Folder to work in and keep (default: a temporary one).")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="almdn-pool-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in args.variants.split(",")]
    columns = [(rows, v) for rows in sizes for v in variants]
    try:
        results = {(rows, v): one_size(root, rows, v) for rows, v in columns}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("Human-mode pool without labels, through the CLI, each command in a fresh process (/usr/bin/time -v).")
    print("")
    header = "| command | " + " | ".join(f"{r:,} rows, {v}: s, peak RSS GB" for r, v in columns)
    print(header + " |")
    print("|---" * (len(columns) + 1) + "|")
    failed = False
    for command in results[columns[0]]:
        cells = []
        for key in columns:
            wall, rss, code, last = results[key][command]
            cells.append(
                "-"
                if (wall, rss) == (0.0, 0.0)
                else f"{wall:.1f} s, {rss:.2f} GB" + (f" (exit {code}: {last})" * (code != 0))
            )
            failed |= code != 0
        print(f"| {command} | " + " | ".join(cells) + " |")
    print("")
    for v in variants:
        big = results[(sizes[-1], v)]
        met = all(big[c][0] < 120 and big[c][1] < 3.0 for c in ("run (to the first labels wait)", "labels export"))
        quick = all(big[c][0] < 10 for c in ("status", "report"))
        line = (
            f"goals at {sizes[-1]:,} rows, {v}: run and labels export < 120 s and < 3 GB: "
            f"{'met' if met else 'NOT met'}; status and report < 10 s: {'met' if quick else 'NOT met'}"
        )
        if v == "listing":
            wall, rss, *_ = big["pool build (listing -> manifest)"]
            line += f"; pool build < 60 s and < 3 GB: {'met' if wall < 60 and rss < 3.0 else 'NOT met'}"
        print(line)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
