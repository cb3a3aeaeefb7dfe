{{/* A Prometheus Operator ServiceMonitor when metrics.serviceMonitor.enabled.
A service chart's templates/servicemonitor.yaml is one line: include "maas.servicemonitor" . */}}
{{- define "maas.servicemonitor" -}}
{{- if and .Values.metrics.enabled .Values.metrics.serviceMonitor.enabled }}
# For the Prometheus Operator: scrape the Service's metrics port. The job is the service's
# name (app.kubernetes.io/name), as the suite's alert rules expect.
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "maas.fullname" . }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
    {{- with .Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  jobLabel: app.kubernetes.io/name
  selector:
    matchLabels:
      {{- include "maas.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ .Values.metrics.serviceMonitor.interval }}
{{- end }}
{{- end -}}
