from flywheel_contracts.topology import (
    DEATHS_HEADER,
    DELIVERIES_HEADER,
    ERROR_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
)
from flywheel_runtime.messaging import ERROR_HEADER_CHARS, dead_letter_headers


def test_the_headers_say_why_where_and_how_often() -> None:
    headers = dead_letter_headers(
        {"x-delivery-count": 3, "traceparent": "00-abc", DEATHS_HEADER: 1},
        reason="delivery_limit",
        error=TimeoutError("S3 did not answer"),
        queue="data-monitor.labels.saved",
        deliveries=4,
    )

    assert headers == {
        "traceparent": "00-abc",
        REASON_HEADER: "delivery_limit",
        ERROR_HEADER: "TimeoutError: S3 did not answer",
        QUEUE_HEADER: "data-monitor.labels.saved",
        DELIVERIES_HEADER: 4,
        DEATHS_HEADER: 2,
    }


def test_a_long_error_is_cut() -> None:
    headers = dead_letter_headers(
        {}, reason="rejected", error=ValueError("x" * 5000), queue="q", deliveries=1
    )

    assert len(headers[ERROR_HEADER]) == ERROR_HEADER_CHARS
    assert headers[DEATHS_HEADER] == 1
