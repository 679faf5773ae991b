"""The kMMM block on values: the cluster-wise argmax update against a voxel-by-voxel computation, the ablation's
spatial softmax against its formula, and gradients reaching the SSM through the response logits."""
import torch

from nnunet_diffusion.architectures.dsm.kmmm import KMeansMaskMambaLayer, kmeans_update, spatial_softmax_update


def test_kmeans_update_is_the_mean_of_each_clusters_values():
    torch.manual_seed(0)
    response, values = torch.randn(2, 4, 30), torch.randn(2, 30, 5)
    response[1, 3] = -10  # query 3 of case 1 wins no voxel: its update is zero
    expected = torch.zeros(2, 4, 5)
    for b in range(2):
        for k in range(4):
            members = [p for p in range(30) if int(response[b, :, p].argmax()) == k]
            if members:
                expected[b, k] = torch.stack([values[b, p] for p in members]).mean(0)
    torch.testing.assert_close(kmeans_update(response, values), expected)
    assert expected[1, 3].abs().sum() == 0


def test_spatial_softmax_update_is_maskformer_cross_attention():
    torch.manual_seed(0)
    response, values = torch.randn(1, 3, 10), torch.randn(1, 10, 4)
    weights = response.exp() / response.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(spatial_softmax_update(response, values), weights @ values)


def test_ssm_and_projections_train_through_the_response_and_the_queries():
    torch.manual_seed(0)
    layer = KMeansMaskMambaLayer(dim=16, num_queries=3)
    queries, features = torch.randn(2, 3, 16), torch.randn(2, 16, 4, 5, 6)
    updated, response = layer(queries, features)
    assert updated.shape == (2, 3, 16) and response.shape == (2, 3, 4, 5, 6)
    (updated.square().mean() + response.square().mean()).backward()
    assert [n for n, p in layer.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
