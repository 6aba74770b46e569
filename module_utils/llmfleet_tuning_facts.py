"""Collect the tuning-relevant state and topology of a Linux host from sysfs and procfs.

``gather(root)`` returns one JSON-ready dictionary; each ``*_facts`` function covers one area and
reads only below ``root`` so tests can build fake trees. Nothing here runs a command: the module
runs ``vcgencmd`` and hands its output to ``decode_throttled``.
"""

from __future__ import annotations

import os
import re

from ansible.module_utils.llmfleet_boot import token_key, tokens
from ansible.module_utils.llmfleet_sysfs import (
    SysfsError,
    expand,
    format_cpu_list,
    host_path,
    parse_choice,
    parse_cpu_list,
    read_attr,
    read_int,
)

CPU_ROOT = "/sys/devices/system/cpu"
NODE_ROOT = "/sys/devices/system/node"
PCI_ROOT = "/sys/bus/pci/devices"
THP_ROOT = "/sys/kernel/mm/transparent_hugepage"
CGROUP_ROOT = "/sys/fs/cgroup"
MODEL_PATHS = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")
# Where Raspberry Pi firmware reads cmdline.txt and config.txt: Raspberry Pi OS 12 and Ubuntu, then older
# Raspberry Pi OS.
FIRMWARE_DIRS = ("/boot/firmware", "/boot")
# Debian's flag for "a reboot is pending" (written by package scripts and by the pi_boot role); /run is
# emptied at every boot.
REBOOT_REQUIRED_FILE = "/run/reboot-required"
# The firmware rewrites these tokens of cmdline.txt on their way to the kernel (console=serial0 becomes
# console=ttyAMA10), so they are not compared with /proc/cmdline.
REWRITTEN_BY_FIRMWARE = ("console",)

PCI_CLASS_NVME = 0x0108
# Transfer rate per lane of each PCIe generation, as sysfs writes it ("8.0 GT/s PCIe").
PCIE_GENERATIONS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}

# CPUs within this share of the fastest one count as performance cores: it keeps both A76 clusters of
# an RK3588 (2.4 and 2.25 GHz) and x86 "favoured" cores a few percent apart, and drops A55s (40 %).
PERFORMANCE_SHARE = 0.9

# The vm sysctls the memory role sets, reported so that a play can show what it is about to change.
VM_SYSCTLS = (
    "swappiness",
    "dirty_ratio",
    "dirty_background_ratio",
    "dirty_bytes",
    "dirty_background_bytes",
    "dirty_expire_centisecs",
    "dirty_writeback_centisecs",
    "vfs_cache_pressure",
    "page-cluster",
    "min_free_kbytes",
    "watermark_scale_factor",
    "overcommit_memory",
    "zone_reclaim_mode",
)

PCI_CLASS_DISPLAY = 0x03
PCI_VENDOR_NVIDIA = 0x10DE

# Bits of `vcgencmd get_throttled`; the same conditions are repeated 16 bits up as "has occurred".
THROTTLED_BITS = {
    0: "under_voltage",
    1: "arm_freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
}
THROTTLED_OCCURRED_SHIFT = 16


def _cpu_ids(root: str) -> list[int]:
    ids = []
    for path in expand(root, f"{CPU_ROOT}/cpu[0-9]*"):
        name = os.path.basename(path)
        if name[3:].isdigit():
            ids.append(int(name[3:]))
    return sorted(ids)


def _split(text: str | None) -> list[str]:
    return text.split() if text else []


def _common(lists: list[list[str]]) -> list[str]:
    """Values that every list offers, in the order the first one gives them."""
    if not lists:
        return []
    rest = [set(values) for values in lists[1:]]
    return [value for value in lists[0] if all(value in other for other in rest)]


def cpu_facts(root: str) -> dict:
    """Per-CPU capacity, frequencies and governor, with the online and performance sets."""
    online_text = read_attr(root, f"{CPU_ROOT}/online")
    ids = _cpu_ids(root)
    online = parse_cpu_list(online_text) if online_text is not None else ids
    cpus = []
    for cpu in ids:
        base = f"{CPU_ROOT}/cpu{cpu}"
        freq = f"{base}/cpufreq"
        cpus.append(
            {
                "id": cpu,
                "online": cpu in online,
                "capacity": read_int(root, f"{base}/cpu_capacity"),
                "max_freq_khz": read_int(root, f"{freq}/cpuinfo_max_freq"),
                "min_freq_khz": read_int(root, f"{freq}/cpuinfo_min_freq"),
                "scaling_max_freq_khz": read_int(root, f"{freq}/scaling_max_freq"),
                "scaling_min_freq_khz": read_int(root, f"{freq}/scaling_min_freq"),
                "driver": read_attr(root, f"{freq}/scaling_driver"),
                "governor": read_attr(root, f"{freq}/scaling_governor"),
                "governors_offered": _split(read_attr(root, f"{freq}/scaling_available_governors")),
                "energy_perf_bias": read_int(root, f"{base}/power/energy_perf_bias"),
                "energy_performance_preference": read_attr(root, f"{freq}/energy_performance_preference"),
                "energy_performance_preferences_offered": _split(
                    read_attr(root, f"{freq}/energy_performance_available_preferences")
                ),
            }
        )
    performance = performance_cpus(cpus)
    return {
        "count": len(online),
        "online": online,
        "online_list": format_cpu_list(online),
        "performance": performance,
        "performance_list": format_cpu_list(performance),
        "cpus": cpus,
    }


def performance_cpus(cpus: list[dict]) -> list[int]:
    """The online CPUs worth pinning inference to.

    ``cpu_capacity`` (arm64 and riscv kernels) ranks them first, then the highest frequency the
    CPU reaches; CPUs within ``PERFORMANCE_SHARE`` of the best count. Where neither is known, as
    on x86 without cpufreq, every online CPU is a performance core.
    """
    online = [cpu for cpu in cpus if cpu["online"]]
    for key in ("capacity", "max_freq_khz"):
        values = [cpu[key] for cpu in online]
        if online and all(value is not None for value in values):
            floor = max(values) * PERFORMANCE_SHARE
            return [cpu["id"] for cpu in online if cpu[key] >= floor]
    return [cpu["id"] for cpu in online]


def cpufreq_facts(cpus: list[dict]) -> dict:
    """The cpufreq picture of the online CPUs: drivers, what every CPU offers, what runs now."""
    scaled = [cpu for cpu in cpus if cpu["online"] and cpu["governor"] is not None]
    governors = sorted({cpu["governor"] for cpu in scaled})
    drivers = sorted({cpu["driver"] for cpu in scaled if cpu["driver"]})
    with_epp = [cpu for cpu in scaled if cpu["energy_performance_preference"] is not None]
    return {
        "present": bool(scaled),
        "driver": drivers[0] if len(drivers) == 1 else None,
        "drivers": drivers,
        "governors_offered": _common([cpu["governors_offered"] for cpu in scaled]),
        "governors_current": governors,
        "governor": governors[0] if len(governors) == 1 else None,
        "energy_perf_bias": any(cpu["energy_perf_bias"] is not None for cpu in cpus if cpu["online"]),
        "energy_performance_preference": bool(with_epp),
        "energy_performance_preferences_offered": _common(
            [cpu["energy_performance_preferences_offered"] for cpu in with_epp]
        ),
    }


def numa_facts(root: str) -> dict:
    """NUMA nodes and their CPUs; no nodes means the kernel shows no NUMA topology."""
    nodes = []
    for path in expand(root, f"{NODE_ROOT}/node[0-9]*"):
        name = os.path.basename(path)
        if not name[4:].isdigit():
            continue
        cpulist = read_attr(root, f"{path}/cpulist") or ""
        nodes.append({"id": int(name[4:]), "cpus": parse_cpu_list(cpulist), "cpulist": cpulist})
    return {"count": len(nodes), "nodes": nodes}


def gpu_facts(root: str) -> list[dict]:
    """PCI display controllers (class 0x03xxxx) with the NUMA node they hang off."""
    gpus = []
    for path in expand(root, f"{PCI_ROOT}/*"):
        pci_class = read_int(root, f"{path}/class")
        if pci_class is None or pci_class >> 16 != PCI_CLASS_DISPLAY:
            continue
        vendor = read_int(root, f"{path}/vendor")
        device = read_int(root, f"{path}/device")
        node = read_int(root, f"{path}/numa_node")
        local = read_attr(root, f"{path}/local_cpulist")
        gpus.append(
            {
                "address": os.path.basename(path),
                "class": f"0x{pci_class:06x}",
                "vendor": f"0x{vendor:04x}" if vendor is not None else None,
                "device": f"0x{device:04x}" if device is not None else None,
                "nvidia": vendor == PCI_VENDOR_NVIDIA,
                # The kernel writes -1 where the platform has no NUMA information.
                "numa_node": node if node is not None and node >= 0 else None,
                "local_cpus": parse_cpu_list(local) if local else [],
            }
        )
    return gpus


def thp_facts(root: str) -> dict:
    """Transparent huge pages: what is selected and offered for ``enabled`` and ``defrag``."""
    facts: dict = {"present": False}
    for name in ("enabled", "defrag"):
        text = read_attr(root, f"{THP_ROOT}/{name}")
        choice = parse_choice(text) if text is not None else None
        facts[name] = choice.selected if choice else None
        facts[f"{name}_offered"] = list(choice.offered or ()) if choice else []
        facts["present"] = facts["present"] or choice is not None
    return facts


def vm_facts(root: str) -> dict:
    """The vm sysctls we touch, as integers, for those the kernel has."""
    values = {}
    for name in VM_SYSCTLS:
        value = read_int(root, f"/proc/sys/vm/{name}")
        if value is not None:
            values[name] = value
    return values


def memory_facts(root: str) -> dict:
    """Total memory from /proc/meminfo, for sizing zram and cgroup limits."""
    total_kb = None
    for line in (read_attr(root, "/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if key == "MemTotal":
            total_kb = int(rest.split()[0])
    return {"total_kb": total_kb, "total_mb": total_kb // 1024 if total_kb is not None else None}


def parse_swaps(text: str) -> list[dict]:
    """Parse /proc/swaps (a header, then name, type, size, used, priority)."""
    devices = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        name = _unescape(fields[0])
        devices.append(
            {
                "name": name,
                "type": fields[1],
                "size_kb": int(fields[2]),
                "used_kb": int(fields[3]),
                "priority": int(fields[4]),
                "zram": os.path.basename(name).startswith("zram"),
            }
        )
    return devices


def swap_facts(root: str) -> dict:
    """Active swap, and whether any of it is zram."""
    devices = parse_swaps(read_attr(root, "/proc/swaps") or "")
    return {
        "devices": devices,
        "total_kb": sum(device["size_kb"] for device in devices),
        "zram": any(device["zram"] for device in devices),
        "disk": any(not device["zram"] for device in devices),
    }


def _block_kind(name: str) -> str:
    for prefix, kind in (
        ("nvme", "nvme"),
        ("mmcblk", "mmc"),
        ("zram", "zram"),
        ("loop", "loop"),
        ("dm-", "dm"),
        ("md", "md"),
        ("vd", "virtio"),
        ("sd", "scsi"),
        ("ram", "ram"),
    ):
        if name.startswith(prefix):
            return kind
    return "other"


def block_facts(root: str) -> list[dict]:
    """Whole block devices with their queue settings; zram devices add size and compressor."""
    devices = []
    for path in expand(root, "/sys/block/*"):
        name = os.path.basename(path)
        scheduler = read_attr(root, f"{path}/queue/scheduler")
        choice = parse_choice(scheduler) if scheduler is not None else None
        rotational = read_int(root, f"{path}/queue/rotational")
        sectors = read_int(root, f"{path}/size")
        device = {
            "name": name,
            "kind": _block_kind(name),
            "rotational": bool(rotational) if rotational is not None else None,
            "removable": bool(read_int(root, f"{path}/removable")),
            "scheduler": choice.selected if choice else None,
            "schedulers_offered": list(choice.offered or ()) if choice else [],
            "read_ahead_kb": read_int(root, f"{path}/queue/read_ahead_kb"),
            "size_bytes": sectors * 512 if sectors is not None else None,
        }
        if device["kind"] == "zram":
            algorithm = read_attr(root, f"{path}/comp_algorithm")
            algorithms = parse_choice(algorithm) if algorithm is not None else None
            device["disksize_bytes"] = read_int(root, f"{path}/disksize")
            device["comp_algorithm"] = algorithms.selected if algorithms else None
        devices.append(device)
    return devices


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Undo the octal escapes /proc uses for spaces and tabs in paths (``\\040``)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mounts(text: str) -> list[dict]:
    """Parse /proc/mounts lines: device, mount point, type, options."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mounts.append(
            {
                "device": _unescape(fields[0]),
                "mountpoint": _unescape(fields[1]),
                "fstype": fields[2],
                "options": fields[3].split(","),
            }
        )
    return mounts


def mount_facts(root: str) -> list[dict]:
    """Mounted filesystems with their options."""
    return parse_mounts(read_attr(root, "/proc/mounts") or "")


_PI_MODEL = re.compile(r"^Raspberry Pi (\d+)")


def board_facts(root: str) -> dict:
    """The device-tree model, and whether (and which) Raspberry Pi this is."""
    model = None
    for path in MODEL_PATHS:
        model = read_attr(root, path)
        if model:
            break
    generation = _PI_MODEL.match(model) if model else None
    return {
        "model": model or None,
        "raspberry_pi": bool(model and model.startswith("Raspberry Pi")),
        "raspberry_pi_generation": int(generation.group(1)) if generation else None,
    }


def decode_throttled(output: str) -> dict:
    """Decode ``vcgencmd get_throttled`` output (``throttled=0x50005``) into named flags."""
    _, _, raw = output.strip().partition("=")
    try:
        value = int(raw, 16)
    except ValueError:
        raise SysfsError(
            f"vcgencmd get_throttled printed '{output.strip()}'; expected 'throttled=0x<hex>'. "
            "Is the firmware too old for get_throttled?"
        ) from None
    now = {name: bool(value >> bit & 1) for bit, name in THROTTLED_BITS.items()}
    occurred = {
        name: bool(value >> (bit + THROTTLED_OCCURRED_SHIFT) & 1) for bit, name in THROTTLED_BITS.items()
    }
    return {"available": True, "raw": raw, "ok": value == 0, "now": now, "since_boot": occurred}


def sched_facts(root: str) -> dict:
    """Real-time throttling: RT tasks may use ``rt_runtime_us`` of every ``rt_period_us`` (-1: no limit)."""
    return {
        "rt_runtime_us": read_int(root, "/proc/sys/kernel/sched_rt_runtime_us"),
        "rt_period_us": read_int(root, "/proc/sys/kernel/sched_rt_period_us"),
    }


def parse_proc_cgroups(text: str) -> dict[str, bool]:
    """Controller name -> enabled, from /proc/cgroups (``#subsys_name hierarchy num_cgroups enabled``)."""
    enabled = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and not line.startswith("#"):
            enabled[fields[0]] = fields[3] == "1"
    return enabled


def cgroup_facts(root: str) -> dict:
    """Which cgroup hierarchy is mounted, the v2 controllers it offers, and whether memory limits work.

    ``memory_controller`` is what the running kernel does, not what a boot file asks for: /proc/cgroups says
    whether the memory controller is enabled (``cgroup_disable=memory`` turns it off), and on a pure cgroup v2
    host it must also be offered at the root. None where neither file says.
    """
    proc = parse_proc_cgroups(read_attr(root, "/proc/cgroups") or "")
    controllers = read_attr(root, f"{CGROUP_ROOT}/cgroup.controllers")
    if controllers is not None:
        facts = {"version": 2, "hybrid": False, "controllers": controllers.split()}
    else:
        unified = read_attr(root, f"{CGROUP_ROOT}/unified/cgroup.controllers")
        present = bool(expand(root, f"{CGROUP_ROOT}/*"))
        facts = {
            "version": 1 if present or unified is not None else None,
            "hybrid": unified is not None,
            "controllers": unified.split() if unified else [],
        }
    memory = proc.get("memory")
    if facts["version"] == 2 and (memory is None or memory):
        memory = "memory" in facts["controllers"]
    facts["memory_controller"] = memory
    facts["enabled"] = proc
    return facts


def _firmware_dir(root: str) -> str | None:
    for directory in FIRMWARE_DIRS:
        if os.path.isfile(host_path(root, f"{directory}/cmdline.txt")):
            return directory
    return None


def boot_facts(root: str) -> dict:
    """The kernel command line the host booted with, its boot files, and whether a reboot is pending.

    A reboot is pending when /run/reboot-required exists, or when cmdline.txt has a token that the running
    kernel's command line lacks (it was edited after boot). A token removed from cmdline.txt cannot be told
    from one the firmware adds, so removals show through /run/reboot-required alone.
    """
    cmdline = read_attr(root, "/proc/cmdline")
    running = tokens(cmdline or "")
    firmware_dir = _firmware_dir(root)
    configured = None
    if firmware_dir:
        configured = (read_attr(root, f"{firmware_dir}/cmdline.txt") or "").partition("\n")[0]
    pending = [
        token
        for token in tokens(configured or "")
        if token not in running and token_key(token) not in REWRITTEN_BY_FIRMWARE
    ]
    flagged = os.path.exists(host_path(root, REBOOT_REQUIRED_FILE))
    reasons = [f"{firmware_dir}/cmdline.txt has {token}, the running kernel does not" for token in pending]
    if flagged:
        reasons.insert(0, f"{REBOOT_REQUIRED_FILE} exists")
    return {
        "cmdline": cmdline,
        "cmdline_tokens": running,
        "firmware_dir": firmware_dir,
        "cmdline_file": configured,
        "cmdline_file_tokens": tokens(configured or ""),
        "cmdline_pending": pending,
        "reboot_required": bool(reasons),
        "reboot_required_reasons": reasons,
    }


def _gigatransfers(text: str | None) -> float | None:
    match = re.match(r"^([0-9.]+) GT/s", text or "")
    return float(match.group(1)) if match else None


def nvme_facts(root: str) -> list[dict]:
    """NVMe controllers on PCIe (class 0x0108xx) and the speed and width their link runs at and could run at."""
    drives = []
    for path in expand(root, f"{PCI_ROOT}/*"):
        pci_class = read_int(root, f"{path}/class")
        if pci_class is None or pci_class >> 8 != PCI_CLASS_NVME:
            continue
        link = {}
        for side in ("current", "max"):
            speed = read_attr(root, f"{path}/{side}_link_speed")
            rate = _gigatransfers(speed)
            link[f"{side}_link_speed"] = speed
            link[f"{side}_link_gts"] = rate
            link[f"{side}_link_generation"] = PCIE_GENERATIONS.get(rate) if rate else None
            link[f"{side}_link_width"] = read_int(root, f"{path}/{side}_link_width")
        drives.append({"address": os.path.basename(path), **link})
    return drives


def gather(root: str = "/", throttled_output: str | None = None) -> dict:
    """All tuning facts of the host below ``root``.

    ``throttled_output`` is what ``vcgencmd get_throttled`` printed, or None where it is absent.
    """
    cpu = cpu_facts(root)
    throttled: dict = {"available": False}
    if throttled_output is not None:
        try:
            throttled = decode_throttled(throttled_output)
        except SysfsError as exc:
            throttled = {"available": False, "error": str(exc)}
    gpus = gpu_facts(root)
    return {
        "root": root,
        "cpu": cpu,
        "cpufreq": cpufreq_facts(cpu["cpus"]),
        "numa": numa_facts(root),
        "gpus": gpus,
        "nvidia_gpus": [gpu for gpu in gpus if gpu["nvidia"]],
        "thp": thp_facts(root),
        "vm": vm_facts(root),
        "memory": memory_facts(root),
        "swap": swap_facts(root),
        "block": block_facts(root),
        "mounts": mount_facts(root),
        "board": board_facts(root),
        "throttled": throttled,
        "sched": sched_facts(root),
        "cgroup": cgroup_facts(root),
        "boot": boot_facts(root),
        "nvme": nvme_facts(root),
    }
