"""deploy/kubernetes/ validates against the Kubernetes schemas (kubernetes-validate ships them, so
this works offline) and wires probes, drain, security and the shipped config the way the gateway
expects."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from gateway.settings import load_config_file
from tests.helpers import one_service, running_gateway

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes we target (preStop exec, autoscaling/v2 and policy/v1 are all GA there)
# and the newest schemas the package ships.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


DOCS = documents()


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in DOCS if d["kind"] == kind}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates_strictly(doc: dict[str, Any], version: str) -> None:
    # strict: unknown fields (typos such as `readinessprobe`) are errors too.
    kubernetes_validate.validate(doc, version, strict=True)


def test_every_required_kind_is_there() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in DOCS}
    assert {
        ("Deployment", "gateway"),
        ("Deployment", "intelligence"),
        ("Service", "gateway"),
        ("Service", "intelligence"),
        ("ConfigMap", "gateway-config"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("Job", "intelligence-migrate"),
    } <= kinds


@pytest.mark.parametrize(
    ("name", "liveness", "readiness"),
    [("gateway", "/health", "/health/ready"), ("intelligence", "/health", "/health")],
)
def test_deployments_probe_drain_and_run_as_non_root(name: str, liveness: str, readiness: str) -> None:
    deployment = by_kind("Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == liveness
    assert container["readinessProbe"]["httpGet"]["path"] == readiness
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env.get("GATEWAY_SHUTDOWN_TIMEOUT", "30"))
    assert pod["terminationGracePeriodSeconds"] > sleep + drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_services_hpa_and_pdbs_select_the_pods() -> None:
    deployments = by_kind("Deployment")
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in by_kind(kind).items():
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{kind}/{name}"
    target = by_kind("HorizontalPodAutoscaler")["gateway"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    assert (
        by_kind("PodDisruptionBudget")["gateway"]["spec"]["minAvailable"]
        < by_kind("HorizontalPodAutoscaler")["gateway"]["spec"]["minReplicas"]
    )


def test_shipped_gateway_config_is_valid_and_mounted(tmp_path: Path) -> None:
    config = by_kind("ConfigMap")["gateway-config"]["data"]["gateway.yaml"]
    path = tmp_path / "gateway.yaml"
    path.write_text(config)
    services, routes = load_config_file(str(path))  # raises SettingsError on a bad file
    assert "intelligence-engine" in services  # /health/detailed reaches PostgreSQL through it
    assert services["intelligence-engine"].urls == ("http://intelligence:8081",)
    assert {r.prefix for r in routes} >= {"/api/v1/clusters", "/api/v1/chat", "/ws"}
    pod = by_kind("Deployment")["gateway"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert env["GATEWAY_CONFIG"] == f"{mount['mountPath']}/gateway.yaml"


def test_migration_job_runs_migrate() -> None:
    job = by_kind("Job")["intelligence-migrate"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][-3:] == ["-m", "intelligence", "migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def _env(deployment: str) -> dict[str, str | None]:
    (container,) = by_kind("Deployment")[deployment]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize(
    ("deployment", "key"), [("gateway", "GATEWAY_HOST"), ("intelligence", "INTELLIGENCE_HOST")]
)
def test_the_image_and_the_deployments_listen_on_both_families(deployment: str, key: str) -> None:
    """0.0.0.0 takes IPv4 only: on an IPv6-only (or IPv6-first) cluster the pod's address is
    IPv6, and the kubelet's probes and the Service's traffic were refused."""
    assert _env(deployment)[key] == "::"
    image_env = dict(re.findall(r"^\s*([A-Z_]+)=(\S+?)(?:\s*\\)?$", (ROOT / "Dockerfile").read_text(), re.M))
    assert image_env[key] == "::"
    assert by_kind("Service")["gateway"]["spec"]["ipFamilyPolicy"] == "PreferDualStack"


async def test_the_deployments_listen_address_takes_ipv4_and_ipv6_clients(
    make_upstream: Any, tmp_path: Path
) -> None:
    upstream = await make_upstream()
    host = _env("gateway")["GATEWAY_HOST"]
    assert host is not None
    async with running_gateway(one_service(upstream.url), tmp_path, host=host) as gateway:
        async with aiohttp.ClientSession() as session:
            for address in ("127.0.0.1", "::1"):  # a pod's IPv4 and IPv6 addresses, on loopback
                async with session.get(f"{gateway.url_at(address)}/health/ready") as response:
                    assert response.status == 200
