"""Tunnel throughput and per-request latency: SSHTransport.forward_local vs OpenSSH `ssh -L`.

A small server in the first container sinks or echoes bytes. The direct
connection to the container's bridge address gives the floor with no SSH.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time

from bench.context import Context, container_address
from bench.docker_exec import ExecProcess
from bench.report import MEGABYTE, Section, at_least
from bench.stats import Sample

log = logging.getLogger(__name__)

TITLE = "Tunnels"

SERVER_PORT = 8811
PAYLOAD_BYTES = 200 * MEGABYTE
CHUNK = 1024 * 1024
REQUESTS = 1000
REQUEST_BYTES = 64

# Mode byte "s": read to the end of the stream and send back the byte count. Mode "e":
# echo every received block until end of stream.
SERVER = """
import socket, sys, threading
def serve(conn):
    with conn:
        mode = conn.recv(1)
        if mode == b"s":
            total = 0
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                total += len(data)
            conn.sendall(str(total).encode())
        else:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(64)
print("serving", flush=True)
while True:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def push(address: tuple[str, int]) -> float:
    """Seconds to send PAYLOAD_BYTES through `address` until the server confirms the count."""
    block = b"\0" * CHUNK
    started = time.perf_counter()
    with connect(address) as sock:
        sock.sendall(b"s")
        for _ in range(PAYLOAD_BYTES // CHUNK):
            sock.sendall(block)
        sock.sendall(block[: PAYLOAD_BYTES % CHUNK])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    elapsed = time.perf_counter() - started
    if int(answer or 0) != PAYLOAD_BYTES:
        raise AssertionError(f"the sink received {answer!r} bytes, expected {PAYLOAD_BYTES}")
    return elapsed


def echo_latency(address: tuple[str, int]) -> float:
    """Median seconds of one REQUEST_BYTES echo over an open connection."""
    message = b"x" * REQUEST_BYTES
    seconds = []
    with connect(address) as sock:
        sock.sendall(b"e")
        for _ in range(REQUESTS):
            started = time.perf_counter()
            sock.sendall(message)
            received = 0
            while received < REQUEST_BYTES:
                received += len(sock.recv(REQUEST_BYTES - received))
            seconds.append(time.perf_counter() - started)
    seconds.sort()
    return seconds[len(seconds) // 2]


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_openssh_forward(context: Context, alias: str, local_port: int) -> subprocess.Popen[bytes]:
    argv = [
        "ssh", "-F", context.ssh_config, "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:{local_port}:127.0.0.1:{SERVER_PORT}", alias,
    ]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ssh -L exited with {process.returncode}: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", local_port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError(f"ssh -L did not listen on 127.0.0.1:{local_port} within 20 s")


def measure_paths(context: Context, section: Section, paths: dict[str, tuple[str, int]]) -> None:
    labels = {"direct": "direct TCP to the container (floor)", "ours": "SSHTransport.forward_local", "openssh": "OpenSSH `ssh -L`"}
    for name, address in paths.items():
        push(address)  # warm-up: window sizes and caches
        rates = Sample(tuple(push(address) for _ in range(context.runs(5, 2))))
        section.add(f"tunnel-rate-{name}", f"Throughput, {PAYLOAD_BYTES // MEGABYTE} MB: {labels[name]}", rates, size=PAYLOAD_BYTES)
    latency = {}
    for name, address in paths.items():
        medians = Sample(tuple(echo_latency(address) for _ in range(context.runs(5, 2))))
        latency[name] = section.add(f"tunnel-latency-{name}", f"Latency of a {REQUEST_BYTES}-byte echo (median of {REQUESTS}): {labels[name]}", medians)
    # Paired run by run: the added latency of the tunnel over the direct path.
    added = tuple(ours - direct for ours, direct in zip(latency["ours"].sample.seconds, latency["direct"].sample.seconds, strict=True))
    section.add("tunnel-latency-added", "Added latency per request: forward_local − direct", Sample(added))
    section.goal("Added latency per request of forward_local", "tunnel-latency-added", 1e-3)


def measure(context: Context, section: Section) -> None:
    from lazycluster.transport.ssh import SSHBackend

    host = context.hosts[0]
    server = ExecProcess(host, ["python3", "-c", SERVER, str(SERVER_PORT)])
    transport = openssh = None
    try:
        server.wait_for("serving", 30)
        transport = SSHBackend(ssh_config_path=context.ssh_config).connect(host.alias)
        ours_port, openssh_port = free_local_port(), free_local_port()
        transport.forward_local([(ours_port, SERVER_PORT)])
        openssh = start_openssh_forward(context, host.alias, openssh_port)
        paths = {
            "direct": (container_address(host), SERVER_PORT),
            "ours": ("127.0.0.1", ours_port),
            "openssh": ("127.0.0.1", openssh_port),
        }
        measure_paths(context, section, paths)
    finally:
        if openssh is not None:
            openssh.terminate()
            openssh.wait(10)
        if transport is not None:
            transport.close()
        server.stop()

    section.ratio("Tunnel throughput: forward_local / `ssh -L`", "tunnel-rate-ours", "tunnel-rate-openssh", at_least(0.5))
    section.ratio("Echo latency: forward_local / `ssh -L`", "tunnel-latency-ours", "tunnel-latency-openssh")
    section.ratio("Echo latency: forward_local / direct", "tunnel-latency-ours", "tunnel-latency-direct")
    section.note(
        "One stream at a time through one tunnel to a Python server in the first container; the "
        "manager's Python client and that server also limit the rate, so the direct figure is the "
        "ceiling here, not the link's speed. Our tunnel relays in Python threads over paramiko, "
        "whose packet handling and flow control run in Python (encryption runs in OpenSSL through "
        "cryptography). `ssh -L` does all of it in C. With 2 cores the "
        "client, the relay and sshd compete for CPU. Latency is the median of "
        f"{REQUESTS} request-response pairs on one open connection, so the tunnel's set-up is not in it; "
        "the added latency of a tunnel is its figure minus the direct one."
    )
