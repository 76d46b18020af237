"""Command line: ``busagent run | call | methods | schema | watch | hosts | monitor``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from busagent.config import PROFILES


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
    import structlog

    from busagent import config, logconfig, memory
    from busagent.agent import Agent

    try:
        settings = config.load(ns.config, uri=ns.uri, listen=ns.listen, mode=ns.mode, profile=ns.profile,
                               broker_urls=ns.broker_url, host_id=ns.host_id, namespace=ns.namespace,
                               log_level=ns.log_level)
    except (OSError, ValueError) as exc:  # ConfigError, a TOML error, a missing file
        logconfig.configure("info")
        structlog.get_logger("busagent").error("bad configuration", error=str(exc))
        return 2
    logconfig.configure(settings.log_level)
    memory.pin_mmap_threshold()  # big requests' buffers go back to the system once answered
    agent = Agent(settings)
    try:
        agent.start_services()
    except (OSError, ValueError) as exc:  # a port taken, a key others may read, a bad policy: say so
        structlog.get_logger("busagent").error("cannot start", error=str(exc), listen=settings.listen,
                                               metrics=settings.metrics_listen)
        return 1
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


def cmd_watch(ns: argparse.Namespace) -> int:
    """Print every published message matching the patterns (and gap reports) as JSON lines."""
    import queue
    import time

    from busagent.client.errors import ConnectionFailed
    from busagent.client.subscribe import Subscription

    patterns = ns.patterns or [f"{ns.namespace}.#"]
    deadline = None if ns.seconds is None else time.monotonic() + ns.seconds
    printed, announced = 0, False
    with Subscription(ns.url, patterns, profile=ns.profile) as sub:
        try:
            while ns.count is None or printed < ns.count:
                if not announced and sub.ready.is_set():
                    print(f"watching {' '.join(patterns)} on {ns.url}", file=sys.stderr, flush=True)
                    announced = True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    item = sub.get(timeout=min(remaining or 1.0, 1.0) if announced else 0.05)
                except queue.Empty:
                    continue
                print(json.dumps(item, separators=(",", ":")), flush=True)
                printed += 1
        except ConnectionFailed as exc:
            print(json.dumps({"error": {"kind": "ConnectionFailed", "message": str(exc)}}), file=sys.stderr)
            return 2
        except (KeyboardInterrupt, BrokenPipeError):
            pass
    return 0


def cmd_hosts(ns: argparse.Namespace) -> int:
    """Listen to presence messages for a while; list the agents alive at the end."""
    import queue
    import time

    from busagent.client.errors import ConnectionFailed
    from busagent.client.subscribe import Subscription
    from busagent.client.view import live_hosts

    seen: dict[str, tuple[dict[str, Any], float]] = {}
    deadline = time.monotonic() + ns.wait
    with Subscription(ns.url, [f"{ns.namespace}.presence.*"], profile=ns.profile) as sub:
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    doc = sub.get(timeout=remaining)
                except queue.Empty:
                    break
                if isinstance(doc.get("host"), str) and "state" in doc:
                    seen[doc["host"]] = (doc, time.monotonic())
        except ConnectionFailed as exc:
            print(json.dumps({"error": {"kind": "ConnectionFailed", "message": str(exc)}}), file=sys.stderr)
            return 2
    hosts = live_hosts(seen)
    if ns.json:
        for h in hosts:
            print(json.dumps(h, separators=(",", ":")))
        return 0 if hosts else 1
    if not hosts:
        print(f"no live agent on {ns.url} within {ns.wait:g} s", file=sys.stderr)
        return 1
    print(f"{'HOST':24} {'STATE':6} {'AGE':>6} {'URI':28} RPC")
    for h in hosts:
        print(f"{h['host']:24} {h['state']:6} {h['age']:6.1f} {str(h.get('uri', '')):28} {h.get('rpc', '')}")
    return 0


def cmd_monitor(ns: argparse.Namespace) -> int:
    """Follow every host on the bus; serve one Prometheus endpoint for the whole fleet."""
    from busagent import logconfig
    from busagent.config import ConfigError
    from busagent.monitor import Monitor, load_settings

    try:
        settings = load_settings(ns.config, url=ns.url, profile=ns.profile, namespace=ns.namespace,
                                 metrics_listen=ns.metrics_listen, log_level=ns.log_level)
    except (ConfigError, OSError, ValueError) as exc:
        print(json.dumps({"error": {"kind": type(exc).__name__, "message": str(exc)}}), file=sys.stderr)
        return 2
    logconfig.configure(settings.log_level)
    Monitor(settings).run_forever()
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

    watch = sub.add_parser("watch", help="print published messages (and gap reports) as JSON lines")
    watch.add_argument("--url", default="amqp://127.0.0.1:5672")
    watch.add_argument("--profile", default="direct")
    watch.add_argument("--namespace", default="libvirt")
    watch.add_argument("--count", type=int, help="stop after this many lines")
    watch.add_argument("--seconds", type=float, help="stop after this many seconds")
    watch.add_argument("patterns", nargs="*", metavar="PATTERN",
                       help="topic patterns, * one word, # any (default: NAMESPACE.#)")
    watch.set_defaults(func=cmd_watch)

    hosts = sub.add_parser("hosts", help="list live agents from their presence messages")
    hosts.add_argument("--url", default="amqp://127.0.0.1:5672")
    hosts.add_argument("--profile", default="direct")
    hosts.add_argument("--namespace", default="libvirt")
    hosts.add_argument("--wait", type=float, default=6.0, help="seconds to listen (default 6)")
    hosts.add_argument("--json", action="store_true", help="one JSON line per host")
    hosts.set_defaults(func=cmd_hosts)

    monitor = sub.add_parser("monitor", help="follow every host on the bus; one Prometheus endpoint for the fleet")
    monitor.add_argument("--config", help="TOML file ([bus] url/profile/namespace, [monitor] metrics_listen, ...)")
    monitor.add_argument("--url", help="broker (or agent) URL (default amqp://127.0.0.1:5672)")
    monitor.add_argument("--profile", choices=list(PROFILES), help="broker address profile (default direct)")
    monitor.add_argument("--namespace", help="logical name prefix (default libvirt)")
    monitor.add_argument("--metrics-listen", metavar="HOST:PORT",
                         help="Prometheus endpoint (default 127.0.0.1:9178; '' turns it off)")
    monitor.add_argument("--log-level")
    monitor.set_defaults(func=cmd_monitor)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
