{{- define "candela.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "candela.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
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
