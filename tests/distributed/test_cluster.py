import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import RAY_TEST_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_training_scoring_and_eval_on_clusters_shaped_like_the_cluster_files(tmp_path):
    env = {**os.environ, **RAY_TEST_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.distributed.cluster_shapes", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print("seconds per phase:", report["phase_s"])  # shown with -s or -rP
    assert report["head_cpus"] == 0  # as both files start the head
    # CPU-only shape: 2 training workers of 8 CPUs each placed on the two 8-CPU nodes, trained in step.
    assert report["train_iteration"] == 4 and report["train_weight_spread"] == 0 and report["train_model"]
    # Scoring spreads over both nodes, never the head; a node removed mid-run loses no row and repeats none.
    assert report["spread_ids"] and report["spread_nodes"] == 2 and not report["spread_on_head"]
    assert report["removed_while_running"]
    assert report["removed_rows"] == report["removed_ids"] == 48
    # GPU shape: one model actor per GPU node, decode tasks ahead of them, the same rows as one process.
    assert report["gpu_workers"] == 4 and report["gpu_on_workers_only"]
    assert report["gpu_equals_reference"], report["gpu_mismatches"]
    assert report["gpu_embedding_dims"] == 16 and report["gpu_embedding_gap"] < 2e-3
    assert report["eval_on_worker"] and report["eval_images"] == 8
    # 5 GPU workers on 4 GPU nodes: refused within a minute, naming the request and every node.
    assert report["impossible_s"] < 60, report["impossible_s"]
    assert "cannot place training workers: 5 x {1 CPU, 1 GPU}" in report["impossible"], report["impossible"]
    assert report["impossible"].count("8 CPU, 1 GPU;") + report["impossible"].count("8 CPU, 1 GPU)") == 4
    assert report["impossible"].count("worker ") == 4 and "head " in report["impossible"]
