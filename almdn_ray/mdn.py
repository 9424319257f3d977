"""Mixture-density math of AL-MDN (DESIGN section 4), pure torch.

Shapes follow the project glossary: any leading dims ``...``, ``K`` mixture components, ``D`` the values
a component predicts (4 box coordinates, or ``C`` classes incl. background). Every function reduces over
the ``K`` axis, which is the second-to-last axis of its ``[..., K, D]`` inputs.

The stabilising constants of the paper are keyword arguments with the paper's values as defaults:
``sigma_offset=0.3`` (added to sigma in the Gaussian's normaliser), ``nll_scale=2.0`` (the NLL is halved)
and ``eps=1e-9`` (added inside the log).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Moments",
    "mixture_moments",
    "localization_moments",
    "classification_moments",
    "localization_nll",
    "classification_loss",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class Moments(NamedTuple):
    """Moments of a mixture, each ``[..., D]``."""

    mean: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def mixture_moments(mu: Tensor, sigma: Tensor, pi: Tensor) -> Moments:
    """Mean, aleatoric and epistemic uncertainty of a mixture; the one function for boxes and classes.

    ``mean = Σ π_k μ_k``, ``aleatoric = Σ π_k σ_k``, ``epistemic = Σ π_k (μ_k − mean)²``.

    Args:
        mu: component means ``[..., K, D]``.
        sigma: component variances (already in (0, 1)) ``[..., K, D]``.
        pi: mixture weights that sum to 1 over K, ``[..., K, D]`` or ``[..., K, 1]``.

    Returns:
        ``Moments(mean, aleatoric, epistemic)``, each ``[..., D]``.
    """
    assert mu.shape == sigma.shape, (mu.shape, sigma.shape)
    mean = (pi * mu).sum(dim=-2)
    aleatoric = (pi * sigma).sum(dim=-2)
    epistemic = (pi * (mu - mean.unsqueeze(-2)).square()).sum(dim=-2)
    return Moments(mean, aleatoric, epistemic)


def localization_moments(mu: Tensor, sigma_logit: Tensor, pi_logit: Tensor) -> Moments:
    """Moments of the box mixture.

    Args:
        mu: ``[..., K, 4]`` encoded box offsets of each component.
        sigma_logit: ``[..., K, 4]``; ``σ = sigmoid(sigma_logit)``.
        pi_logit: ``[..., K, 4]``; ``π = softmax over K``, separately per coordinate.

    Returns:
        ``Moments(mean, aleatoric, epistemic)``, each ``[..., 4]``.
    """
    return mixture_moments(mu, torch.sigmoid(sigma_logit), torch.softmax(pi_logit, dim=-2))


def classification_moments(logits: Tensor, sigma_logit: Tensor, pi_logit: Tensor) -> Moments:
    """Moments of the class mixture, with ``μ_k = softmax(logits_k)``.

    Args:
        logits: ``[..., K, C]``.
        sigma_logit: ``[..., K, C]``; ``σ = sigmoid(sigma_logit)``.
        pi_logit: ``[..., K]``; one mixture weight per anchor and component.

    Returns:
        ``Moments(probs, aleatoric, epistemic)``, each ``[..., C]``; ``probs`` sums to 1 over C.
    """
    pi = torch.softmax(pi_logit, dim=-1).unsqueeze(-1)  # [..., K, 1]
    return mixture_moments(torch.softmax(logits, dim=-1), torch.sigmoid(sigma_logit), pi)


def _log_sum_exp_plus(terms: Tensor, log_eps: float, dim: int) -> Tensor:
    """``log(Σ exp(terms) + exp(log_eps))`` over ``dim``, exact and stable."""
    eps_term = torch.full_like(terms.narrow(dim, 0, 1), log_eps)
    return torch.logsumexp(torch.cat([terms, eps_term], dim=dim), dim=dim)


def localization_nll(
    target: Tensor,
    mu: Tensor,
    sigma_logit: Tensor,
    pi_logit: Tensor,
    *,
    sigma_offset: float = 0.3,
    nll_scale: float = 2.0,
    eps: float = 1e-9,
) -> Tensor:
    """Negative log-likelihood of box targets under the mixture, per coordinate.

    ``L = −log(Σ_k π_k·φ(y; μ_k, σ_k) + eps) / nll_scale`` with
    ``φ(y; μ, σ) = exp(−((y−μ)/σ)²/2) / (√(2π)·(σ + sigma_offset))``, computed in log space so that it
    stays finite (value and gradient) for saturated logits.

    Args:
        target: ``[..., 4]`` encoded ground-truth offsets.
        mu, sigma_logit, pi_logit: ``[..., K, 4]`` as in :func:`localization_moments`.

    Returns:
        ``[..., 4]`` loss per coordinate.
    """
    # 1/σ = 1 + exp(−logit): exact, and its gradient stays finite where σ underflows.
    inv_sigma = 1.0 + torch.exp(-sigma_logit.clamp(min=-60.0))
    sigma = torch.sigmoid(sigma_logit)
    z = (target.unsqueeze(-2) - mu) * inv_sigma  # [..., K, 4]
    log_phi = -0.5 * z.square() - _HALF_LOG_2PI - torch.log(sigma + sigma_offset)
    log_pi = torch.log_softmax(pi_logit, dim=-2)
    return -_log_sum_exp_plus(log_pi + log_phi, math.log(eps), dim=-2) / nll_scale


def classification_loss(
    logits: Tensor,
    sigma_logit: Tensor,
    pi_logit: Tensor,
    target: Tensor,
    noise: Tensor | None = None,
    kind: str = "type1",
    *,
    eps: float = 1e-9,
) -> Tensor:
    """Mixture classification loss with sampled logits ``ẑ_k = μ_k + √σ_k·ε``.

    Type-1 (default): ``Σ_k π_k·CE(ẑ_k, target)``.
    Type-2: ``−log(Σ_k π_k·softmax(ẑ_k)[target] + eps)``.

    Args:
        logits: ``[..., K, C]``.
        sigma_logit: ``[..., K, C]``.
        pi_logit: ``[..., K]``.
        target: ``[...]`` integer class (0 is background).
        noise: ``[..., K, C]`` standard normal draws; drawn from N(0, I) when None.
        kind: ``"type1"`` or ``"type2"``.

    Returns:
        ``[...]`` loss per anchor.
    """
    if kind not in ("type1", "type2"):
        raise ValueError(f"classification loss kind must be 'type1' or 'type2', got {kind!r}")
    if noise is None:
        noise = torch.randn_like(logits)
    # √σ = exp(logsigmoid / 2): finite gradient even where σ underflows to 0.
    sampled = logits + torch.exp(0.5 * F.logsigmoid(sigma_logit)) * noise  # [..., K, C]
    index = target.long().unsqueeze(-1).unsqueeze(-1).expand(*sampled.shape[:-1], 1)
    log_p_target = torch.log_softmax(sampled, dim=-1).gather(-1, index).squeeze(-1)  # [..., K]
    if kind == "type1":
        return -(torch.softmax(pi_logit, dim=-1) * log_p_target).sum(dim=-1)
    return -_log_sum_exp_plus(torch.log_softmax(pi_logit, dim=-1) + log_p_target, math.log(eps), dim=-1)
