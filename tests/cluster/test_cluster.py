"""The local cluster as the other tests and the demo use it: up, reachable, fake hardware, offline, reboots.

The tests run in file order on one cluster; the ones that take it down and crash it come last.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import cgroups, cluster, config, network, ssh, wheelhouse
from tests.cluster.config import HOSTS, host_by_name
from tests.cluster.fakehw import real_cpus
from tests.cluster.hoststate import HostFiles

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("local_cluster")]

PI = host_by_name("pi1")
GPU = host_by_name("gpu1")
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
GOVERNOR0 = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"


def on(host: config.Host, command: str) -> str:
    result = ssh.run(host, command, check=False)
    assert result.returncode == 0, f"{host.name}: `{command}` failed: {result.stderr}"
    return result.stdout


def read_files(host: config.Host, *paths: str) -> list[str]:
    """Read several files on the host over one SSH connection."""
    script = "import json, sys; print(json.dumps([open(p).read() for p in sys.argv[1:]]))"
    return json.loads(on(host, f"python3 -c '{script}' {' '.join(paths)}"))


def read_until(host: config.Host, path: str, expected: str, timeout: float = 5) -> str:
    """Read a file on the host until it shows `expected` (fake settings settle just after a write)."""
    deadline = time.monotonic() + timeout
    text = on(host, f"cat {path}")
    while text != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        text = on(host, f"cat {path}")
    return text


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.cluster", *args],
        cwd=config.REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_second_up_changes_nothing_and_is_fast(capsys: pytest.CaptureFixture[str]) -> None:
    begin = time.monotonic()
    result = cluster.up()
    assert not result.changed
    assert time.monotonic() - begin < 15
    assert "nothing changed" in capsys.readouterr().out


def test_status_lists_every_host_as_running() -> None:
    result = harness("status")
    assert result.returncode == 0, result.stdout + result.stderr
    for host in HOSTS:
        line = next(line for line in result.stdout.splitlines() if line.split()[:1] == [host.name])
        assert line.split()[-1] in cluster.READY_STATES, line


def test_ssh_reaches_every_host_by_its_own_name() -> None:
    for host in HOSTS:
        assert on(host, "hostname").strip() == host.name


def test_ansible_pings_every_host_through_the_local_inventory() -> None:
    ansible = Path(sys.executable).with_name("ansible")
    command = str(ansible) if ansible.exists() else shutil.which("ansible")
    if command is None:
        pytest.skip("ansible is not installed in this environment")
    result = subprocess.run(
        [command, "all", "-m", "ansible.builtin.ping"],
        cwd=config.REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for host in HOSTS:
        assert f"{host.name} | SUCCESS" in result.stdout


def test_workers_look_like_raspberry_pi_5_boards() -> None:
    cpus = real_cpus()
    expected = {
        "/sys/firmware/devicetree/base/model": "Raspberry Pi 5 Model B Rev 1.0\0",
        "/sys/devices/system/cpu/cpufreq/policy0/affected_cpus": " ".join(map(str, cpus)) + "\n",
    }
    for cpu in cpus:
        freq = f"/sys/devices/system/cpu/cpu{cpu}/cpufreq"
        expected[f"{freq}/scaling_governor"] = "ondemand\n"
        expected[f"{freq}/scaling_available_governors"] = "ondemand performance powersave\n"
        expected[f"{freq}/scaling_driver"] = "cpufreq-dt\n"
        expected[f"{freq}/cpuinfo_max_freq"] = "2400000\n"
        expected[f"{freq}/scaling_min_freq"] = "1500000\n"
        expected[f"/sys/devices/system/cpu/cpu{cpu}/cpu_capacity"] = "1024\n"
    for host in (h for h in HOSTS if h.group == "rpc_workers"):
        assert read_files(host, *expected) == list(expected.values())
        assert "Model\t\t: Raspberry Pi 5 Model B Rev 1.0" in on(host, "cat /proc/cpuinfo")
        # The CPU count stays real, so pinning really pins.
        pinned = on(host, f"nproc; taskset -c {cpus[-1]} grep Cpus_allowed_list /proc/self/status")
        assert pinned == f"{len(cpus)}\nCpus_allowed_list:\t{cpus[-1]}\n"


def test_head_has_two_numa_nodes_and_an_nvidia_gpu_on_node_1() -> None:
    node1 = on(GPU, "cat /sys/devices/system/node/node1/cpulist").strip()
    assert "available: 2 nodes" in on(GPU, "numactl --hardware")
    device = "/sys/bus/pci/devices/0000:41:00.0"
    assert on(GPU, f"cat {device}/vendor {device}/class {device}/numa_node") == "0x10de\n0x030200\n1\n"
    assert on(GPU, f"cat {device}/local_cpulist").strip() == node1


def test_fake_settings_are_writable_inside_and_leave_the_controller_alone() -> None:
    host = host_by_name("pi2")
    controller_swappiness = Path("/proc/sys/vm/swappiness").read_text()
    controller_thp = Path(THP_ENABLED).read_text()
    on(host, "sysctl -w vm.swappiness=7")
    on(host, f"echo never > {THP_ENABLED}")
    on(host, f"echo performance > {GOVERNOR0}")
    assert read_until(host, "/proc/sys/vm/swappiness", "7\n") == "7\n"
    assert read_until(host, THP_ENABLED, "always madvise [never]\n") == "always madvise [never]\n"
    assert on(host, f"cat {GOVERNOR0}") == "performance\n"
    # A value the kernel would refuse leaves the old one, as EINVAL would.
    ssh.run(host, f"echo sometimes > {THP_ENABLED}", check=False)
    time.sleep(0.5)
    assert on(host, f"cat {THP_ENABLED}") == "always madvise [never]\n"
    assert Path("/proc/sys/vm/swappiness").read_text() == controller_swappiness
    assert Path(THP_ENABLED).read_text() == controller_thp
    # What is not faked stays read-only, so it cannot reach the controller's kernel either.
    refused = ssh.run(host, "echo 1 > /proc/sys/vm/drop_caches", check=False)
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr


def test_model_volume_mounts_by_label_and_its_queue_is_fake() -> None:
    on(GPU, f"mount LABEL={config.MODEL_VOLUME_LABEL} /mnt && echo ok > /mnt/probe && umount /mnt")
    device = HostFiles(GPU).loop_name()
    scheduler = f"/sys/block/{device}/queue/scheduler"
    controller_scheduler = Path(scheduler).read_text()
    on(GPU, f"echo mq-deadline > {scheduler}")
    assert read_until(GPU, scheduler, "none [mq-deadline] kyber bfq\n") == "none [mq-deadline] kyber bfq\n"
    assert Path(scheduler).read_text() == controller_scheduler


def test_reboot_keeps_the_disk_and_reapplies_persisted_settings_on_factory_hardware() -> None:
    host = host_by_name("pi3")
    on(host, "echo vm.swappiness=11 > /etc/sysctl.d/90-test.conf")
    on(
        host,
        "echo 'w /sys/kernel/mm/transparent_hugepage/defrag - - - - never' > /etc/tmpfiles.d/90-test.conf",
    )
    on(host, f"echo never > {THP_ENABLED}")
    on(host, f"echo performance > {GOVERNOR0}")
    on(host, "touch /root/kept-across-reboot")
    boots = HostFiles(host).boot_count()
    result = harness("reboot", host.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert HostFiles(host).boot_count() == boots + 1
    on(host, "test -e /root/kept-across-reboot")
    # Persisted configuration re-applies at boot...
    assert on(host, "cat /proc/sys/vm/swappiness") == "11\n"
    assert (
        on(host, "cat /sys/kernel/mm/transparent_hugepage/defrag")
        == "always defer defer+madvise madvise [never]\n"
    )
    # ...while what was only set live is back at factory values, as after a power cycle.
    assert on(host, f"cat {THP_ENABLED}") == "[always] madvise never\n"
    assert on(host, f"cat {GOVERNOR0}") == "ondemand\n"
    assert on(host, "systemctl is-system-running").strip() in cluster.READY_STATES


def test_hosts_reach_each_other_and_nothing_else() -> None:
    for host in HOSTS:
        assert on(host, "ip -4 route show default").strip() == ""
        unroutable = ssh.run(host, "ip route get 192.0.2.1", check=False)
        assert unroutable.returncode != 0
        assert "unreachable" in unroutable.stderr
    assert on(PI, f"timeout 5 bash -c '</dev/tcp/{GPU.address}/22' && echo open").strip() == "open"
    assert network.nft_table_present()
    # A new connection from a host to the controller is dropped.
    with socket.create_server((config.BRIDGE_ADDRESS, 0)) as server:
        port = server.getsockname()[1]
        blocked = ssh.run(PI, f"timeout 3 bash -c '</dev/tcp/{config.BRIDGE_ADDRESS}/{port}'", check=False)
    assert blocked.returncode != 0


def test_rpc_build_of_llama_cpp_python_installs_offline_and_imports() -> None:
    deps = wheelhouse.deps_dir()
    if wheelhouse.llama_wheel() is None or not wheelhouse.is_complete(deps):
        pytest.skip("no wheelhouse yet: run `make wheelhouse` and `python -m tests.cluster wheelhouse`")
    links = [wheelhouse.host_path(config.LLAMA_WHEEL_DIR), wheelhouse.host_path(deps)]
    find_links = " ".join(f"--find-links {link}" for link in links)
    on(
        GPU,
        "python3 -m venv /opt/llmfleet-check && /opt/llmfleet-check/bin/pip install -q --no-index "
        f"{find_links} llama-cpp-python=={config.LLAMA_CPP_PYTHON_VERSION}",
    )
    probe = (
        "import ctypes, json, pathlib, llama_cpp; "
        "lib = pathlib.Path(llama_cpp.__file__).parent / 'lib' / 'libggml-rpc.so'; "
        "rpc = ctypes.CDLL(str(lib)); "
        "print(json.dumps([llama_cpp.__version__, hasattr(rpc, 'ggml_backend_rpc_start_server')]))"
    )
    output = on(GPU, f'/opt/llmfleet-check/bin/python -c "{probe}"')
    assert json.loads(output) == [config.LLAMA_CPP_PYTHON_VERSION, True]


def test_up_restarts_a_crashed_host_and_only_that_one() -> None:
    host = host_by_name("pi4")
    cgroups.signal_all(host, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cgroups.pids(host) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert HostFiles(host).supervisor() is None
    result = harness("status")
    assert result.returncode == 3
    started = cluster.up().started
    assert started == [host]
    assert on(host, "hostname").strip() == host.name


def _leftovers() -> list[str]:
    found = []
    mounts = Path("/proc/self/mountinfo").read_text()
    if str(config.HOSTS_DIR) in mounts:
        found.append("mounts under the hosts directory")
    if config.HOSTS_DIR.is_dir() and any(config.HOSTS_DIR.iterdir()):
        found.append(f"files in {config.HOSTS_DIR}")
    for host in HOSTS:
        if network.netns_path(host).exists():
            found.append(f"network namespace {host.netns}")
        if network.link_exists(host.veth):
            found.append(f"veth {host.veth}")
        if cgroups.pids(host) or any(path.exists() for path in cgroups.host_dirs(host)):
            found.append(f"cgroup of {host.name}")
    if network.link_exists(config.BRIDGE):
        found.append(f"bridge {config.BRIDGE}")
    if network.nft_table_present():
        found.append(f"nftables table {config.NFT_TABLE}")
    loops = subprocess.run(["losetup", "--list", "--noheadings"], capture_output=True, text=True, check=True)
    if str(config.HOSTS_DIR) in loops.stdout:
        found.append("loop devices on host volumes")
    return found


def test_down_after_a_crash_leaves_nothing_behind() -> None:
    # A crash of the whole harness: every host's processes die at once, mounts and network stay.
    for host in HOSTS:
        cgroups.signal_all(host, signal.SIGKILL)
    assert cluster.down()
    assert _leftovers() == []
    assert not cluster.down()


def test_up_after_down_brings_all_hosts_back() -> None:
    result = cluster.up()
    assert result.started == list(HOSTS)
    assert all(item.up for item in cluster.status())
