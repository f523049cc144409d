"""An emulated multi-host cluster on one Linux machine: network namespaces on a virtual switch.

Each host is a network namespace with one link (a veth pair) to a bridge that lives in a namespace of its
own, the switch, so nothing touches the machine's interfaces and no packet leaves these namespaces. Each
link is limited to a bandwidth with `tc tbf` in both directions: on the host's egress (host -> switch) and
on the switch port's egress (switch -> host), as a full-duplex NIC of that speed would be. `tc netem`,
which could add propagation delay, is unavailable on this project's machines, so links have none beyond
the kernel's own.

Building a cluster needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip` and `tc`.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import IO, Mapping, Sequence

from polytrain.launch.local import exit_reason

DEFAULT_SUBNET = "10.77.0.0/24"  # RFC 1918; exists only inside the cluster's namespaces, so clusters never clash
DEFAULT_RUN_TIMEOUT_S = 3600.0
# `ip netns exec NS` shows the files in /etc/netns/NS in place of /etc's; each host gets a hosts file naming
# every host, so that reverse lookups of peers' addresses (torch's store does them) need no DNS server,
# which the namespaces cannot reach.
NETNS_ETC = Path("/etc/netns")
MASTER_PORT = 29500  # torchrun's default; always free, since host 0's namespace is new
HOST_INTERFACE = "veth0"  # every host's one link has this name in its own namespace
BRIDGE = "br0"
# tbf's bucket holds BURST_S of traffic: the shaper's timer fires up to about a millisecond late here, so a
# smaller bucket loses rate (at 1 Gbit/s, 64 KiB = 0.5 ms sustained ~50 % both ways at once; 1 ms ~94 %),
# while a larger one lets short messages after an idle spell pass unshaped (2 ms: 1 MiB at 1.2 Gbit/s).
BURST_S = 0.001
MIN_BURST_BYTES = 4096  # a few full-size frames: tbf cannot pass a packet larger than its bucket
TOOL_TIMEOUT_S = 30.0
POLL_S = 0.1
STOP_GRACE_S = 3.0  # how long a host's command has to exit after SIGTERM before it is killed
# tc's rate units (decimal; "bps" is bytes per second), in bits per second.
RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}

_cluster_numbers = itertools.count()


class ClusterError(RuntimeError):
    """The emulated cluster could not be built or used; the message names the command that failed and why."""


class HostFailed(ClusterError):
    """A host's command failed or overran its deadline; the message names the host and its rank.

    Attributes:
        outputs: what each host but host 0 wrote (stdout and stderr), by rank; host 0 writes to ours.
    """

    def __init__(self, message: str, outputs: dict[int, str]) -> None:
        super().__init__(message)
        self.outputs = outputs


# Environment variable through which a run learns what network it ran on (see train/environment.py).
NETWORK_VARIABLE = "POLYTRAIN_NETWORK"


def parse_bandwidth(text: str | None) -> float | None:
    """Bits per second of a tc rate such as "100mbit" or "1gbit"; None for "none" (an unlimited link)."""
    if text is None or text.lower() == "none":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", text.strip().lower())
    if match is None or match.group(2) not in RATE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"bandwidth {text!r} is not a rate such as 100mbit, 1gbit or none "
                         f"(units: {', '.join(RATE_UNITS)})")
    return float(match.group(1)) * RATE_UNITS[match.group(2)]


def default_burst_bytes(bandwidth_bits_per_s: float) -> int:
    """tbf bucket size that lets a link reach its rate: BURST_S of traffic, at least MIN_BURST_BYTES."""
    return max(MIN_BURST_BYTES, int(bandwidth_bits_per_s / 8 * BURST_S))


def _tool(*args: str, context: str = "polytrain cluster") -> str:
    """Runs one iproute2 command and returns its stdout; a failure is a one-line ClusterError."""
    try:
        done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.CalledProcessError as error:
        lines = error.stderr.strip().splitlines()
        reason = lines[0] if lines else f"exit status {error.returncode}"
        raise ClusterError(f"{context}: `{' '.join(args)}` failed: {reason}") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{context}: `{' '.join(args)}` did not finish in {TOOL_TIMEOUT_S:g} s") from None
    return done.stdout


def _require_iproute2() -> None:
    if not sys.platform.startswith("linux"):
        raise ClusterError(f"polytrain cluster needs Linux network namespaces; this machine runs {sys.platform}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"polytrain cluster needs iproute2 ({' and '.join(missing)} not found): "
                           f"install it with `apt-get install iproute2`")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(namespace: str) -> None:
    """Kills every process inside `namespace`, then deletes it and with it its interfaces."""
    for pid in _tool("ip", "netns", "pids", namespace).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    _tool("ip", "netns", "delete", namespace)
    shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)


def _namespaces() -> list[str]:
    # Lines read "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in _tool("ip", "netns", "list").splitlines() if line.strip()]


def remove_leftovers(name_prefix: str) -> list[str]:
    """Deletes the namespaces of clusters with this prefix whose process has died (crashed or killed runs).

    Returns:
        The names of the namespaces deleted.
    """
    pattern = re.compile(rf"{re.escape(name_prefix)}-(\d+)-\d+-(?:sw|h\d+)")
    leftovers = [name for name in _namespaces()
                 if (match := pattern.fullmatch(name)) and not _process_exists(int(match.group(1)))]
    for namespace in leftovers:
        _delete_namespace(namespace)
    return leftovers


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _set_sigterm_handler(handler: object) -> object:
    """Installs a SIGTERM handler where Python allows it (the main thread); returns the one it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return handler
    previous = signal.signal(signal.SIGTERM, handler)
    return signal.SIG_DFL if previous is None else previous


class EmulatedCluster:
    """`hosts` network namespaces on a virtual switch, each link limited to `bandwidth`; a context manager.

    Entering builds the cluster (first deleting what crashed runs with the same prefix left behind);
    leaving stops every process inside it and deletes it, also on an exception, KeyboardInterrupt or
    SIGTERM (which, inside the block, raises SystemExit(143) so that the removal runs).

    Namespaces are named PREFIX-PID-N-h0 ... PREFIX-PID-N-h{hosts-1} and PREFIX-PID-N-sw (PID: this
    process, N: its count of clusters), so concurrent runs never collide and a dead PID marks leftovers.
    Interfaces live only inside them: `veth0` in each host, its peer `hK` and the bridge `br0` in the switch.

    Args:
        hosts: number of hosts, one rank each.
        bandwidth: each link's rate in each direction, in tc's units ("100mbit", "1gbit"); None or "none"
            leaves links unlimited (veth speed, several Gbit/s).
        burst_bytes: tbf's bucket, the bytes a link may send at once above its rate (default:
            `default_burst_bytes`).
        latency_ms: tbf's latency: the longest a packet may wait in a link's queue before it is dropped,
            which sets the queue's length. It adds no delay to an idle link.
        subnet: the hosts' addresses, host K taking the subnet's K-th host address.
        name_prefix: start of every namespace name (lowercase letters and digits).
    """

    def __init__(self, hosts: int, bandwidth: str | None = "1gbit", *, burst_bytes: int | None = None,
                 latency_ms: float = 50.0, subnet: str = DEFAULT_SUBNET, name_prefix: str = "pt") -> None:
        if hosts < 1:
            raise ValueError(f"a cluster needs at least 1 host, got {hosts}")
        if not re.fullmatch(r"[a-z0-9]+", name_prefix):
            raise ValueError(f"name prefix {name_prefix!r} must be lowercase letters and digits")
        network = ipaddress.ip_network(subnet)
        addresses = list(itertools.islice(network.hosts(), hosts))
        if len(addresses) < hosts:
            raise ValueError(f"subnet {subnet} has {len(addresses)} host addresses, too few for {hosts} hosts")
        self.hosts = hosts
        self.bandwidth_bits_per_s = parse_bandwidth(bandwidth)
        self.bandwidth_name = str(bandwidth or "none").lower()  # the calibration profile's key for these links
        self.burst_bytes = burst_bytes
        self.latency_ms = latency_ms
        self.addresses = [str(address) for address in addresses]
        self.prefix_length = network.prefixlen
        self.name_prefix = name_prefix
        self.name = f"{name_prefix}-{os.getpid()}-{next(_cluster_numbers)}"
        self._created: list[str] = []

    @property
    def switch_namespace(self) -> str:
        return f"{self.name}-sw"

    def host_namespace(self, host: int) -> str:
        return f"{self.name}-h{host}"

    # -- building and removing -----------------------------------------------------------------------------

    def __enter__(self) -> EmulatedCluster:
        _require_iproute2()
        remove_leftovers(self.name_prefix)
        self._previous_sigterm = _set_sigterm_handler(_exit_on_sigterm)
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        _set_sigterm_handler(signal.SIG_IGN)  # a second SIGTERM must not cut the removal short
        try:
            while self._created:
                _delete_namespace(self._created.pop())
            with suppress(OSError):  # only removed when no other cluster uses it
                NETNS_ETC.rmdir()
        finally:
            _set_sigterm_handler(self._previous_sigterm)

    def _add_namespace(self, namespace: str) -> None:
        _tool("ip", "netns", "add", namespace, context="polytrain cluster needs root and Linux network namespaces")
        self._created.append(namespace)
        _tool("ip", "-n", namespace, "link", "set", "lo", "up")

    def _build(self) -> None:
        switch = self.switch_namespace
        self._add_namespace(switch)
        _tool("ip", "-n", switch, "link", "add", BRIDGE, "type", "bridge")
        _tool("ip", "-n", switch, "link", "set", BRIDGE, "up")
        for host in range(self.hosts):
            self._add_host(host)

    def _add_host(self, host: int) -> None:
        namespace, switch, port = self.host_namespace(host), self.switch_namespace, f"h{host}"
        self._add_namespace(namespace)
        # Made inside the switch with its peer inside the host: no interface ever exists in the machine's
        # own namespace, even for a moment.
        _tool("ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", HOST_INTERFACE,
              "netns", namespace)
        _tool("ip", "-n", switch, "link", "set", port, "master", BRIDGE, "up")
        _tool("ip", "-n", namespace, "addr", "add", f"{self.addresses[host]}/{self.prefix_length}",
              "dev", HOST_INTERFACE)
        _tool("ip", "-n", namespace, "link", "set", HOST_INTERFACE, "up")
        self._write_hosts_file(namespace)
        if self.bandwidth_bits_per_s is not None:
            self._limit(namespace, HOST_INTERFACE)  # host -> switch
            self._limit(switch, port)  # switch -> host

    def _write_hosts_file(self, namespace: str) -> None:
        # torch's store sees IPv4 peers as IPv4-mapped IPv6 addresses, hence both forms.
        names = "".join(f"{address}\t{self.host_namespace(host)}\n::ffff:{address}\t{self.host_namespace(host)}\n"
                        for host, address in enumerate(self.addresses))
        try:
            (NETNS_ETC / namespace).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / namespace / "hosts").write_text(Path("/etc/hosts").read_text() + names)
        except OSError as error:
            raise ClusterError(f"polytrain cluster: cannot write {NETNS_ETC / namespace}/hosts: {error}") from None

    def _limit(self, namespace: str, interface: str) -> None:
        rate = self.bandwidth_bits_per_s
        burst = self.burst_bytes or default_burst_bytes(rate)
        _tool("tc", "-n", namespace, "qdisc", "add", "dev", interface, "root", "tbf", "rate", f"{rate:.0f}bit",
              "burst", str(burst), "latency", f"{self.latency_ms:g}ms",
              context="polytrain cluster needs tc's tbf qdisc")

    # -- running -------------------------------------------------------------------------------------------

    def host_environment(self, host: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of host `host`'s process: ours, then `env`, then torchrun's rendezvous variables.

        OMP_NUM_THREADS shares the machine's cores among the hosts (polytrain's trainer picks the same
        count itself). GLOO_SOCKET_IFNAME makes gloo use the host's link, not whatever address the
        machine's hostname resolves to.
        """
        threads = max(1, (os.cpu_count() or 1) // self.hosts)
        return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **(env or {}),
                "RANK": str(host), "WORLD_SIZE": str(self.hosts), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": self.addresses[0], "MASTER_PORT": str(MASTER_PORT),
                "GLOO_SOCKET_IFNAME": HOST_INTERFACE, NETWORK_VARIABLE: self.describe(),
                "POLYTRAIN_BANDWIDTH": self.bandwidth_name}

    def describe(self) -> str:
        """The network in words, recorded in every result's environment manifest."""
        rate = "unlimited" if self.bandwidth_bits_per_s is None else f"{self.bandwidth_bits_per_s / 1e6:g} Mbit/s"
        return f"emulated cluster: {self.hosts} hosts on a virtual switch, links {rate} each way (tc tbf)"

    def run(self, command: Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout_s: float = DEFAULT_RUN_TIMEOUT_S) -> None:
        """Runs `command` on every host at once, as one rank each, and waits for all of them to succeed.

        A command starting with `polytrain` runs as `python -m polytrain` of this interpreter, so every
        host uses this installation. Host 0 writes to this process's stdout and stderr; the others' output
        is kept for HostFailed.

        Args:
            command: program and arguments, the same on every host.
            env: further environment variables (the rendezvous variables cannot be overridden).
            timeout_s: deadline for all hosts together.

        Raises:
            HostFailed: a host exited non-zero, or the deadline passed; every host is stopped first.
        """
        if not command:
            raise ValueError("no command to run on the hosts")
        argv = [sys.executable, "-m", "polytrain", *command[1:]] if command[0] == "polytrain" else list(command)
        processes: list[subprocess.Popen] = []
        with ExitStack() as files:
            logs = [None] + [files.enter_context(tempfile.TemporaryFile()) for _ in range(1, self.hosts)]
            try:
                for host in range(self.hosts):
                    processes.append(self._start(host, argv, env, logs[host]))
                failure = _wait(processes, timeout_s)
            finally:
                stop_process_groups(processes)
            if failure is not None:
                raise HostFailed(failure, {host: _read(log) for host, log in enumerate(logs) if log is not None})

    def _start(self, host: int, argv: list[str], env: Mapping[str, str] | None,
               log: IO[bytes] | None) -> subprocess.Popen:
        # A session of its own keeps the terminal's Ctrl-C from reaching the hosts directly, and lets
        # stop_process_groups signal the command's children as well.
        return subprocess.Popen(["ip", "netns", "exec", self.host_namespace(host), *argv],
                                env=self.host_environment(host, env), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                                start_new_session=True)


def _wait(processes: list[subprocess.Popen], timeout_s: float) -> str | None:
    """Waits until every host succeeded (None), one failed, or the deadline passed (what went wrong)."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [process.poll() for process in processes]
        failed = [host for host, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            host = failed[0]
            return f"host {host} (rank {host}) {exit_reason(codes[host])}; the other hosts were stopped"
        if all(code == 0 for code in codes):
            return None
        if time.monotonic() > deadline:
            running = ", ".join(str(host) for host, code in enumerate(codes) if code is None)
            return f"host(s) {running} still running at the {timeout_s:g} s deadline; all hosts were stopped"
        time.sleep(POLL_S)


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Sends `signum` to the process group of `process` (started with start_new_session), if it still exists."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def stop_process_groups(processes: list[subprocess.Popen], signum: int = signal.SIGTERM,
                        grace_s: float = STOP_GRACE_S) -> None:
    """Sends `signum` to each running process's group; kills those still running `grace_s` later."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        signal_group(process, signum)
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait(timeout=grace_s)


def _read(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")


def unavailable_reason() -> str | None:
    """Why no EmulatedCluster can be built here (tried with a throwaway one-host cluster), or None if it can."""
    try:
        with EmulatedCluster(1, "1gbit", name_prefix="ptprobe"):
            return None
    except ClusterError as error:
        return str(error)


__all__ = ["EmulatedCluster", "ClusterError", "HostFailed", "parse_bandwidth", "default_burst_bytes",
           "remove_leftovers", "unavailable_reason"]
