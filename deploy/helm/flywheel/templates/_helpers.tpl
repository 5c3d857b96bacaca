{{/*
Names, labels and identities shared by every template.
Component templates take a dict: "root" (the chart context $), "name" (the component's key in
values, e.g. "inference-bff") and "values" (its block).
*/}}

{{/* Prefix of every object name: 40 characters leave room for the longest component suffix. */}}
{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Object name of a component: (dict "root" $ "name" "labeling"). */}}
{{- define "flywheel.componentName" -}}
{{- printf "%s-%s" (include "flywheel.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "flywheel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: flywheel
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component | default "service" }}
{{ include "flywheel.selectorLabels" . }}
{{- end -}}

{{/* Labels of chart-wide objects (no component). */}}
{{- define "flywheel.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flywheel
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Image reference of a component: its image block over the chart-wide one. */}}
{{- define "flywheel.image" -}}
{{- $image := .values.image | default dict -}}
{{- $registry := $image.registry | default .root.Values.image.registry -}}
{{- $tag := $image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry $image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Istio identity (SPIFFE principal) of a ServiceAccount: (list $ namespace serviceAccount). */}}
{{- define "flywheel.principal" -}}
{{- $root := index . 0 -}}
{{- printf "%s/ns/%s/sa/%s" $root.Values.istio.trustDomain (index . 1) (index . 2) -}}
{{- end -}}

{{/* Name of the predictor Kubernetes Service KServe creates for the InferenceService. */}}
{{- define "flywheel.kserveName" -}}
{{- include "flywheel.componentName" (dict "root" . "name" .Values.kserve.name) -}}
{{- end -}}

{{/* host:port of the v2 inference endpoint the BFF and rollout call. */}}
{{- define "flywheel.tritonUrl" -}}
{{- if .Values.platform.tritonUrl -}}
{{- .Values.platform.tritonUrl -}}
{{- else if .Values.kserve.enabled -}}
{{- printf "%s-predictor.%s.svc.cluster.local:80" (include "flywheel.kserveName" .) .Release.Namespace -}}
{{- else -}}
{{- printf "%s.%s.svc.cluster.local:%v" (include "flywheel.componentName" (dict "root" . "name" "triton")) .Release.Namespace .Values.triton.ports.http -}}
{{- end -}}
{{- end -}}

{{/* Pod labels of whatever serves models: the chart's Triton or KServe's predictor pods. */}}
{{- define "flywheel.servingSelector" -}}
{{- if .Values.kserve.enabled -}}
serving.kserve.io/inferenceservice: {{ include "flywheel.kserveName" . }}
{{- else -}}
{{ include "flywheel.selectorLabels" (dict "root" . "name" "triton") }}
{{- end -}}
{{- end -}}

{{/* Ports the serving pods listen on. */}}
{{- define "flywheel.servingPorts" -}}
{{- if .Values.kserve.enabled -}}
[8080, 9000, 8012]
{{- else -}}
[{{ .Values.triton.ports.http }}, {{ .Values.triton.ports.grpc }}]
{{- end -}}
{{- end -}}

{{/* Data of the FLYWHEEL_* ConfigMap every service reads. */}}
{{- define "flywheel.platformConfig" -}}
FLYWHEEL_S3_ENDPOINT: {{ .Values.platform.s3Endpoint | quote }}
FLYWHEEL_S3_SECURE: {{ .Values.platform.s3Secure | toString | quote }}
FLYWHEEL_S3_REGION: {{ .Values.platform.s3Region | quote }}
FLYWHEEL_MLFLOW_URI: {{ .Values.platform.mlflowUri | quote }}
FLYWHEEL_TRITON_URL: {{ include "flywheel.tritonUrl" . | quote }}
FLYWHEEL_LOG_LEVEL: {{ .Values.platform.logLevel | quote }}
FLYWHEEL_LOG_JSON: {{ .Values.platform.logJson | toString | quote }}
FLYWHEEL_DELIVERY_LIMIT: {{ .Values.platform.deliveryLimit | toString | quote }}
FLYWHEEL_RETRY_DELAY_S: {{ .Values.platform.retryDelayS | toString | quote }}
FLYWHEEL_RETRY_DELAY_MAX_S: {{ .Values.platform.retryDelayMaxS | toString | quote }}
FLYWHEEL_MAX_MESSAGE_BYTES: {{ .Values.platform.maxMessageBytes | int | toString | quote }}
FLYWHEEL_ENVIRONMENT: {{ .Values.platform.environment | quote }}
{{- with .Values.otel.endpoint }}
FLYWHEEL_OTEL_ENDPOINT: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Data of one service's ConfigMap: its FLYWHEEL_<SERVICE>_* settings. */}}
{{- define "flywheel.serviceConfig" -}}
{{- $prefix := .values.envPrefix -}}
{{ $prefix }}HTTP_HOST: "0.0.0.0"
{{ $prefix }}HTTP_PORT: "8080"
{{- if .values.auth }}
{{ $prefix }}AUTH__JWKS_URL: {{ .root.Values.oidc.jwksUri | quote }}
{{ $prefix }}AUTH__ISSUER: {{ .root.Values.oidc.issuer | quote }}
{{- with .root.Values.oidc.audience }}
{{ $prefix }}AUTH__AUDIENCE: {{ . | quote }}
{{- end }}
{{- end }}
{{- if and (eq .name "rollout") .root.Values.kserve.enabled }}
{{- /* KServe serves: rollout drives the chart's InferenceService and publishes each version's
repository under kserve.versionsUri before naming it there. */}}
{{- $kserve := include "flywheel.kserveName" .root }}
{{ $prefix }}BACKEND: "kserve"
{{ $prefix }}KSERVE__NAMESPACE: {{ .root.Release.Namespace | quote }}
{{ $prefix }}KSERVE__NAME_TEMPLATE: {{ $kserve | quote }}
{{ $prefix }}KSERVE__STORAGE_URI_TEMPLATE: {{ .root.Values.kserve.versionsUri | quote }}
{{ $prefix }}KSERVE__RUNTIME: {{ .root.Values.kserve.runtime | quote }}
{{ $prefix }}KSERVE__MODEL_FORMAT: {{ .root.Values.kserve.modelFormat | quote }}
{{ $prefix }}KSERVE__SERVICE_ACCOUNT: {{ $kserve | quote }}
{{- end }}
{{- with .values.performanceGate }}
{{- if .enabled }}
{{- /* The gate's Triton is the pod's sidecar: same network namespace, same folder. */}}
{{ $prefix }}PERFORMANCE__ENABLED: "true"
{{ $prefix }}PERFORMANCE__TRITON_URL: {{ printf "127.0.0.1:%v" .httpPort | quote }}
{{ $prefix }}PERFORMANCE__REPOSITORY_DIR: {{ .repositoryDir | quote }}
{{- end }}
{{- end }}
{{- range $key, $value := .values.config }}
{{ $prefix }}{{ $key }}: {{ tpl (toString $value) $.root | quote }}
{{- end }}
{{- end -}}
