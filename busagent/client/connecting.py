"""How the client library connects: SASL choice and reconnection pauses (shared by calls and
subscriptions)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)  # then 2.0 s each


def reconnect_delays() -> Iterator[float]:
    yield from RECONNECT_DELAYS
    while True:
        yield RECONNECT_DELAYS[-1]


def connect(container: Any, url: str, handler: Any, user: str | None = None, password: str | None = None) -> Any:
    """Open a proton connection (reconnection is the caller's). With credentials, in
    ``user``/``password`` or the URL, force SASL PLAIN: RabbitMQ offers ANONYMOUS first."""
    kwargs: dict[str, Any] = {"reconnect": False, "handler": handler}
    if user:
        kwargs.update(user=user, password=password)
    if user or urlsplit(url).username:
        kwargs.update(allowed_mechs="PLAIN", allow_insecure_mechs=True)
    return container.connect(url, **kwargs)
