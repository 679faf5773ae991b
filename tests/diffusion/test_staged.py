"""UniSegDiff's staged targets and inference steps, checked against the paper's numbers (Sec. 2.2, eq. 1)."""
import pytest
import torch

from nnunet_diffusion.diffusion.gaussian import q_sample
from nnunet_diffusion.diffusion.schedules import make_schedule
from nnunet_diffusion.diffusion.staged import (PROBABILISTIC, RAPID, REFINEMENT, StagedTargets, ddim_jump,
                                               staged_inference_steps)

T = torch.tensor([0, 1, 298, 299, 300, 301, 598, 599, 600, 601, 998, 999])


def test_stage_of_each_timestep_at_and_around_the_thresholds():
    expected = [REFINEMENT] * 4 + [PROBABILISTIC] * 4 + [RAPID] * 4
    assert StagedTargets().stage(T).tolist() == expected


def test_rapid_stage_runs_at_t_max_and_refinement_at_zero():
    assert StagedTargets().model_timesteps(T, 1000).tolist() == [0, 0, 0, 0, 300, 301, 598, 599, 999, 999, 999, 999]


def test_loss_weights_are_the_papers_ratios_scaled_to_sum_one():
    alpha, beta = StagedTargets().loss_weights(T)
    assert alpha.tolist() == [0.75] * 4 + [0.5] * 4 + [0.25] * 4
    assert beta.tolist() == [0.25] * 4 + [0.5] * 4 + [0.75] * 4
    # eq. 1 ratios alpha : beta = 3:1, 1:1, 1:3
    torch.testing.assert_close(alpha / beta, torch.tensor([3.0] * 4 + [1.0] * 4 + [1 / 3] * 4))


def test_threshold_ablation_moves_the_stages():
    targets = StagedTargets(upper=699, lower=199)  # a Table 5 setting
    assert targets.stage(torch.tensor([199, 200, 699, 700])).tolist() == [REFINEMENT, PROBABILISTIC,
                                                                          PROBABILISTIC, RAPID]


@pytest.mark.parametrize("kwargs", [dict(upper=299, lower=299), dict(lower=-1), dict(ratios=((1, 3), (1, 1)))])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        StagedTargets(**kwargs)


def test_ddim_jump_with_the_true_mask_lands_on_the_same_noise_path():
    schedule = make_schedule("linear", 1000)
    torch.manual_seed(0)
    x0, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    t_from = torch.tensor([999, 599])
    x_t = q_sample(schedule, x0, t_from, noise)
    # with a perfect x0 estimate the implied noise is the true noise: x_599 = sqrt(abar) x0 + sqrt(1 - abar) noise
    torch.testing.assert_close(ddim_jump(schedule, x_t, t_from, 299, x0),
                               q_sample(schedule, x0, torch.tensor([299, 299]), noise), rtol=1e-5, atol=1e-5)
    assert ddim_jump(schedule, x_t, t_from, -1, x0) is x0


def test_staged_inference_follows_the_papers_description():
    steps = staged_inference_steps()
    assert [s.t_from for s in steps] == [999, 599, 569, 539, 509, 479, 449, 419, 389, 359, 329, 299]
    assert [s.t_to for s in steps] == [599, 569, 539, 509, 479, 449, 419, 389, 359, 329, 299, 0]
    assert [s.model_t for s in steps] == [999, 599, 569, 539, 509, 479, 449, 419, 389, 359, 329, 0]
    assert [s.head for s in steps] == ["x0"] + ["chain"] * 10 + ["eps"]
    assert len(steps) == 12  # network evaluations per chain (the paper's Table 4 says 11)
    with pytest.raises(ValueError, match="interval 40 must divide"):
        staged_inference_steps(interval=40)
    assert staged_inference_steps(last_head="x0")[-1] == staged_inference_steps()[-1].__class__(299, 0, 0, "x0")
    with pytest.raises(ValueError, match="heads"):
        staged_inference_steps(last_head="chain")


def test_ancestral_ddim_jump_is_the_ddpm_posterior_draw():
    """eta = 1 from t to t - 1 is q(x_{t-1} | x_t, x0): the same mean and variance as posterior_mean_variance;
    from 299 to 0 on the linear schedule its sigma is about 0.01 (the spread of a branch's samples)."""
    from nnunet_diffusion.diffusion.gaussian import posterior_mean_variance
    schedule = make_schedule("linear", 1000)
    torch.manual_seed(0)
    x0, x_t, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([300, 300])
    mean, variance = posterior_mean_variance(schedule, x0, x_t, t)[:2]
    torch.testing.assert_close(ddim_jump(schedule, x_t, t, 299, x0, eta=1.0, noise=noise),
                               mean + variance.sqrt() * noise, rtol=1e-5, atol=1e-5)
    zero = torch.zeros_like(noise)
    spread = ddim_jump(schedule, x_t, t, 0, x0, eta=1.0, noise=noise) - ddim_jump(schedule, x_t, t, 0, x0, 1.0, zero)
    sigma = (spread / noise).flatten()
    torch.testing.assert_close(sigma, torch.full_like(sigma, sigma[0].item()))
    assert 0.009 < sigma[0] < 0.011
    with pytest.raises(ValueError, match="needs its noise"):
        ddim_jump(schedule, x_t, t, 0, x0, eta=1.0)


def test_per_sample_dice_ce_equals_nnunets_dice_and_ce_for_each_sample():
    """Independent reference: nnU-Net's DC_and_CE_loss (soft Dice without background, not batch Dice, smooth 1e-5)
    returns CE + (-Dice); ours is CE + 1 - Dice, per sample."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import SoftDiceLoss
    from nnunet_diffusion.diffusion.staged import per_sample_dice_ce
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4, 6, 5, 4), torch.randint(0, 4, (3, 1, 6, 5, 4))
    reference = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                               weight_ce=1, weight_dice=1, ignore_label=None, dice_class=SoftDiceLoss)
    ours = per_sample_dice_ce(logits, labels)
    for b in range(3):
        torch.testing.assert_close(ours[b], reference(logits[b:b + 1], labels[b:b + 1]) + 1, rtol=1e-5, atol=1e-5)


def test_staged_loss_weights_each_sample_by_its_stage():
    """Hand case: two samples, alpha/beta picked per sample; the loss is the batch mean of the weighted sums."""
    from nnunet_diffusion.diffusion.staged import per_sample_dice_ce, staged_loss
    torch.manual_seed(1)
    eps_hat, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 1, 4, 4))
    alpha, beta = StagedTargets().loss_weights(torch.tensor([999, 100]))  # rapid (1:3), refinement (3:1)
    mse = ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))
    mask = per_sample_dice_ce(logits, labels)
    expected = ((0.25 * mse[0] + 0.75 * mask[0]) + (0.75 * mse[1] + 0.25 * mask[1])) / 2
    torch.testing.assert_close(staged_loss(eps_hat, noise, logits, labels, alpha, beta), expected)
