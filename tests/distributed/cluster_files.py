"""The node shapes and properties of the files in cluster/, read as a user's cluster would start them."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
KUBERAY = ROOT / "cluster" / "kuberay.yaml"


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def kuberay() -> dict[str, dict]:
    """The manifest's documents by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERAY.read_text())}


def _cpu(text) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def launcher_shape() -> dict:
    """``{"head": (cpus, gpus), "workers": [(cpus, gpus), ...]}`` as Ray sees the launcher's nodes at start."""
    doc = launcher()
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]["resources"]
    workers = []
    for name, node in types.items():
        if name != doc["head_node_type"]:
            workers += [(node["resources"]["CPU"], node["resources"].get("GPU", 0))] * node["min_workers"]
    return {"head": (head["CPU"], head.get("GPU", 0)), "workers": workers}


def kuberay_shape() -> dict:
    """The same for the RayJob's cluster: ``num-cpus`` where rayStartParams set it, else the container limits."""
    spec = kuberay()["RayJob"]["spec"]["rayClusterSpec"]

    def node(group) -> tuple[float, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = group.get("rayStartParams", {}).get("num-cpus", limits["cpu"])
        return _cpu(cpus), float(limits.get("nvidia.com/gpu", 0))

    workers = []
    for group in spec["workerGroupSpecs"]:
        workers += [node(group)] * group["replicas"]
    return {"head": node(spec["headGroupSpec"]), "workers": workers}
