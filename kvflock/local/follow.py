"""Following a kind of object through the API server, as the local cluster's kubelet and load
balancer do: list it, then watch it, and start over after any error (the API server restarting
or going away) until told to stop."""

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import kubernetes.watch

log = logging.getLogger(__name__)

Object = dict[str, Any]


def follow(
    list_objects: Callable[..., Any],
    on_list: Callable[[Sequence[Object]], None],
    on_event: Callable[[str, Object], None],
    stop: threading.Event,
    who: str,
    **params: Any,
) -> None:
    """`on_list` gets every object of each fresh listing, `on_event` each watch event's type
    (ADDED, MODIFIED, DELETED) and object, until `stop` is set. `params` go to both calls
    (e.g. label_selector)."""
    while not stop.is_set():
        try:
            listing = list_objects(_preload_content=False, **params)
            on_list(json.loads(listing.data)["items"])
            watch = kubernetes.watch.Watch()
            for event in watch.stream(list_objects, timeout_seconds=5, **params):
                if stop.is_set():
                    watch.stop()
                    break
                on_event(event["type"], event["raw_object"])
        except Exception as exc:  # the API server restarting or going away: retry
            if not stop.is_set():
                log.warning("%s: watching failed (%s); retrying", who, exc)
                stop.wait(1.0)
