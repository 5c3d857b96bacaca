import uuid
from datetime import timedelta

import pytest

from flywheel_contracts import WorkspaceExpiredV1, WorkspaceReadyV1, WorkspaceRequestedV1
from flywheel_runtime.errors import DependencyUnavailableError
from flywheel_workspaces.errors import (
    ExtensionRefusedError,
    QuotaExceededError,
    WorkspaceNotFoundError,
    WorkspaceStateError,
)
from flywheel_workspaces.policy import Lifetime, Quota
from flywheel_workspaces.ports import AllocationMode, StopReason, WorkspaceState

from ..fakes import ADA, BOB, CY, START, Harness, harness, spec


async def test_a_request_with_free_gpus_is_admitted_at_once_and_announced() -> None:
    h = harness()

    workspace = await h.workspaces.request(ADA, spec())

    assert workspace.state is WorkspaceState.PROVISIONING
    assert workspace.started_at == START
    assert workspace.queue_position is None
    [requested] = h.store.events(WorkspaceRequestedV1)
    assert requested.payload.workspace_id == workspace.workspace_id
    assert (requested.payload.owner, requested.payload.state) == ("ada", "provisioning")
    assert (requested.payload.gpu_type, requested.payload.gpu_count) == ("a100", 1)
    assert requested.correlation_id == workspace.workspace_id
    [holding] = h.store.holding_rows
    assert (holding.owner, holding.started_at, holding.ended_at) == ("ada", START, None)


async def test_over_quota_is_refused_with_the_limit_and_nothing_is_queued() -> None:
    h = harness(quota=Quota(max_gpus=2, max_environments=2))
    await h.workspaces.request(ADA, spec())

    with pytest.raises(QuotaExceededError) as refused:
        await h.workspaces.request(ADA, spec(gpu_count=2))

    assert refused.value.details["limit"] == "max_gpus"
    assert "max_gpus 2" in refused.value.message
    assert len(h.store.rows) == 1
    assert len(h.store.events(WorkspaceRequestedV1)) == 1
    await h.workspaces.request(BOB, spec(gpu_count=1))  # another engineer's own quota


async def test_a_quota_override_applies_to_its_engineer_only() -> None:
    h = harness(quota=Quota(max_gpus=1, max_environments=1), quotas={"bob": Quota(max_gpus=0)})

    with pytest.raises(QuotaExceededError, match="max_gpus 0"):
        await h.workspaces.request(BOB, spec())
    await h.workspaces.request(ADA, spec())


async def test_without_free_gpus_requests_queue_per_pool_with_their_positions() -> None:
    h = harness()  # two a100s
    first = await h.workspaces.request(ADA, spec(gpu_count=2))
    second = await h.workspaces.request(BOB, spec())
    third = await h.workspaces.request(CY, spec())
    slice_ = await h.workspaces.request(CY, spec(mode=AllocationMode.MIG, mig_profile="1g.10gb"))

    assert first.state is WorkspaceState.PROVISIONING
    assert (second.state, second.queue_position) == (WorkspaceState.QUEUED, 1)
    assert (third.state, third.queue_position) == (WorkspaceState.QUEUED, 2)
    assert "1 ahead" in (third.message or "")
    assert slice_.state is WorkspaceState.PROVISIONING  # its own pool has room
    positions = [e.payload.queue_position for e in h.store.events(WorkspaceRequestedV1)]
    assert positions == [None, 1, 2, None]
    seen = await h.workspaces.environment(third.workspace_id, "cy")
    assert seen.queue_position == 2


async def test_queued_requests_are_admitted_in_order_when_gpus_come_free() -> None:
    h = harness()
    first = await h.workspaces.request(ADA, spec(gpu_count=2))
    second = await h.workspaces.request(BOB, spec())
    third = await h.workspaces.request(CY, spec())

    await h.workspaces.tick()
    assert h.store.state(second.workspace_id) is WorkspaceState.QUEUED

    await h.workspaces.delete(first.workspace_id, "ada")
    await h.workspaces.tick()

    assert h.store.state(second.workspace_id) is WorkspaceState.PROVISIONING
    assert h.store.state(third.workspace_id) is WorkspaceState.PROVISIONING
    assert h.backend.made("create", second.workspace_id) == 1
    assert h.backend.made("create", third.workspace_id) == 1
    assert h.workspaces.changed.is_set()


async def test_a_large_request_at_the_head_is_not_overtaken() -> None:
    h = harness()
    holder = await h.workspaces.request(ADA, spec())
    big = await h.workspaces.request(BOB, spec(gpu_count=2))
    small = await h.workspaces.request(CY, spec())

    await h.workspaces.tick()

    assert (big.queue_position, small.queue_position) == (1, 2)
    assert h.store.state(small.workspace_id) is WorkspaceState.QUEUED
    await h.workspaces.delete(holder.workspace_id, "ada")
    await h.workspaces.tick()
    assert h.store.state(big.workspace_id) is WorkspaceState.PROVISIONING
    assert h.store.state(small.workspace_id) is WorkspaceState.QUEUED


async def test_provisioning_becomes_ready_with_its_connection_and_expiry() -> None:
    h = harness(lifetime=Lifetime(max_ttl_s=7200))
    workspace = await h.workspaces.request(ADA, spec(ttl_s=86400))
    await h.workspaces.tick()  # creates it
    await h.workspaces.tick()  # sees it pending
    assert h.backend.made("create", workspace.workspace_id) == 1
    assert h.store.rows[workspace.workspace_id].message == "pulling the image"

    h.clock.advance(90)
    ready = await h.ready(workspace.workspace_id)

    assert ready.ready_at == START + timedelta(seconds=90)
    assert ready.expires_at == ready.ready_at + timedelta(seconds=7200)  # the TTL was capped
    assert ready.connection is not None
    assert ready.connection.url is not None
    [event] = h.store.events(WorkspaceReadyV1)
    assert event.payload.expires_at == ready.expires_at
    assert event.payload.waited_s == 90
    assert event.payload.backend == "fake"


async def ready_one(h: Harness, ttl_s: int = 3600, **changes: object) -> uuid.UUID:
    workspace = await h.workspaces.request(ADA, spec(ttl_s=ttl_s, **changes))  # type: ignore[arg-type]
    await h.ready(workspace.workspace_id)
    return workspace.workspace_id


async def test_at_its_ttl_an_environment_stops_keeping_its_home_volume() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    workspace_id = await ready_one(h, ttl_s=3600)

    h.clock.advance(3599)
    await h.workspaces.tick()
    assert h.store.state(workspace_id) is WorkspaceState.READY

    h.clock.advance(1)
    await h.workspaces.tick()

    stopped = h.store.rows[workspace_id]
    assert stopped.state is WorkspaceState.STOPPED
    assert stopped.stop_reason is StopReason.TTL
    assert stopped.connection is None
    assert h.backend.made("stop", workspace_id) == 1
    assert h.backend.made("delete", workspace_id) == 0
    assert workspace_id in h.backend.volumes
    [expired] = h.store.events(WorkspaceExpiredV1)
    assert expired.payload.reason.value == "ttl"
    assert expired.payload.held_s == 3600
    assert expired.payload.home_kept
    [holding] = h.store.holding_rows
    assert (holding.ended_at, holding.reason) == (START + timedelta(seconds=3600), StopReason.TTL)


async def test_an_expired_environment_frees_its_gpus_for_the_queue() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    first = await ready_one(h, ttl_s=600, gpu_count=2)
    waiting = await h.workspaces.request(BOB, spec())
    assert waiting.state is WorkspaceState.QUEUED

    h.clock.advance(600)
    await h.workspaces.tick()  # stops the first; GPUs are free
    assert h.store.state(first) is WorkspaceState.STOPPED
    assert h.workspaces.changed.is_set()
    await h.workspaces.tick()  # the woken supervisor admits

    assert h.store.state(waiting.workspace_id) is WorkspaceState.PROVISIONING


async def test_extend_adds_time_up_to_the_lifetime_cap_then_refuses() -> None:
    h = harness(
        lifetime=Lifetime(
            max_ttl_s=3600, max_lifetime_s=5400, max_extensions=5, idle_timeout_s=None
        )
    )
    workspace_id = await ready_one(h, ttl_s=3600)

    extended = await h.workspaces.extend(workspace_id, "ada", 1200)
    assert extended.expires_at == START + timedelta(seconds=4800)
    extended = await h.workspaces.extend(workspace_id, "ada", 3600)
    assert extended.expires_at == START + timedelta(seconds=5400)  # only what the cap leaves
    assert (extended.extensions, extended.extended_s) == (2, 1800)
    with pytest.raises(ExtensionRefusedError, match="max_lifetime_s"):
        await h.workspaces.extend(workspace_id, "ada", 60)

    h.clock.advance(5399)
    await h.workspaces.tick()
    assert h.store.state(workspace_id) is WorkspaceState.READY
    h.clock.advance(1)
    await h.workspaces.tick()
    assert h.store.state(workspace_id) is WorkspaceState.STOPPED


async def test_an_extension_before_readiness_adds_to_the_ttl_it_starts_with() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    workspace = await h.workspaces.request(ADA, spec(ttl_s=600))

    await h.workspaces.extend(workspace.workspace_id, "ada", 300)
    ready = await h.ready(workspace.workspace_id)

    assert ready.expires_at == START + timedelta(seconds=900)


async def test_an_ended_environment_cannot_be_extended() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    workspace_id = await ready_one(h, ttl_s=600)
    h.clock.advance(600)
    await h.workspaces.tick()

    with pytest.raises(WorkspaceStateError, match="stopped"):
        await h.workspaces.extend(workspace_id, "ada", 600)


async def test_an_idle_environment_is_shut_down_and_activity_keeps_it_alive() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=1800))
    workspace_id = await ready_one(h, ttl_s=36000)

    h.clock.advance(1500)
    h.backend.activity[workspace_id] = h.clock.now  # the engineer works
    await h.workspaces.tick()
    assert h.store.rows[workspace_id].last_activity_at == h.clock.now

    h.clock.advance(1799)
    await h.workspaces.tick()
    assert h.store.state(workspace_id) is WorkspaceState.READY

    h.clock.advance(1)
    await h.workspaces.tick()

    stopped = h.store.rows[workspace_id]
    assert (stopped.state, stopped.stop_reason) == (WorkspaceState.STOPPED, StopReason.IDLE)
    assert h.backend.made("stop", workspace_id) == 1
    assert h.backend.made("delete", workspace_id) == 0
    assert workspace_id in h.backend.volumes
    [expired] = h.store.events(WorkspaceExpiredV1)
    assert (expired.payload.reason.value, expired.payload.held_s) == ("idle", 3300)


async def test_delete_removes_compute_and_volume_and_closes_the_holding() -> None:
    h = harness()
    workspace_id = await ready_one(h)
    h.clock.advance(120)

    deleted = await h.workspaces.delete(workspace_id, "ada")

    assert deleted.state is WorkspaceState.DELETED
    assert deleted.stop_reason is StopReason.OWNER
    assert h.backend.made("delete", workspace_id) == 1
    assert workspace_id not in h.backend.volumes
    [holding] = h.store.holding_rows
    assert (holding.reason, holding.ended_at) == (StopReason.OWNER, START + timedelta(seconds=120))
    assert h.store.events(WorkspaceExpiredV1) == []
    again = await h.workspaces.delete(workspace_id, "ada")
    assert again.state is WorkspaceState.DELETED
    assert h.backend.made("delete", workspace_id) == 1


async def test_a_stopped_environment_can_be_deleted_which_removes_its_volume() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    workspace_id = await ready_one(h, ttl_s=600)
    h.clock.advance(600)
    await h.workspaces.tick()

    deleted = await h.workspaces.delete(workspace_id, "ada")

    assert deleted.stop_reason is StopReason.TTL  # why its compute ended stays recorded
    assert workspace_id not in h.backend.volumes
    assert [e.payload.workspace_id for e in h.store.events(WorkspaceExpiredV1)] == [workspace_id]


async def test_an_engineer_never_reaches_another_engineers_environment() -> None:
    h = harness()
    workspace = await h.workspaces.request(ADA, spec())

    for call in (
        h.workspaces.environment(workspace.workspace_id, "bob"),
        h.workspaces.delete(workspace.workspace_id, "bob"),
        h.workspaces.extend(workspace.workspace_id, "bob", 600),
        h.workspaces.start(workspace.workspace_id, "bob"),
    ):
        with pytest.raises(WorkspaceNotFoundError):
            await call
    assert await h.workspaces.environments("bob") == []
    assert h.store.state(workspace.workspace_id) is WorkspaceState.PROVISIONING
    operator_view = await h.workspaces.environment(workspace.workspace_id, None)
    assert operator_view.owner == "ada"


async def test_a_stopped_environment_starts_again_on_its_kept_volume() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    workspace_id = await ready_one(h, ttl_s=600)
    h.clock.advance(600)
    await h.workspaces.tick()
    h.clock.advance(60)

    started = await h.workspaces.start(workspace_id, "ada")

    assert started.workspace_id == workspace_id
    assert started.state is WorkspaceState.PROVISIONING
    assert (started.ready_at, started.expires_at, started.stop_reason) == (None, None, None)
    assert h.store.events(WorkspaceRequestedV1)[-1].payload.resumed
    again = await h.ready(workspace_id)
    assert again.expires_at == START + timedelta(seconds=660 + 600)
    assert h.backend.made("create", workspace_id) == 2
    assert len(h.store.holding_rows) == 2
    with pytest.raises(WorkspaceStateError):
        await h.workspaces.start(workspace_id, "ada")


async def test_the_same_idempotency_key_returns_the_same_environment() -> None:
    h = harness()
    key = uuid.uuid4()

    first = await h.workspaces.request(ADA, spec(), key)
    second = await h.workspaces.request(ADA, spec(), key)
    other = await h.workspaces.request(BOB, spec(), key)

    assert second.workspace_id == first.workspace_id
    assert other.workspace_id != first.workspace_id
    assert len(h.store.events(WorkspaceRequestedV1)) == 2


async def test_an_environment_not_ready_in_time_fails_and_frees_its_gpus() -> None:
    h = harness(provision_timeout_s=300)
    workspace = await h.workspaces.request(ADA, spec())
    await h.workspaces.tick()

    h.clock.advance(301)
    await h.workspaces.tick()

    failed = h.store.rows[workspace.workspace_id]
    assert failed.state is WorkspaceState.FAILED
    assert "not ready within 300 s (pulling the image)" in (failed.message or "")
    assert h.backend.made("stop", workspace.workspace_id) == 1
    assert h.store.holding_rows[0].reason is StopReason.BACKEND


async def test_a_backend_that_refuses_to_create_fails_the_environment() -> None:
    h = harness()
    h.backend.refuse_create = ValueError("image is not allowed")
    workspace = await h.workspaces.request(ADA, spec())

    await h.workspaces.tick()

    failed = h.store.rows[workspace.workspace_id]
    assert failed.state is WorkspaceState.FAILED
    assert failed.message == "could not be created (ValueError; see the service log)"


async def test_an_unreachable_backend_is_retried_not_failed() -> None:
    h = harness()
    h.backend.refuse_create = DependencyUnavailableError("API server down")
    workspace = await h.workspaces.request(ADA, spec())

    await h.workspaces.tick()
    assert h.store.state(workspace.workspace_id) is WorkspaceState.PROVISIONING
    h.backend.refuse_create = None
    await h.workspaces.tick()

    assert h.backend.made("create", workspace.workspace_id) == 2
    assert workspace.workspace_id in h.backend.created


async def test_an_environment_the_backend_lost_fails() -> None:
    h = harness()
    workspace_id = await ready_one(h)
    h.backend.failed[workspace_id] = "the pod was evicted"

    await h.workspaces.tick()

    failed = h.store.rows[workspace_id]
    assert (failed.state, failed.message) == (WorkspaceState.FAILED, "the pod was evicted")


async def test_one_environments_broken_check_does_not_stall_the_others() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    broken = await ready_one(h, ttl_s=36000)
    other = await h.workspaces.request(BOB, spec(ttl_s=60))
    await h.ready(other.workspace_id)
    h.backend.broken.add(broken)
    h.clock.advance(60)

    await h.workspaces.tick()

    assert h.store.state(broken) is WorkspaceState.READY
    assert h.store.state(other.workspace_id) is WorkspaceState.STOPPED


async def test_listings_are_newest_first_and_leave_deleted_ones_out() -> None:
    h = harness()
    first = await h.workspaces.request(ADA, spec())
    h.clock.advance(1)
    second = await h.workspaces.request(ADA, spec(gpu_count=0))
    await h.workspaces.delete(first.workspace_id, "ada")

    listed = await h.workspaces.environments("ada")
    everything = await h.workspaces.environments("ada", set(WorkspaceState))

    assert [w.workspace_id for w in listed] == [second.workspace_id]
    assert [w.workspace_id for w in everything] == [second.workspace_id, first.workspace_id]
