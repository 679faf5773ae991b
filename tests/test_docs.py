"""The documentation stays in shape: a short README with the two set-up commands, every trainer documented, no
broken relative links, nothing that points outside a clone. Fast: reads files, imports the trainer entry point."""
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 160
SETUP_COMMANDS = ("bash scripts/run_example.sh", "bash scripts/run_tests.sh")
DEFAULT_TRAINERS = ("nnUNetTrainerDiffusion", "nnUNetTrainerDiffSegRecycling", "nnUNetTrainerCrossTimestep",
                    "nnUNetTrainerUniSegDiff", "nnUNetTrainerTextDiffSeg", "nnUNetTrainerDSM",
                    "nnUNetTrainerDSMStage2")
# ](target) of a markdown link; the target ends at the first space or closing parenthesis
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list:
    return [README, *sorted(DOCS.rglob("*.md"))]


def exported_trainers() -> set:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    import nnunet_diffusion.nnunet_ext.nnunet_diffusion_trainers as entry_point
    return {name for name, obj in vars(entry_point).items()
            if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer)}


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_has_exactly_the_two_setup_commands():
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    bash_lines = [line for line in lines if line.startswith("bash scripts/")]
    for command in SETUP_COMMANDS:
        assert any(line.startswith(command) for line in bash_lines), f"README.md lacks `{command}`"
    others = [line for line in bash_lines if not line.startswith(SETUP_COMMANDS)]
    assert not others, f"README.md has other set-up commands: {others}"
    assert len(bash_lines) == len(SETUP_COMMANDS), f"README.md repeats a set-up command: {bash_lines}"


@pytest.mark.parametrize("trainer", DEFAULT_TRAINERS)
def test_readme_names_every_default_trainer(trainer):
    assert f"`{trainer}`" in README.read_text(encoding="utf-8")


def test_trainer_reference_lists_every_exported_trainer():
    names = exported_trainers()
    assert set(DEFAULT_TRAINERS) <= names
    text = (DOCS / "reference" / "trainers.md").read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"docs/reference/trainers.md lacks {missing}"


def test_relative_links_point_to_existing_files():
    broken = []
    for path in markdown_files():
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
                continue
            file_part = target.split("#", 1)[0]
            if not file_part:  # a link to an anchor of the same page
                continue
            if not (path.parent / file_part).resolve().is_file():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_no_path_outside_the_clone():
    files = [README, *sorted(p for p in DOCS.rglob("*") if p.is_file())]
    offending = [str(path.relative_to(ROOT)) for path in files
                 if "../shared/" in path.read_text(encoding="utf-8", errors="replace")]
    assert not offending, f"these mention ../shared/ (a clone has no such folder): {offending}"
