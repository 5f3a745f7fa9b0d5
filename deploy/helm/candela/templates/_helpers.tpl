{{- define "candela.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release name, or release-chart when the release name lacks the chart's. */}}
{{- define "candela.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "candela.labels" -}}
app.kubernetes.io/name: {{ include "candela.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "candela.selectorLabels" -}}
app.kubernetes.io/name: {{ include "candela.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "candela.secretName" -}}
{{- if .Values.apiKey.create -}}
{{ include "candela.fullname" . }}-api-key
{{- else -}}
{{ .Values.apiKey.existingSecret }}
{{- end -}}
{{- end -}}
