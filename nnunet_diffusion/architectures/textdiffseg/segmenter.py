"""Latent label diffusion (TextDiffSeg): the DiffusionSegmenter's training draw and reverse run, in the label
latent instead of on the one-hot mask.

Training: z0 = label_encoder(labels); z_t = q(z0, t); eps_hat = denoiser(concat(condition, z_t), t). The loss
(eq. 6, ``LatentTrainingPass.loss``): L1, the trainer's CE + gamma Dice (eq. 4) on the labels decoded from the
denoised latent z_dn (the paper: "q_t(z_t | y, X) ~ N(z_dn, sigma^2 I)"; for eps models the x0 estimate), by
default plus the same loss on the decoded ground-truth latent (the autoencoder's reconstruction), plus lambda * L2
(eq. 5), the MSE of the denoiser's output.
Sampling: the condition once per patch; DDIM (10 steps by default) from N(0, I) in the latent, the samples and
mirrored copies in one batch; the label decoder once at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from nnunet_diffusion.architectures.segmenter import DiffusionSegmenter
from nnunet_diffusion.architectures.textdiffseg.label_autoencoder import normalise_latent
from nnunet_diffusion.diffusion.gaussian import eps_from_x0, gather_coefficient, q_sample, x0_from_eps
from nnunet_diffusion.diffusion.objectives import min_snr_eps_weight, recycled_noisy_mask
from nnunet_diffusion.diffusion.samplers import run_reverse_process
from nnunet_diffusion.diffusion.timesteps import sample_timesteps

# x0 estimates of an eps model divide by sqrt(abar_t) (0.006 at t = 999) and blow up early in the reverse run; the
# latent is normalised per sample to mean 0 and std 1, so its values are clipped to +-LATENT_CLIP standard deviations
LATENT_CLIP = 5.0


# which decoded latents eq. 4's L1 is computed on: the denoised latent, the ground truth's (the label autoencoder's
# reconstruction; what this model trained on before the denoised term), or both (summed)
SEGMENTATION_LOSSES = ("denoised+reconstruction", "denoised", "reconstruction")
# an eps model's denoised latent: 'x0_estimate' (z_t - sqrt(1 - abar) eps_hat) / sqrt(abar), what DDIM steps through
# and ends on, clipped as the sampler clips it; or 'z_t_minus_eps', LDSeg's literal z_t - eps_hat (no 1/sqrt(abar),
# but under q_sample's scaling not an estimate of z0 at any t: the decoder would learn latents the sampler never
# produces); 'x0_estimate_exact', the x0 estimate with its exact gradient (not capped where SNR < 1: the noisiest
# draws, where the sampler's first estimate reads the image alone, train as strongly as an x0 model's). x0 models:
# their output.
DENOISED_LATENTS = ("x0_estimate", "z_t_minus_eps", "x0_estimate_exact")
# what a training draw's z_t is: 'q_sample' the noised ground-truth latent (eq. 3); 'recycled' the model's own
# estimate of z0 from z_{T-1} (no gradient), noised to t (the recycling paper's train/test alignment: at test time
# every step after the first sees a latent built from the model's own estimate, never the ground truth's)
TRAINING_INPUTS = ("q_sample", "recycled")
# what the sampler does with each x0 estimate: 'standardised' (normalise_latent, the label encoder's own last step,
# then the clip), 'clipped' (the clip alone) or 'projected' (onto the latents of label maps: decoded to class
# probabilities and re-encoded, as Diffusion-LM clamps each estimate to its nearest word embedding; the last estimate
# is the model's own, decoded once: re-encoding it would add the autoencoder's reconstruction error to the result)
SAMPLED_ESTIMATES = ("standardised", "clipped", "projected")


@dataclass
class LatentTrainingPass:
    """One training draw. output / regression_target: (B, k, *L) the denoiser's output and what it regresses onto
    (the noise for 'eps' models, eq. 5; the clean latent for 'x0' models); z0: (B, k, *L) the encoded ground truth;
    z_t, t: the noisy latent and its indices; regression_weight: (B,) weights of each sample's squared error (None:
    1, the plain mean of eq. 5)."""
    output: torch.Tensor
    regression_target: torch.Tensor
    z0: torch.Tensor
    z_t: torch.Tensor
    t: torch.Tensor
    segmenter: "LatentDiffusionSegmenter"
    regression_weight: Optional[torch.Tensor] = None
    _denoised_logits: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    def denoised_latent(self) -> torch.Tensor:
        """(B, k, *L) float32 z_dn, clipped to +-LATENT_CLIP: the output of an 'x0' model, or an eps model's
        reading of it (``DENOISED_LATENTS``). Differentiable in the output (and z_t) inside the clip; the x0
        estimate's gradient is capped where the SNR is below 1 (below; 'x0_estimate_exact' keeps it exact)."""
        output = self.output.float()
        if self.segmenter.prediction == "x0":
            z = output
        elif self.segmenter.denoised_latent == "z_t_minus_eps":
            z = self.z_t.float() - output
        else:
            z = x0_from_eps(self.segmenter.schedule, self.z_t.float(), self.t, output)
        if self.segmenter.prediction == "eps" and self.segmenter.denoised_latent == "x0_estimate":
            # its gradient in eps_hat is -sqrt(1 / abar - 1): 18 at t = 845, 156 at t = 999, an over-weighting of
            # the noisiest draws (and of their half-precision rounding). Keep the value, scale the gradient by
            # min(1, sqrt(abar / (1 - abar))): capped at z_t - eps_hat's -1 where the SNR is below 1
            abar = gather_coefficient(self.segmenter.schedule.alphas_cumprod, self.t, z)
            scale = torch.clamp(torch.sqrt(abar / (1 - abar)), max=1.0)
            z = z.detach() + scale * (z - z.detach())
        return z.clamp(-LATENT_CLIP, LATENT_CLIP)

    def denoised_logits(self) -> torch.Tensor:
        """(B, N, *S) the label decoder on ``denoised_latent`` (decoded once per pass: the loss and x0_hat share
        it)."""
        if self._denoised_logits is None:
            self._denoised_logits = self.segmenter.denoiser.decode_labels(self.denoised_latent())
        return self._denoised_logits

    def reconstruction_logits(self) -> torch.Tensor:
        """(B, N, *S) the label decoder on the encoded ground truth."""
        return self.segmenter.denoiser.decode_labels(self.z0)

    def both_logits(self) -> tuple:
        """(denoised_logits, reconstruction_logits), each (B, N, *S), from one decoder call on the 2B latents: the
        decoder's norms are per sample (InstanceNorm), so a batch of both is the two calls at one call's overhead.
        A decoder with batch statistics (BatchNorm) would mix the two, so it gets two calls."""
        if self._denoised_logits is not None or any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                    for m in self.segmenter.denoiser.modules()):
            return self.denoised_logits(), self.reconstruction_logits()
        latents = torch.cat([self.denoised_latent(), self.z0.float()])
        self._denoised_logits, reconstruction = self.segmenter.denoiser.decode_labels(latents).chunk(2)
        return self._denoised_logits, reconstruction

    def loss(self, labels: torch.Tensor, segmentation_loss) -> torch.Tensor:
        """Eq. 6: segmentation_loss (CE + gamma Dice, eq. 4) of the decoded denoised latent and / or of the decoded
        ground-truth latent (``segmenter.segmentation_loss``) against labels (B, 1, *S), plus lambda * the MSE of
        eq. 5 (in float32: a sum over a patch can exceed float16's range). The segmentation term reaches the
        denoiser through z_dn and the decoder through both."""
        squared = (self.output.float() - self.regression_target.float()) ** 2
        if self.regression_weight is not None:
            squared = squared * self.regression_weight.reshape(-1, *[1] * (squared.ndim - 1))
        mse = torch.mean(squared)
        loss = self.segmenter.regression_weight * mse
        terms = self.segmenter.segmentation_loss
        if terms == "denoised+reconstruction":
            denoised, reconstruction = self.both_logits()
            return segmentation_loss(reconstruction, labels) + segmentation_loss(denoised, labels) + loss
        if terms == "reconstruction":
            loss = segmentation_loss(self.reconstruction_logits(), labels) + loss
        if terms == "denoised":
            loss = segmentation_loss(self.denoised_logits(), labels) + loss
        return loss

    @property
    def x0_hat(self) -> torch.Tensor:
        """(B, N, *S) the decoded one-step estimate in [-1, 1] (per-epoch pseudo-Dice; decoded only when asked,
        or reused from the loss)."""
        return torch.softmax(self.denoised_logits().float(), dim=1) * 2 - 1


class LatentDiffusionSegmenter(DiffusionSegmenter):
    """DiffusionSegmenter whose diffused variable is the label latent of a ``TextDiffSegDenoiser``. prediction:
    'eps' (the paper's) or 'x0' (the denoiser returns the clean latent); segmentation_loss: one of
    ``SEGMENTATION_LOSSES``; denoised_latent: one of ``DENOISED_LATENTS`` (eps models only); training_input: one
    of ``TRAINING_INPUTS``; sampled_estimate: one of ``SAMPLED_ESTIMATES`` (sampling only, not training)."""

    def __init__(self, denoiser, schedule, sampler, prediction: str = "eps", regression_weight: float = 1.0,
                 segmentation_loss: str = "denoised+reconstruction", denoised_latent: str = "x0_estimate",
                 training_input: str = "q_sample", sampled_estimate: str = "projected"):
        for value, allowed in ((segmentation_loss, SEGMENTATION_LOSSES), (denoised_latent, DENOISED_LATENTS),
                               (training_input, TRAINING_INPUTS), (sampled_estimate, SAMPLED_ESTIMATES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        self.regression_weight = regression_weight  # lambda of eq. 6
        self.segmentation_loss, self.denoised_latent = segmentation_loss, denoised_latent
        if training_input == "recycled" and "reconstruction" not in segmentation_loss:
            # its targets hold z0 detached: the reconstruction term is then the label encoder's only gradient
            raise ValueError("training_input='recycled' needs a segmentation loss with the reconstruction term "
                             f"({SEGMENTATION_LOSSES[0]!r} or 'reconstruction'), got {segmentation_loss!r}: without "
                             "it the label encoder would get no gradient")
        self.training_input, self.sampled_estimate = training_input, sampled_estimate
        super().__init__(denoiser, schedule, prediction, sampler)

    def estimate(self, x_t: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        return self.denoise(x_t, t, condition)  # eps, or the latent itself for 'x0' (no mask-space conversion)

    def latent_x0(self, z_t: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        """(B, k, *L) the model's clipped estimate of z0 from z_t at indices t (B,), as a DDIM step reads it."""
        output = self.estimate(z_t, self.model_timesteps(t), condition).float()
        z0 = output if self.prediction == "x0" else x0_from_eps(self.schedule, z_t.float(), t, output)
        return z0.clamp(-LATENT_CLIP, LATENT_CLIP)

    def training_pass(self, image: torch.Tensor, x0: torch.Tensor) -> LatentTrainingPass:
        """image (B, C_img, *S); x0 (B, N, *S) the ground truth one-hot in [-1, 1].

        'q_sample': z_t = q(z0, t), eps models regress onto its noise (eq. 5). 'recycled': z_t is the model's own
        estimate of z0 from q(z0, T-1), noised to t (``diffusion.objectives.recycled_noisy_mask``); the targets
        still point at the ground truth: z0 for 'x0' models, for eps models the noise that takes z_t to z0
        (``eps_from_x0``), whose squared error holds the estimate's error times sqrt(SNR_t) and is therefore
        weighted by Min-SNR-5 (as Cross-Timestep's ``_eps`` chain, whose inputs are its own too)."""
        z0 = self.denoiser.encode_labels((x0 + 1) / 2)
        condition = self.denoiser.encode_image(image)
        t = sample_timesteps(image.shape[0], self.schedule.num_steps, image.device)
        weight = None
        if self.training_input == "recycled":
            z_t = recycled_noisy_mask(lambda z, s: self.latent_x0(z, s, condition), z0.detach(), self.schedule, t)
            noise = eps_from_x0(self.schedule, z_t, t, z0.detach())
            weight = min_snr_eps_weight(self.schedule, t) if self.prediction == "eps" else None
        else:
            noise = torch.randn_like(z0)
            z_t = q_sample(self.schedule, z0, t, noise)
        output = self.denoise(z_t, self.model_timesteps(t), condition)
        target = noise if self.prediction == "eps" else z0
        return LatentTrainingPass(output, target, z0, z_t, t, self, regression_weight=weight)

    def sample_latent(self, image: torch.Tensor, copies: int = 1,
                      on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """(B, C_img, *S) -> (B * num_samples, k, *L) latents (patch-major, samples inner). ``copies`` as in
        DiffusionSegmenter.sample_x0: each copy starts from the noise a run of that copy alone draws."""
        n = self.sampler.num_samples
        if image.shape[0] % copies:
            raise ValueError(f"a batch of {image.shape[0]} patches cannot hold {copies} equal copies")
        condition = self.denoiser.repeat_condition(self.denoiser.encode_image(image), n)
        generator = torch.Generator().manual_seed(self.sampler.seed)
        latent = self.denoiser.latent_shape(image.shape[2:])
        shape = (image.shape[0] // copies * n, self.denoiser.latent_channels, *latent)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(image.device)
        x_start = noise.repeat(copies, *[1] * (noise.ndim - 1))
        return run_reverse_process(lambda z, t: self.estimate(z, t, condition).float(), x_start,
                                   self.sampling_schedule, self.sampler.kind, self.prediction, generator,
                                   on_step=on_step, clip=LATENT_CLIP, project=self._estimate_projection(),
                                   project_last=self.sampled_estimate != "projected")

    def _estimate_projection(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        return {"standardised": normalise_latent, "clipped": None,
                "projected": self.project_to_label_latent}[self.sampled_estimate]

    def project_to_label_latent(self, z: torch.Tensor) -> torch.Tensor:
        """(B, k, *L) -> (B, k, *L) float32: the latent of the class probabilities z decodes to (decoded,
        softmax, encoded): a latent the label encoder makes, for a noisy eps-model estimate far from all of them."""
        # the class probabilities, not their argmax: an argmax flips wherever two classes' logits nearly tie, so a
        # half-precision run would re-encode other label maps than a float32 run (seen: 0.025 mean probability
        # error under bfloat16 on an untrained model); on held-out slices soft and hard gave 0.657 and 0.666. In
        # float32: the round trip runs once per step, and its rounding would be fed back into every later step
        with torch.autocast(z.device.type, enabled=False):
            probabilities = torch.softmax(self.denoiser.decode_labels(z.float()), dim=1)
            return self.denoiser.encode_labels(probabilities).float()

    def member_probabilities(self, image: torch.Tensor, copies: int = 1,
                             on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """(B, C_img, *S) -> (B, num_samples, N, *S) class probabilities: the sampled latents, decoded once."""
        z0 = self.sample_latent(image, copies, on_step)
        probabilities = torch.softmax(self.denoiser.decode_labels(z0).float(), dim=1)
        return probabilities.reshape(image.shape[0], self.sampler.num_samples, *probabilities.shape[1:])

    def sample_x0(self, image: torch.Tensor, start_index: Optional[int] = None,
                  on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
                  x_start: Optional[torch.Tensor] = None, copies: int = 1) -> torch.Tensor:
        """(B, C_img, *S) -> (B, num_samples, N, *S) decoded masks in [-1, 1] (analysis tools' interface; they start
        from pure noise: a latent model has no mask-space state to start from)."""
        if start_index is not None or x_start is not None:
            raise ValueError("latent diffusion samples from pure noise in the latent; start_index / x_start are "
                             "mask-space states it has none of")
        return self.member_probabilities(image, copies, on_step) * 2 - 1
