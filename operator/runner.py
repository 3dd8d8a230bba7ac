"""Running the operator: kopf with our handlers, against one cluster connection.

The same connection (a kubernetes client Configuration) serves kopf's own watches and the
handlers' calls, whether it came from a kubeconfig, the pod's service account, or the local
cluster (`kvflock up`), which calls `run_operator` inside its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Sequence
from typing import Any

import kopf
import kubernetes.client
import kubernetes.config

from kvflock.operator.handlers import OperatorOptions, Runtime, register
from kvflock.operator.kube import Cluster

# The operator's entry points: the CLI and the local cluster start it through these.
__all__ = ["OperatorOptions", "load_configuration", "run_operator"]

FINALIZER = "kvflock.dev/finalizer"
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> kubernetes.client.Configuration:
    """The cluster connection: the given kubeconfig, else in-cluster, else the default kubeconfig."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None and context is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return configuration
        except kubernetes.config.ConfigException:
            pass
    try:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (kubernetes.config.ConfigException, OSError, ValueError) as exc:  # missing, unreadable or malformed
        where = kubeconfig or "the default kubeconfig (~/.kube/config or $KUBECONFIG)"
        raise ValueError(f"kubeconfig: cannot load {where}: {exc}") from exc
    return configuration


def _connection(configuration: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials, taken from the kubernetes client's configuration."""
    header = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get("BearerToken")
    scheme, _, token = (header or "").partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def _settings(options: OperatorOptions) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvflock.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvflock.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 16
    # A service deleted while its probe timer runs keeps its finalizer until kopf sees the
    # timer exit; kopf looks again only every `cancellation_polling` seconds (60 by default),
    # so a deletion could wait a minute for a probe that takes milliseconds.
    settings.background.cancellation_polling = 0.5
    settings.peering.lifetime = options.peering_lifetime
    settings.peering.stealth = True  # keep-alives every few seconds would drown the log
    return settings


async def run_operator(
    configuration: kubernetes.client.Configuration,
    *,
    namespaces: Sequence[str] = (),
    options: OperatorOptions | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness_endpoint: str | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or forever); all namespaces when none given.
    With `liveness_endpoint` (e.g. http://0.0.0.0:8080/healthz) kopf answers the kubelet's probes."""
    options = options or OperatorOptions()
    registry = kopf.OperatorRegistry()
    register(registry, options)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return _connection(configuration)

    runtime = Runtime(Cluster(kubernetes.client.ApiClient(configuration)), options)
    # Leader election: kopf pauses every operator that sees a live peer of a higher priority, and
    # all of them when priorities tie, so each replica draws its own; the highest one leads and
    # the next takes over once the leader's keep-alive expires (or at once when it stops cleanly).
    priority = random.randrange(1, 2**31) if options.peering else None
    await kopf.operator(
        registry=registry,
        settings=_settings(options),
        memo=kopf.Memo(runtime=runtime),
        namespaces=list(namespaces),
        clusterwide=not namespaces,
        standalone=options.peering is None,
        peering_name=options.peering,
        priority=priority,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
    )
