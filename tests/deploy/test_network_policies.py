"""The NetworkPolicies the charts render, read the way a CNI reads them.

`allowed()` below evaluates NetworkPolicy semantics (selectors with matchLabels and
matchExpressions, a bare podSelector meaning the policy's own namespace, named and numbered
ports, the union of rules) for one connection, so each test states in plain terms who may
call whom: registry <- trainer, compressor, inference (their server and job pods) and
clients; trainer, compressor, inference <- clients only; Triton <- the inference pods only;
Prometheus on the metrics ports; egress to DNS, Consul, PostgreSQL, OTLP and the peers.
The manifests themselves are schema-validated with every other manifest in test_helm_charts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kubernetes_validate
import pytest
from maas_inference.settings import InferenceSettings

from tests.deploy.test_helm_charts import (
    HELM_DIR,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    SERVICES,
    of_kind,
    render,
)

GRPC = {"registry": 50051, "trainer": 50052, "compressor": 50053, "inference": 50054}


@dataclass(frozen=True)
class Pod:
    labels: dict[str, str]
    namespace: str = NAMESPACE
    namespace_labels: dict[str, str] = field(default_factory=dict)

    @property
    def all_namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def server(name: str, component: str = "server") -> Pod:
    return Pod({"app.kubernetes.io/name": name, "app.kubernetes.io/instance": RELEASE,
                "app.kubernetes.io/component": component})


TRITON = server("inference", "triton")
CLIENT = Pod({"maas.io/client": "true", "app": "notebook"})
STRANGER = Pod({"app": "something-else"})
STRANGER_ELSEWHERE = Pod({"maas.io/client": "true"}, namespace="other")
PROMETHEUS = Pod({"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
KUBE_DNS = Pod({"k8s-app": "kube-dns"}, namespace="kube-system")
ANYWHERE = Pod({}, namespace="databases")


def matches(selector: dict | None, labels: dict[str, str]) -> bool:
    selector = selector or {}
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if ((operator == "In" and not (present and labels[key] in values))
                or (operator == "NotIn" and present and labels[key] in values)
                or (operator == "Exists" and not present)
                or (operator == "DoesNotExist" and present)):
            return False
    return True


def peer_matches(peer: dict, pod: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # the test pods are addressed by labels only
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], pod.all_namespace_labels):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return matches(peer.get("podSelector"), pod.labels)


def port_matches(rule: dict, port: tuple[str, int], protocol: str) -> bool:
    if "ports" not in rule:
        return True
    return any(entry.get("protocol", "TCP") == protocol and entry["port"] in port
               for entry in rule["ports"])


def allowed(policies: list[dict], source: Pod, target: Pod, port: tuple[str, int],
            protocol: str = "TCP") -> bool:
    """Whether `source` may open `port` (name, number) on `target` under `policies`: the
    target's ingress policies and the source's egress policies must both allow it."""
    def direction_allows(pod: Pod, kind: str, other: Pod) -> bool:
        selecting = [p for p in policies if p["metadata"].get("namespace", NAMESPACE) == pod.namespace
                     and kind in p["spec"]["policyTypes"]
                     and matches(p["spec"]["podSelector"], pod.labels)]
        if not selecting:
            return True  # no policy selects the pod in this direction: all allowed
        key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        return any(port_matches(rule, port, protocol)
                   and ("_" if peers_key not in rule else
                        any(peer_matches(peer, other, NAMESPACE) for peer in rule[peers_key]))
                   for policy in selecting for rule in policy["spec"].get(key, []))
    return direction_allows(target, "Ingress", source) and direction_allows(source, "Egress", target)


def suite_policies(values_by_chart: dict[str, dict] | None = None) -> list[dict]:
    """The policies of the four service charts installed as one release."""
    values_by_chart = values_by_chart or {}
    return [policy for chart in SERVICES
            for policy in of_kind(render(HELM_DIR / chart, values_by_chart.get(chart)),
                                  "NetworkPolicy").values()]


@pytest.fixture(scope="module")
def policies() -> list[dict]:
    return suite_policies()


def grpc(service: str) -> tuple[str, int]:
    return ("grpc", GRPC[service])


METRICS = ("metrics", 9090)


def test_every_service_and_triton_has_a_valid_policy(policies):
    names = {policy["metadata"]["name"] for policy in policies}
    assert names == {f"{RELEASE}-{name}" for name in SERVICES} | {f"{RELEASE}-inference-triton"}
    for policy in policies:
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_the_registry_is_called_by_the_other_services_and_clients(policies):
    registry = server("registry")
    for caller in ("trainer", "compressor", "inference"):
        assert allowed(policies, server(caller), registry, grpc("registry")), caller
    assert allowed(policies, CLIENT, registry, grpc("registry"))
    # Job pods run on the shared volume and call no service.
    for outsider in (STRANGER, STRANGER_ELSEWHERE, TRITON, PROMETHEUS, server("trainer", "job")):
        assert not allowed(policies, outsider, registry, grpc("registry")), outsider


@pytest.mark.parametrize("service", ["trainer", "compressor", "inference"])
def test_the_job_services_and_inference_are_called_by_clients_only(policies, service):
    target = server(service)
    assert allowed(policies, CLIENT, target, grpc(service))
    for other in SERVICES:
        if other != service:
            assert not allowed(policies, server(other), target, grpc(service)), other
    for outsider in (STRANGER, STRANGER_ELSEWHERE, TRITON, PROMETHEUS):
        assert not allowed(policies, outsider, target, grpc(service)), outsider


@pytest.mark.parametrize("service", SERVICES)
def test_prometheus_alone_scrapes_the_metrics_port(policies, service):
    target = server(service)
    assert allowed(policies, PROMETHEUS, target, METRICS)
    assert not allowed(policies, CLIENT, target, METRICS)
    assert not allowed(policies, PROMETHEUS, target, grpc(service))


def test_triton_is_reached_by_the_inference_pods_only(policies):
    for port in (("grpc", 8001), ("metrics", 8002)):
        assert allowed(policies, server("inference"), TRITON, port), port
    assert not allowed(policies, server("inference"), TRITON, ("http", 8000))
    for outsider in (server("registry"), server("trainer"), server("compressor"), CLIENT, STRANGER,
                     server("inference", "job")):
        assert not allowed(policies, outsider, TRITON, ("grpc", 8001)), outsider
    assert allowed(policies, PROMETHEUS, TRITON, ("metrics", 8002))
    assert not allowed(policies, PROMETHEUS, TRITON, ("grpc", 8001))
    # Triton itself calls nothing but DNS.
    assert allowed(policies, TRITON, KUBE_DNS, ("dns", 53), "UDP")
    assert not allowed(policies, TRITON, server("registry"), grpc("registry"))
    assert not allowed(policies, TRITON, ANYWHERE, ("https", 443))


@pytest.mark.parametrize("service", SERVICES)
def test_egress_reaches_dns_consul_postgresql_and_otlp_but_nothing_else(policies, service):
    source = server(service)
    assert allowed(policies, source, KUBE_DNS, ("dns", 53), "UDP")
    assert allowed(policies, source, KUBE_DNS, ("dns", 53), "TCP")
    assert not allowed(policies, source, STRANGER, ("dns", 53), "UDP")
    for port in (8500, 8501, 5432, 4317):
        assert allowed(policies, source, ANYWHERE, ("", port)), port
    assert not allowed(policies, source, ANYWHERE, ("https", 443))
    assert not allowed(policies, source, STRANGER, ("http", 8080))


def test_egress_reaches_the_peers_each_service_calls(policies):
    for caller in ("trainer", "compressor", "inference"):
        assert allowed(policies, server(caller), server("registry"), grpc("registry")), caller
    assert allowed(policies, server("inference"), TRITON, ("grpc", 8001))
    assert not allowed(policies, server("trainer"), TRITON, ("grpc", 8001))
    # The registry calls no service, and no service calls a peer it does not need.
    for target in ("trainer", "compressor", "inference"):
        assert not allowed(policies, server("registry"), server(target), grpc(target)), target
    assert not allowed(policies, server("trainer"), server("compressor"), grpc("compressor"))


def test_clients_are_configurable_as_namespace_and_pod_selectors():
    team = {"namespaceSelector": {"matchLabels": {"team": "ml"}},
            "podSelector": {"matchLabels": {"role": "caller"}}}
    configured = suite_policies({chart: {"networkPolicy": {"clients": [team]}} for chart in SERVICES})
    caller = Pod({"role": "caller"}, namespace="team-ml", namespace_labels={"team": "ml"})
    wrong_pod = Pod({"role": "other"}, namespace="team-ml", namespace_labels={"team": "ml"})
    for service in SERVICES:
        assert allowed(configured, caller, server(service), grpc(service)), service
        assert not allowed(configured, wrong_pod, server(service), grpc(service)), service
        assert not allowed(configured, CLIENT, server(service), grpc(service)), service
    # The suite's own callers stay allowed whatever the clients are.
    assert allowed(configured, server("trainer"), server("registry"), grpc("registry"))


def test_egress_destinations_are_configurable():
    database = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "databases"}}}
    configured = suite_policies({"registry": {"networkPolicy": {
        "postgresql": {"to": [database], "ports": [5432]},
        "extraEgress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}}})
    registry = server("registry")
    assert allowed(configured, registry, ANYWHERE, ("", 5432))
    assert not allowed(configured, registry, STRANGER, ("", 5432))
    assert allowed(configured, registry, STRANGER, ("https", 443))


def test_an_external_triton_is_reached_on_its_own_port_only():
    documents = render(HELM_DIR / "inference", {"triton": {"enabled": False,
                                                          "externalUrl": "triton.gpu.svc:9001"}})
    policies = list(of_kind(documents, "NetworkPolicy").values())
    assert [p["metadata"]["name"] for p in policies] == [f"{RELEASE}-inference"]
    assert allowed(policies, server("inference"), ANYWHERE, ("", 9001))
    assert not allowed(policies, server("inference"), ANYWHERE, ("", 8001))


@pytest.mark.parametrize("service", SERVICES)
def test_policies_are_off_when_disabled(service):
    documents = render(HELM_DIR / service, {"networkPolicy": {"enabled": False}})
    assert of_kind(documents, "NetworkPolicy") == {}


def test_metrics_off_leaves_no_metrics_ingress():
    policies = list(of_kind(render(HELM_DIR / "trainer", {"metrics": {"enabled": False}}),
                            "NetworkPolicy").values())
    assert not allowed(policies, PROMETHEUS, server("trainer"), METRICS)
    assert allowed(policies, CLIENT, server("trainer"), grpc("trainer"))


def test_the_evaluator_denies_what_no_rule_names():
    """allowed() is not vacuous: a policy with no ingress rules denies every caller."""
    deny_all = {"metadata": {"name": "deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not allowed([deny_all], CLIENT, server("registry"), grpc("registry"))
    assert allowed([], STRANGER, server("registry"), grpc("registry"))


def test_the_openai_endpoint_is_a_port_of_the_pod_and_service_open_to_clients_only(monkeypatch):
    documents = render(HELM_DIR / "inference", {"openai": {"enabled": True, "port": 8080}})
    for document in documents:
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
    deployment = of_kind(documents, "Deployment")[f"{RELEASE}-inference"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "openai", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    service = of_kind(documents, "Service")[f"{RELEASE}-inference"]
    assert {"name": "openai", "port": 8080, "targetPort": "openai", "protocol": "TCP",
            "appProtocol": "http"} in service["spec"]["ports"]
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    monkeypatch.setenv("MAAS_INFERENCE_OPENAI_PORT", env["MAAS_INFERENCE_OPENAI_PORT"])
    assert InferenceSettings().openai_port == 8080
    policies = list(of_kind(documents, "NetworkPolicy").values())
    openai = ("openai", 8080)
    assert allowed(policies, CLIENT, server("inference"), openai)
    for outsider in (STRANGER, STRANGER_ELSEWHERE, PROMETHEUS, server("registry"), TRITON):
        assert not allowed(policies, outsider, server("inference"), openai), outsider
    # Off by default: no port, no env.
    default = of_kind(render(HELM_DIR / "inference"), "Service")[f"{RELEASE}-inference"]
    assert [port["name"] for port in default["spec"]["ports"]] == ["grpc", "metrics"]


def test_the_umbrella_admits_its_global_clients_to_every_service(umbrella_dir):
    gateways = {"namespaceSelector": {"matchLabels": {"team": "gateways"}}}
    documents = render(umbrella_dir, {"global": {"maas": {"clients": [gateways]}}})
    policies = list(of_kind(documents, "NetworkPolicy").values())
    gateway = Pod({"app": "envoy"}, namespace="edge", namespace_labels={"team": "gateways"})
    for service in SERVICES:
        assert allowed(policies, gateway, server(service), grpc(service)), service
        assert allowed(policies, CLIENT, server(service), grpc(service)), service  # still
        assert not allowed(policies, STRANGER_ELSEWHERE, server(service), grpc(service)), service
    assert not allowed(policies, gateway, TRITON, ("grpc", 8001))


CONSUL_SERVER = Pod({"app": "consul", "release": RELEASE, "component": "server"})


def test_consul_health_checks_reach_the_grpc_port_of_every_service(umbrella_dir):
    """Consul probes each registered instance's grpc.health.v1: the release's bundled Consul
    servers are admitted when the services use them, other agents through consul.from."""
    bundled = list(of_kind(render(umbrella_dir, {"consul": {"enabled": True}, "global": {
        "maas": {"consul": {"enabled": True}}}}), "NetworkPolicy").values())
    plain = list(of_kind(render(umbrella_dir), "NetworkPolicy").values())
    for service in SERVICES:
        assert allowed(bundled, CONSUL_SERVER, server(service), grpc(service)), service
        assert not allowed(bundled, CONSUL_SERVER, server(service), METRICS), service
        assert not allowed(plain, CONSUL_SERVER, server(service), grpc(service)), service
    nodes = {"ipBlock": {"cidr": "10.0.0.0/16"}}
    host_agents = list(of_kind(render(HELM_DIR / "registry", {
        "global": {"maas": {"consul": {"enabled": True, "useHostAgent": True}}},
        "networkPolicy": {"consul": {"from": [nodes], "to": [], "ports": [8500]}}}),
        "NetworkPolicy").values())
    (policy,) = host_agents
    assert {"ports": [{"port": "grpc", "protocol": "TCP"}], "from": [nodes]} in policy["spec"]["ingress"]
    assert not allowed(host_agents, CONSUL_SERVER, server("registry"), grpc("registry"))
