import copy
import json

import pytest

from flywheel_testing.kube import (
    CRD_DIR_ENV,
    ManifestError,
    crd_dir,
    is_builtin,
    load_crd_schemas,
    validate_manifest,
    validate_manifests,
)

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "labels": {"app.kubernetes.io/name": "web"}},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        },
    },
}
CLUSTER_QUEUE = {
    "apiVersion": "kueue.x-k8s.io/v1beta2",
    "kind": "ClusterQueue",
    "metadata": {"name": "team"},
    "spec": {
        "resourceGroups": [
            {
                "coveredResources": ["cpu"],
                "flavors": [{"name": "default", "resources": [{"name": "cpu", "nominalQuota": 8}]}],
            }
        ]
    },
}


@pytest.fixture
def crds():
    directory = crd_dir()
    if not directory.is_dir():
        pytest.skip(f"CRD schemas not found at {directory} (set {CRD_DIR_ENV})")
    return load_crd_schemas(directory)


def _problems(obj, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        validate_manifest(obj, **kwargs)
    return caught.value.problems


def test_a_valid_builtin_passes():
    validate_manifest(DEPLOYMENT)
    assert is_builtin(DEPLOYMENT)


def test_builtin_problems_are_all_reported_strictly():
    bad = copy.deepcopy(DEPLOYMENT)
    bad["spec"]["replicas"] = "two"
    bad["spec"]["template"]["spec"]["containers"][0]["ports"] = "8080"
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}

    problems = _problems(bad)

    assert len(problems) == 3
    assert any("replicas" in p for p in problems)
    assert any("livenesProbe" in p for p in problems)


def test_metadata_is_checked_like_the_api_server():
    bad = copy.deepcopy(DEPLOYMENT)
    bad["metadata"] = {"name": "Web_1", "labels": {"team": "x" * 64, "bad key!": "v"}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "1web"}, "spec": {}}

    assert len(_problems(bad)) == 3
    assert "DNS-1035" in _problems(service)[0]


def test_a_builtin_kind_unknown_to_the_version_is_not_builtin():
    assert not is_builtin({"apiVersion": "apps/v2", "kind": "Deployment"})
    assert not is_builtin({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue"})


def test_a_valid_custom_resource_passes(crds):
    validate_manifest(CLUSTER_QUEUE, crds=crds)
    as_string = copy.deepcopy(CLUSTER_QUEUE)
    resources = as_string["spec"]["resourceGroups"][0]["flavors"][0]["resources"]
    resources[0]["nominalQuota"] = "500m"
    validate_manifest(as_string, crds=crds)


def test_custom_resource_typos_and_bad_values_are_refused(crds):
    bad = copy.deepcopy(CLUSTER_QUEUE)
    bad["spec"]["cohort"] = "v1beta1-spelling"
    bad["spec"]["queueingStrategy"] = "Random"

    problems = _problems(bad, crds=crds)

    assert any("cohort" in p for p in problems)
    assert any("Random" in p for p in problems)


def test_cluster_scoped_custom_resources_carry_no_namespace(crds):
    namespaced = copy.deepcopy(CLUSTER_QUEUE)
    namespaced["metadata"]["namespace"] = "team"

    assert "cluster-scoped" in _problems(namespaced, crds=crds)[0]


def test_deprecated_versions_are_refused_unless_allowed(crds):
    old = copy.deepcopy(CLUSTER_QUEUE) | {"apiVersion": "kueue.x-k8s.io/v1beta1"}

    assert "deprecated" in _problems(old, crds=crds)[0]
    validate_manifest(old, crds=crds, allow_deprecated=True)


def test_unknown_custom_kinds_are_refused(crds):
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    wrong_version = copy.deepcopy(CLUSTER_QUEUE) | {"apiVersion": "kueue.x-k8s.io/v9"}

    assert "no schema" in _problems(unknown, crds=crds)[0]
    assert "v1beta2" in _problems(wrong_version, crds=crds)[0]


def test_manifests_are_checked_together(crds):
    duplicate = copy.deepcopy(DEPLOYMENT)
    broken = copy.deepcopy(DEPLOYMENT) | {"metadata": {"name": "other"}, "spec": {"paused": 1}}

    with pytest.raises(ManifestError) as caught:
        validate_manifests([DEPLOYMENT, None, duplicate, broken, CLUSTER_QUEUE], crds=crds)

    problems = caught.value.problems
    assert any("defined twice" in p for p in problems)
    assert any(p.startswith("Deployment/other") for p in problems)
    assert not any(p.startswith("ClusterQueue") for p in problems)


def test_crd_dir_follows_the_environment(monkeypatch, tmp_path):
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "nullable": True}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    (tmp_path / "example.com_widgets.json").write_text(json.dumps(crd))
    monkeypatch.setenv(CRD_DIR_ENV, str(tmp_path))
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}

    assert crd_dir() == tmp_path
    validate_manifest(widget | {"spec": {"size": None}}, crds=load_crd_schemas())
    assert "size" in _problems(widget | {"spec": {"size": "big"}}, crds=load_crd_schemas())[0]
    with pytest.raises(FileNotFoundError):
        load_crd_schemas(tmp_path / "missing")
