{{/* The ServiceAccount (no token automounted) when serviceAccount.create.
A service chart's templates/serviceaccount.yaml is one line: include "maas.serviceaccount" . */}}
{{- define "maas.serviceaccount" -}}
{{- if .Values.serviceAccount.create -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "maas.serviceAccountName" . }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
  {{- with .Values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- end }}
{{- end -}}
