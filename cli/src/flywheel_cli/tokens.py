"""Bearer tokens the CLI sends: a configured one, or one signed with the local dev key.

``up`` writes a fresh signing key under the base directory and hands it to every service that
checks tokens, so the local stack runs with authentication on; the CLI signs its own
short-lived tokens with the same key and only the roles each call needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from flywheel_cli.settings import CliSettings
from flywheel_runtime.auth import generate_dev_key, issue_dev_token

CLI_SUBJECT = "flywheel-cli"

OPERATOR = "operator"
ADMIN = "admin"
LABELER = "labeler"
PREDICT = "predict"


class NoCredentialsError(RuntimeError):
    """Neither a token nor a dev signing key is configured."""


def ensure_dev_key(path: Path) -> str:
    """The dev signing key at ``path``, created (readable by the owner only) if missing."""
    if path.exists():
        return path.read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_dev_key("EC")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(key)
    return key


def dev_key(settings: CliSettings) -> str | None:
    """The configured dev key, else the one ``up`` wrote; None when there is neither."""
    if settings.dev_signing_key is not None:
        return settings.dev_signing_key.get_secret_value()
    try:
        return settings.dev_key_path.read_text()
    except FileNotFoundError:
        return None


def bearer(
    settings: CliSettings,
    roles: Iterable[str],
    *,
    subject: str = CLI_SUBJECT,
    expires_in: int = 3600,
) -> dict[str, str]:
    """An ``Authorization`` header carrying ``roles`` (a configured token is sent as it is)."""
    if settings.token is not None:
        return {"Authorization": f"Bearer {settings.token.get_secret_value()}"}
    key = dev_key(settings)
    if key is None:
        raise NoCredentialsError(
            f"no token: run `flywheel up` (it writes {settings.dev_key_path}), or set "
            "FLYWHEEL_CLI_TOKEN or FLYWHEEL_CLI_DEV_SIGNING_KEY"
        )
    token = issue_dev_token(key, subject=subject, roles=roles, expires_in=expires_in)
    return {"Authorization": f"Bearer {token}"}
