"""Command line: ``busagent run | call | methods | schema``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs -> arguments; VALUE is JSON when it parses, else a string;
    dotted names nest (``domain.name=test``)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"argument {item!r} is not NAME=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def cmd_run(ns: argparse.Namespace) -> int:
    from busagent import config, logconfig
    from busagent.agent import Agent

    settings = config.load(ns.config, uri=ns.uri, listen=ns.listen, mode=ns.mode, profile=ns.profile,
                           broker_urls=ns.broker_url, host_id=ns.host_id, namespace=ns.namespace,
                           log_level=ns.log_level)
    logconfig.configure(settings.log_level)
    agent = Agent(settings)
    agent.install_signal_handlers()
    agent.run()
    return 0


def cmd_call(ns: argparse.Namespace) -> int:
    from busagent.client import CallError, CallTimeout, Client, ConnectionFailed

    args = parse_assignments(ns.args)
    with Client(ns.url, host=ns.host, profile=ns.profile, namespace=ns.namespace) as client:
        try:
            result = client.call(ns.method, timeout=ns.timeout, **args)
        except CallError as exc:
            print(json.dumps({"error": exc.error}, indent=2), file=sys.stderr)
            return 1
        except (CallTimeout, ConnectionFailed) as exc:
            print(json.dumps({"error": {"kind": type(exc).__name__, "message": str(exc)}}), file=sys.stderr)
            return 2
    print(json.dumps(result, indent=2))
    return 0


def cmd_methods(ns: argparse.Namespace) -> int:
    from busagent.api.table import load_table

    table = load_table()
    if ns.json:
        print(json.dumps({"exposed": {m.name: m.access for m in table.exposed},
                          "excluded": {m.name: m.excluded for m in table.excluded},
                          "coverage": table.coverage_line()}, indent=2))
        return 0
    for m in table.exposed:
        print(f"{m.name:48} {m.access}")
    if ns.excluded:
        for m in table.excluded:
            print(f"{m.name:48} excluded: {m.excluded}")
    print(table.coverage_line())
    return 0


def cmd_schema(ns: argparse.Namespace) -> int:
    from busagent.schemagen import write_schemas

    written = write_schemas(ns.dir)
    print(f"wrote {written} files to {ns.dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="busagent", description="libvirt on an AMQP 1.0 bus")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent (defaults: test:///default, direct mode on 127.0.0.1:5672)")
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--uri", help="libvirt URI")
    run.add_argument("--listen", help="direct mode: HOST:PORT to listen on")
    run.add_argument("--mode", choices=["direct", "broker"])
    run.add_argument("--broker-url", action="append", help="broker mode: URL (repeat for failover)")
    run.add_argument("--profile", help="broker address profile (rabbitmq3, ...)")
    run.add_argument("--host-id", help="host id on the bus (default: the hypervisor's hostname)")
    run.add_argument("--namespace", help="logical name prefix (default libvirt)")
    run.add_argument("--log-level")
    run.set_defaults(func=cmd_run)

    call = sub.add_parser("call", help="call a libvirt C function on a host")
    call.add_argument("--url", default="amqp://127.0.0.1:5672")
    call.add_argument("--host", help="host id (direct mode: asked from the agent)")
    call.add_argument("--profile", default="direct")
    call.add_argument("--namespace", default="libvirt")
    call.add_argument("--timeout", type=float, default=30.0)
    call.add_argument("method", help="C function name, e.g. virDomainGetInfo")
    call.add_argument("args", nargs="*", help="NAME=VALUE (JSON values; dotted names nest)")
    call.set_defaults(func=cmd_call)

    methods = sub.add_parser("methods", help="list the method table and its coverage")
    methods.add_argument("--excluded", action="store_true", help="also list exclusions and reasons")
    methods.add_argument("--json", action="store_true")
    methods.set_defaults(func=cmd_methods)

    schema = sub.add_parser("schema", help="write the JSON Schemas and the AsyncAPI document")
    schema.add_argument("--dir", default="schemas")
    schema.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
