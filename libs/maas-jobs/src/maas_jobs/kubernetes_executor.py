"""Run jobs on the cluster: each job as a Kubernetes Job (or a Kubeflow PyTorchJob).

The local process executor (`maas_jobs.executor`) stays the default; with
`job_executor = "kubernetes"` a job service submits its jobs through the Kubernetes API
instead, and they run in pods of their own:

- one worker: a `batch/v1` Job with one pod running the job process;
- several workers: an Indexed Job (`completionMode: Indexed`, one pod per worker) whose pods
  find each other through a headless Service and run `torchrun --nnodes=N
  --node-rank=$(JOB_COMPLETION_INDEX)` with static rendezvous on pod 0; or, when the Kubeflow
  training operator is installed (`kubernetes_pytorchjob`), a `kubeflow.org/v1` PyTorchJob
  (one Master, N-1 Workers) whose operator sets the rendezvous env;
- with a Kueue queue configured, the job carries `kueue.x-k8s.io/queue-name` and is created
  suspended, and Kueue admits it when its quota allows.

A pod runs the job service's image with the same interpreter, module and working directory as
a local process would: the service's state volume (`kubernetes_work_claim`, ReadWriteMany)
is mounted at the same path, so staged inputs, checkpoints and results are where the service
expects them. The job's spec travels as JSON in the `MAAS_JOB_SPEC_JSON` env var; its owner
(service, job id, tenant) in labels. Pods are hardened like the service's own (non-root,
read-only root, no capabilities, no API token) and run with the requests of
`kubernetes_worker_*` per worker.

The manifests are plain dicts (`render_job_manifests`); `KubernetesJobLauncher` creates them
with the `kubernetes` client, follows the lead pod's log through the same progress protocol as
a local process (`ProgressForwarder`), watches the job's status until it completes or fails,
and deletes it (with its pods) when stopped. Manifests are valid from Kubernetes 1.27 on; the
lead pod of an Indexed Job is found by the completion-index label its pods carry from 1.28 (on
1.27 such a job still runs and ends right, without progress events).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, Field, model_validator

from maas_jobs.executor import (
    JobLauncher,
    LaunchSpec,
    ProcessLauncher,
    ProcessOutcome,
    ProgressForwarder,
    ProgressSink,
    StartedJob,
)
from maas_jobs.records import JobRecord, LogLevel

if TYPE_CHECKING:
    from maas_jobs.settings import JobServiceSettings

_log = logging.getLogger(__name__)
T = TypeVar("T")

JOB_SPEC_ENV = "MAAS_JOB_SPEC_JSON"
"""Env var of every job pod holding the job's spec as JSON."""
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_ID_LABEL = "maas.io/job-id"
TENANT_LABEL = "maas.io/tenant"
ATTEMPT_LABEL = "maas.io/attempt"
"""The job's resume count when the resources were made."""
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
LEAD_LABEL = "maas.io/lead"
"""On the pod whose output is the job's progress (rank 0)."""
_NON_ROOT_DEFAULT = 10001
MAX_READ_FAILURES = 30
"""API reads failing this many times in a row (at the poll interval) fail the job."""
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_NAME_LIMIT = 52
"""Job names stay short enough for the `<job>-<index>` pod hostnames of an Indexed Job."""
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")


class KubernetesExecutorSettings(BaseModel):
    """Where and how jobs run when `job_executor` is "kubernetes" (fields of a job service's
    settings, e.g. MAAS_TRAINER_KUBERNETES_JOB_IMAGE)."""

    job_executor: Literal["process", "kubernetes"] = "process"
    """"process": every job is an OS process of this service (the default). "kubernetes": every
    job is a Kubernetes Job (or a Kubeflow PyTorchJob) of its own."""

    kubernetes_namespace: str = ""
    """Namespace of the jobs; empty: this pod's own (from its service account)."""

    kubernetes_job_image: str = ""
    """Image of the job pods (the service's own image: it has the job module installed)."""

    kubernetes_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Pull policy of the job pods' image."""

    kubernetes_service_account: str = ""
    """Service account of the job pods (they get no API token either way); empty: default."""

    kubernetes_work_claim: str = ""
    """PersistentVolumeClaim (ReadWriteMany) holding the service's state directory, mounted in
    every job pod at the same path, so job directories are where the service expects them."""

    kubernetes_worker_cpu: str = Field(default="1", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    """CPU each worker requests (and is limited to)."""

    kubernetes_worker_memory: str = Field(default="4Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    """Memory each worker requests (and is limited to)."""

    kubernetes_worker_gpus: int = Field(default=0, ge=0)
    """nvidia.com/gpu each worker requests."""

    kubernetes_kueue_queue: str = Field(default="", max_length=63,
                                        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")
    """Kueue LocalQueue of the jobs (a DNS label, as the charts' schema has it: an object name
    that is also a label value); set, jobs are created suspended with its
    `kueue.x-k8s.io/queue-name` label and start when Kueue admits them."""

    kubernetes_pytorchjob: bool = False
    """Run multi-worker jobs as Kubeflow PyTorchJobs (the training operator must be
    installed); otherwise as Indexed Jobs with a headless Service for rendezvous."""

    kubernetes_rendezvous_port: int = Field(default=29500, ge=1, le=65535)
    """Port of torchrun's rendezvous on the lead pod of a multi-worker job."""

    kubernetes_ttl_seconds: int = Field(default=3600, ge=0)
    """How long a finished Job (and its pods, for their logs) stays before Kubernetes deletes it."""

    kubernetes_run_as_user: int | None = Field(default=None, ge=1)
    """uid (and gid, fsGroup) of the job pods; empty: this service's own (so both may write the
    shared volume), or 10001 when the service runs as root (job pods never do)."""

    kubernetes_node_selector: dict[str, str] = Field(default_factory=dict)
    """nodeSelector of the job pods (JSON), e.g. {"nvidia.com/gpu.present": "true"}."""

    kubernetes_poll_seconds: float = Field(default=2.0, gt=0)
    """How often the job's status is read while it runs."""

    @model_validator(mode="after")
    def _kubernetes_needs_an_image(self) -> KubernetesExecutorSettings:
        if self.job_executor == "kubernetes" and not self.kubernetes_job_image:
            raise ValueError("job_executor 'kubernetes' needs kubernetes_job_image (the image of the "
                             "job pods, normally the service's own)")
        return self


# --- names ------------------------------------------------------------------------------------

def resource_name(service: str, job_id: str, attempt: int = 0) -> str:
    """`<service>-job-<id>-r<attempt>` as a DNS-1123 label of at most 52 characters, unique per
    job id and attempt (its resume count): names that had to be changed (".", "_", length) get
    a hash of the original. Each attempt has names of its own, so a replica stopping a job it
    lost can never delete the attempt of the replica that took it over."""
    base = f"{service}-job-{job_id}-r{attempt}"
    cleaned = _DNS_LABEL.sub("-", base.lower()).strip("-")
    if cleaned == base and len(base) <= _NAME_LIMIT:
        return base
    digest = hashlib.sha256(f"{job_id}/r{attempt}".encode()).hexdigest()[:8]
    return f"{cleaned[:_NAME_LIMIT - 9].rstrip('-')}-{digest}"


def owner_labels(service: str, job_id: str) -> dict[str, str]:
    """The labels every resource of a job carries, whichever attempt made it."""
    return {"app.kubernetes.io/name": service, "app.kubernetes.io/component": "job",
            "app.kubernetes.io/managed-by": f"maas-{service}", JOB_ID_LABEL: label_value(job_id)}


def owner_selector(service: str, job_id: str) -> str:
    """A label selector of every resource of a job, all attempts."""
    return ",".join(f"{key}={value}" for key, value in owner_labels(service, job_id).items())


def label_value(value: str) -> str:
    """`value` as a label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = _LABEL_VALUE.sub("-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


# --- what a job runs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class JobCommand:
    """The job process of a `LaunchSpec`: interpreter, job module, its arguments."""

    python: str
    module: str
    args: list[str]

    @classmethod
    def from_launch(cls, launch: LaunchSpec) -> JobCommand:
        """The module after the last `-m` is the job's (the runners start
        `python -m <job module> <workdir>`, under `torch.distributed.run` for several workers)."""
        argv = launch.argv
        positions = [i for i, arg in enumerate(argv) if arg == "-m" and i + 1 < len(argv)]
        if not positions:
            raise ValueError(f"not a `python -m <module>` job command: {argv}")
        last = positions[-1]
        return cls(python=argv[0], module=argv[last + 1], args=argv[last + 2:])

    def single(self) -> list[str]:
        return [self.python, "-m", self.module, *self.args]

    def torchrun(self, nodes: int, node_rank: str, master_addr: str, master_port: str) -> list[str]:
        """One node of `nodes` (one process each) with static rendezvous on the lead node."""
        return [self.python, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
                f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                f"--master-port={master_port}", "--max-restarts=0", "-m", self.module, *self.args]


@dataclass(frozen=True)
class RenderedJob:
    """A job's manifests, in the order they are created, and how to find its lead pod."""

    kind: Literal["Job", "PyTorchJob"]
    name: str
    namespace: str
    manifests: list[dict[str, Any]]
    lead_pod_selector: str

    @property
    def workload(self) -> dict[str, Any]:
        """The Job or PyTorchJob (the other manifests serve it)."""
        return next(m for m in self.manifests if m["kind"] == self.kind)


def render_job_manifests(*, service: str, job: JobRecord, launch: LaunchSpec,
                         settings: KubernetesExecutorSettings, namespace: str, state_dir: Path,
                         run_as: int) -> RenderedJob:
    """The manifests that run `job` (started locally by `launch`) on the cluster."""
    if not settings.kubernetes_job_image:
        raise ValueError("kubernetes_job_image is required to run jobs on Kubernetes")
    name = resource_name(service, job.job_id, job.resume_count)
    command = JobCommand.from_launch(launch)
    owner = {**owner_labels(service, job.job_id), TENANT_LABEL: label_value(job.tenant),
             ATTEMPT_LABEL: str(job.resume_count)}
    workload_labels = dict(owner)
    if settings.kubernetes_kueue_queue:
        workload_labels[KUEUE_QUEUE_LABEL] = settings.kubernetes_kueue_queue
    metadata = {"name": name, "namespace": namespace, "labels": workload_labels,
                "annotations": {"maas.io/job": f"{service}/{job.job_id}"}}
    pod = _PodFactory(settings, launch, job, state_dir, run_as, owner)
    suspend = bool(settings.kubernetes_kueue_queue)
    workers = max(job.workers, 1)

    if workers > 1 and settings.kubernetes_pytorchjob:
        # The operator sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE on every replica; the
        # lead (Master) is the one whose output is the job's progress.
        args = command.torchrun(workers, "$(RANK)", "$(MASTER_ADDR)", "$(MASTER_PORT)")
        master = pod.template(args, container="pytorch", lead=True, replicas=workers)
        worker = pod.template(args, container="pytorch", lead=False, replicas=workers)
        pytorch_job = {
            "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": metadata,
            "spec": {
                "runPolicy": {"backoffLimit": 0, "ttlSecondsAfterFinished": settings.kubernetes_ttl_seconds,
                              "cleanPodPolicy": "None", "suspend": suspend},
                "pytorchReplicaSpecs": {
                    "Master": {"replicas": 1, "restartPolicy": "Never", "template": master},
                    "Worker": {"replicas": workers - 1, "restartPolicy": "Never", "template": worker},
                },
            },
        }
        # The attempt too: an earlier attempt's pods may still be terminating.
        lead_selector = (f"{JOB_ID_LABEL}={owner[JOB_ID_LABEL]},{ATTEMPT_LABEL}={job.resume_count},"
                         f"{LEAD_LABEL}=true,app.kubernetes.io/name={service}")
        return RenderedJob("PyTorchJob", name, namespace, [pytorch_job], lead_selector)

    manifests: list[dict[str, Any]] = []
    job_spec: dict[str, Any] = {"backoffLimit": 0, "ttlSecondsAfterFinished": settings.kubernetes_ttl_seconds,
                                "suspend": suspend}
    if workers == 1:
        template = pod.template(command.single(), container="job", lead=True, replicas=1)
        lead_selector = f"job-name={name}"
    else:
        # Pods of an Indexed Job are `<name>-<index>` in the headless Service's subdomain.
        lead_host = f"{name}-0.{name}.{namespace}.svc"
        args = command.torchrun(workers, "$(JOB_COMPLETION_INDEX)", lead_host,
                                str(settings.kubernetes_rendezvous_port))
        template = pod.template(args, container="job", lead=None, replicas=workers)
        template["spec"]["subdomain"] = name
        job_spec.update({"completionMode": "Indexed", "completions": workers, "parallelism": workers,
                         # One worker failing fails the whole job: torchrun's group is broken.
                         # (onPodConditions: required, possibly empty, before Kubernetes 1.31.)
                         "podFailurePolicy": {"rules": [{"action": "FailJob", "onPodConditions": [],
                                                         "onExitCodes": {"operator": "NotIn",
                                                                         "values": [0]}}]}})
        lead_selector = f"job-name={name},{COMPLETION_INDEX_LABEL}=0"
        manifests.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": owner},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {JOB_ID_LABEL: owner[JOB_ID_LABEL], ATTEMPT_LABEL: owner[ATTEMPT_LABEL],
                                  "app.kubernetes.io/name": service, "app.kubernetes.io/component": "job"},
                     "ports": [{"name": "rendezvous", "port": settings.kubernetes_rendezvous_port,
                                "targetPort": settings.kubernetes_rendezvous_port, "protocol": "TCP"}]},
        })
    job_spec["template"] = template
    manifests.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec})
    return RenderedJob("Job", name, namespace, manifests, lead_selector)


@dataclass(frozen=True)
class _PodFactory:
    settings: KubernetesExecutorSettings
    launch: LaunchSpec
    job: JobRecord
    state_dir: Path
    run_as: int
    owner_labels: dict[str, str]

    def template(self, command: list[str], *, container: str, lead: bool | None,
                 replicas: int) -> dict[str, Any]:
        settings = self.settings
        labels = dict(self.owner_labels)
        if lead is not None:
            labels[LEAD_LABEL] = "true" if lead else "false"
        resources: dict[str, dict[str, Any]] = {
            "requests": {"cpu": settings.kubernetes_worker_cpu, "memory": settings.kubernetes_worker_memory},
            "limits": {"cpu": settings.kubernetes_worker_cpu, "memory": settings.kubernetes_worker_memory},
        }
        if settings.kubernetes_worker_gpus:
            for bound in resources.values():
                bound["nvidia.com/gpu"] = settings.kubernetes_worker_gpus
        env = [{"name": key, "value": value} for key, value in sorted(self.launch.env.items())]
        env.append({"name": JOB_SPEC_ENV, "value": json.dumps(self.job.spec, sort_keys=True)})
        env.append({"name": "MAAS_JOB_WORKERS", "value": str(replicas)})
        mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}]
        volumes: list[dict[str, Any]] = [
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ]
        if settings.kubernetes_work_claim:
            mounts.append({"name": "state", "mountPath": str(self.state_dir)})
            volumes.append({"name": "state", "persistentVolumeClaim": {
                "claimName": settings.kubernetes_work_claim}})
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": self.run_as, "runAsGroup": self.run_as,
                                "fsGroup": self.run_as, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": container,
                "image": settings.kubernetes_job_image,
                "imagePullPolicy": settings.kubernetes_image_pull_policy,
                "command": command,
                "workingDir": str(self.launch.cwd),
                "env": env,
                "resources": resources,
                "securityContext": {"runAsNonRoot": True, "privileged": False,
                                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
        if replicas > 1:
            spec["containers"][0]["ports"] = [{"name": "rendezvous", "protocol": "TCP",
                                               "containerPort": settings.kubernetes_rendezvous_port}]
        if settings.kubernetes_service_account:
            spec["serviceAccountName"] = settings.kubernetes_service_account
        if settings.kubernetes_node_selector:
            spec["nodeSelector"] = dict(settings.kubernetes_node_selector)
        return {"metadata": {"labels": labels}, "spec": spec}


# --- launching -------------------------------------------------------------------------------

class KubernetesApi(Protocol):
    """The calls the launcher makes (a thin layer over the `kubernetes` client, so tests can
    stand in for the cluster)."""

    def create(self, manifest: dict[str, Any]) -> None: ...

    def delete(self, kind: str, name: str, namespace: str) -> None: ...

    def delete_all(self, kinds: list[str], selector: str, namespace: str) -> None:
        """Delete every object of `kinds` matching `selector` (with their pods)."""
        ...

    def workload_status(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None: ...

    def pod_phase(self, selector: str, namespace: str) -> tuple[str, str] | None: ...

    def follow_log(self, pod: str, namespace: str) -> Iterable[str]: ...


class ClientApi:
    """`KubernetesApi` over the official `kubernetes` client: the in-cluster configuration (the
    pod's service account), else the kubeconfig, unless an `api_client` is given."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        # Typed loosely: the client takes manifests as plain dicts, which its stubs don't say.
        self._core: Any = client.CoreV1Api(api_client)
        self._batch: Any = client.BatchV1Api(api_client)
        self._custom: Any = client.CustomObjectsApi(api_client)

    def create(self, manifest: dict[str, Any]) -> None:
        namespace = manifest["metadata"]["namespace"]
        if manifest["kind"] == "Service":
            self._core.create_namespaced_service(namespace, manifest)
        elif manifest["kind"] == "Job":
            self._batch.create_namespaced_job(namespace, manifest)
        else:
            self._custom.create_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs",
                                                         manifest)

    def delete(self, kind: str, name: str, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "Service":
                self._core.delete_namespaced_service(name, namespace)
            elif kind == "Job":
                self._batch.delete_namespaced_job(name, namespace, propagation_policy="Foreground")
            else:
                self._custom.delete_namespaced_custom_object("kubeflow.org", "v1", namespace,
                                                             "pytorchjobs", name,
                                                             propagation_policy="Foreground")
        except ApiException as error:
            if error.status != 404:
                raise

    def delete_all(self, kinds: list[str], selector: str, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        for kind in kinds:
            try:
                if kind == "Service":
                    self._core.delete_collection_namespaced_service(namespace, label_selector=selector)
                elif kind == "Job":
                    self._batch.delete_collection_namespaced_job(namespace, label_selector=selector,
                                                                 propagation_policy="Foreground")
                else:
                    self._custom.delete_collection_namespaced_custom_object(
                        "kubeflow.org", "v1", namespace, "pytorchjobs", label_selector=selector,
                        propagation_policy="Foreground")
            except ApiException as error:
                if error.status != 404:
                    raise

    def workload_status(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "Job":
                status = self._batch.read_namespaced_job_status(name, namespace).status
                return self._batch.api_client.sanitize_for_serialization(status) or {}
            found = self._custom.get_namespaced_custom_object_status("kubeflow.org", "v1", namespace,
                                                                     "pytorchjobs", name)
            return dict(found.get("status") or {})
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pod_phase(self, selector: str, namespace: str) -> tuple[str, str] | None:
        pods = self._core.list_namespaced_pod(namespace, label_selector=selector).items
        if not pods:
            return None
        newest = max(pods, key=lambda pod: pod.metadata.creation_timestamp)
        return str(newest.metadata.name), str(newest.status.phase or "Pending")

    def follow_log(self, pod: str, namespace: str) -> Iterable[str]:
        response = self._core.read_namespaced_pod_log(pod, namespace, follow=True,
                                                      _preload_content=False)
        pending = b""
        for chunk in response.stream(64 * 1024):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", errors="replace")
        if pending:
            yield pending.decode("utf-8", errors="replace")


def workload_outcome(kind: str, status: dict[str, Any] | None) -> bool | None:
    """True when the Job/PyTorchJob succeeded, False when it failed (or is gone), None while it runs."""
    if status is None:
        return False
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    done, failed = (("Complete", "Failed") if kind == "Job" else ("Succeeded", "Failed"))
    if conditions.get(done) == "True":
        return True
    if conditions.get(failed) == "True":
        return False
    return None


class KubernetesJob:
    """A job running on the cluster, held by the manager like a local `JobProcess`."""

    def __init__(self, rendered: RenderedJob, api: KubernetesApi, launch: LaunchSpec,
                 poll_seconds: float, max_plain_log_lines: int) -> None:
        self.rendered = rendered
        self._api = api
        self._launch = launch
        self._poll_seconds = poll_seconds
        self._max_plain_log_lines = max_plain_log_lines
        self._outcome: bool | None = None
        self.stopped = False

    @property
    def pid(self) -> int:
        return 0  # no local process: nothing for a restarted service to reap by pid

    @property
    def exited(self) -> bool:
        return self._outcome is not None or self.stopped

    async def wait_and_forward(self, sink: ProgressSink) -> ProcessOutcome:
        """Forward the lead pod's output as progress, then wait for the job's final condition."""
        forwarder = ProgressForwarder(sink, self._launch.log_path.name, self._max_plain_log_lines)
        rendered = self.rendered
        pod = await self._lead_pod()
        if pod is not None:
            lines: asyncio.Queue[str | None] = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def pump() -> None:
                try:
                    for line in self._api.follow_log(pod, rendered.namespace):
                        loop.call_soon_threadsafe(lines.put_nowait, line)
                except Exception as error:  # the job goes on; its outcome comes from its status
                    _log.warning("following the log of pod %s stopped: %s", pod, error)
                finally:
                    loop.call_soon_threadsafe(lines.put_nowait, None)

            reader = asyncio.create_task(asyncio.to_thread(pump))
            with self._launch.log_path.open("a", encoding="utf-8", errors="replace") as log_file:
                while (line := await lines.get()) is not None:
                    log_file.write(line + "\n")
                    log_file.flush()
                    await forwarder.line(line, LogLevel.INFO)
            await reader
        while self._outcome is None and not self.stopped:
            status = await self._read(self._api.workload_status, rendered.kind, rendered.name,
                                      rendered.namespace)
            self._outcome = workload_outcome(rendered.kind, status)
            if self._outcome is None:
                await asyncio.sleep(self._poll_seconds)
        return ProcessOutcome(0 if self._outcome else 1, forwarder.reported_error, self.stopped)

    async def _lead_pod(self) -> str | None:
        """The lead pod's name once it runs (or has finished); None when the job ends first."""
        while not self.stopped:
            found = await self._read(self._api.pod_phase, self.rendered.lead_pod_selector,
                                     self.rendered.namespace)
            if found is not None and found[1] in ("Running", "Succeeded", "Failed"):
                return found[0]
            status = await self._read(self._api.workload_status, self.rendered.kind,
                                      self.rendered.name, self.rendered.namespace)
            self._outcome = workload_outcome(self.rendered.kind, status)
            if self._outcome is not None:
                return None
            await asyncio.sleep(self._poll_seconds)
        return None

    async def _read(self, function: Callable[..., T], *args: Any) -> T:
        """An API read, retried at the poll interval while it fails (an API server restarting, a
        network blip: the job runs on regardless), up to `MAX_READ_FAILURES` in a row."""
        failures = 0
        while True:
            try:
                return await asyncio.to_thread(function, *args)
            except Exception as error:  # any client failure; the last one propagates
                failures += 1
                if failures >= MAX_READ_FAILURES or self.stopped:
                    raise
                _log.warning("reading %s %s failed (%d in a row), retrying: %s", self.rendered.kind,
                             self.rendered.name, failures, error)
                await asyncio.sleep(self._poll_seconds)

    async def stop(self, grace_seconds: float) -> None:
        """Delete the job with its pods (Kubernetes sends SIGTERM, then SIGKILL after the pods'
        grace period) and its rendezvous Service."""
        self.stopped = True
        for manifest in reversed(self.rendered.manifests):
            await asyncio.to_thread(self._api.delete, manifest["kind"], manifest["metadata"]["name"],
                                    self.rendered.namespace)


@dataclass
class KubernetesJobLauncher:
    """Starts each job as Kubernetes resources (see the module's docstring)."""

    service: str
    settings: KubernetesExecutorSettings
    namespace: str
    state_dir: Path
    run_as: int
    api_factory: Callable[[], KubernetesApi] = ClientApi
    max_plain_log_lines: int = 200
    _api: KubernetesApi | None = None

    @property
    def api(self) -> KubernetesApi:
        if self._api is None:
            self._api = self.api_factory()
        return self._api

    def render(self, job: JobRecord, launch: LaunchSpec) -> RenderedJob:
        return render_job_manifests(service=self.service, job=job, launch=launch, settings=self.settings,
                                    namespace=self.namespace, state_dir=self.state_dir, run_as=self.run_as)

    async def start(self, job: JobRecord, launch: LaunchSpec) -> StartedJob:
        """Create the job's resources. What earlier attempts left (a previous run of this
        service, a replica that lost the job's lease) is deleted first: the caller holds the
        job now, and a resumed job starts over from its checkpoint like a local process would."""
        rendered = self.render(job, launch)
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        kinds = ["Job", "Service"]
        if self.settings.kubernetes_pytorchjob:
            kinds.insert(0, "PyTorchJob")
        await asyncio.to_thread(self.api.delete_all, kinds, owner_selector(self.service, job.job_id),
                                rendered.namespace)
        for manifest in rendered.manifests:
            await asyncio.to_thread(self.api.create, manifest)
        _log.info("job %s runs on Kubernetes as %s %s/%s", job.job_id, rendered.kind,
                  rendered.namespace, rendered.name)
        return KubernetesJob(rendered, self.api, launch, self.settings.kubernetes_poll_seconds,
                             self.max_plain_log_lines)


def own_namespace(path: Path = _SERVICE_ACCOUNT_NAMESPACE) -> str:
    """This pod's namespace, as its service account mount says (\"default\" outside a pod)."""
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8").strip() or "default"
    return "default"


def work_volume_path(settings: JobServiceSettings) -> Path:
    """Where `kubernetes_work_claim` is mounted in job pods: the service's jobs directory when it
    has its own, else its state directory (which holds `jobs/`)."""
    jobs_dir = str(getattr(settings, "jobs_dir", "") or "")
    return Path(jobs_dir).resolve() if jobs_dir else settings.state_dir.resolve()


def launcher_for(settings: JobServiceSettings, service: str) -> JobLauncher:
    """The launcher `settings.job_executor` selects: local processes unless "kubernetes"."""
    if settings.job_executor != "kubernetes":
        return ProcessLauncher(settings.max_logged_output_lines)
    return KubernetesJobLauncher(
        service=service, settings=settings,
        namespace=settings.kubernetes_namespace or own_namespace(),
        state_dir=work_volume_path(settings),
        run_as=settings.kubernetes_run_as_user or os.getuid() or _NON_ROOT_DEFAULT,
        max_plain_log_lines=settings.max_logged_output_lines)
