{{/*
Registry-specific parts of the shared templates (the "registry.*" names are looked up by
_helpers.tpl as "<chart name>.env", ".volumes", ".volumeMounts" and ".validate").
*/}}

{{- define "registry.env" -}}
{{- if .Values.blobStore.persistence.enabled }}
- name: MAAS_REGISTRY_BLOB_DIR
  value: {{ .Values.blobStore.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "registry.volumeMounts" -}}
{{- if .Values.blobStore.persistence.enabled }}
- name: blobs
  mountPath: {{ .Values.blobStore.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "registry.volumes" -}}
{{- if .Values.blobStore.persistence.enabled }}
- name: blobs
  persistentVolumeClaim:
    claimName: {{ include "registry.blobClaimName" . | quote }}
{{- end }}
{{- end -}}

{{- define "registry.blobClaimName" -}}
{{- .Values.blobStore.persistence.existingClaim | default (printf "%s-blobs" (include "maas.fullname" .)) -}}
{{- end -}}

{{/* Several replicas share one database, one blob store and one page-token key. */}}
{{- define "registry.validate" -}}
{{- if include "maas.replicated" . -}}
{{- if not .Values.database.existingSecret -}}
{{- fail "several registry replicas need PostgreSQL: set database.existingSecret (the default SQLite file belongs to one pod)" -}}
{{- end -}}
{{- if not .Values.pageTokenSecret.existingSecret -}}
{{- fail "several registry replicas must share the page-token key: set pageTokenSecret.existingSecret" -}}
{{- end -}}
{{- $blobs := .Values.blobStore.persistence -}}
{{- if not $blobs.enabled -}}
{{- fail "several registry replicas must share the blob store: enable blobStore.persistence" -}}
{{- end -}}
{{- if and (not $blobs.existingClaim) (not (has "ReadWriteMany" $blobs.accessModes)) -}}
{{- fail "several registry replicas mount the blob volume at once: blobStore.persistence.accessModes needs ReadWriteMany" -}}
{{- end -}}
{{- $state := .Values.persistence -}}
{{- if and $state.enabled (not $state.existingClaim) (not (has "ReadWriteMany" $state.accessModes)) -}}
{{- fail "several registry replicas cannot share a ReadWriteOnce state volume: disable persistence (PostgreSQL and the blob volume hold the data) or use ReadWriteMany" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy (maas.networkpolicy): the suite's services that call the registry, the
peers it calls (none), and egress of its own (none: PostgreSQL is in the shared policy). */}}
{{- define "registry.callers" -}}
["trainer", "compressor", "inference"]
{{- end -}}

{{- define "registry.calls" -}}
[]
{{- end -}}

{{- define "registry.egress" -}}
{{- end -}}

{{/* Ports clients reach besides gRPC (maas.deployment, maas.service, maas.networkpolicy): none. */}}
{{- define "registry.clientPorts" -}}
[]
{{- end -}}
