{{/* Labels every object of this release carries. */}}
{{- define "pronto.labels" -}}
app.kubernetes.io/name: pronto
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "pronto.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
