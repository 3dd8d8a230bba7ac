"""Names the operator, router, local cluster and worker agree on: labels, annotations, roles,
pools and ports. Changing one changes the contract between them, so each is declared here once."""

LABEL_SERVICE = "kvflock.dev/service"
LABEL_ROLE = "kvflock.dev/role"
LABEL_REPLICA = "kvflock.dev/replica"
LABEL_POOL = "kvflock.dev/pool"

ROLE_WORKER = "worker"
ROLE_ROUTER = "router"
# Workers of a service without length pools, and the requests that fall in no pool.
DEFAULT_POOL = "default"

ANNOTATION_SPEC_HASH = "kvflock.dev/spec-hash"
ANNOTATION_AUTH_HASH = "kvflock.dev/auth-hash"
# Set by the operator on a worker it is draining: the router sends it no new requests.
ANNOTATION_DRAINING = "kvflock.dev/draining-since"
# A worker Pod's or the entry Service's address where it has no IP of its own: the local
# cluster (kvflock.local.kubelet, kvflock.local.loadbalancer) writes it, and it wins over the IP.
ANNOTATION_ENDPOINT = "kvflock.dev/endpoint"

# The container ports of the worker and router pods.
WORKER_PORT = 8000
ROUTER_PORT = 8000
