{{/*
One workload: ServiceAccount, Deployment, Service, PodDisruptionBudget and
HorizontalPodAutoscaler (the last two when enabled), plus a Role when it calls the Kubernetes API
(in `rbac.namespace`, a template, when it manages objects in another namespace).

Parameters (dict):
  root       the chart context ($)
  name       the component's key in values ("labeling", "triton")
  values     the component's values block
  component  app.kubernetes.io/component label ("service", "serving")
  envFrom    ConfigMaps the container reads its environment from (list of names)
  checksum   hash of that configuration, so a change rolls the pods
  repository optional model-repository mount: mountPath, readOnly, and claimName (a shared
             PersistentVolumeClaim) or sizeLimit (an emptyDir)

Usage:
{{- include "flywheel.workload" (dict "root" $ "name" $name "values" $svc "component" "service"
      "envFrom" (list $platformConfig $serviceConfig) "checksum" $hash) }}
*/}}
{{- define "flywheel.workload" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $fullName := include "flywheel.componentName" . -}}
{{- $ports := $v.ports | default (dict "http" 8080) -}}
{{- $probes := $v.probes | default (dict "liveness" "/healthz" "readiness" "/readyz") -}}
{{- $podSecurity := mustMergeOverwrite (deepCopy $root.Values.podSecurityContext) ($v.podSecurityContext | default dict) -}}
{{- $containerSecurity := mustMergeOverwrite (deepCopy $root.Values.containerSecurityContext) ($v.containerSecurityContext | default dict) -}}
{{- $rules := ($v.rbac | default dict).rules | default list -}}
{{- /* The Role may sit in another namespace (the one the workload manages objects in). */ -}}
{{- $rbacNamespace := tpl (($v.rbac | default dict).namespace | default $root.Release.Namespace) $root -}}
{{- $secretName := $v.existingSecret | default $root.Values.secrets.existingSecret -}}
{{- $gate := $v.performanceGate | default dict -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail (printf "%s: autoscaling.minReplicas is above maxReplicas" .name) -}}
{{- end -}}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $fullName }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
  {{- with ($v.serviceAccount | default dict).annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
automountServiceAccountToken: false
{{- if $rules }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ $fullName }}
  namespace: {{ $rbacNamespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
rules:
  {{- toYaml $rules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $fullName }}
  namespace: {{ $rbacNamespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ $fullName }}
subjects:
  - kind: ServiceAccount
    name: {{ $fullName }}
    namespace: {{ $root.Release.Namespace }}
{{- end }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullName }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "flywheel.labels" . | nindent 8 }}
      annotations:
        checksum/config: {{ .checksum | default "none" | quote }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $ports.metrics | default $ports.http | quote }}
        prometheus.io/path: /metrics
    spec:
      serviceAccountName: {{ $fullName }}
      {{- /* Only workloads that call the Kubernetes API get a token. */}}
      automountServiceAccountToken: {{ if $rules }}true{{ else }}false{{ end }}
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $podSecurity | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | default 30 }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "flywheel.selectorLabels" . | nindent 14 }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "flywheel.image" . | quote }}
          imagePullPolicy: {{ ($v.image | default dict).pullPolicy | default $root.Values.image.pullPolicy }}
          {{- with $v.command }}
          command:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $v.args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            {{- range $portName, $port := $ports }}
            - name: {{ $portName }}
              containerPort: {{ $port }}
              protocol: TCP
            {{- end }}
          {{- with .envFrom }}
          envFrom:
            {{- range . }}
            - configMapRef:
                name: {{ . }}
            {{- end }}
          {{- end }}
          {{- if or $v.secretEnv $v.env (eq .component "service") }}
          env:
            {{- if eq .component "service" }}
            {{- range $variable, $key := $root.Values.secrets.keys }}
            - name: {{ $variable }}
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.secrets.existingSecret }}
                  {{- if and (eq $variable "FLYWHEEL_RABBIT_URL") $root.Values.rabbitmq.provision.enabled }}
                  key: {{ printf "rabbit-url-%s" $.name }}
                  {{- else }}
                  key: {{ $key }}
                  {{- end }}
            {{- end }}
            {{- end }}
            {{- range $suffix, $ref := $v.secretEnv }}
            - name: {{ if eq $.component "service" }}{{ $v.envPrefix }}{{ end }}{{ $suffix }}
              valueFrom:
                secretKeyRef:
                  name: {{ $ref.secret | default $secretName }}
                  key: {{ $ref.key }}
                  {{- if $ref.optional }}
                  optional: true
                  {{- end }}
            {{- end }}
            {{- range $variable, $value := $v.env }}
            - name: {{ $variable }}
              value: {{ $value | toString | quote }}
            {{- end }}
          {{- end }}
          startupProbe:
            httpGet:
              path: {{ $probes.liveness }}
              port: http
            periodSeconds: 5
            failureThreshold: {{ $v.startupFailureThreshold | default 36 }}
          livenessProbe:
            httpGet:
              path: {{ $probes.liveness }}
              port: http
            periodSeconds: 10
            timeoutSeconds: 3
            failureThreshold: 3
          readinessProbe:
            httpGet:
              path: {{ $probes.readiness }}
              port: http
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 3
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $containerSecurity | nindent 12 }}
          {{- if or $v.writableDirs .repository $gate.enabled }}
          volumeMounts:
            {{- range $v.writableDirs }}
            - name: {{ .name }}
              mountPath: {{ .mountPath }}
            {{- end }}
            {{- with .repository }}
            - name: model-repository
              mountPath: {{ .mountPath }}
              readOnly: {{ .readOnly }}
            {{- end }}
            {{- if $gate.enabled }}
            - name: gate-models
              mountPath: {{ $gate.repositoryDir }}
            {{- end }}
          {{- end }}
        {{- if $gate.enabled }}
        {{- /* The performance gate's own Triton (see the validator's values). */}}
        - name: gate-triton
          image: {{ include "flywheel.image" (dict "root" $root "values" $gate) | quote }}
          imagePullPolicy: {{ ($gate.image | default dict).pullPolicy | default $root.Values.image.pullPolicy }}
          command: [tritonserver]
          args:
            - --model-repository={{ $gate.repositoryDir }}
            - --model-control-mode=explicit
            - --strict-readiness=false
            - --http-port={{ $gate.httpPort }}
            - --allow-grpc=false
            - --allow-metrics=false
          ports:
            - name: gate-http
              containerPort: {{ $gate.httpPort }}
              protocol: TCP
          startupProbe:
            httpGet:
              path: /v2/health/live
              port: gate-http
            periodSeconds: 5
            failureThreshold: 36
          livenessProbe:
            httpGet:
              path: /v2/health/live
              port: gate-http
            periodSeconds: 10
            timeoutSeconds: 3
            failureThreshold: 3
          resources:
            {{- toYaml $gate.resources | nindent 12 }}
          securityContext:
            {{- toYaml $containerSecurity | nindent 12 }}
          volumeMounts:
            - name: gate-models
              mountPath: {{ $gate.repositoryDir }}
              readOnly: true
            - name: gate-tmp
              mountPath: /tmp
        {{- end }}
      {{- if or $v.writableDirs .repository $gate.enabled }}
      volumes:
        {{- range $v.writableDirs }}
        - name: {{ .name }}
          emptyDir:
            sizeLimit: {{ .sizeLimit | default "256Mi" }}
        {{- end }}
        {{- if $gate.enabled }}
        - name: gate-models
          emptyDir:
            sizeLimit: {{ $gate.sizeLimit | default "2Gi" }}
        - name: gate-tmp
          emptyDir:
            sizeLimit: 1Gi
        {{- end }}
        {{- with .repository }}
        - name: model-repository
          {{- if .claimName }}
          persistentVolumeClaim:
            claimName: {{ .claimName }}
            readOnly: {{ .readOnly }}
          {{- else }}
          emptyDir:
            sizeLimit: {{ .sizeLimit | default "1Gi" }}
          {{- end }}
        {{- end }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullName }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "flywheel.selectorLabels" . | nindent 4 }}
  ports:
    {{- range $portName, $port := $ports }}
    - name: {{ $portName }}
      port: {{ $port }}
      targetPort: {{ $portName }}
      protocol: TCP
      appProtocol: {{ if eq $portName "grpc" }}grpc{{ else }}http{{ end }}
    {{- end }}
{{- if $v.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullName }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  {{- if hasKey $v.podDisruptionBudget "minAvailable" }}
  minAvailable: {{ $v.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $v.podDisruptionBudget.maxUnavailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "flywheel.selectorLabels" . | nindent 6 }}
{{- end }}
{{- if $v.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $fullName }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "flywheel.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $fullName }}
  minReplicas: {{ $v.autoscaling.minReplicas }}
  maxReplicas: {{ $v.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage }}
    {{- with $v.autoscaling.requestsPerSecondPerReplica }}
    {{- /* From the golden point: see flywheel_serving.hpa. */}}
    - type: Pods
      pods:
        metric:
          name: {{ $v.autoscaling.requestsPerSecondMetric | default "triton_requests_per_second" }}
        target:
          type: AverageValue
          averageValue: {{ . | toString | quote }}
    {{- end }}
  behavior:
    scaleDown:
      stabilizationWindowSeconds: 300
{{- end }}
{{- end -}}
