{{/* Chart name, truncated to a DNS label. */}}
{{- define "loragate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; components append -gateway, -engine, -redis (kept under 63 chars). */}}
{{- define "loragate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loragate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels. Call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "loragate.labels" -}}
helm.sh/chart: {{ include "loragate.chart" .ctx }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{ include "loragate.selectorLabels" . }}
{{- end -}}

{{- define "loragate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loragate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference. Call with (dict "ctx" $ "image" .Values.image.gateway). */}}
{{- define "loragate.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}

{{- define "loragate.configName" -}}
{{- printf "%s-config" (include "loragate.fullname" .) -}}
{{- end -}}

{{- define "loragate.adminSecretName" -}}
{{- default (printf "%s-admin" (include "loragate.fullname" .)) .Values.adminKey.existingSecret -}}
{{- end -}}

{{- define "loragate.metricsSecretName" -}}
{{- default (printf "%s-metrics" (include "loragate.fullname" .)) .Values.metricsKey.existingSecret -}}
{{- end -}}

{{- define "loragate.dataClaimName" -}}
{{- default (printf "%s-data" (include "loragate.fullname" .)) .Values.storage.existingClaim -}}
{{- end -}}

{{/* Comma-separated URL of every vLLM replica, through the engine's headless Service. */}}
{{- define "loragate.engineUrls" -}}
{{- $full := include "loragate.fullname" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.engine.replicas) -}}
{{- $urls = append $urls (printf "http://%s-engine-%d.%s-engine.%s.svc.%s:%d" $full $i $full $.Release.Namespace $.Values.clusterDomain (int $.Values.engine.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{- define "loragate.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "loragate.fullname" .) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "loragate.modelDir" -}}
{{- default (printf "%s/models/SmolLM2-135M-Instruct" .Values.storage.mountPath) .Values.settings.modelDir -}}
{{- end -}}
