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

{{/* The ServiceAccount the services and the topics Job run as. */}}
{{- define "op.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ default (include "op.fullname" .) .Values.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.serviceAccount.name }}
{{- end -}}
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

{{/* The in-cluster Kafka's Service by its namespaced name: KEDA's operator, in a namespace of
     its own, reaches the broker by it, and the broker advertises the same name. */}}
{{- define "op.kafkaHost" -}}
{{ include "op.fullname" . }}-kafka.{{ .Release.Namespace }}.svc
{{- end -}}

{{- define "op.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{ include "op.kafkaHost" . }}:9092
{{- else -}}
{{ required "kafka.bootstrapServers is required when kafka.enabled is false" .Values.kafka.bootstrapServers }}
{{- end -}}
{{- end -}}

{{- define "op.registryUrl" -}}
{{- if .Values.schemaRegistry.enabled -}}
http://{{ include "op.fullname" . }}-schema-registry:8081{{ if eq .Values.schemaRegistry.server "apicurio" }}/apis/ccompat/v7{{ end }}
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
  op.userEnv: `env` (over default.env) and then `extraEnv` (EnvVar objects: they win, see
  op.env).
*/}}
{{- define "op.userEnv" -}}
{{- $own := index .root.Values .key -}}
{{- range $k, $v := merge (deepCopy (.c.env | default dict)) (deepCopy .root.Values.default.env) }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- with concat (.root.Values.default.extraEnv | default list) ($own.extraEnv | default list) }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
  A container's `env` list from the chart's own variables (`own`, a YAML list) and then the
  user's (`user`, op.userEnv's): a name given again replaces the earlier entry where it stood,
  so every name is there once. The API server refuses a name twice under server-side apply,
  which Helm 4 uses, and where a later entry wins is no contract of the API anyway.
*/}}
{{- define "op.env" -}}
{{- $byName := dict -}}
{{- $names := list -}}
{{- range concat (.own | fromYamlArray) (.user | default "" | fromYamlArray) -}}
{{- if not (hasKey $byName .name) }}{{ $names = append $names .name }}{{ end -}}
{{- $_ := set $byName .name . -}}
{{- end -}}
{{- range $names }}
- {{ get $byName . | toYaml | nindent 2 | trim }}
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

{{/*
  A service's own variables (before the user's, see op.env): where the others are, its name
  for the traces, and what the chart wires up. Same arguments as op.userEnv, and "name".
*/}}
{{- define "op.serviceEnv" -}}
{{- $root := .root -}}
- name: HTTP_PORT
  value: {{ .c.port | quote }}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ include "op.kafkaBootstrap" $root | quote }}
- name: SCHEMA_REGISTRY_URL
  value: {{ include "op.registryUrl" $root | quote }}
- name: ORDERS_TOPIC
  value: {{ $root.Values.topics.orders | quote }}
- name: DLQ_TOPIC
  value: {{ $root.Values.topics.dlq | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .name }}
{{- if eq .name "order-processor" }}
# the status page (/) shows the analyzer's dead letters
- name: ANALYZER_URL
  value: "http://{{ include "op.fullname" $root }}-dlq-analyzer:{{ $root.Values.dlqAnalyzer.port }}"
{{- if $root.Values.jaeger.enabled }}
# the status page links trace ids to the chart's Jaeger UI, as the notes' port-forward puts it
# in the browser
- name: JAEGER_UI_URL
  value: "http://localhost:16686"
{{- end }}
{{- end }}
{{- with include "op.otlpEndpoint" $root }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
# the pod's name, for the resource attributes below ($(...) reads a variable defined before it)
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: metadata.name
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name={{ $root.Release.Namespace }},k8s.pod.name=$(K8S_POD_NAME){{ with $root.Values.environment }},deployment.environment.name={{ . }}{{ end }}"
{{- if and $root.Values.operations.enabled (ne .name "order-generator") }}
# the operations credential (pause, resume, redrive): docs/security.md
- name: OPERATIONS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.operations.existingSecret | default (printf "%s-operations" (include "op.fullname" $root)) }}
      key: {{ $root.Values.operations.existingSecretKey | default "token" }}
      {{- if $root.Values.operations.existingSecret }}
      optional: true
      {{- end }}
{{- end }}
{{- if .c.staticMembership }}
# static group membership (KIP-345): the pod's name is its group.instance.id
- name: GROUP_INSTANCE_ID
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: metadata.name
{{- end }}
{{- end -}}
