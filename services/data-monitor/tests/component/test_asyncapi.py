from pathlib import Path

from flywheel_data_monitor.main import DESCRIPTION, TITLE, VERSION, create_app
from flywheel_data_monitor.settings import DataMonitorSettings
from flywheel_testing.asyncapi import assert_asyncapi_committed

COMMITTED = Path(__file__).parents[2] / "asyncapi.yaml"


def test_asyncapi_is_committed() -> None:
    app = create_app(DataMonitorSettings(namespace=""))

    assert_asyncapi_committed(
        app.state.runtime.broker, COMMITTED, title=TITLE, version=VERSION, description=DESCRIPTION
    )
