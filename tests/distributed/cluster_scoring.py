"""Run by test_cluster.py in its own process: a 4-node Ray cluster on this machine (its own ports), scoring
spread over nodes, a node removed mid-run, and logical GPUs on a CPU node. Prints one JSON line."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from almdn_ray.data.manifest import rows_from_dataset, write_manifest
from almdn_ray.data.records import Dataset
from almdn_ray.distributed.score_pool import plan_actors, score_pool
from almdn_ray.model import ModelSpec, PostprocessConfig
from almdn_ray.scoring import read_scores
from tests.distributed.helpers import write_scenes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(**resources):
    return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(), **resources}


def main(workdir: Path) -> None:
    records = write_scenes(workdir / "images", 160, seed=9)
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=256)
    torch.save(spec.build().state_dict(), workdir / "model.pt")
    write_manifest(rows_from_dataset(Dataset(records, ("a", "b"))), str(workdir / "pool"), rows_per_shard=40)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "gcs_server_port": free_port(), **node_args()},
    )
    workers = [cluster.add_node(num_cpus=1, **node_args()) for _ in range(2)]
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2, **node_args())
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = PostprocessConfig(min_confidence=0.2)
    common = dict(
        manifest_uri=str(workdir / "pool"),
        weights_uri=str(workdir / "model.pt"),
        spec=spec,
        postprocess=config,
        batch_size=2,
        rows_per_block=4,
    )
    report = {"nodes": len(ray.nodes())}

    score_pool(out_uri=str(workdir / "spread"), num_actors=3, **common)
    spread = read_scores(str(workdir / "spread"))
    report["spread_rows"] = spread.num_rows
    report["spread_ids"] = len(set(spread.column("image_id").to_pylist()))
    report["spread_nodes"] = len({w.split(":")[0] for w in spread.column("worker").to_pylist()})

    out = workdir / "removed"
    run = threading.Thread(target=lambda: score_pool(out_uri=str(out), num_actors=3, **common))
    run.start()
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.parquet")):
        time.sleep(0.02)
    report["removed_while_running"] = run.is_alive()
    cluster.remove_node(workers[0])
    run.join(timeout=300)
    removed = read_scores(str(out))
    report["removed_rows"] = removed.num_rows
    report["removed_ids"] = len(set(removed.column("image_id").to_pylist()))

    report["gpu_plan"] = list(plan_actors(use_gpu=True, num_actors=None))
    score_pool(out_uri=str(workdir / "gpu"), use_gpu=True, **common)
    gpu = read_scores(str(workdir / "gpu"))
    report["gpu_rows"] = gpu.num_rows
    report["gpu_workers"] = len(set(gpu.column("worker").to_pylist()))
    report["gpu_node"] = {w.split(":")[0] for w in gpu.column("worker").to_pylist()} == {gpu_node.node_id[:12]}
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main(Path(sys.argv[1]))
