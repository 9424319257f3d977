import numpy as np
import pytest
import torch

from almdn_ray import acquisition, engine, storage
from almdn_ray.data.images import read_image
from almdn_ray.data.manifest import read_manifest, rows_from_dataset, write_manifest
from almdn_ray.data.records import Dataset
from almdn_ray.data.transforms import eval_transform
from almdn_ray.model import ModelSpec, PostprocessConfig
from almdn_ray.scoring import load_model, read_scores, select_from_scores
from tests.distributed.helpers import SIZE, write_scenes

SPEC = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=SIZE)
CONFIG = PostprocessConfig(min_confidence=0.2)  # an untrained model: plenty of uncertain detections
CORRUPT = (3, 17)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    records = write_scenes(folder / "images", 30, seed=4, corrupt=CORRUPT)
    torch.manual_seed(0)
    weights = folder / "model.pt"
    torch.save(SPEC.build().state_dict(), weights)
    return folder, records, str(weights)


def reference_selection(records, weights, budget):
    """The same model in one process with engine.predict, on the readable images."""
    model = load_model(SPEC, weights)
    readable = [r for i, r in enumerate(records) if i not in CORRUPT]
    images = torch.stack([eval_transform(SIZE)(read_image(r.uri)) for r in readable])
    detections = engine.predict(model, images, config=CONFIG, batch_size=4)
    index, values, entropy = acquisition.detection_values(detections)
    summaries = acquisition.summarize(index, values, len(readable), entropy)
    return acquisition.select(np.array([r.image_id for r in readable]), summaries, budget)


@pytest.mark.parametrize(("shards", "actors", "where"), [(1, 1, "local"), (3, 2, "local"), (3, 2, "s3")])
def test_every_row_once_and_the_same_selection_as_one_process(
    ray_session, pool, shards, actors, where, tmp_path, request
):
    from almdn_ray.distributed.score_pool import score_pool

    folder, records, weights = pool
    base = request.getfixturevalue("s3_bucket") + "/run" if where == "s3" else str(tmp_path)
    if where == "s3":
        storage.write_bytes(f"{base}/model.pt", open(weights, "rb").read())
        weights = f"{base}/model.pt"
    write_manifest(
        rows_from_dataset(Dataset(records, ("red", "blue"))), f"{base}/pool", rows_per_shard=-(-len(records) // shards)
    )
    assert len(storage.list_files(f"{base}/pool", pattern="manifest-*.parquet")) == shards
    out = score_pool(
        manifest_uri=f"{base}/pool",
        weights_uri=weights,
        out_uri=f"{base}/scores",
        spec=SPEC,
        postprocess=CONFIG,
        num_actors=actors,
        batch_size=4,
        rows_per_block=5,
    )
    scores = read_scores(out)
    ids = scores.column("image_id").to_pylist()
    assert sorted(ids) == sorted(r.image_id for r in records)  # every manifest row exactly once
    errors = dict(zip(ids, scores.column("error").to_pylist()))
    assert {i for i, e in errors.items() if e} == {f"scene_{i:04d}" for i in CORRUPT}
    assert "corrupt PNG" in errors["scene_0003"]
    if actors > 1:
        assert len(set(scores.column("worker").to_pylist())) == actors
    selection = select_from_scores(scores, 8)
    expected = reference_selection(records, pool[2], 8)
    assert selection.image_ids.tolist() == expected.image_ids.tolist()
    np.testing.assert_allclose(selection.scores, expected.scores, rtol=1e-5)


def test_rerun_overwrites_instead_of_appending(ray_session, pool, tmp_path):
    from almdn_ray.distributed.score_pool import score_pool

    _, records, weights = pool
    write_manifest(rows_from_dataset(Dataset(records[:10], ("red", "blue"))), str(tmp_path / "pool"))
    for _ in range(2):
        score_pool(
            manifest_uri=str(tmp_path / "pool"),
            weights_uri=weights,
            out_uri=str(tmp_path / "scores"),
            spec=SPEC,
            postprocess=CONFIG,
            num_actors=1,
            batch_size=4,
            rows_per_block=5,
        )
    assert read_scores(str(tmp_path / "scores")).num_rows == 10
    assert read_manifest(str(tmp_path / "pool")).num_rows == 10


def test_a_pool_of_every_odd_image_kind_is_scored_or_recorded_once(ray_session, pool, tmp_path):
    from almdn_ray.distributed.score_pool import score_pool
    from tests.data.odd_images import write_odd_images

    odd = write_odd_images(tmp_path / "odd")
    rows = [(name, path, 56, 40) for name, (path, _) in odd.items()]
    write_manifest(rows, str(tmp_path / "pool"), rows_per_shard=5)
    out = score_pool(
        manifest_uri=str(tmp_path / "pool"),
        weights_uri=pool[2],
        out_uri=str(tmp_path / "scores"),
        spec=SPEC,
        postprocess=CONFIG,
        num_actors=2,
        batch_size=4,
        rows_per_block=3,
    )
    scores = read_scores(out)
    ids = scores.column("image_id").to_pylist()
    assert sorted(ids) == sorted(odd)  # every row once: none lost with its batch, none repeated
    errors = dict(zip(ids, scores.column("error").to_pylist()))
    # The workers keep the real size limit: the 120 x 100 "huge" image is an ordinary one there.
    assert {name for name, e in errors.items() if e} == {"truncated.jpg", "empty.png", "text.jpg"}
    assert all(odd[name][0] in errors[name] for name in ("truncated.jpg", "empty.png", "text.jpg"))
    n_det = dict(zip(ids, scores.column("n_det").to_pylist()))
    assert all(n_det[name] >= 0 for name in odd)
