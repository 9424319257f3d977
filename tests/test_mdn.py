import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from almdn_ray import mdn

logit = st.floats(-50, 50, allow_nan=False, width=32)


def arrays(shape):
    return hnp.arrays(np.float32, shape, elements=logit).map(torch.from_numpy)


def test_mixture_moments_by_hand():
    mu = torch.tensor([[0.0], [2.0]])  # K=2, D=1
    sigma = torch.tensor([[0.1], [0.3]])
    pi = torch.tensor([[0.5], [0.5]])
    mean, aleatoric, epistemic = mdn.mixture_moments(mu, sigma, pi)
    assert mean.item() == pytest.approx(1.0)
    assert aleatoric.item() == pytest.approx(0.2)
    assert epistemic.item() == pytest.approx(1.0)  # 0.5·1² + 0.5·1²


def test_localization_moments_applies_sigmoid_and_softmax_over_k():
    mu = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0]])  # [K=2, 4]
    sigma_logit = torch.zeros(2, 4)  # σ = 0.5
    pi_logit = torch.tensor([[math.log(3.0)] * 4, [0.0] * 4])  # π = (0.75, 0.25)
    mean, aleatoric, epistemic = mdn.localization_moments(mu, sigma_logit, pi_logit)
    assert mean[0].item() == pytest.approx(0.75 * 1 + 0.25 * 3)
    assert aleatoric.tolist() == pytest.approx([0.5] * 4)
    assert epistemic[0].item() == pytest.approx(0.75 * 0.5**2 + 0.25 * 1.5**2)
    assert epistemic[1:].tolist() == pytest.approx([0.0] * 3)


def test_classification_moments_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax: (0.5, 0.5), (0.75, 0.25)
    probs, aleatoric, epistemic = mdn.classification_moments(logits, torch.zeros(2, 2), torch.zeros(2))
    assert probs.tolist() == pytest.approx([0.625, 0.375])
    assert aleatoric.tolist() == pytest.approx([0.5, 0.5])
    assert epistemic.tolist() == pytest.approx([0.125**2, 0.125**2])


def test_localization_nll_by_hand():
    target = torch.tensor([0.5, 0.0, 0.0, 0.0])
    mu = torch.tensor([[0.0] * 4, [1.0] * 4])  # K=2
    sigma_logit = torch.zeros(2, 4)  # σ = 0.5
    pi_logit = torch.zeros(2, 4)  # π = 0.5
    nll = mdn.localization_nll(target, mu, sigma_logit, pi_logit)

    def phi(y, m, s):
        return math.exp(-(((y - m) / s) ** 2) / 2) / (math.sqrt(2 * math.pi) * (s + 0.3))

    first = -math.log(0.5 * phi(0.5, 0, 0.5) + 0.5 * phi(0.5, 1, 0.5) + 1e-9) / 2
    other = -math.log(0.5 * phi(0, 0, 0.5) + 0.5 * phi(0, 1, 0.5) + 1e-9) / 2
    assert nll.tolist() == pytest.approx([first, other, other, other], rel=1e-5)
    halved_again = mdn.localization_nll(target, mu, sigma_logit, pi_logit, nll_scale=4.0)
    assert halved_again.tolist() == pytest.approx((nll / 2).tolist(), rel=1e-6)


def test_classification_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # K=2, C=2
    sigma_logit = torch.zeros(2, 2)
    pi_logit = torch.tensor([math.log(3.0), 0.0])  # π = (0.75, 0.25)
    target = torch.tensor(1)
    zero = torch.zeros(2, 2)
    type1 = mdn.classification_loss(logits, sigma_logit, pi_logit, target, noise=zero)
    assert type1.item() == pytest.approx(0.75 * -math.log(0.75) + 0.25 * -math.log(0.5), rel=1e-5)
    type2 = mdn.classification_loss(logits, sigma_logit, pi_logit, target, noise=zero, kind="type2")
    assert type2.item() == pytest.approx(-math.log(0.75 * 0.75 + 0.25 * 0.5 + 1e-9), rel=1e-5)
    # ẑ = μ + √σ·ε: noise on the target logit of both components shifts it by √0.5.
    noise = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    shifted = mdn.classification_loss(logits, sigma_logit, pi_logit, target, noise=noise)
    p1 = 3 * math.exp(math.sqrt(0.5)) / (1 + 3 * math.exp(math.sqrt(0.5)))
    p2 = math.exp(math.sqrt(0.5)) / (1 + math.exp(math.sqrt(0.5)))
    assert shifted.item() == pytest.approx(0.75 * -math.log(p1) + 0.25 * -math.log(p2), rel=1e-5)


def test_classification_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="type1"):
        mdn.classification_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.tensor(0), kind="t3")


def test_classification_loss_draws_noise_when_none():
    torch.manual_seed(0)
    args = (torch.zeros(5, 4, 3), torch.zeros(5, 4, 3), torch.zeros(5, 4), torch.zeros(5, dtype=torch.long))
    assert not torch.equal(mdn.classification_loss(*args), mdn.classification_loss(*args))


@settings(max_examples=30, deadline=None)
@given(mu=arrays((3, 4, 4)), sigma_logit=arrays((3, 4, 4)), pi_logit=arrays((3, 4, 4)))
def test_weights_sum_to_one_over_k(mu, sigma_logit, pi_logit):
    # With equal means and variances in every component, the mixture returns them: Σπ = 1.
    same = torch.full_like(mu, 0.7)
    mean, aleatoric, epistemic = mdn.localization_moments(same, sigma_logit[:, :1].expand_as(mu), pi_logit)
    torch.testing.assert_close(mean, torch.full((3, 4), 0.7))
    torch.testing.assert_close(aleatoric, torch.sigmoid(sigma_logit[:, 0]))
    probs, _, _ = mdn.classification_moments(mu, sigma_logit, pi_logit[..., 0])
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


@settings(max_examples=30, deadline=None)
@given(mu=arrays((2, 1, 4)), sigma_logit=arrays((2, 1, 4)), pi_logit=arrays((2, 1, 4)))
def test_single_component_has_no_epistemic_uncertainty(mu, sigma_logit, pi_logit):
    assert torch.all(mdn.localization_moments(mu, sigma_logit, pi_logit).epistemic == 0)
    assert torch.all(mdn.classification_moments(mu, sigma_logit, pi_logit[..., 0]).epistemic == 0)


@settings(max_examples=30, deadline=None)
@given(mu=arrays((2, 1, 5)), sigma_logit=arrays((2, 3, 5)), pi_logit=arrays((2, 3, 5)))
def test_identical_components_have_no_epistemic_uncertainty(mu, sigma_logit, pi_logit):
    repeated = mu.expand(2, 3, 5)
    torch.testing.assert_close(
        mdn.localization_moments(repeated, sigma_logit, pi_logit).epistemic, torch.zeros(2, 5), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        mdn.classification_moments(repeated, sigma_logit, pi_logit[..., 0]).epistemic,
        torch.zeros(2, 5),
        atol=1e-7,
        rtol=0,
    )


@settings(max_examples=30, deadline=None)
@given(
    mu=arrays((2, 4, 4)),
    sigma_logit=arrays((2, 4, 4)),
    pi_logit=arrays((2, 4, 4)),
    target=arrays((2, 4)),
    permutation=st.permutations(range(4)),
)
def test_permuting_components_changes_nothing(mu, sigma_logit, pi_logit, target, permutation):
    p = list(permutation)
    for moments in (mdn.localization_moments, lambda m, s, q: mdn.classification_moments(m, s, q[..., 0])):
        for a, b in zip(moments(mu, sigma_logit, pi_logit), moments(mu[:, p], sigma_logit[:, p], pi_logit[:, p])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(
        mdn.localization_nll(target, mu, sigma_logit, pi_logit),
        mdn.localization_nll(target, mu[:, p], sigma_logit[:, p], pi_logit[:, p]),
    )
    noise = torch.randn(2, 4, 4)
    labels = torch.tensor([0, 3])
    for kind in ("type1", "type2"):
        torch.testing.assert_close(
            mdn.classification_loss(mu, sigma_logit, pi_logit[..., 0], labels, noise, kind),
            mdn.classification_loss(mu[:, p], sigma_logit[:, p], pi_logit[:, p, 0], labels, noise[:, p], kind),
            rtol=1e-4,
            atol=1e-4,
        )


extreme = st.sampled_from([-50.0, 50.0])


@settings(max_examples=40, deadline=None)
@given(
    values=hnp.arrays(np.float32, (6, 3, 2, 4), elements=st.one_of(extreme, logit)),
    target=hnp.arrays(np.float32, (3, 4), elements=st.floats(-10, 10, width=32)),
    kind=st.sampled_from(["type1", "type2"]),
)
def test_losses_and_gradients_are_finite_for_extreme_logits(values, target, kind):
    mu, sigma_logit, pi_logit, logits, cls_sigma_logit, cls_pi_logit = (
        torch.tensor(v, requires_grad=True) for v in values
    )
    nll = mdn.localization_nll(torch.from_numpy(target), mu, sigma_logit, pi_logit)
    cls = mdn.classification_loss(
        logits, cls_sigma_logit, cls_pi_logit[..., 0], torch.tensor([0, 1, 3]), noise=torch.randn(3, 2, 4), kind=kind
    )
    (nll.sum() + cls.sum()).backward()
    assert torch.isfinite(nll).all() and torch.isfinite(cls).all()
    for tensor in (mu, sigma_logit, pi_logit, logits, cls_sigma_logit, cls_pi_logit):
        assert torch.isfinite(tensor.grad).all()


def test_leading_dims_are_free():
    mu = torch.randn(2, 3, 5, 4, 4)
    mean, aleatoric, epistemic = mdn.localization_moments(mu, torch.randn_like(mu), torch.randn_like(mu))
    assert mean.shape == aleatoric.shape == epistemic.shape == (2, 3, 5, 4)
    nll = mdn.localization_nll(torch.randn(2, 3, 5, 4), mu, torch.randn_like(mu), torch.randn_like(mu))
    assert nll.shape == (2, 3, 5, 4)
    loss = mdn.classification_loss(
        torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4), torch.randint(0, 6, (2, 3))
    )
    assert loss.shape == (2, 3)
