import os
from pathlib import Path

import pytest

from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_vision.contract import DistributedEnv
from flywheel_vision.workdir import PreparedWork, WorkFolder


def _rank(local_rank: int, base: Path) -> WorkFolder:
    dist = DistributedEnv(rank=local_rank, world_size=2, local_rank=local_rank, local_world_size=2)
    return WorkFolder.for_run("run-1", dist, env={"TMPDIR": str(base)})


def test_the_ranks_of_a_node_share_one_folder_that_the_last_one_removes(tmp_path: Path) -> None:
    first, second = _rank(0, tmp_path), _rank(1, tmp_path)
    prepared = PreparedWork(launcher=os.getppid(), classes=["a"], train=[], validation=[])

    assert first.path == second.path == tmp_path / f"flywheel-train-run-1-{os.getppid()}"
    assert (first.preparer, second.preparer) == (True, False)
    first.reset()
    first.publish(prepared)
    assert second.wait(timeout_s=1) == prepared
    assert first.output.is_dir()
    assert second.context_file().name == "context-rank1.json"

    first.done()
    assert first.path.is_dir()
    second.done()
    assert not first.path.exists()


def test_a_folder_left_by_another_launch_is_not_taken_for_this_one(tmp_path: Path) -> None:
    first, second = _rank(0, tmp_path), _rank(1, tmp_path)
    first.reset()
    first.publish(PreparedWork(launcher=-1, classes=[], train=[], validation=[]))

    with pytest.raises(DependencyUnavailableError, match="did not prepare"):
        second.wait(timeout_s=0.3)


def test_one_process_gets_a_fresh_folder_and_a_given_one_is_kept(tmp_path: Path) -> None:
    alone = DistributedEnv()
    fresh = WorkFolder.for_run("run-1", alone, env={"TMPDIR": str(tmp_path)})
    other = WorkFolder.for_run("run-1", alone, env={"TMPDIR": str(tmp_path)})
    given = WorkFolder.for_run("run-1", alone, given=tmp_path / "mine")

    assert fresh.path != other.path
    fresh.reset()
    fresh.done()
    assert not fresh.path.exists()
    given.reset()
    given.done()
    assert (tmp_path / "mine" / "output").is_dir()
