"""The BFF's own Prometheus metrics, registered on the service's registry (``/metrics``)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class BffMetrics:
    requests: Histogram
    """HTTP request latency by route template, method and status."""
    predictions: Counter
    """Predictions by model line, version and outcome."""
    logs_dropped: Counter
    """Inference logs that never reached the broker, by reason."""
    logs_published: Counter
    cache: Counter
    """Prediction cache lookups by result (hit, miss, error, skipped)."""

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> BffMetrics:
        """Metrics on ``registry`` (a private one when None, as unit tests use)."""
        registry = registry or CollectorRegistry()
        return cls(
            requests=Histogram(
                "flywheel_bff_request_seconds",
                "HTTP request latency of the inference BFF.",
                ["route", "method", "status"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            predictions=Counter(
                "flywheel_bff_predictions",
                "Predictions served (status ok) or failed (status error, by error code).",
                ["model_line", "model_version", "status"],
                registry=registry,
            ),
            logs_dropped=Counter(
                "flywheel_bff_inference_logs_dropped",
                "Inference logs dropped instead of published: buffer_full, publish_failed, "
                "shutdown, invalid.",
                ["reason"],
                registry=registry,
            ),
            logs_published=Counter(
                "flywheel_bff_inference_logs_published",
                "Inference logs the broker confirmed.",
                registry=registry,
            ),
            cache=Counter(
                "flywheel_bff_cache_lookups",
                "Prediction cache lookups by result: hit, miss, error, skipped.",
                ["result"],
                registry=registry,
            ),
        )
