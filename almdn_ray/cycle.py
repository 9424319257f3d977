"""The stage machine of an active-learning run: TRAIN -> EVAL -> SCORE -> SELECT -> LABEL, per cycle.

Every stage is an idempotent function of its inputs that writes its outputs under ``cycles/NNN/`` before
the state record moves on in one atomic write; a stage whose outputs exist is not redone. The heavy stages
are functions the caller passes in (:class:`StageFunctions`): the CLI passes the Ray ones, tests may pass
local ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from almdn_ray import acquisition, reduce, storage
from almdn_ray.config import JobSpec, SpecError, StorageSpec, diff_specs, spec_from_dict, spec_to_dict
from almdn_ray.data.manifest import read_manifest, read_marker, write_manifest_table
from almdn_ray.data.pool import Pool, load_pool
from almdn_ray.data.records import Dataset, ImageRecord
from almdn_ray.data.validate import read_dataset
from almdn_ray.labels import imported_labels
from almdn_ray.layout import RunLayout, labeled_ids, model_spec
from almdn_ray.model.detector import ModelSpec
from almdn_ray.state import Lease, RunState, load_state, save_state

logger = logging.getLogger(__name__)

POOL_ROWS_PER_SHARD = 1_000_000  # the run's frozen pool: few large shards (the driver reads them whole)
SCORE_ROWS_PER_SHARD = 10_000  # a cycle's unlabelled manifest: blocks for Ray Data to spread

__all__ = ["StageFunctions", "RunLayout", "Driver", "model_spec", "labeled_ids"]


@dataclass(frozen=True)
class StageFunctions:
    """The heavy work of a cycle.

    ``train(records, spec, job, storage_uri, run_name, init_weights_uri) -> model_uri``;
    ``score(manifest_uri, weights_uri, out_uri, spec, job) -> None``;
    ``evaluate(weights_uri, dataset, spec, job) -> metrics dict``.
    """

    train: Callable[..., str]
    score: Callable[..., None]
    evaluate: Callable[..., dict]


def _digest(record: ImageRecord) -> str:
    """A fingerprint of one image's labels (boxes, classes, difficult flags)."""
    digest = hashlib.sha1(record.boxes.astype(np.float32).tobytes())
    digest.update(record.labels.astype(np.int64).tobytes())
    digest.update(record.difficult.astype(bool).tobytes())
    return digest.hexdigest()


class Driver:
    """Carries a run through its cycles; resumable at any point, one driver per run (a lease)."""

    def __init__(
        self,
        job: JobSpec,
        functions: StageFunctions,
        *,
        progress: Callable[[str], None] | None = None,
        accept_changed_labels: bool = False,
        first_cycle_from: str | None = None,
    ):
        storage.configure(**job.storage.settings())  # every read and write of this process
        self.job = job
        self.functions = functions
        self.layout = RunLayout(job.storage.uri)
        self.progress = progress or (lambda message: None)
        # Another run of the same job and seed whose first cycle (model and metrics) this run may reuse: the
        # strategies of an experiment differ only from their first selection on (see _reusable_first_cycle).
        self.first_cycle_from = first_cycle_from
        self.accept_changed_labels = accept_changed_labels
        self._pool: Pool | None = None
        self._test: Dataset | None = None

    # ---- inputs -------------------------------------------------------------------------------------------
    @property
    def pool(self) -> Pool:
        """The run's pool: its frozen manifest (``pool/``, once written) and the labels that exist."""
        if self._pool is None:
            frozen = read_manifest(self.layout.pool) if read_marker(self.layout.pool) is not None else None
            self._pool = load_pool(self.job.dataset, table=frozen)
        return self._pool

    @property
    def test(self) -> Dataset:
        if self._test is None:
            d = self.job.dataset
            classes = d.classes or self.pool.classes
            test = read_dataset(d.test, split=d.test_split or "test", classes=classes, image_root=d.test_image_root)
            self._test = test.with_classes(self.pool.classes, d.test)
        return self._test

    def _readable(self, records: list[ImageRecord], where: str) -> list[ImageRecord]:
        """``records`` without the images that cannot be decoded; each checked once per run (decoded in the
        driver), the unreadable ones listed in ``where`` (a JSON of ``image_id -> why``) and logged."""
        from almdn_ray.data.images import ImageReadError, read_image

        cache_uri = storage.join(self.layout.run, "image-checks.json")
        checked = storage.read_json(cache_uri) if storage.exists(cache_uri) else {}
        fresh = {}
        for record in records:
            key = f"{record.image_id}\t{record.uri}"
            if key in checked:
                continue
            try:
                image = read_image(record.uri)
                size_ok = tuple(image.shape[-2:]) == (record.height, record.width)
                fresh[key] = (
                    None
                    if size_ok
                    else (
                        f"{record.uri}: image is {image.shape[-1]}x{image.shape[-2]}, its labels say "
                        f"{record.width}x{record.height}"
                    )
                )
            except ImageReadError as error:
                fresh[key] = str(error)
        if fresh:
            checked.update(fresh)
            storage.write_json(cache_uri, checked)
        bad = {r.image_id: checked[f"{r.image_id}\t{r.uri}"] for r in records if checked[f"{r.image_id}\t{r.uri}"]}
        if bad:
            logger.warning("%d unreadable image(s) left out (%s), e.g. %s", len(bad), where, next(iter(bad.values())))
        storage.write_json(where, bad)
        return [r for r in records if r.image_id not in bad]

    @property
    def spec(self) -> ModelSpec:
        return model_spec(self.job, self.pool.num_classes)

    def _freeze_job(self) -> None:
        """Write ``job.yaml`` at the start; on resume refuse a changed spec, except a corrected class target: one
        that named classes the pool lacks stopped the run at its first SELECT, so no selection used it."""
        current = spec_to_dict(self.job)
        if storage.exists(self.layout.job):
            started = spec_from_dict(yaml.safe_load(storage.read_bytes(self.layout.job)), self.layout.job)
            # read back through the spec: a key a later version added counts as its default, not as a change
            changed = diff_specs(spec_to_dict(started), current)
            # how storage is reached (retries, timeouts) may change: raising max_attempts is how a throttled run resumes
            changed = [c for c in changed if c.removeprefix("storage.") not in StorageSpec.RETUNABLE]
            target = started.acquisition.class_target
            corrected = [c for c in changed if c.split(".")[:2] == ["acquisition", "class_target"]]
            if corrected and self._unknown_classes(target):
                changed = [c for c in changed if c not in corrected]
            if changed:
                raise SpecError(
                    f"{self.layout.job}: the run was started with a different job spec; changed keys: "
                    f"{changed}. Restore them, or give a new storage.uri for a new run"
                )
            if not corrected:
                return
            logger.warning(
                "%s: acquisition.class_target corrected from %s to %s (the first named classes the pool lacks, "
                "so no selection used it)", self.layout.job, target, self.job.acquisition.class_target,
            )  # fmt: skip
        storage.write_bytes(self.layout.job, yaml.safe_dump(current, sort_keys=False).encode())

    def _unknown_classes(self, target) -> list:
        """The names of ``target`` (a class target) that are not classes of the pool."""
        return sorted(set(target) - set(self.pool.classes), key=str) if isinstance(target, dict) else []

    # ---- the machine ---------------------------------------------------------------------------------------
    def run(self) -> RunState:
        """Run until the last cycle is evaluated, or until human labels are needed."""
        self.diversity()  # before any work: a class target naming classes the pool lacks is refused now
        self._freeze_job()
        lease = Lease(self.layout.run)
        lease.acquire()
        try:
            state = load_state(self.layout.run) or RunState(run_id=uuid.uuid4().hex[:12])
            if state.status == "finished":
                self.progress(f"run {state.run_id} is already finished")
                return state
            self._prepare()
            self.check_labels_unchanged(range(state.cycle + 1))
            state.status = "running"
            while state.status == "running":
                stage = state.stage
                lease.check()  # a driver whose lease was taken starts nothing more
                self.progress(f"cycle {state.cycle}: {stage}")
                start = time.perf_counter()
                finished = getattr(self, f"_{stage}")(state.cycle)
                if not finished:
                    state.status = "awaiting_labels"
                    save_state(self.layout.run, state, lease)
                    self.progress(f"cycle {state.cycle}: waiting for labels (almdn-ray labels export/import)")
                    break
                state.done(
                    stage, time.perf_counter() - start, last_cycle=state.cycle >= self.job.acquisition.cycles - 1
                )
                save_state(self.layout.run, state, lease)
                pause = os.environ.get("ALMDN_RAY_PAUSE_AFTER_STAGE")  # crash-recovery tests kill the driver here
                if pause == stage:
                    time.sleep(float(os.environ.get("ALMDN_RAY_PAUSE_S", "30")))
            return state
        finally:
            lease.release()

    def cold_start(self) -> bool:
        """Human labelling with a pool that has no labels: cycle 0 starts by labelling the initial set."""
        return self.job.labels.mode == "human" and not self.pool.labels

    def _prepare(self) -> None:
        """Freeze the pool into ``pool/`` (written completely or rebuilt) and draw the initial labelled set."""
        if read_marker(self.layout.pool) is None:
            storage.delete(self.layout.pool)  # a partial write of an interrupted start: rebuild it whole
            self._pool = None
            write_manifest_table(self.pool.table, self.layout.pool, rows_per_shard=POOL_ROWS_PER_SHARD)
            self.progress(f"pool frozen: {len(self.pool)} images")
        first = self.layout.cycle(0, "labeled.parquet")
        if not storage.exists(first):
            pool = self.pool
            if self.job.labels.mode == "human" and pool.labels:
                candidates = pa.array(sorted(pool.labels), pa.string())  # start from the labels that exist
            else:
                unlabelled = pool.unlabelled_ids()
                if self.job.labels.mode == "simulate" and len(unlabelled):
                    raise SpecError(
                        f"labels.mode simulate labels every selected image from the dataset, but "
                        f"{len(unlabelled)} of the {len(pool)} pool images have no labels (e.g. "
                        f"{unlabelled.slice(0, 3).to_pylist()}); give them (dataset.labels) or set labels.mode: human"
                    )
                candidates = pool.image_ids
            order = pc.sort_indices(candidates)  # positions in id order (the ids themselves are not copied)
            size = min(self.job.acquisition.initial_labeled, len(order))
            chosen = np.sort(np.random.default_rng(self.job.seed).choice(len(order), size=size, replace=False))
            ids = pc.take(candidates, pc.take(order, pa.array(chosen)))
            storage.write_parquet(first, pa.table({"image_id": ids}))
            logger.info("initial labelled set: %d random images (seed %d)", size, self.job.seed)

    def training_records(self, k: int) -> list[ImageRecord]:
        """Ground truth of the images labelled at the start of cycle ``k``: labels imported by hand where
        there are some, else the dataset's."""
        wanted = sorted(labeled_ids(self.layout, k))
        by_hand = imported_labels(self.layout, k, self.pool) if self.job.labels.mode == "human" else {}
        missing = [i for i in wanted if i not in by_hand and i not in self.pool.labels]
        if missing and self.accept_changed_labels:  # removed from the dataset since: left out, as accepted
            logger.warning("cycle %d: %d labelled image(s) no longer have labels, left out", k, len(missing))
            wanted = [i for i in wanted if i not in set(missing)]
        elif missing:
            raise RuntimeError(
                f"cycle {k}: {len(missing)} labelled image(s) have no labels, e.g. {missing[:3]}; import them "
                "(almdn-ray labels import)"
            )
        return [by_hand[i] if i in by_hand else self.pool.labels[i] for i in wanted]

    def member_dirs(self, k: int) -> list[str]:
        """Training folders of cycle ``k``'s models: ``train/`` (the model that is evaluated and scores), then
        ``train/member-M/`` for the further members of an ensemble."""
        first = self.layout.cycle(k, "train")
        return [first] + [storage.join(first, f"member-{m}") for m in range(1, self.job.ensemble_members)]

    def _fingerprint_uri(self, k: int) -> str:
        return self.layout.cycle(k, "labels-fingerprint.parquet")

    def check_labels_unchanged(self, cycles: range) -> None:
        """Refuse a resume whose labels of already-trained images differ from what those cycles trained on
        (a dataset edited in place), naming the images; ``accept_changed_labels`` turns it into a warning."""
        changed: dict[str, str] = {}
        current: dict[str, str] = {}
        accepted_uri = storage.join(self.layout.run, "labels-accepted.json")
        accepted = storage.read_json(accepted_uri) if storage.exists(accepted_uri) else {}
        for k in cycles:
            uri = self._fingerprint_uri(k)
            if not storage.exists(uri):
                continue
            stored = storage.read_parquet(uri)
            ids = stored.column("image_id").to_pylist()
            try:
                now = dict(zip(ids, (_digest(r) for r in self.training_records(k))))
            except (RuntimeError, KeyError) as error:
                changed.update({i: f"cycle {k}: {error}" for i in ids[:1]})
                continue
            for image_id, digest in zip(ids, stored.column("digest").to_pylist()):
                if now.get(image_id) not in (digest, accepted.get(image_id)):
                    changed.setdefault(image_id, f"cycle {k}")
                    current[image_id] = now.get(image_id)
        if not changed:
            return
        names = ", ".join(f"{i} ({why})" for i, why in list(changed.items())[:10])
        message = f"the labels of {len(changed)} image(s) this run already trained on have changed since: {names}" + (
            " …" if len(changed) > 10 else ""
        )
        if self.accept_changed_labels:
            logger.warning("%s; continuing (--accept-changed-labels)", message)
            storage.write_json(accepted_uri, {**accepted, **current})  # later resumes need no flag for these
            return
        raise SpecError(
            f"{message}. Restore the dataset, or resume with `almdn-ray run --accept-changed-labels` to train the "
            "next cycles on the new labels (the finished cycles stay as they were)"
        )

    def _reusable_first_cycle(self) -> RunLayout | None:
        """The run named by ``first_cycle_from`` if its cycle 0 is what this run's would be: the same model and
        training spec, the same seed, one model per cycle, and the same initial labelled set; else None."""
        if self.first_cycle_from is None:
            return None
        source = RunLayout(self.first_cycle_from)
        if not storage.exists(source.job) or not storage.exists(source.cycle(0, "train", "model.pt")):
            return None
        theirs = spec_from_dict(yaml.safe_load(storage.read_bytes(source.job)), source.job)
        single = theirs.ensemble_members == 1 and self.job.ensemble_members == 1
        same = theirs.model == self.job.model and theirs.train == self.job.train and theirs.seed == self.job.seed
        same = same and theirs.dataset == self.job.dataset and theirs.warm_start == self.job.warm_start
        if not (single and same and storage.exists(source.cycle(0, "labeled.parquet"))):
            return None
        if labeled_ids(source, 0) != labeled_ids(self.layout, 0):
            return None
        return source

    def _train(self, k: int) -> bool:
        if k == 0 and self.cold_start() and not storage.exists(self.layout.initial_labels):
            return False  # the initial set goes to the labellers first
        source = self._reusable_first_cycle() if k == 0 else None
        model = self.layout.cycle(0, "train", "model.pt")
        if source is not None and not storage.exists(model):
            storage.write_bytes(model, storage.read_bytes(source.cycle(0, "train", "model.pt")))
            self.progress(f"cycle 0: model reused from {source.run} (same job, seed and initial labelled set)")
        if not storage.exists(self._fingerprint_uri(k)):
            trained = self.training_records(k)
            storage.write_parquet(
                self._fingerprint_uri(k),
                pa.table({"image_id": [r.image_id for r in trained], "digest": [_digest(r) for r in trained]}),
            )
        records = None
        for m, folder in enumerate(self.member_dirs(k)):
            if storage.exists(storage.join(folder, "model.pt")):
                continue
            init = None
            if self.job.warm_start and k > 0:
                init = storage.join(self.member_dirs(k - 1)[m], "model.pt")
            records = records or self._readable(self.training_records(k), self.layout.cycle(k, "train-unreadable.json"))
            job, name = self.job, f"cycle-{k:03d}"
            job = replace(job, train=job.train.for_images(len(records)))
            if m > 0:  # an ensemble member: its own initialisation, batch order and augmentation
                job = replace(job, train=replace(job.train, seed=job.train.seed + 7919 * m))
                name = f"{name}-member-{m}"
            self.progress(
                f"cycle {k}: training {name} on {len(records)} labelled images for {job.train.max_iterations} "
                "iterations"
            )
            self.functions.train(records, self.spec, job, folder, name, init)
        return True

    def _eval(self, k: int) -> bool:
        out = self.layout.cycle(k, "metrics.json")
        source = self._reusable_first_cycle() if k == 0 else None
        if source is not None and not storage.exists(out) and storage.exists(source.cycle(0, "metrics.json")):
            storage.write_json(out, storage.read_json(source.cycle(0, "metrics.json")))
        if not storage.exists(out):
            test = self.test
            readable = self._readable(test.records, self.layout.cycle(k, "test-unreadable.json"))
            if len(readable) < len(test.records):
                test = replace(test, records=readable)
            metrics = self.functions.evaluate(self.layout.cycle(k, "train", "model.pt"), test, self.spec, self.job)
            metrics["unreadable_test_images"] = len(self.test.records) - len(readable)
            metrics["labeled"] = len(labeled_ids(self.layout, k))
            metrics["cycle"] = k
            metrics["classes"] = list(self.pool.classes)
            storage.write_json(out, metrics)
            self.progress(
                f"cycle {k}: VOC07 mAP {metrics.get('map_voc07', float('nan')):.4f} with "
                f"{metrics['labeled']} labelled images"
            )
        return True

    def _score(self, k: int) -> bool:
        done = self.layout.cycle(k, "scores", "_SUCCESS")
        if storage.exists(done):
            return True
        labeled = pa.array(labeled_ids(self.layout, k), pa.string())
        pool = self.pool.table
        unlabeled = pool.filter(pc.invert(pc.is_in(pool.column("image_id"), labeled)))
        if unlabeled.num_rows == 0:  # the pool is exhausted: nothing left to score or select
            storage.write_parquet(self.layout.cycle(k, "scores", "empty.parquet"), reduce.SCORE_SCHEMA.empty_table())
            storage.write_bytes(done, b"")
            return True
        if self.job.acquisition.strategy == "random":  # no model needed: one row per unlabelled image, no forward
            ids = unlabeled.column("image_id")
            columns = {f.name: ids if f.name == "image_id" else pa.nulls(len(ids), f.type) for f in reduce.SCORE_SCHEMA}
            columns["n_det"] = pa.array(np.zeros(len(ids), np.int64))
            columns["seconds"] = pa.array(np.zeros(len(ids)))
            table = pa.table(columns, schema=reduce.SCORE_SCHEMA)
            storage.write_parquet(self.layout.cycle(k, "scores", "random.parquet"), table)
            storage.write_bytes(done, b"")
            return True
        manifest = self.layout.cycle(k, "unlabeled")
        storage.delete(manifest)
        # almdn_diverse also scores the labelled images: their embeddings keep new picks away from them
        # (the reduce leaves them out of the pool statistics and the selection)
        diverse = self.job.acquisition.strategy in acquisition.DIVERSE_STRATEGIES
        write_manifest_table(pool if diverse else unlabeled, manifest, rows_per_shard=SCORE_ROWS_PER_SHARD)
        models = [storage.join(folder, "model.pt") for folder in self.member_dirs(k)]
        extra = {"member_uris": models[1:]} if len(models) > 1 else {}
        self.functions.score(manifest, models[0], self.layout.cycle(k, "scores"), self.spec, self.job, **extra)
        storage.write_bytes(done, b"")
        return True

    def _select(self, k: int) -> bool:
        out = self.layout.cycle(k, "selected.parquet")
        if storage.exists(out):
            return True
        folder = self.layout.cycle(k, "scores")
        scores = reduce.read_scores(folder, self.job.acquisition.strategy)
        selection = reduce.select_from_scores(
            scores,
            self.job.acquisition.budget,
            strategy=self.job.acquisition.strategy,
            seed=self.job.seed + k,
            exclude=labeled_ids(self.layout, k),
            diverse=self.diversity(),
            embeddings=lambda ids: reduce.read_embeddings(folder, ids),
        )
        classes = selection.classes if selection.classes is not None else np.full(len(selection.image_ids), -1)
        histogram = {"none" if c < 0 else self.pool.classes[c - 1]: 0 for c in classes}
        for c in classes:
            histogram["none" if c < 0 else self.pool.classes[c - 1]] += 1
        storage.write_json(
            self.layout.cycle(k, "selected-classes.json"),
            {"classes": histogram, "dropped_duplicates": selection.dropped_duplicates},
        )  # first: selected.parquet marks the step done
        storage.write_parquet(
            out,
            pa.table(
                {
                    "image_id": pa.array(selection.image_ids.tolist(), pa.string()),
                    "score": selection.scores,
                    "rank": selection.ranks,
                    "top_class": pa.array(classes, pa.int64()),
                }
            ),
        )
        shown = ", ".join(f"{name} {count}" for name, count in sorted(histogram.items(), key=lambda kv: -kv[1])[:5])
        self.progress(f"cycle {k}: selected {len(selection.image_ids)} images (predicted classes: {shown or '-'})")
        return True

    def diversity(self) -> reduce.Diversity:
        """The job's ``almdn_diverse`` settings, the class target as label -> share (label i = classes[i - 1])."""
        a = self.job.acquisition
        target = a.class_target
        if target == "uniform":
            target = {label: 1.0 for label in range(1, len(self.pool.classes) + 1)}
        elif isinstance(target, dict):
            unknown = self._unknown_classes(target)
            if unknown:
                raise SpecError(
                    f"acquisition.class_target names {unknown}, not classes of the pool; "
                    f"choose among {list(self.pool.classes)}"
                )
            target = {self.pool.classes.index(name) + 1: float(share) for name, share in target.items()}
        return reduce.Diversity(
            beta=a.beta, min_distance=a.min_distance, features=a.diversity_features, target=target, max_beta=a.max_beta
        )

    def _label(self, k: int) -> bool:
        out = self.layout.cycle(k + 1, "labeled.parquet")
        if storage.exists(out):
            return True
        if self.job.labels.mode == "human" and not storage.exists(self.layout.cycle(k, "labels.json")):
            return False
        before = labeled_ids(self.layout, k)
        selected = storage.read_parquet(self.layout.cycle(k, "selected.parquet")).column("image_id").to_pylist()
        twice = set(before) & set(selected)
        if twice:
            raise RuntimeError(
                f"cycle {k}: {len(twice)} selected images are already labelled, e.g. {sorted(twice)[:3]}"
            )
        storage.write_parquet(out, pa.table({"image_id": sorted(before + selected)}))
        return True
