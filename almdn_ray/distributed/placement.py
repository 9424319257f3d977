"""Resource requests sized from the nodes that exist, never from cluster totals.

A Ray Train worker, a scoring actor or the EVAL task asks for CPUs (and a GPU) that one node can give:
asking for "cluster CPUs / workers" on a head plus two 8-CPU nodes asks each worker for 12 CPUs, which no
node has, and Ray waits forever. The sizing here is pure arithmetic over :class:`Node` shapes; only
:func:`cluster_nodes` and :func:`wait_for_fit` talk to Ray. A request that does not fit is an error naming
the request and the nodes, after ``timeout_s`` (time for an autoscaler to add nodes).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)

__all__ = [
    "Node", "Request", "PlacementError", "cluster_nodes", "worker_nodes", "fits", "plan_workers",
    "plan_scoring", "wait_for_fit", "torch_threads",
]  # fmt: skip

HEAD_RESOURCE = "node:__internal_head__"


class PlacementError(RuntimeError):
    """A resource request that no node of the cluster can hold; the message names it and the nodes."""

    def __init__(self, message: str, request: Request | None = None):
        super().__init__(message)
        self.request = request


@dataclass(frozen=True)
class Node:
    """One alive node's total resources."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    is_head: bool = False

    def describe(self) -> str:
        role = "head" if self.is_head else "worker"
        return f"{role} {self.address} ({self.node_id[:8]}): {self.cpus:g} CPU, {self.gpus:g} GPU"


@dataclass(frozen=True)
class Request:
    """``count`` bundles of ``cpus`` CPUs and ``gpus`` GPUs, each on one node."""

    what: str
    count: int
    cpus: float
    gpus: float = 0.0

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def describe(self) -> str:
        return f"{self.what}: {self.count} x {{{self.cpus:g} CPU{f', {self.gpus:g} GPU' if self.gpus else ''}}}"


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster."""
    nodes = []
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        resources = info.get("Resources", {})
        nodes.append(
            Node(
                node_id=info["NodeID"],
                address=info.get("NodeManagerAddress", "?"),
                cpus=float(resources.get("CPU", 0.0)),
                gpus=float(resources.get("GPU", 0.0)),
                is_head=HEAD_RESOURCE in resources,
            )
        )
    return nodes


def worker_nodes(nodes: list[Node], *, use_gpu: bool) -> list[Node]:
    """The nodes work is sized for: those with the resource asked for, the head only when it is the only one."""
    able = [n for n in nodes if (n.gpus >= 1 if use_gpu else n.cpus > 0)]
    workers = [n for n in able if not n.is_head]
    return workers or able


def _capacity(node: Node, cpus: float, gpus: float) -> int:
    by_cpu = math.floor(node.cpus / cpus + 1e-9) if cpus > 0 else 1 << 30
    by_gpu = math.floor(node.gpus / gpus + 1e-9) if gpus > 0 else 1 << 30
    return min(by_cpu, by_gpu)


def fits(request: Request, nodes: list[Node]) -> bool:
    """Whether ``request.count`` bundles can be placed, each on one node (the nodes being otherwise idle)."""
    return sum(_capacity(n, request.cpus, request.gpus) for n in nodes) >= request.count


def _error(request: Request, nodes: list[Node], hint: str) -> PlacementError:
    seen = "; ".join(n.describe() for n in nodes) or "none"
    return PlacementError(f"cannot place {request.describe()} on the nodes seen ({seen}); {hint}", request)


def plan_workers(
    nodes: list[Node], *, what: str, count: int, use_gpu: bool, cpus_per_worker: float | None = None
) -> Request:
    """The largest CPU share per worker (one GPU each with ``use_gpu``) that places all ``count`` workers.

    With ``cpus_per_worker`` that share is fixed and only checked. A GPU worker takes at most its node's CPUs
    per GPU, so the CPUs of a node are shared among the workers of its GPUs.

    Raises:
        PlacementError: no share places every worker.
    """
    gpus = 1.0 if use_gpu else 0.0
    candidates = worker_nodes(nodes, use_gpu=use_gpu)
    if cpus_per_worker is not None:
        request = Request(what, count, float(cpus_per_worker), gpus)
        if not fits(request, candidates):
            raise _error(request, nodes, "lower resources.cpus_per_worker or num_workers, or add nodes")
        return request
    if not candidates:
        raise _error(Request(what, count, 1.0, gpus), nodes, "add nodes with GPUs or set resources.use_gpu: false")
    share = min(n.cpus / n.gpus if use_gpu else n.cpus for n in candidates)
    for cpus in range(max(1, math.floor(share)), 0, -1):
        request = Request(what, count, float(cpus), gpus)
        if fits(request, candidates):
            return request
    request = Request(what, count, 1.0, gpus)
    hint = "lower resources.num_workers, or add nodes" + (" with GPUs" if use_gpu else "")
    raise _error(request, nodes, hint)


def plan_scoring(nodes: list[Node], *, use_gpu: bool, num_actors: int | None) -> Request:
    """Model actors for SCORE: one per GPU (1 CPU each, the node's other CPUs decode), or on CPU one per core
    with a fraction of a CPU each, so that Ray Data's read and decode tasks always find a free CPU (an actor
    pool holding every CPU deadlocks a small node)."""
    candidates = worker_nodes(nodes, use_gpu=use_gpu)
    if use_gpu:
        gpus = sum(math.floor(n.gpus) for n in candidates)
        cpus = min([1.0] + [max(0.1, (n.cpus - 1.0) / max(n.gpus, 1.0)) for n in candidates])
        request = Request("scoring actors", num_actors or gpus, math.floor(100 * cpus) / 100, 1.0)
        if not candidates or not fits(request, candidates):
            raise _error(request, nodes, "lower resources.scoring_actors, add GPU nodes or unset use_gpu")
        return request
    total = sum(n.cpus for n in candidates)
    actors = num_actors or max(1, int(total))
    reserve = max(1.0, float(len(candidates)))  # one CPU per node for reading and writing
    share = math.floor(100 * min(1.0, max(0.1, (total - reserve) / actors))) / 100  # rounded down: keep the reserve
    request = Request("scoring actors", actors, share)
    if not fits(request, candidates):
        raise _error(request, nodes, "lower resources.scoring_actors or add nodes")
    return request


def wait_for_fit(plan, *, timeout_s: float, poll_s: float = 1.0) -> Request:
    """``plan(nodes)`` on the current nodes; while it raises, ask an autoscaler for nodes and retry until
    ``timeout_s``, then raise the last :class:`PlacementError`."""
    deadline = time.monotonic() + timeout_s
    asked = False
    try:
        while True:
            nodes = cluster_nodes()
            try:
                return plan(nodes)
            except PlacementError as error:
                if time.monotonic() >= deadline:
                    raise PlacementError(f"{error} (waited {timeout_s:g} s: resources.placement_timeout_s)") from None
                if not asked:
                    logger.warning("%s; waiting up to %g s for nodes", error, timeout_s)
                    _ask_autoscaler(error.request)
                    asked = True
            time.sleep(poll_s)
    finally:
        if asked:
            _ask_autoscaler(None)


def _ask_autoscaler(request: Request | None) -> None:
    """Ask a cluster autoscaler (if there is one) for the request's bundles, or (None) withdraw the ask."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[] if request is None else [request.bundle()] * request.count)
    except Exception as error:  # no autoscaler: nothing to ask
        logger.debug("no autoscaler request (%s)", error)


def torch_threads(cpus: float) -> int:
    """Torch threads for a share of ``cpus`` logical CPUs: at least 1, at most the machine's cores."""
    return max(1, min(int(cpus), os.cpu_count() or 1))
