"""The Helm charts under deploy/helm, rendered by Helm's own engine and checked offline.

`helm-python-sdk` embeds Helm v4 (libhelm_c, no helm binary, no cluster, no network):
every chart is linted, rendered with its defaults and with a production-like values set,
and every manifest is validated against the Kubernetes OpenAPI schema that
`kubernetes-validate` ships (strict: unknown fields fail). On top of that the tests check
what the services rely on: hardened pods, gRPC probes of the logical service name, env vars
that are real fields of each service's settings class, HPA, Triton, and the umbrella wiring.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import json
import os
import re
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from maas_inference.triton.lockdown import CONTROL_KEY_NAME, RESTRICTED_PROTOCOLS
from maas_runtime.discovery import parse_consul_address, parse_static_endpoints

REPO = Path(__file__).resolve().parents[2]
HELM_DIR = REPO / "deploy" / "helm"
RELEASE = "maas"
NAMESPACE = "ml"
KUBE_VERSION = kubernetes_validate.latest_version()

ALERT_RULES = HELM_DIR / "maas" / "files" / "maas-alerts.yml"
DASHBOARD = HELM_DIR / "maas" / "files" / "maas-dashboard.json"
METRICS_PORT = 9090
PORTS = {"registry": 50051, "trainer": 50052, "compressor": 50053, "inference": 50054}
SERVICES = tuple(PORTS)
SETTINGS_CLASSES = {
    "registry": "maas_registry.settings:RegistrySettings",
    "trainer": "maas_trainer.settings:TrainerSettings",
    "compressor": "maas_compressor.settings:CompressorSettings",
    "inference": "maas_inference.settings:InferenceSettings",
}
_PRODUCTION_COMMON = {
    "image": {"tag": "1.0.1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "ghcr-pull"}],
    "tls": {"enabled": True, "secretName": "maas-tls", "requireClientCertificates": True,
            "peers": {"enabled": True, "presentClientCertificate": True}},
    "otlpEndpoint": "http://otel-collector.observability.svc:4317",
    "logLevel": "WARNING",
    "priorityClassName": "maas-critical",
    "podAnnotations": {"prometheus.io/scrape": "false"},
    "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/part-of": "maas"}}}],
    "discovery": {"consulHttpAddr": "https://consul.consul.svc:8501"},
    "global": {"maas": {"consul": {"tokenSecret": {"name": "consul-acl", "key": "token"}}}},
}
PRODUCTION = {
    "registry": {
        **_PRODUCTION_COMMON,
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12,
                        "targetCPUUtilizationPercentage": 70,
                        "targetMemoryUtilizationPercentage": 80},
        "updateStrategy": "RollingUpdate",
        "database": {"existingSecret": "registry-postgres", "secretKey": "url"},
        "pageTokenSecret": {"existingSecret": "registry-page-token"},
        "persistence": {"enabled": False},
        "blobStore": {"persistence": {"accessModes": ["ReadWriteMany"], "storageClass": "nfs",
                                      "size": "2Ti"}},
        "podDisruptionBudget": {"minAvailable": 2},
        "settings": {"max_artifact_bytes": 17179869184, "gc_grace_seconds": 600.5},
    },
    "trainer": {
        **_PRODUCTION_COMMON,
        "resources": {"requests": {"cpu": "8", "memory": "32Gi"},
                      "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}},
        "settings": {"worker_slots": 8, "registry_timeout_seconds": 600, "job_lease_seconds": 30},
        # Two replicas on one PostgreSQL job table, sharing their job directories.
        "replicaCount": 2,
        "database": {"existingSecret": "trainer-postgres", "secretKey": "url"},
        "pageTokenSecret": {"existingSecret": "trainer-page-token"},
        "persistence": {"storageClass": "nfs", "size": "500Gi", "accessModes": ["ReadWriteMany"]},
        # Jobs as Kubernetes Jobs, queued by Kueue, on GPU nodes.
        "kubernetesJobs": {"enabled": True, "kueueQueue": "training",
                           "worker": {"cpu": "8", "memory": "32Gi", "gpus": 1},
                           "nodeSelector": {"nvidia.com/gpu.present": "true"}},
    },
    "compressor": {**_PRODUCTION_COMMON, "settings": {"worker_slots": 2,
                                                      "registry_timeout_seconds": 300},
                   "database": {"existingSecret": "compressor-postgres", "secretKey": "url"}},
    "inference": {
        **_PRODUCTION_COMMON,
        "settings": {"default_max_batch_size": 64, "rollout_drain_seconds": 45},
        "database": {"existingSecret": "inference-postgres", "secretKey": "url"},
        "triton": {
            "gpus": 2,
            "image": {"repository": "ghcr.io/maas/triton", "tag": "25.01-py3-maas1"},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "extraArgs": ["--log-verbose=1"],
            "modelRepository": {"persistence": {"storageClass": "nfs", "size": "1Ti"}},
        },
    },
}


def _in_umbrella(values: dict) -> dict:
    """A service's production values inside the umbrella, where the bundled Consul replaces
    the explicit Consul address and ACL token of a standalone release."""
    return {"enabled": True, **{k: v for k, v in values.items() if k not in ("discovery", "global")}}


PRODUCTION["maas"] = {
    **{name: _in_umbrella(PRODUCTION[name]) for name in SERVICES},
    "consul": {"enabled": True, "server": {"replicas": 3}},
    "global": {"maas": {
        "consul": {"enabled": True},
        "peers": PORTS,
        "otlpEndpoint": "http://otel-collector.observability.svc:4317",
    }},
}
PROFILES = ("default", "production")


# --- rendering ------------------------------------------------------------------------------

def chart_dir(chart: str, umbrella: Path) -> Path:
    return umbrella if chart == "maas" else HELM_DIR / chart


def values_for(chart: str, profile: str) -> dict | None:
    return None if profile == "default" else copy.deepcopy(PRODUCTION[chart])


def render(path: Path, values: dict | None = None) -> list[dict]:
    """Every manifest the chart renders (NOTES.txt left out), parsed."""
    with helm.Chart.load(path) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    documents = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        documents.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return documents


@functools.cache
def _rendered(chart: str, profile: str, umbrella: Path) -> tuple[dict, ...]:
    return tuple(render(chart_dir(chart, umbrella), values_for(chart, profile)))


@pytest.fixture(scope="session")
def manifests(umbrella_dir):
    """manifests(chart, profile) -> fresh copies of the rendered documents (renders once)."""
    return lambda chart, profile="default": copy.deepcopy(list(_rendered(chart, profile, umbrella_dir)))


def of_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def service_deployment(documents: list[dict], service: str) -> dict:
    return of_kind(documents, "Deployment")[f"{RELEASE}-{service}"]


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    names = [entry["name"] for entry in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {entry["name"]: entry for entry in container["env"]}


def mounts_by_path(deployment: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume) of the deployment's single container."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container_of(deployment)["volumeMounts"]}


# --- lint and Kubernetes schema -------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("chart", SERVICES)
def test_service_chart_lints_clean(chart, profile):
    report = helm.lint(HELM_DIR / chart, values_for(chart, profile), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], problems


def test_umbrella_lints_clean_except_for_the_unvendored_consul(umbrella_dir):
    report = helm.lint(umbrella_dir, values_for("maas", "production"), with_subcharts=True)
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == []
    assert problems == ["chart directory is missing these dependencies: consul"]


def test_lint_reports_values_that_break_the_schema():
    report = helm.lint(HELM_DIR / "registry", {"replicaCount": "many"}, strict=True)
    assert any("/replicaCount" in error for error in report["errors"]), report


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("chart", [*SERVICES, "maas"])
def test_every_manifest_is_valid_kubernetes(manifests, chart, profile):
    documents = manifests(chart, profile)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("chart", [*SERVICES, "maas"])
def test_every_manifest_is_valid_on_the_oldest_kubernetes_the_charts_accept(manifests, chart):
    with helm.Chart.load(chart_dir(chart, HELM_DIR / "maas")) as loaded:
        oldest = re.fullmatch(r">=(\d+\.\d+\.\d+)-0", loaded.metadata["kubeVersion"]).group(1)
    for document in manifests(chart, "production"):
        kubernetes_validate.validate(document, oldest, strict=True)


def test_the_kubernetes_validation_rejects_an_invalid_manifest(manifests):
    """The schema check above is not vacuous: a typo and a wrong type both fail it."""
    deployment = service_deployment(manifests("registry"), "registry")
    with_typo = copy.deepcopy(deployment)
    with_typo["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(with_typo, KUBE_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    container_of(wrong_type)["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("chart", SERVICES)
def test_service_chart_renders_its_resources(manifests, chart, profile):
    kinds = {doc["kind"] for doc in manifests(chart, profile)}
    assert {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"} <= kinds
    service = of_kind(manifests(chart, profile), "Service")[f"{RELEASE}-{chart}"]
    port, metrics = service["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["appProtocol"]) == (PORTS[chart], "grpc", "grpc")
    assert (metrics["port"], metrics["targetPort"]) == (METRICS_PORT, "metrics")


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_serves_prometheus_metrics_on_its_metrics_port(manifests, service):
    deployment = service_deployment(manifests(service), service)
    container = container_of(deployment)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == METRICS_PORT
    assert env_of(container)[f"MAAS_{service.upper()}_METRICS_PORT"]["value"] == str(METRICS_PORT)
    if service == "inference":  # Triton's own metrics come from the chart's Triton Service
        triton = of_kind(manifests(service), "Service")[f"{RELEASE}-inference-triton"]
        metrics_port = next(p["port"] for p in triton["spec"]["ports"] if p["name"] == "metrics")
        assert env_of(container)["MAAS_INFERENCE_TRITON_METRICS_URL"]["value"] == (
            f"http://{RELEASE}-inference-triton.{NAMESPACE}.svc:{metrics_port}/metrics")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                           "prometheus.io/path": "/metrics"}
    # The production profile's own annotation wins over the chart's.
    production = service_deployment(manifests(service, "production"), service)
    assert production["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "false"


@pytest.mark.parametrize("service", SERVICES)
def test_metrics_off_leaves_no_port_env_or_annotation(service):
    documents = render(HELM_DIR / service, {"metrics": {"enabled": False}})
    deployment = service_deployment(documents, service)
    container = container_of(deployment)
    assert [port["name"] for port in container["ports"]] == ["grpc"]
    assert f"MAAS_{service.upper()}_METRICS_PORT" not in env_of(container)
    assert "annotations" not in deployment["spec"]["template"]["metadata"]
    service_ports = of_kind(documents, "Service")[f"{RELEASE}-{service}"]["spec"]["ports"]
    assert [port["name"] for port in service_ports] == ["grpc"]


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_monitor_scrapes_the_metrics_port_when_asked(service):
    assert not of_kind(render(HELM_DIR / service), "ServiceMonitor")
    documents = render(HELM_DIR / service, {"metrics": {"serviceMonitor": {
        "enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus"}}}})
    monitor = of_kind(documents, "ServiceMonitor")[f"{RELEASE}-{service}"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                             "interval": "15s"}]
    # The job label is the service's name, as the alert rules' `up{job=...}` expects.
    service_labels = of_kind(documents, "Service")[f"{RELEASE}-{service}"]["metadata"]["labels"]
    assert service_labels[monitor["spec"]["jobLabel"]] == service
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


def test_the_umbrella_ships_the_alert_rules_file_itself_as_a_prometheus_rule(umbrella_dir):
    assert not of_kind(render(umbrella_dir), "PrometheusRule")
    documents = render(umbrella_dir, {"observability": {"prometheusRule": {
        "enabled": True, "labels": {"release": "kube-prometheus"}}}})
    rule = of_kind(documents, "PrometheusRule")[f"{RELEASE}-alerts"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERT_RULES.read_text())["groups"]


def test_the_umbrella_ships_the_dashboard_for_the_grafana_sidecar(umbrella_dir):
    config_map = of_kind(render(umbrella_dir), "ConfigMap")[f"{RELEASE}-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["maas-dashboard.json"]) == json.loads(
        DASHBOARD.read_text())
    off = render(umbrella_dir, {"observability": {"grafanaDashboard": {"enabled": False}}})
    assert f"{RELEASE}-dashboard" not in of_kind(off, "ConfigMap")


# --- pods -----------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("chart", [*SERVICES, "maas"])
def test_every_pod_is_hardened(manifests, chart, profile):
    deployments = of_kind(manifests(chart, profile), "Deployment")
    assert deployments
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Only a service that runs its jobs as Kubernetes Jobs (production trainer) calls the API.
        calls_api = name == f"{RELEASE}-trainer" and profile == "production"
        assert pod["automountServiceAccountToken"] is calls_api, name
        assert pod["enableServiceLinks"] is False, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["privileged"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert container["resources"]["requests"] and container["resources"]["limits"], name
            # The read-only root filesystem leaves /tmp to a writable emptyDir.
            volumes = {v["name"]: v for v in pod["volumes"]}
            tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in volumes[tmp["name"]], name


@pytest.mark.parametrize("service", SERVICES)
def test_readiness_checks_the_service_and_liveness_only_the_process(manifests, service):
    """A dependency's outage (Triton, the registry) takes a pod out of rotation, never restarts it."""
    container = container_of(service_deployment(manifests(service), service))
    assert container["ports"][0] == {"name": "grpc", "containerPort": PORTS[service], "protocol": "TCP"}
    assert container["readinessProbe"]["grpc"] == {"port": PORTS[service], "service": service}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": PORTS[service], "service": "liveness"}, probe


@pytest.mark.parametrize("service", SERVICES)
def test_probes_fall_back_to_tcp_under_tls(manifests, service):
    """The kubelet's gRPC probe cannot speak TLS; a gRPC probe would fail on a TLS-only port."""
    container = container_of(service_deployment(manifests(service, "production"), service))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "grpc"}, probe
        assert "grpc" not in container[probe]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("service", SERVICES)
def test_env_configures_the_service(manifests, service, profile):
    deployment = service_deployment(manifests(service, profile), service)
    env = env_of(container_of(deployment))
    prefix = f"MAAS_{service.upper()}_"
    mounts = mounts_by_path(deployment)

    assert env[f"{prefix}HOST"]["value"] == "0.0.0.0"
    assert env[f"{prefix}PORT"]["value"] == str(PORTS[service])
    assert env[f"{prefix}ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    state_dir = env[f"{prefix}STATE_DIR"]["value"]
    assert state_dir in mounts
    # Auth is on by default, with the tokens file and the admin token from one Secret. The
    # admin token file exists, so the service never mints one into the read-only tokens file.
    assert env[f"{prefix}AUTH_ENABLED"]["value"] == "true"
    for variable in ("TOKENS_FILE", "ADMIN_TOKEN_FILE", "CLIENT_TOKEN_FILE"):
        path = Path(env[f"{prefix}{variable}"]["value"])
        mount, volume = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        assert volume["secret"]["secretName"] == "maas-auth"
        assert path.name in {item["path"] for item in volume["secret"]["items"]}
    assert env[f"{prefix}ADMIN_TOKEN_FILE"]["value"] == env[f"{prefix}CLIENT_TOKEN_FILE"]["value"]

    if profile == "production":
        tls_files = {variable: Path(env[f"{prefix}{variable}"]["value"])
                     for variable in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE",
                                      "PEER_TLS_CA_FILE", "PEER_TLS_CERT_FILE",
                                      "PEER_TLS_KEY_FILE")}
        # The client side of mTLS comes from the same Secret: its CA, its certificate.
        assert tls_files["PEER_TLS_CA_FILE"] == tls_files["TLS_CLIENT_CA_FILE"]
        assert tls_files["PEER_TLS_CERT_FILE"] == tls_files["TLS_CERT_FILE"]
        for path in tls_files.values():
            assert mounts[str(path.parent)][1]["secret"]["secretName"] == "maas-tls"
        assert env[f"{prefix}OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability.svc:4317"
        assert str(parse_consul_address(env["CONSUL_HTTP_ADDR"]["value"])) == "https://consul.consul.svc:8501"
        assert env["CONSUL_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "consul-acl", "key": "token"}
    else:
        assert not {f"{prefix}TLS_CERT_FILE", f"{prefix}OTLP_ENDPOINT", "CONSUL_HTTP_ADDR"} & set(env)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("service", sorted(SETTINGS_CLASSES))
def test_env_is_read_by_the_services_settings_class(manifests, monkeypatch, service, profile):
    """Every MAAS_<NAME>_* variable the chart sets is a field of the service's settings class
    and parses there: the service is built from exactly these values."""
    module_name, class_name = SETTINGS_CLASSES[service].split(":")
    settings_class = getattr(importlib.import_module(module_name), class_name)
    prefix = f"MAAS_{service.upper()}_"
    deployment = service_deployment(manifests(service, profile), service)
    env = env_of(container_of(deployment))

    unknown = {name for name in env if name.startswith(prefix)
               and name.removeprefix(prefix).lower() not in settings_class.model_fields}
    assert not unknown, f"env vars that {class_name} does not read: {sorted(unknown)}"

    for name in [n for n in os.environ if n.startswith(("MAAS_", "CONSUL_"))]:
        monkeypatch.delenv(name)
    stand_ins = {"status.podIP": "10.1.2.3"}
    for name, entry in env.items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            monkeypatch.setenv(name, stand_ins[entry["valueFrom"]["fieldRef"]["fieldPath"]])
        else:  # a Secret: any well-formed value
            secret = "postgresql+psycopg://maas@db/maas" if "DATABASE_URL" in name else "secret"
            monkeypatch.setenv(name, secret)
    settings = settings_class()
    assert (settings.host, settings.port, settings.advertise_host) == ("0.0.0.0", PORTS[service], "10.1.2.3")
    assert settings.auth_enabled is True
    # The admin token file exists (a Secret), so start-up never writes the read-only tokens file.
    assert settings.resolved_tokens_file == Path(env[f"{prefix}TOKENS_FILE"]["value"])
    assert settings.resolved_admin_token_file == Path(env[f"{prefix}ADMIN_TOKEN_FILE"]["value"])
    assert settings.tls_enabled is (profile == "production")
    assert settings.peer_tls_enabled is (profile == "production")
    chosen = (values_for(service, profile) or {}).get("settings", {})
    for field, value in chosen.items():
        assert getattr(settings, field) == value, field


@pytest.mark.parametrize("service", sorted(SETTINGS_CLASSES))
def test_schema_settings_are_settings_fields(service):
    """The typed `settings` map of each chart names only fields the service really has."""
    module_name, class_name = SETTINGS_CLASSES[service].split(":")
    fields = getattr(importlib.import_module(module_name), class_name).model_fields
    schema = yaml.safe_load((HELM_DIR / service / "values.schema.json").read_text())
    declared = set(schema["properties"]["settings"]["properties"])
    assert declared and declared <= set(fields), declared - set(fields)


def test_registry_reads_postgresql_url_from_a_secret_and_shares_its_blob_volume(manifests):
    deployment = service_deployment(manifests("registry", "production"), "registry")
    env = env_of(container_of(deployment))
    assert env["MAAS_REGISTRY_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "registry-postgres", "key": "url"}
    blob_dir = env["MAAS_REGISTRY_BLOB_DIR"]["value"]
    claim = mounts_by_path(deployment)[blob_dir][1]["persistentVolumeClaim"]["claimName"]
    pvc = of_kind(manifests("registry", "production"), "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    page_key = Path(env["MAAS_REGISTRY_PAGE_TOKEN_SECRET_FILE"]["value"])
    page_key_volume = mounts_by_path(deployment)[str(page_key.parent)][1]
    assert page_key_volume["secret"]["secretName"] == "registry-page-token"


# --- scaling --------------------------------------------------------------------------------

def test_hpa_is_rendered_only_when_enabled(manifests):
    default = manifests("registry")
    assert not of_kind(default, "HorizontalPodAutoscaler")
    assert service_deployment(default, "registry")["spec"]["replicas"] == 1

    production = manifests("registry", "production")
    (hpa,) = of_kind(production, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": f"{RELEASE}-registry"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"]
               for m in hpa["spec"]["metrics"]}
    assert targets == {"cpu": 70, "memory": 80}
    # The HPA owns the replica count: a fixed one would fight it on every upgrade.
    assert "replicas" not in service_deployment(production, "registry")["spec"]


def test_several_registry_replicas_need_shared_state():
    registry = HELM_DIR / "registry"
    with pytest.raises(helm.HelmRenderError, match="need PostgreSQL"):
        render(registry, {"replicaCount": 2})
    with pytest.raises(helm.HelmRenderError, match="page-token key"):
        render(registry, {"replicaCount": 2, "database": {"existingSecret": "pg"}})
    shared = {"replicaCount": 2, "database": {"existingSecret": "pg"},
              "pageTokenSecret": {"existingSecret": "pt"}}
    with pytest.raises(helm.HelmRenderError, match="ReadWriteMany"):
        render(registry, shared)
    shared |= {"blobStore": {"persistence": {"accessModes": ["ReadWriteMany"]}},
               "persistence": {"enabled": False}}
    assert service_deployment(render(registry, shared), "registry")["spec"]["replicas"] == 2


@pytest.mark.parametrize("scaled", [{"autoscaling": {"enabled": True}}, {"replicaCount": 2}])
@pytest.mark.parametrize("service", ["trainer", "compressor"])
def test_job_services_scale_only_on_a_shared_job_table_key_and_volume(service, scaled):
    chart = HELM_DIR / service
    with pytest.raises(helm.HelmRenderError, match="need PostgreSQL"):
        render(chart, scaled)
    shared = {**scaled, "database": {"existingSecret": "pg", "secretKey": "url"}}
    with pytest.raises(helm.HelmRenderError, match="page-token key"):
        render(chart, shared)
    shared["pageTokenSecret"] = {"existingSecret": "pt", "secretKey": "page-token.key"}
    with pytest.raises(helm.HelmRenderError, match="ReadWriteMany"):
        render(chart, shared)
    shared["persistence"] = {"accessModes": ["ReadWriteMany"]}
    documents = render(chart, shared)
    for document in documents:
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
    deployment = service_deployment(documents, service)
    env = env_of(container_of(deployment))
    prefix = f"MAAS_{service.upper()}_"
    assert env[f"{prefix}DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "url"}
    key_file = Path(env[f"{prefix}PAGE_TOKEN_SECRET_FILE"]["value"])
    mount, volume = mounts_by_path(deployment)[str(key_file.parent)]
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == "pt"


@pytest.mark.parametrize("scaled", [{"autoscaling": {"enabled": True}}, {"replicaCount": 2}])
def test_inference_scales_only_on_a_shared_table_with_a_triton_per_replica(scaled):
    chart = HELM_DIR / "inference"
    with pytest.raises(helm.HelmRenderError, match="need PostgreSQL"):
        render(chart, scaled)
    shared = {**scaled, "database": {"existingSecret": "pg", "secretKey": "url"}}
    with pytest.raises(helm.HelmRenderError, match="their own Triton"):
        render(chart, shared)
    shared["triton"] = {"enabled": False}
    with pytest.raises(helm.HelmRenderError, match="ReadWriteOnce"):
        render(chart, shared)
    shared["persistence"] = {"enabled": False}
    documents = render(chart, shared)
    assert set(of_kind(documents, "Deployment")) == {f"{RELEASE}-inference"}
    env = env_of(container_of(service_deployment(documents, "inference")))
    assert env["MAAS_INFERENCE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "url"}
    assert "MAAS_INFERENCE_PAGE_TOKEN_SECRET_FILE" not in env  # the inference service has no such key


# --- Triton ---------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_inference_drives_a_triton_deployment_over_a_shared_model_repository(manifests, profile):
    documents = manifests("inference", profile)
    deployments = of_kind(documents, "Deployment")
    triton = deployments[f"{RELEASE}-inference-triton"]
    inference = deployments[f"{RELEASE}-inference"]
    server = container_of(triton)
    gpus = 2 if profile == "production" else 1

    image = "ghcr.io/maas/triton:"
    assert server["image"].startswith(image)
    assert server["command"] == ["tritonserver"]
    assert "--model-control-mode=explicit" in server["args"]
    assert "--grpc-port=8001" in server["args"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert triton["spec"]["replicas"] == 1 and triton["spec"]["strategy"]["type"] == "Recreate"

    # The inference service dials Triton's gRPC port through the Triton Service ...
    service = of_kind(documents, "Service")[f"{RELEASE}-inference-triton"]
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == 8001
    selector = service["spec"]["selector"].items()
    assert selector <= triton["spec"]["template"]["metadata"]["labels"].items()
    assert not selector <= inference["spec"]["template"]["metadata"]["labels"].items()
    env = env_of(container_of(inference))
    assert env["MAAS_INFERENCE_TRITON_URL"]["value"] == f"{RELEASE}-inference-triton.{NAMESPACE}.svc:8001"

    # ... and writes the model repository that Triton reads: one claim, one path, both pods.
    repository = env["MAAS_INFERENCE_TRITON_MODEL_REPOSITORY"]["value"]
    assert f"--model-repository={repository}" in server["args"]
    writer_mount, writer_volume = mounts_by_path(inference)[repository]
    reader_mount, reader_volume = mounts_by_path(triton)[repository]
    claim = writer_volume["persistentVolumeClaim"]["claimName"]
    assert reader_volume["persistentVolumeClaim"]["claimName"] == claim
    assert reader_mount.get("readOnly") is True and not writer_mount.get("readOnly")
    pvc = of_kind(documents, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("own_secret", ["", "team-triton-key"])
def test_triton_control_is_restricted_to_a_key_only_the_inference_service_mounts(own_secret):
    documents = render(HELM_DIR / "inference", {"triton": {"controlKeySecret": own_secret}})
    deployments = of_kind(documents, "Deployment")
    server = container_of(deployments[f"{RELEASE}-inference-triton"])
    inference = deployments[f"{RELEASE}-inference"]
    secret_name = own_secret or f"{RELEASE}-inference-triton-control-key"

    # Triton restricts exactly the protocols the service's own launcher restricts, to the key.
    setting = (f"{','.join(RESTRICTED_PROTOCOLS)}:{CONTROL_KEY_NAME}=$(MAAS_TRITON_CONTROL_KEY)")
    assert f"--grpc-restricted-protocol={setting}" in server["args"]
    assert f"--http-restricted-api={setting}" in server["args"]
    key_ref = env_of(server)["MAAS_TRITON_CONTROL_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": secret_name, "key": "control-key"}

    # The inference service reads the same key from a read-only file.
    key_file = env_of(container_of(inference))["MAAS_INFERENCE_TRITON_CONTROL_KEY_FILE"]["value"]
    mount, volume = mounts_by_path(inference)[str(Path(key_file).parent)]
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == secret_name

    secrets = of_kind(documents, "Secret")
    if own_secret:
        assert secret_name not in secrets, "a Secret of the team's own is used, not made"
    else:
        key = base64.b64decode(secrets[secret_name]["data"]["control-key"])
        assert len(key) >= 32


def test_triton_gpus_are_configurable_down_to_cpu_only():
    documents = render(HELM_DIR / "inference", {"triton": {"gpus": 0}})
    triton = of_kind(documents, "Deployment")[f"{RELEASE}-inference-triton"]
    assert "nvidia.com/gpu" not in container_of(triton)["resources"].get("limits", {})


def test_inference_without_a_remote_triton_runs_the_bundled_one():
    documents = render(HELM_DIR / "inference", {"triton": {"enabled": False}})
    assert set(of_kind(documents, "Deployment")) == {f"{RELEASE}-inference"}
    assert f"{RELEASE}-inference-model-repository" not in of_kind(documents, "PersistentVolumeClaim")
    env = env_of(container_of(service_deployment(documents, "inference")))
    assert "MAAS_INFERENCE_TRITON_URL" not in env


# --- bad values -----------------------------------------------------------------------------

@pytest.mark.parametrize(("chart", "values", "complaint"), [
    ("registry", {"replicaCount": "many"}, "/replicaCount"),
    ("registry", {"replicas": 3}, "additional properties 'replicas'"),
    ("registry", {"tls": {"enabled": True}}, "/tls/secretName"),
    ("registry", {"auth": {"existingSecret": ""}}, "/auth/existingSecret"),
    ("registry", {"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ("registry", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("registry", {"extraEnv": [{"name": "MAAS_REGISTRY_PORT", "value": "1"}]}, "/extraEnv/0/name"),
    ("trainer", {"settings": {"worker_slotz": 4}}, "additional properties 'worker_slotz'"),
    ("trainer", {"settings": {"worker_slots": "four"}}, "/settings/worker_slots"),
    ("inference", {"triton": {"gpus": -1}}, "/triton/gpus"),
    ("maas", {"inference": {"triton": {"gpus": "all"}}}, "/triton/gpus"),
    ("maas", {"frontend": {"enabled": True}}, "additional properties 'frontend'"),
])
def test_bad_values_fail_rendering_with_a_schema_error(umbrella_dir, chart, values, complaint):
    with pytest.raises(helm.HelmValuesError, match="don't meet the specifications") as caught:
        render(chart_dir(chart, umbrella_dir), values)
    assert complaint in str(caught.value)


@pytest.mark.parametrize("service", SERVICES)
def test_termination_grace_must_outlast_the_drain(service):
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render(HELM_DIR / service, {"terminationGracePeriodSeconds": 10, "shutdownGraceSeconds": 10})


# --- umbrella -------------------------------------------------------------------------------

def test_umbrella_depends_on_the_local_service_charts_and_optional_consul():
    declared = {d["name"]: d for d in helm.dependency_list(HELM_DIR / "maas")}
    for name in SERVICES:
        with helm.Chart.load(HELM_DIR / name) as chart:
            version = chart.version
        assert (declared[name]["repository"], declared[name]["version"]) == (f"file://../{name}", version)
    with helm.Chart.load(HELM_DIR / "maas") as umbrella:
        conditions = {d["name"]: d.get("condition") for d in umbrella.metadata["dependencies"]}
        defaults = umbrella.values
    assert conditions == {name: f"{name}.enabled" for name in [*SERVICES, "consul"]}
    assert declared["consul"]["repository"] == "https://helm.releases.hashicorp.com"
    assert defaults["consul"]["enabled"] is False and defaults["compressor"]["enabled"] is True


def _static_endpoints_match_services(documents: list[dict], expected: set[str]) -> None:
    services = of_kind(documents, "Service")
    deployments = {name: deployment for name, deployment in of_kind(documents, "Deployment").items()
                   if not name.endswith("-triton")}
    assert set(deployments) == {f"{RELEASE}-{name}" for name in expected}
    for deployment in deployments.values():
        endpoints = parse_static_endpoints(env_of(container_of(deployment))["MAAS_STATIC_ENDPOINTS"]["value"])
        assert set(endpoints) == expected
        for name, (endpoint,) in endpoints.items():
            service = services[f"{RELEASE}-{name}"]
            assert endpoint.host == f"{service['metadata']['name']}.{NAMESPACE}.svc"
            assert endpoint.port == service["spec"]["ports"][0]["port"]


def test_umbrella_wires_static_discovery_between_the_enabled_services(manifests):
    documents = manifests("maas")
    _static_endpoints_match_services(documents, {"registry", "trainer", "compressor", "inference"})
    for deployment in of_kind(documents, "Deployment").values():
        assert all(e["name"] != "CONSUL_HTTP_ADDR" for e in container_of(deployment).get("env", []))


def test_umbrella_wires_every_service_to_the_bundled_consul(manifests):
    documents = manifests("maas", "production")
    _static_endpoints_match_services(documents, set(SERVICES))
    for name in SERVICES:
        env = env_of(container_of(service_deployment(documents, name)))
        address = parse_consul_address(env["CONSUL_HTTP_ADDR"]["value"])
        assert (address.host, address.port) == (f"{RELEASE}-consul-server.{NAMESPACE}.svc", 8500)


@pytest.mark.parametrize(("values", "complaint"), [
    ({"compressor": {"enabled": False}}, "lists compressor, which is disabled"),
    ({"trainer": {"enabled": False}}, "lists trainer, which is disabled"),
    ({"registry": {"service": {"port": 6000}}}, "registry.service.port is 6000"),
    ({"consul": {"enabled": True}}, "set global.maas.consul.enabled too"),
])
def test_umbrella_refuses_inconsistent_wiring(umbrella_dir, values, complaint):
    with pytest.raises(helm.HelmRenderError, match=re.escape(complaint)):
        render(umbrella_dir, values)


# --- the charts' own source -----------------------------------------------------------------

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?P<rest>.*)$")


def undocumented_values(text: str) -> list[str]:
    """Leaf values of a values.yaml without a comment on themselves or an enclosing key."""
    lines = text.splitlines()
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    undocumented = []
    for number, line in enumerate(lines):
        match = _KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        previous = next((lines[i].strip() for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        documented = previous.startswith("#") or any(entry[2] for entry in stack)
        following = next((lines[i] for i in range(number + 1, len(lines))
                          if lines[i].strip() and not lines[i].strip().startswith("#")), "")
        is_parent = (not match["rest"].strip()
                     and len(following) - len(following.lstrip(" ")) > indent
                     and not following.strip().startswith("-"))
        if not is_parent and not documented:
            undocumented.append(".".join([*(entry[1] for entry in stack), match["key"]]))
        stack.append((indent, match["key"], documented))
    return undocumented


def test_the_documentation_check_notices_an_undocumented_value():
    assert undocumented_values("# -- Documented.\na: 1\nb:\n  # -- Also.\n  c: 2\n  d: 3\n") == ["b.d"]


@pytest.mark.parametrize("chart", [*SERVICES, "maas"])
def test_every_value_is_documented(chart):
    assert undocumented_values((HELM_DIR / chart / "values.yaml").read_text()) == []
