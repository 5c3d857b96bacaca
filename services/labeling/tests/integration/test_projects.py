import pytest

from flywheel_testing.wait import wait_for

from .conftest import DIGITS, Service

pytestmark = pytest.mark.integration


async def test_creating_and_updating_a_project_publishes_project_configured(
    service: Service,
) -> None:
    project = await service.create_project(policy={"count": 50, "cooldown_s": 60})
    updated = await service.client.put(
        f"/v1/projects/{project}",
        json={"class_names": [*DIGITS, "x"], "policy": {"count": 20}},
        headers=service.admin,
    )

    async def both() -> bool:
        return len(service.probe.configured(project)) == 2

    await wait_for(both, message="two project.configured")
    first, second = service.probe.configured(project)
    assert updated.status_code == 200, updated.text
    assert (first.payload.revision, second.payload.revision) == (1, 2)
    assert first.payload.policy.count == 50
    assert first.payload.model_line == f"{project}-classifier"
    assert second.payload.class_names == [*DIGITS, "x"]
    assert second.payload.policy.count == 20
    fetched = await service.client.get(f"/v1/projects/{project}", headers=service.headers)
    assert fetched.json()["revision"] == 2
