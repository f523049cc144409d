"""The emulated cluster: a 2-host training over its network, its bandwidth limit, and that it leaves nothing.

Tests that build a cluster need root and Linux network namespaces; elsewhere they skip with the reason.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from polytrain.launch.cluster import (NETNS_ETC, EmulatedCluster, HostFailed, parse_bandwidth, remove_leftovers,
                                      unavailable_reason)

# Each host sends this many MiB to the other, both at once, over plain TCP; each writes the rate at which it
# received them. No torch here: the check is of the emulated links, not of polytrain.
TRANSFER_SCRIPT = """
import os, socket, sys, threading, time
rank, mebibytes, out = int(os.environ["RANK"]), int(sys.argv[1]), sys.argv[2]
addresses = sys.argv[3:]
server = socket.create_server((addresses[rank], 5600))

def send():
    deadline = time.monotonic() + 20
    while True:
        try:
            conn = socket.create_connection((addresses[1 - rank], 5600), timeout=20)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    for _ in range(mebibytes):
        conn.sendall(bytes(1 << 20))
    conn.close()

sender = threading.Thread(target=send)
sender.start()
server.settimeout(20)
conn, _ = server.accept()
conn.settimeout(20)
received, started = 0, None
while data := conn.recv(1 << 20):
    started = started or time.perf_counter()
    received += len(data)
rate = received * 8 / (time.perf_counter() - started)
sender.join()
with open(f"{out}/rate{rank}.txt", "w") as file:
    file.write(str(rate))
"""


def test_bandwidths_are_read_in_tc_units():
    assert parse_bandwidth("100mbit") == 100e6
    assert parse_bandwidth("1gbit") == 1e9
    assert parse_bandwidth("2.5Gbit") == 2.5e9
    assert parse_bandwidth("10mbps") == 80e6  # tc's "bps" is bytes per second
    assert parse_bandwidth("none") is None and parse_bandwidth(None) is None


@pytest.mark.parametrize("text", ["fast", "100", "100mb", "0mbit", "-1gbit"])
def test_a_bad_bandwidth_names_the_accepted_units(text):
    with pytest.raises(ValueError, match="not a rate such as 100mbit, 1gbit or none"):
        parse_bandwidth(text)


def test_arguments_are_checked_before_anything_is_built():
    with pytest.raises(ValueError, match="subnet 10.0.0.0/30 has 2 host addresses, too few for 3 hosts"):
        EmulatedCluster(3, subnet="10.0.0.0/30")
    with pytest.raises(ValueError, match="at least 1 host"):
        EmulatedCluster(0)


@pytest.fixture(scope="module")
def namespaces_available():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no emulated cluster on this machine: {reason}")


def namespaces_named(prefix):
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


def assert_removed(cluster_name):
    assert namespaces_named(cluster_name + "-") == []
    assert not list(NETNS_ETC.glob(cluster_name + "-*"))


def polytrain_cluster(*argv):
    return subprocess.Popen([sys.executable, "-m", "polytrain", "cluster", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_hosts_train_over_a_1gbit_network(namespaces_available, tmp_path):
    out = tmp_path / "run"
    process = polytrain_cluster("--hosts", "2", "--bandwidth", "1gbit", "--timeout", "120", "--",
                                "polytrain", "train", "--model", "lenet5", "--dataset", "digits", "--epochs", "1",
                                "--strategy", "allreduce", "--batch-size", "64", "--out", str(out))
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert "final test accuracy" in stdout  # host 0's output reaches the user
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["workers"] == 2
    assert result["comm"]["bytes_sent"] > 0
    assert [rank["rank"] for rank in result["comm"]["per_rank"]] == [0, 1]
    assert result["environment"]["network"].startswith("emulated cluster: 2 hosts")
    assert_removed(f"pt-{process.pid}")


def test_a_failing_host_is_named_shown_and_everything_removed(namespaces_available):
    process = polytrain_cluster("--hosts", "2", "--bandwidth", "100mbit", "--timeout", "60", "--", sys.executable,
                                "-c", "import os, sys; rank = int(os.environ['RANK']); "
                                      "print(f'host {rank} gives up', file=sys.stderr); sys.exit(rank)")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "host 1 gives up" in stderr  # host 1's captured output is shown
    assert stderr.splitlines()[-1] == ("polytrain: error: host 1 (rank 1) exited with status 1; "
                                       "the other hosts were stopped")
    assert_removed(f"pt-{process.pid}")


def test_a_host_past_the_deadline_is_stopped(namespaces_available):
    started = time.monotonic()
    with pytest.raises(HostFailed, match=r"host\(s\) 0, 1 still running at the 1 s deadline"):
        with EmulatedCluster(2, None) as cluster:
            cluster.run(["sleep", "60"], timeout_s=1)
    assert time.monotonic() - started < 20
    assert_removed(cluster.name)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_an_interrupted_cluster_is_removed(namespaces_available, signum, status):
    process = polytrain_cluster("--hosts", "2", "--timeout", "60", "--", "sleep", "60")
    deadline = time.monotonic() + 30
    while len(namespaces_named(f"pt-{process.pid}-")) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # let the hosts' commands start
    process.send_signal(signum)
    process.communicate(timeout=30)
    assert process.returncode == status
    assert_removed(f"pt-{process.pid}")


def test_leftovers_of_a_dead_run_are_removed_first(namespaces_available):
    crashed = subprocess.Popen(["true"])
    crashed.wait()
    leftover = f"pttest-{crashed.pid}-0-h0"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        with EmulatedCluster(1, None, name_prefix="pttest") as cluster:
            assert namespaces_named(leftover) == []
            assert remove_leftovers("pttest") == []  # a live run's namespaces are kept
            assert len(namespaces_named(cluster.name)) == 2
    finally:
        subprocess.run(["ip", "netns", "delete", leftover], capture_output=True)
    assert_removed(cluster.name)


def test_each_link_is_limited_in_both_directions(namespaces_available, tmp_path):
    limit_bits_per_s = 100e6
    with EmulatedCluster(2, "100mbit") as cluster:
        cluster.run([sys.executable, "-c", TRANSFER_SCRIPT, "4", str(tmp_path), *cluster.addresses], timeout_s=60)
        shapers = [subprocess.run(["tc", "-n", namespace, "qdisc", "show", "dev", interface], check=True,
                                  capture_output=True, text=True).stdout
                   for namespace, interface in [(cluster.host_namespace(0), "veth0"), (cluster.switch_namespace, "h0")]]
    rates = [float((tmp_path / f"rate{rank}.txt").read_text()) for rank in range(2)]
    # Unlimited, these links move several Gbit/s; the bucket (1 ms of traffic) lets 12.5 kB pass early.
    assert max(rates) <= 1.3 * limit_bits_per_s, rates
    assert all("tbf" in shaper and "rate 100Mbit" in shaper for shaper in shapers), shapers
