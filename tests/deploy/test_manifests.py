"""The Kubernetes manifests under ``k8s/``, checked offline.

The core resources are validated against the Kubernetes OpenAPI schemas that the
``kubernetes-validate`` package ships (strict: unknown fields fail), for the
oldest and a recent Kubernetes version we target. The Istio resources have no
schema there; they are parsed and their fields checked. Then consistency with
the code: every ConfigMap key is a variable the service reads and every value
passes its parser, the ports agree with the default PORT, the probe and scrape
paths are served by a real server, the grace period outlasts preStop plus
SHUTDOWN_TIMEOUT, and no secret value is committed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from utils import REPO_ROOT, Server, http_get, open_client, run_server

from pushsvc.config import Settings, env_names

K8S_DIR = REPO_ROOT / "k8s"
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
"""Validated against: the oldest release we deploy to and a current one."""

CORE_KINDS = {
    "ConfigMap": "v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
}
ISTIO_KINDS = {"VirtualService", "DestinationRule"}
IDLE_RSS_PER_CONNECTION = 6 * 1024
"""Measured server RSS per idle connection (BENCHMARKS.md: 5.8-6.0 KiB)."""
PLACEHOLDER_SECRET = "x" * 48


# --------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))


def documents() -> list[tuple[Path, dict[str, Any]]]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def only(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under k8s/, found {len(found)}"
    return found[0]


def configmap() -> dict[str, str]:
    data = only("ConfigMap")["data"]
    assert isinstance(data, dict)
    return data


def pod_spec() -> dict[str, Any]:
    spec = only("Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    assert isinstance(c, dict)
    return c


def effective_settings() -> Settings:
    """The settings a pod gets: the ConfigMap on top of the defaults (the
    secret replaced by a placeholder)."""
    return Settings.from_env({**configmap(), "JWT_SECRET": PLACEHOLDER_SECRET})


def default_port() -> int:
    return int(
        next(f.default for f in dataclasses.fields(Settings) if f.name == "port")
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(duration: str) -> float:
    """A protobuf/Go duration (``0s``, ``3600s``, ``1h30m``, ``500ms``)."""
    parts = _DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * _UNITS[u] for n, u in parts)


_QUANTITY = {
    "m": 0.001,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (``500m``, ``2``, ``1536Mi``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match and match.group(2) in ("", *_QUANTITY), value
    return float(match.group(1)) * _QUANTITY.get(match.group(2), 1.0)


# ------------------------------------------------------------------ validation


def _core_documents() -> list[Any]:
    return [
        pytest.param(doc, version, id=f"{path.stem}-{doc['kind']}-{version}")
        for path, doc in documents()
        if doc["kind"] in CORE_KINDS
        for version in KUBERNETES_VERSIONS
    ]


@pytest.mark.parametrize(("doc", "version"), _core_documents())
def test_core_manifest_matches_the_kubernetes_schema(
    doc: dict[str, Any], version: str
) -> None:
    """Strict schema validation: wrong types, missing required fields and
    unknown (misspelt) fields all fail."""
    if version not in kubernetes_validate.utils.all_versions():
        pytest.skip(f"this kubernetes-validate ships no schemas for {version}")
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']} {where}: {exc.message}")


def test_every_manifest_is_known_and_checked() -> None:
    """Each document is a core kind (schema-validated above) or an Istio kind
    (checked below), with the expected apiVersion; one of each is present."""
    kinds = []
    for path, doc in documents():
        kind = doc.get("kind")
        kinds.append(kind)
        if kind in CORE_KINDS:
            assert doc["apiVersion"] == CORE_KINDS[kind], (path.name, doc["apiVersion"])
        else:
            assert kind in ISTIO_KINDS, f"{path.name}: unchecked kind {kind}"
            assert doc["apiVersion"].startswith("networking.istio.io/"), path.name
        assert doc["metadata"].get("name"), path.name
        assert "namespace" not in doc["metadata"], (
            f"{path.name}: the namespace comes from `kubectl apply -n`"
        )
    assert sorted(kinds) == sorted({*CORE_KINDS, *ISTIO_KINDS}), kinds


# ----------------------------------------------------------- code consistency


def test_configmap_keys_are_variables_the_service_reads() -> None:
    """A key the service does not read would be silently ignored."""
    unknown = set(configmap()) - env_names()
    assert not unknown, f"not read by pushsvc: {sorted(unknown)}"
    assert "JWT_SECRET" not in configmap(), "JWT_SECRET belongs in a Secret"
    assert all(isinstance(v, str) for v in configmap().values())


def test_configmap_values_pass_the_service_parser() -> None:
    """``pushsvc check-config`` would accept the ConfigMap (as a pod reads it)."""
    settings = effective_settings()
    assert settings.is_production, "NODE_ENV=production for JSON logs"
    assert settings.port == default_port()


def test_deployment_environment() -> None:
    """The ConfigMap comes in whole; JWT_SECRET comes from a Secret by
    reference, never as a value; every variable is one the service reads."""
    c = container()
    refs = [
        e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e
    ]
    assert refs == [only("ConfigMap")["metadata"]["name"]]
    env = {e["name"]: e for e in c.get("env", [])}
    assert set(env) <= env_names(), set(env) - env_names()
    secret = env["JWT_SECRET"]
    assert "value" not in secret
    ref = secret["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and not ref.get("optional", False)
    assert all("value" not in e for e in env.values() if e["name"] == "JWT_SECRET")


def test_ports_agree_with_the_service_default() -> None:
    """Container port == Service port == targetPort == the default PORT, and
    the Service's port name selects HTTP in Istio."""
    port = default_port()
    assert port == 3003
    (cport,) = container()["ports"]
    assert cport["containerPort"] == port
    assert int(configmap().get("PORT", port)) == port
    (sport,) = only("Service")["spec"]["ports"]
    target = sport["targetPort"]
    assert target in (port, cport["name"]), target
    assert sport["port"] == port
    for name in (sport["name"], cport["name"]):
        assert name == "http" or name.startswith("http-"), name
    assert sport.get("appProtocol", "http") == "http"


def _probe_port(probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    (match,) = [p for p in container()["ports"] if p["name"] == port]
    return int(match["containerPort"])


def test_probes_use_health_and_ready() -> None:
    """Liveness on /health (process alive), readiness on /ready (partitions
    held, not draining), both on the service port."""
    c = container()
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe"):
        assert _probe_port(c[probe]) == default_port()
    if "startupProbe" in c:
        assert c["startupProbe"]["httpGet"]["path"] == "/health"


def test_prometheus_scrape_annotations() -> None:
    annotations = only("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == default_port()
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.fixture(scope="module")
def live_server() -> Iterator[Server]:
    """``pushsvc serve`` with the production NODE_ENV, no broker."""
    with run_server(None, wait="health", NODE_ENV="production") as server:
        yield server


def test_probe_and_scrape_paths_are_served(live_server: Server) -> None:
    """The paths the manifests name exist in the server: liveness answers 200
    even without Kafka; readiness answers (503 without Kafka: a reason, not a
    404); the scrape path serves Prometheus text."""
    c = container()
    annotations = only("Deployment")["spec"]["template"]["metadata"]["annotations"]
    status, _, body = http_get(live_server.url(c["livenessProbe"]["httpGet"]["path"]))
    assert status == 200, body
    status, _, body = http_get(live_server.url(c["readinessProbe"]["httpGet"]["path"]))
    assert status in (200, 503) and b"status" in body, (status, body)
    status, headers, body = http_get(live_server.url(annotations["prometheus.io/path"]))
    assert status == 200 and headers["content-type"].startswith("text/plain"), body
    assert b"websocket_connections_total" in body


async def test_hash_key_is_the_query_parameter_the_server_reads(
    live_server: Server,
) -> None:
    """The DestinationRule hashes on a query parameter of the upgrade; it must
    be the one the server takes the assessment from."""
    rule = only("DestinationRule")["spec"]["trafficPolicy"]["loadBalancer"]
    param = rule["consistentHash"]["httpQueryParameterName"]
    assert param == "assessmentId"
    # utils' client puts the assessment in the query as ?assessmentId=...
    client = await open_client(live_server, "deploy-user", "asm-hash-check")
    try:
        assert client.hello[param] == "asm-hash-check"
    finally:
        await client.close()


def _pre_stop_seconds() -> float:
    pre_stop = container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep"), command
    return float(command[1])


def test_grace_period_outlasts_pre_stop_and_shutdown() -> None:
    """Kubernetes counts terminationGracePeriodSeconds from the start of
    preStop; SIGTERM comes after it, and the process needs SHUTDOWN_TIMEOUT to
    drain its clients: anything shorter cuts the drain with SIGKILL."""
    settings = effective_settings()
    pre_stop = _pre_stop_seconds()
    assert 0 < pre_stop <= 15, "long enough for endpoints to update, no longer"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > pre_stop + settings.shutdown_timeout_ms / 1000, (
        grace,
        pre_stop,
        settings.shutdown_timeout_ms,
    )
    assert settings.shutdown_drain_ms < settings.shutdown_timeout_ms


def test_istio_sidecar_outlives_the_drain() -> None:
    """If the pod's Istio sidecar stops forwarding before pushsvc has closed
    its clients with 1001, they see a reset instead: its drain covers preStop
    plus SHUTDOWN_TIMEOUT and ends within the grace period."""
    annotations = only("Deployment")["spec"]["template"]["metadata"]["annotations"]
    config = yaml.safe_load(annotations["proxy.istio.io/config"])
    drain = seconds(config["terminationDrainDuration"])
    settings = effective_settings()
    assert drain >= _pre_stop_seconds() + settings.shutdown_timeout_ms / 1000
    assert drain < pod_spec()["terminationGracePeriodSeconds"]


def test_security_context_is_restrictive() -> None:
    pod = pod_spec()
    c = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc.get("runAsNonRoot", True) is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert not sc.get("privileged", False)
    user = sc.get("runAsUser", pod["securityContext"].get("runAsUser"))
    assert isinstance(user, int) and user > 0
    assert pod.get("automountServiceAccountToken") is False
    assert "hostNetwork" not in pod and "hostPID" not in pod


def test_tmp_is_the_only_writable_path() -> None:
    """With a read-only root, /tmp is an emptyDir (bounded in size)."""
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert set(mounts) == {"/tmp"}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    tmp = volumes[mounts["/tmp"]]
    assert "emptyDir" in tmp and tmp["emptyDir"].get("sizeLimit")


def test_resources_requested_and_limited() -> None:
    """Requests and limits for CPU and memory, requests within limits, and the
    memory request covers MAX_CONNECTIONS idle connections at the measured
    RSS per connection (kernel socket memory comes on top: docs/scaling.md)."""
    resources = container()["resources"]
    for what in ("cpu", "memory"):
        request = quantity(resources["requests"][what])
        limit = quantity(resources["limits"][what])
        assert 0 < request <= limit, (what, request, limit)
    memory = quantity(resources["requests"]["memory"])
    assert effective_settings().max_connections * IDLE_RSS_PER_CONNECTION < memory / 2


def test_pods_spread_across_nodes() -> None:
    """A node loss takes few connections at once: a spread constraint or an
    anti-affinity on the hostname, selecting these pods."""
    pod = pod_spec()
    labels = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    keys = set()
    for constraint in pod.get("topologySpreadConstraints", []):
        selector = constraint["labelSelector"]["matchLabels"]
        assert selector.items() <= labels.items()
        keys.add(constraint["topologyKey"])
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    for term in anti.get("preferredDuringSchedulingIgnoredDuringExecution", []):
        selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
        assert selector.items() <= labels.items()
        keys.add(term["podAffinityTerm"]["topologyKey"])
    assert "kubernetes.io/hostname" in keys


def test_selectors_and_targets_line_up() -> None:
    """Service, PodDisruptionBudget and Deployment select the pod template's
    labels; the HPA scales the Deployment."""
    deployment = only("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert only("Service")["spec"]["selector"].items() <= labels.items()
    pdb = only("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    target = only("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        deployment["metadata"]["name"],
    )
    rollout = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] in (0, "0%"), "never below capacity in a rollout"


def test_hpa_scales_on_cpu_and_memory() -> None:
    spec = only("HorizontalPodAutoscaler")["spec"]
    targets = {
        m["resource"]["name"]: m["resource"]["target"]
        for m in spec["metrics"]
        if m["type"] == "Resource"
    }
    assert targets["cpu"] == {"type": "Utilization", "averageUtilization": 70}
    assert targets["memory"] == {"type": "Utilization", "averageUtilization": 80}
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    assert spec["minReplicas"] <= only("Deployment")["spec"]["replicas"]


def test_virtualservice_keeps_websockets_open() -> None:
    """The route for /ws goes to the Service's port and has no route timeout
    (0s) or one of hours: it would otherwise end every upgraded connection."""
    spec = only("VirtualService")["spec"]
    service = only("Service")
    routes = [
        r
        for r in spec["http"]
        if any(
            m.get("uri", {}).get("exact") == "/ws"
            or m.get("uri", {}).get("prefix") == "/ws"
            for m in r.get("match", [])
        )
    ]
    assert len(routes) == 1, spec["http"]
    (route,) = routes
    (destination,) = [d["destination"] for d in route["route"]]
    host = destination["host"]
    assert host.split(".")[0] == service["metadata"]["name"], host
    assert destination["port"]["number"] == service["spec"]["ports"][0]["port"]
    timeout = seconds(route["timeout"])
    assert timeout == 0 or timeout >= 3600, route["timeout"]
    assert "websocketUpgrade" not in route, "removed from Istio's API; upgrades are on"
    assert spec["hosts"] and spec["gateways"]


def test_destinationrule_hashes_on_assessment_with_long_idle_timeouts() -> None:
    """Consistent hash on assessmentId for the same host the VirtualService
    routes to; idle timeouts (when set) well above the heartbeat interval, so
    a connection that only carries pings is never cut."""
    spec = only("DestinationRule")["spec"]
    (route,) = only("VirtualService")["spec"]["http"]
    vs_host = route["route"][0]["destination"]["host"]
    assert spec["host"] == vs_host
    policy = spec["trafficPolicy"]
    assert policy["loadBalancer"]["consistentHash"]["httpQueryParameterName"] == (
        "assessmentId"
    )
    heartbeat_s = effective_settings().heartbeat_interval_ms / 1000
    pool = policy.get("connectionPool", {})
    idle = [
        pool[k]["idleTimeout"]
        for k in ("tcp", "http")
        if "idleTimeout" in pool.get(k, {})
    ]
    assert idle, "state the idle timeouts, so nobody lowers them unknowingly"
    for value in idle:
        assert seconds(value) == 0 or seconds(value) >= 4 * heartbeat_s, value


# --------------------------------------------------------------------- secrets

_SECRET_ASSIGNMENT = re.compile(
    r"""(?ix) jwt[_-]?secret ["']? \s* (?: = | : ) [ \t]* (?P<value>[^\s,;)]*)"""
)


def _allowed_secret_reference(value: str) -> bool:
    """What may follow ``JWT_SECRET=``/``JWT_SECRET:`` in a committed file: a
    reference or a placeholder, never a value."""
    value = value.strip("\"'`.")
    return (
        value in ("", "/dev/stdin", "|", ">")
        or value.startswith(("$", "<", "{{"))
        or value.endswith("/dev/stdin")
    )


def secret_values(text: str) -> list[str]:
    """Every ``JWT_SECRET=value`` / ``JWT_SECRET: value`` with a literal value,
    and every ``--from-literal=`` (which puts a value on a command line)."""
    found = re.findall(r"--from-literal[= ]\S+", text)
    for match in _SECRET_ASSIGNMENT.finditer(text):
        if not _allowed_secret_reference(match.group("value")):
            found.append(match.group(0))
    return found


@pytest.mark.parametrize(
    ("text", "leaks"),
    [
        ("JWT_SECRET=hunter2hunter2", True),
        ("export JWT_SECRET='c2VjcmV0IGtleQ=='", True),
        ("stringData:\n  JWT_SECRET: c2VjcmV0", True),
        ('{"jwt-secret": "abc"}', True),
        ("kubectl create secret generic x --from-literal=JWT_SECRET=abc", True),
        ("--from-file=JWT_SECRET=/dev/stdin", False),
        ('JWT_SECRET="$(openssl rand -base64 48)"', False),
        ("JWT_SECRET: <from your secret manager>", False),
        ("key: JWT_SECRET\n- name: JWT_SECRET\n", False),
        ("do not use `--from-literal`: it ends up in the history", False),
    ],
)
def test_secret_detector(text: str, leaks: bool) -> None:
    """The check below finds literal values and lets references through."""
    assert bool(secret_values(text)) == leaks, secret_values(text)


def test_no_secret_value_is_committed() -> None:
    """No Secret object, no literal JWT_SECRET value, no --from-literal, in any
    file under k8s/ (manifests and their README alike)."""
    for path, doc in documents():
        assert doc["kind"] != "Secret", (
            f"{path.name}: the Secret is created out of band"
        )
    for path in sorted(p for p in K8S_DIR.rglob("*") if p.is_file()):
        text = path.read_text()
        leaks = secret_values(text)
        assert not leaks, f"{path.name}: looks like a secret value: {leaks}"
        for known in ("pushsvc-integration-test-secret", "pushsvc-demo"):
            assert known not in text, f"{path.name} contains a known test secret"
