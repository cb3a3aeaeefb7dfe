{{/*
Helpers of every MaaS service chart, kept once in this library chart (deploy/helm/maas-common)
that each service chart depends on (file://../maas-common, vendored as charts/maas-common).

Named templates are global across an umbrella release; every service chart carries the same
library version, so the shared "maas.*" definitions are the same wherever they come from.
Everything specific to one service lives in its chart's templates/_service.tpl under the
"<chart name>.*" prefix, which these helpers look up ("<chart name>.env", ".volumes",
".volumeMounts", ".validate").

The logical service name is the chart name ("registry", "inference", ...): it is the name the
service reports in grpc.health.v1, registers in discovery, and the MAAS_<NAME>_ env prefix.
*/}}

{{- define "maas.serviceName" -}}
{{- .Chart.Name -}}
{{- end -}}

{{- define "maas.envPrefix" -}}
{{- printf "MAAS_%s_" (.Chart.Name | upper) -}}
{{- end -}}

{{- define "maas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or just <release> when the release name already contains the chart name. */}}
{{- define "maas.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Service host of a sibling MaaS service of the same release (same naming rule as
maas.fullname, without overrides): dict "root" . "name" "<logical name>". */}}
{{- define "maas.peerHost" -}}
{{- $release := .root.Release.Name -}}
{{- $base := ternary $release (printf "%s-%s" $release .name) (contains .name $release) -}}
{{- printf "%s.%s.svc" ($base | trunc 63 | trimSuffix "-") .root.Release.Namespace -}}
{{- end -}}

{{- define "maas.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "maas.labels" -}}
helm.sh/chart: {{ include "maas.chart" . }}
{{ include "maas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: maas
{{- end -}}

{{- define "maas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "maas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "maas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "maas.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when a digest is pinned, else repository:tag (tag defaults to appVersion). */}}
{{- define "maas.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .appVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/* An env value as the service's settings parse it: lists and maps as JSON; Helm reads every
number as a float, and 8589934592 would otherwise render as "8.589934592e+09". */}}
{{- define "maas.envValue" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) -}}
{{- toJson . -}}
{{- else if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . | toString -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The hardened pod and container security contexts; only the ids are values. */}}
{{- define "maas.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser }}
runAsGroup: {{ .runAsGroup }}
fsGroup: {{ .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "maas.containerSecurityContext" -}}
runAsNonRoot: true
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* One probe: native gRPC health check of a health name, by default the logical service
name (readiness); "liveness" for the startup and liveness probes. The kubelet's gRPC probe
speaks plaintext only, so with TLS on the probe falls back to a TCP connect.
dict "root" . "probe" .Values.probes.<kind> ["service" "liveness"] */}}
{{- define "maas.probe" -}}
{{- if .root.Values.tls.enabled -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ .root.Values.containerPort }}
  service: {{ .service | default (include "maas.serviceName" .root) | quote }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{- define "maas.consulHttpAddr" -}}
{{- $consul := .Values.global.maas.consul -}}
{{- if .Values.discovery.consulHttpAddr -}}
{{- .Values.discovery.consulHttpAddr -}}
{{- else if $consul.httpAddr -}}
{{- $consul.httpAddr -}}
{{- else if $consul.useHostAgent -}}
http://$(HOST_IP):8500
{{- else if $consul.enabled -}}
{{- /* the hashicorp/consul chart of the same release names its servers like this */ -}}
{{- $base := ternary .Release.Name (printf "%s-consul" .Release.Name) (contains "consul" .Release.Name) -}}
{{- printf "http://%s-server.%s.svc:8500" ($base | trunc 63 | trimSuffix "-") .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* name=host:port;... for the runtime's static discovery: the explicit value, else every
peer the umbrella chart lists in global.maas.peers. */}}
{{- define "maas.staticEndpoints" -}}
{{- if .Values.discovery.staticEndpoints -}}
{{- .Values.discovery.staticEndpoints -}}
{{- else -}}
{{- $root := . -}}
{{- $entries := list -}}
{{- range $name, $port := .Values.global.maas.peers -}}
{{- $host := include "maas.peerHost" (dict "root" $root "name" $name) -}}
{{- $entries = append $entries (printf "%s=%s:%d" $name $host (int $port)) -}}
{{- end -}}
{{- join ";" $entries -}}
{{- end -}}
{{- end -}}

{{- define "maas.authMountPath" -}}/etc/maas/auth{{- end -}}
{{- define "maas.pageTokenMountPath" -}}/etc/maas/page-token{{- end -}}

{{/* "true" when the chart has a pageTokenSecret (its service signs page tokens with a key
file: registry, trainer, compressor) and it names a Secret. Replicas must share the key. */}}
{{- define "maas.pageTokenSecret" -}}
{{- if and (hasKey .Values "pageTokenSecret") .Values.pageTokenSecret.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* "true" when the chart may run more than one pod (autoscaling or replicaCount > 1). */}}
{{- define "maas.replicated" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}
{{- define "maas.tlsMountPath" -}}/etc/maas/tls{{- end -}}

{{/* Every env var of the service container. Settings come only from here: each
MAAS_<NAME>_* variable is one field of the service's pydantic settings class. */}}
{{- define "maas.env" -}}
{{- $prefix := include "maas.envPrefix" . -}}
- name: {{ $prefix }}HOST
  value: "0.0.0.0"
- name: {{ $prefix }}PORT
  value: {{ .Values.containerPort | quote }}
- name: {{ $prefix }}ADVERTISE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: {{ $prefix }}STATE_DIR
  value: {{ .Values.persistence.mountPath | quote }}
- name: {{ $prefix }}LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: {{ $prefix }}SHUTDOWN_GRACE_SECONDS
  value: {{ include "maas.envValue" .Values.shutdownGraceSeconds | quote }}
- name: {{ $prefix }}MAX_MESSAGE_BYTES
  value: {{ include "maas.envValue" .Values.maxMessageBytes | quote }}
- name: {{ $prefix }}AUTH_ENABLED
  value: {{ .Values.auth.enabled | quote }}
{{- if .Values.auth.enabled }}
- name: {{ $prefix }}TOKENS_FILE
  value: {{ printf "%s/%s" (include "maas.authMountPath" .) .Values.auth.tokensKey | quote }}
{{- /* The runtime mints an admin token into the tokens file on first start unless the admin
token file exists; here the tokens file is a read-only Secret, so the admin token is the
Secret's too (it is also the token the service presents to the others). */}}
- name: {{ $prefix }}ADMIN_TOKEN_FILE
  value: {{ printf "%s/%s" (include "maas.authMountPath" .) .Values.auth.clientTokenKey | quote }}
- name: {{ $prefix }}CLIENT_TOKEN_FILE
  value: {{ printf "%s/%s" (include "maas.authMountPath" .) .Values.auth.clientTokenKey | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: {{ $prefix }}TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" (include "maas.tlsMountPath" .) | quote }}
- name: {{ $prefix }}TLS_KEY_FILE
  value: {{ printf "%s/tls.key" (include "maas.tlsMountPath" .) | quote }}
{{- if .Values.tls.requireClientCertificates }}
- name: {{ $prefix }}TLS_CLIENT_CA_FILE
  value: {{ printf "%s/ca.crt" (include "maas.tlsMountPath" .) | quote }}
{{- end }}
{{- end }}
{{- /* The client side of the same Secret: peers (the registry) are dialled over TLS trusting
its ca.crt, presenting its tls.crt/tls.key to peers that require mTLS. */}}
{{- if .Values.tls.peers.enabled }}
- name: {{ $prefix }}PEER_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" (include "maas.tlsMountPath" .) | quote }}
{{- if .Values.tls.peers.presentClientCertificate }}
- name: {{ $prefix }}PEER_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" (include "maas.tlsMountPath" .) | quote }}
- name: {{ $prefix }}PEER_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" (include "maas.tlsMountPath" .) | quote }}
{{- end }}
{{- with .Values.tls.peers.serverName }}
- name: {{ $prefix }}PEER_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if .Values.metrics.enabled }}
- name: {{ $prefix }}METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
{{- end }}
{{- with .Values.otlpEndpoint | default .Values.global.maas.otlpEndpoint }}
- name: {{ $prefix }}OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- $consulAddr := include "maas.consulHttpAddr" . -}}
{{- if contains "$(HOST_IP)" $consulAddr }}
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end }}
{{- with $consulAddr }}
- name: CONSUL_HTTP_ADDR
  value: {{ . | quote }}
{{- end }}
{{- with .Values.global.maas.consul.tokenSecret.name }}
- name: CONSUL_HTTP_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.global.maas.consul.tokenSecret.key | quote }}
{{- end }}
{{- with include "maas.staticEndpoints" . }}
- name: MAAS_STATIC_ENDPOINTS
  value: {{ . | quote }}
{{- end }}
{{- if .Values.database.existingSecret }}
- name: {{ $prefix }}DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | quote }}
      key: {{ .Values.database.secretKey | quote }}
{{- end }}
{{- if include "maas.pageTokenSecret" . }}
- name: {{ $prefix }}PAGE_TOKEN_SECRET_FILE
  value: {{ printf "%s/%s" (include "maas.pageTokenMountPath" .) .Values.pageTokenSecret.secretKey | quote }}
{{- end }}
{{- with include (printf "%s.env" .Chart.Name) . | trim }}
{{ . }}
{{- end }}
{{- range $field, $value := .Values.settings }}
- name: {{ printf "%s%s" $prefix ($field | upper) }}
  value: {{ include "maas.envValue" $value | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "maas.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: state
  mountPath: {{ .Values.persistence.mountPath | quote }}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: {{ include "maas.authMountPath" . }}
  readOnly: true
{{- end }}
{{- if or .Values.tls.enabled .Values.tls.peers.enabled }}
- name: tls
  mountPath: {{ include "maas.tlsMountPath" . }}
  readOnly: true
{{- end }}
{{- if include "maas.pageTokenSecret" . }}
- name: page-token
  mountPath: {{ include "maas.pageTokenMountPath" . }}
  readOnly: true
{{- end }}
{{- with include (printf "%s.volumeMounts" .Chart.Name) . | trim }}
{{ . }}
{{- end }}
{{- end -}}

{{- define "maas.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit | quote }}
- name: state
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (printf "%s-state" (include "maas.fullname" .)) | quote }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ .Values.auth.existingSecret | quote }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.tokensKey | quote }}
        path: {{ .Values.auth.tokensKey | quote }}
      - key: {{ .Values.auth.clientTokenKey | quote }}
        path: {{ .Values.auth.clientTokenKey | quote }}
{{- end }}
{{- if or .Values.tls.enabled .Values.tls.peers.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName | quote }}
    defaultMode: 0440
{{- end }}
{{- if include "maas.pageTokenSecret" . }}
- name: page-token
  secret:
    secretName: {{ .Values.pageTokenSecret.existingSecret | quote }}
    defaultMode: 0440
    items:
      - key: {{ .Values.pageTokenSecret.secretKey | quote }}
        path: {{ .Values.pageTokenSecret.secretKey | quote }}
{{- end }}
{{- with include (printf "%s.volumes" .Chart.Name) . | trim }}
{{ . }}
{{- end }}
{{- end -}}

{{/* PersistentVolumeClaim for a value block shaped like .Values.persistence:
dict "root" . "name" "<claim name>" "persistence" <block> */}}
{{- define "maas.pvc" -}}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ .name }}
  labels:
    {{- include "maas.labels" .root | nindent 4 }}
  {{- if .persistence.keep }}
  annotations:
    helm.sh/resource-policy: keep
  {{- end }}
spec:
  accessModes:
    {{- toYaml .persistence.accessModes | nindent 4 }}
  {{- with .persistence.storageClass }}
  storageClassName: {{ . | quote }}
  {{- end }}
  resources:
    requests:
      storage: {{ .persistence.size | quote }}
{{- end -}}

{{/* Checks that JSON schema cannot express (relations between values). */}}
{{- define "maas.validate" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGraceSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed shutdownGraceSeconds (%v): the kubelet kills the pod before in-flight RPCs drain" .Values.terminationGracePeriodSeconds .Values.shutdownGraceSeconds) -}}
{{- end -}}
{{- if .Values.autoscaling.enabled -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- if not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- fail "autoscaling needs a target: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage above 0" -}}
{{- end -}}
{{- end -}}
{{- include (printf "%s.validate" .Chart.Name) . -}}
{{- end -}}

{{/* Pod annotations: prometheus.io/* for annotation-based scraping (when metrics are on and
.Values.metrics.podAnnotations), then .Values.podAnnotations, which win. */}}
{{- define "maas.podAnnotations" -}}
{{- $annotations := dict -}}
{{- if and .Values.metrics.enabled .Values.metrics.podAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .Values.metrics.port) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- with merge (deepCopy (.Values.podAnnotations | default dict)) $annotations -}}
{{- toYaml . -}}
{{- end -}}
{{- end -}}

{{/* Parts several service charts share (trainer, compressor, inference): the registry's
address, and a memory-backed /dev/shm (torch worker processes and Triton's Python-backend stubs
share tensors there; a container's own is capped at 64 MiB). */}}
{{- define "maas.registryTarget.env" -}}
{{- with .Values.registryTarget }}
- name: {{ include "maas.envPrefix" $ }}REGISTRY_TARGET
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "maas.shm.volumeMount" -}}
- name: shm
  mountPath: /dev/shm
{{- end -}}

{{- define "maas.shm.volume" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSizeLimit | quote }}
{{- end -}}
