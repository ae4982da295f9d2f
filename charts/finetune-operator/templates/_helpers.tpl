{{/* Names are cut at 63 characters: the DNS label limit of Kubernetes names and label values. Templates quote every
  name and namespace (and label value) made of a user's value: bare, YAML read nameOverride=no, a release `on` or a
  namespace `123` as a boolean or a number, which the apiserver refuses or Helm's labels mangle. */}}
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
app.kubernetes.io/name: {{ include "finetune-operator.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- $why := "it is never the namespace's default, whose roles every pod there without its own would get" }}
{{- $name := "" }}
{{- if .Values.serviceAccount.create }}
{{- $name = default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- $name = required (printf "serviceAccount.name: the ServiceAccount to run as and bind the operator's roles to, made beforehand (with serviceAccount.create=false; %s)" $why) .Values.serviceAccount.name }}
{{- end }}
{{- if eq $name "default" }}
{{- fail "serviceAccount.name: not default: the operator's roles bound to the namespace's default would go to every pod there that names no ServiceAccount of its own" }}
{{- end }}
{{- $name }}
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

{{/* Annotations the operator puts on every trainer pod: the chart's scrape toggle, then the user's. The schema bounds
  the user's at the operator's 64; the operator counts the scrape toggle's too (those the user's do not set), and
  their bytes (coretypes.POD_ANNOTATIONS_MAX_BYTES). */}}
{{- define "finetune-operator.trainerPodAnnotations" -}}
{{- $scrape := dict }}
{{- if .Values.prometheusScrapeAnnotations.enabled }}
{{- $scrape = dict "prometheus.io/scrape" "true" "prometheus.io/port" "9090" "prometheus.io/path" "/metrics" }}
{{- end }}
{{- $all := merge (dict) .Values.trainer.podAnnotations $scrape }}
{{- if gt (len $all) 64 }}
{{- fail (printf "trainer.podAnnotations: %d, and prometheusScrapeAnnotations' %d, make %d annotations on each trainer pod; the operator takes at most 64" (len .Values.trainer.podAnnotations) (sub (len $all) (len .Values.trainer.podAnnotations)) (len $all)) }}
{{- end }}
{{- $bytes := 0 }}
{{- range $key, $value := $all }}
{{- $bytes = add $bytes (len $key) (len (toString $value)) }}
{{- end }}
{{- if gt $bytes 122880 }}
{{- fail (printf "trainer.podAnnotations: with prometheusScrapeAnnotations', %d bytes of keys and values on each trainer pod; the operator takes at most 122880" $bytes) }}
{{- end }}
{{- /* The operator reads them from one environment variable, and Linux refuses a process whose environment holds a
  string of more than 131071 bytes (MAX_ARG_STRLEN, with its NUL): JSON writes a '"' in two bytes and a '<' in six,
  so annotations within the operator's bytes stopped its pod from ever starting ("argument list too long"). */}}
{{- $env := printf "FINETUNE_OPERATOR_TRAINER_POD_ANNOTATIONS=%s" (toJson $all) }}
{{- if gt (len $env) 131071 }}
{{- fail (printf "trainer.podAnnotations: with prometheusScrapeAnnotations', %d bytes as the operator's environment variable FINETUNE_OPERATOR_TRAINER_POD_ANNOTATIONS=<JSON> (escaping grows quotes, backslashes and <>& up to 6 times); Linux takes at most 131071 in one" (len $env)) }}
{{- end }}
{{- toJson $all }}
{{- end }}

{{/* Where the NetworkPolicy goes: its own list, else the watched namespaces, else the release's. */}}
{{- define "finetune-operator.networkPolicyNamespaces" -}}
{{- .Values.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) | toJson }}
{{- end }}

{{/* A quantity (8, "+8", "500m", "1.5Gi", "1e3") as the operator reads it, exactly at any size (no float): "order",
  text whose string order is the quantities' order (equal text, equal quantity), "whole", "text" as read, and a whole
  one's decimal "digits" (int64 reads them where "order" is at most int64's), a fraction's rounded up (as the
  apiserver's Value()) where its whole part has at most 16 digits; {} for
  what is no quantity (the schema's to refuse). A values file's number is a float to Helm, which the operator gets as
  toJson writes it: the shortest digits (9223372036854775807 comes as 9223372036854776000), 1e+21 from 1e21 on. */}}
{{- define "finetune-operator.quantity" -}}
{{- $text := ternary (toJson .) (toString .) (kindIs "float64" .) }}
{{- if regexMatch `^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]{1,3})?$` $text }}
{{- $parts := `^[+]?([0-9]*)[.]?([0-9]*)(.*)$` }}
{{- $fraction := regexReplaceAll $parts $text "${2}" }}
{{- $digits := printf "%s%s" (regexReplaceAll $parts $text "${1}") $fraction }}
{{- $suffix := regexReplaceAll $parts $text "${3}" }}
{{- $binary := dict "Ki" 1 "Mi" 2 "Gi" 3 "Ti" 4 "Pi" 5 "Ei" 6 }}
{{- $decimal := dict "n" -9 "u" -6 "m" -3 "" 0 "k" 3 "M" 6 "G" 9 "T" 12 "P" 15 "E" 18 }}
{{- $exponent := sub 0 (len $fraction) }}
{{- if hasKey $binary $suffix }}
{{- /* times 1024, digit by digit from the last */}}
{{- range until (index $binary $suffix) }}
{{- $carry := 0 }}
{{- $product := "" }}
{{- range reverse (splitList "" $digits) }}
{{- $carry = add (mul (atoi .) 1024) $carry }}
{{- $product = printf "%d%s" (mod $carry 10) $product }}
{{- $carry = div $carry 10 }}
{{- end }}
{{- $digits = printf "%d%s" $carry $product }}
{{- end }}
{{- else if hasKey $decimal $suffix }}
{{- $exponent = add $exponent (index $decimal $suffix) }}
{{- else }}
{{- $exponent = add $exponent (atoi (regexReplaceAll "^[eE][+]?" $suffix "")) }}
{{- end }}
{{- $digits = regexReplaceAll "^0+" $digits "" }}
{{- $significant := regexReplaceAll "0+$" $digits "" }}
{{- $exponent = add $exponent (sub (len $digits) (len $significant)) }}
{{- if $significant }}
{{- /* "1", the magnitude (offset, so never negative) at a fixed width, then the digits padded: zero is "0" */}}
{{- $order := printf "1%07d%s" (add 1000000 $exponent (len $significant)) (printf "%-128s" $significant | replace " " "0") }}
{{- $quantity := dict "order" $order "whole" (ge $exponent 0) "text" $text }}
{{- $wholePart := int (max 0 (add (len $significant) $exponent)) }}
{{- if $quantity.whole }}
{{- $_ := set $quantity "digits" (printf "%s%s" $significant (repeat (int $exponent) "0")) }}
{{- else if le $wholePart 16 }}
{{- $_ := set $quantity "digits" (toString (add1 (int64 (substr 0 $wholePart $significant)))) }}
{{- end }}
{{- toJson $quantity }}
{{- else }}
{{- toJson (dict "order" "0" "whole" true "text" $text "digits" "0") }}
{{- end }}
{{- else }}
{{- "{}" }}
{{- end }}
{{- end }}

{{/* A Role (with a namespace) or ClusterRole of `rules`, and its binding to the operator's `subject`. */}}
{{- define "finetune-operator.grant" }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}
metadata:
  name: {{ .name | quote }}
  {{- with .namespace }}
  namespace: {{ . | quote }}
  {{- end }}
  labels:
    {{- .labels | nindent 4 }}
rules:
  {{- toYaml .rules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}Binding
metadata:
  name: {{ .name | quote }}
  {{- with .namespace }}
  namespace: {{ . | quote }}
  {{- end }}
  labels:
    {{- .labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {{ .kind }}
  name: {{ .name | quote }}
subjects:
- {{- toYaml .subject | nindent 2 }}
{{- end }}

{{/* A duration as Prometheus writes it ("30s", "1m30s", "1d") in milliseconds: each unit's part, summed (one unit
  alone took "1m30s" for 1s and "1d" for 0). */}}
{{- define "finetune-operator.milliseconds" -}}
{{- $units := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000 "w" 604800000 "y" 31536000000 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|[smhdwy])" . -1 }}
{{- $total = add $total (mul (atoi (regexFind "^[0-9]+" .)) (index $units (regexFind "[a-z]+$" .))) }}
{{- end }}
{{- $total -}}
{{- end }}
