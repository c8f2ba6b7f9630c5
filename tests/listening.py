"""Listening TCP sockets of a process tree, read from /proc (Linux; no extra dependency).

    sockets = listening_sockets(os.getpid())   # [(pid, name, "127.0.0.1", port), ...]
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

_LISTEN = "0A"


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def _decode(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # /proc stores 4-byte words LE
    ip = ipaddress.IPv6Address(b"".join(words))
    return str(ip.ipv4_mapped or ip)


def _listening_inodes() -> dict[str, tuple[str, int]]:
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == _LISTEN:
                addr, port = f[1].split(":")
                out[f[9]] = (_decode(addr), int(port, 16))
    return out


def listening_sockets(root_pid: int) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of ``root_pid`` and its
    descendants."""
    inodes = _listening_inodes()
    found = []
    for pid in _descendants(root_pid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                hit = inodes.get(link[8:-1])
                if hit:
                    found.append((pid, name, *hit))
    return found


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback
