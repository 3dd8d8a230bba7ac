"""What the operator, the router, the local cluster and the worker share, free of torch and of
each other's internals: names in the cluster (labels, annotations, ports), the metrics they
read from each other, and access control."""
