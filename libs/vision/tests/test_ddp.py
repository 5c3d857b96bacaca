import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from flywheel_vision import ddp
from flywheel_vision.model import DigitNet

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def _numbers(count: int) -> TensorDataset:
    return TensorDataset(torch.arange(count, dtype=torch.float32), torch.arange(count))


def test_outside_torchrun_init_is_a_single_process_no_op(no_torchrun: None) -> None:
    with ddp.init() as dist:
        assert (dist.rank, dist.world_size, dist.local_rank) == (0, 1, 0)
        assert dist.is_main
        assert not dist.is_distributed
        assert dist.all_reduce_mean(3.5) == 3.5
        assert dist.all_reduce_sum(torch.tensor(2.0)) == 2.0
        dist.barrier()


def test_prepare_leaves_a_single_process_model_unwrapped(no_torchrun: None) -> None:
    dist = ddp.init()
    model = DigitNet(10)

    prepared, loader = dist.prepare(model, _numbers(10), batch_size=4, seed=0)

    assert prepared is model
    assert ddp.unwrap(prepared) is model
    assert len(loader) == 3


def test_each_pass_over_the_loader_is_a_new_epoch_with_its_own_shuffle(no_torchrun: None) -> None:
    _, loader = ddp.init().prepare(DigitNet(10), _numbers(64), batch_size=64, seed=7)

    first = next(iter(loader))[1].tolist()
    second = next(iter(loader))[1].tolist()
    loader.set_epoch(0)
    replay = next(iter(loader))[1].tolist()

    assert sorted(first) == sorted(second) == list(range(64))
    assert first != second
    assert replay == first


def test_shards_split_the_data_between_ranks_without_overlap() -> None:
    ranks = [ddp.Distributed(rank=r, world_size=3) for r in range(3)]

    shards = [[int(item[1]) for item in dist.shard(_numbers(10))] for dist in ranks]

    assert sorted(item for shard in shards for item in shard) == list(range(10))
    assert [len(shard) for shard in shards] == [4, 3, 3]


def test_the_ddp_example_is_the_single_process_one_plus_the_two_helper_calls() -> None:
    single = (EXAMPLES / "train_single.py").read_text().splitlines()
    distributed = (EXAMPLES / "train_ddp.py").read_text().splitlines()

    diff = [
        line
        for line in difflib.unified_diff(single, distributed, lineterm="", n=0)
        if not line.startswith(("---", "+++", "@@"))
    ]

    assert diff == [
        "+dist = ddp.init()",
        "+model, loader = dist.prepare(model, dataset, batch_size=args.batch_size, seed=args.seed)",
    ]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}


@pytest.mark.slow
def test_the_single_process_example_runs() -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_single.py"), "--limit", "600", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "test accuracy" in completed.stdout


@pytest.mark.slow
def test_the_ddp_example_finishes_on_both_ranks_under_torchrun() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--tee=3",
            str(EXAMPLES / "train_ddp.py"),
            "--limit",
            "600",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=_clean_env(),
        check=False,
    )

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    done = [line for line in output.splitlines() if "test accuracy" in line]
    assert sorted(line.split(":", 1)[0] for line in done) == ["[default0]", "[default1]"]
    # DDP keeps the replicas identical, so both ranks score the same.
    assert len({line.split("accuracy", 1)[1] for line in done}) == 1
