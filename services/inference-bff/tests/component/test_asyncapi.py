from pathlib import Path

from pydantic import SecretStr

from flywheel_inference_bff.main import DESCRIPTION, TITLE, VERSION, create_app
from flywheel_inference_bff.settings import BffSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key
from flywheel_testing.asyncapi import assert_asyncapi_committed

COMMITTED = Path(__file__).parents[2] / "asyncapi.yaml"


def test_asyncapi_is_committed() -> None:
    # The replica id is random per process; the document names it by its role.
    app = create_app(
        BffSettings(
            namespace="",
            replica_id="{replica}",
            auth=AuthSettings(dev_signing_key=SecretStr(generate_dev_key())),
        )
    )

    assert_asyncapi_committed(
        app.state.runtime.broker, COMMITTED, title=TITLE, version=VERSION, description=DESCRIPTION
    )
