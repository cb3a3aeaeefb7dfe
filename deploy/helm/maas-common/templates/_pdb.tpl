{{/* A PodDisruptionBudget when podDisruptionBudget.enabled.
A service chart's templates/pdb.yaml is one line: include "maas.pdb" . */}}
{{- define "maas.pdb" -}}
{{- if .Values.podDisruptionBudget.enabled -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "maas.fullname" . }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
spec:
  {{- with .Values.podDisruptionBudget.minAvailable }}
  minAvailable: {{ . }}
  {{- else }}
  maxUnavailable: {{ .Values.podDisruptionBudget.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "maas.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}
