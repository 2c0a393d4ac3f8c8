"""Run the real Triton Inference Server (2.51, shipped in the nvidia-pytriton wheel) standalone.

    python -m serve --repo model_repository [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

The wheel's ``tritonserver`` needs a backend directory holding the Python backend and the stub for
the running Python, the wheel's bundled libraries on LD_LIBRARY_PATH, and this virtualenv on PATH
so the stub imports numpy, DALI and ONNX Runtime from it. :class:`TritonServer` sets that up,
refuses busy ports up front, waits for readiness, and turns a failed model load into an error
that names the model and the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

from build.settings import MANIFEST, read_manifest
from clients import admin
from clients.keys import ADMIN, INFERENCE, UnusableKeyError
from serve import die_with_parent, object_store, stop_on_signals
from serve.payload_shipper import PayloadShipper
from serve.watchdog import StubWatchdog

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXIT_TIMEOUT_S = 10  # on SIGINT/SIGTERM Triton waits this long for in-flight requests, then exits anyway
PORT_ATTEMPTS = 3
CACHE = PROJECT_ROOT / ".cache" / "triton"
LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*?)\"?$")
BIND_FAILURE = re.compile(r"failed to start (\w+) service: .*already in use")
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    pass


class PortInUseError(ServerError):
    pass


class ModelLoadError(ServerError):
    def __init__(self, failures: dict[str, str], log_tail: str):
        self.failures = failures
        lines = "\n".join(f"  model '{m}': {r}" for m, r in failures.items())
        super().__init__(f"Triton could not load {len(failures)} model(s):\n{lines}\n"
                         f"--- server log (tail) ---\n{log_tail}")


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def repository_cache_bytes(repo: Path | str) -> int:
    """The response cache a local repository asks for (its build.json's response_cache_mb), in bytes."""
    if isinstance(repo, str) or not (Path(repo) / MANIFEST).is_file():
        return 0
    return int(read_manifest(Path(repo))["settings"].get("response_cache_mb", 0)) * 2 ** 20


def repository_payload_upload(repo: Path | str) -> tuple[Path, str] | None:
    """(the staging folder, the s3:// prefix) where a local repository's samples are shipped (its build.json's
    payload_dir and payload_upload: serve/payload_shipper.py), or None."""
    if isinstance(repo, str) or not (Path(repo) / MANIFEST).is_file():
        return None
    s = read_manifest(Path(repo))["settings"]
    return (Path(s["payload_dir"]), s["payload_upload"]) if s.get("payload_upload") else None


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed in this environment "
                          "(it ships the tritonserver binary); run `make venv`")
    return Path(list(spec.submodule_search_locations)[0])


def dali_backend_wheel(binary: Path) -> Path | None:
    """The DALI Python package that a Triton install's DALI backend ships for autoserialization
    (<install>/backends/dali/wheel/dali, as in the NGC images), if there is one."""
    wheel = binary.resolve().parent.parent / "backends" / "dali" / "wheel" / "dali"
    return wheel if wheel.is_dir() else None


def backend_directory() -> Path:
    """A backends/python folder with the backend library, its utils and the stub for this Python."""
    src = pytriton_dir() / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"no Python-backend stub for Python {python} in {stub.parent.parent}")
    dest = CACHE / "backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for f in (src / "backends" / "python" / "libtriton_python.so",
              src / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = dest / f.name
        if not (link.is_symlink() and link.resolve() == f.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(f)
    return dest.parent


def check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            hint = "make serve HTTP_PORT=... GRPC_PORT=... METRICS_PORT=..."
            raise PortInUseError(f"port {port} ({what}) is already in use: stop whatever listens there "
                                 f"or choose another port ({hint})") from None


def free_ports(n: int = 3) -> list[int]:
    """n distinct ports that are free right now (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the server on this machine (a wildcard or a routable address does not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass(frozen=True)
class GrpcTls:
    """gRPC over TLS: the server's certificate chain and private key (PEM); with ``client_ca``, mutual TLS:
    only clients with a certificate signed by it connect. Triton's HTTP endpoint has no TLS of its own (put a
    TLS-terminating proxy in front of it)."""
    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_args(self) -> list[str]:
        for what, path in (("certificate", self.cert), ("private key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"gRPC TLS {what} {path} does not exist")
        args = [f"--grpc-server-cert={Path(self.cert).resolve()}", f"--grpc-server-key={Path(self.key).resolve()}"]
        if self.client_ca is None:
            return ["--grpc-use-ssl=true", *args]
        return ["--grpc-use-ssl-mutual=true", *args, f"--grpc-root-cert={Path(self.client_ca).resolve()}"]


class TritonServer:
    """The tritonserver process. Use as a context manager, or start()/stop().

    It listens on ``host`` only (default loopback: nothing outside this machine reaches it unless asked).
    ``ports=None`` picks free ports, and picks again if another process takes one before Triton binds it.
    ``admin_key``: the model-repository, model-config, logging, trace and shared-memory APIs then need it
    (clients.admin); None leaves them open, as the measuring harnesses on loopback use it. ``inference_key``:
    inference, metadata and statistics then need it (clients.keys.INFERENCE); health stays open.
    ``grpc_tls``: gRPC over TLS (GrpcTls).
    """

    def __init__(self, repo: Path, ports: Ports | None = Ports(), log_file: Path | None = None, echo: bool = False,
                 extra_args: tuple[str, ...] = (), binary: Path | None = None, host: str = LOOPBACK,
                 admin_key: str | None = None, model_control: str = "none", watch_stubs: bool = True,
                 cache_bytes: int | None = None, inference_key: str | None = None,
                 grpc_tls: GrpcTls | None = None):
        """``binary``: a tritonserver with its own backends (the NGC container's); default: the pip wheel's.
        ``model_control``: "none" (the repository as loaded at start) or "explicit" (every model loaded at
        start; then loaded and unloaded through the repository API: live updates, and a draining stop).
        ``watch_stubs``: a Python-backend stub that dies is reported and, with explicit model control, its
        model reloaded (serve.watchdog; Triton 2.51 does neither). ``cache_bytes``: the size of Triton's
        local response cache; None: the repository's ``response_cache_mb`` setting (its build.json)."""
        if model_control not in ("none", "explicit"):
            raise ValueError(f"model_control must be 'none' or 'explicit', got {model_control!r}")
        self.model_control = model_control
        # a folder, or an object store's s3://[host:port/]bucket/prefix (serve.object_store)
        self.repo = str(repo) if object_store.is_object_store(repo) else Path(repo).resolve()
        self.echo, self.extra_args = echo, extra_args
        self.auto_ports = ports is None
        self.ports = ports or Ports(*free_ports(3))
        self.binary, self.host, self.admin_key = binary, host, admin_key
        self.inference_key, self.grpc_tls = inference_key, grpc_tls
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.ready = False  # every model was READY once (start() returned)
        self.log: list[str] = []
        self._reader: threading.Thread | None = None
        self.watch_stubs = watch_stubs
        self.watchdog: StubWatchdog | None = None
        self.cache_bytes = repository_cache_bytes(self.repo) if cache_bytes is None else cache_bytes
        self.payload_upload = repository_payload_upload(self.repo)
        self.shipper: PayloadShipper | None = None

    @property
    def process(self) -> subprocess.Popen:
        """The tritonserver process; a ServerError before start()."""
        if self.proc is None:
            raise ServerError("tritonserver has not been started: call start() first")
        return self.proc

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches it (a wildcard bind is reachable on loopback)."""
        return LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.connect_host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.connect_host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        if self.binary:  # a full Triton install brings its backends (DALI, TensorRT, Python)
            binary, backends = Path(self.binary), []
        else:
            binary = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
            backends = [f"--backend-directory={backend_directory()}"]
        restricted = [*(ADMIN.server_args(self.admin_key) if self.admin_key else []),
                      *(INFERENCE.server_args(self.inference_key) if self.inference_key else []),
                      *(self.grpc_tls.server_args() if self.grpc_tls else [])]
        control = ["--model-control-mode=explicit", "--load-model=*"] if self.model_control == "explicit" else []
        cache = [f"--cache-config=local,size={self.cache_bytes}"] if self.cache_bytes > 0 else []
        if cache and not self.binary:  # the wheel's local cache library (a full install has it in its default place)
            cache.append(f"--cache-directory={pytriton_dir() / 'tritonserver' / 'caches'}")
        return [str(binary), f"--model-repository={self.repo}", *backends,
                f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
                f"--http-port={self.ports.http}", f"--grpc-port={self.ports.grpc}",
                f"--metrics-port={self.ports.metrics}", "--exit-on-error=true", "--strict-readiness=true",
                "--disable-auto-complete-config", "--log-verbose=0", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                # latency quantiles per model (nv_inference_*_summary_us): serve.rollout compares a candidate's p99
                "--metrics-config=summary_latencies=true",
                *control, *cache, *restricted, *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if isinstance(self.repo, str):  # the object store's credentials
            env.update(object_store.credentials(self.repo))
        if self.binary:
            # a full Triton install (the NGC container) brings its own libraries and Python backend
            # stub; nvidia-pytriton is not installed there, so nothing of the wheel may be asked for.
            # Its DALI backend serializes dali.py pipelines with `python3` and its own DALI wheel, which
            # the image puts on PYTHONPATH; our callers may have replaced that (with pip's newer DALI
            # behind it), so it goes first again.
            wheel = dali_backend_wheel(Path(self.binary))
            if wheel is not None:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(wheel), env.get("PYTHONPATH")]))
            return env
        libs = pytriton_dir().parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # the stub's interpreter imports the project's venv packages (it has no venv of its own)
        site = [p for p in sys.path if p.endswith("site-packages")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*site, env.get("PYTHONPATH")]))
        return env

    def _pump(self, stream: IO[str]) -> None:
        """The reader thread: the server's output into self.log (and the log file, and stderr with echo)."""
        with open(self.log_file, "a") if self.log_file else contextlib.nullcontext() as sink:
            for line in stream:
                self.log.append(line.rstrip("\n"))
                if sink:
                    sink.write(line)
                    sink.flush()
                if self.echo:
                    sys.stderr.write(line)

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start and wait until every model is ready. On any failure, Ctrl-C included, the child is stopped
        before the error propagates: nothing is left running."""
        if isinstance(self.repo, Path) and not self.repo.is_dir():
            raise ServerError(f"model repository {self.repo} does not exist: run `make repo` first")
        attempts = PORT_ATTEMPTS if self.auto_ports else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
                if self.watchdog:
                    self.watchdog.arm()
                if self.payload_upload is not None:  # the samples' way to the object store, beside Triton
                    self.shipper = PayloadShipper(*self.payload_upload).start()
                return self
            except PortInUseError:
                self.stop()
                if attempt == attempts:
                    raise
                self.ports = Ports(*free_ports(3))  # another process took a port between choosing and binding
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        for port, what in ((self.ports.http, "HTTP"), (self.ports.grpc, "gRPC"), (self.ports.metrics, "metrics")):
            check_port_free(port, what)
        self.log, self.ready = [], False
        # its own session (a terminal's Ctrl-C reaches us, and we drain it), and SIGTERM if we die first
        self.proc = proc = subprocess.Popen([*die_with_parent(), *self.command()], env=self.environment(),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            start_new_session=True)
        if proc.stdout is None:  # stdout=PIPE always gives one
            raise ServerError("tritonserver was started without an output pipe")
        self._reader = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._reader.start()
        if self.watch_stubs:  # from the start: it learns every stub's model while the models load
            reload = self._reload if self.model_control == "explicit" else None
            self.watchdog = StubWatchdog(proc.pid, reload, report=self._note, armed=False).start()
        self.wait_ready(timeout)

    def _reload(self, model: str) -> None:
        with admin.AdminClient(self.http_url, "http", self.admin_key) as c:
            c.reload(model)

    def _note(self, message: str) -> None:
        """A line of our own in the server's log (and on stderr)."""
        self.log.append(message)
        print(message, file=sys.stderr, flush=True)
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(message + "\n")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log[-n:])

    def _failures(self) -> dict[str, str]:
        """model -> reason, from Triton's log; the Python traceback after the reason is dropped."""
        return {m.group(1): m.group(2).split("\\n\\nAt:")[0].replace("\\n", " ").strip()
                for line in self.log if (m := LOAD_FAILURE.search(line))}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"  # health stays open with an admin key
        proc = self.process
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._raise_exited(proc.returncode)
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        self.ready = True
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        failures = self._failures()
        self.stop()
        if failures:
            raise ModelLoadError(failures, self.log_tail())
        raise ServerError(f"tritonserver was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def _raise_exited(self, returncode: int) -> NoReturn:
        """tritonserver exited before it was ready: the error that says why (a port, a model, or its log)."""
        if self._reader:
            self._reader.join(timeout=5)
        bind = next((m for line in self.log if (m := BIND_FAILURE.search(line))), None)
        if bind:
            raise PortInUseError(f"tritonserver could not bind its {bind.group(1)} port: {bind.group(0)}")
        failures = self._failures()
        if failures:
            raise ModelLoadError(failures, self.log_tail())
        raise ServerError(f"tritonserver exited with code {returncode} before it was ready:\n{self.log_tail()}")

    def drain(self, timeout: float = EXIT_TIMEOUT_S) -> bool:
        """Refuse new requests and let the accepted ones finish (explicit model control only): every model
        is unloaded, so a new request is answered at once ("... has no available versions", HTTP 404 /
        NOT_FOUND) while Triton completes the in-flight ones before a model goes. Returns whether every
        model was gone within ``timeout``.

        Why not just SIGINT: Triton's HTTP frontend keeps serving requests on open keep-alive connections
        for up to --exit-timeout-secs and then exits, cutting the requests in flight at that moment."""
        if self.model_control != "explicit" or not self.ready or self.proc is None or self.proc.poll() is not None:
            return False
        deadline = time.monotonic() + timeout
        try:
            with admin.AdminClient(self.http_url, "http", self.admin_key, timeout_s=timeout) as c:
                loaded = sorted({m["name"] for m in c.index() if m.get("state") == "READY"})
                # ensembles first (as the server loaded them): a composing model unloaded first would fail
                # the ensemble's in-flight requests
                ensembles = [n for n in loaded if c.config(n).get("platform") == "ensemble"]
                for group in (ensembles, [n for n in loaded if n not in ensembles]):
                    for name in group:
                        c.unload(name)
                    while any(m["name"] in group and m.get("state") in ("READY", "UNLOADING") for m in c.index()):
                        if time.monotonic() > deadline:
                            return False
                        time.sleep(0.05)
                return True
        except Exception as e:  # the server is going away anyway: stop() follows
            print(f"warning: draining tritonserver failed: {e}", file=sys.stderr)
        return False

    def stop(self, timeout: float = 30.0, drain: bool = True) -> None:
        if self.watchdog:  # stubs stopped from here on are meant to stop
            self.watchdog.stop()
        if self.proc and self.proc.poll() is None:
            if drain:
                self.drain()
            self.proc.send_signal(signal.SIGINT)  # Triton's graceful shutdown: unloads models, stops stubs
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._reader:
            self._reader.join(timeout=5)
        if self.shipper is not None:  # after Triton: its models have written their last samples
            shipper, self.shipper = self.shipper, None
            self._note(shipper.close())

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def repository(arg: str) -> Path | str:
    """--repo: a folder, or an s3:// URL kept as it is (a Path would fold its '//')."""
    return arg if object_store.is_object_store(arg) else Path(arg)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a model repository with the real tritonserver (foreground)")
    p.add_argument("--repo", type=repository, default=PROJECT_ROOT / "model_repository",
                   help="a rendered repository folder, or s3://[host:port/]bucket/prefix (serve.object_store)")
    p.add_argument("--http-port", type=int, default=Ports.http)
    p.add_argument("--grpc-port", type=int, default=Ports.grpc)
    p.add_argument("--metrics-port", type=int, default=Ports.metrics)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the models to load")
    p.add_argument("--host", default=LOOPBACK, help="address to listen on (0.0.0.0: every interface, i.e. the network)")
    p.add_argument("--model-control", choices=("explicit", "none"), default="explicit",
                   help="explicit: models can be reloaded through the (key-protected) repository API, e.g. by "
                        "`python -m serve.publish`, and a stop drains them first; none: fixed at start")
    p.add_argument("--no-admin-key", action="store_true",
                   help="leave the model-repository, model-config, logging, trace and shared-memory APIs open")
    p.add_argument("--inference-key", choices=("auto", "on", "off"), default="auto",
                   help="inference, metadata and statistics need the inference key (clients.keys): auto: when "
                        "--host is not loopback; off: open to anyone who reaches the port (behind a proxy that "
                        "authenticates)")
    p.add_argument("--grpc-tls-cert", type=Path, help="PEM certificate chain: gRPC over TLS (with --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", type=Path, help="PEM private key of --grpc-tls-cert")
    p.add_argument("--grpc-tls-client-ca", type=Path,
                   help="PEM CA: mutual TLS, only clients with a certificate it signed connect")
    return p


def access(args: argparse.Namespace) -> dict:
    """TritonServer's admin_key, inference_key and grpc_tls for the command line (keys generated on first use).
    Raises UnusableKeyError, or ValueError for TLS options that do not go together."""
    if (args.grpc_tls_cert is None) != (args.grpc_tls_key is None):
        raise ValueError("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key")
    if args.grpc_tls_client_ca is not None and args.grpc_tls_cert is None:
        raise ValueError("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
    need_inference_key = args.inference_key == "on" or (args.inference_key == "auto" and not is_loopback(args.host))
    return {"admin_key": None if args.no_admin_key else ADMIN.load(create=True),
            "inference_key": INFERENCE.load(create=True) if need_inference_key else None,
            "grpc_tls": GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca)
            if args.grpc_tls_cert else None}


def describe_access(kw: dict, host: str) -> str:
    """One line on who may use what, for the ready message."""
    parts = [f"model control and config APIs need the admin key (${ADMIN.env} or {ADMIN.file()})"
             if kw["admin_key"] else "model control and config APIs are OPEN"]
    if kw["inference_key"]:
        parts.append(f"inference needs the inference key (${INFERENCE.env} or {INFERENCE.file()})")
    elif not is_loopback(host):
        parts.append(f"WARNING: inference is open to anyone who reaches {host}")
    if kw["grpc_tls"]:
        parts.append("gRPC over " + ("mutual TLS" if kw["grpc_tls"].client_ca else "TLS"))
    return "; ".join(parts)


def models_in(repo: Path | str) -> list[str]:
    """The models of a local repository (folders with a config.pbtxt); an object store's are not listed here."""
    if str(repo).startswith("s3://") or not Path(repo).is_dir():
        return ["?"]  # an object store, or a missing folder (start() says so)
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))


def main(args: argparse.Namespace) -> int:
    stop_on_signals()  # Ctrl-C and `kill` stop the server cleanly
    if not models_in(args.repo):
        print(f"error: the model repository {args.repo} holds no model (a fresh clone's has only its README): "
              "render one with `make repo` (after `make train onnx`, or `make demo`), then `make serve`",
              file=sys.stderr)
        return 2
    try:
        kw = access(args)
    except (UnusableKeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = TritonServer(args.repo, Ports(args.http_port, args.grpc_port, args.metrics_port), echo=True,
                          host=args.host, model_control=args.model_control, **kw)
    try:
        server.start(args.timeout)
        where = "every interface" if server.connect_host != args.host else args.host
        print(f"\nTriton is ready on {where}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
              f"metrics {server.metrics_url}; {describe_access(kw, args.host)}  (Ctrl-C stops it)",
              file=sys.stderr, flush=True)
        return server.process.wait()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping Triton ...", file=sys.stderr)
        return 0
    finally:
        server.stop()
