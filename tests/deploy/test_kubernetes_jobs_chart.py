"""The trainer and compressor charts with kubernetesJobs on: the service runs its jobs as
Kubernetes Jobs, so it gets the executor's settings, a Role for the job resources, the API
token, egress to the API server and a NetworkPolicy for its job pods; all of it off by default.

The env the chart renders is fed to the service's own settings class, which must then select
the Kubernetes launcher with the chart's image, claim and user: the chart and
maas_jobs.kubernetes_executor agree on every setting's name and meaning.
"""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate
import pytest
from maas_compressor.settings import CompressorSettings
from maas_jobs.kubernetes_executor import KubernetesJobLauncher, launcher_for
from maas_trainer.settings import TrainerSettings

from tests.deploy.test_helm_charts import (
    HELM_DIR,
    KUBE_VERSION,
    RELEASE,
    container_of,
    env_of,
    of_kind,
    render,
    service_deployment,
)
from tests.deploy.test_network_policies import ANYWHERE, PROMETHEUS, allowed, grpc, server

JOB_SERVICES = {"trainer": TrainerSettings, "compressor": CompressorSettings}
ENABLED = {"kubernetesJobs": {"enabled": True, "kueueQueue": "team-vision",
                              "worker": {"cpu": "4", "memory": "16Gi", "gpus": 1},
                              "nodeSelector": {"nvidia.com/gpu.present": "true"}},
           "persistence": {"accessModes": ["ReadWriteMany"]}}


def _values(**kubernetes_jobs) -> dict:
    return {**ENABLED, "kubernetesJobs": {**ENABLED["kubernetesJobs"], **kubernetes_jobs}}


@pytest.mark.parametrize("service", JOB_SERVICES)
def test_off_by_default_the_service_never_calls_the_api(service):
    documents = render(HELM_DIR / service)
    assert not of_kind(documents, "Role") and not of_kind(documents, "RoleBinding")
    assert f"{RELEASE}-{service}-jobs" not in of_kind(documents, "NetworkPolicy")
    deployment = service_deployment(documents, service)
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert f"MAAS_{service.upper()}_JOB_EXECUTOR" not in env_of(container_of(deployment))


@pytest.mark.parametrize("service", JOB_SERVICES)
def test_the_rendered_env_selects_the_kubernetes_launcher_in_the_services_settings(service, monkeypatch):
    documents = render(HELM_DIR / service, _values())
    for document in documents:
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
    deployment = service_deployment(documents, service)
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    env = env_of(container_of(deployment))
    for name, entry in env.items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    settings = JOB_SERVICES[service]()
    launcher = launcher_for(settings, service)
    assert isinstance(launcher, KubernetesJobLauncher)
    assert launcher.namespace == "ml" and launcher.run_as == 10001
    assert settings.kubernetes_job_image == container_of(deployment)["image"]
    assert settings.kubernetes_work_claim == f"{RELEASE}-{service}-state"
    assert settings.kubernetes_kueue_queue == "team-vision"
    assert (settings.kubernetes_worker_cpu, settings.kubernetes_worker_memory,
            settings.kubernetes_worker_gpus) == ("4", "16Gi", 1)
    assert settings.kubernetes_node_selector == {"nvidia.com/gpu.present": "true"}
    # The state claim job pods mount is the one the service mounts at its state directory.
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == settings.kubernetes_work_claim
    assert str(launcher.state_dir) == env[f"MAAS_{service.upper()}_STATE_DIR"]["value"]


@pytest.mark.parametrize("service", JOB_SERVICES)
def test_the_role_allows_exactly_what_the_launcher_does(service):
    documents = render(HELM_DIR / service, _values())
    role = of_kind(documents, "Role")[f"{RELEASE}-{service}-jobs"]
    rules = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {"create", "get", "watch", "delete"} <= rules[("batch", "jobs")]
    assert {"delete", "deletecollection"} <= rules[("batch", "jobs")]
    assert rules[("", "services")] == {"create", "get", "delete", "deletecollection"}
    assert rules[("", "pods/log")] == {"get"}
    assert not any(group == "kubeflow.org" for group, _ in rules)
    assert all("*" not in verbs for verbs in rules.values())
    binding = of_kind(documents, "RoleBinding")[f"{RELEASE}-{service}-jobs"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = service_deployment(documents, service)["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ml"}]
    assert account in of_kind(documents, "ServiceAccount")

    with_operator = of_kind(render(HELM_DIR / service, _values(pytorchJob=True)), "Role")
    groups = {group for rule in with_operator[f"{RELEASE}-{service}-jobs"]["rules"]
              for group in rule["apiGroups"]}
    assert "kubeflow.org" in groups


@pytest.mark.parametrize("service", JOB_SERVICES)
def test_job_pods_talk_only_to_each_other_and_the_service_reaches_the_api_server(service):
    documents = render(HELM_DIR / service, _values())
    policies = list(of_kind(documents, "NetworkPolicy").values())
    job_pod = server(service, "job")
    other_job_pod = server(service, "job")
    assert allowed(policies, job_pod, other_job_pod, ("rendezvous", 29500))
    assert not allowed(policies, server("registry"), job_pod, ("rendezvous", 29500))
    assert not allowed(policies, PROMETHEUS, job_pod, ("metrics", 9090))
    assert not allowed(policies, job_pod, ANYWHERE, ("https", 443))
    assert not allowed(policies, job_pod, ANYWHERE, ("", 5432))
    # The service itself now reaches the API server; by default it does not.
    assert allowed(policies, server(service), ANYWHERE, ("https", 443))
    default = list(of_kind(render(HELM_DIR / service), "NetworkPolicy").values())
    assert not allowed(default, server(service), ANYWHERE, ("https", 443))
    assert allowed(policies, server(service), server("registry"), grpc("registry"))


@pytest.mark.parametrize(("values", "complaint"), [
    ({"kubernetesJobs": {"enabled": True}}, "persistence.accessModes needs ReadWriteMany"),
    ({**ENABLED, "persistence": {"enabled": False}}, "needs persistence.enabled"),
    ({**ENABLED, "serviceAccount": {"create": False}}, "set serviceAccount.create"),
])
def test_inconsistent_job_values_fail_rendering(values, complaint):
    with pytest.raises(helm.HelmRenderError, match=complaint):
        render(HELM_DIR / "trainer", values)


@pytest.mark.parametrize(("values", "complaint"), [
    ({"kubernetesJobs": {"enabled": "yes"}}, "/kubernetesJobs/enabled"),
    ({"kubernetesJobs": {"worker": {"gpus": -1}}}, "/kubernetesJobs/worker/gpus"),
    ({"kubernetesJobs": {"worker": {"memory": "lots"}}}, "/kubernetesJobs/worker/memory"),
    ({"kubernetesJobs": {"kueueQueue": "Team Vision"}}, "/kubernetesJobs/kueueQueue"),
])
def test_bad_job_values_fail_the_schema(values, complaint):
    with pytest.raises(helm.HelmValuesError) as caught:
        render(HELM_DIR / "compressor", values)
    assert complaint in str(caught.value)
