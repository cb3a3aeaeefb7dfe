{{/*
Compressor-specific parts of the shared templates (the "compressor.*" names are looked up by
_helpers.tpl as "<chart name>.env", ".volumes", ".volumeMounts" and ".validate").
*/}}

{{- define "compressor.env" -}}
{{- include "maas.registryTarget.env" . }}
{{- include "maas.kubernetesJobs.env" . }}
{{- end -}}

{{- define "compressor.volumeMounts" -}}
{{- include "maas.shm.volumeMount" . }}
{{- end -}}

{{- define "compressor.volumes" -}}
{{- include "maas.shm.volume" . }}
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
