"""A model line's own training script: a tiny CNN on 32 x 32 RGB images.

Flywheel runs it as ``python train_tiny_convnet.py --context <context.json>`` (the model
line's entry point names this file). Everything it needs is in that JSON: the snapshot's images
as local files with their class index, the hyperparameters, and the output folder, where rank 0
leaves the four files the platform reads: ``model.onnx``, ``model.json`` (tensors and the
preprocessing serving must apply), ``metrics.json`` and, optionally, ``params.json``. Flywheel
logs them to MLflow, registers the version, validates it and canaries it; nothing here talks to
MLflow or knows about the platform.

The only Flywheel import is the optional DDP helper: with it the same script runs as one
process or as N ranks under torchrun (``nproc_per_node`` of the model line). Without it, drop
the two lines marked DDP and the script trains in one process.

It differs from the reference DigitNet on purpose: another architecture, another input
(32 x 32, three channels, bicubic resize) and another normalisation (mean 0.5, std 0.5), and
its tensors have their own names (``pixels`` → ``scores``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from flywheel_vision import ddp  # DDP (optional): the two-line helper

SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PREPROCESSING = {
    "height": SIZE,
    "width": SIZE,
    "channels": 3,
    "mean": list(MEAN),
    "std": list(STD),
    "resize": "bicubic",
}
"""How serving must prepare an image for this model: the same steps as ``load`` below."""


class TinyConvNet(nn.Module):
    """``[N, 3, 32, 32]`` → ``[N, classes]``: two strided convolutions and a linear head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.head(self.body(pixels))
        return scores


def load(samples: list[dict[str, Any]]) -> TensorDataset:
    """Images as the model sees them: RGB, bicubic 32 x 32, [0, 1], then (x - mean) / std."""
    images = np.zeros((len(samples), 3, SIZE, SIZE), dtype=np.float32)
    for row, sample in enumerate(samples):
        with Image.open(sample["path"]) as picture:
            rgb = picture.convert("RGB")
        if rgb.size != (SIZE, SIZE):
            rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        scaled = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
        normalised = (scaled - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
        images[row] = normalised.transpose(2, 0, 1)
    labels = np.asarray([sample["label"] for sample in samples], dtype=np.int64)
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    if not len(data):
        return 0.0
    model.eval()
    with torch.inference_mode():
        images, labels = data.tensors
        return float((model(images).argmax(dim=1) == labels).float().mean())


def export(model: nn.Module, path: Path) -> None:
    """ONNX with a dynamic batch dimension, as Triton's dynamic batcher needs."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model.eval(),
        (torch.zeros(2, 3, SIZE, SIZE),),
        input_names=["pixels"],
        output_names=["scores"],
        dynamic_shapes={"pixels": {0: batch}},
        dynamo=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("the ONNX exporter returned no program")
    path.write_bytes(program.model_proto.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=Path, required=True)
    context = json.loads(parser.parse_args().context.read_text())
    hp = context["hyperparameters"]
    epochs, lr, seed = int(hp.get("epochs", 3)), float(hp.get("lr", 3e-3)), int(hp.get("seed", 0))
    batch_size = int(hp.get("batch_size", 32))
    classes = context["classes"]
    out = Path(context["output_dir"])

    torch.manual_seed(seed)
    train, validation = load(context["train"]), load(context["validation"])
    model: nn.Module = TinyConvNet(len(classes))
    dist = ddp.init()  # DDP
    model, loader = dist.prepare(model, train, batch_size=batch_size, seed=seed)  # DDP
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses, accuracies = [], []
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total, seen = 0.0, 0
        for images, labels in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            seen += len(labels)
        losses.append(total / max(seen, 1))
        accuracies.append(accuracy(ddp.unwrap(model), validation))
        print(f"rank {dist.rank} epoch {epoch} loss {losses[-1]:.4f} val {accuracies[-1]:.3f}")

    if dist.rank == 0:
        plain = ddp.unwrap(model)
        export(plain, out / "model.onnx")
        model_json = {
            "architecture": "TinyConvNet",
            "inputs": [{"name": "pixels", "shape": [-1, 3, SIZE, SIZE], "dtype": "float32"}],
            "outputs": [{"name": "scores", "shape": [-1, len(classes)], "dtype": "float32"}],
            "preprocessing": PREPROCESSING,
        }
        (out / "model.json").write_text(json.dumps(model_json, indent=2))
        metrics = {"train_loss": losses, "val_accuracy": accuracies}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        params = {"architecture": "TinyConvNet", "optimizer": "Adam", "input_size": SIZE}
        (out / "params.json").write_text(json.dumps(params, indent=2))
        print(f"exported in {time.perf_counter() - started:.1f}s")
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    main()
