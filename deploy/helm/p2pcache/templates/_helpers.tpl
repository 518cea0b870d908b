{{/* Chart name, truncated for label values. */}}
{{- define "p2pcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name for the objects of this release. */}}
{{- define "p2pcache.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "p2pcache.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "p2pcache.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The headless service that --join-dns resolves. */}}
{{- define "p2pcache.peersService" -}}
{{- printf "%s-peers" (include "p2pcache.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "p2pcache.clusterSecretName" -}}
{{- default (printf "%s-cluster-secret" (include "p2pcache.fullname" .)) .Values.clusterSecret.existingSecret -}}
{{- end -}}

{{- define "p2pcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "p2pcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "p2pcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "p2pcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "p2pcache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
