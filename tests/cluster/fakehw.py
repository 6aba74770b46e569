"""Fake hardware at file level: a tree of sysfs/procfs look-alikes per host, bound over the real paths.

The harness builds the tree on the controller before each boot of a host (so every boot starts from factory
values, as real hardware does) and writes a mount plan next to it. Inside the host, the image's
``llmfleet-fakehw.service`` binds the tree over the kernel's paths before ``sysinit.target``: directories
read-only, the settings that roles change as writable files. Nothing the host writes reaches the controller's
kernel: every fake file is a plain file under the host's state directory, and what is not faked stays on the
read-only /sys and /proc/sys that systemd-nspawn gives a container.

A plain file is not a kernel attribute: writing "madvise" to it reads back "madvise", not
"always [madvise] never". The supervisor therefore watches the writable files (see ``settings_watch``) and
rewrites each after a write the way the kernel would show it, or back to its old value for a value the
kernel would refuse. ``Setting`` holds those rules.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests import fakehw as unit_fakehw
from tests.cluster import config
from tests.cluster.config import Host

PLAN_FILE = "mounts"


@dataclass(frozen=True)
class Setting:
    """A writable fake file and how the kernel shows it and treats a write to it."""

    path: str
    factory: str
    # A selection file offers these values; without choices the file holds one integer.
    choices: tuple[str, ...] = ()
    # Selection files such as THP's show every choice with the current one in [brackets].
    bracketed: bool = False
    minimum: int | None = None
    maximum: int | None = None
    # Writing a non-zero value zeroes this other setting, like vm.dirty_bytes does to vm.dirty_ratio.
    clears: str | None = None

    def render(self, value: str) -> str:
        if self.bracketed:
            return " ".join(f"[{c}]" if c == value else c for c in self.choices) + "\n"
        return f"{value}\n"

    def accept(self, written: str) -> str | None:
        """The value the kernel would take from the bytes `written`, or None if it refuses them (EINVAL)."""
        token = written.strip()
        if self.choices:
            if token in self.choices:
                return token
            # Writing back what was read (the bracketed list) selects the bracketed choice.
            echoed = [choice for choice in self.choices if self.render(choice).strip() == token]
            return echoed[0] if self.bracketed and echoed else None
        if not re.fullmatch(r"-?[0-9]+", token):
            return None
        number = int(token)
        if (self.minimum is not None and number < self.minimum) or (
            self.maximum is not None and number > self.maximum
        ):
            return None
        return str(number)

    def written_value(self, before: str, after: str) -> str | None:
        """What a writer wrote, given the file before and after, as the value the kernel would take.

        The kernel sees each write on its own; a plain file keeps what the write did not cover. A writer that
        truncates (sysctl -w, a shell redirection) leaves just its bytes. One that does not (systemd-sysctl,
        systemd-tmpfiles) leaves its bytes followed by the rest of the old content: the written part is then
        the longest valid prefix after which the file is unchanged.
        """
        whole = self.accept(after)
        if whole is not None or len(after) != len(before):
            return whole
        for end in range(len(after) - 1, 0, -1):
            if after[end:] == before[end:]:
                value = self.accept(after[:end])
                if value is not None:
                    return value
        return None


@dataclass(frozen=True)
class CpuFreq:
    driver: str
    governors: tuple[str, ...]
    governor: str
    min_khz: int
    max_khz: int
    step_khz: int
    # One policy for all CPUs (Raspberry Pi 5: a single cluster) or one per CPU (typical x86).
    shared_policy: bool


@dataclass(frozen=True)
class PciDevice:
    address: str
    vendor: int
    device: int
    pci_class: int
    numa_node: int


@dataclass(frozen=True)
class Board:
    cpufreq: CpuFreq
    min_free_kbytes: int
    model: str | None = None
    cpu_capacity: int | None = None
    numa_nodes: int = 1
    gpus: tuple[PciDevice, ...] = ()
    extra_settings: tuple[Setting, ...] = ()
    # Raspberry Pi firmware: the kernel command line, the memory controller and the NVMe link follow the
    # host's /boot/firmware files at each boot, as the firmware and kernel of a Pi make them.
    pi_firmware: bool = False


BOARDS: dict[str, Board] = {
    "pi5": Board(
        model="Raspberry Pi 5 Model B Rev 1.0",
        cpu_capacity=1024,
        min_free_kbytes=16384,
        pi_firmware=True,
        cpufreq=CpuFreq(
            driver="cpufreq-dt",
            governors=("ondemand", "performance", "powersave"),
            governor="ondemand",
            min_khz=1500000,
            max_khz=2400000,
            step_khz=100000,
            shared_policy=True,
        ),
    ),
    "gpu": Board(
        numa_nodes=2,
        min_free_kbytes=67584,
        gpus=(PciDevice("0000:41:00.0", vendor=0x10DE, device=0x27B8, pci_class=0x030200, numa_node=1),),
        cpufreq=CpuFreq(
            driver="acpi-cpufreq",
            governors=("conservative", "ondemand", "userspace", "powersave", "performance", "schedutil"),
            governor="schedutil",
            min_khz=1500000,
            max_khz=3500000,
            step_khz=500000,
            shared_policy=False,
        ),
        extra_settings=(Setting("/proc/sys/kernel/numa_balancing", "1", minimum=0, maximum=3),),
    ),
}


def vm_settings(board: Board) -> tuple[Setting, ...]:
    """The vm.* sysctls every host fakes, at the Linux defaults."""
    vm = "/proc/sys/vm/"
    percent = {"minimum": 0, "maximum": 100}
    return (
        Setting(vm + "swappiness", "60", minimum=0, maximum=200),
        Setting(vm + "dirty_ratio", "20", clears=vm + "dirty_bytes", **percent),
        Setting(vm + "dirty_bytes", "0", clears=vm + "dirty_ratio", minimum=0),
        Setting(vm + "dirty_background_ratio", "10", clears=vm + "dirty_background_bytes", **percent),
        Setting(vm + "dirty_background_bytes", "0", clears=vm + "dirty_background_ratio", minimum=0),
        Setting(vm + "dirty_expire_centisecs", "3000", minimum=0),
        Setting(vm + "dirty_writeback_centisecs", "500", minimum=0),
        Setting(vm + "vfs_cache_pressure", "100", minimum=0),
        Setting(vm + "min_free_kbytes", str(board.min_free_kbytes), minimum=0),
        Setting(vm + "watermark_scale_factor", "10", minimum=1, maximum=3000),
        Setting(vm + "overcommit_memory", "0", minimum=0, maximum=2),
        Setting(vm + "overcommit_ratio", "50", minimum=0),
        Setting(vm + "max_map_count", "65530", minimum=0),
        Setting(vm + "page-cluster", "3", minimum=0),
        Setting(vm + "zone_reclaim_mode", "0", minimum=0),
        Setting(vm + "nr_hugepages", "0", minimum=0),
        Setting(vm + "compaction_proactiveness", "20", **percent),
        Setting(vm + "stat_interval", "1", minimum=1),
    )


THP_DIR = "/sys/kernel/mm/transparent_hugepage/"
THP_SETTINGS = (
    Setting(THP_DIR + "enabled", "always", choices=("always", "madvise", "never"), bracketed=True),
    Setting(
        THP_DIR + "defrag",
        "madvise",
        choices=("always", "defer", "defer+madvise", "madvise", "never"),
        bracketed=True,
    ),
)


def block_settings(device: str) -> tuple[Setting, ...]:
    queue = f"/sys/devices/virtual/block/{device}/queue/"
    return (
        Setting(queue + "scheduler", "none", choices=("none", "mq-deadline", "kyber", "bfq"), bracketed=True),
        Setting(queue + "read_ahead_kb", "128", minimum=0),
        Setting(queue + "nr_requests", "128", minimum=4),
    )


def parse_cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def format_cpulist(cpus: list[int]) -> str:
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu == int(ranges[-1].split("-")[-1]) + 1:
            ranges[-1] = f"{ranges[-1].split('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


def format_cpumask(cpus: list[int], nr_cpus: int) -> str:
    mask = sum(1 << cpu for cpu in cpus)
    digits = max(1, math.ceil(nr_cpus / 4))
    text = format(mask, f"0{digits}x")
    groups = [text[max(0, end - 8) : end] for end in range(len(text), 0, -8)]
    return ",".join(reversed(groups))


def split_nodes(cpus: list[int], nodes: int) -> list[list[int]]:
    """Share the real CPUs out over the fake NUMA nodes, in order, the first nodes taking any remainder."""
    size = math.ceil(len(cpus) / nodes)
    return [cpus[i * size : (i + 1) * size] for i in range(nodes)]


def serial_number(host: Host) -> str:
    return hashlib.sha256(host.name.encode()).hexdigest()[:16]


@dataclass
class FakeHardware:
    """A host's fake tree on the controller: where it is, its mount plan and its writable settings."""

    root: Path
    plan: list[str] = field(default_factory=list)
    settings: dict[Path, Setting] = field(default_factory=dict)

    def at(self, target: str) -> Path:
        return self.root / target.lstrip("/")

    def write(self, target: str, text: str | bytes, mode: int = 0o444) -> None:
        path = self.at(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, str):
            text = text.encode()
        path.write_bytes(text)
        path.chmod(mode)

    def symlink(self, target: str, link: str) -> None:
        path = self.at(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(link)

    def copy_real(self, target: str) -> None:
        """Copy a sysfs directory as it is on the controller: readable files, directories, symlinks."""
        _copy_sysfs(Path(target), self.at(target))

    def bind_read_only(self, target: str) -> None:
        self.plan.append(f"ro {target}")

    def add_setting(self, setting: Setting) -> None:
        self.write(setting.path, setting.render(setting.factory), 0o644)
        self.settings[self.at(setting.path)] = setting

    def add_link(self, target: str, link: str) -> None:
        self.plan.append(f"link {target} {link}")

    def write_plan(self) -> None:
        # Directories first, then the writable files inside them, then the device links.
        lines = [line for line in self.plan if line.startswith("ro ")]
        lines += [f"rw /{path.relative_to(self.root)}" for path in self.settings]
        lines += [line for line in self.plan if line.startswith("link ")]
        self.write(PLAN_FILE, "\n".join(lines) + "\n")


def _copy_sysfs(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with os.scandir(source) as entries:
        for entry in entries:
            target = dest / entry.name
            if entry.is_symlink():
                target.symlink_to(os.readlink(entry.path))
            elif entry.is_dir():
                _copy_sysfs(Path(entry.path), target)
            else:
                try:
                    with open(entry.path, "rb") as handle:
                        data = handle.read(65536)
                except OSError:
                    continue  # write-only or unreadable attributes have nothing to show
                target.write_bytes(data)
                target.chmod(stat.S_IMODE(entry.stat().st_mode))


def real_cpus() -> list[int]:
    return parse_cpulist(Path("/sys/devices/system/cpu/online").read_text())


def boot_files(host: Host) -> dict[str, str]:
    """The boot files a new host's disk starts with: Raspberry Pi OS's on a Pi, none elsewhere."""
    if not BOARDS[host.board].pi_firmware:
        return {}
    return {
        "boot/firmware/cmdline.txt": unit_fakehw.PI5_CMDLINE_TXT,
        "boot/firmware/config.txt": unit_fakehw.PI5_CONFIG_TXT,
    }


@dataclass(frozen=True)
class PiBoot:
    """What a Pi's firmware and kernel make of its boot files."""

    cmdline: str
    memory_controller: bool
    pcie_gen: int
    default_governor: str | None

    @classmethod
    def read(cls, boot_dir: Path) -> PiBoot:
        try:
            line = (boot_dir / "cmdline.txt").read_text(errors="replace").partition("\n")[0].strip()
        except OSError:
            line = ""
        try:
            config_lines = (boot_dir / "config.txt").read_text(errors="replace").splitlines()
        except OSError:
            config_lines = []
        cmdline = f"{unit_fakehw.PI5_FIRMWARE_CMDLINE} {line}".strip()
        memory, governor = True, None
        # The kernel reads its command line left to right: the last word on the memory controller wins.
        for token in cmdline.split():
            if token in ("cgroup_disable=memory", "cgroup_enable=memory"):
                memory = token == "cgroup_enable=memory"
            elif token.startswith("cpufreq.default_governor="):
                governor = token.partition("=")[2]
        # The last dtparam=pciex1_gen= wins; filters other than [all] and [pi5] do not apply to a Pi 5.
        gen, applies = 2, True
        for raw in config_lines:
            text = raw.split("#", 1)[0].strip()
            if text.startswith("[") and text.endswith("]"):
                applies = text in ("[all]", "[pi5]")
            elif applies and re.fullmatch(r"dtparam=pciex1_gen=[123]", text):
                gen = int(text[-1])
        return cls(cmdline, memory, gen, governor)


def _add_pi_boot(hw: FakeHardware, boot: PiBoot) -> None:
    hw.write("/proc/cmdline", boot.cmdline + "\n")
    hw.bind_read_only("/proc/cmdline")
    rows = []
    for line in Path("/proc/cgroups").read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == "memory" and len(fields) == 4:
            fields[3] = "1" if boot.memory_controller else "0"
        rows.append("\t".join(fields))
    hw.write("/proc/cgroups", "\n".join(rows) + "\n")
    hw.bind_read_only("/proc/cgroups")
    # The NVMe drive on the external connector: a gen 3 x4 drive on the Pi's x1 link.
    speed = {1: "2.5 GT/s PCIe", 2: "5.0 GT/s PCIe", 3: "8.0 GT/s PCIe"}[boot.pcie_gen]
    directory = f"/sys/bus/pci/devices/{unit_fakehw.PI5_NVME_ADDRESS}"
    for name, value in {
        "class": "0x010802",
        "vendor": "0x144d",
        "device": "0xa80a",
        "numa_node": "-1",
        "current_link_speed": speed,
        "current_link_width": "1",
        "max_link_speed": "8.0 GT/s PCIe",
        "max_link_width": "4",
    }.items():
        hw.write(f"{directory}/{name}", f"{value}\n")
    hw.bind_read_only("/sys/bus/pci/devices")


def build(
    host: Host, root: Path, model_device: str | None = None, boot_dir: Path | None = None
) -> FakeHardware:
    """Build the host's fake tree under `root` at factory values; return it with its plan written.

    On a Pi the kernel command line, memory controller and NVMe link follow the boot files in `boot_dir`
    (the host's /boot/firmware), so an edit of them shows after the next reboot and not before.
    """
    board = BOARDS[host.board]
    hw = FakeHardware(root)
    cpus = real_cpus()
    nodes = split_nodes(cpus, board.numa_nodes)
    boot = PiBoot.read(boot_dir) if board.pi_firmware and boot_dir is not None else None
    if boot and boot.default_governor in board.cpufreq.governors:
        board = replace(board, cpufreq=replace(board.cpufreq, governor=boot.default_governor))
    _add_cpus(hw, board, cpus, nodes)
    if board.numa_nodes > 1:
        _add_numa(hw, cpus, nodes)
    if board.model:
        _add_devicetree(hw, host, board.model)
        _add_arm_cpuinfo(hw, host, board.model, cpus)
    if board.gpus:
        _add_pci(hw, board.gpus, nodes, len(cpus))
    if boot:
        _add_pi_boot(hw, boot)
    settings = (*THP_SETTINGS, *vm_settings(board), *board.extra_settings)
    if model_device:
        settings += block_settings(model_device)
        hw.add_link(f"/dev/disk/by-label/{config.MODEL_VOLUME_LABEL}", f"../../{model_device}")
    for setting in settings:
        # A kernel without the knob (no NUMA balancing, say) has no path to bind over.
        if Path(setting.path).exists():
            hw.add_setting(setting)
    hw.write_plan()
    return hw


def _add_cpus(hw: FakeHardware, board: Board, cpus: list[int], nodes: list[list[int]]) -> None:
    base = "/sys/devices/system/cpu"
    hw.copy_real(base)
    hw.bind_read_only(base)
    freq = board.cpufreq
    policies = [cpus] if freq.shared_policy else [[cpu] for cpu in cpus]
    frequencies = " ".join(str(f) for f in range(freq.min_khz, freq.max_khz + 1, freq.step_khz))
    for policy_cpus in policies:
        policy = f"{base}/cpufreq/policy{policy_cpus[0]}"
        listed = " ".join(str(cpu) for cpu in policy_cpus)
        static = {
            "affected_cpus": listed,
            "related_cpus": listed,
            "cpuinfo_max_freq": freq.max_khz,
            "cpuinfo_min_freq": freq.min_khz,
            "cpuinfo_cur_freq": freq.min_khz,
            "cpuinfo_transition_latency": 355000,
            "scaling_available_frequencies": frequencies,
            "scaling_available_governors": " ".join(freq.governors),
            "scaling_cur_freq": freq.min_khz,
            "scaling_driver": freq.driver,
            "scaling_setspeed": "<unsupported>",
        }
        for name, value in static.items():
            hw.write(f"{policy}/{name}", f"{value}\n")
        limits = {"minimum": freq.min_khz, "maximum": freq.max_khz}
        hw.add_setting(Setting(f"{policy}/scaling_governor", freq.governor, choices=freq.governors))
        hw.add_setting(Setting(f"{policy}/scaling_min_freq", str(freq.min_khz), **limits))
        hw.add_setting(Setting(f"{policy}/scaling_max_freq", str(freq.max_khz), **limits))
        for cpu in policy_cpus:
            hw.symlink(f"{base}/cpu{cpu}/cpufreq", f"../cpufreq/policy{policy_cpus[0]}")
    for node, node_cpus in enumerate(nodes):
        for cpu in node_cpus:
            for old in hw.at(f"{base}/cpu{cpu}").glob("node*"):
                old.unlink()
            hw.symlink(f"{base}/cpu{cpu}/node{node}", f"../../node/node{node}")
    if board.cpu_capacity is not None:
        for cpu in cpus:
            hw.write(f"{base}/cpu{cpu}/cpu_capacity", f"{board.cpu_capacity}\n")


def _add_numa(hw: FakeHardware, cpus: list[int], nodes: list[list[int]]) -> None:
    base = "/sys/devices/system/node"
    all_nodes = format_cpulist(list(range(len(nodes))))
    for name in ("online", "possible", "has_cpu", "has_memory", "has_normal_memory"):
        hw.write(f"{base}/{name}", f"{all_nodes}\n")
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    total_kb = int(meminfo["MemTotal"].split()[0]) // len(nodes)
    free_kb = int(meminfo["MemFree"].split()[0]) // len(nodes)
    for node, node_cpus in enumerate(nodes):
        directory = f"{base}/node{node}"
        hw.write(f"{directory}/cpulist", f"{format_cpulist(node_cpus)}\n")
        hw.write(f"{directory}/cpumap", f"{format_cpumask(node_cpus, len(cpus))}\n")
        distances = " ".join("10" if other == node else "21" for other in range(len(nodes)))
        hw.write(f"{directory}/distance", f"{distances}\n")
        hw.write(
            f"{directory}/meminfo",
            f"Node {node} MemTotal:       {total_kb} kB\n"
            f"Node {node} MemFree:        {free_kb} kB\n"
            f"Node {node} MemUsed:        {total_kb - free_kb} kB\n"
            f"Node {node} HugePages_Total:     0\n"
            f"Node {node} HugePages_Free:      0\n",
        )
        for cpu in node_cpus:
            hw.symlink(f"{directory}/cpu{cpu}", f"../../cpu/cpu{cpu}")
    hw.bind_read_only(base)


def _add_devicetree(hw: FakeHardware, host: Host, model: str) -> None:
    # A Raspberry Pi has a device tree and no ACPI, so its whole /sys/firmware is replaced. The kernel's
    # device-tree strings end in NUL, not a newline. (/proc/device-tree, a symlink to this directory on a
    # Pi, cannot be made: no file can be added to procfs.)
    base = "/sys/firmware/devicetree/base"
    hw.write(f"{base}/model", f"{model}\0")
    hw.write(f"{base}/compatible", "raspberrypi,5-model-b\0brcm,bcm2712\0")
    hw.write(f"{base}/serial-number", f"{serial_number(host)}\0")
    hw.write(f"{base}/name", "\0")
    hw.bind_read_only("/sys/firmware")


def _add_arm_cpuinfo(hw: FakeHardware, host: Host, model: str, cpus: list[int]) -> None:
    blocks = [
        f"processor\t: {cpu}\n"
        "BogoMIPS\t: 108.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
        "dcpop asimddp\n"
        "CPU implementer\t: 0x41\n"
        "CPU architecture: 8\n"
        "CPU variant\t: 0x4\n"
        "CPU part\t: 0xd0b\n"
        "CPU revision\t: 1\n"
        for cpu in cpus
    ]
    trailer = f"Revision\t: d04170\nSerial\t\t: {serial_number(host)}\nModel\t\t: {model}\n"
    hw.write("/proc/cpuinfo", "\n".join(blocks) + "\n" + trailer)
    hw.bind_read_only("/proc/cpuinfo")


def _add_pci(hw: FakeHardware, gpus: tuple[PciDevice, ...], nodes: list[list[int]], nr_cpus: int) -> None:
    base = "/sys/bus/pci/devices"
    hw.copy_real(base)
    for gpu in gpus:
        directory = f"{base}/{gpu.address}"
        local = nodes[gpu.numa_node]
        attributes = {
            "vendor": f"0x{gpu.vendor:04x}",
            "device": f"0x{gpu.device:04x}",
            "subsystem_vendor": f"0x{gpu.vendor:04x}",
            "subsystem_device": "0x16ca",
            "class": f"0x{gpu.pci_class:06x}",
            "numa_node": str(gpu.numa_node),
            "local_cpulist": format_cpulist(local),
            "local_cpus": format_cpumask(local, nr_cpus),
            "enable": "1",
            "irq": "0",
            "current_link_speed": "16.0 GT/s PCIe",
            "current_link_width": "16",
            "max_link_speed": "16.0 GT/s PCIe",
            "max_link_width": "16",
            "uevent": (
                f"DRIVER=nvidia\nPCI_CLASS={gpu.pci_class:X}\n"
                f"PCI_ID={gpu.vendor:04X}:{gpu.device:04X}\nPCI_SLOT_NAME={gpu.address}"
            ),
        }
        for name, value in attributes.items():
            hw.write(f"{directory}/{name}", f"{value}\n")
    hw.bind_read_only(base)
