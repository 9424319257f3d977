"""The job spec: frozen dataclasses read from YAML, rejecting unknown keys and bad values by name."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from almdn_ray import acquisition
from almdn_ray.model.detector import ModelSpec
from almdn_ray.model.postprocess import PostprocessConfig
from almdn_ray.training import TrainRecipe

__all__ = ["SpecError", "JobSpec", "load_spec", "spec_to_dict", "spec_from_dict", "diff_specs"]

SPEC_VERSION = 1


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class StorageSpec:
    uri: str = "runs/quickstart"  # local path, file:// or s3://bucket/prefix
    endpoint: str | None = None  # S3-compatible endpoint (MinIO, Ceph); default: AWS_ENDPOINT_URL
    # S3 requests that fail transiently (503 SlowDown, resets, timeouts) are retried with backoff, by pyarrow and
    # boto3 alike, in the driver and in every Ray worker. null: AWS_MAX_ATTEMPTS, else 10 attempts in all.
    max_attempts: int | None = None
    connect_timeout_s: float | None = None  # null: 10 s
    read_timeout_s: float | None = None  # seconds without an answer byte before the attempt counts failed; null: 60

    # Keys that tune how storage is reached, not what the run computes: a resume may change them.
    RETUNABLE: typing.ClassVar[tuple[str, ...]] = ("max_attempts", "connect_timeout_s", "read_timeout_s")

    def settings(self) -> dict:
        """The keyword arguments of :func:`almdn_ray.storage.configure` for this storage."""
        return {"endpoint": self.endpoint, **{key: getattr(self, key) for key in self.RETUNABLE}}

    def __post_init__(self):
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"storage.max_attempts must be at least 1 (1: no retry), got {self.max_attempts}")
        for key in ("connect_timeout_s", "read_timeout_s"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"storage.{key} must be a positive number of seconds, got {value}")
        if not self.uri.strip():
            raise ValueError("storage.uri is empty: give the run's folder (a path, file:// or s3://bucket/prefix)")
        if "://" in self.uri and not self.uri.startswith(("s3://", "file://")):
            scheme = self.uri.split("://", 1)[0]
            raise ValueError(
                f"storage.uri {self.uri!r}: {scheme}:// is not supported; use a local path, file:// or s3:// "
                "(for GCS, its S3-compatible endpoint: s3:// with storage.endpoint https://storage.googleapis.com)"
            )


@dataclass(frozen=True)
class DatasetSpec:
    train: str = "data/demo/pool.json"  # the pool: COCO JSON, VOC devkit folder, or a manifest (`pool build`)
    test: str = "data/demo/test.json"
    labels: str | None = None  # with a manifest pool: COCO JSON / VOC devkit of the labels that exist
    train_split: str | None = None  # VOC: ImageSets/Main/<split>.txt (default trainval)
    test_split: str | None = None  # VOC: default test
    train_image_root: str | None = None  # COCO: folder the train file_names are relative to (default: JSON's)
    test_image_root: str | None = None
    classes: list[str] | None = None  # VOC: class names (default: the 20 VOC classes)

    def __post_init__(self):
        if self.classes is not None:
            if not self.classes:
                raise ValueError("dataset.classes is empty: list the class names, or remove the key")
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if repeated:
                raise ValueError(f"dataset.classes names {repeated} more than once")


@dataclass(frozen=True)
class AcquisitionSpec:
    strategy: str = "almdn"
    initial_labeled: int = 100
    budget: int = 100
    cycles: int = 4
    score_threshold: float = 0.01
    nms_iou: float = 0.45
    max_per_class: int = 200
    min_confidence: float = 0.5
    mc_passes: int = 10  # mc_dropout: forward passes with dropout on per image
    ensemble_size: int = 3  # ensemble: independently seeded models trained per cycle
    embedding_dims: int = 128  # per-image and per-detection embeddings in the score files; 0 = none
    beta: float = 4.0  # almdn_diverse: candidates = the top beta x budget by AL-MDN score
    min_distance: float = 0.05  # almdn_diverse: no pick nearer than this to another pick or a labelled image
    max_beta: float = 32.0  # almdn_diverse: too few picks survive min_distance: candidates double up to this x budget
    diversity_features: str = "image"  # almdn_diverse: image embeddings, or objects (mean of detections')
    class_target: Any = None  # almdn_diverse: None, "uniform", or {class name: share} to lean the batch towards

    def __post_init__(self):
        if self.strategy not in acquisition.STRATEGIES:
            raise ValueError(
                f"acquisition.strategy: unknown {self.strategy!r}; choose one of {sorted(acquisition.STRATEGIES)}"
            )
        if self.mc_passes < 2:
            raise ValueError(f"acquisition.mc_passes must be >= 2, got {self.mc_passes}")
        if self.ensemble_size < 2:
            raise ValueError(f"acquisition.ensemble_size must be >= 2, got {self.ensemble_size}")
        for name in ("initial_labeled", "budget", "cycles"):
            if getattr(self, name) < 1:
                raise ValueError(f"acquisition.{name} must be >= 1, got {getattr(self, name)}")
        if self.embedding_dims < 0:
            raise ValueError(f"acquisition.embedding_dims must be >= 0 (0 = no embeddings), got {self.embedding_dims}")
        if self.strategy in acquisition.DIVERSE_STRATEGIES and self.embedding_dims == 0:
            raise ValueError(f"acquisition.strategy {self.strategy} selects by embeddings: set embedding_dims > 0")
        if self.beta < 1.0:
            raise ValueError(f"acquisition.beta must be >= 1 (candidates = beta x budget), got {self.beta}")
        if self.min_distance < 0:
            raise ValueError(f"acquisition.min_distance must be >= 0, got {self.min_distance}")
        if self.max_beta < self.beta:
            raise ValueError(
                f"acquisition.max_beta ({self.max_beta}) must be >= acquisition.beta ({self.beta}): the candidates "
                "start at beta x budget and widen up to max_beta x budget"
            )
        if self.diversity_features not in ("image", "objects"):
            raise ValueError(
                f"acquisition.diversity_features: choose image or objects, got {self.diversity_features!r}"
            )
        target = self.class_target
        if not (target is None or target == "uniform" or isinstance(target, dict)):
            raise ValueError(
                f"acquisition.class_target: give uniform or a mapping of class name to share, got {target!r}"
            )
        if isinstance(target, dict):
            for name, share in target.items():
                if (
                    not isinstance(share, int | float)
                    or isinstance(share, bool)
                    or not math.isfinite(share)
                    or share < 0
                ):
                    raise ValueError(f"acquisition.class_target.{name}: shares must be numbers >= 0, got {share!r}")
            if sum(target.values()) <= 0:
                raise ValueError(f"acquisition.class_target: shares must be numbers >= 0, not all 0; got {target}")
        self.postprocess()

    def postprocess(self) -> PostprocessConfig:
        return PostprocessConfig(
            score_threshold=self.score_threshold,
            nms_iou=self.nms_iou,
            max_per_class=self.max_per_class,
            min_confidence=self.min_confidence,
        )


@dataclass(frozen=True)
class LabelSpec:
    mode: str = "simulate"  # simulate: reveal the dataset's labels; human: export, wait, import

    def __post_init__(self):
        if self.mode not in ("simulate", "human"):
            raise ValueError(f"labels.mode must be 'simulate' or 'human', got {self.mode!r}")


@dataclass(frozen=True)
class ResourceSpec:
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False  # one GPU per training worker, per scoring actor and for EVAL
    cpus_per_worker: float | None = None  # default: the most that places every worker on the nodes that exist
    scoring_actors: int | None = None  # default: one per GPU (use_gpu) or per CPU
    scoring_batch_size: int | None = None  # images per scoring batch; default: 256 on a GPU, 16 on CPU
    eval_batch_size: int = 16
    decode_in_tasks: bool | None = None  # SCORE reads/decodes/resizes in Ray Data CPU tasks; default: with use_gpu
    mixed_precision: bool = True  # bf16 autocast on CUDA for TRAIN, SCORE and EVAL (false: float32)
    placement_timeout_s: float = 30.0  # how long a request that fits no node waits for nodes before failing

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"resources.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"resources.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.placement_timeout_s < 0:
            raise ValueError(f"resources.placement_timeout_s must be >= 0, got {self.placement_timeout_s}")
        if self.scoring_batch_size is not None and self.scoring_batch_size < 1:
            raise ValueError(f"resources.scoring_batch_size must be >= 1 or null, got {self.scoring_batch_size}")

    @property
    def scoring_batch(self) -> int:
        """Images per scoring batch: ``scoring_batch_size``, or what fills the device (a GPU's forward pass runs
        near its peak from ~256 images of 300 px; on CPU small batches keep the actors' memory low)."""
        if self.scoring_batch_size is not None:
            return self.scoring_batch_size
        return 256 if self.use_gpu else 16

    @property
    def split_decode(self) -> bool:
        return self.use_gpu if self.decode_in_tasks is None else self.decode_in_tasks


@dataclass(frozen=True)
class JobSpec:
    version: int = SPEC_VERSION
    name: str = "quickstart"
    seed: int = 0
    storage: StorageSpec = field(default_factory=StorageSpec)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    model: ModelSpec = field(default_factory=ModelSpec)  # num_classes: null = from the dataset
    train: TrainRecipe = field(default_factory=TrainRecipe)
    warm_start: bool = False  # start each cycle from the previous cycle's model instead of the backbone
    acquisition: AcquisitionSpec = field(default_factory=AcquisitionSpec)
    labels: LabelSpec = field(default_factory=LabelSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)

    def __post_init__(self):
        if self.version != SPEC_VERSION:
            raise ValueError(f"version: this almdn-ray reads job spec version {SPEC_VERSION}, got {self.version}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.acquisition.strategy == "mc_dropout" and self.model.dropout <= 0:
            raise ValueError(
                "acquisition.strategy is mc_dropout but model.dropout is 0: MC dropout needs dropout in the model; "
                "set model.dropout (e.g. 0.1)"
            )

    @property
    def ensemble_members(self) -> int:
        """Models trained per cycle: ``acquisition.ensemble_size`` for the ensemble strategy, else 1."""
        return self.acquisition.ensemble_size if self.acquisition.strategy == "ensemble" else 1


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        section = f"{where}: " if where else ""
        raise SpecError(f"{section}unknown key(s) {unknown}; known keys here: {sorted(known)} (check the spelling)")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**values)
    except SpecError:
        raise
    except (TypeError, ValueError) as error:
        text = str(error)
        raise SpecError(text if where and text.startswith(f"{where}.") else f"{where or 'job'}: {text}") from error


def _convert(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        return origin(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint in (int, str) and not (isinstance(value, hint) and not isinstance(value, bool)):
        raise SpecError(f"{where}: expected {'an integer' if hint is int else 'a string'}, got {value!r}")
    return value


def spec_from_dict(data: dict, source: str = "job spec") -> JobSpec:
    try:
        return _build(JobSpec, data, "")
    except SpecError as error:
        raise SpecError(f"{source}: {error}") from error


def load_spec(path: str | Path) -> JobSpec:
    """Read a job spec YAML; every problem is a :class:`SpecError` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: job spec not found; give the path of a YAML file such as jobs/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({error})") from error
    return spec_from_dict(data, str(path))


def spec_to_dict(spec: JobSpec) -> dict:
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(spec))


def diff_specs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two spec dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += diff_specs(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed
