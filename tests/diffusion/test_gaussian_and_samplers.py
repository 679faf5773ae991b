import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding

from nnunet_diffusion.diffusion.gaussian import eps_from_x0, posterior_mean_variance, q_sample, x0_from_eps
from nnunet_diffusion.diffusion.masks import labels_to_x0, probabilities_from_x0, x0_from_logits
from nnunet_diffusion.diffusion.samplers import (SamplerSettings, check_sampler_coverage, ddim_step, ddpm_step,
                                                  run_reverse_process, sampler_is_covered, sampling_schedule,
                                                  training_coverage, valid_sampler_steps)
from nnunet_diffusion.diffusion.schedules import linear_schedule, respace
from nnunet_diffusion.diffusion.timesteps import timestep_embedding

T = 1000


def _ddpm_ref():
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True, clip_sample_range=1.0,
                         variance_type="fixed_small")


def test_q_sample_matches_diffusers_add_noise():
    s, ref = linear_schedule(T), _ddpm_ref()
    x0, noise = torch.rand(4, 3, 5, 5) * 2 - 1, torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(q_sample(s, x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_x0_eps_round_trip():
    s = linear_schedule(T)
    x0, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = torch.tensor([1, 400, 998])
    x_t = q_sample(s, x0, t, eps)
    torch.testing.assert_close(x0_from_eps(s, x_t, t, eps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_from_x0(s, x_t, t, x0), eps, rtol=1e-4, atol=1e-4)


def test_posterior_hand_computed():
    # T=2, betas 0.1, 0.5: abar = 0.9, 0.45. At t=1: mean = sqrt(.9)*.5/.55 x0 + sqrt(.5)*.1/.55 x_t
    s = type(linear_schedule(2))(torch.tensor([0.9, 0.45], dtype=torch.float64), torch.arange(2))
    x0, x_t = torch.full((1, 1), 0.7), torch.full((1, 1), -0.3)
    mean, var = posterior_mean_variance(s, x0, x_t, torch.tensor([1]))
    expected = 0.9 ** 0.5 * 0.5 / 0.55 * 0.7 + 0.5 ** 0.5 * 0.1 / 0.55 * -0.3
    assert mean.item() == pytest.approx(expected, rel=1e-6)
    assert var.item() == pytest.approx(0.5 * 0.1 / 0.55, rel=1e-6)


def test_ddpm_step_matches_diffusers_eps_prediction():
    s, ref = linear_schedule(T), _ddpm_ref()
    x_t, eps_hat = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    for t in (999, 500, 1):
        ours_x0 = x0_from_eps(s, x_t, torch.tensor([t, t]), eps_hat).clamp(-1, 1)
        g = torch.Generator().manual_seed(3)
        expected = ref.step(eps_hat, t, x_t, generator=g).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
        # diffusers keeps its coefficients in float32, ours are float64: agree to ~1e-4 relative
        torch.testing.assert_close(ddpm_step(s, x_t, t, ours_x0, noise), expected, rtol=1e-3, atol=1e-3)


def test_ddpm_step_matches_diffusers_x0_prediction_on_respaced_chain():
    # diffusers with custom timesteps uses abar[prev_t] and beta = 1 - abar_t/abar_prev: the respaced chain
    base = linear_schedule(T)
    sp = respace(base, 10)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type="sample",
                        clip_sample=True, clip_sample_range=1.0)
    ref.set_timesteps(timesteps=sp.timesteps.flip(0).tolist())
    x_t, x0_hat = torch.randn(2, 3, 6), torch.rand(2, 3, 6) * 2 - 1
    for k in (9, 4, 1, 0):
        g = torch.Generator().manual_seed(5)
        expected = ref.step(x0_hat, int(sp.timesteps[k]), x_t, generator=g).prev_sample
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ddpm_step(sp, x_t, k, x0_hat, noise), expected, rtol=1e-4, atol=1e-4)


def test_ddim_step_matches_diffusers():
    # diffusers 'leading' spacing with 10 steps: t=900 -> 800; give our step the same two alpha_bars
    base = linear_schedule(T)
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True)
    ref.set_timesteps(10)
    pair = type(base)(base.alphas_cumprod[[800, 900]].clone(), torch.tensor([800, 900]))
    x_t, eps_hat = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    x0_hat = x0_from_eps(pair, x_t, torch.tensor([1, 1]), eps_hat).clamp(-1, 1)
    ours = ddim_step(pair, x_t, 1, x0_hat, eps_from_x0(pair, x_t, torch.tensor([1, 1]), x0_hat))
    expected = ref.step(eps_hat, 900, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_full_ddpm_chain_matches_diffusers_loop():
    base = linear_schedule(T)
    settings = SamplerSettings(kind="ddpm", steps=10)
    sp = sampling_schedule(base, settings)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True, clip_sample_range=1.0)
    ref.set_timesteps(timesteps=sp.timesteps.flip(0).tolist())
    model = lambda x, t: torch.tanh(x) * 0.5 + 0.01 * t.float().reshape(-1, 1, 1) / T  # any deterministic eps
    x_start = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    ours = run_reverse_process(model, x_start, sp, "ddpm", "eps", torch.Generator().manual_seed(1))
    g, x = torch.Generator().manual_seed(1), x_start
    for t in ref.timesteps:
        out = ref.step(model(x, torch.full((2,), int(t))), int(t), x, generator=g)
        x = out.prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_ddim_chain_with_perfect_x0_model_returns_x0():
    base = linear_schedule(T)
    target = torch.rand(1, 2, 4) * 2 - 1
    sp = sampling_schedule(base, SamplerSettings(kind="ddim", steps=4))
    seen = []
    out = run_reverse_process(lambda x, t: target, torch.randn(1, 2, 4), sp, "ddim", "x0",
                              torch.Generator().manual_seed(0), on_step=lambda k, x0: seen.append(k))
    torch.testing.assert_close(out, target)
    assert seen == [3, 2, 1, 0]


def test_reverse_process_projects_every_estimate_and_rederives_eps_from_it():
    """project(x0_hat) = 0 at every step: each DDIM step is then x_{k-1} = sqrt(abar_{k-1}) 0 + sqrt(1 - abar_{k-1})
    eps with eps = x_k / sqrt(1 - abar_k) (re-derived from the projected estimate, not the model's output)."""
    sp = sampling_schedule(linear_schedule(T), SamplerSettings(steps=4))
    inputs, projected = [], []

    def model(x, t):
        inputs.append(x.clone())
        return torch.full_like(x, 3.0)  # an eps the loop must not use

    def project(x0):
        projected.append(x0.clone())
        return torch.zeros_like(x0)

    x_start = torch.randn(1, 2, 3)
    out = run_reverse_process(model, x_start, sp, "ddim", "eps", torch.Generator(), project=project)
    assert len(projected) == 4 and torch.equal(out, torch.zeros_like(out))
    abar = sp.alphas_cumprod
    for k in (3, 2, 1):
        expected = inputs[3 - k] * ((1 - abar[k - 1]) / (1 - abar[k])).sqrt().float()
        torch.testing.assert_close(inputs[4 - k], expected)
    # the model's raw estimate reached the projection: x0_from_eps of its output
    torch.testing.assert_close(projected[0], ((x_start - (1 - abar[3]).sqrt() * 3.0) / abar[3].sqrt()).float())


def test_reverse_process_can_return_the_models_own_last_estimate():
    """project_last=False: every step continues from a projected estimate (here 0), the returned one is the model's:
    at k = 0 the eps model's x0_from_eps of its output, clipped."""
    sp = sampling_schedule(linear_schedule(T), SamplerSettings(steps=4))
    calls, inputs = [], []

    def model(x, t):
        inputs.append(x.clone())
        return torch.full_like(x, 0.5)

    def project(x0):
        calls.append(x0.clone())
        return torch.zeros_like(x0)

    out = run_reverse_process(model, torch.randn(1, 2, 3), sp, "ddim", "eps", torch.Generator(), project=project,
                              project_last=False, clip=100.0)
    assert len(calls) == 3  # steps 3, 2, 1; not the last
    abar0 = sp.alphas_cumprod[0]
    torch.testing.assert_close(out, ((inputs[-1] - (1 - abar0).sqrt() * 0.5) / abar0.sqrt()).float())


def test_reverse_process_start_index():
    sp = sampling_schedule(linear_schedule(T), SamplerSettings(steps=10))
    seen = []
    run_reverse_process(lambda x, t: torch.zeros_like(x), torch.randn(1, 1, 2), sp, "ddim", "eps",
                        torch.Generator(), start_index=4, on_step=lambda k, x0: seen.append(k))
    assert seen == [4, 3, 2, 1, 0]


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0, 1, 17, 999])
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 64), ref, rtol=1e-5, atol=1e-5)


def test_sampler_settings_validation_and_env():
    with pytest.raises(ValueError, match="Unknown sampler 'euler'"):
        SamplerSettings(kind="euler").validated(T)
    with pytest.raises(ValueError, match="Cannot respace a 1000-step schedule to 7 steps"):
        SamplerSettings(steps=7).validated(T)
    env = {"NNUNET_DIFFUSION_SAMPLER": "DDPM", "NNUNET_DIFFUSION_STEPS": "4", "NNUNET_DIFFUSION_SAMPLES": "3",
           "NNUNET_DIFFUSION_SEED": "7"}
    assert SamplerSettings().with_env_overrides(env) == SamplerSettings("ddpm", 4, 3, 7)
    with pytest.raises(ValueError, match="NNUNET_DIFFUSION_STEPS='ten' is not a valid int"):
        SamplerSettings().with_env_overrides({"NNUNET_DIFFUSION_STEPS": "ten"})


def test_masks_round_trip_and_probabilities():
    labels = torch.tensor([[[0, 2, 1]]])
    x0 = labels_to_x0(labels, 3)
    assert x0[0, :, 1].tolist() == [-1, -1, 1]
    p = probabilities_from_x0(x0)
    assert p.argmax(1).tolist() == labels[:, 0].tolist()
    logits = torch.randn(2, 4, 5)
    torch.testing.assert_close(probabilities_from_x0(x0_from_logits(logits)), torch.softmax(logits, 1),
                               rtol=1e-4, atol=1e-5)
    uniform = probabilities_from_x0(-torch.ones(1, 4, 1))
    torch.testing.assert_close(uniform, torch.full((1, 4, 1), 0.25))


# ---- which samplers a trained model may run (training_coverage) ---------------------------------------------------

def test_coverage_recycling_5_of_1001_by_hand():
    # betas over 1001 steps respaced to 5: timesteps 0, 250, 500, 750, 1000. Training draws t in 0..T-2 =
    # {0, 250, 500, 750}; t = 1000 only runs as recycling's no-gradient first pass from the noised ground truth.
    schedule = respace(linear_schedule(1001), 5)
    coverage = training_coverage(schedule, recycling=True)
    assert coverage.trained == (0, 250, 500, 750) and coverage.start == 1000 and coverage.chain is None
    # K=5 [1000, 750, 500, 250, 0], K=3 [1000, 500, 0], K=2 [1000, 0]: start at 1000 as in training, output at
    # a trained t. K=1 [1000]: the final mask would be the never-trained output at 1000. K=4: no respacing.
    assert [k for k in range(1, 6) if sampler_is_covered(schedule, k, coverage)] == [2, 3, 5]
    assert valid_sampler_steps(schedule, coverage) == [2, 3, 5]
    with pytest.raises(ValueError, match=r"cannot sample with 1 steps \(timesteps \[1000\]\).*t=1000 only as the "
                                         r"first step.*Valid NNUNET_DIFFUSION_STEPS for this model: \[2, 3, 5\]"):
        check_sampler_coverage(schedule, SamplerSettings("ddpm", 1), coverage)
    check_sampler_coverage(schedule, SamplerSettings("ddim", 3), coverage)   # kind is free


def test_coverage_x0_without_recycling_trains_every_step():
    schedule = respace(linear_schedule(1001), 5)
    coverage = training_coverage(schedule, recycling=False)
    assert coverage.trained == (0, 250, 500, 750, 1000) and coverage.start is None
    assert valid_sampler_steps(schedule, coverage) == [1, 2, 3, 5]


def test_coverage_uniform_eps_model_allows_every_respacing():
    coverage = training_coverage(linear_schedule(T))
    assert coverage.trained == tuple(range(T))
    assert valid_sampler_steps(linear_schedule(T), coverage) == [1, 2, 4, 10, 28, 38, 112, 334, 1000]


def test_coverage_recurrent_chain_allows_only_its_own_chain():
    schedule = linear_schedule(T)
    coverage = training_coverage(schedule, chain_steps=10)
    assert coverage.chain == coverage.trained == tuple(range(0, 1000, 111))
    # K=2 visits [999, 0], both trained timesteps, but the state never made the 999 -> 0 transition
    assert not sampler_is_covered(schedule, 2, coverage)
    assert valid_sampler_steps(schedule, coverage) == [10]
    for kind in ("ddpm", "ddim"):
        check_sampler_coverage(schedule, SamplerSettings(kind, 10, num_samples=3, seed=5), coverage)
    with pytest.raises(ValueError, match=r"timesteps \[999, 666, 333, 0\].*10-step chain.*"
                                         r"Valid NNUNET_DIFFUSION_STEPS for this model: \[10\]"):
        check_sampler_coverage(schedule, SamplerSettings("ddim", 4), coverage)
    assert valid_sampler_steps(schedule, training_coverage(schedule, chain_steps=4)) == [4]


def test_sampler_env_variables_set():
    assert SamplerSettings.env_variables_set({"NNUNET_DIFFUSION_STEPS": "4", "NNUNET_DIFFUSION_SEED": " ",
                                              "NNUNET_DIFFUSION_EPOCHS": "3"}) == {"NNUNET_DIFFUSION_STEPS": "4"}
