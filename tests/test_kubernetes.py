"""``deploy/kubernetes``: the manifests hold together and match the app (no cluster needed).

A schema check of what they use (kinds, required fields, types), then the cross-references a
typo would break silently: selectors and labels, the Service's target port, the PVC the pod
mounts, probe paths that are the app's health routes, the jobs directory on the volume, the
image's user, a grace period above the shutdown timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="the manifest check reads YAML (pyyaml, in the dev extra)")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"

SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {  # kind -> dotted path -> type
    "Deployment": {
        "apiVersion": str,
        "metadata.name": str,
        "spec.replicas": int,
        "spec.selector.matchLabels": dict,
        "spec.template.metadata.labels": dict,
        "spec.template.spec.containers": list,
        "spec.template.spec.volumes": list,
        "spec.template.spec.securityContext.runAsUser": int,
        "spec.template.spec.terminationGracePeriodSeconds": int,
    },
    "Service": {"apiVersion": str, "metadata.name": str, "spec.selector": dict, "spec.ports": list},
    "PersistentVolumeClaim": {
        "apiVersion": str,
        "metadata.name": str,
        "spec.accessModes": list,
        "spec.resources.requests.storage": str,
    },
    "Kustomization": {"apiVersion": str, "resources": list},
}
API = {"Deployment": "apps/v1", "Service": "v1", "PersistentVolumeClaim": "v1"}


def get(doc: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        assert isinstance(doc, dict) and key in doc, f"missing {dotted}"
        doc = doc[key]
    return doc


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_every_manifest_has_the_fields_of_its_kind(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == set(SCHEMA)
    for kind, fields in SCHEMA.items():
        for dotted, typ in fields.items():
            assert isinstance(get(manifests[kind], dotted), typ), (kind, dotted)
        if kind in API:
            assert manifests[kind]["apiVersion"] == API[kind], kind
    listed = set(manifests["Kustomization"]["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_pieces_refer_to_one_another_and_to_the_app(manifests: dict[str, dict[str, Any]]) -> None:
    from service.app import create_app
    from service.settings import Settings

    dep, svc, pvc = manifests["Deployment"], manifests["Service"], manifests["PersistentVolumeClaim"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}  # the image's UNET_PORT
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    env = {e["name"]: e["value"] for e in container["env"]}
    Settings(**{k.removeprefix("UNET_").lower(): v for k, v in env.items()})  # every value is a valid setting
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims == {"jobs": pvc["metadata"]["name"]} and mounts["jobs"] == env["UNET_JOBS_DIR"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and env["UNET_DEVICE"] == "cuda"
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["fsGroup"] == 10001
    assert pod["terminationGracePeriodSeconds"] > float(env["UNET_SHUTDOWN_TIMEOUT_S"])
    routes = set(create_app(Settings()).openapi()["paths"])
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["path"] for p in probes.values()} <= routes and all(p["port"] == "http" for p in probes.values())
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # the model loads before the port opens
