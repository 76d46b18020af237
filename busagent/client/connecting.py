"""How the client library connects: TLS, SASL choice and reconnection pauses (shared by calls
and subscriptions).

TLS options ride on the URL's query, so every entry point (library, CLI ``--url``, monitor
config) takes them the same way::

    amqps://agent1.example:5671?ca=/etc/pki/busagent/ca.pem&cert=me.pem&key=me-key.pem

``ca`` verifies the peer's certificate (and its host name unless ``verify_hostname=0``);
``cert``/``key`` present a client certificate, which authenticates by SASL EXTERNAL when no
user is given. A user and password (in the URL or as arguments) authenticate by SASL PLAIN,
never falling back to ANONYMOUS.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from proton import SSLDomain

from busagent.bus.tls import client_mechanisms, make_client_domain

RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)  # then 2.0 s each
TLS_OPTIONS = ("ca", "cert", "key", "verify_hostname")


def reconnect_delays() -> Iterator[float]:
    yield from RECONNECT_DELAYS
    while True:
        yield RECONNECT_DELAYS[-1]


def split_tls(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its query, and the TLS options found there (ValueError on others)."""
    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - set(TLS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown URL option(s) {', '.join(unknown)}: the options are {', '.join(TLS_OPTIONS)}")
    return urlunsplit(parts._replace(query="")), options


def ssl_domain(options: dict[str, str]) -> SSLDomain:
    """A client SSL domain from the URL's TLS options."""
    verify_name = options.get("verify_hostname", "1").lower() not in ("0", "false", "no")
    return make_client_domain(options.get("ca"), options.get("cert"), options.get("key"), verify_name)


def connect(container: Any, url: str, handler: Any, user: str | None = None, password: str | None = None) -> Any:
    """Open a proton connection (reconnection is the caller's). With credentials, in
    ``user``/``password`` or the URL, force SASL PLAIN: RabbitMQ offers ANONYMOUS first.
    With only a client certificate, force EXTERNAL."""
    url, options = split_tls(url)
    kwargs: dict[str, Any] = {"reconnect": False, "handler": handler}
    secure = urlsplit(url).scheme == "amqps"
    if secure:
        kwargs["ssl_domain"] = ssl_domain(options)
    elif options:
        raise ValueError("TLS options need an amqps:// URL")
    if user:
        kwargs.update(user=user, password=password)
    kwargs["allowed_mechs"] = client_mechanisms(user or urlsplit(url).username, secure and bool(options.get("cert")))
    if kwargs["allowed_mechs"] == "PLAIN":
        kwargs["allow_insecure_mechs"] = not secure
    return container.connect(url, **kwargs)
