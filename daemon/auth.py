"""CURVE encryption and ZAP authentication for the daemon's sockets (pyzmq's authenticator).

The daemon holds a key pair (`rnnlm keygen`); clients are allowed in only if their public key is
in the authorised directory (`--curve-authorized-dir`, one `NAME.key` file per client, as
`rnnlm keygen` or `zmq.auth.create_certificates` writes them). Everything on the wire is encrypted.

A client with an unknown key is refused by ZAP during the handshake, a plaintext client fails the
handshake on the mechanism; neither gets a message through to the server's queue, so neither can
reach the model. Each refusal is counted in `rnnlm_handshake_failures_total{socket, reason}`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("rnnlm.daemon.auth")

FAILURE_REASONS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "other",
}


def keygen(out_dir: str | Path, name: str = "server") -> tuple[Path, Path]:
    """Write NAME.key (public, to hand out) and NAME.key_secret (keep private) into out_dir."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r}: use letters, digits, '-' or '_'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ValueError(f"{path} exists already; pick another --name or directory")
    public_file, secret_file = zmq.auth.create_certificates(str(out), name)
    Path(secret_file).chmod(0o600)
    return Path(public_file), Path(secret_file)


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a CURVE key file ({err})") from None
    if not secret:
        raise ValueError(f"{path} holds only a public key; give the NAME.key_secret file")
    return public, secret


def load_public(path: str | Path) -> bytes:
    """The public key from NAME.key (or from NAME.key_secret, which holds it too)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such key file")
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a CURVE key file ({err})") from None
    return public


def client_socket_keys(socket: zmq.Socket, client_secret_file: str | Path, server_public_file: str | Path) -> None:
    """Make `socket` a CURVE client (before it connects)."""
    public, secret = load_secret(client_secret_file)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = load_public(server_public_file)


class CurveServer:
    """The authenticator thread and the server's keys; `secure()` each socket before binding it."""

    def __init__(self, ctx: zmq.Context, secret_file: str | Path, authorized_dir: str | Path, failures=None,
                 admin_dir: str | Path | None = None):
        self.public, self.secret = load_secret(secret_file)
        self.directory = Path(authorized_dir)
        self.admin_dir = Path(admin_dir) if admin_dir is not None else None
        self.admins: frozenset[str] | None = None  # Z85 public keys; None: every client may send control ops
        if not self.directory.is_dir():
            raise ValueError(f"{self.directory}: no such directory of authorised client keys")
        self.failures = failures  # a Counter labelled (socket, reason), or None
        self.monitors: list[tuple[zmq.Socket, threading.Thread]] = []
        self.authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("rnnlm.daemon.zap"))
        self.authenticator.start()
        self.reload()

    def reload(self) -> None:
        """(Re)read the authorised client keys: at start, and on SIGHUP. Connections made before
        keep going; every new handshake is checked against the keys read here."""
        if not self.directory.is_dir():
            raise ValueError(f"{self.directory}: no such directory of authorised client keys")
        allowed = sorted(self.directory.glob("*.key"))
        if not allowed:
            log.warning("%s holds no client keys (*.key): every client will be refused", self.directory)
        admins = self.read_admins() if self.admin_dir is not None else None
        # Any domain, only the public keys found in the directory.
        self.authenticator.configure_curve(domain="*", location=str(self.directory))
        self.admins = admins
        log.info("CURVE on: %d authorised client key(s) in %s", len(allowed), self.directory)

    def read_admins(self) -> frozenset[str]:
        if not self.admin_dir.is_dir():
            raise ValueError(f"{self.admin_dir}: no such directory of admin client keys")
        keys = frozenset(load_public(path).decode("ascii") for path in sorted(self.admin_dir.glob("*.key")))
        log.info("%d admin key(s) in %s may send save, reset and drop_domain", len(keys), self.admin_dir)
        return keys

    def is_admin(self, user: str | None) -> bool:
        """Whether a client (its key, as the ZAP handler named it: Z85) may send control ops."""
        return self.admins is None or user in self.admins

    def secure(self, socket: zmq.Socket, label: str) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True
        if self.failures is not None:
            monitor = socket.get_monitor_socket(sum(FAILURE_REASONS) | zmq.EVENT_MONITOR_STOPPED)
            thread = threading.Thread(target=self._watch, args=(monitor, label), name=f"handshakes-{label}", daemon=True)
            thread.start()
            self.monitors.append((socket, thread))

    def _watch(self, monitor: zmq.Socket, label: str) -> None:
        try:
            while True:
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_MONITOR_STOPPED:
                    break
                reason = FAILURE_REASONS.get(event)
                if reason:
                    self.failures.labels(label, reason).inc()
                    log.debug("%s: handshake refused (%s)", label, reason)
        except zmq.ZMQError:
            pass
        finally:
            monitor.close(0)

    def stop(self) -> None:
        for socket, thread in self.monitors:
            try:
                socket.disable_monitor()
            except zmq.ZMQError:
                pass
            thread.join(2.0)
        self.monitors.clear()
        self.authenticator.stop()
