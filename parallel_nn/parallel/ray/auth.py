"""Reaching a Ray cluster: an address that answers, and a token it accepts, checked in seconds.

Authentication: since Ray 2.59 `ray start --head` turns on token authentication when the machine
has a token (~/.ray/auth_token, which a private `ray.init()` instance writes on first use), and a
driver that sends none is refused with InvalidAuthToken for 20 s before a bare ConnectionError.
check_auth asks the cluster once, in milliseconds, before ray.init: a refusal is one line naming
the fix; when the cluster is on this machine and RAY_AUTH_MODE is unset, the driver uses this
machine's token itself and says so (Ray does that only for address "auto": it never sends a
token to an address given explicitly, and neither does this code unless the address is ours).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from typing import Callable, Optional

from parallel_nn import UserError

CONNECT_TIMEOUT = 30.0  # seconds for a cluster address to answer
AUTH_PROBE_MS = 5000  # the GCS's answer to check_auth's probe
TOKEN_HELP = ("the cluster's token (`ray get-auth-token` on the head prints it) in ~/.ray/auth_token, "
              "in RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH")


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A cluster address that does not answer makes ray.init retry for minutes: fail in one line instead."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise UserError(f"--ray-address {address}: nothing answers there ({e}); start the cluster with "
                        "`ray start --head` and pass the address it prints") from None


def check_auth(ray, address: str, warn: Callable[[str], None]) -> None:
    """Fail in one line, within a second, when the cluster at `address` refuses this driver for its
    token (ray.init would log InvalidAuthToken for 20 s, then raise a bare ConnectionError).

    When the cluster requires a token, RAY_AUTH_MODE is unset, this machine has a token and the
    address is this machine's own, token mode is turned on for this process (as Ray does for
    address "auto") and `warn` says so. Ray versions without token authentication skip the check.
    """
    if address == "auto" or "://" in address or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    try:
        probe = _Probe(ray, address)
    except (ImportError, AttributeError):
        return  # a Ray without token authentication
    mode, source = os.environ.get("RAY_AUTH_MODE"), _token_source()
    if (mode or "").lower() == "token":
        if not probe.has_token():  # Ray would abort the process (a failed check in C++), not raise
            raise UserError(f"--ray-address {address}: RAY_AUTH_MODE=token, but this machine has no Ray token: put "
                            f"{TOKEN_HELP}")
        probe.accepted(source)
        return
    if not probe.refused():
        return
    if mode is None and source and probe.has_token() and _on_this_machine(address):
        probe.turn_on_token_mode()
        probe.accepted(source)
        warn(f"the Ray cluster at {address} requires token authentication: using this machine's token from "
             f"{source} (RAY_AUTH_MODE=token for this run)")
        return
    why = f"RAY_AUTH_MODE is {mode!r}" if mode is not None else (
        f"a token is in {source}; this run sends it only to a cluster on this machine" if source else
        "this machine has no Ray token")
    raise UserError(f"--ray-address {address}: the Ray cluster requires token authentication ({why}): "
                    f"set RAY_AUTH_MODE=token and put {TOKEN_HELP}")


class _Probe:
    """Ray's own token loader and GCS client, asked directly (no retries, no log lines)."""

    def __init__(self, ray, address: str):
        from ray._raylet import AuthenticationTokenLoader, Config, InnerGcsClient

        self.loader, self.config, self.client = AuthenticationTokenLoader, Config, InnerGcsClient
        self.refused_error = ray.exceptions.AuthenticationError
        self.address = address

    def has_token(self) -> bool:
        loader = self.loader.instance()
        loader.reset_cache()
        try:
            return bool(loader.has_token(ignore_auth_mode=True))
        except self.refused_error as e:
            raise UserError(f"--ray-address {self.address}: this machine's Ray token cannot be read "
                            f"({getattr(e, 'message', e)}); put {TOKEN_HELP}") from None

    def refused(self) -> bool:
        # Ray's own client, without its retries; its C++ log line about the refusal is not shown.
        with _quiet_stderr():
            try:
                self.client.standalone(self.address, None, AUTH_PROBE_MS)
            except self.refused_error:
                return True
            except Exception:
                return False  # not about the token: ray.init reports it
        return False

    def accepted(self, source: Optional[str]) -> None:
        if self.refused():
            raise UserError(f"--ray-address {self.address}: the Ray cluster refused the token from {source}: "
                            f"put {TOKEN_HELP}")

    def turn_on_token_mode(self) -> None:
        os.environ["RAY_AUTH_MODE"] = "token"  # what Ray itself does to turn token mode on in-process
        self.config.initialize("")
        self.loader.instance().reset_cache()


def _token_source() -> Optional[str]:
    """Where Ray reads this driver's token from, in Ray's order; None if nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return default if os.path.isfile(default) else None


def _on_this_machine(address: str) -> bool:
    """Whether `address` (host:port) is a loopback address or one of this machine's own."""
    host = address.rpartition(":")[0].strip("[]") or "127.0.0.1"
    try:
        ips = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, ValueError):
        return False
    ours = set()
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    with contextlib.suppress(ValueError):
                        ours.add(ipaddress.ip_address(a.address.split("%")[0]))
    except ImportError:
        pass
    return bool(ips) and all(ip.is_loopback or ip in ours for ip in ips)


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 (where Ray's C++ code logs) to the null device for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
