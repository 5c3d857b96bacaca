"""Where a Kubernetes training run goes: a pure policy, no I/O, no clock.

The options are every (cluster, Kueue flavor) pair the settings list, each with the queue delay
measured for its cluster just before the launch. The rules:

* an option is usable when its cluster answered, its flavor's cost class is within the run's
  budget, and it is a private pool, or a public one and the run is ``burstable``;
* the run should start within its *tolerable wait*: its deadline less the expected run time,
  or, without a deadline, ``burst_after_s`` (how long a run may queue in a private pool before
  bursting is worth paying for);
* private pools first: the private option that starts in time soonest (settings order breaks
  ties); failing that, a public burst: the cheapest public option that starts in time, then
  the soonest; failing both, the usable option that starts soonest, private before public,
  cheaper before dearer, marked as not on time;
* nothing usable: no placement (the launch fails, or is retried when clusters did not answer).

The inputs and the decision are recorded on the run (in its handle), so anyone can see why a
run went where it went.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class Pool(StrEnum):
    PRIVATE = "private"
    """Capacity already paid for (own GPUs, reserved instances): use first."""
    PUBLIC = "public"
    """Capacity paid per use (cloud burst): only for burstable runs that need it."""


class Budget(StrEnum):
    """Cost classes, cheapest first; a run may use a flavor whose class is at most its own."""

    LOW = "low"
    STANDARD = "standard"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return list(Budget).index(self)


class PlacementRequest(BaseModel):
    """What the run asks for."""

    model_config = ConfigDict(frozen=True)

    burstable: bool
    budget: Budget
    deadline_s: float | None = Field(default=None, gt=0)
    """Seconds from now by which the run should be done; None: no deadline."""
    expected_run_s: float = Field(gt=0)
    burst_after_s: float = Field(ge=0)
    """Without a deadline: the longest private queue wait before bursting is worth it."""

    @property
    def tolerable_wait_s(self) -> float:
        if self.deadline_s is None:
            return self.burst_after_s
        return self.deadline_s - self.expected_run_s


class PlacementOption(BaseModel):
    """One cluster and Kueue flavor, as measured for this launch."""

    model_config = ConfigDict(frozen=True)

    cluster: str
    flavor: str
    pool: Pool
    cost: Budget
    queue_delay_s: float | None
    """Estimated wait for admission; None when it could not be measured."""
    unavailable: str | None = None
    """Why the option cannot be used now (cluster did not answer, queue missing)."""


class Placement(BaseModel):
    """The decision."""

    model_config = ConfigDict(frozen=True)

    cluster: str
    flavor: str
    pool: Pool
    queue_delay_s: float
    on_time: bool
    """The run should start within its tolerable wait."""
    reason: str


def queue_delay(pending: int, admitted: int, slots: int, expected_run_s: float) -> float:
    """A rough wait for admission: the runs ahead of ours, spread over the queue's slots."""
    ahead = pending + admitted - slots + 1
    if ahead <= 0:
        return 0.0
    return ahead * expected_run_s / max(1, slots)


def place(request: PlacementRequest, options: Sequence[PlacementOption]) -> Placement | None:
    """The cluster and flavor for a run, or None when no option is usable."""
    usable = [
        (index, option)
        for index, option in enumerate(options)
        if option.unavailable is None
        and option.queue_delay_s is not None
        and option.cost.rank <= request.budget.rank
        and (option.pool is Pool.PRIVATE or request.burstable)
    ]
    if not usable:
        return None
    wait = request.tolerable_wait_s
    in_time = [(i, o) for i, o in usable if _delay(o) <= wait]
    private = sorted(
        ((i, o) for i, o in in_time if o.pool is Pool.PRIVATE), key=lambda p: (_delay(p[1]), p[0])
    )
    if private:
        return _decide(private[0][1], on_time=True, reason="private pool starts in time")
    public = sorted(
        (p for p in in_time if p[1].pool is Pool.PUBLIC),
        key=lambda p: (p[1].cost.rank, _delay(p[1]), p[0]),
    )
    if public:
        return _decide(
            public[0][1],
            on_time=True,
            reason=f"burst: no private pool starts within {wait:.0f}s",
        )
    soonest = min(
        usable,
        key=lambda p: (_delay(p[1]), p[1].pool is Pool.PUBLIC, p[1].cost.rank, p[0]),
    )
    return _decide(
        soonest[1], on_time=False, reason=f"no option starts within {wait:.0f}s: the soonest"
    )


def _delay(option: PlacementOption) -> float:
    return option.queue_delay_s if option.queue_delay_s is not None else float("inf")


def _decide(option: PlacementOption, *, on_time: bool, reason: str) -> Placement:
    return Placement(
        cluster=option.cluster,
        flavor=option.flavor,
        pool=option.pool,
        queue_delay_s=_delay(option),
        on_time=on_time,
        reason=reason,
    )
