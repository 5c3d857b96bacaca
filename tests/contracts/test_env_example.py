import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_env_example_lists_every_setting_with_its_default() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "env_example.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr


def test_every_service_starts_from_env_example_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        env_example = importlib.import_module("env_example")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, value)

    for _, path in env_example.SECTIONS:
        settings = env_example._load(path)
        assert settings() == settings.model_validate({}), path
