import pytest

from nnunet_diffusion.cli import ENV_LINE, format_dice, main, setup_problems, trainer_path
from nnunet_diffusion.trainers.cross_timestep import variants as variants_cross_timestep
from nnunet_diffusion.trainers.diffusion import variants as variants_diffusion
from nnunet_diffusion.trainers.recycling import variants as variants_recycling

ALL_TRAINERS = (["nnUNetTrainerDiffusion", "nnUNetTrainerDiffSegRecycling", "nnUNetTrainerCrossTimestep",
                 "nnUNetTrainerBudget"] + variants_diffusion.__all__ + variants_recycling.__all__
                 + variants_cross_timestep.__all__)


@pytest.mark.parametrize("name", ALL_TRAINERS)
def test_nnunet_finds_every_trainer_through_the_ext_trainer_folder(name, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    monkeypatch.setenv("nnUNet_extTrainer", trainer_path())
    found = recursive_find_trainer_class_by_name(name)
    assert found.__name__ == name and issubclass(found, nnUNetTrainer)


def test_check_reports_missing_ext_trainer_with_the_fix(capsys, monkeypatch):
    env = {"nnUNet_raw": "/r", "nnUNet_preprocessed": "/p", "nnUNet_results": "/x"}
    problems = setup_problems(env)
    assert len(problems) == 1 and ENV_LINE in problems[0]
    assert setup_problems({**env, "nnUNet_extTrainer": "/elsewhere" + ":" + trainer_path()}) == []
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert main(["check"]) == 1
    assert "nnUNet_extTrainer" in capsys.readouterr().err


def test_trainer_path_command(capsys):
    assert main(["trainer-path"]) == 0
    assert capsys.readouterr().out.strip() == trainer_path()


def test_format_dice(tmp_path):
    (tmp_path / "s.json").write_text('{"mean": {"2": {"Dice": 0.25}, "1": {"Dice": 0.5}}, '
                                     '"foreground_mean": {"Dice": 0.375}}')
    (tmp_path / "d.json").write_text('{"labels": {"background": 0, "liver": 1, "tumour": 2}}')
    lines = format_dice(str(tmp_path / "s.json"), str(tmp_path / "d.json")).splitlines()
    assert lines[0].split() == ["liver", "Dice", "0.500"] and lines[2].split()[-1] == "0.375"
