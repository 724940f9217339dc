"""Network off for test subprocesses: put this folder on PYTHONPATH (tests/reliability/conftest.py does).

Connections to anything but loopback and Unix sockets fail at once with an OSError, and name
lookups of non-local hosts fail with socket.gaierror, so code that tries the network errors
instead of hanging. `install(patch)` applies the same guards in-process (patch: monkeypatch.setattr).
"""

import ipaddress
import os
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").lower()
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _allowed(sock, address) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # Unix sockets (wandb's local service), netlink, ...
    return isinstance(address, tuple) and is_local(address[0])


def _connect(self, address):
    if not _allowed(self, address):
        raise OSError(101, f"network disabled in tests: connect to {address!r} refused")
    return _real_connect(self, address)


def _connect_ex(self, address):
    if not _allowed(self, address):
        return 101  # ENETUNREACH
    return _real_connect_ex(self, address)


def _getaddrinfo(host, *args, **kwargs):
    if not is_local(host):
        raise socket.gaierror(socket.EAI_NONAME, f"network disabled in tests: no lookup of {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


def install(patch=setattr) -> None:
    patch(socket.socket, "connect", _connect)
    patch(socket.socket, "connect_ex", _connect_ex)
    patch(socket, "getaddrinfo", _getaddrinfo)


if os.environ.get("SPARSE_CODING_NO_NETWORK") == "1":
    install()
