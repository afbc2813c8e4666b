"""Talking to systemd: the sd_notify protocol (readiness, status, watchdog, reload, stop).

A unit with ``Type=notify`` gives the daemon ``$NOTIFY_SOCKET``, a unix datagram
socket; each message is a few ``KEY=value`` lines. Outside systemd there is no
socket and every call here does nothing. The protocol is a single ``sendto``,
documented in sd_notify(3); no library is needed for it (the C binding needs
libsystemd's headers to build, which a plain ``pip install`` cannot count on).
"""

from __future__ import annotations

import os
import socket
import time

from loguru import logger


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        # WATCHDOG_PID, when set, names the process the watchdog is meant for.
        watchdog_pid = environ.get("WATCHDOG_PID")
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        for_us = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.watchdog_s = (int(watchdog_usec) / 1e6
                           if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and for_us
                           else None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        self._send(None, text)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload units match this to the SIGHUP.
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_us}", "reloading the settings and plugins")

    def stopping(self) -> None:
        self._send("STOPPING=1", "stopping")

    def _send(self, state: str | None, status: str | None = None) -> None:
        if self._address is None:
            return
        lines = [line for line in (state, f"STATUS={status}" if status else None) if line]
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or restarting: nothing to do but say so
            logger.warning("cannot notify systemd at {}: {}", self._address, exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
