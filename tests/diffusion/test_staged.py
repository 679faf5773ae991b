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
    assert [s.t_to for s in steps] == [599, 569, 539, 509, 479, 449, 419, 389, 359, 329, 299, -1]
    assert [s.model_t for s in steps] == [999, 599, 569, 539, 509, 479, 449, 419, 389, 359, 329, 0]
    assert [s.head for s in steps] == ["x0"] + ["chain"] * 10 + ["eps"]
    assert len(steps) == 12  # network evaluations per chain (the paper's Table 4 says 11)
    with pytest.raises(ValueError, match="interval 40 must divide"):
        staged_inference_steps(interval=40)
