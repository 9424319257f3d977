import numpy as np
import pytest

from almdn_ray.acquisition import select_top
from almdn_ray.diversity import _min_distance_to, class_histogram, diverse_subset, duplicate_groups, normalise


def copied_pool(distinct=40, copies=5, dims=64, noise=1e-3, seed=0):
    """``distinct`` random images, each present ``copies`` times with tiny noise; copies score almost alike."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(distinct, dims))
    features = np.repeat(base, copies, axis=0) + noise * rng.normal(size=(distinct * copies, dims))
    scores = np.repeat(rng.uniform(size=distinct), copies) + 1e-4 * rng.uniform(size=distinct * copies)
    return features, scores, np.repeat(np.arange(distinct), copies)


def test_top_k_takes_copies_and_the_diverse_batch_none():
    features, scores, source = copied_pool()
    top = select_top(scores, 10)
    assert len(set(source[top])) <= 2  # ten picks from two images: the redundancy this step removes
    result = diverse_subset(features, scores, 10, min_distance=0.1)
    assert len(result.picked) == 10 and len(set(source[result.picked])) == 10
    assert result.picked[0] == top[0]  # it starts from the most uncertain image
    assert result.dropped_duplicates >= 4 * 10  # the picks' own copies were left out


def test_near_copies_of_labelled_images_are_not_picked():
    features, scores, source = copied_pool()
    best = source[select_top(scores, 1)[0]]
    labelled = features[source == best][:1] + 1e-3
    result = diverse_subset(features, scores, 10, min_distance=0.1, labelled=labelled)
    assert best not in set(source[result.picked])
    assert len(set(source[result.picked])) == 10


def test_without_min_distance_the_score_weight_still_spreads_the_batch():
    features, scores, source = copied_pool()
    spread = diverse_subset(features, scores, 10)  # a copy is at distance ~0: k-center never takes it second
    assert len(set(source[spread.picked])) == 10
    assert spread.dropped_duplicates == 0


def test_the_budget_shrinks_when_only_duplicates_are_left(caplog):
    features, scores, source = copied_pool(distinct=3)
    result = diverse_subset(features, scores, 5, min_distance=0.1)
    assert sorted(source[result.picked]) == [0, 1, 2]
    assert "raise acquisition.max_beta" in caplog.text


def test_a_uniform_class_target_moves_a_five_to_one_batch_towards_even():
    rng = np.random.default_rng(3)
    classes = np.array([1] * 500 + [2] * 100)  # the model predicts class 1 five times as often
    features = rng.normal(size=(600, 32))
    scores = rng.uniform(size=600)
    plain = class_histogram(classes[diverse_subset(features, scores, 60, classes=classes).picked])
    balanced = diverse_subset(features, scores, 60, classes=classes, target={1: 1, 2: 1})
    lean = class_histogram(classes[balanced.picked])
    assert balanced.class_counts == lean and sum(lean.values()) == 60
    assert plain.get(2, 0) <= 20  # about one in six without a target
    assert lean[2] >= 25 and abs(lean[1] - lean[2]) < abs(plain[1] - plain.get(2, 0))


def test_a_target_share_is_followed_not_just_equalised():
    rng = np.random.default_rng(4)
    classes = np.array([1] * 300 + [2] * 300)
    features, scores = rng.normal(size=(600, 16)), rng.uniform(size=600)
    lean = class_histogram(classes[diverse_subset(features, scores, 40, classes=classes, target={1: 3, 2: 1}).picked])
    assert 27 <= lean[1] <= 33  # 3:1 of 40 is 30:10


def test_duplicate_groups_are_the_copies():
    features, _, source = copied_pool(distinct=12, copies=3)
    singles = np.random.default_rng(9).normal(size=(5, 64))
    groups = duplicate_groups(np.vstack([features, singles]), 0.1, block=7)
    assert len(groups) == 12
    assert all(g.shape[0] == 3 and len(set(source[g])) == 1 for g in groups)


def test_at_distance_0_byte_identical_rows_are_one_group():
    row = np.random.default_rng(2).normal(size=(1, 16)).astype(np.float32)  # its cosine with itself: 0.99999994
    rows = np.vstack([np.tile(row, (4, 1)), np.random.default_rng(3).normal(size=(3, 16))])
    assert [g.tolist() for g in duplicate_groups(rows, 0.0)] == [[0, 1, 2, 3]]
    rows[1, 0] += 0.1  # a near copy (distance ~0.02) is not identical
    assert [g.tolist() for g in duplicate_groups(rows, 0.0)] == [[0, 2, 3]]


def test_duplicate_groups_link_chains_and_many_near_copies():
    angles = np.arange(30) * 0.04  # each row 0.04 from the next; the ends 1.2 radians apart: one group
    chain = np.zeros((33, 4))
    chain[:30, 0], chain[:30, 1] = np.cos(angles), np.sin(angles)
    chain[30:, 2:] = [[1, 0], [0, 1], [1, 1]]
    assert [g.tolist() for g in duplicate_groups(chain, 0.05, block=7)] == [list(range(30))]
    rng = np.random.default_rng(1)
    scene, others = rng.normal(size=32), rng.normal(size=(200, 32))
    copies = scene + 1e-3 * rng.normal(size=(1000, 32))  # a video: 1,000 near-copies, half a million pairs
    groups = duplicate_groups(np.vstack([others[:100], copies, others[100:]]), 0.05, block=256)
    assert [(g.shape[0], g[0], g[-1]) for g in groups] == [(1000, 100, 1099)]


@pytest.mark.parametrize("seed", range(5))
def test_duplicate_groups_are_the_connected_components_of_the_near_pairs(seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(8, 3))[rng.integers(0, 8, 60)] + 0.05 * rng.normal(size=(60, 3))  # clumps
    points = normalise(features)
    near = points @ points.T >= 1 - 0.1**2 / 2  # the same cut-off, here by brute force
    groups, seen = [], set()
    for start in range(60):  # components by depth-first search
        stack, group = [start], set()
        while stack:
            i = stack.pop()
            if i not in group:
                group.add(i)
                stack += np.flatnonzero(near[i]).tolist()
        if start not in seen and len(group) > 1:
            groups.append(sorted(group))
        seen |= group
    found = duplicate_groups(features, 0.1, block=5)
    assert sorted(g.tolist() for g in found) == sorted(groups)


def test_distances_to_the_labelled_set_are_exact_in_blocks():
    rng = np.random.default_rng(5)
    points, others = normalise(rng.normal(size=(10, 8))), normalise(rng.normal(size=(7, 8)))
    brute = np.sqrt(((points[:, None] - others[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(_min_distance_to(points, others, 3), brute, atol=1e-3)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="one value per candidate"):
        diverse_subset(np.zeros((3, 2)), np.zeros(2), 1)
    with pytest.raises(ValueError, match="needs each candidate's predicted class"):
        diverse_subset(np.ones((3, 2)), np.zeros(3), 1, target={1: 1})
    with pytest.raises(ValueError, match="must be >= 0, got 1 and nan"):
        diverse_subset(np.ones((3, 2)), np.zeros(3), 1, min_distance=float("nan"))
    with pytest.raises(ValueError, match="labelled embeddings have 3 dims, the candidates' 2"):
        diverse_subset(np.ones((3, 2)), np.zeros(3), 1, labelled=np.ones((4, 3)))
