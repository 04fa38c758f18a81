{{/* Name of the release's objects: <release>-order-pipeline, or the release name if it already says so. */}}
{{- define "op.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Standard labels; call with (dict "root" $ "component" "name"). */}}
{{- define "op.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: {{ .root.Chart.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "op.selectorLabels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* The three services, keyed by their names, with their values blocks. */}}
{{- define "op.components" -}}
order-generator: orderGenerator
order-processor: orderProcessor
dlq-analyzer: dlqAnalyzer
{{- end -}}

{{- define "op.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{ include "op.fullname" . }}-kafka:9092
{{- else -}}
{{ required "kafka.bootstrapServers is required when kafka.enabled is false" .Values.kafka.bootstrapServers }}
{{- end -}}
{{- end -}}

{{- define "op.registryUrl" -}}
{{- if .Values.schemaRegistry.enabled -}}
http://{{ include "op.fullname" . }}-schema-registry:8081
{{- else -}}
{{ required "schemaRegistry.url is required when schemaRegistry.enabled is false" .Values.schemaRegistry.url }}
{{- end -}}
{{- end -}}

{{- define "op.otlpEndpoint" -}}
{{- if .Values.jaeger.enabled -}}
http://{{ include "op.fullname" . }}-jaeger:4318
{{- else -}}
{{ .Values.jaeger.otlpEndpoint }}
{{- end -}}
{{- end -}}

{{/* Security settings for the infrastructure pods (their images need a writable root). */}}
{{- define "op.infraSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
  What a service's container gets from values besides the chart's own variables, shared by its
  Deployment and (for the processor) the topics Job. Call with
  (dict "root" $ "key" "orderProcessor" "c" <the service's values merged over default>).
  op.userEnv: `env` (over default.env) and then `extraEnv` (EnvVar objects: they win).
*/}}
{{- define "op.userEnv" -}}
{{- $own := index .root.Values .key -}}
{{- range $k, $v := merge (deepCopy (.c.env | default dict)) (deepCopy .root.Values.default.env) }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- with concat (.root.Values.default.extraEnv | default list) ($own.extraEnv | default list) }}
# extraEnv: full EnvVar objects (valueFrom.secretKeyRef for passwords and tokens);
# they come last, so they win over a same-named variable above
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The `envFrom:` block (existingSecret, then envFrom), or nothing. Same arguments. */}}
{{- define "op.envFrom" -}}
{{- $own := index .root.Values .key -}}
{{- $envFrom := concat (.root.Values.default.envFrom | default list) ($own.envFrom | default list) -}}
{{- $existingSecret := $own.existingSecret | default .root.Values.default.existingSecret -}}
{{- if or $envFrom $existingSecret }}
envFrom:
  {{- with $existingSecret }}
  # every key of the existing Secret becomes a variable
  - secretRef:
      name: {{ . }}
  {{- end }}
  {{- with $envFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* `volumeMounts:` for the container ("part" "mounts") or `volumes:` for the pod ("part" "volumes"). */}}
{{- define "op.extraVolumes" -}}
{{- $own := index .root.Values .key -}}
{{- if eq .part "mounts" }}
{{- with concat (.root.Values.default.extraVolumeMounts | default list) ($own.extraVolumeMounts | default list) }}
volumeMounts:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- else }}
{{- with concat (.root.Values.default.extraVolumes | default list) ($own.extraVolumes | default list) }}
volumes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A service's values merged over `default` (env excepted: op.userEnv merges it). */}}
{{- define "op.merged" -}}
{{- toYaml (mergeOverwrite (deepCopy (omit .root.Values.default "env")) (deepCopy (index .root.Values .key))) -}}
{{- end -}}

{{/* A service's image reference. Same arguments as op.userEnv. */}}
{{- define "op.image" -}}
{{- $tag := .c.image.tag | default .root.Values.default.image.tag | default .root.Chart.AppVersion -}}
{{- $registry := .c.image.registry | default .root.Values.default.image.registry -}}
{{ if $registry }}{{ $registry }}/{{ end }}{{ .c.image.repository }}:{{ $tag }}
{{- end -}}
