#!/usr/bin/env python3
"""One RabbitMQ user per Flywheel process, with least-privilege permissions.

Reads ``access.json`` (what each process publishes and consumes) and builds RabbitMQ
definitions: a user per process, its permissions on the vhost, and topic permissions that
limit the routing keys it may publish, so a process cannot emit an event type it does not
own. Standard library only: docker-compose runs it in a plain Python image, the Helm chart in a
Job, and tests import it.

Permissions, per process ``S`` (names carry ``--namespace`` when given):

* configure: the three exchanges (every process declares them, idempotently) and its own
  queues ``S.*`` (subscriptions and their ``.dlq``);
* write: the exchanges it publishes to, its queues (binding needs it) and, when it consumes,
  the dead-letter exchange (RabbitMQ asks it of a queue declared to dead-letter there);
* read: its queues, and the exchanges it binds them to (the dead-letter exchange included);
* topic permissions on each topic exchange: write only its own routing keys, read (bind) only
  the ones it consumes.

    provision.py --print > definitions.json       # then: rabbitmqctl import_definitions
    provision.py --management-url http://rabbitmq:15672 --admin-user flywheel

Passwords come from ``RABBITMQ_PASSWORD_<PROCESS>`` (``RABBITMQ_PASSWORD_DATA_MONITOR``...),
the admin's from ``RABBITMQ_ADMIN_PASSWORD``; a missing one is an error, never a default.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ACCESS_FILE = Path(__file__).with_name("access.json")
EVENTS_EXCHANGE = "flywheel.events"
INFERENCE_EXCHANGE = "flywheel.inference"
DEAD_LETTER_EXCHANGE = "flywheel.dlx"
TOPIC_EXCHANGES = (EVENTS_EXCHANGE, INFERENCE_EXCHANGE)
NOTHING = "^$"
"""A regex no exchange, queue or routing key matches (RabbitMQ's way to grant nothing)."""


def load_access(path: Path = ACCESS_FILE) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Per process: ``publishes`` and ``consumes``, each exchange → routing keys."""
    services: dict[str, dict[str, dict[str, list[str]]]] = json.loads(path.read_text())["services"]
    return services


def password_env(service: str) -> str:
    """The variable holding ``service``'s password."""
    return "RABBITMQ_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", service.upper())


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _alternatives(names: list[str]) -> str:
    return NOTHING if not names else "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def permissions(
    service: str, access: Mapping[str, Mapping[str, list[str]]], namespace: str = ""
) -> dict[str, Any]:
    """The vhost permissions and topic permissions of one process."""
    own = re.escape(namespace + service) + r"\..+"
    publishes = {e: keys for e, keys in access["publishes"].items() if keys}
    consumes = {e: keys for e, keys in access["consumes"].items() if keys}

    def names(exchanges: list[str], with_own: bool) -> str:
        escaped = [re.escape(namespace + e) for e in sorted(exchanges)]
        alternatives = escaped + ([own] if with_own else [])
        return "^(" + "|".join(alternatives) + ")$" if alternatives else NOTHING

    exchanges = [EVENTS_EXCHANGE, INFERENCE_EXCHANGE, DEAD_LETTER_EXCHANGE]
    # Declaring a queue that dead-letters needs write on the dead-letter exchange; binding
    # its .dlq there needs read.
    dead_letters = [DEAD_LETTER_EXCHANGE] if consumes else []
    return {
        "configure": names(exchanges, with_own=True),
        "write": names(sorted(publishes) + dead_letters, with_own=bool(consumes)),
        "read": names(sorted(consumes) + dead_letters, with_own=bool(consumes)),
        "topics": {
            namespace + exchange: {
                "write": _alternatives(publishes.get(exchange, [])),
                "read": _alternatives(consumes.get(exchange, [])),
            }
            for exchange in TOPIC_EXCHANGES
        },
    }


def definitions(
    services: Mapping[str, Mapping[str, Mapping[str, list[str]]]],
    password: Callable[[str], str],
    *,
    vhost: str = "/",
    namespace: str = "",
    user: Callable[[str], str] = lambda service: service,
) -> dict[str, Any]:
    """RabbitMQ definitions (the ``import_definitions`` / ``POST /api/definitions`` format)."""
    users, grants, topics = [], [], []
    for service, access in sorted(services.items()):
        name = user(service)
        granted = permissions(service, access, namespace)
        users.append(
            {
                "name": name,
                "password_hash": password_hash(password(service)),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        )
        grants.append(
            {"user": name, "vhost": vhost} | {k: granted[k] for k in ("configure", "write", "read")}
        )
        topics += [
            {"user": name, "vhost": vhost, "exchange": exchange} | rules
            for exchange, rules in granted["topics"].items()
        ]
    return {
        "vhosts": [{"name": vhost}],
        "users": users,
        "permissions": grants,
        "topic_permissions": topics,
    }


def _from_env(service: str) -> str:
    value = os.environ.get(password_env(service))
    if not value:
        raise SystemExit(f"{password_env(service)} is not set")
    return value


def apply(url: str, admin_user: str, admin_password: str, body: dict[str, Any]) -> None:
    """Merge the definitions into a running broker through its management API."""
    request = urllib.request.Request(  # noqa: S310 - the operator's management URL
        urllib.parse.urljoin(url.rstrip("/") + "/", "api/definitions"),
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic "
            + base64.b64encode(f"{admin_user}:{admin_password}".encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - operator URL
        if response.status >= 300:
            raise SystemExit(f"management API answered {response.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--access", type=Path, default=ACCESS_FILE)
    parser.add_argument("--vhost", default="/")
    parser.add_argument("--namespace", default="", help="prefix of exchange and queue names")
    parser.add_argument("--print", action="store_true", help="write the definitions to stdout")
    parser.add_argument("--management-url", help="e.g. http://rabbitmq:15672")
    parser.add_argument("--admin-user", default=os.environ.get("RABBITMQ_ADMIN_USER"))
    args = parser.parse_args(argv)
    body = definitions(
        load_access(args.access), _from_env, vhost=args.vhost, namespace=args.namespace
    )
    if args.print:
        json.dump(body, sys.stdout, indent=2)
        return 0
    if not args.management_url or not args.admin_user:
        parser.error("--management-url and --admin-user (or --print) are required")
    admin_password = os.environ.get("RABBITMQ_ADMIN_PASSWORD")
    if not admin_password:
        raise SystemExit("RABBITMQ_ADMIN_PASSWORD is not set")
    apply(args.management_url, args.admin_user, admin_password, body)
    print(f"provisioned {len(body['users'])} users on vhost {args.vhost}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
