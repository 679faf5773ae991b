"""Loading a stock nnU-Net checkpoint as the frozen condition network: values, freezing, and the errors."""
import pydoc

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from conftest import make_configuration
from nnunet_diffusion.trainers.common.pretrained_condition import load_frozen_condition_network, stock_checkpoint_path


def plain_unet(seed, features=(4, 8)):
    torch.manual_seed(seed)
    architecture = make_configuration(2, features=features)["architecture"]
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        kwargs[key] = pydoc.locate(kwargs[key]) if kwargs[key] else None
    return PlainConvUNet(1, num_classes=3, **kwargs)


def save_stock_checkpoint(tmp_path, network, plans="nnUNetPlans", configuration="2d"):
    path = stock_checkpoint_path(str(tmp_path), "Dataset501_X", plans, configuration, 0)
    path.parent.mkdir(parents=True)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": {"plans_name": plans}, "configuration": configuration, "fold": 0}}, path)
    return path


def test_loads_the_stock_weights_exactly_and_freezes_them(tmp_path):
    stock = plain_unet(seed=0)
    path = save_stock_checkpoint(tmp_path, stock)
    assert path == tmp_path / "Dataset501_X" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    condition = load_frozen_condition_network(plain_unet(seed=1), path, "501", "nnUNetPlans", "2d", 0)
    for (name, a), b in zip(stock.state_dict().items(), condition.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(p.requires_grad for p in condition.parameters())
    # a training step leaves it unchanged: no gradient reaches it
    before = [p.clone() for p in condition.parameters()]
    head = torch.nn.Conv2d(3, 3, 1)
    optimizer = torch.optim.SGD([*condition.parameters(), *head.parameters()], lr=0.1)
    head(condition(torch.randn(2, 1, 8, 8))).pow(2).mean().backward()
    optimizer.step()
    assert all(p.grad is None for p in condition.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, condition.parameters()))


def test_missing_checkpoint_names_the_path_and_the_command(tmp_path):
    path = stock_checkpoint_path(str(tmp_path), "Dataset501_X", "nnUNetPlans", "2d", 3)
    with pytest.raises(ValueError, match=r"fold_3/checkpoint_final.pth, which does not exist.*nnUNetv2_train 501 2d 3"):
        load_frozen_condition_network(plain_unet(0), path, "501", "nnUNetPlans", "2d", 3)


def test_other_configuration_or_architecture_is_refused(tmp_path):
    path = save_stock_checkpoint(tmp_path, plain_unet(0), configuration="3d_fullres")
    with pytest.raises(ValueError, match="configuration '3d_fullres'; this model needs 'nnUNetPlans', '2d'"):
        load_frozen_condition_network(plain_unet(0), path, "501", "nnUNetPlans", "2d", 0)
    other = tmp_path / "other"
    path = save_stock_checkpoint(other, plain_unet(0, features=(4, 16)))
    with pytest.raises(ValueError, match="does not fit the condition network"):
        load_frozen_condition_network(plain_unet(0), path, "501", "nnUNetPlans", "2d", 0)
