import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import Field

from flywheel_contracts import ALL_EVENTS, Event, LabelsSavedV1, Payload
from flywheel_contracts.schemas import (
    SCHEMA_DIR,
    compatibility_problems,
    drift,
    event_schema,
    load_committed,
    main,
    write,
)


def test_committed_schemas_match_the_code() -> None:
    assert drift() == {}, "run `make schemas` and commit the result"


def test_there_is_one_committed_schema_per_event_and_no_stray_file() -> None:
    committed = {p.name for p in SCHEMA_DIR.glob("*.json")}

    assert committed == {f"{cls.schema_name()}.json" for cls in ALL_EVENTS}


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.TYPE)
def test_committed_schema_is_compatible(cls: type[Event[Any]]) -> None:
    committed = load_committed(cls)

    assert committed is not None
    assert compatibility_problems(committed, event_schema(cls)) == []


# Temporarily edited classes: the same TYPE and VERSION as LabelsSavedV1, changed payloads.


class _WithoutLabelIds(Payload):
    project_id: str
    batch_id: str
    snapshot_id: str
    parent_snapshot_id: str | None = None
    deleted_label_ids: list[str] = Field(default_factory=list)
    prefilled_count: int = 0
    corrected_count: int = 0
    source: str = "human"


def _edited(payload: type[Payload]) -> type[Event[Any]]:
    class LabelsSavedV1(Event[payload]):  # type: ignore[valid-type]
        TYPE: ClassVar[str] = "labels.saved"
        VERSION: ClassVar[int] = 1
        EXCHANGE: ClassVar[str] = "flywheel.events"
        EXAMPLE: ClassVar[dict[str, Any]] = {}

    return LabelsSavedV1


def _copy_committed(tmp_path: Path) -> Path:
    shutil.copytree(SCHEMA_DIR, tmp_path / "schemas")
    return tmp_path / "schemas"


def test_drift_reports_a_removed_field_as_breaking(tmp_path: Path) -> None:
    edited = _edited(_WithoutLabelIds)

    report = drift([edited], _copy_committed(tmp_path))

    reasons = report["labels.saved.v1.json"]
    assert any("label_ids: field removed" in r for r in reasons)
    assert any("batch_id: type changed" in r for r in reasons)


def test_drift_reports_a_field_made_required(tmp_path: Path) -> None:
    fields = dict(LabelsSavedV1.model_fields["payload"].annotation.model_fields)  # type: ignore[union-attr]
    assert not fields["parent_snapshot_id"].is_required()

    class _ParentRequired(Payload):
        project_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
        batch_id: Any
        snapshot_id: str
        parent_snapshot_id: str | None

    problems = compatibility_problems(
        event_schema(LabelsSavedV1), event_schema(_edited(_ParentRequired))
    )

    assert "$.payload.parent_snapshot_id: field made required" in problems


def test_adding_an_optional_field_is_compatible_but_still_drift(tmp_path: Path) -> None:
    base = LabelsSavedV1.model_fields["payload"].annotation
    assert base is not None

    class _WithExtra(base):  # type: ignore[misc,valid-type]
        reviewer: str | None = None

    edited = _edited(_WithExtra)
    directory = _copy_committed(tmp_path)

    assert compatibility_problems(event_schema(LabelsSavedV1), event_schema(edited)) == []
    assert drift([edited], directory) == {
        "labels.saved.v1.json": ["schema changed compatibly; regenerate the committed file"]
    }
    assert write([edited], directory) == []
    assert drift([edited], directory) == {}


def test_write_refuses_a_breaking_change(tmp_path: Path) -> None:
    directory = _copy_committed(tmp_path)
    before = (directory / "labels.saved.v1.json").read_text()

    problems = write([_edited(_WithoutLabelIds)], directory)

    assert problems
    assert (directory / "labels.saved.v1.json").read_text() == before


def test_check_command_exits_zero_on_the_committed_tree() -> None:
    assert main([]) == 0
