"""The Kubernetes job executor: manifests rendered and schema-validated, the real client's
requests checked, the launcher driven against a stand-in for its API layer, and the executor
setting's selection.

No cluster is reachable here (and no stand-in API server is used). What can be checked is:
- `batch/v1` Jobs and Services against kubernetes-validate's OpenAPI schema (strict: unknown
  fields fail) for every Kubernetes version the charts support, and against the `kubernetes`
  client's own models (strict types; a round trip that would drop an unknown field fails);
- Kubeflow `kubeflow.org/v1` PyTorchJobs against the training operator's own API models, the
  `kubeflow-training` SDK generated from the operator's OpenAPI document (every field named
  and typed, required ones present), its constants (group, version, plural, replica types,
  the container the operator injects into), and the CRD's enums; their pod templates as
  core/v1 PodTemplateSpecs (strict);
- Kueue's convention: the `kueue.x-k8s.io/queue-name` label (its annotation form is
  deprecated) with a LocalQueue name as value, the workload created suspended;
- `ClientApi`: each call made through the real `kubernetes` client, whose HTTP requests
  (method, path, query, body) are recorded at its REST transport and never answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sys
import urllib.parse
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubeflow.training import models as kubeflow_models
from kubeflow.training.constants import constants as kubeflow
from kubernetes import client as kubernetes_client
from kubernetes.client import rest as kubernetes_rest
from kubernetes.client.exceptions import ApiException
from maas_compressor.settings import CompressorSettings
from maas_jobs.executor import JobProcess, LaunchSpec
from maas_jobs.kubernetes_executor import (
    COMPLETION_INDEX_LABEL,
    JOB_SPEC_ENV,
    KUEUE_QUEUE_LABEL,
    ClientApi,
    KubernetesExecutorSettings,
    KubernetesJob,
    KubernetesJobLauncher,
    ProcessLauncher,
    launcher_for,
    render_job_manifests,
    resource_name,
    work_volume_path,
)
from maas_jobs.manager import JobManager, JobManagerConfig, JobRunner
from maas_jobs.progress import PROGRESS_PREFIX
from maas_jobs.records import EventKind, JobCollection, JobDraft, JobRecord, JobState, LogLevel
from maas_jobs.store import SqlJobStore
from maas_runtime.pagination import PageTokenCodec
from maas_trainer.runner import JOB_PROCESS_MODULE, RunnerConfig, job_process_command
from maas_trainer.settings import TrainerSettings
from pydantic import ValidationError
from pydantic_settings import SettingsError

KUBE_VERSION = kubernetes_validate.latest_version()
NAMESPACE = "ml"
STATE_DIR = Path("/var/lib/maas")
IMAGE = "ghcr.io/maas/trainer:1.0.0"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def job_record(job_id: str = "j-42", workers: int = 1, tenant: str = "vision") -> JobRecord:
    return JobRecord(job_id=job_id, spec={"epochs": 3, "data": {"dataset": "datasets/digits"}},
                     tenant=tenant, creator="alice", workers=workers, priority=0,
                     state=JobState.RUNNING, create_time=datetime(2026, 1, 1, tzinfo=UTC))


def trainer_launch(workers: int, job_id: str = "j-42") -> LaunchSpec:
    """The launch spec the trainer's runner builds (its real command line)."""
    workdir = STATE_DIR / "jobs" / job_id
    config = RunnerConfig(python_executable="/opt/venv/bin/python", torch_threads=2)
    return LaunchSpec(argv=job_process_command(config, workers, workdir), cwd=workdir,
                      log_path=workdir / "job.log", env={"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"})


def settings(**overrides: Any) -> KubernetesExecutorSettings:
    return KubernetesExecutorSettings(job_executor="kubernetes", kubernetes_job_image=IMAGE,
                                      kubernetes_work_claim="maas-trainer-state",
                                      kubernetes_service_account="trainer-jobs",
                                      kubernetes_worker_cpu="4", kubernetes_worker_memory="16Gi",
                                      **overrides)


def render(workers: int = 1, **overrides: Any):
    return render_job_manifests(service="trainer", job=job_record(workers=workers),
                                launch=trainer_launch(workers), settings=settings(**overrides),
                                namespace=NAMESPACE, state_dir=STATE_DIR, run_as=10001)


def validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def pod_spec_of(template: dict) -> dict:
    """Validate a pod template as a core/v1 PodTemplate (strict) and return its pod spec."""
    validate({"apiVersion": "v1", "kind": "PodTemplate",
              "metadata": {"name": "check", "namespace": NAMESPACE}, "template": template})
    return template["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container["env"]}


# --- rendering ----------------------------------------------------------------------------------

def test_a_single_worker_job_is_one_batch_job_running_the_launch_command():
    rendered = render(workers=1)
    assert [m["kind"] for m in rendered.manifests] == ["Job"]
    job = rendered.workload
    validate(job)
    assert job["metadata"]["name"] == "trainer-job-j-42-r0" and job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["suspend"] is False
    assert "completionMode" not in job["spec"]
    (container,) = pod_spec_of(job["spec"]["template"])["containers"]
    # The same interpreter, module and working directory a local process would get.
    assert container["command"] == trainer_launch(1).argv
    assert container["command"][1:3] == ["-m", JOB_PROCESS_MODULE]
    assert container["workingDir"] == str(STATE_DIR / "jobs" / "j-42")
    assert container["image"] == IMAGE
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    env = env_of(container)
    assert json.loads(env[JOB_SPEC_ENV]) == job_record().spec
    assert env["OMP_NUM_THREADS"] == "2"
    assert rendered.lead_pod_selector == "job-name=trainer-job-j-42-r0"


def test_job_pods_are_hardened_and_mount_the_shared_state_volume_at_the_same_path():
    pod = render().workload["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "trainer-jobs"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[str(STATE_DIR)]]["persistentVolumeClaim"]["claimName"] == "maas-trainer-state"
    assert "/tmp" in mounts  # the root filesystem is read-only


def test_owner_labels_name_the_service_the_job_and_the_tenant():
    job = render().workload
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/name"] == "trainer"
        assert labels["app.kubernetes.io/component"] == "job"
        assert labels["maas.io/job-id"] == "j-42" and labels["maas.io/tenant"] == "vision"
    assert KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]


def test_torchrun_workers_run_as_an_indexed_job_with_a_headless_rendezvous_service():
    rendered = render(workers=3)
    service, job = rendered.manifests
    assert (service["kind"], job["kind"]) == ("Service", "Job")
    validate(service)
    validate(job)
    name = rendered.name
    assert service["metadata"]["name"] == name and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"][0]["port"] == 29500
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = pod_spec_of(spec["template"])
    assert pod["subdomain"] == name
    # The Service selects exactly this job's pods.
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:3] == ["/opt/venv/bin/python", "-m", "torch.distributed.run"]
    assert "--nnodes=3" in command and "--nproc-per-node=1" in command
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert f"--master-addr={name}-0.{name}.{NAMESPACE}.svc" in command
    assert command[-3:] == ["-m", JOB_PROCESS_MODULE, str(STATE_DIR / "jobs" / "j-42")]
    assert rendered.lead_pod_selector == f"job-name={name},{COMPLETION_INDEX_LABEL}=0"
    # Each worker pod requests one worker's resources.
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}


def test_gpus_per_worker_are_requested_and_limited():
    pod = render(workers=2, kubernetes_worker_gpus=1).workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("workers", [1, 4])
def test_a_kueue_queue_labels_the_job_and_creates_it_suspended(workers):
    rendered = render(workers=workers, kubernetes_kueue_queue="team-vision")
    job = rendered.workload
    validate(job)
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-vision"
    assert job["spec"]["suspend"] is True


def conforms_to_client_model(manifest: dict) -> None:
    """`manifest` is exactly what the `kubernetes` client's model of its kind describes:
    strict field types, and nothing the model does not know (dropped by a round trip)."""
    model = getattr(kubernetes_client, f"V1{manifest['kind']}").from_dict(manifest)
    assert kubernetes_client.ApiClient().sanitize_for_serialization(model) == manifest


_PRIMITIVES: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def conforms_to_kubeflow_model(value: Any, type_name: str, where: str = "$") -> None:
    """`value` matches `type_name` of the training operator's API models (kubeflow-training,
    generated from the operator's OpenAPI document): every field known and typed, required
    ones present; the Kubernetes types inside (metadata, pod templates) are checked by the
    `kubernetes` client's models."""
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{where}: not a list"
        for index, item in enumerate(value):
            conforms_to_kubeflow_model(item, type_name[5:-1], f"{where}[{index}]")
    elif type_name.startswith("dict(str, "):
        assert isinstance(value, dict), f"{where}: not a map"
        for key, item in value.items():
            conforms_to_kubeflow_model(item, type_name[10:-1], f"{where}.{key}")
    elif type_name in _PRIMITIVES:
        assert isinstance(value, _PRIMITIVES[type_name]) and (
            type_name == "bool" or not isinstance(value, bool)), f"{where}: not {type_name}"
    elif type_name.startswith("KubeflowOrgV1"):
        model = getattr(kubeflow_models, type_name)
        assert isinstance(value, dict), f"{where}: not an object"
        unknown = set(value) - set(model.attribute_map.values())
        assert not unknown, f"{where}: {type_name} has no field {sorted(unknown)}"
        present = {attribute: value[key] for attribute, key in model.attribute_map.items()
                   if key in value}
        for attribute, item in present.items():
            conforms_to_kubeflow_model(item, model.openapi_types[attribute],
                                       f"{where}.{model.attribute_map[attribute]}")
        try:
            model(**present)  # its setters refuse a required field left out
        except ValueError as error:
            raise AssertionError(f"{where}: {error}") from None
    else:
        assert isinstance(value, dict), f"{where}: not an object"
        model = getattr(kubernetes_client, type_name).from_dict(value)
        assert kubernetes_client.ApiClient().sanitize_for_serialization(model) == value, where


def validate_pytorchjob(manifest: dict) -> None:
    """A kubeflow.org/v1 PyTorchJob the training operator accepts and runs as we mean it."""
    assert manifest["apiVersion"] == kubeflow.API_VERSION
    assert manifest["kind"] == kubeflow.PYTORCHJOB_KIND
    conforms_to_kubeflow_model(manifest, "KubeflowOrgV1PyTorchJob")
    assert _DNS_LABEL.match(manifest["metadata"]["name"]) and manifest["metadata"]["namespace"]
    spec = manifest["spec"]
    # The CRD's enums (the models type them as plain strings).
    assert spec["runPolicy"]["cleanPodPolicy"] in ("All", "Running", "None")
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {kubeflow.REPLICA_TYPE_MASTER, kubeflow.REPLICA_TYPE_WORKER}
    assert replicas[kubeflow.REPLICA_TYPE_MASTER]["replicas"] == 1
    for replica in replicas.values():
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        containers = pod_spec_of(replica["template"])["containers"]
        # The operator injects its rendezvous env into the container of this name.
        assert [c["name"] for c in containers] == [kubeflow.PYTORCHJOB_CONTAINER]


def test_multi_worker_jobs_become_pytorchjobs_when_the_operator_is_installed():
    rendered = render(workers=4, kubernetes_pytorchjob=True, kubernetes_kueue_queue="team-vision")
    assert [m["kind"] for m in rendered.manifests] == ["PyTorchJob"]
    job = rendered.workload
    validate_pytorchjob(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-vision"
    command = replicas["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=4" in command and "--node-rank=$(RANK)" in command
    assert "--master-addr=$(MASTER_ADDR)" in command and "--master-port=$(MASTER_PORT)" in command
    assert replicas["Master"]["template"]["metadata"]["labels"]["maas.io/lead"] == "true"
    lead = dict(part.split("=") for part in rendered.lead_pod_selector.split(","))
    assert lead.items() <= replicas["Master"]["template"]["metadata"]["labels"].items()
    assert not lead.items() <= replicas["Worker"]["template"]["metadata"]["labels"].items()
    assert lead["maas.io/attempt"] == "0"  # an earlier attempt's terminating pods don't match
    assert replicas["Worker"]["template"]["metadata"]["labels"]["maas.io/lead"] == "false"
    # A single worker needs no operator: still a plain Job.
    assert render(workers=1, kubernetes_pytorchjob=True).kind == "Job"


def test_the_pytorchjob_check_is_not_vacuous():
    def broken(change) -> dict:
        job = render(workers=2, kubernetes_pytorchjob=True).workload
        change(job)
        return job

    def rename_container(job):
        job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "job"

    def misspell_field(job):
        job["spec"]["pytorchReplicaSpec"] = job["spec"].pop("pytorchReplicaSpecs")

    def quote_a_count(job):
        job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"

    def misspell_run_policy_field(job):
        job["spec"]["runPolicy"]["ttlSecondsAfterFinish"] = job["spec"]["runPolicy"].pop(
            "ttlSecondsAfterFinished")

    def unknown_replica_type(job):
        job["spec"]["pytorchReplicaSpecs"]["Chief"] = job["spec"]["pytorchReplicaSpecs"].pop("Worker")

    def misspell_metadata_field(job):
        job["metadata"]["label"] = job["metadata"].pop("labels")

    for change in (rename_container, misspell_field, quote_a_count, misspell_run_policy_field,
                   unknown_replica_type, misspell_metadata_field):
        with pytest.raises(AssertionError):
            validate_pytorchjob(broken(change))
    validate_pytorchjob(render(workers=2, kubernetes_pytorchjob=True).workload)


def test_jobs_and_services_are_what_the_kubernetes_clients_models_describe():
    for workers in (1, 3):
        for manifest in render(workers=workers, kubernetes_kueue_queue="q").manifests:
            conforms_to_client_model(manifest)
    quoted = render(workers=3).workload
    quoted["spec"]["completions"] = "3"
    with pytest.raises(ValueError):  # pydantic's ValidationError
        conforms_to_client_model(quoted)
    unknown = render(workers=3).workload
    unknown["spec"]["completionz"] = 3
    with pytest.raises(AssertionError):
        conforms_to_client_model(unknown)


_QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                             r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LOCAL_QUEUE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@pytest.mark.parametrize("workers,pytorchjob", [(1, False), (3, False), (3, True)])
def test_kueue_finds_the_queue_by_its_label_on_a_suspended_workload(workers, pytorchjob):
    """Kueue reads the LocalQueue from the workload's `kueue.x-k8s.io/queue-name` label (the
    annotation of that name is deprecated) and admits a workload created suspended."""
    workload = render(workers=workers, kubernetes_kueue_queue="team-vision",
                      kubernetes_pytorchjob=pytorchjob).workload
    labels = workload["metadata"]["labels"]
    assert KUEUE_QUEUE_LABEL == "kueue.x-k8s.io/queue-name"
    assert labels[KUEUE_QUEUE_LABEL] == "team-vision"
    assert KUEUE_QUEUE_LABEL not in workload["metadata"].get("annotations", {})
    for key, value in labels.items():  # what the API server accepts as labels
        assert _QUALIFIED_NAME.match(key) and len(key.split("/")[-1]) <= 63, key
        assert value == "" or (_QUALIFIED_NAME.match(value) and len(value) <= 63), value
    assert _LOCAL_QUEUE_NAME.match(labels[KUEUE_QUEUE_LABEL])
    suspended = workload["spec"]["runPolicy"] if pytorchjob else workload["spec"]
    assert suspended["suspend"] is True
    # Only the workload is queued: its pods are Kueue's to start, not labelled for it.
    pod_templates = ([r["template"] for r in workload["spec"]["pytorchReplicaSpecs"].values()]
                     if pytorchjob else [workload["spec"]["template"]])
    assert all(KUEUE_QUEUE_LABEL not in t["metadata"]["labels"] for t in pod_templates)


@pytest.mark.parametrize("queue", ["Team", "team_vision", "-team", "a" * 64, "team/gpu"])
def test_a_queue_name_kueue_could_not_match_is_refused(queue):
    """Not a LocalQueue name, or not a label value: the Job's creation would fail (422)."""
    with pytest.raises(ValidationError, match="kubernetes_kueue_queue"):
        settings(kubernetes_kueue_queue=queue)


# --- the real client's requests -----------------------------------------------------------------

class RecordingTransport(kubernetes_rest.RESTClientObject):
    """The `kubernetes` client's REST transport, recording each request it is asked to send
    instead of sending it (there is no cluster): no answer is made up."""

    def __init__(self, configuration: kubernetes_client.Configuration) -> None:
        super().__init__(configuration)
        self.requests: list[tuple[str, str, Any]] = []

    def request(self, method, url, headers=None, body=None, post_params=None,
                _request_timeout=None):
        self.requests.append((method, url.removeprefix(CLUSTER), body))
        raise ApiException(status=0, reason="no cluster here: the request was recorded")


CLUSTER = "https://kubernetes.default.svc"


def _recorded(call) -> tuple[str, str, Any]:
    """The one request `call(ClientApi)` makes through the real client."""
    api_client = kubernetes_client.ApiClient(kubernetes_client.Configuration(host=CLUSTER))
    transport = RecordingTransport(api_client.configuration)
    api_client.rest_client = transport
    with pytest.raises(ApiException, match="recorded"):
        result = call(ClientApi(api_client))
        if isinstance(result, Iterable):
            list(result)
    (request,) = transport.requests
    return request


def test_the_client_api_creates_each_manifest_at_its_kinds_endpoint_unchanged():
    pytorch_path = (f"/apis/{kubeflow.GROUP}/{kubeflow.VERSION}/namespaces/{NAMESPACE}/"
                    f"{kubeflow.PYTORCHJOB_PLURAL}")
    expected = {"Service": f"/api/v1/namespaces/{NAMESPACE}/services",
                "Job": f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs",
                "PyTorchJob": pytorch_path}
    manifests = render(workers=3).manifests + [render(workers=3, kubernetes_pytorchjob=True).workload]
    for manifest in manifests:
        method, path, body = _recorded(lambda api, manifest=manifest: api.create(manifest))
        assert (method, path) == ("POST", expected[manifest["kind"]])
        assert body == manifest  # sent as rendered: nothing dropped or coerced on the way
        if manifest["kind"] == "PyTorchJob":
            validate_pytorchjob(body)
        else:
            conforms_to_client_model(body)


def test_the_client_api_reads_and_deletes_where_the_kubernetes_api_has_them():
    jobs = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    pytorch_jobs = (f"/apis/{kubeflow.GROUP}/{kubeflow.VERSION}/namespaces/{NAMESPACE}/"
                    f"{kubeflow.PYTORCHJOB_PLURAL}")
    services = f"/api/v1/namespaces/{NAMESPACE}/services"
    pods = f"/api/v1/namespaces/{NAMESPACE}/pods"
    selector = "maas.io/job-id=j-42,maas.io/attempt=0"
    foreground = {"propagationPolicy": ["Foreground"]}
    selected = {"labelSelector": [selector]}
    cases = [
        (lambda api: api.delete("Job", "n", NAMESPACE), ("DELETE", f"{jobs}/n", foreground)),
        (lambda api: api.delete("PyTorchJob", "n", NAMESPACE),
         ("DELETE", f"{pytorch_jobs}/n", foreground)),
        (lambda api: api.delete("Service", "n", NAMESPACE), ("DELETE", f"{services}/n", {})),
        (lambda api: api.delete_all(["Job"], selector, NAMESPACE),
         ("DELETE", jobs, {**selected, **foreground})),
        (lambda api: api.delete_all(["PyTorchJob"], selector, NAMESPACE),
         ("DELETE", pytorch_jobs, {**selected, **foreground})),
        (lambda api: api.delete_all(["Service"], selector, NAMESPACE),
         ("DELETE", services, selected)),
        (lambda api: api.workload_status("Job", "n", NAMESPACE), ("GET", f"{jobs}/n/status", {})),
        (lambda api: api.workload_status("PyTorchJob", "n", NAMESPACE),
         ("GET", f"{pytorch_jobs}/n/status", {})),
        (lambda api: api.pod_phase(selector, NAMESPACE), ("GET", pods, selected)),
        (lambda api: api.follow_log("p", NAMESPACE), ("GET", f"{pods}/p/log", {"follow": ["true"]})),
    ]
    for call, expected in cases:
        method, url, _ = _recorded(call)
        path, _, query = url.partition("?")
        assert (method, path, urllib.parse.parse_qs(query)) == expected


def test_the_kubernetes_validation_rejects_a_broken_job():
    job = render(workers=3).workload
    job["spec"]["completionMode"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_compressor_jobs_render_the_same_way():
    workdir = STATE_DIR / "jobs" / "c1"
    launch = LaunchSpec(argv=["/opt/venv/bin/python", "-m", "maas_compressor.job_process", str(workdir)],
                        cwd=workdir, log_path=workdir / "job.log")
    rendered = render_job_manifests(service="compressor", job=job_record("c1"), launch=launch,
                                    settings=settings(), namespace=NAMESPACE, state_dir=STATE_DIR,
                                    run_as=10001)
    validate(rendered.workload)
    assert rendered.name == "compressor-job-c1-r0"
    assert rendered.workload["spec"]["template"]["spec"]["containers"][0]["command"] == launch.argv


@pytest.mark.parametrize("job_id", ["a.b_c", "x" * 63, "Z" * 3])
def test_resource_names_are_dns_labels_short_enough_for_indexed_pod_hostnames(job_id):
    name = resource_name("compressor", job_id)
    assert _DNS_LABEL.match(name) and len(name) <= 52
    assert name != resource_name("compressor", job_id + "1")


def test_a_command_without_a_module_cannot_run_on_the_cluster():
    launch = LaunchSpec(argv=["/bin/sh", "-c", "true"], cwd=STATE_DIR, log_path=STATE_DIR / "job.log")
    with pytest.raises(ValueError, match="python -m"):
        render_job_manifests(service="trainer", job=job_record(), launch=launch, settings=settings(),
                             namespace=NAMESPACE, state_dir=STATE_DIR, run_as=10001)


# --- selecting the executor ---------------------------------------------------------------------

@pytest.mark.parametrize("settings_class", [TrainerSettings, CompressorSettings])
def test_the_local_process_executor_stays_the_default(settings_class, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    service_settings = settings_class()
    assert service_settings.job_executor == "process"
    assert isinstance(launcher_for(service_settings, "trainer"), ProcessLauncher)


def test_the_executor_setting_selects_the_kubernetes_launcher(monkeypatch, tmp_path):
    monkeypatch.setenv("MAAS_TRAINER_JOB_EXECUTOR", "kubernetes")
    monkeypatch.setenv("MAAS_TRAINER_KUBERNETES_JOB_IMAGE", IMAGE)
    monkeypatch.setenv("MAAS_TRAINER_KUBERNETES_NAMESPACE", "training")
    monkeypatch.setenv("MAAS_TRAINER_KUBERNETES_KUEUE_QUEUE", "team-vision")
    monkeypatch.setenv("MAAS_TRAINER_KUBERNETES_NODE_SELECTOR", '{"nvidia.com/gpu.present": "true"}')
    monkeypatch.setenv("MAAS_TRAINER_STATE_DIR", str(tmp_path))
    launcher = launcher_for(TrainerSettings(), "trainer")
    assert isinstance(launcher, KubernetesJobLauncher)
    assert (launcher.service, launcher.namespace, launcher.state_dir) == ("trainer", "training", tmp_path)
    assert launcher.run_as > 0  # job pods never run as root, even when the service does
    rendered = launcher.render(job_record(), trainer_launch(1))
    assert rendered.workload["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert rendered.workload["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-vision"


def test_the_kubernetes_executor_without_an_image_is_refused(monkeypatch):
    monkeypatch.setenv("MAAS_COMPRESSOR_JOB_EXECUTOR", "kubernetes")
    with pytest.raises(ValidationError, match="kubernetes_job_image"):
        CompressorSettings()
    monkeypatch.setenv("MAAS_COMPRESSOR_JOB_EXECUTOR", "slurm")
    with pytest.raises(ValidationError, match="job_executor"):
        CompressorSettings()
    monkeypatch.setenv("MAAS_COMPRESSOR_JOB_EXECUTOR", "kubernetes")
    monkeypatch.setenv("MAAS_COMPRESSOR_KUBERNETES_JOB_IMAGE", IMAGE)
    for name, value in (("WORKER_MEMORY", "lots"), ("WORKER_GPUS", "-1"), ("WORKER_CPU", "1 core"),
                        ("NODE_SELECTOR", "gpu=yes"), ("RENDEZVOUS_PORT", "70000")):
        monkeypatch.setenv(f"MAAS_COMPRESSOR_KUBERNETES_{name}", value)
        with pytest.raises((ValidationError, SettingsError), match=f"kubernetes_{name.lower()}"):
            CompressorSettings()
        monkeypatch.delenv(f"MAAS_COMPRESSOR_KUBERNETES_{name}")
    assert CompressorSettings().job_executor == "kubernetes"


def test_the_work_volume_is_the_jobs_directory_when_the_service_has_one(tmp_path):
    base = TrainerSettings(state_dir=tmp_path / "state")
    assert work_volume_path(base) == (tmp_path / "state").resolve()
    if "jobs_dir" in TrainerSettings.model_fields:
        separate = TrainerSettings(state_dir=tmp_path / "state", jobs_dir=str(tmp_path / "jobs"))
        assert work_volume_path(separate) == (tmp_path / "jobs").resolve()


async def test_the_process_launcher_runs_a_local_process(tmp_path):
    launch = LaunchSpec(argv=[sys.executable, "-c", f"print({PROGRESS_PREFIX!r} + '{{\"type\": \"log\", "
                              "\"level\": \"INFO\", \"message\": \"hi\"}')"],
                        cwd=tmp_path, log_path=tmp_path / "job.log")
    started = await ProcessLauncher().start(job_record(), launch)
    assert isinstance(started, JobProcess)
    sink = RecordingSink()
    outcome = await started.wait_and_forward(sink)
    assert outcome.succeeded and sink.logs == [(LogLevel.INFO, "hi")]


# --- the launcher against a stand-in API server -------------------------------------------------

class RecordingSink:
    """A ProgressSink keeping what it is given."""

    def __init__(self) -> None:
        self.metric_reports: list[tuple[int, str, dict[str, float]]] = []
        self.logs: list[tuple[LogLevel, str]] = []

    async def metrics(self, epoch: int, phase: str, values: dict[str, float]) -> None:
        self.metric_reports.append((epoch, phase, values))

    async def log(self, level: LogLevel, message: str) -> None:
        self.logs.append((level, message))


class FakeApi:
    """Holds created objects like an API server would; the job's status and its lead pod's log
    are scripted by the test."""

    def __init__(self, log_lines: Iterable[str] = (), final: str = "Complete",
                 running_polls: int = 1) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.log_lines = list(log_lines)
        self.final = final
        self.running_polls = running_polls
        self.selectors: list[str] = []

    def create(self, manifest: dict[str, Any]) -> None:
        key = (manifest["kind"], manifest["metadata"]["name"])
        assert manifest["metadata"]["namespace"] == NAMESPACE
        assert key not in self.objects, "already exists"
        self.objects[key] = manifest
        self.calls.append(("create", *key))

    def delete(self, kind: str, name: str, namespace: str) -> None:
        self.calls.append(("delete", kind, name))
        self.objects.pop((kind, name), None)

    def delete_all(self, kinds: list[str], selector: str, namespace: str) -> None:
        self.calls.append(("delete_all", ",".join(kinds), selector))
        wanted = dict(part.split("=") for part in selector.split(","))
        for (kind, name), manifest in list(self.objects.items()):
            if kind in kinds and wanted.items() <= manifest["metadata"]["labels"].items():
                del self.objects[(kind, name)]

    def workload_status(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        if (kind, name) not in self.objects:
            return None
        if self.running_polls > 0:
            self.running_polls -= 1
            return {"active": 1}
        condition = "Complete" if self.final == "Complete" else "Failed"
        return {"conditions": [{"type": condition, "status": "True"}]}

    def pod_phase(self, selector: str, namespace: str) -> tuple[str, str] | None:
        self.selectors.append(selector)
        return ("trainer-job-j-42-0", "Running")

    def follow_log(self, pod: str, namespace: str) -> Iterable[str]:
        yield from self.log_lines


def _launcher(api: FakeApi, tmp_path: Path) -> KubernetesJobLauncher:
    return KubernetesJobLauncher(service="trainer", settings=settings(kubernetes_poll_seconds=0.01),
                                 namespace=NAMESPACE, state_dir=STATE_DIR, run_as=10001,
                                 api_factory=lambda: api)


def _launch_in(tmp_path: Path, workers: int) -> LaunchSpec:
    launch = trainer_launch(workers)
    return LaunchSpec(argv=launch.argv, cwd=launch.cwd, log_path=tmp_path / "job.log", env=launch.env)


async def test_the_launcher_submits_follows_the_lead_pod_and_reports_success(tmp_path):
    metrics = PROGRESS_PREFIX + json.dumps({"type": "metrics", "epoch": 1, "phase": "train",
                                            "values": {"loss": 0.5}})
    api = FakeApi(log_lines=["loading data", metrics])
    started = await _launcher(api, tmp_path).start(job_record(workers=3), _launch_in(tmp_path, 3))
    assert isinstance(started, KubernetesJob)
    # Leftovers of earlier attempts are deleted first; the rendezvous Service precedes the Job.
    name = started.rendered.name
    selector = ("app.kubernetes.io/name=trainer,app.kubernetes.io/component=job,"
                "app.kubernetes.io/managed-by=maas-trainer,maas.io/job-id=j-42")
    assert api.calls == [("delete_all", "Job,Service", selector),
                         ("create", "Service", name), ("create", "Job", name)]
    sink = RecordingSink()
    outcome = await started.wait_and_forward(sink)
    assert outcome.succeeded and outcome.reported_error is None
    assert sink.metric_reports == [(1, "train", {"loss": 0.5})]
    assert sink.logs == [(LogLevel.INFO, "loading data")]
    assert api.selectors[0] == started.rendered.lead_pod_selector
    assert (tmp_path / "job.log").read_text().splitlines() == ["loading data", metrics]
    assert started.exited and started.pid == 0


async def test_a_failed_job_reports_the_error_its_process_gave(tmp_path):
    error = PROGRESS_PREFIX + json.dumps({"type": "error", "code": "INVALID_ARGUMENT",
                                          "message": "dataset has no labels"})
    api = FakeApi(log_lines=[error], final="Failed")
    started = await _launcher(api, tmp_path).start(job_record(), _launch_in(tmp_path, 1))
    outcome = await started.wait_and_forward(RecordingSink())
    assert not outcome.succeeded and outcome.returncode == 1
    assert outcome.reported_error is not None and outcome.reported_error.code == "INVALID_ARGUMENT"


async def test_stop_deletes_the_job_and_its_service(tmp_path):
    api = FakeApi(running_polls=10_000)
    started = await _launcher(api, tmp_path).start(job_record(workers=2), _launch_in(tmp_path, 2))
    waiting = asyncio.create_task(started.wait_and_forward(RecordingSink()))
    await asyncio.sleep(0.05)
    await started.stop(grace_seconds=1)
    outcome = await asyncio.wait_for(waiting, 5)
    assert outcome.stopped and not outcome.succeeded
    assert api.objects == {}
    assert api.calls[-2:] == [("delete", "Job", started.rendered.name),
                              ("delete", "Service", started.rendered.name)]


async def test_a_job_deleted_behind_the_services_back_fails(tmp_path):
    api = FakeApi(running_polls=10_000)
    started = await _launcher(api, tmp_path).start(job_record(), _launch_in(tmp_path, 1))
    api.objects.clear()  # e.g. `kubectl delete job`
    outcome = await asyncio.wait_for(started.wait_and_forward(RecordingSink()), 5)
    assert not outcome.succeeded and not outcome.stopped


# --- the job manager with the Kubernetes launcher -----------------------------------------------

class TrainerLikeRunner(JobRunner):
    """Stages nothing; its job process is the trainer's command line; publishes the metrics."""

    async def prepare(self, job: JobRecord, workdir: Path) -> LaunchSpec | None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = RunnerConfig(python_executable="/opt/venv/bin/python", torch_threads=1)
        return LaunchSpec(argv=job_process_command(config, job.workers, workdir), cwd=workdir,
                          log_path=workdir / "job.log")

    async def complete(self, job: JobRecord, workdir: Path) -> dict[str, Any]:
        return {"ran_on": "kubernetes"}


async def test_the_job_manager_runs_a_job_through_the_configured_launcher(tmp_path):
    """JobManagerConfig.launcher is the executor hook: a job submitted to the manager becomes an
    Indexed Job on the (stand-in) cluster, its pod's progress becomes the job's events, and the
    Job's Complete condition makes it SUCCEEDED with the runner's result."""
    collection = JobCollection("trainingJobs", "training job")
    metrics = PROGRESS_PREFIX + json.dumps({"type": "metrics", "epoch": 2, "phase": "train",
                                            "values": {"loss": 0.125}})
    api = FakeApi(log_lines=[metrics])
    launcher = KubernetesJobLauncher(service="trainer", settings=settings(kubernetes_poll_seconds=0.01),
                                     namespace=NAMESPACE, state_dir=tmp_path, run_as=10001,
                                     api_factory=lambda: api)
    store = SqlJobStore.open_sqlite(tmp_path / "jobs.db", collection)
    manager = JobManager(store, TrainerLikeRunner(), collection,
                         JobManagerConfig(pool_size=2, work_root=tmp_path / "jobs", launcher=launcher,
                                          schedule_interval_seconds=0.05, watch_poll_seconds=0.05),
                         PageTokenCodec(b"k" * 32))
    await manager.start()
    try:
        await manager.submit(JobDraft("wide", {"epochs": 2}, "vision", "alice", workers=2))
        events = await asyncio.wait_for(_history(manager, "wide"), 30)
    finally:
        await manager.stop()
        store.close()
    done = events[-1]
    assert done.final_state is JobState.SUCCEEDED, [e.payload for e in events]
    assert any(e.kind is EventKind.METRICS and e.payload["values"] == {"loss": 0.125} for e in events)
    created = [call for call in api.calls if call[0] == "create"]
    assert [kind for _, kind, _ in created] == ["Service", "Job"]
    job = api.objects[("Job", "trainer-job-wide-r0")]
    validate(job)
    assert job["spec"]["completions"] == 2 and json.loads(env_of(
        job["spec"]["template"]["spec"]["containers"][0])[JOB_SPEC_ENV]) == {"epochs": 2}
    assert done.payload["state"] == "SUCCEEDED"


async def _history(manager: JobManager, job_id: str) -> list:
    return [event async for event in manager.watch(job_id)]


async def test_a_taken_over_job_gets_new_names_and_the_old_holder_cannot_delete_them(tmp_path):
    """Replica A loses a job's lease; replica B resumes it (resume_count 1): B's start deletes
    A's attempt, and A stopping its (already gone) attempt leaves B's alone."""
    api = FakeApi(running_polls=10_000)
    first = await _launcher(api, tmp_path).start(job_record(workers=2), _launch_in(tmp_path, 2))
    resumed = dataclasses.replace(job_record(workers=2), resume_count=1)
    second = await _launcher(api, tmp_path).start(resumed, _launch_in(tmp_path, 2))
    assert (first.rendered.name, second.rendered.name) == ("trainer-job-j-42-r0", "trainer-job-j-42-r1")
    assert set(api.objects) == {("Service", "trainer-job-j-42-r1"), ("Job", "trainer-job-j-42-r1")}
    assert api.objects[("Job", "trainer-job-j-42-r1")]["metadata"]["labels"]["maas.io/attempt"] == "1"
    await first.stop(grace_seconds=1)
    assert set(api.objects) == {("Service", "trainer-job-j-42-r1"), ("Job", "trainer-job-j-42-r1")}
    await second.stop(grace_seconds=1)
    assert api.objects == {}


class FlakyApi(FakeApi):
    """An API server that fails some reads and breaks the log stream midway."""

    def __init__(self, failing_status_reads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failing_status_reads = failing_status_reads

    def workload_status(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        if self.failing_status_reads > 0:
            self.failing_status_reads -= 1
            raise ConnectionError("connection refused")
        return super().workload_status(kind, name, namespace)

    def follow_log(self, pod: str, namespace: str) -> Iterable[str]:
        yield from self.log_lines
        raise ConnectionError("stream reset")


async def test_transient_api_failures_and_a_broken_log_stream_do_not_fail_the_job(tmp_path):
    api = FlakyApi(failing_status_reads=3, log_lines=["epoch 1"])
    started = await _launcher(api, tmp_path).start(job_record(), _launch_in(tmp_path, 1))
    sink = RecordingSink()
    outcome = await asyncio.wait_for(started.wait_and_forward(sink), 5)
    assert outcome.succeeded and sink.logs == [(LogLevel.INFO, "epoch 1")]


async def test_an_api_server_that_stays_unreachable_fails_the_job(tmp_path, monkeypatch):
    monkeypatch.setattr("maas_jobs.kubernetes_executor.MAX_READ_FAILURES", 4)
    api = FlakyApi(failing_status_reads=10)
    started = await _launcher(api, tmp_path).start(job_record(), _launch_in(tmp_path, 1))
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(started.wait_and_forward(RecordingSink()), 5)


@pytest.mark.parametrize("version", ["1.27.0", "1.28.0", KUBE_VERSION])
def test_job_manifests_are_valid_from_the_charts_oldest_kubernetes_on(version):
    """The charts need Kubernetes 1.27; Indexed Jobs label their pods with the completion index
    (which the launcher finds the lead pod by) from 1.28."""
    for workers in (1, 3):
        for manifest in render(workers=workers, kubernetes_kueue_queue="q").manifests:
            kubernetes_validate.validate(manifest, version, strict=True)
    pytorch_job = render(workers=2, kubernetes_pytorchjob=True).workload
    for replica in pytorch_job["spec"]["pytorchReplicaSpecs"].values():
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": "check", "namespace": NAMESPACE},
                                      "template": replica["template"]}, version, strict=True)
