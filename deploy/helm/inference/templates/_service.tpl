{{/*
Inference-specific parts of the shared templates (the "inference.*" names are looked up by
_helpers.tpl as "<chart name>.env", ".volumes", ".volumeMounts" and ".validate"), and the
helpers of the Triton Deployment the service drives.

Three ways to get a Triton, in order: triton.enabled runs a Triton Deployment in this release
(GPU image, explicit model control, the model repository on a shared claim); triton.externalUrl
points at one that already runs and mounts the same claim; neither starts the tritonserver
bundled in the image inside the inference pod (CPU, one machine's way).
*/}}

{{- define "inference.remoteTriton" -}}
{{- if or .Values.triton.enabled .Values.triton.externalUrl -}}true{{- end -}}
{{- end -}}

{{- define "inference.tritonName" -}}
{{- printf "%s-triton" (include "maas.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "inference.tritonUrl" -}}
{{- if .Values.triton.enabled -}}
{{- printf "%s.%s.svc:%d" (include "inference.tritonName" .) .Release.Namespace (int .Values.triton.grpcPort) -}}
{{- else -}}
{{- .Values.triton.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "inference.modelRepositoryClaimName" -}}
{{- .Values.triton.modelRepository.persistence.existingClaim | default (printf "%s-model-repository" (include "maas.fullname" .)) -}}
{{- end -}}

{{- define "inference.tritonSelectorLabels" -}}
app.kubernetes.io/name: {{ include "maas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end -}}

{{- define "inference.tritonLabels" -}}
helm.sh/chart: {{ include "maas.chart" . }}
{{ include "inference.tritonSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.triton.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: maas
{{- end -}}

{{/* triton.resources plus the nvidia.com/gpu limit (extended resources request what they limit). */}}
{{- define "inference.tritonResources" -}}
{{- $resources := deepCopy .Values.triton.resources -}}
{{- if gt (int .Values.triton.gpus) 0 -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.triton.gpus) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* The Secret holding the key of Triton's restricted administrative protocols. */}}
{{- define "inference.tritonControlKeySecretName" -}}
{{- .Values.triton.controlKeySecret | default (printf "%s-triton-control-key" (include "maas.fullname" .)) -}}
{{- end -}}

{{/* The per-tenant limits file, mounted without subPath: the kubelet refreshes it when the
ConfigMap changes and the service re-reads it. */}}
{{- define "inference.tenancyDir" -}}/etc/maas/tenancy{{- end -}}

{{- define "inference.tritonControlKeyDir" -}}/var/run/maas/triton-control-key{{- end -}}

{{- define "inference.env" -}}
{{- include "maas.registryTarget.env" . }}
{{- if .Values.openai.enabled }}
- name: MAAS_INFERENCE_OPENAI_PORT
  value: {{ .Values.openai.port | quote }}
{{- end }}
{{- with .Values.tenancy.existingConfigMap }}
- name: MAAS_INFERENCE_TENANCY_FILE
  value: {{ printf "%s/%s" (include "inference.tenancyDir" $) $.Values.tenancy.key | quote }}
{{- end }}
{{- if include "inference.remoteTriton" . }}
- name: MAAS_INFERENCE_TRITON_URL
  value: {{ include "inference.tritonUrl" . | quote }}
- name: MAAS_INFERENCE_TRITON_MODEL_REPOSITORY
  value: {{ .Values.triton.modelRepository.mountPath | quote }}
- name: MAAS_INFERENCE_TRITON_CONTROL_KEY_FILE
  value: {{ printf "%s/control-key" (include "inference.tritonControlKeyDir" .) | quote }}
{{- if and .Values.triton.enabled .Values.metrics.enabled }}
{{- /* Triton's own series, re-exported on the metrics port with deployment labels. */}}
- name: MAAS_INFERENCE_TRITON_METRICS_URL
  value: {{ printf "http://%s.%s.svc:%d/metrics" (include "inference.tritonName" .) .Release.Namespace (int .Values.triton.metricsPort) | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* /dev/shm: the bundled tritonserver's Python-backend stubs exchange tensors there. */}}
{{- define "inference.volumeMounts" -}}
{{- include "maas.shm.volumeMount" . }}
{{- if .Values.tenancy.existingConfigMap }}
- name: tenancy
  mountPath: {{ include "inference.tenancyDir" . | quote }}
  readOnly: true
{{- end }}
{{- if include "inference.remoteTriton" . }}
- name: model-repository
  mountPath: {{ .Values.triton.modelRepository.mountPath | quote }}
- name: triton-control-key
  mountPath: {{ include "inference.tritonControlKeyDir" . | quote }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "inference.volumes" -}}
{{- include "maas.shm.volume" . }}
{{- with .Values.tenancy.existingConfigMap }}
- name: tenancy
  configMap:
    name: {{ . | quote }}
    items:
      - key: {{ $.Values.tenancy.key | quote }}
        path: {{ $.Values.tenancy.key | quote }}
{{- end }}
{{- if include "inference.remoteTriton" . }}
- name: model-repository
  persistentVolumeClaim:
    claimName: {{ include "inference.modelRepositoryClaimName" . | quote }}
- name: triton-control-key
  secret:
    secretName: {{ include "inference.tritonControlKeySecretName" . | quote }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{- define "inference.validate" -}}
{{- if include "maas.replicated" . -}}
{{- if not .Values.database.existingSecret -}}
{{- fail "several inference replicas need PostgreSQL: set database.existingSecret (the default SQLite deployment table belongs to one pod, so another replica would serve a diverging set of deployments)" -}}
{{- end -}}
{{- if include "inference.remoteTriton" . -}}
{{- fail "several inference replicas each load and unload models on their own Triton: use the Triton bundled in the pod (triton.enabled false, no triton.externalUrl), not one Triton shared by all" -}}
{{- end -}}
{{- $state := .Values.persistence -}}
{{- if and $state.enabled (not $state.existingClaim) (not (has "ReadWriteMany" $state.accessModes)) -}}
{{- fail "several inference replicas cannot share a ReadWriteOnce state volume: disable persistence (PostgreSQL holds the deployments; each pod's Triton reloads them) or use ReadWriteMany" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.triton.enabled .Values.triton.externalUrl -}}
{{- fail "set either triton.enabled (a Triton Deployment in this release) or triton.externalUrl (one that already runs), not both" -}}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy (maas.networkpolicy): only clients call the inference service; it calls
the registry, and its own Triton (gRPC for inference and model control, metrics for the
re-exported series). The Triton pods have their own policy (triton-networkpolicy.yaml). */}}
{{- define "inference.callers" -}}
[]
{{- end -}}

{{- define "inference.calls" -}}
["registry"]
{{- end -}}

{{- define "inference.egress" -}}
{{- if .Values.triton.enabled }}
- ports:
    - port: grpc
      protocol: TCP
    - port: metrics
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          {{- include "inference.tritonSelectorLabels" . | nindent 10 }}
{{- else }}
{{- /* A Triton elsewhere: its port, to any destination (no selector can name it). */}}
{{- with regexFind ":[0-9]+$" .Values.triton.externalUrl }}
- ports:
    - port: {{ trimPrefix ":" . | int }}
      protocol: TCP
{{- end }}
{{- end }}
{{- end -}}

{{/* Ports clients reach besides gRPC (maas.deployment, maas.service, maas.networkpolicy): the
OpenAI-compatible HTTP endpoint when openai.enabled. */}}
{{- define "inference.clientPorts" -}}
{{- if .Values.openai.enabled -}}
[{"name": "openai", "port": {{ int .Values.openai.port }}, "appProtocol": "http"}]
{{- else -}}
[]
{{- end -}}
{{- end -}}
