"""The Kubernetes example (etc/fleet/k8s/): validated offline, consistent, never applied here.

kubernetes-validate ships the Kubernetes JSON schemas, so this runs without a
cluster or a network. Beyond the schemas: each box's llmux.toml loads with llmuxd's
own config loader, its ports match the container's, the control socket stays in
the pod, the probes are on /health, the Services select the pods, and the
router's haproxy.cfg is the generator's output and passes ``haproxy -c``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llmuxd.config import load_config

from .fleet_kit import needs
from .k8s_haproxy import manifest

TOP = Path(__file__).resolve().parents[2]
K8S = TOP / "etc/fleet/k8s"
VERSIONS = ["1.29.0", "1.37.0"]


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kinds(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in documents() if d["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    docs = documents()
    assert {d["kind"] for _, d in docs} == {"Namespace", "ConfigMap", "Deployment", "Service"}
    for name, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "llmux", name


def test_the_validator_rejects_a_broken_manifest() -> None:
    doc = next(d for d in kinds("Deployment") if d["metadata"]["name"] == "llmux-gpu-node-1")
    broken = {**doc, "spec": {**doc["spec"], "replicas": "one"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    unknown = {**doc, "spec": {**doc["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, VERSIONS[-1], strict=True)


def llmux_boxes() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, its ConfigMap) for every llmux box."""
    maps = {m["metadata"]["name"]: m for m in kinds("ConfigMap")}
    out = []
    for dep in kinds("Deployment"):
        if dep["metadata"]["name"].startswith("llmux-gpu-"):
            volumes = dep["spec"]["template"]["spec"]["volumes"]
            cm = next(v["configMap"]["name"] for v in volumes if v["name"] == "config")
            out.append((dep, maps[cm]))
    return out


def test_each_box_config_loads_and_matches_its_pod(tmp_path: Path) -> None:
    boxes = llmux_boxes()
    assert len(boxes) == 2
    for dep, cm in boxes:
        path = tmp_path / f"{dep['metadata']['name']}.toml"
        path.write_text(cm["data"]["llmux.toml"])
        config = load_config(path)
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": config.port, "metrics": config.metrics_port}
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert dep["spec"]["strategy"]["type"] == "Recreate"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        # The control socket lives in a pod-private emptyDir; no port or volume exposes it.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        socket_dir = str(Path(config.daemon.socket).parent)
        run_volume = next(v for v in pod["volumes"] if v["name"] == mounts[socket_dir])
        assert run_volume == {"name": mounts[socket_dir], "emptyDir": {}}


def test_services_select_their_pods() -> None:
    deployments = kinds("Deployment")
    for svc in kinds("Service"):
        selector = svc["spec"]["selector"]
        matched = [d for d in deployments
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, svc["metadata"]["name"]
        ports = {p["name"] for p in matched[0]["spec"]["template"]["spec"]["containers"][0]
                 ["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_the_router_config_is_the_generators_output_for_these_boxes() -> None:
    text = manifest()
    if os.environ.get("LLMUX_REGEN"):
        (K8S / "haproxy.yaml").write_text(text)
    assert (K8S / "haproxy.yaml").read_text() == text, "regenerate: LLMUX_REGEN=1 pytest"
    cfg = next(m for m in kinds("ConfigMap") if m["metadata"]["name"] == "llmux-haproxy")
    hosted = {}
    for dep, cm in llmux_boxes():
        names = set(re.findall(r"^\[models\.([^\]]+)\]", cm["data"]["llmux.toml"], re.M))
        hosted[dep["metadata"]["name"]] = names
    for box, names in hosted.items():
        for name in names:
            assert re.search(rf"^    server box\d {box}\.llmux\.svc\.cluster\.local:3000 check$",
                             cfg["data"]["haproxy.cfg"], re.M), (box, name)
            assert f"uri /v1/models/{name}/ready" in cfg["data"]["haproxy.cfg"]


@needs("haproxy", "haproxy")
def test_haproxy_accepts_the_router_config(tmp_path: Path) -> None:
    cfg = next(m for m in kinds("ConfigMap") if m["metadata"]["name"] == "llmux-haproxy")
    # Service names resolve only in the cluster: check the rest with loopback addresses.
    text = re.sub(r"llmux-gpu-node-\d\.llmux\.svc\.cluster\.local", "127.0.0.1",
                  cfg["data"]["haproxy.cfg"])
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    r = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
