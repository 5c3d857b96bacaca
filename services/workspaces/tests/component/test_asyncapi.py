from pathlib import Path

from flywheel_testing.asyncapi import assert_asyncapi_committed
from flywheel_workspaces.main import DESCRIPTION, TITLE, VERSION, create_app
from flywheel_workspaces.settings import WorkspacesSettings

COMMITTED = Path(__file__).parents[2] / "asyncapi.yaml"


def test_asyncapi_is_committed() -> None:
    app = create_app(WorkspacesSettings(namespace=""))

    assert_asyncapi_committed(
        app.state.runtime.broker, COMMITTED, title=TITLE, version=VERSION, description=DESCRIPTION
    )
