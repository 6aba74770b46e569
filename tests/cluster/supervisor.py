"""One supervising process per host: boots the container, and boots it again when the host reboots.

``systemctl reboot`` inside a systemd-nspawn container ends systemd-nspawn with exit status 133 (there is no
systemd-machined here to restart it). The supervisor then resets the fake hardware to factory values, as a
power cycle does on a real board, and starts systemd-nspawn again on the same overlay and network namespace,
so the host keeps its disk state and address. Any other exit (poweroff, a crash, `down`) ends the supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

from tests.cluster import cgroups, config, fakehw
from tests.cluster.config import Host
from tests.cluster.hoststate import SUPERVISE_COMMAND, HostFiles
from tests.cluster.network import netns_path
from tests.cluster.settings_watch import SettingsWatcher
from tests.cluster.system import remove_tree

EXIT_REBOOT = 133


def start(host: Host) -> None:
    """Start the host's supervisor in the background; return once it has written its pid file."""
    files = HostFiles(host)
    with open(files.supervisor_log, "ab") as log:
        subprocess.run(
            [sys.executable, "-m", "tests.cluster", SUPERVISE_COMMAND, host.name],
            cwd=config.REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            start_new_session=True,
        )


def nspawn_argv(host: Host, files: HostFiles) -> list[str]:
    argv = [
        "systemd-nspawn",
        "--boot",
        f"--directory={files.root}",
        f"--machine={host.machine}",
        f"--hostname={host.name}",
        # No systemd-machined or system bus on the controller: stay in our own cgroup, register nowhere.
        "--keep-unit",
        "--register=no",
        "--settings=no",
        f"--network-namespace-path={netns_path(host)}",
        "--console=read-only",
        "--resolv-conf=off",
        "--link-journal=no",
        # The firewall role loads nftables rules; each host has its own network namespace, so this reaches
        # no one else's rules.
        "--capability=CAP_NET_ADMIN",
        f"--bind={files.fakehw}:{config.HOST_FAKEHW_DIR}",
        f"--bind-ro={config.WHEELHOUSE_ROOT}:{config.HOST_WHEELHOUSE}",
    ]
    loop = files.loop_name()
    if loop:
        argv.append(f"--bind=/dev/{loop}")
    return argv


def supervise(host: Host) -> int:
    """Entry point of `python -m tests.cluster _supervise HOST`: detach, then run the boot loop."""
    ready_read, ready_write = os.pipe()
    if os.fork():
        os.close(ready_write)
        ok = os.read(ready_read, 1) == b"1"
        return 0 if ok else 1
    os.close(ready_read)
    os.setsid()
    files = HostFiles(host)
    try:
        cgroups.join(host)
        files.supervisor_pid.write_text(f"{os.getpid()}\n")
    except OSError as exc:
        print(f"supervisor for {host.name} could not start: {exc}", flush=True)
        os.write(ready_write, b"0")
        os._exit(1)
    os.write(ready_write, b"1")
    os.close(ready_write)
    try:
        code = _boot_loop(host, files)
    finally:
        files.supervisor_pid.unlink(missing_ok=True)
    os._exit(code)


def _boot_loop(host: Host, files: HostFiles) -> int:
    stopping = False
    container: subprocess.Popen[bytes] | None = None

    def on_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if container and container.poll() is None:
            # systemd-nspawn turns SIGTERM into a clean poweroff of the container.
            container.terminate()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while not stopping:
        # systemd-nspawn makes its cgroups below ours afresh at each start; clear the previous boot's.
        cgroups.remove(host, keep_top=True)
        remove_tree(files.fakehw)
        hardware = fakehw.build(
            host, files.fakehw, model_device=files.loop_name(), boot_dir=files.root / "boot/firmware"
        )
        if stopping:  # asked to stop while the hardware was being built
            break
        boot = files.boot_count() + 1
        files.boots.write_text(f"{boot}\n")
        started = time.monotonic()
        print(f"{time.strftime('%H:%M:%S')} boot {boot} of {host.name}", flush=True)
        watcher = SettingsWatcher(hardware.settings).start()
        try:
            with open(files.console_log, "ab") as console:
                container = subprocess.Popen(
                    nspawn_argv(host, files),
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                )
                code = container.wait()
        finally:
            watcher.stop()
        elapsed = time.monotonic() - started
        print(f"{time.strftime('%H:%M:%S')} systemd-nspawn exited {code} after {elapsed:.0f} s", flush=True)
        if code != EXIT_REBOOT:
            return 0 if code == 0 or stopping else code
    return 0
