"""Values of the ensemble maths: mirror combinations as nnU-Net makes them, flips undone, entropy and BALD."""
import math

import numpy as np
import torch

from nnunet_diffusion.inference.ensemble import (mirror_combinations, stack_mirrored, uncertainty_maps, unflip)


def test_mirror_combinations_follow_nnunets_order():
    assert mirror_combinations(None) == [()]
    assert mirror_combinations((1,)) == [(), (3,)]
    assert mirror_combinations((0, 1, 2)) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


def test_unflip_undoes_stack_mirrored_with_and_without_a_sample_dimension():
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(1, 2, 4, 5)
    combinations = mirror_combinations((0, 1))
    stacked = stack_mirrored(x, combinations)
    assert stacked.shape == (4, 2, 4, 5)
    torch.testing.assert_close(stacked[3], torch.flip(x[0], [1, 2]))
    torch.testing.assert_close(unflip(stacked, combinations), x.expand(4, -1, -1, -1))
    with_samples = stacked[:, None].expand(-1, 3, -1, -1, -1)  # (K, samples, C, *S)
    torch.testing.assert_close(unflip(with_samples, combinations, extra_dims=1), x[:, None].expand(4, 3, -1, -1, -1))


def test_uncertainty_maps_hand_computed():
    # voxel 0: two certain members that agree; voxel 1: two certain members that disagree;
    # voxel 2: two members that agree on 50/50 (uncertain, but no disagreement)
    members = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]],
                            [[1.0, 1.0, 0.5], [0.0, 0.0, 0.5]]])  # (M=2, C=2, S=3)
    maps = uncertainty_maps(members)
    log2 = math.log(2)
    torch.testing.assert_close(maps[0], torch.tensor([0.0, log2, log2]))   # predictive entropy
    torch.testing.assert_close(maps[1], torch.tensor([0.0, log2, 0.0]))    # mutual information


def test_uncertainty_maps_match_a_numpy_reference():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(5, 4, 3, 3), dim=1).double()
    mean = p.mean(0).numpy()
    total = -(mean * np.log(mean)).sum(0)
    expected = total - (-(p.numpy() * np.log(p.numpy())).sum(1)).mean(0)
    maps = uncertainty_maps(p)
    torch.testing.assert_close(maps[0].double(), torch.from_numpy(total), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps[1].double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-6)
