#!/usr/bin/env python3
"""Memory probes against a running chatserver, as an attacker would try it.

  scripts/memprobe.py pipeline PORT N [SECONDS]
      N connections each send 100 KB of pipelined `GET /metrics` as fast as
      the server takes it and never read. Prints, once a second, what the
      server counts (`chatconnect_client_memory_bytes`) and has closed for
      its budget, and its resident size; then closes them and prints both
      again 3 s later.

  scripts/memprobe.py deafws PORT
      One WebSocket with a small receive buffer sends pings (each answered
      with a pong it never reads) until the server closes it as a slow
      consumer. Prints the highest count the server reached
      (`chatconnect_client_memory_peak_bytes`): the worst one WebSocket
      holds.

The server's pid (for its resident size) is found from the listening port.
Every loop is bounded in time.
"""

import base64
import os
import socket
import sys
import time
import urllib.request

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: probe\r\n\r\n"


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise SystemExit(f"{name} is not in /metrics")


def server_pid(port):
    """The pid of the process listening on 127.0.0.1:port (from /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
                inode = f[9]
    if inode is None:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    return None


def rss_kib(pid):
    if pid is None:
        return -1
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def pipeline(port, n, seconds):
    pid = server_pid(port)
    payload = REQUEST * (100_000 // len(REQUEST))
    print(f"before: RSS {rss_kib(pid)} KiB")
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        conns.append([s, 0])
    peak_rss = 0
    end = time.time() + seconds
    next_report = time.time()
    while time.time() < end:
        for c in conns:
            if c[1] < len(payload):
                try:
                    c[1] += c[0].send(payload[c[1]:])
                except BlockingIOError:
                    pass
                except OSError:
                    c[1] = len(payload)  # closed by the server
        peak_rss = max(peak_rss, rss_kib(pid))
        if time.time() >= next_report:
            next_report += 1
            print(
                f"counted {metric(port, 'chatconnect_client_memory_bytes'):.0f} bytes, "
                f"closed for the budget {metric(port, 'chatconnect_client_memory_closes_total'):.0f}, "
                f"RSS {rss_kib(pid)} KiB",
                flush=True,
            )
        time.sleep(0.01)
    sent = sum(c[1] for c in conns)
    print(
        f"{n} connections sent {sent} bytes; peak RSS {peak_rss} KiB; "
        f"peak counted {metric(port, 'chatconnect_client_memory_peak_bytes'):.0f} bytes"
    )
    for c in conns:
        c[0].close()
    time.sleep(3)
    print(
        f"3 s after they closed: counted {metric(port, 'chatconnect_client_memory_bytes'):.0f} "
        f"bytes, RSS {rss_kib(pid)} KiB"
    )


def client_frame(opcode, payload):
    head = bytes([0x80 | opcode, 0x80 | len(payload)])  # payloads < 126 bytes
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def deafws(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /ws/probe{time.time_ns()}?username=deaf HTTP/1.1\r\nHost: probe\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    time.sleep(0.3)
    burst = client_frame(0x9, b"p" * 125) * 1000
    s.settimeout(2)
    before = metric(port, "chatconnect_slow_consumer_closes_total")
    for _ in range(300):
        try:
            s.sendall(burst)
        except OSError:
            break
        if metric(port, "chatconnect_slow_consumer_closes_total") > before:
            break
    print(
        f"peak counted {metric(port, 'chatconnect_client_memory_peak_bytes'):.0f} bytes; "
        f"slow-consumer closes {metric(port, 'chatconnect_slow_consumer_closes_total'):.0f}"
    )


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "pipeline":
        seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 4.0
        pipeline(int(sys.argv[2]), int(sys.argv[3]), seconds)
    elif len(sys.argv) == 3 and sys.argv[1] == "deafws":
        deafws(int(sys.argv[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
