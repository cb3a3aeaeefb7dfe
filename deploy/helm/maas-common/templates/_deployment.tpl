{{/* The service's Deployment: one hardened container, env from maas.env, gRPC probes.
A service chart's templates/deployment.yaml is one line: include "maas.deployment" . */}}
{{- define "maas.deployment" -}}
{{- include "maas.validate" . -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "maas.fullname" . }}
  labels:
    {{- include "maas.labels" . | nindent 4 }}
spec:
  {{- if not .Values.autoscaling.enabled }}
  replicas: {{ .Values.replicaCount }}
  {{- end }}
  revisionHistoryLimit: {{ .Values.revisionHistoryLimit }}
  strategy:
    type: {{ .Values.updateStrategy }}
  selector:
    matchLabels:
      {{- include "maas.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "maas.selectorLabels" . | nindent 8 }}
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with include "maas.podAnnotations" . }}
      annotations:
        {{- . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "maas.serviceAccountName" . }}
      # Only a service that runs its jobs as Kubernetes Jobs calls the Kubernetes API.
      automountServiceAccountToken: {{ include "maas.kubernetesJobs.enabled" . | eq "true" }}
      # Service links would inject e.g. MAAS_REGISTRY_PORT=tcp://10.0.0.1:50051 for a Service
      # named maas-registry: a clash with the services' own MAAS_<NAME>_* settings.
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      securityContext:
        {{- include "maas.podSecurityContext" .Values.podSecurityContext | nindent 8 }}
      {{- with .Values.priorityClassName }}
      priorityClassName: {{ . | quote }}
      {{- end }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ include "maas.serviceName" . }}
          image: {{ include "maas.image" (dict "image" .Values.image "appVersion" .Chart.AppVersion) | quote }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          {{- with .Values.command }}
          command:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ .Values.containerPort }}
              protocol: TCP
            {{- if .Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ .Values.metrics.port }}
              protocol: TCP
            {{- end }}
            {{- range include (printf "%s.clientPorts" .Chart.Name) . | fromYamlArray }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
          env:
            {{- include "maas.env" . | nindent 12 }}
          startupProbe:
            {{- include "maas.probe" (dict "root" . "probe" .Values.probes.startup "service" "liveness") | nindent 12 }}
          livenessProbe:
            {{- include "maas.probe" (dict "root" . "probe" .Values.probes.liveness "service" "liveness") | nindent 12 }}
          readinessProbe:
            {{- include "maas.probe" (dict "root" . "probe" .Values.probes.readiness) | nindent 12 }}
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          securityContext:
            {{- include "maas.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "maas.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "maas.volumes" . | nindent 8 }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
