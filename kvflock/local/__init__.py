"""The local cluster: the whole system on one machine without Kubernetes (`kvflock up`).

An in-process Kubernetes API emulator, the operator, a process kubelet that runs each Pod's
command as a local process, and a load balancer that gives each service a fixed local URL.
"""
