"""Logical names -> wire addresses, per broker profile (pure).

Logical names are dotted: ``<ns>.rpc.<host>``, ``<ns>.event.<host>.<kind>``, ...
A profile says how a broker spells a queue to consume, a topic to publish on,
and where a client should ask for its replies.
"""
from __future__ import annotations

from dataclasses import dataclass


def rpc_name(namespace: str, host: str) -> str:
    return f"{namespace}.rpc.{host}"


@dataclass(frozen=True)
class Profile:
    """How one kind of AMQP 1.0 peer names things."""

    name: str
    queue_prefix: str  # request queues (consumed by one agent)
    topic_prefix: str  # published names (fan-out)
    reply_prefix: str  # where a client listens for replies; '' means a dynamic receiver
    anonymous_relay: bool  # whether the peer is known to offer it (still probed at run time)
    send_prefix: str | None = None  # where clients send requests, when not queue_prefix
    durable_queue: bool = False  # the agent asks for a durable request queue (terminus durability)

    def request_queue(self, logical: str) -> str:
        """The address the agent consumes its requests from."""
        return self.queue_prefix + logical

    def request_target(self, logical: str) -> str:
        """The address clients send requests to."""
        return (self.queue_prefix if self.send_prefix is None else self.send_prefix) + logical

    def topic(self, logical: str) -> str:
        return self.topic_prefix + logical

    def reply_address(self, client_id: str) -> str | None:
        """Address a client should listen on; None asks the peer for a dynamic one."""
        return f"{self.reply_prefix}{client_id}" if self.reply_prefix else None


PROFILES: dict[str, Profile] = {
    # The agent itself is the peer: plain names, dynamic reply receivers.
    "direct": Profile("direct", "", "", "", False),
    # RabbitMQ 3.x AMQP 1.0 plugin: /queue/NAME, /topic/KEY, /exchange/X/KEY; no dynamic
    # receivers and no anonymous relay. An attach to /queue/NAME declares the queue with the
    # terminus' durability (and a mismatch with the existing queue is refused): the agent declares
    # its request queue durable, clients send to /amq/queue/NAME, which declares nothing.
    "rabbitmq3": Profile("rabbitmq3", "/queue/", "/topic/", "/exchange/amq.direct/", False,
                         send_prefix="/amq/queue/", durable_queue=True),
    # RabbitMQ 4 (native AMQP 1.0): v2 addresses. Documented, not tested here.
    "rabbitmq4": Profile("rabbitmq4", "/queues/", "/exchanges/amq.topic/", "/exchanges/amq.direct/", True),
    # ActiveMQ Artemis: plain names (anycast queues, multicast topics by routing type). Documented.
    "artemis": Profile("artemis", "", "", "", True),
    # Qpid Dispatch / Skupper router: plain names routed by prefix, dynamic replies. Documented.
    "qpid-router": Profile("qpid-router", "", "", "", True),
}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown broker profile {name!r}") from None
