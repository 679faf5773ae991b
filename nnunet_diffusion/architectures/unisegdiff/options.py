"""UniSegDiffOptions: what a UniSegDiff model is (stored at the top of plans.json's 'diffusion' block)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from nnunet_diffusion.architectures.options import StoredOptions
from nnunet_diffusion.architectures.unisegdiff.dnet import HEADS
from nnunet_diffusion.diffusion.staged import StagedTargets


@dataclass(frozen=True)
class UniSegDiffOptions(StoredOptions):
    """Staged training, DNet's heads, DCA, where the condition network comes from and the staged sampler's last jump.
    The paper's ablations (Tables 4-6) change one each."""
    # stage thresholds 599 / 299 and alpha:beta 1:3, 1:1, 3:1; None: uniform training of the one head in ``heads``
    staged: Optional[StagedTargets] = StagedTargets()
    heads: Tuple[str, ...] = HEADS
    dca: bool = True
    condition_network: str = "pretrained"  # or 'joint': an encoder trained with DNet (the ablation without pre-training)
    # the head of the staged sampler's last jump, X_299 -> mask. Sec. 2.2 says the noise prediction branch ('eps',
    # nnUNetTrainerUniSegDiff_epsLastJump); measured at equal time on the example (benchmarks/results_cpu_methods.md)
    # the x0 head reached held-out Dice 0.80 against 0.29, so it is the default
    last_jump_head: str = "x0"
    # DCA at the stages with at most this many voxels at the planned patch (the paper does not say at which stages;
    # attention grows with the square of the voxels). 256, chosen for cost (issue 22): on the example's 2d plan the
    # 20 x 20 stage's DCA was a third of a training step (benchmarks/results_cpu_cost_levers.md); 1024 before
    # (nnUNetTrainerUniSegDiff_dcaMaxTokens1024, and what a plans.json without the setting keeps)
    dca_max_tokens: int = 256

    @classmethod
    def legacy_values(cls) -> dict:
        # models from before a setting: the last jump through the eps head, DCA up to 1024 voxels
        return {"last_jump_head": "eps", "dca_max_tokens": 1024}

    def to_stored(self) -> dict:
        stored = super().to_stored()
        stored["staged"] = None if self.staged is None else {
            "upper": self.staged.upper, "lower": self.staged.lower, "ratios": [list(r) for r in self.staged.ratios]}
        return stored

    @classmethod
    def from_stored(cls, block: dict) -> "UniSegDiffOptions":
        options = super().from_stored({k: v for k, v in block.items() if k != "staged"})
        if "staged" not in block:
            return options
        staged = block["staged"]
        return replace(options, staged=None if staged is None else StagedTargets(
            staged["upper"], staged["lower"], tuple(tuple(r) for r in staged["ratios"])))
