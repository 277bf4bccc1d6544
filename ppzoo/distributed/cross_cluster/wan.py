"""WAN emulation for tests and benchmarks: two network namespaces, a shaped veth link, a delaying relay.

    namespace <prefix>a (10.<n>.0.1) ==veth, tc tbf RATE each way== namespace <prefix>b (10.<n>.0.2)

`tc` shapes the bandwidth (token bucket; this kernel has no netem for delay), and DelayRelay, a TCP relay
run inside namespace b, holds every chunk for `delay` seconds in each direction, which adds one-way latency.
A cluster runs in each namespace (`ip netns exec`); the client leader dials the relay, which forwards to
the server leader. Needs root (CAP_NET_ADMIN): namespaces_allowed() is the explicit capability probe.

    python -m ppzoo.distributed.cross_cluster.wan relay --listen 10.77.0.2:7801 --to 127.0.0.1:7800 --delay 0.05
"""
import argparse
import heapq
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid


# ------------------------------------------------------------------------------------------ the relay
class DelayRelay:
    """Forward TCP connections from `listen` to `target`, delaying every chunk by `delay` seconds each way.

    cut() drops every live connection abruptly (a WAN outage); cut_after(n) forwards only n more bytes
    client->server and then drops the link (a frame truncated in flight).
    """

    def __init__(self, listen, target, delay):
        self.target, self.delay = target, delay
        self.server = socket.create_server(listen)
        self.address = self.server.getsockname()
        self.connections = []
        self.lock = threading.Lock()
        self.budget = None  # bytes still allowed client->server before a cut, or None
        self.dropping = False  # after the budget: discard client->server bytes until the cut
        self.closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                if self.closed:
                    return
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()  # the far end is not up yet: refuse, so the dialer retries
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections.append((client, upstream))
            self._pump(client, upstream, upstream_bound=True)
            self._pump(upstream, client, upstream_bound=False)

    def _pump(self, source, sink, upstream_bound):
        queue, ready = [], threading.Condition()
        done = []

        def reader():
            order = 0
            while True:
                try:
                    chunk = source.recv(1 << 16)
                except OSError:
                    chunk = b""
                if chunk and upstream_bound and self.dropping:
                    continue  # the link is "down" until cut() lands: bytes in flight are lost
                if chunk and upstream_bound and self.budget is not None:
                    chunk = chunk[:self.budget]
                    self.budget -= len(chunk)
                    if self.budget <= 0:
                        self.budget, self.dropping = None, True
                        threading.Timer(self.delay + 0.2, self.cut).start()
                with ready:
                    heapq.heappush(queue, (time.monotonic() + self.delay, order, chunk))
                    order += 1
                    ready.notify()
                if not chunk:
                    return

        def writer():
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    release, _, chunk = queue[0]
                    wait = release - time.monotonic()
                    if wait > 0:
                        ready.wait(wait)
                        continue
                    heapq.heappop(queue)
                if not chunk:
                    _shutdown(sink)
                    return
                try:
                    sink.sendall(chunk)
                except OSError:
                    _shutdown(source)
                    return

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()

    def cut(self):
        with self.lock:
            connections, self.connections = self.connections, []
            self.dropping = False
        for pair in connections:
            for s in pair:
                _shutdown(s)
                s.close()

    def cut_after(self, n_bytes):
        self.budget = n_bytes

    def close(self):
        self.closed = True
        self.cut()
        self.server.close()


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _host_port(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


# -------------------------------------------------------------------------------------- namespaces
def namespaces_allowed():
    """(allowed, reason): whether this process may create network namespaces and shape links with tc."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"the `{tool}` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root (CAP_NET_ADMIN)"
    probe = f"ppzprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


class WanLink:
    """Two namespaces joined by a veth pair shaped to `rate` (e.g. '50mbit') in both directions.

    Use as a context manager or call teardown(): it deletes the namespaces (and with them the veth pair and
    every process still inside is cut off) even when setup failed half way.
    """

    def __init__(self, rate="50mbit", subnet=77, prefix=None):
        self.rate = rate
        tag = prefix or f"ppz{uuid.uuid4().hex[:5]}"
        self.ns = (f"{tag}a", f"{tag}b")
        self.ips = (f"10.{subnet}.0.1", f"10.{subnet}.0.2")
        self.created = []

    def _run(self, *args):
        result = subprocess.run(list(args), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")

    def setup(self):
        a, b = self.ns
        for ns in self.ns:
            self._run("ip", "netns", "add", ns)
            self.created.append(ns)
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
        self._run("ip", "link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth0", "netns", b)
        for ns, ip in zip(self.ns, self.ips):
            self._run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "veth0")
            self._run("ip", "-n", ns, "link", "set", "veth0", "up")
            # Token bucket: `rate` sustained, a burst of a few packets, at most 50 ms of queue.
            self._run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "veth0", "root", "tbf", "rate",
                      self.rate, "burst", "32kbit", "latency", "50ms")
        return self

    def command(self, side, argv):
        """argv run inside namespace `side` (0 or 1)."""
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def teardown(self):
        for ns in reversed(self.created):
            # Kill whatever still runs in the namespace first: a process there would keep it alive.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created = []

    def __enter__(self):
        try:
            return self.setup()
        except BaseException:
            self.teardown()
            raise

    def __exit__(self, *exc):
        self.teardown()


def start_relay(link, listen_port, target_port, delay, env=None, cwd=None):
    """A DelayRelay process inside the link's second namespace: link.ips[1]:listen_port -> 127.0.0.1:target_port.
    Returns the Popen (in its own session: kill its group to stop it) once the relay is accepting."""
    process = subprocess.Popen(
        link.command(1, [sys.executable, "-m", "ppzoo.distributed.cross_cluster.wan", "relay",
                         "--listen", f"{link.ips[1]}:{listen_port}", "--to", f"127.0.0.1:{target_port}",
                         "--delay", str(delay)]),
        cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    line = process.stdout.readline().strip()
    if line != "relay ready":
        process.kill()
        raise RuntimeError(f"the delaying relay did not start: {process.stderr.read()[-2000:]}")
    return process


def main(argv=None):
    parser = argparse.ArgumentParser(description="a delaying TCP relay (WAN emulation)")
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay")
    relay.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    relay.add_argument("--to", required=True, help="HOST:PORT to forward to")
    relay.add_argument("--delay", type=float, default=0.05, help="one-way delay in seconds")
    args = parser.parse_args(argv)
    DelayRelay(_host_port(args.listen), _host_port(args.to), args.delay)
    print("relay ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
