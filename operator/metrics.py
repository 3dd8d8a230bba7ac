"""The operator's Prometheus metrics (prefix `kvflock_operator_`): what it decided and did."""

from prometheus_client import Counter

actions = Counter("kvflock_operator_actions", "Actions applied to InferenceService children", ["kind", "verb"])
passes = Counter("kvflock_operator_reconcile_passes", "Reconcile passes by outcome", ["outcome"])
