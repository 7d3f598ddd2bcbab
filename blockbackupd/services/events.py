"""Fan-out of daemon events (``domain-connected``, ``snapshot-broken``, ...) to subscribers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

log = logging.getLogger("blockbackupd.events")

Deliver = Callable[[dict[str, Any]], None]


class Subscription:
    def __init__(self, bus: EventBus, domains: frozenset[str] | None, deliver: Deliver) -> None:
        self._bus = bus
        self.domains = domains
        self.deliver = deliver

    def wants(self, domain: str) -> bool:
        return self.domains is None or domain in self.domains

    def close(self) -> None:
        self._bus._subscriptions.discard(self)


class EventBus:
    """Synchronous fan-out; each subscriber's ``deliver`` must not block."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, domains: Collection[str] | None, deliver: Deliver) -> Subscription:
        sub = Subscription(self, None if domains is None else frozenset(domains), deliver)
        self._subscriptions.add(sub)
        return sub

    def publish(self, domain: str, type: str, **fields: Any) -> None:
        event = {"domain": domain, "type": type, **fields}
        log.info("event %s", " ".join(f"{k}={v}" for k, v in event.items()))
        for sub in list(self._subscriptions):
            if sub.wants(domain):
                try:
                    sub.deliver(event)
                except Exception:  # a broken subscriber must not stop the others
                    log.exception("event subscriber failed; dropping it")
                    sub.close()
