"""STAPLE fusion against SimpleITK on hand-made raters with a known consensus."""
import numpy as np
import SimpleITK as sitk
import torch

from nnunet_diffusion.diffusion.fusion import staple_probabilities


def raters():
    """Three 6 x 6 binary masks: two agree on a 3 x 3 square, the third misses a corner and adds a stray voxel."""
    a = np.zeros((6, 6), np.uint8)
    a[1:4, 1:4] = 1
    b, c = a.copy(), a.copy()
    c[1, 1], c[4, 4] = 0, 1
    return [a, b, c]


def test_binary_case_equals_simpleitk_staple_and_finds_the_consensus():
    masks = raters()
    fused = staple_probabilities(torch.from_numpy(np.stack(masks)), num_classes=2)
    expected = sitk.GetArrayFromImage(sitk.STAPLE([sitk.GetImageFromArray(m) for m in masks], 1.0))
    np.testing.assert_allclose(fused[1].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(fused.sum(0).numpy(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(fused.argmax(0).numpy(), masks[0])  # the consensus: the square


def test_multiclass_argmax_agrees_with_simpleitk_multilabel_staple():
    a = np.zeros((6, 6), np.uint8)
    a[1:3, 1:5], a[3:5, 1:5] = 1, 2
    b, c = a.copy(), a.copy()
    c[2, 2], c[0, 0] = 2, 1  # one rater disagrees on two voxels
    masks = [a, b, c]
    fused = staple_probabilities(torch.from_numpy(np.stack(masks)), num_classes=3)
    reference = sitk.GetArrayFromImage(sitk.MultiLabelSTAPLE([sitk.GetImageFromArray(m) for m in masks]))
    np.testing.assert_array_equal(fused.argmax(0).numpy(), reference)
    np.testing.assert_array_equal(reference, a)
    np.testing.assert_allclose(fused.sum(0).numpy(), 1.0, atol=1e-6)


def test_unanimous_samples_give_their_mask():
    mask = torch.tensor([[0, 1], [2, 1]])
    fused = staple_probabilities(torch.stack([mask, mask, mask]), num_classes=4)
    expected = torch.nn.functional.one_hot(mask, 4).permute(2, 0, 1).float()
    torch.testing.assert_close(fused, expected)
