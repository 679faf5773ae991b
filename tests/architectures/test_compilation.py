"""torch.compile of our networks (``architectures/compilation.py``) under nnU-Net's switch.

- The compiled step network trains and samples as the eager one: recycling with inductor (nnU-Net's backend, C++
  code generated on this CPU); every other main network with ``aot_eager``: the same graph capture and AOTAutograd
  backward, without code generation (a cold inductor compile of each of them takes 40-55 s on this 2-core machine).
- A network torch cannot compile falls back to eager, once, saying why.
- The switch: nnU-Net's, for training (off on the CPU) and for prediction (``nnUNet_compile=1``).
"""
import shutil

import pytest
import torch
from conftest import initialize_trainer, make_configuration
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from test_half_precision import build, mostly_background, train_and_sample
from test_residual_encoder_plans import DSM_BLOCK, MAIN_DIFFUSION_TRAINERS
from torch._dynamo.utils import counters

from nnunet_diffusion.architectures.compilation import (compile_step_networks, compile_targets,
                                                        decompile_step_networks, is_compiled)
from nnunet_diffusion.trainers.dsm.trainer import nnUNetTrainerDSM
from nnunet_diffusion.trainers.recycling.trainer import nnUNetTrainerDiffSegRecycling

pytestmark = pytest.mark.usefixtures("one_thread")
PATCH = (16, 16)


def configurations(dim, **kwargs):
    return ConfigurationManager(make_configuration(dim, **kwargs))


def compiled_and_eager(net, backend):
    """(eager, compiled) results of ``train_and_sample`` (training output, loss, gradient, sampled probabilities) on
    the same weights and seeds, and the graphs dynamo captured for the compiled run."""
    image, labels = torch.randn(1, 1, *PATCH), mostly_background(PATCH)
    eager = train_and_sample(net, image, labels, torch.float32)
    torch._dynamo.reset()
    counters.clear()
    assert compile_step_networks(net, log=pytest.fail, backend=backend) == ["denoiser"]
    compiled = train_and_sample(net, image, labels, torch.float32)
    return eager, compiled, counters["stats"]["unique_graphs"]


def assert_same(eager, compiled, rtol):
    for name, a, b in zip(("output", "loss", "gradient", "probabilities"), eager, compiled):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol, msg=lambda m: f"{name}: {m}")


# inductor generates C++ for the CPU: without a compiler it cannot, and the network must then fall back to eager
CPU_COMPILER = any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def test_recycling_compiled_with_inductor_trains_and_samples_as_eager():
    net = build(nnUNetTrainerDiffSegRecycling, configurations, 2, patch=list(PATCH))
    if not CPU_COMPILER:  # this machine cannot compile: what a user gets is the eager network and one log line
        messages = []
        compile_step_networks(net, log=messages.append)
        image, labels = torch.randn(1, 1, *PATCH), mostly_background(PATCH)
        train_and_sample(net, image, labels, torch.float32)
        assert len(messages) == 1 and "it runs eagerly" in messages[0] and not is_compiled(net.denoiser)
        return
    eager, compiled, graphs = compiled_and_eager(net, "inductor")
    assert graphs >= 2 and is_compiled(net.denoiser)  # the training and the sampling forward, both compiled
    assert_same(eager, compiled, rtol=1e-4)  # inductor fuses and reorders float32 sums: roundings only
    decompile_step_networks(net)
    assert not is_compiled(net.denoiser) and "forward" not in vars(net.denoiser)


@pytest.mark.parametrize("trainer_cls", [t for t in MAIN_DIFFUSION_TRAINERS if t is not nnUNetTrainerDiffSegRecycling],
                         ids=lambda cls: cls.__name__)
def test_every_main_network_is_captured_whole_and_trains_and_samples_as_eager(trainer_cls):
    """aot_eager runs the captured graphs with the eager kernels: any difference is a capture error, so equal.
    With activation checkpointing on, as these networks train on CUDA, where nnU-Net's switch compiles."""
    net = build(trainer_cls, configurations, 2, patch=list(PATCH))
    for module in net.modules():
        if hasattr(module, "checkpoint_activations"):
            module.checkpoint_activations = True
    eager, compiled, graphs = compiled_and_eager(net, "aot_eager")
    assert graphs >= 1 and is_compiled(net.denoiser), "fell back to eager"
    assert_same(eager, compiled, rtol=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_dsm_networks_compile_whole(stage):
    """DSM has no reverse loop: one forward per window, compiled as nnU-Net compiles its U-Net."""
    config = make_configuration(2, patch=list(PATCH), extra={"dsm": dict(DSM_BLOCK, stage=stage, organ_classes=[0, 1],
                                                                          tumour_classes=[2] if stage == 2 else [])})
    torch.manual_seed(0)
    net = nnUNetTrainerDSM.build_network_architecture(None, ConfigurationManager(config), 1, 3, False).eval()
    image = torch.randn(2, 1, *PATCH)
    with torch.no_grad():
        eager = net(image)
        assert compile_step_networks(net, log=pytest.fail, backend="aot_eager") == ["network"]
        compiled = net(image)
    assert is_compiled(net)
    # float32 reassociation in the traced graph: 3.8e-6 on stage 2's logits (of order 1) seen on one CPU
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_what_torch_cannot_compile_runs_eagerly_and_says_why_once():
    def backend_without_code(graph, example_inputs):
        # deliberately fails: a compiler backend that has no code for the graph, as inductor without a C++ compiler
        raise NotImplementedError("no kernel for this operator")

    net = build(nnUNetTrainerDiffSegRecycling, configurations, 2, patch=list(PATCH)).eval()
    image = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        torch.manual_seed(1)
        eager = net(image)
        messages = []
        compile_step_networks(net, log=messages.append, backend=backend_without_code)
        torch.manual_seed(1)
        fallen_back = net(image)
        net(image)
    torch.testing.assert_close(fallen_back, eager, rtol=0, atol=0)
    assert len(messages) == 1 and not is_compiled(net.denoiser)
    assert messages[0].startswith("torch.compile cannot compile denoiser (") and "no kernel for this operator" in \
        messages[0] and messages[0].endswith("it runs eagerly.")


def test_a_model_error_is_not_taken_for_a_compile_error():
    net = build(nnUNetTrainerDiffSegRecycling, configurations, 2, patch=list(PATCH)).eval()
    compile_step_networks(net, log=pytest.fail, backend="aot_eager")
    with pytest.raises(RuntimeError, match="channels"), torch.no_grad():
        net(torch.randn(1, 3, *PATCH))  # 3 image channels where the model was built for 1
    assert is_compiled(net.denoiser)


# ---- the switch ---------------------------------------------------------------------------------------------

PLANS = {"label_manager": "LabelManager", "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
         "configurations": {"2d": make_configuration(2, patch=list(PATCH), extra={
             "batch_size": 2, "batch_dice": False, "data_identifier": "nnUNetPlans_2d"})}}
DATASET = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MRI"}}


def make_trainer(tmp_path, monkeypatch, compile_env=None, enabled=None):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    if compile_env is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", compile_env)
    trainer_cls = nnUNetTrainerDiffSegRecycling
    if enabled is not None:  # what nnU-Net's switch decides on a GPU, where this machine has none
        trainer_cls = type("Compiled", (nnUNetTrainerDiffSegRecycling,), {
            "compile_backend": "aot_eager", "compile_step_networks_enabled": lambda self: enabled})
    trainer = trainer_cls(dict(PLANS, continue_training=False), "2d", 0, DATASET, device=torch.device("cpu"))
    return initialize_trainer(trainer, tmp_path)


def test_training_on_the_cpu_does_not_compile_as_nnunet(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, monkeypatch, compile_env="1")
    # nnUNet_compile=1: build_network_architecture compiled it for prediction; the trainer's switch undid it
    assert not trainer.compile_step_networks_enabled() and not is_compiled(trainer.network.denoiser)


def test_where_the_switch_is_on_the_trainer_compiles_its_step_networks_and_trains(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, monkeypatch, enabled=True)
    assert is_compiled(trainer.network.denoiser)
    batch = {"data": torch.randn(2, 1, *PATCH), "target": torch.randint(0, 3, (2, 1, *PATCH))}
    counters.clear()
    loss = trainer.train_step(batch)["loss"]
    assert counters["stats"]["unique_graphs"] >= 1 and is_compiled(trainer.network.denoiser) and loss > 0
    # the checkpoint holds the same weights under the same names as an eager model's
    eager = make_trainer(tmp_path / "eager", monkeypatch, enabled=False)
    assert not is_compiled(eager.network.denoiser)
    assert list(trainer.network.state_dict()) == list(eager.network.state_dict())


@pytest.mark.parametrize("value, compiled", [(None, False), ("0", False), ("1", True), ("true", True)])
def test_prediction_compiles_where_nnunets_predictor_does(monkeypatch, value, compiled):
    if value is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", value)
    net = nnUNetTrainerDiffSegRecycling.build_network_architecture(None, configurations(2), 1, 3, False)
    assert is_compiled(net.denoiser) == compiled
    assert list(compile_targets(net)) == ["denoiser"]


@pytest.mark.parametrize("predictor_cls", ["nnUNetPredictor", "DiffusionPredictor"])
def test_nnunets_predictor_with_nnunet_compile_predicts_as_eager(monkeypatch, predictor_cls):
    """nnUNet_compile=1: nnU-Net's predictor wraps the whole network in torch.compile; its reverse loop stays eager
    (``DiffusionSegmenter.forward``) and the step network inside runs compiled. Same logits as without."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from torch._dynamo.eval_frame import OptimizedModule
    from nnunet_diffusion.inference.predictor import DiffusionPredictor
    monkeypatch.setattr(nnUNetTrainerDiffSegRecycling, "compile_backend", "aot_eager")  # no C++ compiler needed
    plans = PlansManager(PLANS)
    volume = torch.randn(1, 1, 20, 24)  # (C, slices, X, Y): one slice, four overlapping 16 x 16 windows
    logits = {}
    for value in ("0", "1"):
        monkeypatch.setenv("nnUNet_compile", value)
        torch.manual_seed(0)
        net = nnUNetTrainerDiffSegRecycling.build_network_architecture(
            plans, plans.get_configuration("2d"), 1, 3, False)
        predictor = {"nnUNetPredictor": nnUNetPredictor, "DiffusionPredictor": DiffusionPredictor}[predictor_cls](
            device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
        predictor.manual_initialization(net, plans, plans.get_configuration("2d"), None, DATASET, "x", (0, 1))
        assert isinstance(predictor.network, OptimizedModule) == (value == "1")
        assert is_compiled(net.denoiser) == (value == "1")
        torch.manual_seed(1)
        logits[value] = predictor.predict_sliding_window_return_logits(volume)
        assert is_compiled(net.denoiser) == (value == "1")  # and it did not fall back
    torch.testing.assert_close(logits["1"], logits["0"], rtol=1e-3, atol=1e-3)  # half-precision accumulation
