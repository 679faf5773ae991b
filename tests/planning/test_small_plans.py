"""The narrower CPU plans: same data and layout, fewer features, written atomically, never over a file."""
import json

import pytest
from conftest import make_configuration

from nnunet_diffusion.planning.small_plans import derive_small_plans, narrowed_features, write_small_plans


def test_features_follow_nnunets_doubling_rule_from_the_new_base():
    assert narrowed_features([32, 64, 128, 256, 320], 16, 128) == [16, 32, 64, 128, 128]
    assert narrowed_features([32, 64, 128, 256], 8, 64) == [8, 16, 32, 64]


def test_only_the_features_change(tmp_path):
    plans = {"plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": make_configuration(3, features=(32, 64, 128), extra={"data_identifier": "nnUNetPlans_3d"}),
        "3d_lowres": {"inherits_from": "3d_fullres"}}}
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    path = write_small_plans(str(tmp_path), base_features=16, max_features=48)
    small = json.loads(open(path).read())
    assert small["plans_name"] == "nnUNetPlans_CPU"
    config = small["configurations"]["3d_fullres"]
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 48]
    assert config["data_identifier"] == "nnUNetPlans_3d"  # the preprocessed data is shared, not redone
    original = plans["configurations"]["3d_fullres"]
    for key in ("kernel_sizes", "strides", "n_stages", "n_conv_per_stage"):
        assert config["architecture"]["arch_kwargs"][key] == original["architecture"]["arch_kwargs"][key]
    assert small["configurations"]["3d_lowres"] == {"inherits_from": "3d_fullres"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_small_plans(str(tmp_path))


def test_the_batch_size_is_capped_only_when_asked():
    plans = {"configurations": {"2d": make_configuration(2, extra={"batch_size": 647}),
                                "3d_fullres": make_configuration(3, extra={"batch_size": 2})}}
    capped = derive_small_plans(plans, "x", 16, 128, max_batch_size=32)["configurations"]
    assert capped["2d"]["batch_size"] == 32 and capped["3d_fullres"]["batch_size"] == 2
    assert derive_small_plans(plans, "x", 16, 128)["configurations"]["2d"]["batch_size"] == 647
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        derive_small_plans(plans, "x", 16, 128, max_batch_size=0)


def test_missing_plans_and_bad_widths_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="nnUNetv2_plan_and_preprocess"):
        write_small_plans(str(tmp_path))
    with pytest.raises(ValueError, match="base_features <= max_features"):
        derive_small_plans({"configurations": {}}, "x", 32, 16)
