"""A real Kubernetes control plane on this host: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, built from source into .kube/bin (make kube-bin), loopback only.

Everything lives in one state directory: the certificates (a CA made with `cryptography`, the
API server's serving certificate, client certificates for the admin, the controller manager and
the scheduler, etcd's serving certificate and the API server's client certificate for it (etcd
answers TLS clients with a certificate of this CA only), the service-account key pair; keys
mode 0600), the kubeconfigs (0600), etcd's
data, each component's log and pid file. `stop()` ends the processes and removes the
directory; `ControlPlane.cleanup(state_dir)` does the same from the pid files alone, for a
control plane whose owner died.

    with ControlPlane(Path("/run/mesh/lab/cp")) as cp:
        subprocess.run([cp.bin.kubectl, "--kubeconfig", cp.kubeconfig, "get", "ns"])
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.lab.workloads import SERVICE_CIDR

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent.parent
BIN_DIR = ROOT / ".kube" / "bin"
GO_MODULE = ROOT / "hack" / "kube"  # pins the components and the Gateway API
CLUSTER_CIDR = "10.244.0.0/16"  # the lab's pod CIDRs (mesh.lab.network): a /24 per node
NODE_CIDR_MASK = 24
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
GRACE = 5.0  # seconds a component has to exit on SIGTERM before SIGKILL
CERT_DAYS = 365
NODE_MONITOR_GRACE = 20  # seconds without a kubelet heartbeat before its Node is NotReady


class ControlPlaneError(RuntimeError):
    """The control plane did not come up: which component, and the tail of its log."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    apiserver: Path
    controller_manager: Path
    scheduler: Path
    kubectl: Path

    @classmethod
    def at(cls, directory: Path = BIN_DIR) -> Binaries:
        return cls(directory / "etcd", directory / "kube-apiserver",
                   directory / "kube-controller-manager", directory / "kube-scheduler",
                   directory / "kubectl")

    def missing(self) -> list[Path]:
        return [p for p in (self.etcd, self.apiserver, self.controller_manager, self.scheduler,
                            self.kubectl) if not os.access(p, os.X_OK)]


# -- certificates ------------------------------------------------------------------------------

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def make_ca(cn: str = "mesh-lab-ca") -> Issued:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def issue(ca: Issued, cn: str, *, org: str | None = None, server: bool = False,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Issued:
    """A leaf certificate signed by `ca`: a client one (clientAuth; the API server reads the
    user from CN and the groups from O), or a serving one for `dns` and `ips`."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder().subject_name(_name(cn, org))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_encipherment=False, key_cert_sign=False,
                   crl_sign=False, content_commitment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False),
                   critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if dns or ips:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Created with `mode` from the start: a key is never readable by others, not even
    briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def kubeconfig(server: str, ca_pem: bytes, client: Issued, user: str) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "mesh-lab",
        "clusters": [{"name": "mesh-lab", "cluster": {
            "server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(client.cert_pem()),
            "client-key-data": b64(client.key_pem())}}],
        "contexts": [{"name": "mesh-lab", "context": {"cluster": "mesh-lab", "user": user}}],
    }, sort_keys=False)


# -- ports and processes -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _ours(pid: int, state_dir: Path) -> bool:
    """`pid` is still the process a pid file names: alive, and started with our state
    directory on its command line (not a pid reused since)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(state_dir).encode() in cmdline


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _end(pids: list[int], grace: float) -> None:
    """SIGTERM to each, SIGKILL to those still there after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler under `state_dir`
    (created; removed by `stop()`). `start()` returns once the API server is ready, the
    controller manager and the scheduler are healthy, and the controllers made the default
    namespaces' ServiceAccounts; it returns the seconds that took."""

    def __init__(self, state_dir: Path, binaries: Binaries | None = None, *,
                 service_cidr: str = SERVICE_CIDR, cluster_cidr: str = CLUSTER_CIDR,
                 node_cidr_mask: int = NODE_CIDR_MASK, verbosity: int = 1) -> None:
        self.state_dir = state_dir.resolve()
        self.bin = binaries or Binaries.at()
        self.service_cidr = service_cidr
        self.cluster_cidr = cluster_cidr
        self.node_cidr_mask = node_cidr_mask
        self.verbosity = verbosity
        self.certs = self.state_dir / "pki"
        self.logs = self.state_dir / "logs"
        self.pids = self.state_dir / "pids"
        self.etcd_port = self.etcd_peer_port = self.port = 0
        self.cm_port = self.scheduler_port = 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ssl: ssl.SSLContext | None = None
        self.start_seconds: float | None = None

    # -- what a user of it reads --

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (system:masters), mode 0600."""
        return self.state_dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the service range's first address."""
        return str(ipaddress.ip_network(self.service_cidr)[1])

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """kubectl from .kube/bin with the admin's kubeconfig."""
        return subprocess.run([str(self.bin.kubectl), "--kubeconfig", str(self.kubeconfig),
                               *args], input=input, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def connection(self, timeout: float = 30) -> http.client.HTTPSConnection:
        """A connection to the API server as the admin (kept open by whoever makes many
        requests)."""
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self._context(),
                                           timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30,
                conn: http.client.HTTPSConnection | None = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        """One JSON request as the admin: (status code, the decoded body or None). On
        `conn` when given (left open), else on a connection of its own."""
        own = conn is None
        c = conn if conn is not None else self.connection(timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            c.request(method, path, body=data, headers={
                "Content-Type": content_type, "Accept": "application/json"})
            resp = c.getresponse()
            text = resp.read()
        finally:
            if own:
                c.close()
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text.decode(errors="replace")

    # -- start and stop --

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90, attempts: int = 3) -> float:
        """Start every component and wait until the cluster is usable; the seconds taken.
        A port taken between choosing and binding it is retried with new ports."""
        missing = self.bin.missing()
        if missing:
            raise ControlPlaneError(f"missing {', '.join(p.name for p in missing)} in "
                                    f"{missing[0].parent}: run make kube-bin")
        began = time.monotonic()
        for attempt in range(attempts):
            try:
                self._start(began + timeout)
                break
            except ControlPlaneError as e:
                self.stop()
                if "address already in use" not in str(e) or attempt == attempts - 1:
                    raise
                log.info("a port was taken, starting again: %s", str(e).splitlines()[0])
        self.start_seconds = time.monotonic() - began
        log.info("control plane ready at %s in %.1fs (kubeconfig %s)", self.server,
                 self.start_seconds, self.kubeconfig)
        return self.start_seconds

    def _start(self, deadline: float) -> None:
        for d in (self.state_dir, self.certs, self.logs, self.pids):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.etcd_port, self.etcd_peer_port, self.port = free_port(), free_port(), free_port()
        self.cm_port, self.scheduler_port = free_port(), free_port()
        self._make_certificates()
        self._ssl = None
        self._spawn("etcd", self._etcd_args())
        self._spawn("kube-apiserver", self._apiserver_args())
        self._wait("the API server's /readyz", deadline, self._apiserver_ready)
        self._spawn("kube-controller-manager", self._controller_manager_args())
        self._spawn("kube-scheduler", self._scheduler_args())
        self._wait("the controller manager and the scheduler", deadline, lambda: (
            self._healthy(self.cm_port) and self._healthy(self.scheduler_port)))
        self._wait("the default ServiceAccounts", deadline, self._service_accounts_made)

    def stop(self, grace: float = GRACE) -> None:
        """End every component (the scheduler and the controller manager first, etcd last)
        and remove the state directory. Safe to call twice, and after a failed start."""
        procs = {name: self._procs.pop(name) for name in COMPONENTS if name in self._procs}
        for group in (("kube-scheduler", "kube-controller-manager", "kube-apiserver"),
                      ("etcd",)):  # etcd's clients first
            _end([p.pid for n, p in procs.items() if n in group and p.poll() is None], grace)
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        self.cleanup(self.state_dir, grace)

    @staticmethod
    def cleanup(state_dir: Path, grace: float = GRACE) -> None:
        """What a control plane left in `state_dir`, its processes (from their pid files)
        and its files, removed: for `mesh lab down` after a crash."""
        state_dir = state_dir.resolve()
        pids = []
        for name in COMPONENTS:
            with contextlib.suppress(OSError, ValueError):
                pid = int((state_dir / "pids" / f"{name}.pid").read_text())
                if _ours(pid, state_dir):
                    pids.append(pid)
        if pids:
            log.info("ending %d control plane processes left in %s", len(pids), state_dir)
            _end(pids, grace)
        shutil.rmtree(state_dir, ignore_errors=True)

    # -- the pieces --

    def _make_certificates(self) -> None:
        ca = make_ca()
        serving = issue(ca, "kube-apiserver", server=True, dns=(
            "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local"), ips=("127.0.0.1", self.service_ip))
        clients = {
            "admin": issue(ca, "mesh-lab-admin", org="system:masters"),
            "controller-manager": issue(ca, "system:kube-controller-manager"),
            "scheduler": issue(ca, "system:kube-scheduler"),
        }
        kubelet_client = issue(ca, "kube-apiserver-kubelet-client", org="system:masters")
        # etcd speaks TLS and wants a client certificate of this CA: on loopback alone, any
        # local user could otherwise read and write the whole cluster's state.
        etcd_server = issue(ca, "etcd", server=True, dns=("localhost",), ips=("127.0.0.1",))
        etcd_client = issue(ca, "kube-apiserver-etcd-client")
        sa = _key()
        write_file(self.certs / "ca.crt", ca.cert_pem())
        write_file(self.certs / "ca.key", ca.key_pem(), 0o600)
        write_file(self.certs / "apiserver.crt", serving.cert_pem())
        write_file(self.certs / "apiserver.key", serving.key_pem(), 0o600)
        write_file(self.certs / "sa.key", sa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600)
        write_file(self.certs / "sa.pub", sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        for name, issued in (("etcd-server", etcd_server), ("etcd-client", etcd_client)):
            write_file(self.certs / f"{name}.crt", issued.cert_pem())
            write_file(self.certs / f"{name}.key", issued.key_pem(), 0o600)
        write_file(self.certs / "kubelet-client.crt", kubelet_client.cert_pem())
        write_file(self.certs / "kubelet-client.key", kubelet_client.key_pem(), 0o600)
        for name, client in clients.items():
            write_file(self.certs / f"{name}.crt", client.cert_pem())
            write_file(self.certs / f"{name}.key", client.key_pem(), 0o600)
            path = self.kubeconfig if name == "admin" else \
                self.state_dir / f"{name}.kubeconfig"
            write_file(path, kubeconfig(self.server, ca.cert_pem(), client, name).encode(), 0o600)

    def _etcd_args(self) -> list[str]:
        c = self.certs
        client = f"https://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"  # one member: no peer traffic
        return [str(self.bin.etcd), "--name", "lab", "--data-dir", str(self.state_dir / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                f"--cert-file={c / 'etcd-server.crt'}", f"--key-file={c / 'etcd-server.key'}",
                "--client-cert-auth", f"--trusted-ca-file={c / 'ca.crt'}",
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"lab={peer}", "--initial-cluster-state", "new",
                "--unsafe-no-fsync",  # throwaway data, removed at stop
                "--log-level", "warn"]

    def _apiserver_args(self) -> list[str]:
        c = self.certs
        return [str(self.bin.apiserver), f"--v={self.verbosity}",
                f"--etcd-servers=https://127.0.0.1:{self.etcd_port}",
                f"--etcd-cafile={c / 'ca.crt'}", f"--etcd-certfile={c / 'etcd-client.crt'}",
                f"--etcd-keyfile={c / 'etcd-client.key'}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                # the `kubernetes` Service's endpoints may not be loopback: none are written
                "--endpoint-reconciler-type=none",
                f"--secure-port={self.port}", f"--cert-dir={c}",
                f"--service-cluster-ip-range={self.service_cidr}",
                "--authorization-mode=Node,RBAC", "--allow-privileged=true",
                "--enable-admission-plugins=NodeRestriction",
                f"--client-ca-file={c / 'ca.crt'}",
                f"--tls-cert-file={c / 'apiserver.crt'}",
                f"--tls-private-key-file={c / 'apiserver.key'}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={c / 'sa.pub'}",
                f"--service-account-signing-key-file={c / 'sa.key'}",
                # the API server's identity at the kubelets (logs, exec, port-forward)
                f"--kubelet-client-certificate={c / 'kubelet-client.crt'}",
                f"--kubelet-client-key={c / 'kubelet-client.key'}",
                # the lab's nodes are reached at their InternalIP (their names resolve
                # nowhere), and their serving certificates are the lab CA's
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-certificate-authority={c / 'ca.crt'}",
                "--profiling=false"]

    def _controller_manager_args(self) -> list[str]:
        c, conf = self.certs, str(self.state_dir / "controller-manager.kubeconfig")
        return [str(self.bin.controller_manager), f"--v={self.verbosity}",
                f"--kubeconfig={conf}", f"--authentication-kubeconfig={conf}",
                f"--authorization-kubeconfig={conf}",
                "--bind-address=127.0.0.1", f"--secure-port={self.cm_port}",
                "--leader-elect=false", "--use-service-account-credentials=true",
                "--allocate-node-cidrs=true", f"--cluster-cidr={self.cluster_cidr}",
                f"--node-cidr-mask-size={self.node_cidr_mask}",
                f"--service-cluster-ip-range={self.service_cidr}",
                f"--service-account-private-key-file={c / 'sa.key'}",
                f"--root-ca-file={c / 'ca.crt'}",
                f"--cluster-signing-cert-file={c / 'ca.crt'}",
                f"--cluster-signing-key-file={c / 'ca.key'}",
                "--controllers=*", "--profiling=false",
                # A Node whose kubelet stopped heartbeating turns NotReady after this long
                # (40 s by default): the lab's tests watch it happen.
                f"--node-monitor-grace-period={NODE_MONITOR_GRACE}s",
                # Each controller gets a ServiceAccount and a token at start, through the
                # manager's own client: at the default 20 requests a second that alone takes
                # 5 seconds.
                "--kube-api-qps=200", "--kube-api-burst=400"]

    def _scheduler_args(self) -> list[str]:
        conf = str(self.state_dir / "scheduler.kubeconfig")
        return [str(self.bin.scheduler), f"--v={self.verbosity}",
                f"--kubeconfig={conf}", f"--authentication-kubeconfig={conf}",
                f"--authorization-kubeconfig={conf}",
                "--bind-address=127.0.0.1", f"--secure-port={self.scheduler_port}",
                "--leader-elect=false", "--profiling=false"]

    def _spawn(self, name: str, args: list[str]) -> None:
        out: IO[bytes]
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    cwd=self.state_dir, start_new_session=True)
        self._procs[name] = proc
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _check_running(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}; the end of "
                    f"{self.logs / (name + '.log')}:\n{_tail(self.logs / f'{name}.log')}")

    def _wait(self, what: str, deadline: float, ready: Callable[[], bool]) -> None:
        while True:
            self._check_running()
            with contextlib.suppress(OSError, http.client.HTTPException):
                if ready():
                    return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{_tail(self.logs / f'{n}.log', 10)}"
                                  for n in self._procs)
                raise ControlPlaneError(f"timed out waiting for {what}\n{tails}")
            time.sleep(0.1)

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
            ctx.load_cert_chain(self.certs / "admin.crt", self.certs / "admin.key")
            self._ssl = ctx
        return self._ssl

    def _apiserver_ready(self) -> bool:
        status, _ = self.request("GET", "/readyz", timeout=5)
        return status == 200

    def _healthy(self, port: int) -> bool:
        """The controller manager's or the scheduler's /healthz (always allowed, no client
        certificate); its serving certificate is self-signed."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    def _service_accounts_made(self) -> bool:
        for ns in ("default", "kube-system"):
            status, _ = self.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default",
                                     timeout=5)
            if status != 200:
                return False
        return True


# -- upstream CRDs: the Gateway API's, the Network Policy API's ---------------------------------

def _module_dir(module: str) -> Path:
    """A module's directory at the version hack/kube/go.mod pins, from the Go module cache
    (`go mod download`, checked against go.sum: fetched by make kube-bin)."""
    gomod = (GO_MODULE / "go.mod").read_text()
    found = re.search(rf"^\s*{re.escape(module)} (v\S+)", gomod, re.M)
    if not found:
        raise ControlPlaneError(f"{GO_MODULE / 'go.mod'} does not require {module}")
    out = subprocess.run(["go", "mod", "download", "-json", f"{module}@{found.group(1)}"],
                         cwd=GO_MODULE, capture_output=True, text=True, check=True, timeout=300)
    return Path(json.loads(out.stdout)["Dir"])


def _crd_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("kustomiz"))


def gateway_api_crds(channel: str = "experimental") -> list[Path]:
    """The Gateway API's CRD files at the version hack/kube/go.mod pins."""
    return _crd_files(_module_dir("sigs.k8s.io/gateway-api") / "config" / "crd" / channel)


def network_policy_api_crds(channel: str = "experimental") -> list[Path]:
    """The Network Policy API's CRD files (ClusterNetworkPolicy) at the version hack/kube/go.mod
    pins."""
    return _crd_files(_module_dir("sigs.k8s.io/network-policy-api") / "config" / "crd" /
                      channel)
