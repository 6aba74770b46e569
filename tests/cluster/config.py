"""What the local cluster is made of: its hosts, addresses, paths and names on the controller.

Everything else in the harness reads these constants, so that the inventory in ``inventory/local/`` (checked
against them by a unit test) and the harness cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Everything the harness keeps on the controller. Images and the SSH key outlive `down`; hosts/ does not.
STATE_ROOT = Path("/var/lib/llmfleet")
IMAGES_DIR = STATE_ROOT / "images"
DEBOOTSTRAP_CACHE_DIR = STATE_ROOT / "cache" / "debootstrap"
SSH_DIR = STATE_ROOT / "ssh"
SSH_KEY = SSH_DIR / "id_ed25519"
HOSTS_DIR = STATE_ROOT / "hosts"
LOCK_FILE = STATE_ROOT / "lock"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("LLMFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")

# What the controller needs from Debian to run the harness.
CONTROLLER_PACKAGES = (
    "systemd-container",
    "debootstrap",
    "openssh-client",
    "iproute2",
    "nftables",
    "e2fsprogs",
)

# Wheels built on the controller, bind-mounted read-only into every host at HOST_WHEELHOUSE.
WHEELHOUSE_ROOT = Path.home() / ".cache" / "llmfleet" / "wheelhouse"
# The patched build (Makefile's LLAMA_CPP_PYTHON_BUILD): the public version with our local label.
LLAMA_CPP_PYTHON_VERSION = "0.3.36+llmfleet.8"
LLAMA_WHEEL_DIR = WHEELHOUSE_ROOT / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-rpc"
HOST_WHEELHOUSE = "/opt/llmfleet/wheelhouse"

# The private bridge: the controller is .1, hosts have fixed addresses, nothing routes beyond it.
BRIDGE = "llmfleet0"
BRIDGE_ADDRESS = "10.77.0.1"
PREFIX_LENGTH = 24
NFT_TABLE = "llmfleet"

# Where the fake hardware tree appears inside a host; the image's llmfleet-fakehw.service reads it.
HOST_FAKEHW_DIR = "/run/llmfleet-fakehw"

# Label of the loop-backed model volume each host gets, found by the storage role with LABEL=.
MODEL_VOLUME_LABEL = "llmfleet-models"

BOOT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Host:
    """One host of the local cluster and the names it owns on the controller."""

    name: str
    address: str
    group: str
    # Which fake hardware it gets: "pi5" (Raspberry Pi 5) or "gpu" (x86 host with two NUMA nodes and a GPU).
    board: str
    model_volume_mib: int

    @property
    def machine(self) -> str:
        return f"llmfleet-{self.name}"

    @property
    def netns(self) -> str:
        return f"llmfleet-{self.name}"

    @property
    def veth(self) -> str:
        return f"lf-{self.name}"

    @property
    def mac(self) -> str:
        last = int(self.address.rsplit(".", 1)[1])
        return f"02:77:00:00:00:{last:02x}"

    @property
    def state_dir(self) -> Path:
        return HOSTS_DIR / self.name

    @property
    def cgroup(self) -> str:
        """Cgroup path (relative to each hierarchy's root) that holds the host's supervisor and container."""
        return f"llmfleet/{self.name}"


HOSTS: tuple[Host, ...] = (
    Host("pi1", "10.77.0.11", "rpc_workers", "pi5", 1024),
    Host("pi2", "10.77.0.12", "rpc_workers", "pi5", 1024),
    Host("pi3", "10.77.0.13", "rpc_workers", "pi5", 1024),
    Host("pi4", "10.77.0.14", "rpc_workers", "pi5", 1024),
    Host("gpu1", "10.77.0.21", "inference_head", "gpu", 4096),
)
GROUPS = ("rpc_workers", "inference_head")


def host_by_name(name: str) -> Host:
    for host in HOSTS:
        if host.name == name:
            return host
    known = ", ".join(h.name for h in HOSTS)
    raise KeyError(f"no host {name!r} in the local cluster; hosts are: {known}")
