{{/*
Trainer-specific parts of the shared templates (the "trainer.*" names are looked up by
_helpers.tpl as "<chart name>.env", ".volumes", ".volumeMounts" and ".validate").
*/}}

{{- define "trainer.env" -}}
{{- include "maas.registryTarget.env" . }}
{{- include "maas.kubernetesJobs.env" . }}
{{- end -}}

{{- define "trainer.volumeMounts" -}}
{{- include "maas.shm.volumeMount" . }}
{{- end -}}

{{- define "trainer.volumes" -}}
{{- include "maas.shm.volume" . }}
{{- end -}}

{{/* Replicas need a shared job table, key and volume (maas.jobService.validate). */}}
{{- define "trainer.validate" -}}
{{- include "maas.jobService.validate" . -}}
{{- end -}}

{{/* NetworkPolicy (maas.networkpolicy): only clients call the trainer (no suite service
does); it calls the registry, and the API server when it runs jobs on Kubernetes. */}}
{{- define "trainer.callers" -}}
[]
{{- end -}}

{{- define "trainer.calls" -}}
["registry"]
{{- end -}}

{{- define "trainer.egress" -}}
{{- include "maas.kubernetesJobs.egress" . }}
{{- end -}}

{{/* Ports clients reach besides gRPC (maas.deployment, maas.service, maas.networkpolicy): none. */}}
{{- define "trainer.clientPorts" -}}
[]
{{- end -}}
