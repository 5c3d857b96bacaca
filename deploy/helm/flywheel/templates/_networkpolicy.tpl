{{/* Rule fragments of the NetworkPolicies (networkpolicy.yaml). */}}
{{- define "flywheel.ingressFromMonitoring" -}}
- from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .root.Values.monitoring.namespace }}
  ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end -}}

{{- define "flywheel.ingressFromGateway" -}}
- from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .root.Values.gateway.namespace }}
      podSelector:
        matchLabels:
          {{- toYaml .root.Values.gateway.podLabels | nindent 10 }}
  ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end -}}

{{/* Egress rules: DNS, istiod, then each dependency (a destination, or `triton`: serving). */}}
{{- define "flywheel.egress" -}}
{{- $root := .root -}}
{{- $np := $root.Values.networkPolicy -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $np.dns.namespace }}
      podSelector:
        matchLabels:
          {{- toYaml $np.dns.podLabels | nindent 10 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- if $root.Values.istio.enabled }}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $root.Values.istio.controlPlane.namespace }}
      podSelector:
        matchLabels:
          {{- toYaml $root.Values.istio.controlPlane.podLabels | nindent 10 }}
  ports:
    - port: 15012
      protocol: TCP
{{- end }}
{{- range .dependencies }}
{{- if eq . "triton" }}
- to:
    - podSelector:
        matchLabels:
          {{- include "flywheel.servingSelector" $root | nindent 10 }}
  ports:
    {{- range (include "flywheel.servingPorts" $root | fromYamlArray) }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- else }}
{{- $destination := required (printf "networkPolicy.destinations has no %q" .) (index $np.destinations .) }}
- to:
    {{- toYaml $destination.to | nindent 4 }}
  ports:
    {{- range $destination.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- end }}
{{- end -}}
