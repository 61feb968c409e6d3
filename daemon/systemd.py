"""systemd's service notification protocol (sd_notify) in a few lines, with no dependency.

Under `Type=notify` systemd passes $NOTIFY_SOCKET, a unix datagram socket: the daemon sends
`READY=1` once it can serve, `WATCHDOG=1` regularly when the unit sets `WatchdogSec=` (systemd
then passes $WATCHDOG_USEC), and `STOPPING=1` when it begins to shut down. Outside systemd the
variable is unset and every call is a no-op, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send one notification ("READY=1", ...); False when not under systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # Linux abstract namespace: a leading NUL byte, no file
        address = "\0" + address[1:]
    elif not address.startswith("/"):  # unset, or a vsock address this module does not speak
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False  # a notification must never take the daemon down
    return True


class Watchdog:
    """Pings systemd's watchdog at half the interval the unit asks for, as sd_watchdog_enabled(3)
    recommends, so one slow iteration of the main loop does not get the service killed."""

    def __init__(self):
        usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd watches; a child that inherited it must not ping.
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None
        self.next_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def ping(self) -> bool:
        """Send WATCHDOG=1 if half the interval has passed since the last one; cheap otherwise."""
        if self.interval is None or time.monotonic() < self.next_ping:
            return False
        self.next_ping = time.monotonic() + self.interval
        return notify("WATCHDOG=1")
