"""Where a run keeps its files (DESIGN section 3), and the small readers of them every stage needs."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from almdn_ray import storage

if TYPE_CHECKING:  # torch-free at import: `status` and `report` read a run without loading the model code
    from almdn_ray.config import JobSpec
    from almdn_ray.model.detector import ModelSpec

__all__ = ["RunLayout", "model_spec", "labeled_ids"]


class RunLayout:
    """File names of a run folder (DESIGN section 3)."""

    def __init__(self, run: str):
        self.run = run
        self.job = storage.join(run, "job.yaml")
        self.pool = storage.join(run, "pool")
        self.pool_marker = storage.join(self.pool, "_MANIFEST.json")  # = data.manifest.MARKER, written last
        self.report = storage.join(run, "report")
        self.initial_labels = self.cycle(0, "initial-labels.json")  # a cold start's hand labels of the first set

    def cycle(self, k: int, *parts: str) -> str:
        return storage.join(self.run, "cycles", f"{k:03d}", *parts)


def model_spec(job: JobSpec, num_classes: int) -> ModelSpec:
    """The job's model with the dataset's class count (background included)."""
    from almdn_ray.config import SpecError

    if job.model.num_classes not in (None, num_classes):
        raise SpecError(
            f"model.num_classes is {job.model.num_classes} but the dataset has {num_classes} classes "
            "with background; remove the key or fix it"
        )
    return replace(job.model, num_classes=num_classes)


def labeled_ids(layout: RunLayout, k: int) -> list[str]:
    return storage.read_parquet(layout.cycle(k, "labeled.parquet")).column("image_id").to_pylist()
