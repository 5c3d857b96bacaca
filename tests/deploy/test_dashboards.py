import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "dashboards").glob("*.json"))

# Exported by servers the stack runs rather than by Flywheel's code, with their labels:
# RabbitMQ's Prometheus plugin (/metrics/detailed, families queue_coarse_metrics and
# queue_consumer_count) and Triton's metrics endpoint (per model version).
EXTERNAL = {
    "rabbitmq_detailed_queue_messages": {"vhost", "queue"},
    "rabbitmq_detailed_queue_messages_ready": {"vhost", "queue"},
    "rabbitmq_detailed_queue_messages_unacked": {"vhost", "queue"},
    "rabbitmq_detailed_queue_consumers": {"vhost", "queue"},
    "nv_inference_request_success": {"model", "version"},
    "nv_inference_request_failure": {"model", "version", "reason"},
    "nv_inference_request_duration_us": {"model", "version"},
    "nv_inference_queue_duration_us": {"model", "version"},
}
# Labels every scraped series carries, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance", "le"}
FUNCTIONS_AND_KEYWORDS = {
    "sum", "rate", "increase", "delta", "histogram_quantile", "by", "without", "ignoring",
    "group_left", "group_right", "on", "and", "or", "unless", "max", "min", "avg",
}  # fmt: skip
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported() -> dict[str, set[str]]:
    """Every series name the services expose on /metrics, with its labels, read from the very
    objects that register them."""
    from faststream.rabbit.prometheus import RabbitPrometheusMiddleware

    from flywheel_inference_bff.logworker.worker import WorkerMetrics
    from flywheel_inference_bff.metrics import BffMetrics

    registry = CollectorRegistry()
    RabbitPrometheusMiddleware(registry=registry, app_name="probe")
    BffMetrics.create(registry)
    WorkerMetrics.create(registry)
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        collector = registry._names_to_collectors[family.name]  # the registry keeps no labels
        assert isinstance(collector, MetricWrapperBase)
        labels = set(collector._labelnames)
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = labels
    return names


def promql(dashboard: dict) -> list[str]:
    return [q["query"] for w in dashboard["widgets"] for q in w["query"]["promql"]]


@pytest.fixture(scope="module")
def known() -> dict[str, set[str]]:
    return exported() | EXTERNAL


def test_the_five_dashboards_exist():
    assert {p.stem for p in DASHBOARDS} == {
        "loop-latency",
        "queues",
        "canary",
        "inference-bff",
        "inference-logs",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_a_signoz_dashboard_with_a_panel_per_layout_cell(path):
    dashboard = json.loads(path.read_text())
    widget_ids = [w["id"] for w in dashboard["widgets"]]

    assert dashboard["title"]
    assert dashboard["description"]
    assert widget_ids
    assert len(set(widget_ids)) == len(widget_ids)
    assert sorted(cell["i"] for cell in dashboard["layout"]) == sorted(widget_ids)
    for cell in dashboard["layout"]:
        assert cell["x"] >= 0
        assert cell["x"] + cell["w"] <= 12
    for widget in dashboard["widgets"]:
        assert widget["title"]
        assert widget["panelTypes"] in {"graph", "value", "table"}
        assert widget["query"]["queryType"] == "promql"
        assert widget["query"]["promql"], widget["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_queries_use_metrics_and_labels_that_are_exported(path, known):
    for query in promql(json.loads(path.read_text())):
        assert query.count("(") == query.count(")"), query
        assert query.count("{") == query.count("}"), query
        assert query.count("[") == query.count("]"), query
        without_strings = re.sub(r'"[^"]*"', '""', query)
        words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", without_strings))
        metrics = {w for w in words if w in known}
        assert metrics, f"no known metric in {query}"
        unknown = {
            w
            for w in words
            if w.startswith(("flywheel_", "faststream_", "rabbitmq_", "nv_")) and w not in known
        }
        assert unknown == set(), f"not exported: {unknown}"
        labels = set().union(*(known[m] for m in metrics)) | SCRAPE_LABELS
        used = set(re.findall(r"\b([a-z_]+)\s*(?:=~|!~|!=|=)", without_strings))
        for group in re.findall(r"(?:by|ignoring|on)\s*\(([^)]*)\)", without_strings):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        assert used - labels == set(), f"{query} uses labels its metrics lack"
        assert (words - metrics - used - FUNCTIONS_AND_KEYWORDS - {"m", "h", "s"}) == set()


def test_dashboards_cover_what_operators_watch(known):
    every = {p.stem: " ".join(promql(json.loads(p.read_text()))) for p in DASHBOARDS}

    assert "faststream_received_processed_messages_duration_seconds_bucket" in every["loop-latency"]
    assert ".dlq" in every["queues"]
    assert "model_version" in every["canary"]
    assert "flywheel_bff_request_seconds_bucket" in every["inference-bff"]
    assert "flywheel_bff_inference_logs_dropped_total" in every["inference-logs"]
