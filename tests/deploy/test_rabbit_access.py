"""One RabbitMQ user per process: the access map matches what the services really publish and
consume, and on the real broker a process cannot publish an event type it does not own."""

import asyncio
import json
import secrets
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import pytest
import yaml
from aio_pika.exceptions import ChannelClosed
from faststream.rabbit import RabbitBroker

from flywheel_contracts import ALL_EVENTS, LabelsSavedV1, ModelTrainedV1, ModelValidatedV1
from flywheel_runtime.messaging import publish_event
from flywheel_runtime.topology import Topology
from flywheel_testing.wait import wait_for

from .conftest import provision

ROOT = Path(__file__).parents[2]
EXCHANGE_OF = {event.TYPE: event.EXCHANGE for event in ALL_EVENTS}

EXTRA: dict[str, dict[str, dict[str, set[str]]]] = {
    # The log worker has no AsyncAPI document of its own (it runs from the BFF's package).
    "log-worker": {"publishes": {}, "consumes": {"flywheel.inference": {"inference.logged"}}},
    # Rollout's kserve backend applies its own steps; the committed document is the triton one.
    "rollout": {"publishes": {}, "consumes": {"flywheel.events": {"rollout.step"}}},
}


def from_asyncapi() -> dict[str, dict[str, dict[str, set[str]]]]:
    """What each service's committed AsyncAPI document says it publishes and consumes."""
    found: dict[str, dict[str, dict[str, set[str]]]] = {}
    for document in sorted(ROOT.glob("services/*/asyncapi.yaml")):
        service = document.parent.name
        access: dict[str, dict[str, set[str]]] = {"publishes": {}, "consumes": {}}
        for channel in yaml.safe_load(document.read_text())["channels"].values():
            amqp = channel["bindings"]["amqp"]
            key = channel["address"]
            if "exchange" in amqp:
                access["publishes"].setdefault(amqp["exchange"]["name"], set()).add(key)
            else:
                assert amqp["queue"]["name"].startswith(f"{service}.{key}")
                access["consumes"].setdefault(EXCHANGE_OF[key], set()).add(key)
        found[service] = access
    return found


def merged(*maps: dict[str, dict[str, dict[str, set[str]]]]) -> dict[str, Any]:
    out: dict[str, dict[str, dict[str, set[str]]]] = {}
    for access_map in maps:
        for service, access in access_map.items():
            for side, exchanges in access.items():
                for exchange, keys in exchanges.items():
                    sides = out.setdefault(service, {"publishes": {}, "consumes": {}})
                    sides[side].setdefault(exchange, set()).update(keys)
    return out


def test_access_map_is_what_the_asyncapi_documents_say() -> None:
    committed = {
        service: {side: {e: set(keys) for e, keys in ex.items()} for side, ex in access.items()}
        for service, access in provision.load_access().items()
    }
    assert committed == merged(from_asyncapi(), EXTRA)


def test_permissions_grant_each_process_only_its_own_names() -> None:
    services = provision.load_access()
    validator = provision.permissions("validator", services["validator"])
    labeling = provision.permissions("labeling", services["labeling"])
    workspaces = provision.permissions("workspaces", services["workspaces"])

    assert validator["write"] == r"^(flywheel\.dlx|flywheel\.events|validator\..+)$"
    assert validator["read"] == r"^(flywheel\.dlx|flywheel\.events|validator\..+)$"
    assert validator["topics"]["flywheel.events"] == {
        "write": r"^(model\.validated)$",
        "read": r"^(model\.trained)$",
    }
    assert validator["topics"]["flywheel.inference"] == {"write": "^$", "read": "^$"}
    assert labeling["read"] == r"^(flywheel\.dlx|flywheel\.events|labeling\..+)$"
    assert labeling["topics"]["flywheel.events"] == {
        "write": r"^(labels\.saved|project\.configured)$",
        "read": r"^(labels\.requested)$",
    }
    # A process that only publishes reads nothing and owns no queues.
    assert workspaces["read"] == "^$"
    assert workspaces["write"] == r"^(flywheel\.events)$"
    assert provision.password_env("data-monitor") == "RABBITMQ_PASSWORD_DATA_MONITOR"


def test_password_hash_is_rabbitmqs_salted_sha256() -> None:
    # The vector of RabbitMQ's documentation on computing a password hash by hand.
    assert provision.password_hash("test12", bytes.fromhex("908DC60A")) == (
        "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    )


def test_provision_refuses_to_run_without_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    for service in provision.load_access():
        monkeypatch.delenv(provision.password_env(service), raising=False)
    with pytest.raises(SystemExit, match="RABBITMQ_PASSWORD_"):
        provision.main(["--print"])


async def _ignore(_message: object) -> None:
    return None


# --- on the real broker --------------------------------------------------------------------------


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args],
        input=stdin,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def remove(vhost: str, users: list[str]) -> None:
    for args in (["delete_vhost", vhost], *(["delete_user", user] for user in users)):
        subprocess.run(["rabbitmqctl", "-q", *args], check=False, timeout=60)


async def imported(vhost: str, users: int) -> bool:
    """The import runs asynchronously in the broker: done once every topic permission is in."""
    listing = await asyncio.to_thread(
        rabbitmqctl, "list_topic_permissions", "-p", vhost, "--no-table-headers"
    )
    return len(listing.splitlines()) == users * len(provision.TOPIC_EXCHANGES)


@pytest.fixture
async def provisioned(rabbit_url: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A vhost of its own with every process's user imported as the definitions say; yields
    the vhost and each process's AMQP URL."""
    if shutil.which("rabbitmqctl") is None or urlsplit(rabbit_url).hostname not in (
        "127.0.0.1",
        "localhost",
    ):
        pytest.skip("needs rabbitmqctl on the machine running the broker")
    run = uuid.uuid4().hex[:8]
    vhost = f"flywheel-access-{run}"
    passwords = {s: secrets.token_urlsafe(16) for s in provision.load_access()}
    body = provision.definitions(
        provision.load_access(),
        passwords.__getitem__,
        vhost=vhost,
        user=lambda service: f"{service}-{run}",
    )
    # Through stdin: the broker process, another user, could not read a file of this test's.
    rabbitmqctl("import_definitions", stdin=json.dumps(body))
    base = urlsplit(rabbit_url)
    urls = {
        service: f"amqp://{service}-{run}:{quote(password, safe='')}@{base.hostname}:"
        f"{base.port or 5672}/{quote(vhost, safe='')}"
        for service, password in passwords.items()
    }
    try:
        await wait_for(lambda: imported(vhost, len(urls)), timeout=30, message="definitions in")
        yield vhost, urls
    finally:
        await asyncio.to_thread(remove, vhost, [f"{service}-{run}" for service in passwords])


@pytest.fixture
async def validator_broker(
    provisioned: tuple[str, dict[str, str]],
) -> AsyncIterator[tuple[RabbitBroker, Topology]]:
    """The validator's broker, as its runtime builds it, on the validator's own user."""
    _, urls = provisioned
    topology = Topology()
    broker = RabbitBroker(urls["validator"])
    received: asyncio.Queue[ModelTrainedV1] = asyncio.Queue()

    @broker.subscriber(
        topology.queue("validator", ModelTrainedV1), topology.exchange_for(ModelTrainedV1)
    )
    async def on_trained(event: ModelTrainedV1) -> None:
        await received.put(event)

    await broker.connect()
    await topology.declare(broker)
    await broker.start()
    broker.received = received  # type: ignore[attr-defined]
    try:
        yield broker, topology
    finally:
        await broker.stop()


@pytest.mark.integration
async def test_a_process_cannot_publish_an_event_type_it_does_not_own(
    provisioned: tuple[str, dict[str, str]], validator_broker: tuple[RabbitBroker, Topology]
) -> None:
    _, urls = provisioned
    broker, topology = validator_broker

    # Its own work goes through: its queue is declared and fed, its event is published.
    async with await aio_pika.connect(urls["trainer-dispatch"]) as trainer:
        channel = await trainer.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("flywheel.events", ensure=False)
        await exchange.publish(
            aio_pika.Message(ModelTrainedV1.example().model_dump_json().encode()),
            routing_key=ModelTrainedV1.routing_key(),
        )
    received = await asyncio.wait_for(broker.received.get(), timeout=10)  # type: ignore[attr-defined]
    await publish_event(broker, topology, ModelValidatedV1.example())

    # Someone else's event type, someone else's queue: refused by the broker itself.
    refused: list[str] = []
    async with await aio_pika.connect(urls["validator"]) as connection:
        for attempt in ("publish labels.saved", "consume another's queue", "declare a queue"):
            channel = await connection.channel(publisher_confirms=True)
            try:
                if attempt == "publish labels.saved":
                    exchange = await channel.get_exchange("flywheel.events", ensure=False)
                    await exchange.publish(
                        aio_pika.Message(LabelsSavedV1.example().model_dump_json().encode()),
                        routing_key=LabelsSavedV1.routing_key(),
                    )
                elif attempt == "consume another's queue":
                    # basic.consume is checked for read permission before the queue is looked up.
                    underlay = await channel.get_underlay_channel()
                    await underlay.basic_consume("data-monitor.labels.saved", _ignore)
                else:
                    await channel.declare_queue("rollout.model.validated", durable=True)
            except ChannelClosed as error:
                refused.append(f"{attempt}: {error}")
    print(f"rabbit_access users={len(urls)} refused={len(refused)}/3")

    assert received.event_id == ModelTrainedV1.example().event_id
    assert [r.split(":")[0] for r in refused] == [
        "publish labels.saved",
        "consume another's queue",
        "declare a queue",
    ]
    assert all("ACCESS_REFUSED" in r for r in refused), refused
