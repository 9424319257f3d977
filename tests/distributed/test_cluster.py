import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scoring_on_a_three_node_cluster_with_a_node_removed_and_logical_gpus(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.distributed.cluster_scoring", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 4
    # Actors spread over the nodes; every row exactly once.
    assert report["spread_rows"] == report["spread_ids"] == 160
    assert report["spread_nodes"] >= 2
    # A node removed while scoring ran: still every row exactly once.
    assert report["removed_while_running"]
    assert report["removed_rows"] == report["removed_ids"] == 160
    # Two logical GPUs: one GPU per actor, one actor per GPU, all on the GPU node.
    assert report["gpu_plan"][0] == 2
    assert report["gpu_rows"] == 160 and report["gpu_workers"] == 2 and report["gpu_node"]
