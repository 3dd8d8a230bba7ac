"""The local kubelet's volumes: a Pod's `secret`, `configMap` and `emptyDir` volumes as folders
of files, its `hostPath` volumes as the machine's folders, and each container's view of them.

A process cannot mount anything, so a volume becomes a folder in the pod's own directory
(``<pod dir>/volumes/<volume>``; Secret files mode 0600, folders 0700), or for hostPath the
machine's folder itself (the node is this machine), and a container sees it where its manifest
mounts it by a rewrite: every command argument and env value that is a mount path, starts with
one followed by ``/``, or is a ``--flag=`` of one, points into that folder instead. A worker told
``--api-key-file /etc/kvflock-auth/api-keys`` thus reads the Secret's key from the pod's folder.
PVCs are left alone: the process sees the host's files at the mount path. A missing Secret or
ConfigMap (or key), or a hostPath that its type says must exist, is `MountError`, which the
kubelet reports as FailedMount and retries, as a node's kubelet does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MountError", "ReadData", "materialize", "mount_points", "rewrite"]

# (kind "Secret" or "ConfigMap", name) -> its decoded data, or None when it does not exist.
ReadData = Callable[[str, str], Mapping[str, bytes] | None]


class MountError(Exception):
    """A volume could not be made (its Secret or ConfigMap, or one of its keys, is missing)."""


def _items(source: Mapping[str, Any], data: Mapping[str, bytes], what: str) -> dict[str, bytes]:
    """File path -> content of a secret or configMap volume: its `items`, else every key."""
    items = source.get("items")
    if not items:
        return dict(data)
    files = {}
    for item in items:
        if item["key"] not in data:
            if source.get("optional"):
                continue
            raise MountError(f"{what}: has no key {item['key']!r}")
        files[item.get("path") or item["key"]] = data[item["key"]]
    return files


def _write(folder: Path, files: Mapping[str, bytes], mode: int) -> None:
    for relative, content in files.items():
        path = (folder / relative).resolve()
        if folder.resolve() not in path.parents:
            raise MountError(f"volume file {relative!r} lies outside its volume")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)


def _host_folder(name: str, source: Mapping[str, Any]) -> Path:
    """A hostPath volume's folder, checked (or made) as its `type` asks."""
    folder = Path(source["path"])
    kind = source.get("type", "")
    if kind == "DirectoryOrCreate":
        folder.mkdir(parents=True, exist_ok=True)
    elif kind == "Directory" and not folder.is_dir():
        raise MountError(f"volume {name!r}: hostPath type check failed: {folder} is not a directory")
    return folder


def materialize(volumes: Sequence[Mapping[str, Any]], root: Path, read: ReadData) -> dict[str, Path]:
    """Write the pod's volumes under `root` (afresh: a restarted container sees current data);
    each volume's name -> its folder."""
    folders: dict[str, Path] = {}
    for volume in volumes:
        name = volume["name"]
        folder = root / name
        if "hostPath" in volume:
            folders[name] = _host_folder(name, volume["hostPath"])
            continue
        if "secret" in volume or "configMap" in volume:
            kind = "Secret" if "secret" in volume else "ConfigMap"
            source = volume["secret"] if kind == "Secret" else volume["configMap"]
            source_name = source.get("secretName") if kind == "Secret" else source.get("name")
            what = f"volume {name!r}: {kind} {source_name!r}"
            data = read(kind, str(source_name))
            if data is None and not source.get("optional"):
                raise MountError(f"{what} not found")
            files = _items(source, data or {}, what)
        elif "emptyDir" in volume:
            files = {}
            if folder.exists():  # an emptyDir outlives container restarts, as on a node
                folders[name] = folder
                continue
        else:
            continue
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(mode=0o700, parents=True)
        _write(folder, files, 0o600 if "secret" in volume else 0o644)
        folders[name] = folder
    return folders


def mount_points(mounts: Sequence[Mapping[str, Any]], folders: Mapping[str, Path]) -> dict[str, Path]:
    """A container's mount paths -> the folders of the volumes mounted there."""
    return {m["mountPath"].rstrip("/"): folders[m["name"]] for m in mounts if m["name"] in folders}


def rewrite(value: str, mounts: Mapping[str, Path]) -> str:
    """`value` with a leading mount path (also after ``--flag=``) replaced by its folder."""
    flag, eq, rest = value.partition("=")
    if eq and flag.startswith("-"):
        return f"{flag}={rewrite(rest, mounts)}"
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(mounts[mount_path]) + value[len(mount_path):]
    return value

