import uuid
from datetime import timedelta

import pytest

from flywheel_workspaces import policy
from flywheel_workspaces.errors import (
    ExtensionRefusedError,
    QuotaExceededError,
    UnsatisfiableRequestError,
)
from flywheel_workspaces.policy import Lifetime, Quota
from flywheel_workspaces.ports import (
    AllocationMode,
    Holding,
    StopReason,
    Workspace,
    WorkspaceState,
)

from ..fakes import START, spec

CAPACITY = {"a100": 2, "a100/mig-1g.10gb": 7, "t4/time-sliced": 8}


def env(
    owner: str = "ada",
    state: WorkspaceState = WorkspaceState.QUEUED,
    minute: int = 0,
    **spec_changes: object,
) -> Workspace:
    at = START + timedelta(minutes=minute)
    return Workspace(
        workspace_id=uuid.uuid4(),
        owner=owner,
        spec=spec(**spec_changes),  # type: ignore[arg-type]
        state=state,
        requested_at=at,
        queued_at=at,
    )


def test_each_kind_and_way_of_sharing_is_its_own_pool() -> None:
    assert policy.pool_of(spec()) == "a100"
    assert policy.pool_of(spec(mode=AllocationMode.MIG, mig_profile="1g.10gb")) == (
        "a100/mig-1g.10gb"
    )
    assert policy.pool_of(spec("t4", mode=AllocationMode.TIME_SLICED)) == "t4/time-sliced"
    assert policy.pool_of(spec("t4", mode=AllocationMode.MPS)) == "t4/mps"
    assert policy.pool_of(spec(gpu_count=0)) == "cpu"


def test_an_unknown_gpu_kind_is_refused_naming_the_field_and_the_known_kinds() -> None:
    with pytest.raises(UnsatisfiableRequestError) as refused:
        policy.check_satisfiable(spec("h100"), CAPACITY)

    assert refused.value.details["field"] == "gpu_type"
    assert refused.value.details["kinds"] == ["a100", "t4"]
    assert refused.value.http_status == 422


def test_a_kind_not_offered_in_that_mode_is_refused_naming_the_mode() -> None:
    with pytest.raises(UnsatisfiableRequestError) as refused:
        policy.check_satisfiable(spec("t4", mode=AllocationMode.MPS), CAPACITY)

    assert refused.value.details == {
        "field": "mode",
        "pool": "t4/mps",
        "pools": ["t4/time-sliced"],
    }


def test_more_gpus_than_the_pool_has_in_all_could_never_start() -> None:
    with pytest.raises(UnsatisfiableRequestError, match="has 2 in all") as refused:
        policy.check_satisfiable(spec(gpu_count=3), CAPACITY)

    assert refused.value.details["field"] == "gpu_count"
    policy.check_satisfiable(spec(gpu_count=2), CAPACITY)
    policy.check_satisfiable(spec("h100", gpu_count=0), CAPACITY)  # CPU only: no pool


def test_quota_refuses_one_environment_too_many_naming_the_limit() -> None:
    owned = [env(), env(state=WorkspaceState.READY), env(state=WorkspaceState.STOPPED)]

    with pytest.raises(QuotaExceededError, match="max_environments is 2") as refused:
        policy.check_quota(owned, spec(), Quota(max_gpus=8, max_environments=2), owner="ada")

    assert refused.value.details == {
        "limit": "max_environments",
        "allowed": 2,
        "in_use": 2,
        "requested": 1,
    }
    assert refused.value.http_status == 409


def test_quota_counts_queued_gpus_and_only_the_owners() -> None:
    owned = [
        env(gpu_count=1),
        env(state=WorkspaceState.READY, gpu_count=1),
        env("bob", gpu_count=2),
    ]

    with pytest.raises(QuotaExceededError, match="max_gpus 3") as refused:
        policy.check_quota(
            owned, spec(gpu_count=2), Quota(max_gpus=3, max_environments=3), owner="ada"
        )

    assert refused.value.details == {
        "limit": "max_gpus",
        "allowed": 3,
        "in_use": 2,
        "requested": 2,
    }
    policy.check_quota(owned, spec(gpu_count=1), Quota(max_gpus=3, max_environments=3), owner="ada")


def test_admission_serves_each_pool_first_come_first_served_and_a_misfit_blocks_its_pool() -> None:
    holding = env("ada", WorkspaceState.READY, minute=0)
    big = env("bob", minute=1, gpu_count=2)  # does not fit: 1 of 2 free
    small = env("cy", minute=2)  # would fit, but waits behind big
    slice_ = env("dee", minute=3, mode=AllocationMode.MIG, mig_profile="1g.10gb")
    cpu = env("eve", minute=4, gpu_count=0)

    admitted = policy.admit([small, cpu, slice_, big, holding], CAPACITY)

    assert [w.owner for w in admitted] == ["dee", "eve"]
    assert policy.queue_positions([small, cpu, slice_, big, holding]) == {
        big.workspace_id: 1,
        small.workspace_id: 2,
        slice_.workspace_id: 1,
        cpu.workspace_id: 1,
    }


def test_admission_hands_freed_gpus_to_the_oldest_requests() -> None:
    first, second, third = (env(o, minute=m) for m, o in enumerate(("bob", "cy", "dee")))

    assert policy.admit([third, second, first], CAPACITY) == [first, second]


def test_the_ttl_is_cut_to_the_cap() -> None:
    lifetime = Lifetime(max_ttl_s=3600, max_lifetime_s=7200)

    assert policy.capped_ttl(600, lifetime) == 600
    assert policy.capped_ttl(86400, lifetime) == 3600


def test_extensions_grant_up_to_the_lifetime_then_refuse() -> None:
    lifetime = Lifetime(max_ttl_s=3600, max_lifetime_s=5400, max_extensions=5)
    workspace = env(state=WorkspaceState.READY, ttl_s=3600)

    assert policy.extension(workspace, 1200, lifetime) == 1200
    workspace.extended_s, workspace.extensions = 1200, 1
    assert policy.extension(workspace, 1200, lifetime) == 600  # only what is left
    workspace.extended_s, workspace.extensions = 1800, 2
    with pytest.raises(ExtensionRefusedError, match="max_lifetime_s") as refused:
        policy.extension(workspace, 60, lifetime)
    assert refused.value.details["limit"] == "max_lifetime_s"


def test_extensions_are_counted() -> None:
    workspace = env(state=WorkspaceState.READY, ttl_s=600)
    workspace.extensions = 2

    with pytest.raises(ExtensionRefusedError, match="max_extensions 2"):
        policy.extension(workspace, 60, Lifetime(max_extensions=2))


def test_a_ready_environment_stops_at_its_ttl_before_it_counts_as_idle() -> None:
    workspace = env(state=WorkspaceState.READY, ttl_s=3600)
    workspace.ready_at = START
    workspace.expires_at = policy.expiry(workspace, START)

    assert policy.shutdown_reason(workspace, START + timedelta(seconds=3599), 7200) is None
    assert policy.shutdown_reason(workspace, START + timedelta(seconds=3600), 60) is StopReason.TTL


def test_idle_counts_from_the_last_activity_or_from_readiness() -> None:
    workspace = env(state=WorkspaceState.READY, ttl_s=86400)
    workspace.ready_at = START
    workspace.expires_at = policy.expiry(workspace, START)

    assert policy.shutdown_reason(workspace, START + timedelta(seconds=1799), 1800) is None
    assert policy.shutdown_reason(workspace, START + timedelta(seconds=1800), 1800) is (
        StopReason.IDLE
    )
    workspace.last_activity_at = START + timedelta(seconds=1000)
    assert policy.shutdown_reason(workspace, START + timedelta(seconds=2799), 1800) is None
    assert policy.shutdown_reason(workspace, START + timedelta(seconds=2800), 1800) is (
        StopReason.IDLE
    )
    assert policy.shutdown_reason(workspace, START + timedelta(days=1, seconds=-1), None) is None


def holding(owner: str, gpu_type: str, gpus: int, start_h: float, end_h: float | None) -> Holding:
    return Holding(
        workspace_id=uuid.uuid4(),
        owner=owner,
        gpu_type=gpu_type,
        gpu_count=gpus,
        mode=AllocationMode.FULL,
        started_at=START + timedelta(hours=start_h),
        ended_at=None if end_h is None else START + timedelta(hours=end_h),
    )


def test_usage_adds_gpu_hours_clipped_to_the_window_open_holdings_up_to_now() -> None:
    holdings = [
        holding("ada", "a100", 2, -1, 3),  # 3 h inside [0, 10) x 2 GPUs = 6
        holding("ada", "a100", 1, 9, 12),  # 1 h inside x 1 = 1
        holding("ada", "h100", 4, 2, 2.5),  # 0.5 h x 4 = 2
        holding("bob", "a100", 1, 8, None),  # open: runs to now (h 9) = 1
        holding("bob", "a100", 1, -5, -1),  # before the window: nothing
    ]
    since, until, now = START, START + timedelta(hours=10), START + timedelta(hours=9)

    report = policy.usage_report(holdings, since, until, now)

    assert report.by_owner == {"ada": 9.0, "bob": 1.0}
    assert report.by_gpu_type == {"a100": 8.0, "h100": 2.0}
    assert report.total_gpu_hours == 10.0
    rows = {(r.owner, r.gpu_type): (r.environments, r.held_hours, r.gpu_hours) for r in report.rows}
    assert rows == {
        ("ada", "a100"): (2, 4.0, 7.0),
        ("ada", "h100"): (1, 0.5, 2.0),
        ("bob", "a100"): (1, 1.0, 1.0),
    }
    assert [r.gpu_hours for r in report.rows] == [7.0, 2.0, 1.0]
