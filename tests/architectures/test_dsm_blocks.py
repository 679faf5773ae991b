"""DSM's blocks on values: the anomaly prompt on a constructed response map, one step of guided feature diffusion
by hand, and eq. 20's text alignment against its formula."""
import itertools
import math

import pytest
import torch
from torch import nn

from nnunet_diffusion.architectures.dsm.anomaly import (OUTSIDE_BIAS, PROMPT_WEIGHT, anomaly_prompt, anomaly_score,
                                                        organ_queries, prompt_attention_bias)
from nnunet_diffusion.architectures.dsm.feature_diffusion import GuidedFeatureDiffusion, neighbours
from nnunet_diffusion.architectures.dsm.text_alignment import TextAlignedClassifier


def test_anomaly_prompt_marks_the_voxels_no_query_claims():
    """Two organ queries: query 0 responds 5 on the left half, query 1 on the right half, except a 2x2 block
    where both respond -3 (an unseen structure): the prompt marks exactly that block."""
    responses = torch.full((1, 2, 6, 6), -4.0)
    responses[0, 0, :, :3] = 5.0
    responses[0, 1, :, 3:] = 5.0
    responses[0, :, 2:4, 2:4] = -3.0
    score = anomaly_score(responses)
    expected = torch.zeros(1, 6, 6, dtype=torch.bool)
    expected[0, 2:4, 2:4] = True
    assert torch.equal(anomaly_prompt(score), expected)
    torch.testing.assert_close(score[0, 2, 2], torch.tensor(1.0))  # -max = 3, the largest; min-max -> 1
    torch.testing.assert_close(score[0, 0, 0], torch.tensor(0.0))
    bias = prompt_attention_bias(score)
    assert bias.shape == (1, 36)
    torch.testing.assert_close(bias[0, 2 * 6 + 2], torch.tensor(PROMPT_WEIGHT * 1.0))
    torch.testing.assert_close(bias[0, 0], torch.tensor(OUTSIDE_BIAS))
    assert torch.equal(anomaly_score(torch.ones(1, 2, 3, 3)), torch.zeros(1, 3, 3))  # constant map: no anomaly


def test_eq_14_leaves_out_the_background_query():
    """Queries for classes (0 = background, 1, 2) at four voxels: organ 1, organ 2, background, unseen. The background
    query responds most at the unseen voxel (6, the largest response anywhere): the score ignores it.
    -max over the organ queries 1, 2: (-4, -3, 1, 3); min-max with min -4, range 7: (0, 1/7, 5/7, 1)."""
    responses = torch.tensor([[-2.0, -1.0, 5.0, 6.0],    # background
                              [4.0, -2.0, -1.0, -4.0],   # organ 1
                              [-3.0, 3.0, -2.0, -3.0]])  # organ 2
    responses = responses.view(1, 3, 2, 2)
    assert organ_queries([0, 1, 2]) == [1, 2]
    score = anomaly_score(responses, organ_queries([0, 1, 2]))
    torch.testing.assert_close(score.flatten(), torch.tensor([0.0, 1 / 7, 5 / 7, 1.0]))
    assert anomaly_prompt(score).flatten().tolist() == [False, False, True, True]
    # with the background query in the max the unseen voxel would score lowest: -max = (-2, -3, -5, -6)
    torch.testing.assert_close(anomaly_score(responses).flatten(), torch.tensor([2 / 3, 1.0, 1 / 3, 0.0]))
    # the background's position comes from the classes, not the order; no organ query: nothing is anomalous
    assert organ_queries([2, 0, 1]) == [0, 2] and organ_queries([0, 1, 3]) == [1, 2]
    assert torch.equal(anomaly_score(responses[:, :1], organ_queries([0])), torch.zeros(1, 2, 2))


def test_neighbours_in_2d_and_3d():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    stacked = neighbours(x)
    assert stacked.shape == (1, 1, 9, 3, 3)
    for n, (dy, dx) in enumerate(itertools.product((-1, 0, 1), repeat=2)):
        assert stacked[0, 0, n, 1, 1] == x[0, 0, 1 + dy, 1 + dx]
    assert stacked[0, 0, 0, 0, 0] == 0  # (-1, -1) of the corner lies outside: zero padding
    assert neighbours(torch.randn(2, 3, 4, 5, 6)).shape == (2, 3, 27, 4, 5, 6)


def test_guided_diffusion_step_by_hand():
    """With theta = phi = 0 every inside neighbour weighs the same: E_i = F_i + mean_j (F_j - F_i) = the mean of
    the neighbourhood inside the map; a constant map is unchanged whatever the guidance."""
    block = GuidedFeatureDiffusion(channels=1, guidance_channels=2, conv_op=nn.Conv2d)
    for conv in (block.theta, block.phi):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    features, guidance = torch.arange(16.0).reshape(1, 1, 4, 4), torch.randn(1, 2, 2, 2)
    step = block.diffusion_step(features, guidance)
    torch.testing.assert_close(step[0, 0, 1, 1], features[0, 0, 0:3, 0:3].mean())
    torch.testing.assert_close(step[0, 0, 0, 0], features[0, 0, 0:2, 0:2].mean())  # corner: 4 neighbours inside
    torch.testing.assert_close(block.diffusion_step(torch.full((1, 1, 4, 4), 7.0), guidance),
                               torch.full((1, 1, 4, 4), 7.0))


def test_guidance_keeps_a_boundary_sharp():
    """A step edge in the features where the guidance has the same edge: with theta = phi = identity scaled up,
    neighbours across the edge get ~0 weight, so the edge survives the step (plain averaging would blur it)."""
    block = GuidedFeatureDiffusion(channels=1, guidance_channels=1, conv_op=nn.Conv2d, key_channels=1)
    with torch.no_grad():
        for conv in (block.theta, block.phi):
            conv.weight.fill_(10.0)
            conv.bias.zero_()
    edge = torch.zeros(1, 1, 6, 6)
    edge[..., 3:] = 1.0
    guidance = edge * 2 - 1  # -1 left, +1 right
    step = block.diffusion_step(edge, guidance)
    assert (step[0, 0, 1:5, 2] < 1e-6).all() and (step[0, 0, 1:5, 3] > 1 - 1e-6).all()


def test_text_alignment_is_eq_20():
    torch.manual_seed(0)
    classifier = TextAlignedClassifier(dim=8, text_dim=5)
    queries, text = torch.randn(2, 3, 8), torch.randn(4, 5)
    logits = classifier(queries, text)
    projected = classifier.project(queries)
    for b, q, k in itertools.product(range(2), range(3), range(4)):
        cosine = projected[b, q] @ text[k] / (projected[b, q].norm() * text[k].norm())
        torch.testing.assert_close(logits[b, q, k], cosine / 0.01, rtol=1e-4, atol=1e-4)
    assert math.isclose(float(torch.softmax(logits.detach(), -1).sum(-1).mean()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("dim", [2, 3])
def test_guided_diffusion_step_is_eq_17_on_the_stacked_neighbourhood(dim):
    """The step (one offset at a time) against eqs. 17-18 written on the explicit 3^d stack: the same values and
    gradients, in 2d and 3d, with random projections."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    block = GuidedFeatureDiffusion(channels=3, guidance_channels=4, conv_op=conv, key_channels=5)
    features = torch.randn(2, 3, *[5] * dim, requires_grad=True)
    guidance = torch.randn(2, 4, *[3] * dim)
    step = block.diffusion_step(features, guidance)
    g = F.interpolate(guidance, size=features.shape[2:], mode="nearest")
    q, k = block.theta(g), block.phi(g)
    logits = (q.unsqueeze(2) * neighbours(k)).sum(1, keepdim=True) / math.sqrt(5)
    inside = neighbours(torch.ones_like(features[:, :1]))
    w = torch.softmax(logits.masked_fill(inside == 0, float("-inf")), dim=2)
    expected = features + (w * (neighbours(features) - features.unsqueeze(2))).sum(dim=2)
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(step.square().sum(), features)
    expected_grad, = torch.autograd.grad(expected.square().sum(), features)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)
