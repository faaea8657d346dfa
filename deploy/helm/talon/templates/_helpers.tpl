{{/* The name every object starts with. */}}
{{- define "talon.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "talon.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The Secret that holds the join token. */}}
{{- define "talon.joinSecret" -}}
{{- if .Values.joinToken.existingSecret -}}
{{ .Values.joinToken.existingSecret }}
{{- else -}}
{{ include "talon.name" . }}-join-token
{{- end -}}
{{- end -}}

{{/* host:7400 of every coordinator, comma-separated. */}}
{{- define "talon.coordinators" -}}
{{- $name := include "talon.name" . -}}
{{- $list := list -}}
{{- range $i := until (int .Values.coordinator.replicas) -}}
{{- $list = append $list (printf "%s-coordinator-%d.%s:7400" $name $i $name) -}}
{{- end -}}
{{- join "," $list -}}
{{- end -}}
