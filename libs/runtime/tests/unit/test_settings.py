import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from flywheel_runtime.settings import env_reference


class Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXAMPLE_")

    sizes: tuple[int, ...] = (8, 16, 32)
    names: list[str] = ["a"]
    empty: list[str] = []
    flag: bool = True


def test_every_default_in_the_reference_reads_back_as_the_same_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = {name: default for name, default, _ in env_reference(Example)}

    for name, default in reference.items():
        monkeypatch.setenv(name, default)

    assert reference["EXAMPLE_SIZES"] == "[8, 16, 32]"
    assert Example() == Example.model_construct(sizes=(8, 16, 32), names=["a"], empty=[], flag=True)
