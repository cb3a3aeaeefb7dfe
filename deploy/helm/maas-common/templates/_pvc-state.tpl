{{/* The state volume's claim when persistence is on and no existing claim is named.
A service chart's templates/pvc-state.yaml is one line: include "maas.pvcstate" . */}}
{{- define "maas.pvcstate" -}}
{{- if and .Values.persistence.enabled (not .Values.persistence.existingClaim) -}}
{{- include "maas.pvc" (dict "root" . "name" (printf "%s-state" (include "maas.fullname" .)) "persistence" .Values.persistence) }}
{{- end }}
{{- end -}}
