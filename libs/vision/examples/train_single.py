"""Train DigitNet on an in-memory MNIST slice.

    python libs/vision/examples/train_single.py --limit 5000 --epochs 3
    torchrun --standalone --nproc_per_node=2 libs/vision/examples/train_ddp.py --limit 5000

train_ddp.py is train_single.py plus two lines, ``ddp.init()`` and ``dist.prepare(...)``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from flywheel_vision import ddp
from flywheel_vision.data import mnist_dataset
from flywheel_vision.model import DigitNet

parser = argparse.ArgumentParser()
parser.add_argument("--limit", type=int, default=5000)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

ddp.seed_everything(args.seed)
dataset = mnist_dataset("train", args.limit)
test_images, test_labels = mnist_dataset("test", 2000).tensors
model: nn.Module = DigitNet(num_classes=10)
loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

started = time.perf_counter()
for epoch in range(args.epochs):
    model.train()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        torch.autograd.backward(loss)
        optimizer.step()
    print(f"epoch {epoch} loss {loss.item():.4f}", flush=True)

model.eval()
with torch.inference_mode():
    predictions = ddp.unwrap(model)(test_images).argmax(dim=1)
accuracy = (predictions == test_labels).float().mean().item()
print(f"done in {time.perf_counter() - started:.1f}s test accuracy {accuracy:.4f}", flush=True)
