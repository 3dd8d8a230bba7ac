"""Chaos in the local cluster: under a steady, light load through the service URL, a worker is
SIGKILLed, a router is deleted, the operator leader is SIGKILLed, and no request fails.

The cluster runs two operator pods electing a leader (`kvflock up --operators 2`), two routers
and two workers, as the chart and the operator deploy them. After the leader's death its
follower must act: it scales the service to one replica (draining the removed worker) while the
load runs. The worker's kill -> Ready and the other recoveries are printed, never asserted
(bench/recovery.py measures the worker's phases).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from .conftest import Cluster, demo_manifest, first_container, pod_ready, service_status, wait_for
from .load import SteadyLoad

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

UP_ARGS = ("--operators", "2")
SERVICE = "chaos"
OPERATORS = "kvflock-system"





def _pid(pod: dict[str, Any]) -> int:
    return int(first_container(pod)["containerID"].removeprefix("process://"))



def _ready_after_restart(cluster: Cluster, name: str, restarts: int, namespace: str = "default") -> bool:
    pod = cluster.get("pod", name, "-n", namespace)
    return pod_ready(pod) and first_container(pod)["restartCount"] > restarts


def _pods(cluster: Cluster, selector: str, namespace: str = "default") -> list[dict[str, Any]]:
    pods = cluster.get("pods", None, "-n", namespace, "-l", selector)
    return sorted(pods["items"] if pods else [], key=lambda p: p["metadata"]["name"])


def _kill(cluster: Cluster, pod: dict[str, Any]) -> tuple[str, int, float]:
    """SIGKILL a pod's process: its name, its restart count before, and when."""
    restarts = first_container(pod)["restartCount"]
    os.kill(_pid(pod), signal.SIGKILL)
    return pod["metadata"]["name"], restarts, time.monotonic()


def _leader(cluster: Cluster) -> str:
    """The live operator replica of the highest priority in the peering object: the one that acts."""
    peering = json.loads(cluster.kubectl("get", "clusterkopfpeerings", "kvflock", "-o", "json"))
    peers = peering.get("status") or {}
    assert peers, f"no operator in the peering object: {peering}"
    return max(peers, key=lambda name: peers[name]["priority"])


def _acted(cluster: Cluster, operator: str) -> bool:
    """Whether an operator pod ran a handler or a timer (kopf logs each run; a paused peer runs none)."""
    text = (cluster.state_dir / "logs" / f"{OPERATORS}_{operator}_operator.log").read_text()
    return "Handler '" in text or "Timer '" in text


def test_a_worker_a_router_and_the_operator_leader_die_under_load_and_no_request_fails(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", demo_manifest(cluster, SERVICE, replicas=2))
    wait_for(lambda: service_status(cluster, SERVICE).get("readyReplicas") == 2, 300, "2 ready replicas")
    url = str(wait_for(lambda: service_status(cluster, SERVICE).get("url"), 60, "the service URL"))
    routers = _pods(cluster, f"kvflock.dev/service={SERVICE},kvflock.dev/role=router")
    assert len(routers) == 2, [p["metadata"]["name"] for p in routers]
    lines = []

    # One client with short answers: a request is nearly always in flight, and on 2 shared cores a
    # second client only slows the restarts down (the router sends each request to the least-loaded
    # replica, the restarted worker, fresh and idle, among them once it is back).
    with SteadyLoad(url, clients=1, max_tokens=4) as load:
        wait_for(lambda: load.done >= 2, 120, "requests under way")

        worker, restarts, killed = _kill(cluster, cluster.workers(SERVICE)[0])
        wait_for(lambda: _ready_after_restart(cluster, worker, restarts), 180, f"{worker} Ready again", interval=0.2)
        ready = time.monotonic()
        answering = wait_for(lambda: load.first_answer_from(worker, killed), 120, f"{worker} answering again",
                             interval=0.2)
        lines.append(f"worker {worker} SIGKILLed: pod Ready again after {ready - killed:.1f}s, "
                     f"answering again after {answering - killed:.1f}s")

        # A router is killed as a node drain or an eviction kills it: deleted, it finishes what it
        # serves (a SIGKILLed one would cut its open connections: the load balancer retries only
        # connections no router has read from), and the operator replaces it.
        router = routers[0]["metadata"]["name"]
        killed = time.monotonic()
        cluster.kubectl("delete", "pod", router, "--wait=false")
        wait_for(lambda: len([p for p in _pods(cluster, f"kvflock.dev/service={SERVICE},kvflock.dev/role=router")
                              if pod_ready(p)]) == 2, 180, "two ready routers again", interval=0.2)
        served = load.done
        wait_for(lambda: load.done >= served + 2, 60, "requests after the router was replaced")
        lines.append(f"router {router} deleted: two routers ready again after {time.monotonic() - killed:.1f}s")

        leader = _leader(cluster)
        operator_pods = _pods(cluster, "app.kubernetes.io/name=kvflock-operator", OPERATORS)
        operators = [p["metadata"]["name"] for p in operator_pods]
        assert leader in operators and len(operators) == 2, operators
        acted = [name for name in operators if _acted(cluster, name)]
        assert acted == [leader], f"operators that ran handlers: {acted}; the leader: {leader}"
        pod = cluster.get("pod", leader, "-n", OPERATORS)
        _, restarts, killed = _kill(cluster, pod)
        # The follower takes over once the leader's keep-alive expires, and acts: it drains and
        # removes a worker while the load runs.
        cluster.kubectl("scale", f"infsvc/{SERVICE}", "--replicas", "1")
        wait_for(lambda: len(cluster.workers(SERVICE)) == 1 and service_status(cluster, SERVICE).get("readyReplicas") == 1, 180,
                 "the new leader to scale the service to 1 replica")
        lines.append(f"operator leader {leader} SIGKILLed: the service scaled to 1 replica "
                     f"{time.monotonic() - killed:.1f}s later")
        wait_for(lambda: _ready_after_restart(cluster, leader, restarts, OPERATORS), 180,
                 f"{leader} restarted by the kubelet")
        served = load.done
        wait_for(lambda: load.done >= served + 2, 60, "requests after the scale-down")

    assert not load.failures, load.failures
    print(f"\n{load.done} requests under chaos, none failed\n" + "\n".join(lines))
