import hashlib
import uuid
from collections import Counter
from datetime import UTC, datetime

from flywheel_contracts.datasets import (
    ManifestEntry,
    SnapshotSegment,
    Split,
    apply_segment,
    image_key,
    snapshot_id_for,
    split_for,
)


def _entry(i: int, class_name: str = "7") -> ManifestEntry:
    sha = hashlib.sha256(str(i).encode()).hexdigest()
    return ManifestEntry(
        label_id=uuid.UUID(int=i),
        image_sha256=sha,
        image_key=image_key(sha),
        class_name=class_name,
        split=split_for(sha),
    )


def test_split_is_fixed_by_the_hash_and_close_to_80_10_10() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]

    counts = Counter(split_for(h) for h in hashes)

    assert [split_for(h) for h in hashes[:50]] == [split_for(h) for h in hashes[:50]]
    assert 7_700 < counts[Split.TRAIN] < 8_300
    assert 800 < counts[Split.VALIDATION] < 1_200
    assert 800 < counts[Split.TEST] < 1_200


def test_snapshot_id_depends_on_parent_and_content_not_order() -> None:
    a, b = _entry(1), _entry(2)

    same = snapshot_id_for("snap-p", [a, b], [uuid.UUID(int=9)])

    assert same == snapshot_id_for("snap-p", [b, a], [uuid.UUID(int=9)])
    assert same != snapshot_id_for("snap-q", [a, b], [uuid.UUID(int=9)])
    assert same != snapshot_id_for("snap-p", [a, _entry(2, "3")], [uuid.UUID(int=9)])
    assert same != snapshot_id_for("snap-p", [a, b], [])
    assert same.startswith("snap-")


def test_apply_segment_upserts_and_deletes_without_touching_the_parent() -> None:
    parent = {e.label_id: e for e in (_entry(1), _entry(2))}
    changed = _entry(2, "3")
    segment = SnapshotSegment(
        snapshot_id="snap-x",
        project_id="digits",
        parent_snapshot_id="snap-p",
        batch_id=uuid.uuid4(),
        created_at=datetime.now(UTC),
        upserts=[changed, _entry(3)],
        deletes=[uuid.UUID(int=1)],
    )

    after = apply_segment(parent, segment)

    assert sorted(after) == [uuid.UUID(int=2), uuid.UUID(int=3)]
    assert after[uuid.UUID(int=2)].class_name == "3"
    assert parent[uuid.UUID(int=2)].class_name == "7"
    assert uuid.UUID(int=1) in parent
