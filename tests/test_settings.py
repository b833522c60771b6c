"""The settings registry (flashtile/_core/settings.py): every environment variable the package reads
is declared there and read through it, ``flashtile info`` lists the registry, and the README's table
is the one the registry generates."""

import os
import pathlib
import re

import pytest

from flashtile._core import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flashtile"
REGISTRY = PACKAGE / "_core" / "settings.py"
# A read of the process environment: os.environ / os.getenv / os.putenv, or environ imported by name.
ENVIRONMENT_ACCESS = re.compile(r"\benviron\b|\bgetenv\b|\bputenv\b")
# A read through the registry with a literal name: env("X"), get("X"), flag("X") or choice("X"), bare or as settings.*.
REGISTRY_READ = re.compile(r"\b(?:env|get|flag|choice)\(\s*\"([A-Z][A-Z0-9_]*)\"")
# Any flashtile variable named in the source, code or prose.
FLASHTILE_NAME = re.compile(r"\bFLASHTILE_[A-Z0-9_]*[A-Z0-9]\b")


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_registry_reads_the_environment():
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in _sources() if path != REGISTRY
                 for number, line in enumerate(path.read_text().splitlines(), 1) if ENVIRONMENT_ACCESS.search(line)]
    assert not offenders, "read the environment through flashtile._core.settings:\n" + "\n".join(offenders)


def test_every_variable_read_or_named_is_registered():
    read, named = set(), set()
    for path in _sources():
        text = path.read_text()
        read |= set(REGISTRY_READ.findall(text))
        named |= set(FLASHTILE_NAME.findall(text))
    assert read, "the scan found no reads: has the registry's API changed?"
    assert not (read | named) - set(settings.SETTINGS), "declare these in flashtile/_core/settings.py"
    # ... and every registered variable is read somewhere (TRITON_INTERPRET through its named constant).
    assert set(settings.SETTINGS) - read == {settings.INTERPRET_VARIABLE}


def test_readme_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert settings.with_current_table(readme) == readme, "run: python -m flashtile info --readme README.md"


def test_info_lists_every_setting():
    from flashtile.cli import _info

    env = _info()["env"]
    assert list(env) == list(settings.SETTINGS)
    for name, entry in env.items():
        assert entry["kind"] in settings.KINDS and entry["doc"] == settings.SETTINGS[name].doc


@pytest.mark.parametrize("text,value", [(None, True), ("1", True), ("yes", True), ("0", False), ("", False),
                                        ("false", False), ("OFF", False), (" no ", False)])
def test_flags(monkeypatch, text, value):
    if text is None:
        monkeypatch.delenv("FLASHTILE_LAUNCH_MEMO", raising=False)
    else:
        monkeypatch.setenv("FLASHTILE_LAUNCH_MEMO", text)
    assert settings.get("FLASHTILE_LAUNCH_MEMO") is value


def test_choices_and_unregistered_names(monkeypatch):
    monkeypatch.setenv("FLASHTILE_BACKEND", " Reference ")
    assert settings.get("FLASHTILE_BACKEND") == "reference"
    monkeypatch.setenv("FLASHTILE_BACKEND", "")
    assert settings.get("FLASHTILE_BACKEND") == "auto"
    monkeypatch.setenv("FLASHTILE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FLASHTILE_BACKEND"):
        settings.get("FLASHTILE_BACKEND")
    with pytest.raises(KeyError, match="FLASHTILE_NOT_A_SETTING"):
        settings.get("FLASHTILE_NOT_A_SETTING")
    with pytest.raises(KeyError, match="FLASHTILE_NOT_A_SETTING"):
        settings.env("FLASHTILE_NOT_A_SETTING")


def test_uncached_settings_are_read_at_every_use(monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/one")
    assert settings.env("TRITON_CACHE_DIR") == "/one"
    os.environ["TRITON_CACHE_DIR"] = "/two"  # behind the settings' back (monkeypatch restores it)
    assert settings.env("TRITON_CACHE_DIR") == "/two"
