"""Fusing the masks of several samples into per-class probabilities (UniSegDiff Sec. 2.4: uncertainty fusion).

STAPLE (Warfield et al. 2004) as the paper runs it, written here in torch: an EM over each sample's
sensitivity and false-positive rate and the posterior of the true label, vectorised over patches, classes and
voxels, on the device of the samples, in float32 (half-precision inputs included). Every trainer's
``fusion='staple'`` goes through :func:`staple_fusion`.

The paper (Sec. 2.4), quoted:
  "The confidence values alpha_j and beta_j for each z_j are initialized to 0.9 and 0.1, respectively,
  representing the probabilities of correctly labeling the target and incorrectly labeling the background as the
  target. For each pixel i, the initial value of y_i belongs to the target is set to 50%. [...] This update
  process is repeated 20 times to obtain the final consensus mask y."
So beta_j is P(z_j = 1 | y = 0), a false-positive rate (1 - specificity), not a specificity: specificity starts at
0.9. (Read as a specificity of 0.1 every sample would be assumed to mark most of the background, and the first
posterior would favour background wherever a sample says foreground: nothing useful.) P(y_i = 1) = 0.5 is the
prior of eq. 2 and is not re-estimated (the paper updates alpha_j and beta_j only).

One iteration: the posterior W_i = P(y_i = 1 | z) of eq. 2 from the current (alpha, beta), then the
maximum-likelihood update (eq. 3, whose printed form is garbled; this is Warfield's update):
  alpha_j = sum_i W_i z_ij / sum_i W_i,    beta_j = sum_i (1 - W_i) z_ij / sum_i (1 - W_i).
After 20 iterations the consensus is the posterior under the 20th update. The posterior is computed in the log
domain (20 products of probabilities near 0 or 1 underflow float32); alpha and beta are kept in [1e-6, 1 - 1e-6].

How this differs from SimpleITK's ``STAPLEImageFilter`` (which we used before): it starts from the vote shares
as the posterior (then updates sensitivity and specificity first), takes as its prior the mean foreground
fraction of the samples times ``ConfidenceWeight``, and iterates to convergence (at most
``MaximumIterations``). On a lesion patch that prior is far below 0.5, weighing every voxel the samples
disagree on towards background. The two agree exactly when started alike: ours from the parameters that SimpleITK's
first update gives, with the same prior and one iteration fewer (tests/diffusion/test_fusion.py).

Multi-class (our choice: the paper fuses binary lesion masks only): one binary STAPLE per class (class c against
the rest); the one-vs-rest posteriors need not sum to 1, so they are renormalised over classes. A class that
every sample gives the same mask (e.g. absent everywhere) keeps that mask as its probability: STAPLE has nothing
to estimate there (its EM would drift to 0.5). A voxel whose posteriors are all 0 gets the samples' vote shares.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch

# the paper's settings (Sec. 2.4)
SENSITIVITY, FALSE_POSITIVE_RATE, PRIOR, ITERATIONS = 0.9, 0.1, 0.5, 20
_CLAMP = 1e-6  # alpha and beta are kept in [_CLAMP, 1 - _CLAMP]: their logs enter the posterior

Parameter = Union[float, torch.Tensor]


class StapleEstimate(NamedTuple):
    """posterior: (B, C, V) P(true label = c) per class (one-vs-rest, not renormalised); sensitivity and
    false_positive_rate: (B, C, M) each sample's alpha_j and beta_j after the last update."""
    posterior: torch.Tensor
    sensitivity: torch.Tensor
    false_positive_rate: torch.Tensor


def _posterior(labels: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, prior_logit: torch.Tensor,
               num_classes: int) -> torch.Tensor:
    """Eq. 2 in the log domain for every class at once. labels (B, M, V) long; alpha, beta (B, C, M).
    logit W_cv = logit(prior) + sum_j [log(1 - alpha_cj) - log(1 - beta_cj)]
                 + sum_{j: label_jv = c} [log alpha_cj - log(1 - alpha_cj) - log beta_cj + log(1 - beta_cj)]."""
    alpha, beta = alpha.clamp(_CLAMP, 1 - _CLAMP), beta.clamp(_CLAMP, 1 - _CLAMP)
    if_absent = torch.log1p(-alpha) - torch.log1p(-beta)  # (B, C, M): sample j says "not c"
    if_present = alpha.log() - beta.log() - if_absent  # extra log-likelihood ratio where sample j says "c"
    logits = (prior_logit + if_absent.sum(-1)).unsqueeze(-1).expand(-1, -1, labels.shape[-1]).clone()
    # each sample's vote adds its class's if_present at that voxel: gather by the voted class, scatter into it
    votes = if_present.transpose(1, 2).gather(2, labels)  # (B, M, V): if_present[b, label_bjv, j]
    logits.scatter_add_(1, labels, votes)
    return torch.sigmoid(logits)


def _update(labels: torch.Tensor, posterior: torch.Tensor, num_classes: int):
    """Eq. 3 (Warfield's update) for every class and sample: alpha_cj = sum_v W_cv [label_jv = c] / sum_v W_cv and
    beta_cj = sum_v (1 - W_cv) [label_jv = c] / sum_v (1 - W_cv). labels (B, M, V), posterior (B, C, V)."""
    b, m, _ = labels.shape
    hits = posterior.new_zeros(b, m, num_classes)
    misses = posterior.new_zeros(b, m, num_classes)
    hits.scatter_add_(2, labels, posterior.gather(1, labels))  # sum over voxels where j votes c, of W_cv
    misses.scatter_add_(2, labels, (1 - posterior).gather(1, labels))
    alpha = hits.transpose(1, 2) / posterior.sum(-1, keepdim=True).clamp_min(1e-12)
    beta = misses.transpose(1, 2) / (1 - posterior).sum(-1, keepdim=True).clamp_min(1e-12)
    return alpha, beta


def staple_em(labels: torch.Tensor, num_classes: int, iterations: int = ITERATIONS,
              sensitivity: Parameter = SENSITIVITY, false_positive_rate: Parameter = FALSE_POSITIVE_RATE,
              prior: Parameter = PRIOR) -> StapleEstimate:
    """Binary STAPLE of every class against the rest, batched: labels (B, M, *S) integer label maps of M samples
    -> StapleEstimate with (B, C, V) posteriors, V = prod(S). ``iterations`` EM iterations, each the posterior
    (eq. 2) then the update (eq. 3), then the posterior under the last update (iterations = 0: the posterior
    under the initial values). ``sensitivity`` / ``false_positive_rate``: initial alpha_j / beta_j, floats or
    tensors broadcastable to (B, C, M); ``prior``: P(y = 1), a float or broadcastable to (B, C). float32."""
    if iterations < 0:
        raise ValueError(f"STAPLE needs iterations >= 0, got {iterations}")
    labels = labels.flatten(2).long()
    b, m, _ = labels.shape
    options = dict(dtype=torch.float32, device=labels.device)
    alpha = torch.as_tensor(sensitivity, **options).expand(b, num_classes, m)
    beta = torch.as_tensor(false_positive_rate, **options).expand(b, num_classes, m)
    prior_logit = torch.logit(torch.as_tensor(prior, **options).clamp(_CLAMP, 1 - _CLAMP)).expand(b, num_classes)
    for _ in range(iterations):
        alpha, beta = _update(labels, _posterior(labels, alpha, beta, prior_logit, num_classes), num_classes)
    return StapleEstimate(_posterior(labels, alpha, beta, prior_logit, num_classes), alpha, beta)


def vote_shares(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, M, *S) label maps -> (B, C, V) float32 share of the samples voting each class."""
    labels = labels.flatten(2).long()
    counts = torch.zeros(labels.shape[0], num_classes, labels.shape[-1], dtype=torch.float32, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    return counts / labels.shape[1]


def staple_fusion(labels: torch.Tensor, num_classes: int, iterations: int = ITERATIONS) -> torch.Tensor:
    """(B, M, *S) integer label maps of M samples per patch -> (B, num_classes, *S) float32 class probabilities:
    the paper's STAPLE per class, unanimous classes kept, renormalised over classes (module docstring)."""
    spatial = labels.shape[2:]
    votes = vote_shares(labels, num_classes)
    posterior = staple_em(labels, num_classes, iterations).posterior
    unanimous = ((votes == 0) | (votes == 1)).all(-1, keepdim=True)  # (B, C, 1): every sample the same mask
    posterior = torch.where(unanimous, votes, posterior)
    total = posterior.sum(1, keepdim=True)
    fused = torch.where(total > 0, posterior / total.clamp_min(1e-30), votes)
    return fused.reshape(*fused.shape[:2], *spatial)


def staple_probabilities(samples: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One patch: (M, *S) integer label maps -> (num_classes, *S) float32 class probabilities (staple_fusion)."""
    return staple_fusion(samples[None], num_classes)[0]
