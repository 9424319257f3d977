import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from almdn_ray import acquisition as acq


def test_almdn_scores_by_hand():
    # Image 0: two detections, image 1: one, image 2: none. Only loc_al varies; other terms are constant.
    image_index = np.array([0, 0, 1])
    values = np.array([[0.1, 0.5, 0.5, 0.5], [0.3, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    scores = acq.almdn_scores(image_index, values, num_images=3)
    mean, std = 0.3, np.sqrt(((0.1 - 0.3) ** 2 + 0 + (0.5 - 0.3) ** 2) / 3)  # population std over detections
    assert scores[0] == pytest.approx(max((0.3 - mean) / std, 0.0))  # constant terms z-score to 0
    assert scores[1] == pytest.approx((0.5 - mean) / std)
    assert scores[2] == -np.inf


def test_normalisation_is_over_detections_not_images():
    # Image 0 has many low detections; per-detection stats differ from per-image-max stats.
    image_index = np.array([0, 0, 0, 0, 1])
    values = np.zeros((5, 4))
    values[:, 2] = [0.1, 0.1, 0.1, 0.2, 0.9]
    scores = acq.almdn_scores(image_index, values, num_images=2)
    column = values[:, 2]
    assert scores[1] == pytest.approx((0.9 - column.mean()) / column.std())


def pools():
    return (
        st.integers(1, 12)
        .flatmap(
            lambda n: st.tuples(
                st.just(n),
                hnp.arrays(np.int64, st.integers(0, 40), elements=st.integers(0, n - 1)),
            )
        )
        .flatmap(
            lambda t: st.tuples(
                st.just(t[0]),
                st.just(t[1]),
                hnp.arrays(np.float64, (t[1].shape[0], 4), elements=st.floats(0, 1, width=32)),
            )
        )
    )


@settings(max_examples=60, deadline=None)
@given(pool=pools())
def test_summary_form_gives_the_reference_scores(pool):
    num_images, image_index, values = pool
    reference = acq.almdn_scores(image_index, values, num_images)
    from_summaries = acq.strategy_scores("almdn", acq.summarize(image_index, values, num_images))
    np.testing.assert_array_equal(np.isneginf(reference), np.isneginf(from_summaries))
    finite = np.isfinite(reference)
    np.testing.assert_allclose(from_summaries[finite], reference[finite], rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    pool=pools(),
    cuts=st.lists(st.integers(0, 12), max_size=4),
    seed=st.integers(0, 2**16),
    budget=st.integers(0, 14),
    strategy=st.sampled_from(sorted(acq.STRATEGIES)),
)
def test_scoring_in_chunks_selects_what_scoring_whole_selects(pool, cuts, seed, budget, strategy):
    num_images, image_index, values = pool
    entropy = values.sum(axis=1)
    ids = np.random.default_rng(seed).permutation(1000)[:num_images] + 7  # arbitrary unique ids
    whole = acq.select(ids, acq.summarize(image_index, values, num_images, entropy), budget, strategy=strategy, seed=3)
    # Summarise chunks of images separately (as shards would), then reduce them in shuffled order.
    bounds = sorted({0, num_images, *[min(c, num_images) for c in cuts]})
    chunk_ids, chunk_summaries = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = (image_index >= lo) & (image_index < hi)
        chunk_ids.append(ids[lo:hi])
        chunk_summaries.append(acq.summarize(image_index[rows] - lo, values[rows], hi - lo, entropy[rows]))
    order = np.random.default_rng(seed + 1).permutation(len(chunk_ids))
    merged = {name: np.concatenate([chunk_summaries[i][name] for i in order]) for name in acq.summary_columns()}
    chunked = acq.select(np.concatenate([chunk_ids[i] for i in order]), merged, budget, strategy=strategy, seed=3)
    np.testing.assert_array_equal(chunked.image_ids, whole.image_ids)
    np.testing.assert_array_equal(chunked.scores, whole.scores)


def test_select_top_order_ties_and_infinities():
    scores = np.array([0.5, -np.inf, 2.0, 0.5, np.nan, 2.0, 1.0])
    assert acq.select_top(scores, 7).tolist() == [2, 5, 6, 0, 3, 1, 4]
    assert acq.select_top(scores, 3).tolist() == [2, 5, 6]
    assert acq.select_top(scores, 4).tolist() == [2, 5, 6, 0]  # tie at 0.5 goes to the lower index
    assert acq.select_top(scores, 100).tolist() == [2, 5, 6, 0, 3, 1, 4]
    assert acq.select_top(scores, 0).tolist() == []
    with pytest.raises(ValueError, match="budget"):
        acq.select_top(scores, -1)


@settings(max_examples=100, deadline=None)
@given(
    scores=hnp.arrays(
        np.float64, st.integers(0, 30), elements=st.sampled_from([-np.inf, 0.0, 0.25, 1.0, 3.0]) | st.floats(-5, 5)
    ),
    budget=st.integers(0, 35),
)
def test_select_top_matches_a_full_sort(scores, budget):
    expected = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:budget]
    assert acq.select_top(scores, budget).tolist() == expected


def test_strategies():
    summaries = acq.summarize(
        np.array([0, 1, 1, 2]),
        np.array([[0.1, 0.2, 0.3, 0.9], [0.9, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2], [0.3, 0.8, 0.3, 0.3]]),
        num_images=4,
        entropy=np.array([0.5, 0.1, 1.2, 0.7]),
    )
    assert np.argmax(acq.strategy_scores("loc_al", summaries)) == 1
    assert np.argmax(acq.strategy_scores("loc_ep", summaries)) == 2
    assert np.argmax(acq.strategy_scores("cls_ep", summaries)) == 0
    assert np.argmax(acq.strategy_scores("entropy", summaries)) == 1
    assert acq.strategy_scores("entropy", summaries)[3] == -np.inf  # image 3 has no detections
    assert acq.strategy_scores("almdn", summaries)[3] == -np.inf
    random_a = acq.strategy_scores("random", summaries, seed=1)
    np.testing.assert_array_equal(random_a, acq.strategy_scores("random", summaries, seed=1))
    assert not np.array_equal(random_a, acq.strategy_scores("random", summaries, seed=2))
    assert np.isfinite(random_a[3])  # random ignores detections
    with pytest.raises(ValueError, match="unknown strategy 'bald'"):
        acq.strategy_scores("bald", summaries)


def test_constant_term_and_empty_pool():
    summaries = acq.summarize(np.array([0, 1]), np.full((2, 4), 0.5), num_images=2)
    np.testing.assert_array_equal(acq.strategy_scores("almdn", summaries), [0.0, 0.0])
    empty = acq.summarize(np.zeros(0, np.int64), np.zeros((0, 4)), num_images=3)
    assert np.all(acq.strategy_scores("almdn", empty) == -np.inf)
    assert np.all(acq.almdn_scores(np.zeros(0, np.int64), np.zeros((0, 4)), 3) == -np.inf)


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match=r"values must be \[M, 4\]"):
        acq.almdn_scores(np.array([0]), np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="image_index must lie in"):
        acq.summarize(np.array([5]), np.zeros((1, 4)), 2)
    with pytest.raises(ValueError, match="unique"):
        acq.select(np.array([1, 1]), acq.summarize(np.array([0]), np.zeros((1, 4)), 2), 1)


def test_unscored_picks_are_a_seeded_random_draw_not_the_lowest_ids():
    # 5 images with a detection, 195 without: a budget of 25 takes the 5 scored first, then 20 drawn at random.
    num_images = 200
    image_index = np.array([10, 50, 90, 130, 170])
    values = np.random.default_rng(0).random((5, 4))
    summaries = acq.summarize(image_index, values, num_images, entropy=values[:, 0])
    ids = np.arange(num_images) + 1000
    for strategy in ("almdn", "entropy"):
        first = acq.select(ids, summaries, 25, strategy=strategy, seed=4)
        assert sorted(first.image_ids[:5].tolist()) == (image_index + 1000).tolist()
        assert np.all(np.isfinite(first.scores[:5])) and np.all(np.isneginf(first.scores[5:]))
        filled = first.image_ids[5:]
        assert len(set(filled.tolist())) == 20 and not set(filled.tolist()) & set((image_index + 1000).tolist())
        lowest = [i for i in ids.tolist() if i - 1000 not in image_index][:20]
        assert sorted(filled.tolist()) != lowest  # not id order
        assert max(filled.tolist()) > 1100  # spread over the pool
        again = acq.select(ids, summaries, 25, strategy=strategy, seed=4)
        np.testing.assert_array_equal(again.image_ids, first.image_ids)
        other = acq.select(ids, summaries, 25, strategy=strategy, seed=5)
        assert set(other.image_ids[5:].tolist()) != set(filled.tolist())
    # A budget the scored images cover draws nothing.
    np.testing.assert_array_equal(
        acq.select(ids, summaries, 3, seed=4).image_ids, acq.select(ids, summaries, 3, seed=9).image_ids
    )
