import uuid
from datetime import timedelta
from typing import Any

from flywheel_workspaces.policy import Lifetime, Quota

from ..fakes import START, api, harness

BODY: dict[str, Any] = {"image": "ghcr.io/acme/dev:1", "gpu_type": "a100", "gpu_count": 1}


async def test_an_engineer_asks_for_an_environment_and_connects_once_it_is_ready() -> None:
    h = harness()
    async with api(h) as a:
        ada = a.token("ada", "engineer")
        created = await a.client.post("/api/v1/environments", json=BODY, headers=ada)
        assert created.status_code == 202, created.text
        body = created.json()
        assert body["state"] == "provisioning"
        assert body["owner"] == "ada"
        assert body["connection"] is None
        location = created.headers["Location"]
        assert location == f"/api/v1/environments/{body['workspace_id']}"

        await h.ready(uuid.UUID(body["workspace_id"]))
        ready = (await a.client.get(location, headers=ada)).json()

    assert ready["state"] == "ready"
    assert ready["connection"]["url"].startswith("https://ide.test/")
    assert ready["connection"]["token"] == "t0k"
    assert ready["expires_at"] is not None
    assert ready["home_kept"] is False


async def test_a_queued_request_reports_its_place() -> None:
    h = harness()
    async with api(h) as a:
        for subject in ("ada", "bob"):
            await a.client.post(
                "/api/v1/environments",
                json=BODY | {"gpu_count": 1},
                headers=a.token(subject, "engineer"),
            )
        cy = a.token("cy", "engineer")
        queued = await a.client.post("/api/v1/environments", json=BODY, headers=cy)
        listed = await a.client.get("/api/v1/environments", headers=cy)

    assert queued.status_code == 202
    assert (queued.json()["state"], queued.json()["queue_position"]) == ("queued", 1)
    assert [e["queue_position"] for e in listed.json()["environments"]] == [1]


async def test_another_engineers_environment_is_not_found_for_every_action() -> None:
    h = harness()
    async with api(h) as a:
        created = await a.client.post(
            "/api/v1/environments", json=BODY, headers=a.token("ada", "engineer")
        )
        path = f"/api/v1/environments/{created.json()['workspace_id']}"
        bob = a.token("bob", "engineer")
        answers = [
            await a.client.get(path, headers=bob),
            await a.client.delete(path, headers=bob),
            await a.client.post(f"{path}:extend", json={"seconds": 600}, headers=bob),
            await a.client.post(f"{path}:start", headers=bob),
        ]
        listed = await a.client.get("/api/v1/environments", headers=bob)

    assert [r.status_code for r in answers] == [404, 404, 404, 404]
    assert {r.json()["error"]["code"] for r in answers} == {"environment_not_found"}
    assert listed.json() == {"environments": []}


async def test_an_operator_sees_and_deletes_anyones_environment_without_its_token() -> None:
    h = harness()
    async with api(h) as a:
        created = await a.client.post(
            "/api/v1/environments", json=BODY, headers=a.token("ada", "engineer")
        )
        workspace_id = created.json()["workspace_id"]
        await h.ready(uuid.UUID(workspace_id))
        ops = a.token("olga", "operator")
        everyone = await a.client.get("/api/v1/operator/environments", headers=ops)
        only_bob = await a.client.get(
            "/api/v1/operator/environments", params={"owner": "bob"}, headers=ops
        )
        one = await a.client.get(f"/api/v1/operator/environments/{workspace_id}", headers=ops)
        deleted = await a.client.delete(
            f"/api/v1/operator/environments/{workspace_id}", headers=ops
        )
        engineer_route = await a.client.get("/api/v1/environments", headers=ops)

    [seen] = everyone.json()["environments"]
    assert seen["owner"] == "ada"
    assert seen["connection"]["url"] is not None
    assert seen["connection"]["token"] is None
    assert only_bob.json() == {"environments": []}
    assert one.json()["connection"]["token"] is None
    assert (deleted.json()["state"], deleted.json()["stop_reason"]) == ("deleted", "operator")
    assert engineer_route.status_code == 403


async def test_an_engineer_cannot_use_the_operator_routes() -> None:
    async with api(harness()) as a:
        ada = a.token("ada", "engineer")
        answers = [
            await a.client.get("/api/v1/operator/environments", headers=ada),
            await a.client.get("/api/v1/reports/usage", headers=ada),
            await a.client.get("/api/v1/environments", headers=a.token("ada")),
            await a.client.get("/api/v1/environments"),
        ]

    assert [r.status_code for r in answers] == [403, 403, 403, 401]
    assert answers[0].json()["error"]["details"] == {"missing_roles": ["operator"]}


async def test_bad_input_is_refused_naming_the_field() -> None:
    async with api(harness()) as a:
        ada = a.token("ada", "engineer")

        async def post(body: dict[str, Any]) -> dict[str, Any]:
            response = await a.client.post("/api/v1/environments", json=body, headers=ada)
            assert response.status_code == 422, response.text
            error: dict[str, Any] = response.json()["error"]
            return error

        pattern = await post(BODY | {"gpu_type": "A 100"})
        unknown = await post(BODY | {"gpu_type": "h100"})
        too_many = await post(BODY | {"gpu_count": 3})
        mig = await post(BODY | {"mode": "mig"})
        extra = await post(BODY | {"gpus": 1})

    assert (pattern["code"], pattern["details"]["field"]) == ("invalid_input", "gpu_type")
    assert (unknown["code"], unknown["details"]["field"]) == ("unsatisfiable_request", "gpu_type")
    assert "there are no 'h100' GPUs here" in unknown["message"]
    assert too_many["details"]["field"] == "gpu_count"
    assert "mig_profile is required" in mig["message"]
    assert extra["details"]["field"] == "gpus"


async def test_over_quota_is_a_409_naming_the_limit() -> None:
    async with api(harness(quota=Quota(max_gpus=1, max_environments=5))) as a:
        ada = a.token("ada", "engineer")
        await a.client.post("/api/v1/environments", json=BODY, headers=ada)
        refused = await a.client.post("/api/v1/environments", json=BODY, headers=ada)

    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"] == {"limit": "max_gpus", "allowed": 1, "in_use": 1, "requested": 1}


async def test_extend_then_refuse_past_the_cap() -> None:
    h = harness(lifetime=Lifetime(max_ttl_s=3600, max_lifetime_s=4200))
    async with api(h) as a:
        ada = a.token("ada", "engineer")
        created = await a.client.post(
            "/api/v1/environments", json=BODY | {"ttl_s": 3600}, headers=ada
        )
        workspace_id = created.json()["workspace_id"]
        await h.ready(uuid.UUID(workspace_id))
        path = f"/api/v1/environments/{workspace_id}:extend"
        extended = await a.client.post(path, json={"seconds": 3600}, headers=ada)
        refused = await a.client.post(path, json={"seconds": 600}, headers=ada)
        too_short = await a.client.post(path, json={"seconds": 5}, headers=ada)

    assert extended.status_code == 200, extended.text
    assert extended.json()["expires_at"] == (START + timedelta(seconds=4200)).isoformat().replace(
        "+00:00", "Z"
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "extension_refused")
    assert (too_short.status_code, too_short.json()["error"]["details"]["field"]) == (
        422,
        "seconds",
    )


async def test_the_same_idempotency_key_creates_one_environment() -> None:
    async with api(harness()) as a:
        headers = a.token("ada", "engineer") | {"Idempotency-Key": str(uuid.uuid4())}
        first = await a.client.post("/api/v1/environments", json=BODY, headers=headers)
        second = await a.client.post("/api/v1/environments", json=BODY, headers=headers)

    assert first.json()["workspace_id"] == second.json()["workspace_id"]


async def test_the_usage_report_adds_up_gpu_hours_per_engineer_and_kind() -> None:
    h = harness(lifetime=Lifetime(idle_timeout_s=None))
    async with api(h) as a:
        created = await a.client.post(
            "/api/v1/environments",
            json=BODY | {"gpu_count": 2, "ttl_s": 3600},
            headers=a.token("ada", "engineer"),
        )
        await h.ready(uuid.UUID(created.json()["workspace_id"]))
        h.clock.advance(3600)
        await h.workspaces.tick()  # expires: 1 h held on 2 GPUs
        h.clock.advance(1800)
        ops = a.token("olga", "operator")
        window = {
            "since": (START - timedelta(days=1)).isoformat(),
            "until": h.clock.now.isoformat(),
        }
        report = await a.client.get("/api/v1/reports/usage", params=window, headers=ops)
        audit = await a.client.get("/api/v1/reports/holdings", params=window, headers=ops)
        backwards = await a.client.get(
            "/api/v1/reports/usage",
            params={"since": window["until"], "until": window["since"]},
            headers=ops,
        )

    assert report.status_code == 200, report.text
    body = report.json()
    assert body["by_owner"] == {"ada": 2.0}
    assert body["by_gpu_type"] == {"a100": 2.0}
    [row] = body["rows"]
    assert (row["owner"], row["owner_name"], row["held_hours"], row["gpu_hours"]) == (
        "ada",
        "ada",
        1.0,
        2.0,
    )
    [holding] = audit.json()["holdings"]
    assert (holding["owner"], holding["gpu_count"], holding["reason"]) == ("ada", 2, "ttl")
    assert (backwards.status_code, backwards.json()["error"]["details"]["field"]) == (422, "since")


async def test_with_auth_off_everyone_is_anonymous_and_may_do_everything() -> None:
    h = harness()
    async with api(h, auth=False) as a:
        created = await a.client.post("/api/v1/environments", json=BODY)
        listed = await a.client.get("/api/v1/operator/environments")

    assert created.json()["owner"] == "anonymous"
    assert len(listed.json()["environments"]) == 1
