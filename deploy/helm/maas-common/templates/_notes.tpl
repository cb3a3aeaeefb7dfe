{{/* The release notes: where the service listens and how to check its health.
A service chart's templates/NOTES.txt is one line: include "maas.notes" . */}}
{{- define "maas.notes" -}}
{{ include "maas.serviceName" . }} is listening on {{ include "maas.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.service.port }} (gRPC{{ if .Values.tls.enabled }}, TLS{{ end }}).

Check its health (grpc.health.v1, service name "{{ include "maas.serviceName" . }}"):

  kubectl -n {{ .Release.Namespace }} port-forward svc/{{ include "maas.fullname" . }} {{ .Values.service.port }}
  grpcurl {{ if not .Values.tls.enabled }}-plaintext {{ end }}-d '{"service":"{{ include "maas.serviceName" . }}"}' localhost:{{ .Values.service.port }} grpc.health.v1.Health/Check
{{- if .Values.auth.enabled }}

Auth is on: send "authorization: Bearer <token>" with a token from the Secret {{ .Values.auth.existingSecret }} (key {{ .Values.auth.clientTokenKey }}).
{{- end }}
{{- if and (ne (include "maas.serviceName" .) "registry") (not .Values.registryTarget) (not (include "maas.staticEndpoints" .)) (not (include "maas.consulHttpAddr" .)) }}

WARNING: nothing tells {{ include "maas.serviceName" . }} where the registry is: set registryTarget (host:port), discovery.staticEndpoints or a Consul address.
{{- end }}
{{- end -}}
