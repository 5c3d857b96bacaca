from pathlib import Path

from flywheel_testing.asyncapi import assert_asyncapi_committed
from flywheel_trainer_dispatch.main import DESCRIPTION, TITLE, VERSION, create_app
from flywheel_trainer_dispatch.settings import TrainerDispatchSettings

COMMITTED = Path(__file__).parents[2] / "asyncapi.yaml"


def test_asyncapi_is_committed() -> None:
    app = create_app(TrainerDispatchSettings(namespace=""))

    assert_asyncapi_committed(
        app.state.runtime.broker, COMMITTED, title=TITLE, version=VERSION, description=DESCRIPTION
    )
