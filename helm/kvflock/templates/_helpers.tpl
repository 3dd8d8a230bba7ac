{{/* Names, labels and the operator's RBAC rules, shared by the templates. */}}

{{- define "kvflock.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, with the chart name appended unless it has it. */}}
{{- define "kvflock.fullname" -}}
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

{{/* Cluster-scoped objects are shared by every release: their names carry the namespace. */}}
{{- define "kvflock.clusterName" -}}
{{- printf "%s-%s" (include "kvflock.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvflock.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvflock.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvflock.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvflock.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvflock
{{- end }}

{{- define "kvflock.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvflock.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: set it to an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvflock.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The operator's permissions on namespaced objects: exactly the verbs of RBAC_RULES in
operator/kube.py (the calls of kvflock.operator.kube.Cluster and kopf's watches, patches and
Events). tests/helm/test_rbac.py compares the rendered roles with that list.
*/}}
{{- define "kvflock.rbac.namespacedRules" -}}
- apiGroups: ["kvflock.dev"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kvflock.dev"]
  resources: ["inferenceservices/status", "inferenceservices/scale"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* kopf's read-only observation of cluster-scoped objects: CRDs and namespaces appearing. */}}
{{- define "kvflock.rbac.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* The chart's InferenceService spec: the values' one, or else examples/smollm2-demo.yaml's. */}}
{{- define "kvflock.inferenceServiceSpec" -}}
{{- if .Values.inferenceService.spec }}
{{- toYaml .Values.inferenceService.spec }}
{{- else -}}
model:
  source: demo
  format: gguf
  servedName: smollm2-135m-instruct
replicas: 1
engine:
  dtype: float32
  maxModelLen: 2048
  maxNumSeqs: 32
  maxNumBatchedTokens: 512
resources:
  gpusPerReplica: 0
  cpu: "2"
  memory: 2Gi
probes:
  startupSeconds: 120
drainTimeoutSeconds: 30
{{- end }}
{{- end }}

{{/* Where the chart's InferenceService answers, inside the cluster. */}}
{{- define "kvflock.inferenceServiceURL" -}}
{{- $spec := include "kvflock.inferenceServiceSpec" . | fromYaml }}
{{- $port := dig "router" "port" 80 $spec | int }}
{{- printf "http://%s.%s.svc:%d" .Values.inferenceService.name .Release.Namespace $port }}
{{- end }}

{{/* The model name the chart's InferenceService serves (the operator's default: its name). */}}
{{- define "kvflock.servedModelName" -}}
{{- $spec := include "kvflock.inferenceServiceSpec" . | fromYaml }}
{{- dig "model" "servedName" .Values.inferenceService.name $spec }}
{{- end }}

{{/* "true" when the chart renders the Prometheus Operator resources (values.yaml, monitoring.enabled). */}}
{{- define "kvflock.monitoringEnabled" -}}
{{- $enabled := toString .Values.monitoring.enabled }}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end }}
{{- end }}

{{/* A number as the `le` label of a worker's histogram bucket: Python's float text (1 -> 1.0, 0.1 -> 0.1). */}}
{{- define "kvflock.bucketLabel" -}}
{{- $seconds := float64 . }}
{{- if eq $seconds (floor $seconds) }}{{ printf "%.1f" $seconds }}{{ else }}{{ $seconds }}{{ end }}
{{- end }}

{{/* Labels of the monitors and the rule: the chart's, a component, and monitoring.labels. */}}
{{- define "kvflock.monitoringLabels" -}}
{{ include "kvflock.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .root.Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}
