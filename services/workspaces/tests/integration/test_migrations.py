import pytest

from flywheel_testing.migrations import migration_drift
from flywheel_workspaces.adapters.tables import metadata
from flywheel_workspaces.main import MIGRATIONS

pytestmark = pytest.mark.integration


async def test_migrations_create_exactly_the_tables_the_code_uses(database_url: str) -> None:
    assert await migration_drift(database_url, MIGRATIONS, metadata) == []
