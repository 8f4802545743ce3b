"""The RAPO reward core against hand-computed values, and its properties (hypothesis)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aesr1.rl.rewards import binary_reward, rapo_rewards

E = 1e-6  # the reference's epsilon inside each square root
GAMMA = 1e-6


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_two_images_by_hand():
    pred = [[0.6, 0.8], [0.2, 0.4]]
    gt = [0.7, 0.3]
    rank, absolute = rapo_rewards(pred, gt)
    # means 0.7 and 0.3; unbiased variances ((0.1)^2 + (0.1)^2) / 1 = 0.02 each
    scale = math.sqrt(0.02 + 0.02 + GAMMA)
    # image 0 ranks above image 1 (p_c = 1): reward sqrt(p + e) + sqrt(0 + e)
    p = phi((0.6 - 0.3) / scale)
    assert rank[0, 0] == pytest.approx(math.sqrt(p + E) + math.sqrt(E))
    p = phi((0.8 - 0.3) / scale)
    assert rank[0, 1] == pytest.approx(math.sqrt(p + E) + math.sqrt(E))
    # image 1 ranks below image 0 (p_c = 0): reward sqrt(0 + e) + sqrt(1 - p + e)
    p = phi((0.2 - 0.7) / scale)
    assert rank[1, 0] == pytest.approx(math.sqrt(E) + math.sqrt(1 - p + E))
    # absolute: |0.6 - 0.7| = 0.1 = sigma -> exp(-0.5) + 1e-5
    assert absolute[0, 0] == pytest.approx(math.exp(-0.5) + 1e-5)
    assert absolute[1, 1] == pytest.approx(math.exp(-0.5 * (0.1 / 0.1) ** 2) + 1e-5)


def test_ties_ge_and_half():
    pred = [[0.6, 0.4], [0.5, 0.5]]
    gt = [0.5, 0.5]
    scale = math.sqrt(0.02 + 0.0 + GAMMA)  # image 0 variance 0.02, image 1 variance 0
    p = phi((0.6 - 0.5) / scale)
    rank_ge, _ = rapo_rewards(pred, gt, ties="ge")
    assert rank_ge[0, 0] == pytest.approx(math.sqrt(p + E) + math.sqrt(E))  # a tie counts as s_i >= s_j
    rank_half, _ = rapo_rewards(pred, gt, ties="half")
    assert rank_half[0, 0] == pytest.approx(math.sqrt(0.5 * p + E) + math.sqrt(0.5 * (1 - p) + E))


def test_unparseable_outputs_get_zero_and_stay_out_of_the_statistics():
    pred = [[0.6, np.nan], [0.2, 0.4]]
    gt = [0.7, 0.3]
    rank, absolute = rapo_rewards(pred, gt)
    assert rank[0, 1] == 0.0 and absolute[0, 1] == 0.0
    # image 0: mean 0.6 from its one parsed output, variance 0
    scale = math.sqrt(0.0 + 0.02 + GAMMA)
    p = phi((0.2 - 0.6) / scale)
    assert rank[1, 0] == pytest.approx(math.sqrt(E) + math.sqrt(1 - p + E))
    assert rank[0, 0] > 0 and absolute[0, 0] > 0


def test_zero_variance_groups_use_gamma():
    rank, _ = rapo_rewards([[0.5, 0.5], [0.3, 0.3]], [0.9, 0.1])
    p = phi((0.5 - 0.3) / math.sqrt(GAMMA))  # = 1 to machine precision
    assert rank[0, 0] == pytest.approx(math.sqrt(p + E) + math.sqrt(E))
    assert rank[1, 0] == pytest.approx(math.sqrt(E) + math.sqrt(1 - phi((0.3 - 0.5) / math.sqrt(GAMMA)) + E))


def test_a_fully_unparseable_group_is_left_out():
    pred = [[np.nan, np.nan], [0.2, 0.4], [0.6, 0.8]]
    gt = [0.9, 0.3, 0.7]
    rank, absolute = rapo_rewards(pred, gt)
    assert (rank[0] == 0).all() and (absolute[0] == 0).all()
    # the others compare only with each other: same as the N = 2 case
    alone, _ = rapo_rewards(pred[1:], gt[1:])
    np.testing.assert_allclose(rank[1:], alone)


def test_a_single_image_has_no_rank_signal():
    rank, absolute = rapo_rewards([[0.2, 0.9]], [0.5])
    assert (rank == 0).all() and (absolute > 0).all()


def test_binary_reward():
    np.testing.assert_array_equal(binary_reward([[0.5, 0.6, np.nan]], [0.55], threshold=0.0875), [[1, 1, 0]])
    np.testing.assert_array_equal(binary_reward([[0.5, 0.7]], [0.55], threshold=0.0875), [[1, 0]])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"pred must be \(N, K\)"):
        rapo_rewards([0.1, 0.2], [0.1, 0.2])


scores = st.floats(0, 1, allow_nan=False)
pred_arrays = arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(1, 5)),
                     elements=st.one_of(scores, st.just(np.nan)))


@settings(max_examples=200, deadline=None)
@given(pred=pred_arrays, data=st.data())
def test_rewards_are_bounded(pred, data):
    gt = np.array(data.draw(st.lists(scores, min_size=len(pred), max_size=len(pred))))
    for ties, top in (("ge", 1 + 2 * math.sqrt(E)), ("half", math.sqrt(2 * (1 + 2 * E)))):
        rank, absolute = rapo_rewards(pred, gt, ties=ties)
        assert np.isfinite(rank).all() and np.isfinite(absolute).all()
        assert (rank >= 0).all() and (rank <= top + 1e-9).all()
        assert (absolute >= 0).all() and (absolute <= 1 + 1e-5 + 1e-12).all()
        assert (rank[np.isnan(pred)] == 0).all() and (absolute[np.isnan(pred)] == 0).all()


@given(gt=scores, error=st.floats(0, 1))
def test_absolute_reward_peaks_at_zero_error_and_is_symmetric(gt, error):
    _, at_truth = rapo_rewards([[gt]], [gt])
    _, above = rapo_rewards([[gt + error]], [gt])
    _, below = rapo_rewards([[gt - error]], [gt])
    assert at_truth[0, 0] == pytest.approx(1 + 1e-5)
    assert above[0, 0] == pytest.approx(below[0, 0])
    assert above[0, 0] <= at_truth[0, 0]


@settings(max_examples=200, deadline=None)
@given(pred=arrays(np.float64, st.tuples(st.integers(2, 5), st.integers(2, 5)), elements=scores), data=st.data())
def test_rank_reward_grows_with_agreement(pred, data):
    """Within the group of the best image, a higher sample ranks better; within the worst, a lower one."""
    n = len(pred)
    gt = np.array(data.draw(st.lists(st.floats(0.01, 0.99), min_size=n, max_size=n, unique=True)))
    rank, _ = rapo_rewards(pred, gt)
    best, worst = int(np.argmax(gt)), int(np.argmin(gt))
    order = np.argsort(pred[best])
    assert np.all(np.diff(rank[best][order]) >= -1e-12)
    order = np.argsort(pred[worst])
    assert np.all(np.diff(rank[worst][order]) <= 1e-12)
