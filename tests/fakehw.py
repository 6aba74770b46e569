"""Fake sysfs and procfs trees of the boards the project tunes, for tests.

Each builder lays out, below a root directory, the files the kernel of that machine shows, with
the same shapes: per-CPU ``cpufreq`` links into shared ``policyN`` directories, bracketed choices,
NUL-terminated device-tree strings. Tests pass the root to ``tuning_facts`` and ``sysfs_attr``.
"""

from __future__ import annotations

import os
from pathlib import Path

CPU = "sys/devices/system/cpu"

PI5_MODEL = "Raspberry Pi 5 Model B Rev 1.0"
RK3588_MODEL = "Radxa ROCK 5 Model B"
NVIDIA_GPU_ADDRESS = "0000:81:00.0"
# The Pi 5's external PCIe connector is domain 0001; its NVMe drive sits at bus 1.
PI5_NVME_ADDRESS = "0001:01:00.0"

# Raspberry Pi OS 12 as installed: cmdline.txt (one line) and config.txt (its filters end in [all]).
PI5_CMDLINE_TXT = (
    "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait "
    "quiet splash plymouth.ignore-serial-consoles\n"
)
PI5_CONFIG_TXT = """# For more options and information see
# http://rptl.io/configtxt
# Some settings may impact device functionality. See link above for details

# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=i2s=on
#dtparam=spi=on

# Enable audio (loads snd_bcm2835)
dtparam=audio=on

# Automatically load overlays for detected cameras
camera_auto_detect=1

# Automatically load overlays for detected DSI displays
display_auto_detect=1

# Automatically load initramfs files, if found
auto_initramfs=1

# Enable DRM VC4 V3D driver
dtoverlay=vc4-kms-v3d
max_framebuffers=2

# Don't have the firmware create an initial video= setting in cmdline.txt.
# Use the kernel's default instead.
disable_fw_kms_setup=1

# Run in 64-bit mode
arm_64bit=1

# Disable compensation for displays with overscan
disable_overscan=1

# Run as fast as firmware / board allows
arm_boost=1

[cm4]
# Enable host mode on the 2711 built-in XHCI USB controller.
# This line should be removed if the legacy DWC2 controller is required
# (e.g. for USB device mode) or if USB support is not required.
otg_mode=1

[cm5]
dtoverlay=dwc2,dr_mode=host

[all]
"""
# What the Pi 5 firmware puts before cmdline.txt's line; it turns the memory cgroup controller off.
PI5_FIRMWARE_CMDLINE = (
    "reboot=w coherent_pool=1M 8250.nr_uarts=1 pci=pcie_bus_safe cgroup_disable=memory numa_policy=interleave "
    "smsc95xx.macaddr=2C:CF:67:00:00:01 vc_mem.mem_base=0x3fc00000 vc_mem.mem_size=0x40000000"
)
PROC_CGROUPS_HEADER = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
CGROUP_V2_CONTROLLERS = (
    "cpuset",
    "cpu",
    "cpuacct",
    "blkio",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
)
BMC_VGA_ADDRESS = "0000:02:00.0"


class FakeHost:
    """A fake root directory and the helpers that fill it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def write(self, path: str, text: str) -> Path:
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text if text.endswith(("\n", "\x00")) else text + "\n")
        return target

    def read(self, path: str) -> str:
        return self.path(path).read_text().strip()

    def remove(self, path: str) -> None:
        self.path(path).unlink()

    def link(self, path: str, target: str) -> None:
        link = self.path(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)

    def cpus(self, online: str, capacities: dict[int, int] | None = None) -> None:
        self.write(f"{CPU}/online", online)
        self.write(f"{CPU}/possible", online)
        self.write(f"{CPU}/present", online)
        for cpu, capacity in (capacities or {}).items():
            self.write(f"{CPU}/cpu{cpu}/cpu_capacity", str(capacity))

    def cpufreq_policy(
        self,
        policy: int,
        cpus: list[int],
        governors: str,
        governor: str,
        driver: str,
        min_khz: int,
        max_khz: int,
    ) -> None:
        base = f"{CPU}/cpufreq/policy{policy}"
        listed = " ".join(str(cpu) for cpu in cpus)
        for name, value in (
            ("scaling_available_governors", governors),
            ("scaling_governor", governor),
            ("scaling_driver", driver),
            ("cpuinfo_min_freq", str(min_khz)),
            ("cpuinfo_max_freq", str(max_khz)),
            ("scaling_min_freq", str(min_khz)),
            ("scaling_max_freq", str(max_khz)),
            ("related_cpus", listed),
            ("affected_cpus", listed),
        ):
            self.write(f"{base}/{name}", value)
        for cpu in cpus:
            self.link(f"{CPU}/cpu{cpu}/cpufreq", f"../cpufreq/policy{policy}")

    def take_offline(self, *cpus: int) -> None:
        """Take CPUs offline as ``chcpu -d`` does: they leave ``online``, and a cpufreq policy left without an
        online CPU turns inactive, whose attributes the kernel refuses to read (EBUSY). A plain file cannot
        refuse a read, so each attribute of such a policy becomes a directory, which fails every read."""
        online = [int(cpu) for cpu in _cpu_list(self.read(f"{CPU}/online")) if int(cpu) not in cpus]
        self.write(f"{CPU}/online", ",".join(str(cpu) for cpu in online) or "")
        policies = self.path(f"{CPU}/cpufreq")
        for policy in sorted(policies.glob("policy*")) if policies.is_dir() else []:
            related = [int(cpu) for cpu in (policy / "related_cpus").read_text().split()]
            if any(cpu in online for cpu in related):
                continue
            for attribute in list(policy.iterdir()):
                if attribute.name in ("related_cpus", "affected_cpus"):
                    continue
                attribute.unlink()
                attribute.mkdir()

    def thp(
        self,
        enabled: str = "always [madvise] never",
        defrag: str = "always defer defer+madvise [madvise] never",
    ):
        self.write("sys/kernel/mm/transparent_hugepage/enabled", enabled)
        self.write("sys/kernel/mm/transparent_hugepage/defrag", defrag)

    def vm(self) -> None:
        """The vm sysctls at the kernel's defaults, and RT throttling at 95 %."""
        for name, value in (
            ("swappiness", 60),
            ("dirty_ratio", 20),
            ("dirty_background_ratio", 10),
            ("dirty_bytes", 0),
            ("dirty_background_bytes", 0),
            ("vfs_cache_pressure", 100),
            ("page-cluster", 3),
            ("min_free_kbytes", 67584),
            ("overcommit_memory", 0),
        ):
            self.write(f"proc/sys/vm/{name}", str(value))
        self.write("proc/sys/kernel/sched_rt_runtime_us", "950000")
        self.write("proc/sys/kernel/sched_rt_period_us", "1000000")

    def meminfo(self, total_kb: int) -> None:
        self.write("proc/meminfo", f"MemTotal:       {total_kb} kB\nMemFree:        {total_kb // 2} kB\n")

    def swaps(self, *lines: str) -> None:
        header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        self.write("proc/swaps", header + "".join(f"{line}\n" for line in lines))

    def mounts(self, *lines: str) -> None:
        self.write("proc/mounts", "".join(f"{line}\n" for line in lines))

    def block(
        self,
        name: str,
        scheduler: str,
        rotational: int = 0,
        read_ahead_kb: int = 128,
        sectors: int = 1953525168,
        removable: int = 0,
    ) -> None:
        base = f"sys/block/{name}"
        self.write(f"{base}/queue/scheduler", scheduler)
        self.write(f"{base}/queue/rotational", str(rotational))
        self.write(f"{base}/queue/read_ahead_kb", str(read_ahead_kb))
        self.write(f"{base}/size", str(sectors))
        self.write(f"{base}/removable", str(removable))

    def pci(
        self, address: str, pci_class: str, vendor: str, device: str, numa_node: int, local: str = ""
    ) -> None:
        base = f"sys/bus/pci/devices/{address}"
        self.write(f"{base}/class", pci_class)
        self.write(f"{base}/vendor", vendor)
        self.write(f"{base}/device", device)
        self.write(f"{base}/numa_node", str(numa_node))
        if local:
            self.write(f"{base}/local_cpulist", local)

    def model(self, model: str, path: str = "proc/device-tree/model") -> None:
        self.write(path, model + "\x00")

    def cgroup2(self, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> None:
        self.write("sys/fs/cgroup/cgroup.controllers", controllers)

    def proc_cgroups(self, disabled: tuple[str, ...] = ()) -> None:
        """/proc/cgroups of a cgroup v2 kernel: every controller on hierarchy 0, enabled unless disabled."""
        rows = "".join(f"{name}\t0\t1\t{0 if name in disabled else 1}\n" for name in CGROUP_V2_CONTROLLERS)
        self.write("proc/cgroups", PROC_CGROUPS_HEADER + rows)

    def pi_boot(self, cmdline_txt: str = PI5_CMDLINE_TXT, config_txt: str = PI5_CONFIG_TXT) -> None:
        """A Pi booted from these boot files: /proc/cmdline and /proc/cgroups as its kernel shows them.

        The kernel reads its command line left to right, so the last of cgroup_disable=memory (the
        firmware's) and cgroup_enable=memory decides.
        """
        self.write("boot/firmware/cmdline.txt", cmdline_txt)
        self.write("boot/firmware/config.txt", config_txt)
        line = f"{PI5_FIRMWARE_CMDLINE} {cmdline_txt.splitlines()[0].strip()}"
        self.write("proc/cmdline", line)
        self.path("run").mkdir(parents=True, exist_ok=True)
        memory = "on"
        for token in line.split():
            if token in ("cgroup_disable=memory", "cgroup_enable=memory"):
                memory = "off" if token == "cgroup_disable=memory" else "on"
        self.proc_cgroups(disabled=("memory",) if memory == "off" else ())
        offered = "cpuset cpu io memory hugetlb pids rdma misc"
        self.cgroup2(offered if memory == "on" else offered.replace("memory ", ""))
        gen3 = any(line.strip() == "dtparam=pciex1_gen=3" for line in config_txt.splitlines())
        base = f"sys/bus/pci/devices/{PI5_NVME_ADDRESS}"
        self.write(f"{base}/current_link_speed", "8.0 GT/s PCIe" if gen3 else "5.0 GT/s PCIe")
        self.write(f"{base}/current_link_width", "1")
        self.write(f"{base}/max_link_speed", "8.0 GT/s PCIe")
        self.write(f"{base}/max_link_width", "4")


def _cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def raspberry_pi_5(root: Path) -> FakeHost:
    """Four Cortex-A76 on one clock, ondemand governor, NVMe model disk, SD boot card, zram swap."""
    host = FakeHost(root)
    host.cpus("0-3", {cpu: 1024 for cpu in range(4)})
    host.cpufreq_policy(
        0, [0, 1, 2, 3], "ondemand performance powersave", "ondemand", "cpufreq-dt", 1500000, 2400000
    )
    host.model(PI5_MODEL)
    host.thp()
    host.vm()
    host.meminfo(8245740)
    host.block("mmcblk0", "[mq-deadline] none", sectors=62333952, removable=0)
    host.block("nvme0n1", "[none] mq-deadline kyber bfq", read_ahead_kb=128)
    host.block("zram0", "none", sectors=8052480)
    host.write("sys/block/zram0/disksize", str(8052480 * 512))
    host.write("sys/block/zram0/comp_algorithm", "lzo lzo-rle lz4 lz4hc 842 [zstd]")
    host.swaps("/dev/zram0                              partition\t4026236\t\t0\t\t100")
    host.mounts(
        "/dev/mmcblk0p2 / ext4 rw,noatime 0 0",
        "/dev/mmcblk0p1 /boot/firmware vfat rw,relatime,fmask=0022 0 0",
        "/dev/nvme0n1p1 /srv/models ext4 rw,noatime 0 0",
        "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0",
    )
    host.pci(PI5_NVME_ADDRESS, "0x010802", "0x144d", "0xa80a", -1)
    # A Pi whose cmdline.txt already turns the memory controller back on; raspberry_pi_5_stock is one that
    # does not.
    host.pi_boot(cmdline_txt=PI5_CMDLINE_TXT.replace("rootwait", "rootwait cgroup_enable=memory"))
    return host


def raspberry_pi_5_stock(root: Path) -> FakeHost:
    """A Pi 5 on Raspberry Pi OS as installed: memory cgroup controller off, NVMe link at PCIe gen 2."""
    host = raspberry_pi_5(root)
    host.pi_boot()
    return host


def rk3588(root: Path) -> FakeHost:
    """A big.LITTLE board: four Cortex-A55 (capacity 414) and two A76 clusters (1024 and 1002)."""
    host = FakeHost(root)
    capacities = {0: 414, 1: 414, 2: 414, 3: 414, 4: 1024, 5: 1024, 6: 1002, 7: 1002}
    host.cpus("0-7", capacities)
    governors = "conservative ondemand userspace powersave performance schedutil"
    host.cpufreq_policy(0, [0, 1, 2, 3], governors, "schedutil", "cpufreq-dt", 408000, 1800000)
    host.cpufreq_policy(4, [4, 5], governors, "schedutil", "cpufreq-dt", 408000, 2400000)
    host.cpufreq_policy(6, [6, 7], governors, "schedutil", "cpufreq-dt", 408000, 2352000)
    host.model(RK3588_MODEL, "sys/firmware/devicetree/base/model")
    host.thp(enabled="[always] madvise never")
    host.vm()
    host.meminfo(16318344)
    host.block("mmcblk0", "mq-deadline kyber [bfq] none")
    host.swaps()
    host.mounts("/dev/mmcblk0p2 / ext4 rw,relatime 0 0")
    host.cgroup2()
    return host


def x86_two_socket_gpu(root: Path) -> FakeHost:
    """Two sockets of four CPUs (NUMA nodes 0 and 1), intel_pstate, an NVIDIA GPU on node 1, BMC VGA on 0."""
    host = FakeHost(root)
    host.cpus("0-7")
    for cpu in range(8):
        host.cpufreq_policy(cpu, [cpu], "performance powersave", "powersave", "intel_pstate", 800000, 3900000)
        base = f"{CPU}/cpufreq/policy{cpu}"
        host.write(f"{base}/energy_performance_preference", "balance_performance")
        host.write(
            f"{base}/energy_performance_available_preferences",
            "default performance balance_performance balance_power power",
        )
        host.write(f"{CPU}/cpu{cpu}/power/energy_perf_bias", "6")
    host.write("sys/devices/system/node/node0/cpulist", "0-3")
    host.write("sys/devices/system/node/node1/cpulist", "4-7")
    host.write("sys/devices/system/node/online", "0-1")
    host.pci(NVIDIA_GPU_ADDRESS, "0x030200", "0x10de", "0x2330", 1, "4-7")
    host.pci(BMC_VGA_ADDRESS, "0x030000", "0x1a03", "0x2000", 0, "0-3")
    host.pci("0000:c1:00.0", "0x010802", "0x144d", "0xa80a", 1, "4-7")
    host.thp(enabled="[always] madvise never")
    host.vm()
    host.meminfo(263840244)
    host.block("nvme0n1", "[none] mq-deadline", read_ahead_kb=128)
    host.block("sda", "[mq-deadline] none", rotational=1)
    host.swaps("/swap.img                               file\t\t8388604\t\t0\t\t-2")
    host.mounts(
        "/dev/sda2 / ext4 rw,relatime 0 0",
        "/dev/nvme0n1p1 /srv/models xfs rw,noatime,attr2,inode64 0 0",
        "/dev/sda3 /srv/my\\040data ext4 rw,relatime 0 0",
    )
    host.cgroup2()
    return host


BUILDERS = {
    "pi5": raspberry_pi_5,
    "pi5_stock": raspberry_pi_5_stock,
    "rk3588": rk3588,
    "x86": x86_two_socket_gpu,
}


def build(kind: str, root: Path) -> FakeHost:
    """Build the fake host named ``kind`` (``pi5``, ``pi5_stock``, ``rk3588``, ``x86``) below ``root``."""
    os.makedirs(root, exist_ok=True)
    return BUILDERS[kind](Path(root))
