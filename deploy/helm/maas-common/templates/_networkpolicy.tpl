{{/* The service's NetworkPolicy: who may call it and whom it may call; all else is denied.
A service chart's templates/networkpolicy.yaml is one line: include "maas.networkpolicy" .

Ingress: the gRPC port from Consul's health checks ("maas.consulProbers"), from the suite's services that call this one ("<chart>.callers", a
list of logical names, e.g. the registry's trainer, compressor and inference; their server
pods) and from networkPolicy.clients and global.maas.clients, which also reach the chart's own client ports
("<chart>.clientPorts"); the metrics port from
networkPolicy.prometheus. Egress: DNS, Consul, PostgreSQL, OTLP, the gRPC port of the peers
the service calls ("<chart>.calls"), then "<chart>.egress" (the chart's own rules, e.g. the
inference service's Triton) and networkPolicy.extraEgress. */}}
{{- define "maas.networkpolicy" -}}
{{- $policy := .Values.networkPolicy -}}
{{- if $policy.enabled -}}
{{- $callers := include (printf "%s.callers" .Chart.Name) . | fromYamlArray -}}
{{- $calls := include (printf "%s.calls" .Chart.Name) . | fromYamlArray -}}
{{- $clientPorts := include (printf "%s.clientPorts" .Chart.Name) . | fromYamlArray -}}
{{- $clients := concat ($policy.clients | default list) (.Values.global.maas.clients | default list) -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "maas.fullname" . }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "maas.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    {{- if or $callers $clients }}
    - ports:
        - port: grpc
          protocol: TCP
      from:
        {{- with $callers }}
        - podSelector:
            matchExpressions:
              {{- include "maas.suitePodSelector" . | nindent 14 }}
        {{- end }}
        {{- with $clients }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- end }}
    {{- with $clientPorts }}
    {{- if $clients }}
    - ports:
        {{- range . }}
        - port: {{ .name }}
          protocol: TCP
        {{- end }}
      from:
        {{- toYaml $clients | nindent 8 }}
    {{- end }}
    {{- end }}
    {{- with include "maas.consulProbers" . | fromYamlArray }}
    - ports:
        - port: grpc
          protocol: TCP
      from:
        {{- toYaml . | nindent 8 }}
    {{- end }}
    {{- if and .Values.metrics.enabled $policy.prometheus }}
    - ports:
        - port: metrics
          protocol: TCP
      from:
        {{- toYaml $policy.prometheus | nindent 8 }}
    {{- end }}
    {{- with $policy.extraIngress }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  egress:
    - ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
      {{- with $policy.dns }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- range $name := list "consul" "postgresql" "otlp" }}
    {{- $rule := index $policy $name }}
    {{- if $rule.ports }}
    - ports:
        {{- range $rule.ports }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
      {{- with $rule.to }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
    {{- end }}
    {{- with $calls }}
    - ports:
        - port: grpc
          protocol: TCP
      to:
        - podSelector:
            matchExpressions:
              {{- include "maas.suitePodSelector" . | nindent 14 }}
    {{- end }}
    {{- with include (printf "%s.egress" .Chart.Name) . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $policy.extraEgress }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* matchExpressions naming the server pods of MaaS services by logical name (neither the
Triton pods of the inference chart nor the job pods of the trainer and compressor, which call
no service). A list of names. */}}
{{- define "maas.suitePodSelector" -}}
- key: app.kubernetes.io/name
  operator: In
  values: {{ toJson . }}
- key: app.kubernetes.io/component
  operator: In
  values: ["server"]
{{- end -}}

{{/* Who probes the gRPC health port for Consul (each instance is registered with a gRPC health
check): networkPolicy.consul.from, plus this release's Consul pods (hashicorp/consul labels
them app=consul, release=<release>) when the services use the release's bundled servers. */}}
{{- define "maas.consulProbers" -}}
{{- $probers := .Values.networkPolicy.consul.from | default list -}}
{{- $consul := .Values.global.maas.consul -}}
{{- if and $consul.enabled (not $consul.httpAddr) (not $consul.useHostAgent) (not .Values.discovery.consulHttpAddr) -}}
{{- $probers = append $probers (dict "podSelector" (dict "matchLabels" (dict "app" "consul" "release" .Release.Name))) -}}
{{- end -}}
{{- toYaml $probers -}}
{{- end -}}
