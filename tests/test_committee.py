"""The multi-model baselines: committee detections (MC dropout, ensembles), their scoring and their strategy."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from almdn_ray import acquisition, mdn, reduce, scoring, storage
from almdn_ray.config import SpecError, spec_from_dict
from almdn_ray.engine import predict_committee, recalibrate_batch_norm
from almdn_ray.model import MixtureOutputs, ModelSpec, PostprocessConfig, postprocess
from almdn_ray.model.anchors import make_box_coder
from almdn_ray.model.postprocess import committee
from tests.conftest import encode_image, random_image

ANCHORS = torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 70.0, 70.0], [60.0, 5.0, 95.0, 40.0]])


def random_outputs(seed: int, batch: int = 2, classes: int = 3, components: int = 2) -> MixtureOutputs:
    g = torch.Generator().manual_seed(seed)
    a = ANCHORS.shape[0]

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    logits = rand(batch, a, components, classes, scale=3.0)
    logits[..., 1] += 2.0  # foreground-leaning, so that anchors pass the thresholds
    return MixtureOutputs(
        rand(batch, a, components, 4, scale=0.3),
        rand(batch, a, components, 4),
        rand(batch, a, components, 4),
        logits,
        rand(batch, a, components, classes),
        rand(batch, a, components),
        ANCHORS,
    )


LOOSE = PostprocessConfig(score_threshold=0.01, min_confidence=0.0, nms_iou=0.99)


def test_a_committee_of_identical_members_detects_like_one_model_and_disagrees_nowhere():
    out = random_outputs(0)
    single = postprocess(out, box_coder=make_box_coder(), image_size=(100, 100), config=LOOSE)
    voted = committee([out, out, out], box_coder=make_box_coder(), image_size=(100, 100), config=LOOSE)
    for one, many in zip(single, voted):
        assert len(many.scores) > 0
        torch.testing.assert_close(many.boxes, one.boxes)
        torch.testing.assert_close(many.scores, one.scores)
        assert many.labels.tolist() == one.labels.tolist()
        assert float(many.cls_mi.abs().max()) < 1e-6 and float(many.loc_var.max()) == 0.0


def test_committee_disagreement_is_the_mutual_information_and_the_box_variance_at_each_detection():
    members = [random_outputs(seed) for seed in (1, 2, 3)]
    voted = committee(members, box_coder=make_box_coder(), image_size=(100, 100), config=LOOSE)
    probs = np.stack(
        [mdn.classification_moments(m.cls_logits, m.cls_sigma_logit, m.cls_pi_logit)[0].numpy() for m in members]
    )  # [T, B, A, C]
    locs = np.stack([mdn.localization_moments(m.loc_mu, m.loc_sigma_logit, m.loc_pi_logit)[0].numpy() for m in members])
    mean = probs.mean(axis=0)

    def entropy(p):
        return -(p * np.log(p)).sum(axis=-1)

    checked = 0
    for i, det in enumerate(voted):
        # Every detection's score is the committee's mean probability of its class at some anchor.
        for score, label, mi, var in zip(det.scores, det.labels, det.cls_mi, det.loc_var):
            (anchor,) = np.flatnonzero(np.isclose(mean[i, :, int(label)], float(score), rtol=0, atol=1e-6))[:1]
            expected_mi = entropy(mean[i, anchor]) - entropy(probs[:, i, anchor]).mean()
            assert float(mi) == pytest.approx(expected_mi, abs=1e-5) and expected_mi > 0
            assert float(var) == pytest.approx(locs[:, i, anchor].var(axis=0).max(), rel=1e-4)
            checked += 1
    assert checked >= 2
    with pytest.raises(ValueError, match="at least 2"):
        committee(members[:1], box_coder=make_box_coder(), image_size=(100, 100))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    uris = []
    for i in range(6):
        path = Path(folder, f"img-{i}.png")
        path.write_bytes(encode_image(random_image(64, 48, seed=i)))
        uris.append(str(path))
    return [f"img-{i}" for i in range(6)], uris


def small(dropout: float, seed: int = 0):
    """An untrained small model whose BatchNorm statistics fit its activations (fresh ones shrink the features
    to nearly zero, where no committee can disagree)."""
    torch.manual_seed(seed)
    model = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=64, dropout=dropout).build()
    recalibrate_batch_norm(model, [torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(9))], num_batches=1)
    return model.eval()


SCORING = PostprocessConfig(score_threshold=0.01, min_confidence=0.0)


def test_mc_dropout_scoring_adds_disagreement_and_keeps_the_deterministic_columns(pool):
    ids, uris = pool
    model = small(dropout=0.3)
    assert set(model.state_dict()) == set(small(dropout=0.0).state_dict())  # dropout adds no weights
    plain = scoring.score_images(model, ids, uris, config=SCORING)
    torch.manual_seed(0)
    mc = scoring.score_images(model, ids, uris, config=SCORING, mc_passes=4)
    assert not model.training and not model.head.dropout.training  # left in eval mode
    for name in acquisition.summary_columns()[:13] + ["entropy_max"]:
        np.testing.assert_array_equal(mc[name], plain[name])  # the deterministic pass is the plain scoring
    assert (plain["committee_n"] == 0).all() and (mc["committee_n"] > 0).all()
    assert (mc["cls_mi_max"] > 0).all() and (mc["loc_var_max"] > 0).all()
    assert (mc["seconds"] > 0).all()
    table = pa.Table.from_pydict(mc, schema=reduce.SCORE_SCHEMA)  # fits the score files' schema
    assert table.num_rows == len(ids)

    with pytest.raises(ValueError, match="model.dropout"):
        scoring.score_images(small(dropout=0.0), ids, uris, config=SCORING, mc_passes=4)


def test_an_ensemble_of_copies_agrees_and_of_different_models_disagrees(pool):
    ids, uris = pool
    model = small(dropout=0.0, seed=0)
    same = scoring.score_images(model, ids, uris, config=SCORING, members=[small(0.0, seed=0)])
    other = scoring.score_images(model, ids, uris, config=SCORING, members=[small(0.0, seed=1), small(0.0, seed=2)])
    assert (same["committee_n"] > 0).all()
    assert np.abs(same["cls_mi_max"]).max() < 1e-5 and same["loc_var_max"].max() == 0.0
    assert (other["cls_mi_max"] > 1e-4).all() and (other["loc_var_max"] > 0).all()
    with pytest.raises(ValueError, match=">= 2 predictions"):
        predict_committee([model], torch.zeros(1, 3, 64, 64), passes=1)


def committee_rows(rng, images: int):
    counts = rng.integers(0, 4, images)
    index = np.repeat(np.arange(images), counts)
    values = rng.random((index.shape[0], 2)) * [1.0, 0.01]
    return counts, index, values


def test_committee_strategy_z_scores_each_term_over_all_detections_and_ignores_sharding():
    rng = np.random.default_rng(0)
    images = 50
    counts, index, values = committee_rows(rng, images)
    summary = acquisition.summarize(np.zeros(0, np.int64), np.zeros((0, 4)), images, committee=(index, values))
    scores = acquisition.strategy_scores("ensemble", summary)
    mean, std = values.mean(axis=0), values.std(axis=0)
    for i in range(images):
        rows = values[index == i]
        expected = ((rows - mean) / std).max(axis=0).max() if len(rows) else -np.inf
        assert scores[i] == pytest.approx(expected)
    np.testing.assert_array_equal(scores, acquisition.strategy_scores("mc_dropout", summary))
    # Rows in another order, with the id order given, select the same images.
    ids = np.array([f"img-{i:03d}" for i in range(images)])
    shuffled = rng.permutation(images)
    chosen = acquisition.select(ids, summary, 10, strategy="ensemble")
    moved = acquisition.select(ids[shuffled], {k: v[shuffled] for k, v in summary.items()}, 10, strategy="ensemble")
    np.testing.assert_array_equal(chosen.image_ids, moved.image_ids)
    assert acquisition.strategy_columns("ensemble")[0] == "committee_n"


def test_the_reduce_reads_only_the_strategys_columns_and_selects_the_same(tmp_path):
    rng = np.random.default_rng(1)
    images = 40
    counts, index, values = committee_rows(rng, images)
    terms = rng.random((index.shape[0], 4))
    summary = acquisition.summarize(index, terms, images, terms[:, 0], committee=(index, values))
    table = pa.table(
        {
            "image_id": [f"img-{i:03d}" for i in range(images)],
            **summary,
            "top_class": np.ones(images, np.int64),
            "embedding": pa.nulls(images, pa.binary()),
            "det_embedding": pa.nulls(images, pa.binary()),
            "seconds": np.full(images, 0.01),
            "error": [None] * images,
            "worker": ["w"] * images,
        }
    ).cast(reduce.SCORE_SCHEMA)
    storage.write_parquet(str(tmp_path / "part-0.parquet"), table)
    for strategy in ("almdn", "entropy", "random", "ensemble"):
        narrow = reduce.read_scores(str(tmp_path), strategy)
        assert narrow.column_names == ["image_id", *acquisition.strategy_columns(strategy), "top_class", "error"]
        full = reduce.read_scores(str(tmp_path))
        a = reduce.select_from_scores(narrow, 7, strategy=strategy, seed=3)
        b = reduce.select_from_scores(full, 7, strategy=strategy, seed=3)
        assert a.image_ids.tolist() == b.image_ids.tolist()


def test_mc_dropout_needs_dropout_in_the_model_and_counts_are_checked():
    base = {"acquisition": {"strategy": "mc_dropout"}}
    with pytest.raises(SpecError, match="model.dropout"):
        spec_from_dict(base)
    assert spec_from_dict({**base, "model": {"dropout": 0.2}}).model.dropout == 0.2
    with pytest.raises(SpecError, match="acquisition.mc_passes"):
        spec_from_dict({"acquisition": {"mc_passes": 1}})
    with pytest.raises(SpecError, match="model.dropout must be in"):
        spec_from_dict({"model": {"dropout": 1.0}})
    job = spec_from_dict({"acquisition": {"strategy": "ensemble", "ensemble_size": 4}})
    assert job.ensemble_members == 4 and spec_from_dict({}).ensemble_members == 1
