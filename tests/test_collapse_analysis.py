import numpy as np
import torch

from nnunet_diffusion.analysis.collapse import analyse_case, central_patch, dice_per_class
from nnunet_diffusion.diffusion.samplers import SamplerSettings
from nnunet_diffusion.trainers.cross_timestep.trainer import nnUNetTrainerCrossTimestep


def test_dice_per_class_hand_computed():
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    prediction = torch.tensor([0, 1, 2, 2, 2, 0])
    scores = dice_per_class(prediction, labels, 4)
    assert scores[0] == 2 * 1 / 3 and scores[1] == 2 * 2 / 6 and np.isnan(scores[2])


def test_central_patch_crops_and_pads():
    a = np.arange(2 * 5 * 3).reshape(2, 5, 3)
    out = central_patch(a, (3, 5))
    assert out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out[:, :, 1:4], a[:, 1:4, :])
    assert (out[:, :, 0] == 0).all() and (out[:, :, 4] == 0).all()


def test_analyse_case_rows(configuration_manager):
    torch.manual_seed(0)
    diffusion = {**nnUNetTrainerCrossTimestep.diffusion_settings(), "training_chain": {"kind": "ddim", "steps": 4},
                 "sampler": SamplerSettings("ddim", 4).to_dict()}
    net = nnUNetTrainerCrossTimestep.build_network_architecture(
        None, configuration_manager(3, extra={"diffusion": diffusion}), 1, 3).eval()
    rows = analyse_case(net, torch.randn(1, 1, 8, 8, 8), torch.randint(0, 3, (1, 1, 8, 8, 8)), seed=0)
    assert [r["timestep"] for r in rows if r["analysis"] == "start_sweep"] == [333, 666, 999]
    main = [r for r in rows if r["analysis"] == "trajectory" and r["output"] == "main"]
    prior = [r for r in rows if r["analysis"] == "trajectory" and r["output"] == "apds_prior"]
    assert [r["timestep"] for r in main] == [r["timestep"] for r in prior] == [999, 666, 333, 0]
    assert len({r["mean_dice"] for r in prior}) == 1     # the image-only prior is one prediction
