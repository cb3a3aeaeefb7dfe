"""The shared templates live once, in the maas-common library chart, and the values schemas
come from one shared base.

Every service chart depends on deploy/helm/maas-common (file://, vendored as a symlink in its
charts/ directory so a clean clone renders with no `helm dependency build` and no network);
`helm dependency build` resolves the same dependency offline and renders the same manifests.
The committed values.schema.json files are what tools/gen_helm_schemas.py writes.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from tests.deploy.test_helm_charts import HELM_DIR, NAMESPACE, RELEASE, REPO, SERVICES, render
from tools import gen_helm_schemas

LIBRARY = HELM_DIR / "maas-common"
_DEFINE = re.compile(r'define\s+"([^"]+)"')


def _chart_yaml(path: Path) -> dict:
    return yaml.safe_load((path / "Chart.yaml").read_text())


def test_the_library_chart_is_a_library():
    chart = _chart_yaml(LIBRARY)
    assert chart["type"] == "library"
    assert not list((LIBRARY / "templates").glob("[!_]*")), "a library chart only defines templates"


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
    assert gen_helm_schemas.stale_charts() == []
    assert gen_helm_schemas.main(["--check"]) == 0


def test_the_schema_check_notices_a_hand_edited_schema(tmp_path, monkeypatch):
    for chart in SERVICES:
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
