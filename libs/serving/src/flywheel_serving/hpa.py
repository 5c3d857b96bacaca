"""Autoscaling targets from a golden point: the Helm values that scale Triton on requests/s.

A golden point is the throughput one Triton server sustained within the project's constraints
under its best configuration (``flywheel_serving.tuning``). Scaling on CPU says nothing about
that; scaling on requests per second per replica does: the HPA adds a replica before each one
runs past ``headroom`` of its golden throughput, leaving the rest for bursts while a new
replica starts. The chart turns ``triton.autoscaling.requestsPerSecondPerReplica`` into a Pods
metric of its HorizontalPodAutoscaler (see ``deploy/README.md`` for the metric's adapter rule).

Run ``python -m flywheel_serving.hpa golden.json --headroom 0.7`` to print the values snippet
(JSON, which Helm reads as YAML) for ``helm upgrade -f``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from flywheel_serving.tuning import GoldenPoint

__all__ = ["DEFAULT_HEADROOM", "hpa_values", "main", "requests_per_replica"]

DEFAULT_HEADROOM: Final = 0.7
"""Share of the golden throughput a replica is scaled at: 30 % left for bursts and start-up."""


def requests_per_replica(golden: GoldenPoint, headroom: float = DEFAULT_HEADROOM) -> float:
    """The target requests/s per replica: golden throughput x ``headroom``, rounded down to 0.1."""
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must lie in (0, 1], got {headroom}")
    throughput = golden.point.throughput_rps
    if not throughput > 0:
        raise ValueError("the golden point has no throughput to scale on")
    return math.floor(throughput * headroom * 10) / 10


def hpa_values(
    golden: GoldenPoint, headroom: float = DEFAULT_HEADROOM, *, component: str = "triton"
) -> dict[str, Any]:
    """Helm values turning on ``component``'s HPA with the target derived from ``golden``."""
    return {
        component: {
            "autoscaling": {
                "enabled": True,
                "requestsPerSecondPerReplica": requests_per_replica(golden, headroom),
            }
        }
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the values snippet of a ``golden.json``."""
    parser = argparse.ArgumentParser(
        prog="python -m flywheel_serving.hpa",
        description="Print the Helm values that scale Triton on a golden point's throughput.",
    )
    parser.add_argument("golden", type=Path, help="golden.json (a GoldenPoint) of the version")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM)
    parser.add_argument("--component", default="triton", help="values key of the workload")
    args = parser.parse_args(argv)
    golden = GoldenPoint.model_validate_json(args.golden.read_text())
    values = hpa_values(golden, args.headroom, component=args.component)
    print(
        f"# {golden.point.throughput_rps:.1f} rps at concurrency {golden.point.concurrency} "
        f"(p99 {golden.point.p99_ms:.1f} ms) on {golden.hardware}, x {args.headroom:g} headroom"
    )
    print(json.dumps(values, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
