"""almdn_diverse end to end on the reduce's side: embeddings from the real scoring pass, the diverse batch, the
class target, and the embedding columns' encoding."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from almdn_ray import acquisition
from almdn_ray.config import spec_from_dict
from almdn_ray.data.demo import DemoConfig, build_demo
from almdn_ray.data.manifest import rows_from_dataset
from almdn_ray.data.validate import read_dataset
from almdn_ray.model.detector import ModelSpec
from almdn_ray.model.postprocess import PostprocessConfig
from almdn_ray.reduce import SCORE_SCHEMA, Diversity, embedding_matrix, select_from_scores
from almdn_ray.scoring import MAX_OBJECT_EMBEDDINGS, Embedder, score_table

COPIES = 5


@pytest.fixture(scope="module")
def burst_pool(tmp_path_factory):
    """12 demo scenes, each 5 times with faint noise (the demo's near-duplicate knob), scored by one model
    with and without embeddings."""
    config = DemoConfig(image_size=96, digit_size=(30, 60), near_duplicates=COPIES - 1)
    paths = build_demo(tmp_path_factory.mktemp("bursts"), pool_images=12 * COPIES, test_images=1, config=config)
    pool = read_dataset(str(paths["pool"]), split="pool")
    scene = {str(image["id"]): image["scene"] for image in json.loads(paths["pool"].read_text())["images"]}
    manifest = pa.table(dict(zip(["image_id", "uri", "width", "height"], zip(*rows_from_dataset(pool)))))
    torch.manual_seed(0)
    model = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=pool.num_classes, image_size=96).build().eval()
    config = PostprocessConfig(min_confidence=0.0)  # an untrained model: keep its low-confidence detections
    plain = score_table(model, manifest, batch_size=16, config=config)
    embedded = score_table(model, manifest, batch_size=16, config=config, embedder=Embedder(64))
    return scene, plain, embedded


def test_almdn_takes_copies_of_one_scene_and_almdn_diverse_none(burst_pool):
    scene, plain, scores = burst_pool
    top = select_from_scores(scores, 6, strategy="almdn")
    assert len({scene[i] for i in top.image_ids}) < 6  # copies score alike: top-K takes several of one scene
    for features in ("image", "objects"):
        diverse = select_from_scores(scores, 6, strategy="almdn_diverse", diverse=Diversity(features=features))
        assert len(diverse.image_ids) == 6 and len({scene[i] for i in diverse.image_ids}) == 6, features
        assert diverse.dropped_duplicates > 0
    # labelled images count as picked: no copy of a labelled scene comes back
    labelled = [i for i in scores.column("image_id").to_pylist() if scene[i] < 4]
    again = select_from_scores(scores, 6, strategy="almdn_diverse", exclude=labelled, diverse=Diversity(beta=8))
    assert len({scene[i] for i in again.image_ids}) == len(again.image_ids) >= 4
    assert min(scene[i] for i in again.image_ids) >= 4


def test_too_few_candidates_beyond_min_distance_widen_until_the_budget_is_filled(burst_pool, caplog):
    scene, _, scores = burst_pool
    # the top 10 by score are copies of a few scenes: without widening, fewer than 10 survive min_distance
    narrow = select_from_scores(scores, 10, strategy="almdn_diverse", diverse=Diversity(beta=1, max_beta=1))
    assert len(narrow.image_ids) < 10 and "raise acquisition.max_beta" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="almdn_ray.reduce"):
        wide = select_from_scores(scores, 10, strategy="almdn_diverse", diverse=Diversity(beta=1))
    assert "widening to the top 20 by score" in caplog.text and "raise acquisition.max_beta" not in caplog.text
    assert len(wide.image_ids) == 10 and len({scene[i] for i in wide.image_ids}) == 10
    # the first candidates' picks stay: the best score leads both batches
    assert wide.image_ids[0] == narrow.image_ids[0]
    # a pool with fewer distinct scenes than the budget gives what it has, with the warning
    caplog.clear()
    short = select_from_scores(scores, 13, strategy="almdn_diverse", diverse=Diversity(beta=1))
    assert len({scene[i] for i in short.image_ids}) == len(short.image_ids) <= 12
    assert "raise acquisition.max_beta" in caplog.text


def test_embeddings_come_from_the_scoring_pass_and_change_no_score(burst_pool):
    _, plain, scores = burst_pool
    for name in acquisition.summary_columns() + ["top_class", "image_id"]:
        assert scores.column(name).to_pylist() == plain.column(name).to_pylist(), name
    assert plain.column("embedding").null_count == plain.num_rows  # off unless asked for
    images = embedding_matrix(scores.column("embedding"))
    assert images.shape == (scores.num_rows, 64)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=2e-3)  # unit rows, as float16
    widths = [len(b) // 2 for b in scores.column("det_embedding").to_pylist()]
    counts = scores.column("n_det").to_pylist()
    assert widths == [64 * min(n, MAX_OBJECT_EMBEDDINGS) for n in counts] and max(counts) > MAX_OBJECT_EMBEDDINGS


def synthetic_scores(rng, classes, dims=16):
    n = len(classes)
    values = rng.uniform(size=(n, 4))
    summary = acquisition.summarize(np.arange(n), values, n, values[:, 0])
    return pa.Table.from_pydict(
        {
            "image_id": [f"img-{i:04d}" for i in range(n)],
            **summary,
            "top_class": classes,
            "embedding": [row.astype(np.float16).tobytes() for row in rng.normal(size=(n, dims))],
            "det_embedding": [None] * n,
            "seconds": np.full(n, 0.01),
            "error": [None] * n,
            "worker": ["w"] * n,
        },
        schema=SCORE_SCHEMA,
    )


def test_a_class_target_moves_a_five_to_one_selection_towards_it():
    rng = np.random.default_rng(5)
    scores = synthetic_scores(rng, np.array([1] * 1000 + [2] * 200))
    plain = select_from_scores(scores, 50, strategy="almdn_diverse")
    even = select_from_scores(scores, 50, strategy="almdn_diverse", diverse=Diversity(target={1: 1, 2: 1}))
    leaning = select_from_scores(scores, 50, strategy="almdn_diverse", diverse=Diversity(target={1: 1, 2: 3}))
    share = {name: float(np.mean(s.classes == 2)) for name, s in [("plain", plain), ("even", even), ("3x", leaning)]}
    assert share["plain"] < 0.3  # about one in six as in the pool
    assert abs(share["even"] - 0.5) < abs(share["plain"] - 0.5) / 2  # leans as far as the candidates allow
    assert share["3x"] > share["even"]
    assert len(set(even.image_ids)) == 50


def test_with_every_unlabelled_image_unreadable_almdn_diverse_selects_what_almdn_does():
    scores = synthetic_scores(np.random.default_rng(2), np.ones(20, np.int64))
    unreadable = [None] * 10 + ["cannot identify image file"] * 10  # as the scoring pass records them
    embeddings = scores.column("embedding").to_pylist()[:10] + [None] * 10
    scores = scores.set_column(scores.schema.get_field_index("error"), "error", pa.array(unreadable, pa.string()))
    scores = scores.set_column(scores.schema.get_field_index("embedding"), "embedding", pa.array(embeddings))
    labelled = scores.column("image_id").to_pylist()[:10]
    plain = select_from_scores(scores, 5, strategy="almdn", exclude=labelled)
    diverse = select_from_scores(scores, 5, strategy="almdn_diverse", exclude=labelled)
    assert plain.image_ids.tolist() == diverse.image_ids.tolist() == []
    assert diverse.scores.shape == diverse.ranks.shape == diverse.classes.shape == (0,)


def test_the_embedding_columns_decode_to_rows_and_detection_means():
    rng = np.random.default_rng(0)
    dims = 4
    objects = [rng.normal(size=(k, dims)).astype(np.float16) for k in (2, 0, 3, 1)]
    column = pa.array([objects[0].tobytes(), None, b"", objects[2].tobytes(), None, objects[3].tobytes()])
    means = embedding_matrix(column, mean_of_rows=dims)
    expected = [objects[0].astype(np.float32).mean(0), 0, 0, objects[2].astype(np.float32).mean(0), 0, objects[3][0]]
    np.testing.assert_allclose(means, np.stack([np.broadcast_to(np.float32(e), dims) for e in expected]), rtol=1e-6)
    np.testing.assert_allclose(embedding_matrix(column.slice(3), mean_of_rows=dims), means[3:], rtol=1e-6)
    rows = [rng.normal(size=dims).astype(np.float16) for _ in range(3)]
    images = pa.chunked_array([[rows[0].tobytes(), None], [rows[2].tobytes()]])
    np.testing.assert_array_equal(embedding_matrix(images), np.stack([rows[0], np.zeros(dims), rows[2]]))
    with pytest.raises(ValueError, match="different widths"):
        embedding_matrix(pa.array([rows[0].tobytes(), rows[1][:2].tobytes()]))
    with pytest.raises(ValueError, match="multiples of the embedding width"):
        embedding_matrix(pa.array([objects[0].tobytes()[:-2]]), mean_of_rows=dims)


def test_scores_without_embeddings_are_refused_with_the_fix():
    scores = synthetic_scores(np.random.default_rng(1), np.ones(20, np.int64))
    scores = scores.set_column(scores.schema.get_field_index("embedding"), "embedding", pa.nulls(20, pa.binary()))
    with pytest.raises(ValueError, match="embedding_dims > 0"):
        select_from_scores(scores, 5, strategy="almdn_diverse")


@pytest.mark.parametrize(
    "acquisition_spec, message",
    [
        ({"strategy": "almdn_diverse", "embedding_dims": 0}, "set embedding_dims > 0"),
        ({"beta": 0.5}, "beta must be >= 1"),
        ({"beta": 8, "max_beta": 4}, "max_beta .* must be >= acquisition.beta"),
        ({"diversity_features": "pixels"}, "choose image or objects"),
        ({"class_target": "even"}, "give uniform or a mapping"),
        ({"class_target": {"cat": -1}}, "shares must be numbers >= 0"),
        ({"min_distance": float("nan")}, r"acquisition.min_distance: expected a number, got nan"),
        ({"class_target": {"cat": 1, "dog": float("nan")}}, r"class_target.dog: shares must be numbers >= 0, got nan"),
    ],
)
def test_bad_diversity_settings_name_the_key(acquisition_spec, message, tmp_path):
    with pytest.raises(Exception, match=message):
        spec_from_dict(
            {"storage": {"uri": str(tmp_path)}, "dataset": {"train": "x.json"}, "acquisition": acquisition_spec}
        )


def test_from_score_files_the_reduce_reads_only_the_candidates_embeddings(burst_pool, tmp_path):
    from almdn_ray import storage
    from almdn_ray.reduce import read_embeddings, read_scores

    _, _, scores = burst_pool
    storage.write_parquet(str(tmp_path / "part-0.parquet"), scores.slice(0, 25))
    storage.write_parquet(str(tmp_path / "part-1.parquet"), scores.slice(25))
    narrow = read_scores(str(tmp_path), "almdn_diverse")
    assert "embedding" not in narrow.column_names and "top_class" in narrow.column_names
    asked = []

    def embeddings(ids):
        asked.append(len(ids))
        return read_embeddings(str(tmp_path), ids)

    labelled = scores.column("image_id").to_pylist()[:10]
    from_files = select_from_scores(narrow, 6, strategy="almdn_diverse", exclude=labelled, embeddings=embeddings)
    in_memory = select_from_scores(scores, 6, strategy="almdn_diverse", exclude=labelled)
    assert from_files.image_ids.tolist() == in_memory.image_ids.tolist()
    # the labelled images, then beta x budget candidates, widened once (24 held fewer than 6 beyond min_distance)
    assert asked == [10, 24, 48]
    assert read_embeddings(str(tmp_path)).num_rows == scores.num_rows
