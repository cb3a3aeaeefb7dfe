"""The shared templates live once, in the maas-common library chart, and the values schemas
come from one shared base.

Every service chart depends on deploy/helm/maas-common (file://, vendored as a symlink in its
charts/ directory so a clean clone renders with no `helm dependency build` and no network);
`helm dependency build` resolves the same dependency offline and renders the same manifests.
The committed values.schema.json files are what tools/gen_helm_schemas.py writes.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import tarfile
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from tests.deploy.test_helm_charts import (
    HELM_DIR,
    NAMESPACE,
    RELEASE,
    REPO,
    SERVICES,
    SETTINGS_CLASSES,
    container_of,
    env_of,
    mounts_by_path,
    render,
    service_deployment,
)
from tools import gen_helm_schemas

LIBRARY = HELM_DIR / "maas-common"
_DEFINE = re.compile(r'define\s+"([^"]+)"')


def _chart_yaml(path: Path) -> dict:
    return yaml.safe_load((path / "Chart.yaml").read_text())


def test_the_library_chart_is_a_library_and_lints_clean():
    chart = _chart_yaml(LIBRARY)
    assert chart["type"] == "library"
    assert not list((LIBRARY / "templates").glob("[!_]*")), "a library chart only defines templates"
    report = helm.lint(LIBRARY, None, strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_chart_takes_the_shared_templates_from_the_library(service):
    chart_dir = HELM_DIR / service
    (dependency,) = [d for d in _chart_yaml(chart_dir)["dependencies"] if d["name"] == "maas-common"]
    assert dependency == {"name": "maas-common", "version": _chart_yaml(LIBRARY)["version"],
                          "repository": "file://../maas-common"}
    vendored = chart_dir / "charts" / "maas-common"
    assert vendored.is_symlink() and vendored.resolve() == LIBRARY.resolve()
    # The service chart defines only its own "<chart>.*" templates; no shared one is copied.
    library_names = {name for tpl in (LIBRARY / "templates").glob("*.tpl")
                     for name in _DEFINE.findall(tpl.read_text())}
    for template in (chart_dir / "templates").iterdir():
        names = set(_DEFINE.findall(template.read_text()))
        assert all(name.startswith(f"{service}.") for name in names), (template, names)
        assert not names & library_names


@pytest.mark.parametrize("service", ["registry", "trainer"])
def test_dependency_build_resolves_the_library_offline_to_the_same_manifests(tmp_path, service):
    """What `helm dependency build` does on a checkout without the symlink: the file://
    dependency is packed into charts/ from the repository, with no chart repository reached."""
    shutil.copytree(LIBRARY, tmp_path / "maas-common")
    shutil.copytree(HELM_DIR / service, tmp_path / service, symlinks=True)
    (tmp_path / service / "charts" / "maas-common").unlink()
    helm.dependency_build(tmp_path / service)
    assert [p.name for p in (tmp_path / service / "charts").iterdir()] == ["maas-common-0.1.0.tgz"]
    assert render(tmp_path / service) == render(HELM_DIR / service)


def test_a_packaged_service_chart_carries_the_library(tmp_path):
    archive = Path(helm.package(HELM_DIR / "trainer", destination=tmp_path))
    with tarfile.open(archive) as packed:
        names = packed.getnames()
    assert "trainer/charts/maas-common/Chart.yaml" in names
    assert "trainer/charts/maas-common/templates/_deployment.tpl" in names


def test_the_shared_named_templates_render_the_service_charts_resources():
    with helm.Chart.load(HELM_DIR / "compressor") as chart:
        rendered = chart.render(None, name=RELEASE, namespace=NAMESPACE)
    assert "compressor is listening on" in rendered["compressor/templates/NOTES.txt"]
    assert yaml.safe_load(rendered["compressor/templates/deployment.yaml"])["kind"] == "Deployment"


# --- values schemas from one base ------------------------------------------------------------

def test_the_committed_values_schemas_are_the_generated_ones():
    """Fails after a change to deploy/helm/schema/ or to a service's settings class (a field
    added, a bound changed) until `make helm-schemas` regenerates the charts' schemas."""
    assert gen_helm_schemas.stale_charts() == [], "stale values.schema.json: run make helm-schemas"
    assert gen_helm_schemas.main(["--check"]) == 0


def test_the_schema_check_notices_a_hand_edited_schema(tmp_path, monkeypatch):
    for chart in gen_helm_schemas.CHARTS:
        shutil.copy(HELM_DIR / chart / "values.schema.json", tmp_path / f"{chart}.json")
    monkeypatch.setattr(gen_helm_schemas, "target", lambda chart: tmp_path / f"{chart}.json")
    edited = json.loads((tmp_path / "trainer.json").read_text())
    edited["properties"]["replicaCount"]["maximum"] = 3
    (tmp_path / "trainer.json").write_text(json.dumps(edited, indent=2) + "\n")
    assert gen_helm_schemas.stale_charts() == ["trainer"]
    assert gen_helm_schemas.main(["--check"]) == 1


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_schema_shares_the_base(service):
    base = json.loads((HELM_DIR / "schema" / "base.json").read_text())
    schema = json.loads((HELM_DIR / service / "values.schema.json").read_text())
    for key, definition in base["properties"].items():
        assert schema["properties"][key] == definition
    assert set(base["required"]) <= set(schema["required"])


def test_a_chart_part_may_not_redefine_a_base_property():
    base = json.loads((HELM_DIR / "schema" / "base.json").read_text())
    with pytest.raises(ValueError, match="replicaCount"):
        gen_helm_schemas.merged_schema(base, {"title": "t", "required": [],
                                              "properties": {"replicaCount": {"type": "string"}}})


def test_the_generator_lives_under_tools():
    assert Path(gen_helm_schemas.__file__).resolve() == REPO / "tools" / "gen_helm_schemas.py"


def test_the_job_service_charts_include_the_shared_jobs_fragment():
    fragment = json.loads((HELM_DIR / "schema" / "jobs.json").read_text())
    for chart in SERVICES:
        schema = json.loads((HELM_DIR / chart / "values.schema.json").read_text())
        includes = chart in ("trainer", "compressor")
        assert ("kubernetesJobs" in schema["properties"]) is includes, chart
        if includes:
            assert schema["properties"]["kubernetesJobs"] == fragment["properties"]["kubernetesJobs"]
            assert "kubernetesJobs" in schema["required"]
    base = json.loads((HELM_DIR / "schema" / "base.json").read_text())
    with pytest.raises(ValueError, match="kubernetesJobs"):
        gen_helm_schemas.merged_schema(
            base, {"title": "t", "include": ["jobs"], "required": [],
                   "properties": {"kubernetesJobs": {"type": "object"}}}, {"jobs": fragment})


# --- settings from the services' settings classes ---------------------------------------------

def _excluded(chart: str) -> dict[str, str]:
    parts = [json.loads((HELM_DIR / "schema" / "base.json").read_text())]
    own = json.loads((HELM_DIR / "schema" / f"{chart}.json").read_text())
    parts += [json.loads((HELM_DIR / "schema" / f"{name}.json").read_text())
              for name in own.get("include", [])]
    excluded = {name: reason for part in parts for name, reason in part.get("settingsExclude", {}).items()}
    return {**excluded, **own["settings"].get("exclude", {})}


def _settings_class(chart: str):
    module_name, class_name = SETTINGS_CLASSES[chart].split(":")
    return getattr(importlib.import_module(module_name), class_name)


# Values turning on everything a chart can set, so each field it sets itself shows up as env.
_EVERYTHING = {
    "tls": {"enabled": True, "secretName": "tls", "requireClientCertificates": True,
            "peers": {"enabled": True, "presentClientCertificate": True, "serverName": "registry"}},
    "otlpEndpoint": "http://otel:4317", "database": {"existingSecret": "pg", "secretKey": "url"},
    "pageTokenSecret": {"existingSecret": "pt", "secretKey": "k"},
    "discovery": {"consulHttpAddr": "http://consul:8500", "staticEndpoints": "registry=r:50051"},
    "global": {"maas": {"consul": {"tokenSecret": {"name": "acl", "key": "token"}}}},
}
_EVERYTHING_BY_CHART = {
    "registry": {},
    "trainer": {"registryTarget": "r:50051", "persistence": {"accessModes": ["ReadWriteMany"]},
                "kubernetesJobs": {"enabled": True, "kueueQueue": "q", "serviceAccountName": "jobs",
                                   "nodeSelector": {"gpu": "yes"}}},
    "inference": {"registryTarget": "r:50051", "openai": {"enabled": True, "port": 8080},
                  "tenancy": {"existingConfigMap": "limits", "key": "tenancy.yaml"}},
}
_EVERYTHING_BY_CHART["compressor"] = _EVERYTHING_BY_CHART["trainer"]
# Fields the charts leave to the service's default on purpose (the reason is in the schema part).
_LEFT_TO_THE_SERVICE = {
    "registry": set(),
    "trainer": {"python_executable", "jobs_dir", "replica_id"},
    "compressor": {"python_executable", "jobs_dir", "replica_id"},
    "inference": {"data_plane_binary"},
}
# Fields set through env names of their own (read by the runtime's settings under aliases).
_OWN_ENV_NAMES = {"consul_http_addr": "CONSUL_HTTP_ADDR", "consul_token": "CONSUL_HTTP_TOKEN",
                  "static_endpoints": "MAAS_STATIC_ENDPOINTS"}


@pytest.mark.parametrize("chart", SERVICES)
def test_every_settings_field_is_a_chart_setting_or_set_by_the_chart(chart):
    """The chart is complete: each field of the service's settings class is either accepted
    under `settings` or set by the chart itself from its own values (rendered as env when those
    values are on), except the few left to the service's default, each with a reason."""
    fields = set(_settings_class(chart).model_fields)
    schema = json.loads((HELM_DIR / chart / "values.schema.json").read_text())
    accepted = set(schema["properties"]["settings"]["properties"])
    excluded = _excluded(chart)
    assert accepted | set(excluded) == fields and not accepted & set(excluded)
    assert all(reason.strip() for reason in excluded.values())

    documents = render(HELM_DIR / chart, {**_EVERYTHING, **_EVERYTHING_BY_CHART[chart]})
    env = env_of(container_of(service_deployment(documents, chart)))
    prefix = f"MAAS_{chart.upper()}_"
    rendered = {name.removeprefix(prefix).lower() for name in env if name.startswith(prefix)}
    rendered |= {field for field, name in _OWN_ENV_NAMES.items() if name in env}
    rendered |= {"peer_tls"} if f"{prefix}PEER_TLS_CA_FILE" in env else set()  # implied by the CA file
    assert set(excluded) - rendered == _LEFT_TO_THE_SERVICE[chart]


def test_list_and_map_settings_render_as_json_the_service_parses(monkeypatch):
    documents = render(HELM_DIR / "inference", {"settings": {"usage_metrics_tenants": ["vision", "nlp"],
                                                             "usage_flush_seconds": 2.5}})
    env = env_of(container_of(service_deployment(documents, "inference")))
    assert json.loads(env["MAAS_INFERENCE_USAGE_METRICS_TENANTS"]["value"]) == ["vision", "nlp"]
    for name in ("MAAS_INFERENCE_USAGE_METRICS_TENANTS", "MAAS_INFERENCE_USAGE_FLUSH_SECONDS"):
        monkeypatch.setenv(name, env[name]["value"])
    settings = _settings_class("inference")()
    assert settings.usage_metrics_tenants == ["vision", "nlp"] and settings.usage_flush_seconds == 2.5


def test_the_settings_schema_carries_the_fields_types_and_bounds():
    schema = json.loads((HELM_DIR / "trainer" / "values.schema.json").read_text())
    worker_slots = schema["properties"]["settings"]["properties"]["worker_slots"]
    assert worker_slots["type"] == "integer" and worker_slots["minimum"] == 1
    assert "default" not in worker_slots and "description" not in worker_slots
    with pytest.raises(helm.HelmValuesError, match="/settings/worker_slots"):
        render(HELM_DIR / "trainer", {"settings": {"worker_slots": 0}})
    with pytest.raises(helm.HelmValuesError, match="additional properties 'port'"):
        render(HELM_DIR / "trainer", {"settings": {"port": 1}})


def test_an_exclusion_naming_no_field_is_refused():
    with pytest.raises(ValueError, match="no fields"):
        gen_helm_schemas.settings_schema(SETTINGS_CLASSES["registry"], {"no_such_field": "gone"})


def test_the_tenancy_limits_file_comes_from_a_configmap_the_service_reads(monkeypatch):
    documents = render(HELM_DIR / "inference", {"tenancy": {"existingConfigMap": "limits",
                                                            "key": "tenancy.yaml"}})
    deployment = service_deployment(documents, "inference")
    env = env_of(container_of(deployment))
    limits_file = Path(env["MAAS_INFERENCE_TENANCY_FILE"]["value"])
    mount, volume = mounts_by_path(deployment)[str(limits_file.parent)]
    assert mount["readOnly"] is True and "subPath" not in mount  # refreshed by the kubelet
    assert volume["configMap"] == {"name": "limits", "items": [{"key": "tenancy.yaml",
                                                                  "path": "tenancy.yaml"}]}
    monkeypatch.setenv("MAAS_INFERENCE_TENANCY_FILE", str(limits_file))
    assert _settings_class("inference")().tenancy_file == str(limits_file)
    assert "MAAS_INFERENCE_TENANCY_FILE" not in env_of(container_of(service_deployment(
        render(HELM_DIR / "inference"), "inference")))


def test_the_umbrella_schema_checks_the_globals_with_the_base_definition():
    base = json.loads((HELM_DIR / "schema" / "base.json").read_text())
    umbrella = json.loads((HELM_DIR / "maas" / "values.schema.json").read_text())
    assert umbrella["properties"]["global"] == base["properties"]["global"]
    assert "maas" in gen_helm_schemas.CHARTS
