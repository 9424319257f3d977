"""``pool build`` of a large image folder: one Ray task per chunk of files (header reads are I/O-bound)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence

import ray

logger = logging.getLogger(__name__)

__all__ = ["ray_map_chunks"]


def ray_map_chunks(function: Callable, args: Sequence[tuple], *, max_in_flight: int | None = None) -> Iterator:
    """``function(*a)`` for every ``a`` as Ray tasks (local Ray unless ``RAY_ADDRESS``), results in order.

    At most ``max_in_flight`` tasks are queued at a time (default: 4 per cluster CPU), so a listing of millions
    of files does not become millions of pending tasks.
    """
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING", log_to_driver=False)
    from almdn_ray import storage

    remote = ray.remote(num_cpus=1, max_retries=3)(_configured)
    settings = storage.settings()  # the workers reach storage as this process does: endpoint, retries, timeouts
    limit = max_in_flight or max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list = []
    position = 0
    while position < len(args) or pending:
        while position < len(args) and len(pending) < limit:
            pending.append(remote.remote(settings, function, *args[position]))
            position += 1
        yield ray.get(pending.pop(0))


def _configured(settings: dict, function: Callable, *args):
    """``function(*args)`` in a Ray worker, its storage configured as the driver's."""
    from almdn_ray import storage

    storage.configure(**settings)
    return function(*args)
