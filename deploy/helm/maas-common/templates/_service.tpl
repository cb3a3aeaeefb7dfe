{{/* The Service: the gRPC port, the metrics port when metrics are on, and the chart's own
client ports ("<chart>.clientPorts", e.g. inference's OpenAI-compatible HTTP endpoint).
A service chart's templates/service.yaml is one line: include "maas.service" . */}}
{{- define "maas.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "maas.fullname" . }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
  {{- with .Values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .Values.service.type }}
  selector:
    {{- include "maas.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .Values.service.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if .Values.metrics.enabled }}
    - name: metrics
      port: {{ .Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
    {{- range include (printf "%s.clientPorts" .Chart.Name) . | fromYamlArray }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
      appProtocol: {{ .appProtocol }}
    {{- end }}
{{- end -}}
