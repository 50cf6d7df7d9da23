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

{{/* The gateway's in-cluster URL (its ClusterIP Service), as clients inside the cluster reach it. */}}
{{- define "loragate.gatewayUrl" -}}
{{- printf "http://%s-gateway.%s.svc.%s:%d" (include "loragate.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.gateway.service.port) -}}
{{- end -}}

{{/*
Name of one retraining job's CronJob and ConfigMap. Call with (dict "ctx" $ "job" $job).
<fullname>-retrain-<job.name or tenant-alias>, lowercased, anything but [a-z0-9-] turned into "-";
CronJob names may be 52 characters at most (the controller appends 11 to each Job), so a longer one
keeps 43 characters plus 8 of its SHA-256 (still unique per job).
*/}}
{{- define "loragate.retrainName" -}}
{{- $suffix := .job.name | default (printf "%s-%s" (toString .job.tenant) (toString .job.alias)) -}}
{{- $raw := printf "%s-retrain-%s" (include "loragate.fullname" .ctx) $suffix -}}
{{- $base := regexReplaceAll "[^a-z0-9-]+" (lower $raw) "-" | trimSuffix "-" -}}
{{- if gt (len $base) 52 -}}
{{- printf "%s-%s" ($base | trunc 43 | trimSuffix "-") ($raw | sha256sum | trunc 8) -}}
{{- else -}}
{{- $base -}}
{{- end -}}
{{- end -}}
