"""The same ClientApp and ServerApp on Flower's deployment engine, over TLS with SuperNode authentication.

Starts a real ``flower-superlink`` (TLS with a CA and server certificate made here,
``--enable-supernode-auth``) and two ``flower-supernode`` processes on 127.0.0.1, each with its own
``partition-id`` and an EC P-384 key registered with ``flwr supernode register``; runs a one-shot
merge with ``flwr run . CONNECTION --stream``; checks that the merged task vectors equal the
in-process simulation's for the same config; and stops every process it started, by PID.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fedmerge.io import load_state
from simulations.config import ExperimentConfig
from simulations.experiment import run_experiment

pytestmark = pytest.mark.deployment

ROOT = Path(__file__).resolve().parents[2]
NUM_NODES = 2
# Keys of [tool.flwr.app.config] that this run overrides: small and fast, two strategies.
RUN_CONFIG = {"name": "deploy", "num-clients": NUM_NODES, "local-steps": "5,9", "pretrain-steps": 20,
              "strategies": "fedavg,median", "scale": "fedavg=1,median=1", "seed": 4}
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmerge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.crt", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def make_node_keys(directory: Path, i: int) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, as ``flwr supernode register`` and the SuperNode read it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / f"node{i}", directory / f"node{i}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    private.chmod(0o600)
    return private, public


class Processes:
    """Every process this test starts; ``stop`` ends each one and its children, by PID."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        # A new session per process: its children (SuperExec, flwr-serverapp/-clientapp) share its
        # process group, so one killpg by this PID reaches all of them.
        proc = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.started.append((name, proc, log))
        return proc

    def stop(self) -> None:
        for _, proc, _ in reversed(self.started):
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc, log in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group, and the leader if still up
            proc.wait()
            log.close()

    def tail(self, lines: int = 25) -> str:
        out = []
        for name, _, log in self.started:
            log.flush()
            text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(out)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def register(public_key: Path, connection: str, monkeypatch) -> None:
    """``flwr supernode register KEY CONNECTION``, run in this process (a fresh ``flwr`` costs seconds)."""
    from typer.testing import CliRunner

    from flwr.cli.app import app as flwr_app

    result = CliRunner().invoke(flwr_app, ["supernode", "register", str(public_key), connection])
    assert result.exit_code == 0, result.output


def run_config_arg(values: dict) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items()).replace(
        "'", '"')


def test_one_shot_merge_over_tls_with_supernode_auth_equals_the_simulation(tmp_path, cache_dir, monkeypatch):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, server_cert, server_key = make_tls(certs)
    node_keys = [make_node_keys(certs, i) for i in range(NUM_NODES)]
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FEDMERGE_CACHE": cache_dir,
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "results"
    procs = Processes(env, tmp_path)
    try:
        procs.start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(server_cert), "--ssl-keyfile", str(server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "state.db"),
        ])
        _wait_for_port(port, procs)
        monkeypatch.setenv("FLWR_HOME", str(home))
        for _, public in node_keys:
            register(public, "test", monkeypatch)
        for i, (private, _) in enumerate(node_keys):
            procs.start(f"supernode{i}", [
                "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca),
                "--auth-supernode-private-key", str(private), "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={NUM_NODES}",
            ])
        run = subprocess.run(["flwr", "run", ".", "test", "--stream", "--run-config",
                              run_config_arg({**RUN_CONFIG, "out": str(out)})],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
        assert run.returncode == 0, run.stdout + run.stderr + procs.tail()
        _wait_for(lambda: (out / "results.json").is_file(), 30, "results.json", procs)
    finally:
        procs.stop()
    for _, proc, _ in procs.started:
        assert proc.poll() is not None

    config = ExperimentConfig.from_mapping({**RUN_CONFIG, "engine": "inprocess", "cache-dir": cache_dir})
    expected = run_experiment(config, progress=False)
    base = load_state(out / "base.safetensors")
    assert all(torch.equal(base[k], expected.base[k]) for k in expected.base)
    for method in config.strategies:
        merged = load_state(out / "merged" / f"{method}.safetensors")
        assert set(merged) == set(expected.merged[method])
        for k, v in expected.merged[method].items():
            torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


def _wait_for_port(port: int, procs: Processes, timeout: float = 30) -> None:
    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    _wait_for(up, timeout, f"SuperLink on port {port}", procs)


def _wait_for(check, timeout: float, what: str, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready after {timeout} s\n{procs.tail()}")
        time.sleep(0.2)
