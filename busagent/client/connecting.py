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
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    if options.get("ca"):
        domain.set_trusted_ca_db(options["ca"])
    verify_name = options.get("verify_hostname", "1").lower() not in ("0", "false", "no")
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME if verify_name else SSLDomain.VERIFY_PEER)
    if options.get("cert"):
        domain.set_credentials(options["cert"], options.get("key") or options["cert"], None)
    return domain


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
    if user or urlsplit(url).username:
        kwargs.update(allowed_mechs="PLAIN", allow_insecure_mechs=not secure)
    elif secure and options.get("cert"):
        kwargs.update(allowed_mechs="EXTERNAL")
    return container.connect(url, **kwargs)
