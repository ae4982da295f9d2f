{{/* Names are cut at 63 characters: the DNS label limit of Kubernetes names and label values. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: the ServiceAccount to run as and bind the operator's roles to, made beforehand (with serviceAccount.create=false; it is never the namespace's default, whose roles every pod there without its own would get)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: a digest pins it, else the tag, else the chart's appVersion. */}}
{{- define "finetune-operator.image" -}}
{{- $ref := printf "%s/%s" .Values.image.registry .Values.image.repository | trimPrefix "/" }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $ref .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.trainerImage" -}}
{{- .Values.trainer.image | default (printf "ghcr.io/finetune-dev/trainer:%s" .Chart.AppVersion) }}
{{- end }}

{{/* Annotations the operator puts on every trainer pod: the chart's scrape toggle, then the user's. */}}
{{- define "finetune-operator.trainerPodAnnotations" -}}
{{- $scrape := dict }}
{{- if .Values.prometheusScrapeAnnotations.enabled }}
{{- $scrape = dict "prometheus.io/scrape" "true" "prometheus.io/port" "9090" "prometheus.io/path" "/metrics" }}
{{- end }}
{{- merge (dict) .Values.trainer.podAnnotations $scrape | toJson }}
{{- end }}

{{/* Where the NetworkPolicy goes: its own list, else the watched namespaces, else the release's. */}}
{{- define "finetune-operator.networkPolicyNamespaces" -}}
{{- .Values.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) | toJson }}
{{- end }}

{{/* A quantity written as a whole number (8, "+8", "08", 8.0 from a values file), as its digits; "" for any other
  spelling (500m, 1k, 1.5), which the operator judges itself. */}}
{{- define "finetune-operator.digits" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) }}
{{- . }}
{{- else if regexMatch "^[+]?[0-9]+$" (toString .) }}
{{- regexReplaceAll "^[+]?0*([0-9])" (toString .) "${1}" }}
{{- end }}
{{- end }}

{{/* A Role (with a namespace) or ClusterRole of `rules`, and its binding to the operator's `subject`. */}}
{{- define "finetune-operator.grant" }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}
metadata:
  name: {{ .name }}
  {{- with .namespace }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- .labels | nindent 4 }}
rules:
  {{- toYaml .rules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}Binding
metadata:
  name: {{ .name }}
  {{- with .namespace }}
  namespace: {{ . }}
  {{- end }}
  labels:
    {{- .labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {{ .kind }}
  name: {{ .name }}
subjects:
- {{- toYaml .subject | nindent 2 }}
{{- end }}
