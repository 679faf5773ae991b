"""The NNUNET_DIFFUSION_* registry is the whole list: every name the package mentions is registered, every reader
goes through it, and the reference page is the registry's."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_diffusion import settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnunet_diffusion"
NAME = re.compile(r"NNUNET_DIFFUSION_[A-Z_]*[A-Z]")


def package_sources():
    return {path: path.read_text() for path in PACKAGE.rglob("*.py")}


def test_every_variable_the_package_names_is_registered_and_every_registered_one_is_used():
    mentioned = {name for text in package_sources().values() for name in NAME.findall(text)}
    assert mentioned - set(settings.VARIABLES) == set()
    used = {name for path, text in package_sources().items() if path.name != "settings.py"
            for name in NAME.findall(text)}
    assert set(settings.VARIABLES) - used == set()  # a registered variable nothing reads is a stale entry


def test_no_variable_is_read_around_the_registry():
    """os.environ reads of our variables, or names built from a prefix, would escape the registry."""
    offenders = [f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}"
                 for path, text in package_sources().items() if path.name != "settings.py"
                 for i, line in enumerate(text.splitlines())
                 if re.search(r"environ(\.get)?\s*[\(\[]\s*(ENV_|\"NNUNET_DIFFUSION_)", line)
                 or "NNUNET_DIFFUSION_\" +" in line or "ENV_PREFIX" in line]
    assert offenders == []


def test_read_strips_and_treats_empty_as_unset_and_refuses_unregistered_names():
    env = {"NNUNET_DIFFUSION_STEPS": " 5 ", "NNUNET_DIFFUSION_SEED": "  "}
    assert settings.read("NNUNET_DIFFUSION_STEPS", env) == "5"
    assert settings.read("NNUNET_DIFFUSION_SEED", env) is None
    assert settings.set_variables(env) == {"NNUNET_DIFFUSION_STEPS": "5"}
    with pytest.raises(KeyError, match="register it"):
        settings.read("NNUNET_DIFFUSION_TYPO", env)


def test_reference_page_is_generated_from_the_registry():
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    assert page == settings.reference_page(), \
        "docs/reference/settings.md is stale: python -m nnunet_diffusion.settings > docs/reference/settings.md"
    for variable in settings.VARIABLES.values():
        assert f"| `{variable.name}` | {variable.kind} | {variable.applies} |" in page


def test_settings_command_lists_every_variable_with_its_current_value(monkeypatch):
    env = {**__import__("os").environ, "NNUNET_DIFFUSION_STEPS": "7"}
    out = subprocess.run([sys.executable, "-m", "nnunet_diffusion.cli", "settings"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert all(name in out for name in settings.VARIABLES)
    assert "now set: 7" in out
