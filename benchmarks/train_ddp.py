"""Training-loop throughput of two DDP processes (gloo) against one process, on the CPU.

Both configurations run the training loop of ``flywheel_vision.train`` (``ddp.init`` +
``dist.prepare``, DigitNet, Adam, cross-entropy) on the same in-memory MNIST slice, with the
same per-process batch size and the same number of optimizer steps, and every process limited
to one intra-op thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``). The processes
are started with ``torch.multiprocessing`` (spawn) and given the environment ``torchrun`` would
give them, so the library's own DDP path runs; as under torchrun, this parent process hosts
the rendezvous store, so no rank's exit can pull it from under the others. Throughput counts
the samples every process trained on per second of wall time, measured between barriers after
a warm-up; the two configurations alternate for ``--rounds`` rounds and the medians are
compared.

    .venv/bin/python benchmarks/train_ddp.py --rounds 3

On a machine with two idle cores the ratio is the DDP speed-up (ideal: 2). The last line is
``single=<samples/s> ddp2=<samples/s> ratio=<ddp2/single>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

# Before torch is imported anywhere: one intra-op thread per process, in this one too.
os.environ["OMP_NUM_THREADS"] = "1"

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed import TCPStore

from flywheel_vision import ddp
from flywheel_vision.data import mnist_dataset
from flywheel_vision.model import DigitNet

TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
)


@dataclass(frozen=True)
class Measurement:
    samples: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.samples / self.seconds


def _train_steps(
    model: nn.Module, loader: ddp.ShardedLoader, optimizer: torch.optim.Optimizer, steps: int
) -> int:
    """``steps`` optimizer steps (the loader starts a new epoch when one runs out); samples."""
    model.train()
    done = samples = 0
    while done < steps:
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(images), labels)
            torch.autograd.backward(loss)
            optimizer.step()
            samples += len(labels)
            done += 1
            if done == steps:
                break
    return samples


def _timed_training(dist: ddp.Distributed, options: dict[str, Any]) -> tuple[int, float]:
    """Warm up, then train ``options['steps']`` steps; this process's samples and seconds."""
    dataset = mnist_dataset("train", options["images"])
    ddp.seed_everything(options["seed"])
    model, loader = dist.prepare(
        DigitNet(10), dataset, batch_size=options["batch_size"], seed=options["seed"]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train_steps(model, loader, optimizer, options["warmup"])
    dist.barrier()
    started = time.perf_counter()
    samples = _train_steps(model, loader, optimizer, options["steps"])
    dist.barrier()
    return samples, time.perf_counter() - started


def _worker(rank: int, world_size: int, port: int, options: dict[str, Any], results: Any) -> None:
    for name in TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    if world_size > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            # The store is the parent's (as torchrun's agent hosts it): every rank is a client.
            TORCHELASTIC_USE_AGENT_STORE="True",
        )
    torch.set_num_threads(1)
    with ddp.init() as dist:
        samples, seconds = _timed_training(dist, options)
    if rank == 0:
        # Every rank trains the same number of equal batches (the sampler pads the shards).
        results.put((samples * world_size, seconds, torch.get_num_threads()))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: a gloo worker thread that is still freeing a finished
    # collective's tensors when Python finalizes aborts the process (std::terminate), now and
    # then, after all the work is done and reported.
    os._exit(0)


def measure(world_size: int, options: dict[str, Any]) -> Measurement:
    """One timed run of ``world_size`` processes; every process trains ``options['steps']``."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    try:
        mp.start_processes(
            _worker,
            args=(world_size, store.port, options, results),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    finally:
        del store
    samples, seconds, threads = results.get()
    if threads != 1:
        raise RuntimeError(f"a training process used {threads} threads, not 1")
    return Measurement(samples, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6400, help="MNIST training images")
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--steps", type=int, default=150, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = {
        "images": args.images,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
    }
    print(
        f"cpus={os.cpu_count()} torch={torch.__version__} images={args.images} "
        f"batch_size={args.batch_size}/process steps={args.steps} threads=1/process",
        flush=True,
    )
    single: list[float] = []
    pair: list[float] = []
    for round_ in range(1, args.rounds + 1):
        one = measure(1, options)
        two = measure(2, options)
        single.append(one.per_second)
        pair.append(two.per_second)
        print(
            f"round {round_}: single {one.per_second:.0f} samples/s ({one.seconds:.2f}s), "
            f"ddp2 {two.per_second:.0f} samples/s ({two.seconds:.2f}s), "
            f"ratio {two.per_second / one.per_second:.2f}",
            flush=True,
        )
    single_median = statistics.median(single)
    pair_median = statistics.median(pair)
    print(
        f"single={single_median:.0f} ddp2={pair_median:.0f} "
        f"ratio={pair_median / single_median:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
