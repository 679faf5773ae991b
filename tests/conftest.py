"""Shared test helpers: tiny nnU-Net configurations built like nnU-Net's planner writes them."""
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nnunet_diffusion.cli import trainer_path
from nnunet_diffusion.planning.example_dataset import build_example_dataset

os.environ.setdefault("nnUNet_def_n_proc", "1")
TEXT_DIM = 16  # size of the class text embeddings in test configurations


def make_configuration(dim: int = 3, features=(4, 8), patch=None, extra=None) -> dict:
    """A plans 'configuration' dict for a 2-stage PlainConvUNet (nnU-Net 2.8 format)."""
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    n = len(features)
    config = {
        "patch_size": patch or [8] * dim,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features), "conv_op": conv,
                "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
                "n_conv_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
                "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }
    # what TextDiffSeg's trainer stores from the class prompts (their embeddings' size); the other trainers ignore it
    config["diffusion"] = {"text": {"model": None, "dim": TEXT_DIM}}
    config.update(extra or {})
    return config


@pytest.fixture
def configuration_manager():
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    def _make(dim=3, **kwargs):
        return ConfigurationManager(make_configuration(dim, **kwargs))
    return _make


def diffusion_trainers():
    """Every diffusion trainer nnU-Net can find through our nnUNet_extTrainer entry point, sorted by name."""
    from nnunet_diffusion.nnunet_ext import nnunet_diffusion_trainers
    from nnunet_diffusion.trainers.common.diffusion_base import nnUNetTrainerDiffusionBase
    found = {cls for cls in vars(nnunet_diffusion_trainers).values()
             if isinstance(cls, type) and issubclass(cls, nnUNetTrainerDiffusionBase)
             and cls is not nnUNetTrainerDiffusionBase}
    return sorted(found, key=lambda cls: cls.__name__)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: thread start-up costs more than it saves, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_text_model(folder) -> str:
    """A second text encoder, chosen by path: a randomly initialised 1-layer BERT (hidden size 24) with the bundled
    model's tokenizer, saved as a Hugging Face folder (what a user's local copy of BioBERT looks like)."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from nnunet_diffusion.text.encoders import resolve_text_model
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(None))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def initialize_trainer(trainer, tmp_path):
    """nnU-Net's initialize on a trainer made in a test: it only infers the loader class from the ending of the
    preprocessed files, so one empty file stands in for the data."""
    data = tmp_path / "preprocessed_data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "case.b2nd").touch()
    trainer.preprocessed_dataset_folder = str(data)
    trainer.initialize()
    return trainer


# ---- nnU-Net's commands on a tiny version of the real example dataset (end-to-end and fault tests) ----------

DATASET_ID = 990
SHORT_RUN = {"NNUNET_DIFFUSION_EPOCHS": "1", "NNUNET_DIFFUSION_ITERATIONS": "2",
             "NNUNET_DIFFUSION_VAL_ITERATIONS": "1", "NNUNET_DIFFUSION_STEPS": "2",
             "NNUNET_DIFFUSION_CHAIN_STEPS": "2",  # Cross-Timestep trains (and must then sample) on a 2-step chain
             # mirroring along one axis: the final validations and predictions mirror (2 copies per window) at a
             # quarter of the 3d cost of every axis (8 copies); every axis: tests/inference/test_predictor.py
             "NNUNET_DIFFUSION_MIRROR_AXES": "0",
             "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "0"}


def run(cmd, env, check=True):
    began = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if os.environ.get("NNUNET_DIFFUSION_TEST_PROCESS_LOG"):  # where the suite's time goes: one line per process
        with open(os.environ["NNUNET_DIFFUSION_TEST_PROCESS_LOG"], "a") as log:
            log.write(f"{time.monotonic() - began:.1f}\t{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}"
                      f"\t{' '.join(cmd[:2])}\n")
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def nnunet(tmp_path_factory):
    """A planned and preprocessed tiny dataset, and the environment the stock commands need (once per session:
    the end-to-end and fault tests share it; each test trains its own trainer, configuration and fold)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir()
        env[name] = str(root / name)
    env["nnUNet_extTrainer"] = trainer_path()
    env["nnUNet_def_n_proc"] = "1"
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with 0 workers
    folder = Path(build_example_dataset(env["nnUNet_raw"], DATASET_ID, "Tiny", num_training=6, num_test=2,
                                        spacing_mm=8.0, seed=0))
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1", "1",
         "-npfp", "1", "--verify_dataset_integrity"], env)
    return {"env": {**env, **SHORT_RUN}, "raw": folder, "root": root}


def model_folder(nnunet, trainer, configuration):
    return Path(nnunet["env"]["nnUNet_results"]) / nnunet["raw"].name / f"{trainer}__nnUNetPlans__{configuration}"


# Tests that take tens of seconds (trainings through the CLI, killed processes, float16 on CPU), slowest first:
# collected first, so that with the test command's two workers (--dist loadgroup: tests handed out from the front,
# a few at a time) the long tests run while the other worker works through short ones, and the suite does not end on
# one long test.
SLOW_FIRST = (
    "architectures/test_half_precision.py::test_float16_on_a_patch_with_more_voxels_than_float16_can_count",
    "test_end_to_end.py::test_textdiffseg",
    "test_end_to_end.py::test_dsm",
    "test_end_to_end.py::test_unisegdiff",
    "test_end_to_end.py::test_cross_timestep_trainer",
    "test_end_to_end.py",
    "test_presets.py",
    "faults/test_kill_and_resume.py",
    "test_ddp.py",
    "faults/",
    "test_legacy_model.py",
)


# Tests that predict with a model another test trains (``ensure_trained`` in test_end_to_end.py) run on one worker,
# the training test first, so that the model is trained once: the test command's ``--dist loadgroup`` keeps an
# xdist_group on one worker, in the order below (SLOW_FIRST's). Without it each worker trained its own copy.
SHARED_MODELS = {
    "diffusion_3d": ("test_diffusion_trainer_3d_and_resume", "test_predict_command_mirroring_uncertainty_and_continue",
                     "test_predict_command_refuses_an_untrained_sampler_before_writing"),
    "stock_2d": ("test_unisegdiff_2d_uses_a_stock_checkpoint_and_refuses_a_bad_one",
                 "test_predict_command_passes_the_stock_trainer_through"),
    "cross_timestep_2d": ("test_cross_timestep_trainer_2d", "test_predict_command_2d_trainers[nnUNetTrainerCrossTimestep"),
    "recycling_2d": ("test_recycling_trainer_2d", "test_predict_command_2d_trainers[nnUNetTrainerDiffSegRecycling"),
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which names each test by its group
def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("tests/", 1)[-1]
        return next((i for i, prefix in enumerate(SLOW_FIRST) if path.startswith(prefix)), len(SLOW_FIRST))
    items.sort(key=rank)  # stable: pytest's order within each group
    for item in items:
        if item.nodeid.split("tests/", 1)[-1].startswith("test_end_to_end.py::"):
            name = item.nodeid.split("::", 1)[1]
            group = next((g for g, tests in SHARED_MODELS.items() if any(name.startswith(t) for t in tests)), None)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))
