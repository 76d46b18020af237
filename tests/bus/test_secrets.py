"""No secret leaks: passwords and credentials never reach logs, error replies or /metrics.

A real agent process is given secrets every way it can take them (the environment, a
credentials file, a broker URL, method arguments), is made to fail with them (wrong
password, libvirt errors, bad arguments), and everything it said is searched for them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from busagent.client import CallError, Client
from busagent.client.errors import ConnectionFailed

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_agent(args: list[str], env: dict[str, str], metrics_port: int) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BUSAGENT_")}
    full_env.update(env, BUSAGENT_METRICS_LISTEN=f"127.0.0.1:{metrics_port}", BUSAGENT_SAMPLE_INTERVAL="0.5")
    return subprocess.Popen([sys.executable, "-m", "busagent", "run", *args], env=full_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _scrape(port: int, seconds: float = 15.0) -> str:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> str:
    """Stop the agent; its stdout (stderr is read by the caller)."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.stdout.read()


def test_broker_passwords_stay_out_of_logs_and_metrics(broker_url, tmp_path):
    """Wrong passwords from the environment, a file and a URL: refused, logged, never shown."""
    host_port = broker_url.rsplit("@", 1)[1]
    env_secret, file_secret, url_secret = "env-Secret-93f1", "file-Secret-27ab", "url-Secret-5c0d"
    creds = tmp_path / "bus.toml"
    creds.write_text(f'user = "busagent-writer"\npassword = "{file_secret}"\n')
    creds.chmod(0o600)
    runs = [
        ([f"--broker-url=amqp://{host_port}"], {"BUSAGENT_BUS_USER": "busagent-writer",
                                                "BUSAGENT_BUS_PASSWORD": env_secret}),
        ([f"--broker-url=amqp://{host_port}"], {"BUSAGENT_CREDENTIALS_FILE": str(creds)}),
        ([f"--broker-url=amqp://busagent-writer:{url_secret}@{host_port}"], {}),
    ]
    for args, env in runs:
        port = _free_port()
        proc = _run_agent(["--mode=broker", "--profile=rabbitmq3", f"--host-id=leak-{port}", *args], env, port)
        try:
            lines: list[str] = []
            reader = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
            reader.start()  # RabbitMQ answers a wrong password after a few seconds
            deadline = time.monotonic() + 20
            while not any("unauthorized" in line for line in lines) and time.monotonic() < deadline:
                time.sleep(0.1)
            metrics = _scrape(port)
        finally:
            output = _stop(proc)
            reader.join(5)
            output += "".join(lines)
        assert "busagent_bus_connected 0.0" in metrics, metrics[-2000:]
        assert "unauthorized" in output, output[-2000:]  # the refusal is logged ...
        for secret in (env_secret, file_secret, url_secret):
            assert secret not in output  # ... and no password with it
            assert secret not in metrics


def test_method_arguments_and_errors_carry_no_secret(agent, client):
    """A password passed as a method argument (virDomainSetUserPassword) or inside XML (a VNC
    password) is not logged, and the error replies do not echo it."""
    import structlog

    secret = "arg-Secret-71e4"
    with structlog.testing.capture_logs() as logs:
        client.call("virDomainSetUserPassword", dom={"name": "test"}, user="root", password=secret, flags=0)
        with pytest.raises(CallError) as unsupported:  # libvirt's error for an unknown flag
            client.call("virDomainSetUserPassword", dom={"name": "test"}, user="root", password=secret, flags=1 << 30)
        with pytest.raises(CallError) as bad:
            client.call("virDomainSetUserPassword", dom={"name": "test"}, user="root", password=secret, flags="x")
        xml = (f"<domain type='test'><name>leak-{os.getpid()}</name><memory>1024</memory><devices>"
               f"<graphics type='vnc' passwd='{secret}'/><bogus-element/></devices></domain>")
        with pytest.raises(CallError) as malformed:  # libvirt quotes the bad line in its message
            client.call("virDomainDefineXML", xml=xml.replace("<bogus-element/>", "<bogus-element>"))
    assert "passwd='***'" in str(malformed.value)  # the rest of libvirt's message is kept
    for exc in (unsupported.value, bad.value, malformed.value):
        assert secret not in str(exc) and secret not in json.dumps(exc.error, default=str)
    assert logs, "the agent logged nothing"  # the per-request lines were captured
    assert secret not in json.dumps(logs, default=str)


def test_secret_values_are_refused_to_read_only_principals():
    """virSecretGetValue is a privileged read: the method table marks it so (a read role goes
    through a read-only libvirt connection, which libvirt refuses for secret values)."""
    from busagent.api.table import load_table

    table = load_table()
    m = table.methods["virSecretGetValue"]
    assert m.access == "write", m.access


def test_client_url_password_is_redacted_in_errors():
    url = "amqp://someone:cli-Secret-0a9b@127.0.0.1:1"
    with pytest.raises(ConnectionFailed) as info:
        with Client(url, timeout=2) as c:
            c.call("busagentPing")
    assert "cli-Secret-0a9b" not in str(info.value)
