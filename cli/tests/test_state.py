from pathlib import Path

import pytest

from flywheel_cli.state import ComponentState, StackState, StateFile, StateFileError


def component(name: str, pid: int = 4242, url: str | None = None) -> ComponentState:
    return ComponentState(
        name=name, pid=pid, start_ticks=7, command=["x"], log=Path(f"{name}.log"), url=url
    )


def test_a_missing_state_file_loads_as_none(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "state.json").load() is None


def test_a_saved_state_loads_back_equal(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "nested" / "state.json")
    state = StackState(namespace="t-").with_component(
        component("labeling", url="http://127.0.0.1:8081")
    )

    state_file.save(state)

    assert state_file.load() == state
    assert [p.name for p in state_file.path.parent.iterdir()] == ["state.json"]


def test_with_component_records_its_url_and_without_forgets_both() -> None:
    state = StackState().with_component(component("mlflow", url="http://127.0.0.1:5000"))
    state = state.with_component(component("s3", url="127.0.0.1:8333"))

    assert state.urls == {"mlflow": "http://127.0.0.1:5000", "s3": "127.0.0.1:8333"}
    smaller = state.without("mlflow")
    assert set(smaller.components) == {"s3"}
    assert smaller.urls == {"s3": "127.0.0.1:8333"}


def test_a_corrupt_state_file_is_reported_not_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"components": {"x": {"pid": "not a pid"}}}')

    with pytest.raises(StateFileError, match="not a Flywheel state file"):
        StateFile(path).load()


def test_remove_is_idempotent(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "state.json")
    state_file.save(StackState())

    state_file.remove()
    state_file.remove()

    assert state_file.load() is None


def test_the_lock_can_be_taken_again_once_released(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "state.json")

    with state_file.locked():
        state_file.save(StackState())
    with state_file.locked():
        assert state_file.load() == StackState.model_validate_json(state_file.path.read_text())
