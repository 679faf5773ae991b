import math

import pytest
import torch
from diffusers import DDPMScheduler

from nnunet_diffusion.diffusion.schedules import (check_respacing, cosine_schedule, linear_schedule, make_schedule,
                                                   respace, scaled_linear_schedule)


def test_linear_schedule_matches_diffusers():
    ours = linear_schedule(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_cosine_schedule_matches_diffusers_squaredcos():
    ours = cosine_schedule(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-4, atol=1e-6)


def test_scaled_linear_schedule_matches_diffusers_and_hand_values():
    ours = scaled_linear_schedule(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-8)
    # by hand: sqrt(beta) halfway is the mean of the two roots; LDM's last alpha_bar is 0.0047
    small = scaled_linear_schedule(3)
    assert small.betas[1].item() == pytest.approx(((0.00085 ** 0.5 + 0.012 ** 0.5) / 2) ** 2, rel=1e-12)
    assert ours.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=5e-5)
    assert make_schedule("scaled_linear", 1000).alphas_cumprod.equal(ours.alphas_cumprod)


def test_cosine_schedule_formula_by_hand():
    s = cosine_schedule(10)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    assert s.alphas_cumprod[3].item() == pytest.approx(f(0.4) / f(0.0), rel=1e-9)


def test_respacing_keeps_every_sth_alpha_bar_and_first_and_last():
    base = linear_schedule(1001)
    sp = respace(base, 5)
    assert sp.timesteps.tolist() == [0, 250, 500, 750, 1000]
    torch.testing.assert_close(sp.alphas_cumprod, base.alphas_cumprod[[0, 250, 500, 750, 1000]])
    # alpha'_0 = abar_0 and alpha'_k = abar_k / abar_{k-1}
    alphas = 1 - sp.betas
    assert alphas[0].item() == pytest.approx(base.alphas_cumprod[0].item())
    assert alphas[2].item() == pytest.approx((base.alphas_cumprod[500] / base.alphas_cumprod[250]).item())
    torch.testing.assert_close(torch.cumprod(alphas, 0), sp.alphas_cumprod)


def test_respacing_hand_computed_small_case():
    # betas 0.1, 0.2, 0.3 on T=3; respace to K=2 keeps t=0 and t=2
    base = make_schedule("linear", 3)
    base = type(base)(torch.cumprod(1 - torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), 0), torch.arange(3))
    sp = respace(base, 2)
    assert sp.alphas_cumprod.tolist() == pytest.approx([0.9, 0.9 * 0.8 * 0.7])
    assert sp.betas.tolist() == pytest.approx([0.1, 1 - 0.8 * 0.7])


def test_respacing_one_step_keeps_last():
    sp = respace(linear_schedule(1000), 1)
    assert sp.timesteps.tolist() == [999]


@pytest.mark.parametrize("k", [3, 7, 1001, 0])
def test_invalid_respacing_says_which_counts_are_valid(k):
    with pytest.raises(ValueError, match="Valid step counts for T=1000: \\[1, 2, 4, 10, 28"):
        check_respacing(1000, k)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="Unknown noise schedule 'quadratic'"):
        make_schedule("quadratic", 100)


def test_a_ddim_step_on_a_subschedule_is_the_ddim_jump_between_its_timesteps():
    from nnunet_diffusion.diffusion.samplers import ddim_step
    from nnunet_diffusion.diffusion.gaussian import eps_from_x0
    from nnunet_diffusion.diffusion.schedules import subschedule
    from nnunet_diffusion.diffusion.staged import ddim_jump
    full = make_schedule("linear", 1000)
    chain = subschedule(full, [299, 329, 599])
    assert chain.timesteps.tolist() == [299, 329, 599]
    torch.testing.assert_close(chain.alphas_cumprod, full.alphas_cumprod[[299, 329, 599]])
    x, x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    stepped = ddim_step(chain, x, 2, x0, eps_from_x0(chain, x, torch.full((3,), 2), x0))   # 599 -> 329
    torch.testing.assert_close(stepped, ddim_jump(full, x, torch.full((3,), 599), 329, x0))
    with pytest.raises(ValueError, match="ascending"):
        subschedule(full, [599, 299])
