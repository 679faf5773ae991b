"""STAPLE fusion (UniSegDiff Sec. 2.4): our torch EM against a hand-computed iteration and against SimpleITK's
STAPLEImageFilter where their settings coincide. SimpleITK is only the independent reference here."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_diffusion.diffusion.fusion import staple_em, staple_fusion, staple_probabilities, vote_shares

# 3 raters x 4 voxels; voxel v is marked by 3, 2, 1, 0 raters
HAND = torch.tensor([[1, 1, 0, 0],
                     [1, 0, 0, 0],
                     [1, 1, 1, 0]])


def test_first_posterior_with_the_papers_initial_values():
    """alpha 0.9, beta 0.1, prior 0.5: each rater's likelihood ratio is 9 where it says 1 and 1/9 where it says 0,
    so a voxel marked by k of 3 raters has odds 9^(2k - 3): posteriors 729/730, 9/10, 1/10, 1/730."""
    estimate = staple_em(HAND[None], num_classes=2, iterations=0)
    expected = torch.tensor([729 / 730, 9 / 10, 1 / 10, 1 / 730])
    torch.testing.assert_close(estimate.posterior[0, 1], expected)
    torch.testing.assert_close(estimate.posterior[0, 0], 1 - expected)  # class 0: the complement masks


def test_one_em_iteration_by_hand():
    w = [729 / 730, 9 / 10, 1 / 10, 1 / 730]  # sum 2, sum of (1 - w) 2
    # eq. 3: alpha_j = sum_i w_i z_ij / sum_i w_i, beta_j = sum_i (1 - w_i) z_ij / sum_i (1 - w_i)
    alpha = [(w[0] + w[1]) / 2, w[0] / 2, (w[0] + w[1] + w[2]) / 2]
    beta = [((1 - w[0]) + (1 - w[1])) / 2, (1 - w[0]) / 2, ((1 - w[0]) + (1 - w[1]) + (1 - w[2])) / 2]
    z = HAND.tolist()
    posterior = []
    for v in range(4):  # eq. 2 with the prior 0.5
        present = np.prod([alpha[j] if z[j][v] else 1 - alpha[j] for j in range(3)])
        absent = np.prod([beta[j] if z[j][v] else 1 - beta[j] for j in range(3)])
        posterior.append(present / (present + absent))
    estimate = staple_em(HAND[None], num_classes=2, iterations=1)
    torch.testing.assert_close(estimate.sensitivity[0, 1], torch.tensor(alpha))
    torch.testing.assert_close(estimate.false_positive_rate[0, 1], torch.tensor(beta))
    torch.testing.assert_close(estimate.posterior[0, 1], torch.tensor(posterior, dtype=torch.float32))


def random_raters(seed=0, raters=6, shape=(9, 11)):
    """A square that each rater marks with independent errors (some more careful than others)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.uint8)
    truth[2:7, 3:9] = 1
    flips = [rng.random(shape) < rate for rate in np.linspace(0.03, 0.25, raters)]
    return np.stack([np.where(f, 1 - truth, truth) for f in flips]).astype(np.uint8)


def simpleitk_staple(masks, iterations=None, confidence_weight=1.0):
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    staple.SetConfidenceWeight(confidence_weight)
    if iterations is not None:
        staple.SetMaximumIterations(iterations)
    result = sitk.GetArrayFromImage(staple.Execute([sitk.GetImageFromArray(m) for m in masks]))
    return result, staple.GetElapsedIterations()


def simpleitk_start(masks):
    """SimpleITK starts from the vote shares as the posterior and updates sensitivity p and specificity q first:
    our EM started from that update (alpha = p, beta = 1 - q) runs the same sequence one iteration behind."""
    d = masks.reshape(len(masks), -1).astype(np.float64)
    w = d.mean(0)
    p = (d * w).sum(1) / w.sum()
    q = ((1 - d) * (1 - w)).sum(1) / (1 - w).sum()
    return p, q, d.mean()


@pytest.mark.parametrize("iterations", [1, 3, 8])
@pytest.mark.parametrize("prior", ["fraction", 0.5])
def test_equals_simpleitk_where_the_settings_coincide(iterations, prior):
    """Same start, same prior (SimpleITK's is the mean foreground fraction times ConfidenceWeight: either we take
    that fraction, or it is scaled to our 0.5), same number of updates."""
    masks = random_raters()
    p, q, fraction = simpleitk_start(masks)
    prior_value = fraction if prior == "fraction" else 0.5
    expected, elapsed = simpleitk_staple(masks, iterations + 1, confidence_weight=prior_value / fraction)
    assert elapsed == iterations + 1 or iterations == 8  # not stopped early by its convergence test (8 may be)
    ours = staple_em(torch.from_numpy(masks)[None], 2, iterations, sensitivity=torch.tensor(p, dtype=torch.float32),
                     false_positive_rate=torch.tensor(1 - q, dtype=torch.float32), prior=float(prior_value))
    np.testing.assert_allclose(ours.posterior[0, 1].reshape(masks.shape[1:]).numpy(), expected, atol=2e-5)


def test_same_fixed_point_as_simpleitk_from_the_papers_start():
    """Run to convergence from their different starts, with the same prior (0.5), the two EMs agree."""
    masks = random_raters(seed=1)
    fraction = masks.mean()
    expected, _ = simpleitk_staple(masks, 500, confidence_weight=0.5 / fraction)
    ours = staple_em(torch.from_numpy(masks)[None], 2, iterations=200)
    np.testing.assert_allclose(ours.posterior[0, 1].reshape(masks.shape[1:]).numpy(), expected, atol=1e-4)


def test_binary_fusion_finds_the_consensus_and_sums_to_one():
    masks = random_raters(seed=2)
    fused = staple_probabilities(torch.from_numpy(masks), num_classes=2)
    np.testing.assert_allclose(fused.sum(0).numpy(), 1.0, atol=1e-6)
    truth = np.zeros(masks.shape[1:], np.uint8)
    truth[2:7, 3:9] = 1
    assert (fused.argmax(0).numpy() == truth).mean() > 0.97


def test_multiclass_is_one_binary_staple_per_class_renormalised():
    a = np.zeros((6, 6), np.uint8)
    a[1:3, 1:5], a[3:5, 1:5] = 1, 2
    b, c = a.copy(), a.copy()
    c[2, 2], c[0, 0] = 2, 1  # one rater disagrees on two voxels
    labels = torch.from_numpy(np.stack([a, b, c]))
    fused = staple_probabilities(labels, num_classes=3)
    per_class = torch.stack([staple_em((labels == k).long()[None], 2).posterior[0, 1] for k in range(3)])
    torch.testing.assert_close(fused.flatten(1), per_class / per_class.sum(0, keepdim=True))
    np.testing.assert_array_equal(fused.argmax(0).numpy(), a)
    reference = sitk.GetArrayFromImage(sitk.MultiLabelSTAPLE([sitk.GetImageFromArray(m) for m in [a, b, c]]))
    np.testing.assert_array_equal(fused.argmax(0).numpy(), reference)


def test_unanimous_samples_give_their_mask():
    mask = torch.tensor([[0, 1], [2, 1]])
    fused = staple_probabilities(torch.stack([mask, mask, mask]), num_classes=4)
    expected = torch.nn.functional.one_hot(mask, 4).permute(2, 0, 1).float()
    torch.testing.assert_close(fused, expected)


def test_batched_patches_equal_one_at_a_time():
    labels = torch.from_numpy(np.stack([random_raters(seed=s) for s in range(3)])).long()  # (3 patches, 6, 9, 11)
    labels[1, :, 0, 0] = 2  # a third class in one patch only
    batched = staple_fusion(labels, 3)
    assert batched.shape == (3, 3, 9, 11) and batched.dtype == torch.float32
    for k in range(3):
        torch.testing.assert_close(batched[k], staple_probabilities(labels[k], 3))
    torch.testing.assert_close(vote_shares(labels, 3)[0, 1], torch.from_numpy(random_raters(seed=0)).float().mean(0).flatten())
