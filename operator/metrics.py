"""The operator's Prometheus metrics (prefix `kvfleet_operator_`): what it decided and did."""

from prometheus_client import Counter

actions = Counter("kvfleet_operator_actions", "Actions applied to InferenceService children", ["kind", "verb"])
passes = Counter("kvfleet_operator_reconcile_passes", "Reconcile passes by outcome", ["outcome"])
