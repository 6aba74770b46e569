"""Bring the five hosts up, take them down, say how they are, reboot one: the harness's main operations.

Every operation is idempotent and starts by clearing what a crashed run may have left (processes in the host's
cgroup, mounts and loop devices under its state directory, its network namespace and veth), so a failed run
never blocks the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.cluster import cgroups, config, fakehw, image, network, ssh, supervisor
from tests.cluster.config import HOSTS, Host
from tests.cluster.hoststate import HostFiles
from tests.cluster.system import (
    HarnessError,
    ensure_packages,
    harness_lock,
    remove_tree,
    require_root,
    run,
    write_text,
)

T = TypeVar("T")
_LOSETUP_LOCK = threading.Lock()
READY_STATES = ("running", "degraded")
STOP_TIMEOUT_S = 15.0


def _each(hosts: Iterable[Host], action: Callable[[Host], T]) -> dict[Host, T]:
    """Run `action` for every host at once; return the results by host (re-raising the first error)."""
    hosts = list(hosts)
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        futures = {host: pool.submit(action, host) for host in hosts}
        return {host: future.result() for host, future in futures.items()}


# ---------------------------------------------------------------------------------------------------- up


@dataclass
class UpResult:
    started: list[Host]
    image_built: bool
    network_restored: bool

    @property
    def changed(self) -> bool:
        return bool(self.started) or self.image_built or self.network_restored


def up() -> UpResult:
    require_root()
    with harness_lock():
        ensure_packages()
        image_dir, built = image.ensure_image()
        ssh.ensure_key()
        config.WHEELHOUSE_ROOT.mkdir(parents=True, exist_ok=True)
        network_restored = network.ensure_bridge()
        to_start = [host for host in HOSTS if not _is_up(host)]
        if not to_start:
            _each(HOSTS, lambda host: wait_ready(host, time.monotonic() + config.BOOT_TIMEOUT_S))
            if network_restored:
                print(
                    f"All {len(HOSTS)} hosts already up; restored the bridge {config.BRIDGE} or its firewall."
                )
            else:
                print(f"All {len(HOSTS)} hosts already up; nothing changed.", flush=True)
            return UpResult([], built, network_restored)
        boot_begin = time.monotonic()
        _each(to_start, lambda host: _create_host(host, image_dir))
        for host in to_start:
            supervisor.start(host)
        deadline = time.monotonic() + config.BOOT_TIMEOUT_S
        states = _each(HOSTS, lambda host: wait_ready(host, deadline))
        seconds = time.monotonic() - boot_begin
        for host in HOSTS:
            note = "started" if host in to_start else "already up"
            print(f"  {host.name:5} {host.address:12} {host.group:15} systemd {states[host]:9} {note}")
        print(
            f"Brought up {len(to_start)} of {len(HOSTS)} hosts in {seconds:.1f} s "
            f"(image {image_dir.name}{', built now' if built else ''}).",
            flush=True,
        )
        _prune_unused_images(image_dir)
        return UpResult(to_start, built, network_restored)


def recreate() -> UpResult:
    """Factory-new hosts whatever ran before (a demo leaves them tuned and serving): down, then up."""
    down()
    return up()


def _is_up(host: Host) -> bool:
    files = HostFiles(host)
    if files.supervisor() is None:
        return False
    if files.read(files.image) != image.image_version():
        print(f"{host.name} runs an older base image; run `down` then `up` to move it to the current one.")
    return network.host_network_ready(host)


def _create_host(host: Host, image_dir: Path) -> None:
    """Make a fresh host: overlay on the base image, identity files, model volume and network."""
    _destroy_host(host)
    files = HostFiles(host)
    for directory in (files.upper, files.work, files.root):
        directory.mkdir(parents=True)
    run(
        [
            "mount", "-t", "overlay", "overlay",
            "-o", f"lowerdir={image_dir},upperdir={files.upper},workdir={files.work}",
            files.root,
        ]
    )  # fmt: skip
    _write_identity(host, files.root)
    for relative, text in fakehw.boot_files(host).items():
        write_text(files.root / relative, text)
    _attach_model_volume(host, files)
    write_text(files.image, f"{image_dir.name}\n")
    network.ensure_host_network(host)


def _write_identity(host: Host, root: Path) -> None:
    machine_id = hashlib.sha256(f"llmfleet-{host.name}".encode()).hexdigest()[:32]
    write_text(root / "etc/machine-id", f"{machine_id}\n", 0o444)
    write_text(root / "etc/hostname", f"{host.name}\n")
    peers = "".join(f"{peer.address}\t{peer.name}\n" for peer in HOSTS)
    write_text(
        root / "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{host.name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"{config.BRIDGE_ADDRESS}\tcontroller\n{peers}",
    )
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_text(ssh_dir / "authorized_keys", ssh.public_key(), 0o600)


def _attach_model_volume(host: Host, files: HostFiles) -> None:
    """A sparse file with an ext4 file system labelled for the storage role, on a loop device."""
    with open(files.model_volume, "wb") as volume:
        volume.truncate(host.model_volume_mib * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", config.MODEL_VOLUME_LABEL, files.model_volume])
    # Hosts are created in parallel; two `losetup --find` at once could pick the same free device.
    with _LOSETUP_LOCK:
        device = run(["losetup", "--find", "--show", files.model_volume]).stdout.strip()
    write_text(files.loop_device, f"{Path(device).name}\n")


def wait_ready(host: Host, deadline: float, after_boot: int = 0) -> str:
    """Wait until the host answers SSH with boot finished; return systemd's state (running or degraded)."""
    files = HostFiles(host)
    last = "no answer on port 22"
    while time.monotonic() < deadline:
        if files.supervisor() is None:
            raise HarnessError(
                f"{host.name} stopped while booting; see {files.supervisor_log} and the console:\n"
                f"{files.console_tail()}"
            )
        if files.boot_count() <= after_boot or not ssh.port_open(host):
            time.sleep(0.2)
            continue
        remaining = max(1.0, deadline - time.monotonic())
        result = ssh.run(host, "systemctl is-system-running --wait", timeout=remaining, check=False)
        state = result.stdout.strip()
        if state in READY_STATES:
            return state
        last = f"systemd state {state!r} {result.stderr.strip()}".strip()
        time.sleep(0.5)
    raise HarnessError(
        f"{host.name} was not ready within {config.BOOT_TIMEOUT_S:.0f} s ({last}); console:\n"
        f"{files.console_tail()}"
    )


def _prune_unused_images(current: Path) -> None:
    in_use = {files.read(files.image) for files in map(HostFiles, HOSTS)}
    if in_use <= {current.name, ""}:
        for removed in image.prune_images(keep=current):
            print(f"Removed the old base image {removed.name}.")


# -------------------------------------------------------------------------------------------------- down


def down() -> bool:
    """Stop every host and remove all the cluster left on the controller; return whether anything existed."""
    require_root()
    with harness_lock():
        begin = time.monotonic()
        existed = _each(HOSTS, _destroy_host)
        strays = list(config.HOSTS_DIR.iterdir()) if config.HOSTS_DIR.is_dir() else []
        for stray in strays:
            _unmount_below(stray)
            _detach_loops_below(stray)
            remove_tree(stray)
        had_bridge = network.nft_table_present() or network.link_exists(config.BRIDGE)
        network.remove_bridge()
        cgroups.remove_parent()
        anything = any(existed.values()) or bool(strays) or had_bridge
        if anything:
            print(f"Cluster down in {time.monotonic() - begin:.1f} s; host disks discarded.", flush=True)
        else:
            print("Nothing was up; nothing changed.", flush=True)
        return anything


def _destroy_host(host: Host) -> bool:
    """Stop the host and remove every trace of it; return whether there was anything to remove."""
    files = HostFiles(host)
    existed = files.directory.exists() or network.netns_path(host).exists() or bool(cgroups.pids(host))
    pid = files.supervisor()
    if pid:
        # The supervisor powers the container off cleanly; what remains after that is killed below.
        signal_pid(pid, signal.SIGTERM)
        _wait_until(lambda: not cgroups.pids(host), STOP_TIMEOUT_S)

    def killed() -> bool:
        # Killing again each round also catches a process forked after the previous round's listing.
        cgroups.signal_all(host, signal.SIGKILL)
        return not cgroups.pids(host)

    if not _wait_until(killed, STOP_TIMEOUT_S):
        raise HarnessError(f"processes of {host.name} survive SIGKILL: {sorted(cgroups.pids(host))}")
    cgroups.remove(host)
    _unmount_below(files.directory)
    _detach_loops_below(files.directory)
    network.remove_host_network(host)
    for leftover in Path("/run/systemd/nspawn").glob(f"*/{host.machine}"):
        remove_tree(leftover)
    remove_tree(files.directory)
    return existed


def signal_pid(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(point.encode().decode("unicode_escape"))
    return points


def _unmount_below(directory: Path) -> None:
    prefix = str(directory)
    points = [p for p in _mount_points() if p == prefix or p.startswith(prefix + "/")]
    for point in sorted(set(points), key=len, reverse=True):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "-l", point], check=False)


def _detach_loops_below(directory: Path) -> None:
    listing = run(["losetup", "--json", "--list"], check=False).stdout.strip()
    if not listing:
        return
    for device in json.loads(listing).get("loopdevices", []):
        backing = (device.get("back-file") or "").removesuffix(" (deleted)")
        if backing.startswith(str(directory) + "/"):
            run(["losetup", "--detach", device["name"]], check=False)


# ------------------------------------------------------------------------------------------------ status


@dataclass
class HostStatus:
    host: Host
    supervisor: int | None
    boots: int
    network: bool
    systemd: str

    @property
    def up(self) -> bool:
        return self.supervisor is not None and self.systemd in READY_STATES


def host_status(host: Host) -> HostStatus:
    files = HostFiles(host)
    pid = files.supervisor()
    net = network.host_network_ready(host)
    state = "-"
    if pid and net:
        if ssh.port_open(host):
            result = ssh.run(host, "systemctl is-system-running", timeout=10, check=False)
            state = result.stdout.strip() or "no answer"
        else:
            state = "booting"
    return HostStatus(host, pid, files.boot_count(), net, state)


def status() -> list[HostStatus]:
    require_root()
    statuses = _each(HOSTS, host_status)
    bridge = "present" if network.link_exists(config.BRIDGE) else "absent"
    firewall = "present" if network.nft_table_present() else "absent"
    print(f"bridge {config.BRIDGE} {bridge}, nftables table inet {config.NFT_TABLE} {firewall}")
    print(f"  {'HOST':5} {'ADDRESS':12} {'GROUP':15} {'SUPERVISOR':10} {'BOOTS':5} SYSTEMD")
    for host, item in statuses.items():
        pid = str(item.supervisor) if item.supervisor else "stopped"
        print(f"  {host.name:5} {host.address:12} {host.group:15} {pid:10} {item.boots:<5} {item.systemd}")
    running = sum(item.up for item in statuses.values())
    print(f"{running} of {len(HOSTS)} hosts up.")
    return list(statuses.values())


# ------------------------------------------------------------------------------------------------ reboot


def reboot(host: Host) -> float:
    """Reboot one host from inside (systemctl reboot) and wait until it answers again; return the seconds."""
    require_root()
    with harness_lock():
        files = HostFiles(host)
        if files.supervisor() is None:
            raise HarnessError(f"{host.name} is not up; run `python -m tests.cluster up` first")
        before = files.boot_count()
        begin = time.monotonic()
        ssh.run(host, "systemctl reboot", timeout=15, check=False)
        state = wait_ready(host, time.monotonic() + config.BOOT_TIMEOUT_S, after_boot=before)
        seconds = time.monotonic() - begin
        print(
            f"Rebooted {host.name} in {seconds:.1f} s (boot {files.boot_count()}, systemd {state}).",
            flush=True,
        )
        return seconds
