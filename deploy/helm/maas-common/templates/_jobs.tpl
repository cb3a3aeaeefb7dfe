{{/* Jobs on Kubernetes, for the charts of services that run jobs (trainer, compressor): with
kubernetesJobs.enabled the service runs every job as a Kubernetes Job (or a Kubeflow
PyTorchJob) through the API (maas_jobs.kubernetes_executor) instead of as a process in its
pod. These templates give it what that needs: its settings as env, a Role (and RoleBinding)
for the job resources, the API token, egress to the API server, and a NetworkPolicy for the
job pods. All of it is off while kubernetesJobs.enabled is false. */}}

{{- define "maas.kubernetesJobs.enabled" -}}
{{- if and (hasKey .Values "kubernetesJobs") .Values.kubernetesJobs.enabled -}}true{{- end -}}
{{- end -}}

{{/* The state volume's claim: job pods mount it where the service does. */}}
{{- define "maas.kubernetesJobs.workClaim" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-state" (include "maas.fullname" .)) -}}
{{- end -}}

{{- define "maas.kubernetesJobs.env" -}}
{{- if include "maas.kubernetesJobs.enabled" . }}
{{- $prefix := include "maas.envPrefix" . -}}
{{- $jobs := .Values.kubernetesJobs }}
- name: {{ $prefix }}JOB_EXECUTOR
  value: "kubernetes"
- name: {{ $prefix }}KUBERNETES_NAMESPACE
  value: {{ .Release.Namespace | quote }}
- name: {{ $prefix }}KUBERNETES_JOB_IMAGE
  value: {{ $jobs.image | default (include "maas.image" (dict "image" .Values.image "appVersion" .Chart.AppVersion)) | quote }}
- name: {{ $prefix }}KUBERNETES_IMAGE_PULL_POLICY
  value: {{ .Values.image.pullPolicy | quote }}
- name: {{ $prefix }}KUBERNETES_WORK_CLAIM
  value: {{ include "maas.kubernetesJobs.workClaim" . | quote }}
- name: {{ $prefix }}KUBERNETES_RUN_AS_USER
  value: {{ .Values.podSecurityContext.runAsUser | quote }}
- name: {{ $prefix }}KUBERNETES_WORKER_CPU
  value: {{ $jobs.worker.cpu | quote }}
- name: {{ $prefix }}KUBERNETES_WORKER_MEMORY
  value: {{ $jobs.worker.memory | quote }}
- name: {{ $prefix }}KUBERNETES_WORKER_GPUS
  value: {{ $jobs.worker.gpus | quote }}
- name: {{ $prefix }}KUBERNETES_PYTORCHJOB
  value: {{ $jobs.pytorchJob | quote }}
{{- with $jobs.kueueQueue }}
- name: {{ $prefix }}KUBERNETES_KUEUE_QUEUE
  value: {{ . | quote }}
{{- end }}
{{- with $jobs.serviceAccountName }}
- name: {{ $prefix }}KUBERNETES_SERVICE_ACCOUNT
  value: {{ . | quote }}
{{- end }}
{{- with $jobs.nodeSelector }}
- name: {{ $prefix }}KUBERNETES_NODE_SELECTOR
  value: {{ toJson . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The Role the service's account gets: create, follow and delete its jobs, their rendezvous
Services and (with kubernetesJobs.pytorchJob) PyTorchJobs (deletecollection: a job's earlier
attempts go by its labels); read their pods and logs. */}}
{{- define "maas.kubernetesJobs.rbac" -}}
{{- if include "maas.kubernetesJobs.enabled" . -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ printf "%s-jobs" (include "maas.fullname" .) }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
rules:
  - apiGroups: ["batch"]
    resources: ["jobs"]
    verbs: ["create", "get", "list", "watch", "delete", "deletecollection"]
  - apiGroups: ["batch"]
    resources: ["jobs/status"]
    verbs: ["get"]
  - apiGroups: [""]
    resources: ["services"]
    verbs: ["create", "get", "delete", "deletecollection"]
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list", "watch"]
  - apiGroups: [""]
    resources: ["pods/log"]
    verbs: ["get"]
  {{- if .Values.kubernetesJobs.pytorchJob }}
  - apiGroups: ["kubeflow.org"]
    resources: ["pytorchjobs"]
    verbs: ["create", "get", "list", "watch", "delete", "deletecollection"]
  - apiGroups: ["kubeflow.org"]
    resources: ["pytorchjobs/status"]
    verbs: ["get"]
  {{- end }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ printf "%s-jobs" (include "maas.fullname" .) }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ printf "%s-jobs" (include "maas.fullname" .) }}
subjects:
  - kind: ServiceAccount
    name: {{ include "maas.serviceAccountName" . }}
    namespace: {{ .Release.Namespace }}
{{- end }}
{{- end -}}

{{/* Egress of the service to the API server (its address is no pod a selector can name). */}}
{{- define "maas.kubernetesJobs.egress" -}}
{{- if include "maas.kubernetesJobs.enabled" . }}
{{- $api := .Values.kubernetesJobs.apiServer }}
- ports:
    {{- range $api.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $api.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The job pods of this service: nothing calls them but each other (torchrun's rendezvous
and collectives between the workers of one job); they call each other and DNS. They read
their inputs from, and write their results to, the shared volume: no other network. */}}
{{- define "maas.kubernetesJobs.networkpolicy" -}}
{{- if and (include "maas.kubernetesJobs.enabled" .) .Values.networkPolicy.enabled -}}
{{- $jobPods := dict "app.kubernetes.io/name" (include "maas.serviceName" .) "app.kubernetes.io/component" "job" -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ printf "%s-jobs" (include "maas.fullname" .) }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- toYaml $jobPods | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              {{- toYaml $jobPods | nindent 14 }}
  egress:
    - to:
        - podSelector:
            matchLabels:
              {{- toYaml $jobPods | nindent 14 }}
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
      {{- with .Values.networkPolicy.dns }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end -}}

{{/* Job pods mount the state volume while the service does: it must allow several nodes. */}}
{{- define "maas.kubernetesJobs.validate" -}}
{{- if include "maas.kubernetesJobs.enabled" . -}}
{{- if not .Values.persistence.enabled -}}
{{- fail "kubernetesJobs needs persistence.enabled: job pods mount the service's state volume" -}}
{{- end -}}
{{- if and (not .Values.persistence.existingClaim) (not (has "ReadWriteMany" .Values.persistence.accessModes)) -}}
{{- fail "kubernetesJobs mounts the state volume in job pods on other nodes: persistence.accessModes needs ReadWriteMany" -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) -}}
{{- fail "kubernetesJobs binds its Role to the service's account: set serviceAccount.create or serviceAccount.name" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Replicas of a service that runs jobs share one job table (PostgreSQL: each job runs on one
replica under a lease), one page-token key, and one state volume: job directories with their
checkpoints, so the replica that takes a lapsed job over resumes it where it stopped. */}}
{{- define "maas.jobService.validate" -}}
{{- include "maas.kubernetesJobs.validate" . -}}
{{- if include "maas.replicated" . -}}
{{- $name := include "maas.serviceName" . -}}
{{- if not .Values.database.existingSecret -}}
{{- fail (printf "several %s replicas need PostgreSQL: set database.existingSecret (the default SQLite job table belongs to one pod, so another replica would keep a second, disjoint queue)" $name) -}}
{{- end -}}
{{- if not .Values.pageTokenSecret.existingSecret -}}
{{- fail (printf "several %s replicas must share the page-token key: set pageTokenSecret.existingSecret" $name) -}}
{{- end -}}
{{- $state := .Values.persistence -}}
{{- if or (not $state.enabled) (and (not $state.existingClaim) (not (has "ReadWriteMany" $state.accessModes))) -}}
{{- fail (printf "several %s replicas share the state volume (job directories and checkpoints, so a job taken over resumes from its checkpoint): enable persistence with accessModes ReadWriteMany" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
