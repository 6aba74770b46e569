"""The base image every host boots from: a debootstrapped Debian 12 with systemd, built once and cached.

The image is keyed by a version computed from everything that goes into it (suite, packages, files, masked
units), so changing any of those here builds a new image on the next `up`; older images are removed once no
host uses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from tests.cluster import config
from tests.cluster.system import HarnessError, remove_tree, run, write_text

# Hosts are offline: every Debian package a role installs must already be in the image, so that the
# role's `ansible.builtin.apt: state=present` finds it installed and needs no mirror.
IMAGE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    "sudo",
    "iproute2",
    "nftables",
    "procps",
    "kmod",
    "e2fsprogs",
    "numactl",
    "iputils-ping",
    # llama-cpp-python's shared libraries link against OpenMP.
    "libgomp1",
    # The monitoring role's packages (every host's exporter, Prometheus and Alertmanager on the monitoring
    # host).
    "prometheus-node-exporter",
    "prometheus",
    "prometheus-alertmanager",
)

# Services a package enables when it is installed, disabled again in the image: a factory-new host has none
# of them running, and the role that wants one enables it (as it would after installing the package).
DISABLED_UNITS = (
    "prometheus.service",
    "prometheus-node-exporter.service",
    "prometheus-alertmanager.service",
)

# Units that only slow a test boot down or start work no test wants (timers, a console login).
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "console-getty.service",
)

FAKEHW_SCRIPT = f"""#!/bin/sh
# Binds the fake hardware files that the cluster harness prepared under {config.HOST_FAKEHW_DIR} over the
# kernel's own paths, before anything in sysinit.target reads or writes them. Each line of the plan is
# "MODE TARGET [LINK]"; the source of TARGET is the same path under {config.HOST_FAKEHW_DIR}.
#   ro    bind a directory read-only, like the sysfs it replaces
#   rw    bind a writable file (a setting the roles change)
#   link  make TARGET a symlink to LINK (udev does not run in a container)
set -eu
root={config.HOST_FAKEHW_DIR}
while read -r mode target link; do
    case "$mode" in
        ro) mount --bind "$root$target" "$target" && mount -o remount,bind,ro "$target" ;;
        rw) mount --bind "$root$target" "$target" ;;
        link) mkdir -p "$(dirname "$target")" && ln -sfn "$link" "$target" ;;
        *) echo "unknown mode '$mode' in $root/mounts" >&2; exit 1 ;;
    esac
done < "$root/mounts"
"""

FAKEHW_UNIT = f"""[Unit]
Description=Bind the cluster harness's fake hardware files over /sys and /proc/sys
DefaultDependencies=no
ConditionPathExists={config.HOST_FAKEHW_DIR}/mounts
Before=sysinit.target systemd-sysctl.service systemd-tmpfiles-setup.service systemd-modules-load.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/llmfleet-fakehw

[Install]
WantedBy=sysinit.target
"""

# /proc/sys is read-only in a container, so systemd-sysctl would skip itself. Its vm.* files are writable
# fakes here, and on real hardware it runs at every boot: let it run so that persisted settings re-apply.
# Keys that are not faked stay read-only; systemd-sysctl ignores EROFS for them.
SYSCTL_DROPIN = """[Unit]
ConditionPathIsReadWrite=
After=llmfleet-fakehw.service
"""

# systemd-fstab-generator skips the block-device lines of /etc/fstab in a container ("Running in a container,
# ignoring fstab device entry"), so a volume that storage_tuning put in fstab would stay unmounted after a
# reboot, where on real hardware the generator mounts it. Mount those lines the way the boot would.
FSTAB_DEVICES_UNIT = """[Unit]
Description=Mount the block-device lines of /etc/fstab, which the fstab generator skips in a container
DefaultDependencies=no
After=llmfleet-fakehw.service local-fs-pre.target
Before=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount --all --types ext4,xfs

[Install]
WantedBy=local-fs.target
"""

SSHD_CONFIG = """# Key-only root login from the controller; the private bridge has no DNS.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
"""

IMAGE_FILES: dict[str, tuple[str, int]] = {
    "usr/local/sbin/llmfleet-fakehw": (FAKEHW_SCRIPT, 0o755),
    "etc/systemd/system/llmfleet-fakehw.service": (FAKEHW_UNIT, 0o644),
    "etc/systemd/system/systemd-sysctl.service.d/llmfleet-fakehw.conf": (SYSCTL_DROPIN, 0o644),
    "etc/systemd/system/llmfleet-fstab-devices.service": (FSTAB_DEVICES_UNIT, 0o644),
    "etc/ssh/sshd_config.d/llmfleet.conf": (SSHD_CONFIG, 0o644),
    "etc/machine-id": ("", 0o444),
    "etc/hostname": ("localhost\n", 0o644),
}
IMAGE_SYMLINKS: dict[str, str] = {
    "etc/systemd/system/sysinit.target.wants/llmfleet-fakehw.service": (
        "/etc/systemd/system/llmfleet-fakehw.service"
    ),
    "etc/systemd/system/local-fs.target.wants/llmfleet-fstab-devices.service": (
        "/etc/systemd/system/llmfleet-fstab-devices.service"
    ),
    "var/lib/dbus/machine-id": "/etc/machine-id",
    **{f"etc/systemd/system/{unit}": "/dev/null" for unit in MASKED_UNITS},
}

# Bump when the build steps change in a way the lists above do not show.
BUILD_REVISION = 1
MARKER = ".llmfleet-image.json"


def image_version() -> str:
    recipe = {
        "suite": config.DEBIAN_SUITE,
        "packages": sorted(IMAGE_PACKAGES),
        "files": IMAGE_FILES,
        "symlinks": IMAGE_SYMLINKS,
        "disabled": DISABLED_UNITS,
        "revision": BUILD_REVISION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"{config.DEBIAN_SUITE}-{digest[:12]}"


def image_path(version: str | None = None) -> Path:
    return config.IMAGES_DIR / (version or image_version())


def is_built(path: Path) -> bool:
    return (path / MARKER).is_file()


def ensure_image() -> tuple[Path, bool]:
    """Return the current image, building it first if needed; the flag says whether it was built now."""
    path = image_path()
    if is_built(path):
        return path, False
    build_image(path)
    return path, True


def build_image(path: Path) -> None:
    staging = path.with_name(path.name + ".tmp")
    remove_tree(staging)
    config.DEBOOTSTRAP_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    print(f"Building the base image {path.name} with debootstrap (a few minutes, once)...", flush=True)
    started = time.monotonic()
    result = run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(IMAGE_PACKAGES)}",
            f"--cache-dir={config.DEBOOTSTRAP_CACHE_DIR}",
            config.DEBIAN_SUITE,
            staging,
            config.DEBIAN_MIRROR,
        ],
        check=False,
    )
    if result.returncode != 0:
        log = staging / "debootstrap" / "debootstrap.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else result.stderr[-2000:]
        raise HarnessError(
            f"debootstrap of {config.DEBIAN_SUITE} from {config.DEBIAN_MIRROR} failed:\n{tail}"
        )
    _customise(staging)
    elapsed = time.monotonic() - started
    marker = {"version": path.name, "built_at": time.time(), "build_seconds": round(elapsed, 1)}
    write_text(staging / MARKER, json.dumps(marker) + "\n")
    os.rename(staging, path)
    print(f"Built the base image {path.name} in {elapsed:.0f} s", flush=True)


def _customise(root: Path) -> None:
    for relative, (text, mode) in IMAGE_FILES.items():
        target = root / relative
        remove_tree(target)
        write_text(target, text, mode)
    for relative, link in IMAGE_SYMLINKS.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_tree(target)
        target.symlink_to(link)
    for unit in DISABLED_UNITS:
        for link in (root / "etc/systemd/system").glob(f"*.wants/{unit}"):
            link.unlink()
    for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()


def prune_images(keep: Path) -> list[Path]:
    """Remove images other than `keep` (and any half-built ones); call only while no host is up."""
    removed = []
    if not config.IMAGES_DIR.is_dir():
        return removed
    for candidate in config.IMAGES_DIR.iterdir():
        if candidate != keep:
            remove_tree(candidate)
            removed.append(candidate)
    return removed
