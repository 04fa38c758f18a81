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
