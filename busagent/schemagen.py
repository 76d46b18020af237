"""Write ``schemas/``: per-method JSON Schemas, envelopes, the method index and an AsyncAPI 3 document."""
from __future__ import annotations

import json
import os
from typing import Any

from busagent.api.schema import BASE_ID, SCHEMA_VERSION, all_schemas
from busagent.api.table import MethodTable, load_table
from busagent.events import load_events


def asyncapi(table: MethodTable) -> dict[str, Any]:
    """AsyncAPI 3.0 description of the method-call channel (requests and replies)."""
    methods = sorted(m.name for m in table.exposed)
    request_headers = {
        "type": "object",
        "description": "AMQP 1.0 properties of a request",
        "required": ["subject", "reply-to", "content-type"],
        "properties": {
            "subject": {"type": "string", "enum": methods, "description": "libvirt C function name"},
            "message-id": {"description": "correlates the reply when correlation-id is absent"},
            "correlation-id": {"description": "copied to the reply when present"},
            "reply-to": {"type": "string", "description": "address the reply is sent to"},
            "content-type": {"const": "application/json"},
            "ttl": {"type": "integer", "description": "milliseconds; an expired request is answered 'expired'"},
            "absolute-expiry-time": {"type": "integer"},
        },
    }
    reply_headers = {
        "type": "object",
        "required": ["correlation-id", "content-type"],
        "properties": {"correlation-id": {}, "content-type": {"const": "application/json"}},
    }
    stamp = {
        "topic": {"type": "string", "description": "the logical name it was published on"},
        "epoch": {"type": "string", "description": "new at every agent start"},
        "seq": {"type": "integer", "description": "strictly increasing across all of the agent's names"},
        "kind_seq": {"type": "integer", "description": "strictly increasing per topic: a skip is a gap"},
        "timestamp": {"type": "number", "description": "seconds since the epoch"},
        "host": {"type": "string"}, "kind": {"type": "string"},
    }
    published = {
        "event": ("{namespace}.event.{host}.{kind}",
                  "one libvirt event callback: kind e.g. domain.lifecycle; `object` is the reference, `data` "
                  "the callback's payload by name with constant names beside enum numbers; agent.hypervisor_lost"
                  " / agent.hypervisor_connected mark hypervisor loss and return; domain.job_progress carries "
                  "virDomainGetJobStats sampled while a long operation (save, dump, migration) runs; "
                  "domain.block_job_progress carries virDomainGetBlockJobInfo (cur/end) polled after a block job "
                  "call (pull, copy, commit, rebase) until the job is gone or ready",
                  {"object": {"type": "object"}, "data": {"type": "object"}},
                  sorted(e.kind for e in load_events()) + [
                      "agent.hypervisor_lost", "agent.hypervisor_connected", "domain.job_progress",
                      "domain.block_job_progress"]),
        "object": ("{namespace}.object.{host}.{kind}",
                   "property snapshot of one object on change (`object` or `removed`+`ref`), or of every object "
                   "of a kind (`snapshot`: true, `objects`), periodically and after a reconnect",
                   {"object": {"type": "object"}, "objects": {"type": "array"}, "removed": {"type": "boolean"},
                    "ref": {"type": "object"}, "snapshot": {"type": "boolean"}, "reason": {"type": "string"}},
                   ["node", "domain", "storage_pool", "network", "interface", "node_device", "secret"]),
        "stats": ("{namespace}.stats.{host}.{kind}",
                  "one sample of statistics for every object of a kind (batched, not one message per domain)",
                  {}, ["domain", "node", "storage_pool", "network"]),
        "presence": ("{namespace}.presence.{host}",
                     "birth at start, a heartbeat every interval (AMQP ttl = 3 intervals), death at clean stop",
                     {"state": {"enum": ["birth", "alive", "death"]}, "ttl": {"type": "number"}}, None),
    }
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for name, (address, text, props, kinds) in published.items():
        params: dict[str, Any] = {"namespace": {"default": "libvirt"}, "host": {"description": "host id"}}
        if kinds:
            params["kind"] = {"enum": kinds}
        channels[name] = {"address": address, "description": text, "parameters": params,
                          "messages": {name: {"$ref": f"#/components/messages/{name}"}}}
        messages[name] = {"name": name, "contentType": "application/json",
                          "payload": {"type": "object", "required": ["topic", "epoch", "seq", "kind_seq", "host"],
                                      "properties": {**stamp, **props}}}
        operations[f"publish_{name}"] = {"action": "send", "channel": {"$ref": f"#/channels/{name}"},
                                         "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}]}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "busagent",
            "version": SCHEMA_VERSION,
            "description": "libvirt's C API as AMQP 1.0 method calls. One request per call: subject = C function "
                           "name, body = JSON arguments named as in libvirt-api.xml (see methods/<name>.json "
                           "`properties.args`); the reply body holds `result` (methods/<name>.json "
                           "`properties.result`) or `error` (reply.json).",
        },
        "defaultContentType": "application/json",
        "servers": {
            "direct": {"host": "127.0.0.1:5672", "protocol": "amqp1",
                       "description": "an agent listening itself (replies to a dynamic receiver)"},
            "rabbitmq3": {"host": "broker:5672", "protocol": "amqp1",
                          "description": "RabbitMQ 3.x AMQP 1.0 plugin: requests sent to /amq/queue/<ns>.rpc.<host> "
                                         "(a durable queue the agent declares as /queue/<ns>.rpc.<host>; send "
                                         "durable messages), replies to the caller's /exchange/amq.direct/<id>, "
                                         "published messages on /topic/<name>"},
        },
        "channels": {
            "rpc": {
                "address": "{namespace}.rpc.{host}",
                "description": "the request queue of one host's agent (wire address per broker profile)",
                "parameters": {"namespace": {"default": "libvirt"}, "host": {"description": "host id"}},
                "messages": {"request": {"$ref": "#/components/messages/request"}},
            },
            "reply": {
                "address": None,
                "description": "the caller's reply address, from the request's reply-to",
                "messages": {"reply": {"$ref": "#/components/messages/reply"}},
            },
            **channels,
        },
        "operations": {
            "call": {
                "action": "receive",
                "channel": {"$ref": "#/channels/rpc"},
                "summary": "the agent receives a method call",
                "messages": [{"$ref": "#/channels/rpc/messages/request"}],
                "reply": {"channel": {"$ref": "#/channels/reply"},
                          "address": {"location": "$message.header#/reply-to"},
                          "messages": [{"$ref": "#/channels/reply/messages/reply"}]},
            },
            **operations,
        },
        "components": {
            "messages": {
                "request": {"name": "request", "contentType": "application/json", "headers": request_headers,
                            "payload": {"$ref": f"{BASE_ID}/{SCHEMA_VERSION}/request.json"},
                            "correlationId": {"location": "$message.header#/message-id"}},
                "reply": {"name": "reply", "contentType": "application/json", "headers": reply_headers,
                          "payload": {"$ref": f"{BASE_ID}/{SCHEMA_VERSION}/reply.json"},
                          "correlationId": {"location": "$message.header#/correlation-id"}},
                **messages,
            },
        },
    }


def render_all(table: MethodTable | None = None) -> dict[str, str]:
    """Every file of ``schemas/`` by relative path, as text."""
    table = table or load_table()
    docs = all_schemas(table)
    docs["asyncapi.json"] = asyncapi(table)
    return {path: json.dumps(doc, indent=2, sort_keys=True) + "\n" for path, doc in docs.items()}


def write_schemas(directory: str) -> int:
    """Write (and prune) ``directory``; returns the number of files written."""
    files = render_all()
    for path, text in files.items():
        full = os.path.join(directory, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)
    methods_dir = os.path.join(directory, "methods")
    for name in os.listdir(methods_dir):
        if f"methods/{name}" not in files:
            os.remove(os.path.join(methods_dir, name))
    return len(files)
