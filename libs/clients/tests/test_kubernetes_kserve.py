from typing import Any

import pytest

from flywheel_clients.kubernetes import MERGE_PATCH, KubeConnection
from flywheel_clients.kubernetes_kserve import (
    DEPLOYMENT_MODE,
    INFERENCE_SERVICE,
    MODEL_VERSION,
    PREVIOUS_MODEL_VERSION,
    PREVIOUS_STORAGE_URI,
    InferenceServiceSpec,
    KServeCanary,
    TrafficTarget,
    inference_service,
    service_status,
)
from flywheel_runtime.errors import InvalidInputError, NotFoundError
from flywheel_testing.kube import CrdSchema, load_crd_schemas, validate_manifest
from flywheel_testing.kubeapi import KubeApiServer

NAMESPACE = "serving"
NAME = "digits"
PATH = INFERENCE_SERVICE.path(NAMESPACE, NAME)
V1 = "s3://flywheel-models/triton/digits/v1/"
V2 = "s3://flywheel-models/triton/digits/v2/"
SPEC = InferenceServiceSpec(
    name=NAME,
    namespace=NAMESPACE,
    storage_uri=V1,
    runtime="kserve-tritonserver",
    service_account="flywheel-serving",
    model_version="1",
)


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], CrdSchema]:
    try:
        return load_crd_schemas()
    except FileNotFoundError as error:
        pytest.skip(f"CRD checks skipped: {error}")


@pytest.fixture
def canary(kube_api: KubeApiServer) -> KServeCanary:
    return KServeCanary.connect(KubeConnection(host=kube_api.url), namespace=NAMESPACE, name=NAME)


def _kserve_reports(
    kube_api: KubeApiServer,
    *,
    latest: str,
    rolled_out: str,
    traffic: list[tuple[str, int]],
    ready: bool = True,
) -> None:
    """Play KServe's controller: what it reports once it has reconciled the spec."""
    obj = kube_api.get(PATH)
    assert obj is not None
    kube_api.set_status(
        PATH,
        {
            "observedGeneration": obj["metadata"]["generation"],
            "url": f"http://{NAME}.{NAMESPACE}.example.com",
            "conditions": [
                {"type": "PredictorReady", "status": "True"},
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    **({} if ready else {"message": "Revision missing"}),
                },
            ],
            "components": {
                "predictor": {
                    "latestCreatedRevision": latest,
                    "latestReadyRevision": latest if ready else rolled_out,
                    "latestRolledoutRevision": rolled_out,
                    "traffic": [
                        {"revisionName": r, "percent": p, "latestRevision": r == latest}
                        for r, p in traffic
                    ],
                }
            },
        },
    )


def _predictor(kube_api: KubeApiServer) -> dict[str, Any]:
    obj = kube_api.get(PATH)
    assert obj is not None
    predictor: dict[str, Any] = obj["spec"]["predictor"]
    return predictor


def _annotations(kube_api: KubeApiServer) -> dict[str, str]:
    obj = kube_api.get(PATH)
    assert obj is not None
    annotations: dict[str, str] = obj["metadata"].get("annotations", {})
    return annotations


@pytest.mark.parametrize("model_format", ["triton", "onnx"])
def test_the_inference_service_passes_the_kserve_crd_schema(
    crds: dict[tuple[str, str], CrdSchema], model_format: str
) -> None:
    spec = SPEC.model_copy(update={"model_format": model_format, "gpus": 1, "max_replicas": 3})

    validate_manifest(inference_service(spec), crds=crds)
    validate_manifest(inference_service(spec, canary_percent=10), crds=crds)


def test_the_inference_service_serves_the_model_repository_over_v2() -> None:
    obj = inference_service(SPEC)

    predictor = obj["spec"]["predictor"]
    assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
    assert predictor["model"]["modelFormat"] == {"name": "triton"}
    assert predictor["model"]["storageUri"] == V1
    assert predictor["model"]["protocolVersion"] == "v2"
    assert predictor["model"]["runtime"] == "kserve-tritonserver"
    assert predictor["serviceAccountName"] == "flywheel-serving"
    assert "canaryTrafficPercent" not in predictor
    assert obj["metadata"]["annotations"][DEPLOYMENT_MODE] == "Serverless"
    assert obj["metadata"]["annotations"][MODEL_VERSION] == "1"


async def test_a_canary_takes_a_share_then_everything(
    canary: KServeCanary, kube_api: KubeApiServer
) -> None:
    await canary.deploy(SPEC)
    _kserve_reports(
        kube_api, latest="digits-00001", rolled_out="digits-00001", traffic=[("digits-00001", 100)]
    )
    assert (await canary.status()).rolled_out

    started = await canary.start(V2, 10, model_version="2")
    assert started.canary_percent == 10
    assert not started.up_to_date  # KServe has not seen the change yet
    assert _predictor(kube_api)["model"]["storageUri"] == V2
    assert _annotations(kube_api)[PREVIOUS_STORAGE_URI] == V1
    assert _annotations(kube_api)[PREVIOUS_MODEL_VERSION] == "1"
    assert _annotations(kube_api)[MODEL_VERSION] == "2"

    _kserve_reports(
        kube_api,
        latest="digits-00002",
        rolled_out="digits-00001",
        traffic=[("digits-00001", 90), ("digits-00002", 10)],
    )
    split = await canary.status()
    assert split.newest_ready
    assert split.canary_traffic == 10
    assert split.latest_rolledout_revision == "digits-00001"

    stepped = await canary.set_traffic(50)
    assert stepped.canary_percent == 50

    promoted = await canary.promote(V2)
    assert promoted.canary_percent is None
    assert "canaryTrafficPercent" not in _predictor(kube_api)
    assert _predictor(kube_api)["model"]["storageUri"] == V2
    assert PREVIOUS_STORAGE_URI not in _annotations(kube_api)
    _kserve_reports(
        kube_api, latest="digits-00002", rolled_out="digits-00002", traffic=[("digits-00002", 100)]
    )
    assert (await canary.status()).rolled_out
    assert {r.content_type for r in kube_api.requests_to("PATCH")} == {MERGE_PATCH}


async def test_a_rollback_pins_the_traffic_and_restores_the_previous_model(
    canary: KServeCanary, kube_api: KubeApiServer
) -> None:
    await canary.deploy(SPEC)
    await canary.start(V2, 10, model_version="2")

    rolled_back = await canary.rollback()

    assert rolled_back.canary_percent == 0
    assert rolled_back.storage_uri == V1
    assert rolled_back.model_version == "1"
    assert PREVIOUS_STORAGE_URI not in _annotations(kube_api)
    _kserve_reports(
        kube_api,
        latest="digits-00003",
        rolled_out="digits-00001",
        traffic=[("digits-00001", 100), ("digits-00003", 0)],
    )
    assert (await canary.status()).canary_traffic == 0


async def test_starting_the_same_canary_again_only_moves_its_share(
    canary: KServeCanary, kube_api: KubeApiServer
) -> None:
    await canary.deploy(SPEC)
    await canary.start(V2, 10, model_version="2")

    again = await canary.start(V2, 25)

    assert again.canary_percent == 25
    assert again.previous_storage_uri == V1
    last = kube_api.requests_to("PATCH")[-1].body
    assert "model" not in last["spec"]["predictor"]


async def test_a_canary_started_over_a_canary_still_rolls_back_to_the_stable_model(
    canary: KServeCanary,
) -> None:
    v3 = "s3://flywheel-models/triton/digits/v3/"
    await canary.deploy(SPEC)
    await canary.start(V2, 10, model_version="2")

    replaced = await canary.start(v3, 10, model_version="3")
    rolled_back = await canary.rollback()

    assert replaced.previous_storage_uri == V1
    assert replaced.previous_model_version == "1"
    assert rolled_back.storage_uri == V1


async def test_start_writes_only_over_the_version_it_read(
    canary: KServeCanary, kube_api: KubeApiServer
) -> None:
    deployed = await canary.deploy(SPEC)
    read = kube_api.get(PATH)
    assert read is not None

    await canary.start(V2, 10)

    patch = kube_api.requests_to("PATCH")[-1].body
    assert patch["metadata"]["resourceVersion"] == read["metadata"]["resourceVersion"]
    assert deployed.storage_uri == V1


async def test_deploy_twice_keeps_one_service(
    canary: KServeCanary, kube_api: KubeApiServer
) -> None:
    first = await canary.deploy(SPEC)
    second = await canary.deploy(SPEC)

    assert first == second
    assert len(kube_api.objects(INFERENCE_SERVICE.path(NAMESPACE))) == 1


async def test_traffic_is_a_percentage(canary: KServeCanary) -> None:
    await canary.deploy(SPEC)

    with pytest.raises(InvalidInputError):
        await canary.set_traffic(101)
    with pytest.raises(InvalidInputError):
        await canary.start(V2, -1)


async def test_a_missing_service_is_not_found(canary: KServeCanary) -> None:
    with pytest.raises(NotFoundError):
        await canary.status()
    with pytest.raises(NotFoundError, match="deploy it first"):
        await canary.start(V2, 10)


async def test_deploy_refuses_a_spec_for_another_service(canary: KServeCanary) -> None:
    with pytest.raises(InvalidInputError):
        await canary.deploy(SPEC.model_copy(update={"name": "other"}))


def test_status_reads_what_kserve_reports() -> None:
    obj = {
        "metadata": {"name": NAME, "namespace": NAMESPACE, "generation": 4},
        "spec": {
            "predictor": {"canaryTrafficPercent": 20, "model": {"storageUri": V2}},
        },
        "status": {
            "observedGeneration": 4,
            "url": "http://digits.serving.example.com",
            "conditions": [{"type": "Ready", "status": "True"}],
            "components": {
                "predictor": {
                    "latestCreatedRevision": "digits-predictor-00004",
                    "latestReadyRevision": "digits-predictor-00004",
                    "latestRolledoutRevision": "digits-predictor-00002",
                    "previousRolledoutRevision": "digits-predictor-00001",
                    "traffic": [
                        {
                            "revisionName": "digits-predictor-00004",
                            "percent": 20,
                            "latestRevision": True,
                            "tag": "latest",
                        },
                        {
                            "revisionName": "digits-predictor-00002",
                            "percent": 80,
                            "latestRevision": False,
                            "tag": "prev",
                        },
                    ],
                }
            },
        },
    }

    status = service_status(obj)

    assert status.ready
    assert status.up_to_date
    assert status.newest_ready
    assert status.canary_percent == 20
    assert status.canary_traffic == 20
    assert not status.rolled_out
    assert status.previous_rolledout_revision == "digits-predictor-00001"
    assert status.traffic[0] == TrafficTarget(
        revision="digits-predictor-00004", percent=20, latest=True, tag="latest"
    )


def test_a_service_not_ready_says_why() -> None:
    status = service_status(
        {
            "metadata": {"name": NAME, "generation": 2},
            "spec": {"predictor": {"model": {"storageUri": V1}}},
            "status": {
                "observedGeneration": 1,
                "conditions": [{"type": "Ready", "status": "False", "message": "pulling"}],
            },
        }
    )

    assert not status.ready
    assert status.message == "pulling"
    assert not status.up_to_date
    assert status.canary_traffic == 0
