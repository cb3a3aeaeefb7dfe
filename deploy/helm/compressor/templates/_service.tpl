{{/*
Compressor-specific parts of the shared templates (the "compressor.*" names are looked up by
_helpers.tpl as "<chart name>.env", ".volumes", ".volumeMounts" and ".validate").
*/}}

{{- define "compressor.env" -}}
{{- with .Values.registryTarget }}
- name: MAAS_COMPRESSOR_REGISTRY_TARGET
  value: {{ . | quote }}
{{- end }}
{{- include "maas.kubernetesJobs.env" . }}
{{- end -}}

{{/* torch worker processes share tensors through /dev/shm, which a container caps at 64 MiB. */}}
{{- define "compressor.volumeMounts" -}}
- name: shm
  mountPath: /dev/shm
{{- end -}}

{{- define "compressor.volumes" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSizeLimit | quote }}
{{- end -}}

{{/* Replicas need a shared job table, key and volume (maas.jobService.validate). */}}
{{- define "compressor.validate" -}}
{{- include "maas.jobService.validate" . -}}
{{- end -}}

{{/* NetworkPolicy (maas.networkpolicy): only clients call the compressor (no suite service
does); it calls the registry, and the API server when it runs jobs on Kubernetes. */}}
{{- define "compressor.callers" -}}
[]
{{- end -}}

{{- define "compressor.calls" -}}
["registry"]
{{- end -}}

{{- define "compressor.egress" -}}
{{- include "maas.kubernetesJobs.egress" . }}
{{- end -}}

{{/* Ports clients reach besides gRPC (maas.deployment, maas.service, maas.networkpolicy): none. */}}
{{- define "compressor.clientPorts" -}}
[]
{{- end -}}
