import json
import uuid
from pathlib import Path

import pytest

from flywheel_contracts.datasets import ManifestEntry, Split
from flywheel_runtime.errors import InvalidInputError
from flywheel_vision.train import _parser, config_from_args, read_label_ids, training_entries

REQUIRED = ["--project-id", "digits", "--snapshot-id", "snap-1", "--model-name", "digits-clf"]


def _entry(index: int, split: Split) -> ManifestEntry:
    sha = f"{index:064x}"
    return ManifestEntry(
        label_id=uuid.UUID(int=index),
        image_sha256=sha,
        image_key=f"images/{sha}",
        class_name=str(index % 10),
        split=split,
    )


def test_training_entries_leave_out_test_split_and_excluded_labels() -> None:
    entries = [_entry(i, [Split.TRAIN, Split.VALIDATION, Split.TEST][i % 3]) for i in range(1, 13)]
    excluded = {uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)}

    kept = training_entries(entries, excluded)

    assert [e.label_id.int for e in kept] == [4, 6, 7, 9, 10, 12]
    assert [e.label_id.int for e in training_entries(entries)] == [1, 3, 4, 6, 7, 9, 10, 12]


def test_exclude_labels_file_reaches_the_config(tmp_path: Path) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    path = tmp_path / "excluded.json"
    path.write_text(json.dumps([str(i) for i in ids]))

    config = config_from_args(_parser().parse_args([*REQUIRED, "--exclude-labels-file", str(path)]))

    assert config.excluded_label_ids == frozenset(ids)


def test_without_the_option_nothing_is_excluded() -> None:
    config = config_from_args(_parser().parse_args(REQUIRED))

    assert config.excluded_label_ids == frozenset()
    assert config.base_alias == "champion"


@pytest.mark.parametrize("content", ['{"a": 1}', '["not-a-uuid"]'])
def test_a_malformed_exclude_labels_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "excluded.json"
    path.write_text(content)

    with pytest.raises(InvalidInputError):
        read_label_ids(path)
