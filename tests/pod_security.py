"""The "restricted" Pod Security Standard as a checker of pod specs, written from the Kubernetes
documentation (concepts/security/pod-security-standards: the Baseline controls, which Restricted
includes, then Restricted's own), so that tests can hold every pod we create or render to it.

`restricted_violations(pod_spec)` lists what the Pod Security admission controller would refuse
in a namespace labelled ``pod-security.kubernetes.io/enforce: restricted``; `pod_specs` finds the
pod specs in rendered manifests (Pods and the templates of workload controllers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Baseline: capabilities a container may add; Restricted narrows this to NET_BIND_SERVICE.
_BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                          "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}
# Restricted: the only volume types allowed.
_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                 "secret"}
_SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
_APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(key) or []:
            yield f"{key}[{container.get('name')}]", container


def _baseline(spec: dict[str, Any], pod: dict[str, Any]) -> Iterator[str]:
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            yield f"host namespaces: {host} is true"
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            yield f"hostPath volumes: volume {volume.get('name')} is a hostPath"
    if (pod.get("windowsOptions") or {}).get("hostProcess"):
        yield "HostProcess: securityContext.windowsOptions.hostProcess is true"
    if ((pod.get("appArmorProfile") or {}).get("type") or "RuntimeDefault") not in _APPARMOR_TYPES:
        yield "AppArmor: the pod's appArmorProfile is not RuntimeDefault or Localhost"
    yield from _selinux("pod", pod)
    if (pod.get("seccompProfile") or {}).get("type") == "Unconfined":
        yield "seccomp: the pod's seccompProfile is Unconfined"
    for sysctl in pod.get("sysctls") or []:
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            yield f"sysctls: {sysctl.get('name')} is not a safe sysctl"
    for where, container in _containers(spec):
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            yield f"privileged containers: {where} is privileged"
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            yield f"HostProcess: {where} sets windowsOptions.hostProcess"
        added = set((context.get("capabilities") or {}).get("add") or [])
        if added - _BASELINE_CAPABILITIES:
            yield f"capabilities: {where} adds {sorted(added - _BASELINE_CAPABILITIES)}"
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                yield f"host ports: {where} uses hostPort {port['hostPort']}"
        if ((context.get("appArmorProfile") or {}).get("type") or "RuntimeDefault") not in _APPARMOR_TYPES:
            yield f"AppArmor: {where}'s appArmorProfile is not RuntimeDefault or Localhost"
        yield from _selinux(where, context)
        if context.get("procMount", "Default") != "Default":
            yield f"/proc mount type: {where} sets procMount {context['procMount']}"
        if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
            yield f"seccomp: {where}'s seccompProfile is Unconfined"


def _selinux(where: str, context: dict[str, Any]) -> Iterator[str]:
    options = context.get("seLinuxOptions") or {}
    if options.get("type", "") not in _SELINUX_TYPES:
        yield f"SELinux: {where} sets type {options['type']}"
    for key in ("user", "role"):
        if options.get(key):
            yield f"SELinux: {where} sets {key}"


def _restricted(spec: dict[str, Any], pod: dict[str, Any]) -> Iterator[str]:
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _VOLUME_TYPES:
            yield f"volume types: volume {volume.get('name')} is {sorted(kinds - _VOLUME_TYPES)}"
    if pod.get("runAsUser") == 0:
        yield "running as non-root user: the pod's runAsUser is 0"
    for where, container in _containers(spec):
        context = container.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False:
            yield f"privilege escalation: {where} does not set allowPrivilegeEscalation false"
        non_root = context.get("runAsNonRoot", pod.get("runAsNonRoot"))
        if non_root is not True:
            yield f"running as non-root: neither the pod nor {where} sets runAsNonRoot true"
        if context.get("runAsUser") == 0:
            yield f"running as non-root user: {where}'s runAsUser is 0"
        seccomp = (context.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in _SECCOMP_TYPES:
            yield f"seccomp: neither the pod nor {where} sets seccompProfile RuntimeDefault or Localhost"
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"capabilities: {where} does not drop ALL"
        added = set(capabilities.get("add") or [])
        if added - _RESTRICTED_CAPABILITIES:
            yield f"capabilities: {where} adds {sorted(added - _RESTRICTED_CAPABILITIES)}"


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks the "restricted" Pod Security Standard (empty: it passes)."""
    pod = spec.get("securityContext") or {}
    return [*_baseline(spec, pod), *_restricted(spec, pod)]


def pod_specs(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every Pod and pod template in rendered manifests."""
    for doc in manifests:
        kind, name, spec = doc.get("kind"), (doc.get("metadata") or {}).get("name"), doc.get("spec") or {}
        if kind == "Pod":
            yield f"{kind}/{name}", spec
        elif kind == "CronJob":
            yield f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]["spec"]
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"):
            yield f"{kind}/{name}", spec["template"]["spec"]
