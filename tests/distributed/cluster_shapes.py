"""Run by test_cluster.py in its own process: multi-node Ray clusters on this machine (real raylets, their
own ports) shaped like the files in cluster/. Prints one JSON line.

1. CPU-only shape (the file's head with no CPUs, two 8-CPU nodes): Ray Train with 2 workers is placed and
   finishes; scoring spreads over both nodes, and a node removed while it runs loses no row.
2. The files' GPU shape (head with no CPUs, GPU nodes of 8 CPUs and 1 logical GPU): scoring with decode
   tasks ahead of one model actor per GPU, and EVAL, run on the worker nodes and never on the head; the
   rows equal a single-process reference; 5 GPU workers on 4 GPU nodes fail fast, naming the nodes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.cluster_utils import Cluster

from almdn_ray.data.manifest import read_manifest, rows_from_dataset, write_manifest
from almdn_ray.data.records import Dataset
from almdn_ray.distributed.evaluate import evaluate_remote
from almdn_ray.distributed.placement import PlacementError
from almdn_ray.distributed.score_pool import score_pool
from almdn_ray.distributed.train import train_distributed
from almdn_ray.model import ModelSpec, PostprocessConfig
from almdn_ray.model.embeddings import Embedder
from almdn_ray.reduce import embedding_matrix
from almdn_ray.scoring import load_model, read_scores, score_table
from almdn_ray.training import TrainRecipe
from tests.distributed.cluster_files import kuberay_shape, launcher_shape
from tests.distributed.helpers import write_scenes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(**resources):
    return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(), **resources}


def nodes_of(table) -> set[str]:
    return {w.split(":")[0] for w in table.column("worker").to_pylist()}


def main(workdir: Path) -> None:
    phases, last = {}, [time.monotonic()]

    def lap(name: str) -> None:  # seconds per phase, in the report (not asserted: to see where the time goes)
        now = time.monotonic()
        phases[name], last[0] = round(now - last[0], 1), now

    shape = launcher_shape()
    assert shape == kuberay_shape(), (shape, kuberay_shape())  # both files: one shape to test
    head_cpus, _ = shape["head"]
    records = write_scenes(workdir / "images", 48, seed=9)
    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=96)
    torch.save(spec.build().state_dict(), workdir / "model.pt")
    write_manifest(rows_from_dataset(Dataset(records, ("a", "b"))), str(workdir / "pool"), rows_per_shard=12)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "include_dashboard": False,
            "gcs_server_port": free_port(),
            **node_args(),
        },
    )
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Actor pools start work once all their actors are up (Ray Data spreads them over the nodes): which actor
    # scores which block is then not a race against a slow actor start.
    context.wait_for_min_actors_s = 120
    head = ray.get_runtime_context().get_node_id()[:12]
    report = {"head_cpus": head_cpus, "phase_s": phases}
    lap("head")
    common = dict(
        manifest_uri=str(workdir / "pool"),
        weights_uri=str(workdir / "model.pt"),
        spec=spec,
        postprocess=PostprocessConfig(min_confidence=0.2),
        batch_size=4,
        rows_per_block=4,
        embedding_dims=16,  # the embedding columns travel through Ray Data and Parquet as on a cluster
    )

    # 1. CPU-only: two 8-CPU nodes.
    cpu_nodes = [cluster.add_node(num_cpus=8, **node_args()) for _ in range(2)]
    cluster.wait_for_nodes()
    lap("cpu_nodes")
    recipe = TrainRecipe(
        max_iterations=4, batch_size=4, optimizer="adam", lr=1e-3, warmup_iterations=1, lr_steps=(),
        checkpoint_every=2, augment=False, precise_bn_batches=0,
    )  # fmt: skip
    start = time.monotonic()
    trained = train_distributed(
        records=records[:16], spec=spec, recipe=recipe, storage_uri=str(workdir / "train"), run_name="cycle-000",
        num_workers=2, placement_timeout_s=10,
    )  # fmt: skip
    report["train_s"] = time.monotonic() - start
    report["train_iteration"] = trained.metrics.get("iteration")
    report["train_weight_spread"] = trained.metrics.get("weight_spread")
    report["train_model"] = Path(trained.model_uri).is_file()
    lap("cpu_train")

    score_pool(out_uri=str(workdir / "spread"), num_actors=3, **common)
    spread = read_scores(str(workdir / "spread"))
    report["spread_ids"] = sorted(spread.column("image_id").to_pylist()) == sorted(r.image_id for r in records)
    report["spread_nodes"] = len(nodes_of(spread))
    report["spread_on_head"] = head in nodes_of(spread)
    lap("cpu_spread")
    out = workdir / "removed"
    run = threading.Thread(target=lambda: score_pool(out_uri=str(out), num_actors=3, **common))
    run.start()
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.parquet")):
        time.sleep(0.02)
    report["removed_while_running"] = run.is_alive()
    cluster.remove_node(cpu_nodes[0])
    run.join(timeout=300)
    removed = read_scores(str(out))
    report["removed_rows"] = removed.num_rows
    report["removed_ids"] = len(set(removed.column("image_id").to_pylist()))
    cluster.remove_node(cpu_nodes[1])
    lap("cpu_removed")

    # 2. The files' GPU shape.
    gpu_nodes = [cluster.add_node(num_cpus=c, num_gpus=g, **node_args()) for c, g in shape["workers"]]
    cluster.wait_for_nodes()
    ids = {n.node_id[:12] for n in gpu_nodes}
    lap("gpu_nodes")
    score_pool(out_uri=str(workdir / "gpu"), use_gpu=True, **common)  # decode tasks by default with use_gpu
    gpu = read_scores(str(workdir / "gpu"))
    report["gpu_workers"] = len(set(gpu.column("worker").to_pylist()))
    report["gpu_on_workers_only"] = nodes_of(gpu) <= ids and head not in nodes_of(gpu)
    lap("gpu_score")
    model = load_model(spec, str(workdir / "model.pt"))
    reference = score_table(
        model, read_manifest(str(workdir / "pool")), batch_size=4, config=common["postprocess"], embedder=Embedder(16)
    )
    by_id = {r["image_id"]: r for r in gpu.to_pylist()}
    # Counts and classes exactly; the uncertainties to float32 rounding: the actors run another thread count than
    # this process, and oneDNN may then sum a convolution in another order.
    floats = ["loc_al_max", "loc_ep_max", "cls_al_max", "cls_ep_max"]
    mismatches, gap = [], 0.0
    for r in reference.to_pylist():
        g = by_id[r["image_id"]]
        ours, theirs = np.array([g[c] for c in floats], float), np.array([r[c] for c in floats], float)
        both = np.isfinite(ours) & np.isfinite(theirs)
        gap = max(gap, float((np.abs(ours - theirs)[both] / np.maximum(np.abs(theirs[both]), 1e-6)).max(initial=0)))
        same = g["n_det"] == r["n_det"] and g["top_class"] == r["top_class"]
        if not (same and np.allclose(ours, theirs, rtol=1e-4, atol=1e-6, equal_nan=True)):
            mismatches.append({"image_id": r["image_id"], "ours": {c: g[c] for c in floats + ["n_det", "top_class"]},
                               "reference": {c: r[c] for c in floats + ["n_det", "top_class"]}})  # fmt: skip
    report["gpu_equals_reference"] = not mismatches
    report["gpu_mismatches"] = mismatches[:3]
    report["gpu_uncertainty_gap"] = gap
    # the embeddings as well, to float16's last digit (the actors run other thread counts than this process)
    in_order = [by_id[i]["embedding"] for i in reference.column("image_id").to_pylist()]
    ours = embedding_matrix(pa.array(in_order, pa.binary()))
    report["gpu_embedding_gap"] = float(np.abs(ours - embedding_matrix(reference.column("embedding"))).max())
    report["gpu_embedding_dims"] = ours.shape[1]
    lap("gpu_reference")
    metrics = evaluate_remote(
        str(workdir / "model.pt"), Dataset(records[:8], ("a", "b")), spec, use_gpu=True, batch_size=4
    )
    report["eval_on_worker"] = metrics["eval_node"][:12] in ids
    report["eval_images"] = metrics["num_images"]
    lap("gpu_eval")
    start = time.monotonic()
    try:
        train_distributed(
            records=records[:16], spec=spec, recipe=recipe, storage_uri=str(workdir / "impossible"),
            run_name="cycle-000", num_workers=len(gpu_nodes) + 1, use_gpu=True, placement_timeout_s=2,
        )  # fmt: skip
        report["impossible"] = "placed"
    except PlacementError as error:
        report["impossible"] = str(error)
    report["impossible_s"] = time.monotonic() - start
    report["gpu_node_addresses"] = sorted({n.address for n in gpu_nodes})
    lap("impossible")
    ray.shutdown()
    cluster.shutdown()
    lap("shutdown")
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main(Path(sys.argv[1]))
