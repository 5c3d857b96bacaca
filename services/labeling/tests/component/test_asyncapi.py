from pathlib import Path

from pydantic import SecretStr

from flywheel_labeling.main import DESCRIPTION, TITLE, VERSION, create_app
from flywheel_labeling.settings import LabelingSettings
from flywheel_runtime.auth import AuthSettings, generate_dev_key
from flywheel_testing.asyncapi import assert_asyncapi_committed

COMMITTED = Path(__file__).parents[2] / "asyncapi.yaml"


def test_asyncapi_is_committed() -> None:
    app = create_app(
        LabelingSettings(auth=AuthSettings(dev_signing_key=SecretStr(generate_dev_key())))
    )

    assert_asyncapi_committed(
        app.state.runtime.broker, COMMITTED, title=TITLE, version=VERSION, description=DESCRIPTION
    )
