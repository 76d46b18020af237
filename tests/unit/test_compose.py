"""docker-compose.yml against the real CLI, the config files it mounts, and Prometheus' targets.

There is no Docker engine here: the file is read as YAML and every part that busagent or
its neighbours will read is checked with the code that reads it (``busagent.cli``'s
parser, ``busagent.config.load``, ``busagent.monitor.load_settings``, promtool when present).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # the 'test' extra

from busagent import config
from busagent.cli import build_parser
from busagent.monitor import load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
BROKER_SERVICE = "rabbitmq"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> the repository file bound there (short syntax ``./SRC:DST[:MODE]``)."""
    out = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long volume syntax not expected here: {volume!r}"
        src, dst, *_ = volume.split(":")
        if src.startswith("./"):
            out[dst] = REPO / src
    return out


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port, from ``ports`` (``"HOST:CONTAINER"``)."""
    out = {}
    for spec in service.get("ports", []):
        host, _, container = str(spec).rpartition(":")
        out[int(container)] = int(host or container)
    return out


def listen_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def busagent_services(services) -> dict[str, tuple[dict[str, Any], Any]]:
    """Services running busagent -> (service, the parsed command line)."""
    out = {}
    for name, svc in services.items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "busagent":
            try:
                ns = build_parser().parse_args([str(a) for a in cmd[1:]])
            except SystemExit as exc:
                pytest.fail(f"service {name}: {cmd} is no valid busagent command line (exit {exc.code})")
            out[name] = (svc, ns)
    return out


def mounted_file(name: str, svc: dict[str, Any], container_path: str) -> Path:
    files = mounts(svc)
    assert container_path in files, f"service {name}: {container_path} is not mounted from the repository"
    path = files[container_path]
    assert path.is_file(), f"service {name}: {path} does not exist"
    return path


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def agent_settings(services) -> dict[str, config.Settings]:
    out = {}
    for name, (svc, ns) in busagent_services(services).items():
        if ns.command == "run":
            path = mounted_file(name, svc, ns.config) if ns.config else None
            out[name] = config.load(str(path) if path else None, env=environment(svc), uri=ns.uri, listen=ns.listen,
                                    mode=ns.mode, profile=ns.profile, broker_urls=ns.broker_url, host_id=ns.host_id,
                                    namespace=ns.namespace, log_level=ns.log_level)
    return out


def monitor_settings(services) -> dict[str, Any]:
    out = {}
    for name, (svc, ns) in busagent_services(services).items():
        if ns.command == "monitor":
            path = mounted_file(name, svc, ns.config) if ns.config else None
            out[name] = load_settings(str(path) if path else None, url=ns.url, profile=ns.profile,
                                      namespace=ns.namespace, metrics_listen=ns.metrics_listen,
                                      log_level=ns.log_level)
    return out


def broker_config(services) -> tuple[set[str], dict[str, str]]:
    """The broker's enabled plugins and its conf.d settings (``key = value``)."""
    svc = services[BROKER_SERVICE]
    plugins_file = mounted_file(BROKER_SERVICE, svc, "/etc/rabbitmq/enabled_plugins")
    text = plugins_file.read_text().strip()
    match = re.fullmatch(r"\[\s*([a-z0-9_,\s]*)\]\s*\.", text)
    assert match, f"{plugins_file} is not an Erlang list of plugin names ending with '.': {text!r}"
    plugins = {p.strip() for p in match.group(1).split(",") if p.strip()}
    settings = {}
    for dst, path in mounts(svc).items():
        if dst.startswith("/etc/rabbitmq/conf.d/") or dst == "/etc/rabbitmq/rabbitmq.conf":
            assert path.is_file(), path
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    key, sep, value = line.partition("=")
                    assert sep, f"{path}: {line!r} is not key = value"
                    settings[key.strip()] = value.strip()
    return plugins, settings


def prometheus_service(services) -> tuple[str, dict[str, Any]]:
    found = [(n, s) for n, s in services.items() if str(s.get("image", "")).startswith("prom/prometheus")]
    assert len(found) == 1, "one Prometheus service expected"
    return found[0]


def prometheus_config(services) -> tuple[Path, dict[str, Any]]:
    name, svc = prometheus_service(services)
    path = mounted_file(name, svc, "/etc/prometheus/prometheus.yml")
    return path, yaml.safe_load(path.read_text())


# -- the tests -----------------------------------------------------------------------------
def test_services(services):
    assert BROKER_SERVICE in services
    kinds = {name: ns.command for name, (_, ns) in busagent_services(services).items()}
    assert sorted(k for k in kinds.values()) == ["monitor", "run", "run"], kinds
    prometheus_service(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"


def test_every_command_is_a_valid_cli_invocation(services):
    for name, (svc, ns) in busagent_services(services).items():
        assert ns.command in ("run", "monitor"), name
        assert isinstance(svc["command"], list), f"{name}: exec form (a list) keeps arguments exact"


def test_mounted_files_exist(services):
    for name, svc in services.items():
        for dst, path in mounts(svc).items():
            assert path.is_file(), f"service {name}: {path} (mounted at {dst}) is missing"


def test_agents_configs_load_and_agree(services):
    agents = agent_settings(services)
    assert len(agents) == 2
    plugins, broker = broker_config(services)
    host_ids = [s.host_id for s in agents.values()]
    assert all(host_ids) and len(set(host_ids)) == len(host_ids), f"host ids must be set and distinct: {host_ids}"
    for name, settings in agents.items():
        assert settings.mode == "broker" and settings.profile == "rabbitmq3", name
        for url in settings.broker_urls:
            parts = urlsplit(url)
            assert parts.hostname == BROKER_SERVICE and (parts.port or 5672) == 5672, f"{name}: {url}"
            assert (parts.username, parts.password) == (broker.get("default_user"), broker.get("default_pass")), \
                f"{name}: {url} does not log in as the broker's user"
        host, port = listen_port(settings.metrics_listen)
        assert host == "0.0.0.0", f"{name}: metrics on {settings.metrics_listen} are unreachable from Prometheus"
        assert port in published(services[name]), f"{name}: metrics port {port} is not published"
        assert BROKER_SERVICE in services[name].get("depends_on", {}), name
    assert len({s.namespace for s in agents.values()}) == 1


def test_monitor_config_loads_and_agrees(services):
    monitors = monitor_settings(services)
    assert len(monitors) == 1
    (name, mon), = monitors.items()
    agents = agent_settings(services)
    _, broker = broker_config(services)
    parts = urlsplit(mon.url)
    assert parts.hostname == BROKER_SERVICE and (parts.port or 5672) == 5672
    assert (parts.username, parts.password) == (broker.get("default_user"), broker.get("default_pass"))
    assert {mon.namespace} == {s.namespace for s in agents.values()}
    assert {mon.profile} == {s.profile for s in agents.values()}
    host, port = listen_port(mon.metrics_listen)
    assert host == "0.0.0.0" and port in published(services[name])
    assert BROKER_SERVICE in services[name].get("depends_on", {})


def test_published_ports_are_distinct(services):
    host_ports = [p for svc in services.values() for p in published(svc).values()]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_broker_speaks_amqp_1_0(services):
    svc = services[BROKER_SERVICE]
    assert str(svc["image"]).startswith("rabbitmq:3."), "the rabbitmq3 profile is for RabbitMQ 3.x"
    plugins, broker = broker_config(services)
    assert "rabbitmq_amqp1_0" in plugins
    assert 5672 in published(svc)
    assert broker.get("default_user") and broker.get("default_pass")


def test_prometheus_scrapes_the_agents_and_the_monitor(services):
    _, prom = prometheus_config(services)
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    expected = set()
    for name, settings in agent_settings(services).items():
        expected.add(f"{name}:{listen_port(settings.metrics_listen)[1]}")
    for name, settings in monitor_settings(services).items():
        expected.add(f"{name}:{listen_port(settings.metrics_listen)[1]}")
    plugins, _ = broker_config(services)
    if "rabbitmq_prometheus" in plugins:
        expected.add(f"{BROKER_SERVICE}:15692")
    assert targets == expected
    for job in prom["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]


def test_prometheus_config_passes_promtool(services):
    path, _ = prometheus_config(services)
    promtool = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/setup extracts it from Debian's prometheus package)")
    done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_builds_busagent(services):
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        text = dockerfile.read_text()
        for package in ("libvirt-dev", "pkg-config", "gcc"):
            assert package in text, f"{dockerfile}: {package} (libvirt-python builds against it)"
        assert re.search(r"pip install [^\n]*\.", text), f"{dockerfile}: does not pip install the project"
        for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
            for item in src.split():
                assert (context / item).exists(), f"{dockerfile}: COPY {item}: missing"
    images = {svc.get("image") for _, (svc, _) in busagent_services(services).items()}
    assert len(images) == 1, f"every busagent service runs one image: {images}"


def test_agent_config_keys_are_known():
    """Every key of the agent files is one config.load reads (a typo would be silently ignored)."""
    known = set(config._FILE_KEYS)
    for path in sorted((REPO / "config").glob("agent*.toml")):
        doc = tomllib.loads(path.read_text())
        keys = {f"{section}.{key}" for section, table in doc.items() for key in table}
        assert keys <= known, f"{path.name}: unknown keys {sorted(keys - known)}"
