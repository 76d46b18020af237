"""TLS and SASL choices for the agent's AMQP connections (proton SSL domains, mechanisms).

Direct mode serves ``amqps`` when a certificate is configured; with ``tls_client_auth =
"required"`` every peer must present a certificate signed by ``tls_ca`` and is authenticated
by SASL EXTERNAL: its principal is the certificate's subject. Broker mode verifies the
broker's certificate (and by default its host name) against ``tls_ca`` and may present a
client certificate; passwords go by SASL PLAIN and never fall back to ANONYMOUS.
"""
from __future__ import annotations

import os
import stat
from typing import Any

from proton import SSLDomain, SSLException

from busagent.config import ConfigError, Settings


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def check_key_file(path: str) -> None:
    """A private key only its owner may read (like an SSH key); raise ConfigError otherwise."""
    _readable(path, "TLS key")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"TLS key {path} is accessible by group or others"
                          f" (mode {stat.S_IMODE(mode):o}); chmod 600 it")


def server_domain(settings: Settings) -> SSLDomain | None:
    """The listener's TLS set-up (direct mode), or None when no certificate is configured."""
    if not settings.tls_cert:
        if settings.tls_client_auth != "none":
            raise ConfigError("verifying client certificates needs TLS: set tls_cert and tls_key")
        return None
    _readable(settings.tls_cert, "TLS certificate")
    check_key_file(settings.tls_key)
    domain = SSLDomain(SSLDomain.MODE_SERVER)
    try:
        domain.set_credentials(settings.tls_cert, settings.tls_key, None)
        if settings.tls_client_auth == "required":
            _readable(settings.tls_ca, "TLS CA bundle")
            domain.set_trusted_ca_db(settings.tls_ca)
            domain.set_peer_authentication(SSLDomain.VERIFY_PEER, settings.tls_ca)
        else:
            domain.set_peer_authentication(SSLDomain.ANONYMOUS_PEER)
    except SSLException as exc:
        raise ConfigError(f"TLS set-up failed ({exc}): check tls_cert, tls_key and tls_ca") from None
    return domain


def make_client_domain(ca: str | None, cert: str | None, key: str | None, verify_hostname: bool) -> SSLDomain:
    """A client's TLS set-up (the agent towards a broker, the client library towards either):
    verify the peer against ``ca`` (and its host name), present ``cert``/``key`` when given."""
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    if ca:
        domain.set_trusted_ca_db(ca)
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME if verify_hostname else SSLDomain.VERIFY_PEER)
    if cert:
        domain.set_credentials(cert, key or cert, None)
    return domain


def client_domain(settings: Settings) -> SSLDomain:
    """The agent's TLS set-up for ``amqps://`` broker URLs, its files checked first."""
    if settings.tls_ca:
        _readable(settings.tls_ca, "TLS CA bundle")
    if settings.tls_cert:
        _readable(settings.tls_cert, "TLS certificate")
        check_key_file(settings.tls_key)
    try:
        return make_client_domain(settings.tls_ca, settings.tls_cert, settings.tls_key, settings.tls_verify_hostname)
    except SSLException as exc:
        raise ConfigError(f"TLS set-up failed ({exc}): check tls_ca, tls_cert and tls_key") from None


def server_mechanisms(settings: Settings) -> str:
    """What a direct-mode listener offers: EXTERNAL (client certificates) or ANONYMOUS."""
    return "EXTERNAL" if settings.tls_cert and settings.tls_client_auth == "required" else "ANONYMOUS"


def client_mechanisms(user: str | None, certificate: bool) -> str:
    """What the agent accepts from a broker: PLAIN with a password, EXTERNAL with only a
    certificate, ANONYMOUS only when it has no credentials at all (never a silent fallback)."""
    if user is not None:
        return "PLAIN"
    return "EXTERNAL" if certificate else "ANONYMOUS"


def authenticated_principal(transport: Any) -> str | None:
    """The SASL identity a direct-mode peer proved (its certificate subject with EXTERNAL);
    None for ANONYMOUS or an unfinished authentication."""
    sasl = transport.sasl()
    if sasl.outcome != sasl.OK or (sasl.mech or "").upper() == "ANONYMOUS":
        return None
    return sasl.user or None
