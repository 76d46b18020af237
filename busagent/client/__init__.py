"""Python client for busagent: call libvirt C functions on any host over AMQP 1.0."""
from busagent.client.core import Client
from busagent.client.errors import CallError, CallTimeout, ConnectionFailed, LibvirtError

__all__ = ["Client", "CallError", "CallTimeout", "ConnectionFailed", "LibvirtError"]
