"""The reference entry point: DigitNet on MNIST-like digits, the default of every model line.

It is an entry point like any other (``flywheel_vision.reference:train``): it reads the
``TrainingContext``, trains with the two-line DDP helper, and leaves ``model.onnx`` (outputs
``logits`` and the 64-d ``embedding``),
``model.json``, ``metrics.json``, ``params.json`` and ``state_dict.pt`` in the output folder.
It starts from the base version's weights when the base is a DigitNet with a state dict, and
keeps the base's head only when the classes are the same.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flywheel_vision import ddp
from flywheel_vision.contract import (
    METRICS_FILE,
    PARAMS_FILE,
    SIGNATURE_FILE,
    Sample,
    TrainingContext,
    reference_signature,
)
from flywheel_vision.export import ONNX_FILE, STATE_DICT_FILE, check_parity, export_onnx
from flywheel_vision.model import EMBEDDING_SIZE, DigitNet, load_compatible
from flywheel_vision.preprocess import MNIST_PREPROCESS, preprocess

__all__ = ["ARCHITECTURE", "ReferenceHyperparameters", "train"]

ARCHITECTURE: Final = DigitNet.__name__
_PARITY_IMAGES: Final = 32

log = structlog.get_logger(__name__)


class ReferenceHyperparameters(BaseModel):
    """The hyperparameters the reference reads; others in the context are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    seed: int = 0


def _tensors(samples: Sequence[Sample]) -> TensorDataset:
    images = np.zeros((len(samples), *MNIST_PREPROCESS.input_shape), dtype=np.float32)
    for row, sample in enumerate(samples):
        images[row] = preprocess(sample.path.read_bytes(), MNIST_PREPROCESS)
    labels = np.asarray([s.label for s in samples], dtype=np.int64)
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _run_epoch(
    model: nn.Module,
    loader: ddp.ShardedLoader,
    optimizer: torch.optim.Optimizer,
    dist: ddp.Distributed,
) -> float:
    """One pass over this rank's shard; the mean loss over every rank's samples."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    count = 0
    for images, labels in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        torch.autograd.backward(loss)
        optimizer.step()
        loss_sum += loss.detach().double() * len(labels)
        count += len(labels)
    total = dist.all_reduce_sum(count)
    return dist.all_reduce_sum(loss_sum) / total if total else float("nan")


def _accuracy(model: nn.Module, dataset: Dataset[Any], dist: ddp.Distributed) -> float | None:
    """Accuracy over the whole set, each rank scoring its own shard; None for an empty set."""
    plain = ddp.unwrap(model)
    plain.eval()
    correct = 0
    seen = 0
    with torch.inference_mode():
        for images, labels in DataLoader(dist.shard(dataset), batch_size=256):
            predictions = plain(images.to(dist.device)).argmax(dim=1).cpu()
            correct += int((predictions == labels).sum())
            seen += len(labels)
    total = dist.all_reduce_sum(seen)
    return dist.all_reduce_sum(correct) / total if total else None


def _start_from_base(model: DigitNet, context: TrainingContext) -> bool | None:
    """Load the base's weights when it is a DigitNet with weights; whether its head was kept
    (None: trained from scratch)."""
    base = context.base
    if base is None or base.state_dict is None:
        return None
    if base.signature.architecture not in (None, ARCHITECTURE):
        log.info("base is another architecture; training from scratch", base_version=base.version)
        return None
    state = torch.load(base.state_dict, map_location="cpu", weights_only=True)
    with_head = base.classes == context.classes
    load_compatible(model, state, with_head=with_head)
    log.info("starting from base", base_version=base.version, head_reused=with_head)
    return with_head


def train(context: TrainingContext) -> None:
    """Train DigitNet on the context's snapshot; rank 0 leaves the outputs."""
    hp = ReferenceHyperparameters.model_validate(context.hyperparameters)
    dist = ddp.init()
    bound = log.bind(rank=dist.rank, training_run_id=context.training_run_id)
    try:
        ddp.seed_everything(hp.seed)
        train_set = _tensors(context.train)
        validation = _tensors(context.validation)
        model = DigitNet(len(context.classes))
        # Every rank loads the base: DDP would copy rank 0's weights anyway, and this way a
        # rank never waits for another to read a file.
        head_reused = _start_from_base(model, context)
        wrapped, loader = dist.prepare(model, train_set, batch_size=hp.batch_size, seed=hp.seed)
        optimizer = torch.optim.Adam(wrapped.parameters(), lr=hp.lr)
        history: dict[str, list[float]] = {"train_loss": [], "val_accuracy": []}
        started = time.perf_counter()
        for epoch in range(hp.epochs):
            loss = _run_epoch(wrapped, loader, optimizer, dist)
            history["train_loss"].append(loss)
            accuracy = _accuracy(wrapped, validation, dist)
            if accuracy is not None:
                history["val_accuracy"].append(accuracy)
            metrics = {name: values[-1] for name, values in history.items() if values}
            bound.info("epoch done", epoch=epoch, **metrics)
        seconds = time.perf_counter() - started
        if dist.is_main:
            held_out = validation if len(validation) else train_set
            _write_outputs(context, wrapped, held_out.tensors[0][:_PARITY_IMAGES], history)
            _write_params(context, hp, dist, head_reused)
            bound.info("outputs written", train_loop_seconds=round(seconds, 3))
        # The other ranks wait for rank 0's export, so every rank leaves the group together.
        dist.barrier()
    finally:
        dist.close()


def _write_outputs(
    context: TrainingContext,
    model: nn.Module,
    sample: torch.Tensor,
    history: dict[str, list[float]],
) -> None:
    out = context.output_dir
    plain = ddp.unwrap(model)
    # Both outputs: the logits and the 64-d features, which drift checks compare.
    onnx_bytes = export_onnx(plain, embedding=True)
    parity = check_parity(plain, onnx_bytes, sample)
    (out / ONNX_FILE).write_bytes(onnx_bytes)
    signature = reference_signature(
        len(context.classes), architecture=ARCHITECTURE, embedding_size=EMBEDDING_SIZE
    )
    (out / SIGNATURE_FILE).write_text(signature.model_dump_json(indent=2))
    buffer = io.BytesIO()
    torch.save({key: value.cpu() for key, value in plain.state_dict().items()}, buffer)
    (out / STATE_DICT_FILE).write_bytes(buffer.getvalue())
    metrics: dict[str, Any] = {name: values for name, values in history.items() if values}
    metrics["parity_max_abs_diff"] = parity
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))


def _write_params(
    context: TrainingContext,
    hp: ReferenceHyperparameters,
    dist: ddp.Distributed,
    head_reused: bool | None,
) -> None:
    params = {
        "optimizer": "Adam",
        "architecture": ARCHITECTURE,
        "global_batch_size": hp.batch_size * dist.world_size,
        "base_head_reused": bool(head_reused),
    }
    Path(context.output_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2))
