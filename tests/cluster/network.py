"""The private network: a bridge on the controller, one network namespace per host, nothing routed out.

Each host's namespace is made here, not by systemd-nspawn, so that it (with its address) outlives a reboot of
the container. Hosts get no default route, and an nftables table drops anything the controller would forward
between the bridge and another interface, and any new connection from the bridge to the controller itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.cluster import config
from tests.cluster.config import Host
from tests.cluster.system import run

NETNS_DIR = Path("/run/netns")


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _addresses(name: str, netns: str | None = None) -> list[str]:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    result = run([*prefix, "-j", "-4", "addr", "show", "dev", name], check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(result.stdout) for a in link["addr_info"]]


def nft_ruleset() -> str:
    bridge = config.BRIDGE
    return f"""table inet {config.NFT_TABLE} {{
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "{bridge}" oifname != "{bridge}" drop
        oifname "{bridge}" iifname != "{bridge}" drop
    }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname "{bridge}" ct state established,related accept
        iifname "{bridge}" meta l4proto {{ icmp, ipv6-icmp }} accept
        iifname "{bridge}" drop
    }}
}}
"""


def nft_table_present() -> bool:
    return run(["nft", "list", "table", "inet", config.NFT_TABLE], check=False).returncode == 0


def ensure_bridge() -> bool:
    """Create the bridge and its firewall table if missing; return whether anything changed."""
    changed = False
    bridge_address = f"{config.BRIDGE_ADDRESS}/{config.PREFIX_LENGTH}"
    if not link_exists(config.BRIDGE):
        run(["ip", "link", "add", config.BRIDGE, "type", "bridge"])
        # Hosts still running keep their veths; a new bridge must take them back.
        for host in config.HOSTS:
            if link_exists(host.veth):
                run(["ip", "link", "set", host.veth, "master", config.BRIDGE])
        changed = True
    if bridge_address not in _addresses(config.BRIDGE):
        run(["ip", "addr", "flush", "dev", config.BRIDGE])
        run(["ip", "addr", "add", bridge_address, "dev", config.BRIDGE])
        changed = True
    run(["ip", "link", "set", config.BRIDGE, "up"])
    if not nft_table_present():
        run(["nft", "-f", "-"], input_text=nft_ruleset())
        changed = True
    return changed


def remove_bridge() -> None:
    if nft_table_present():
        run(["nft", "delete", "table", "inet", config.NFT_TABLE])
    if link_exists(config.BRIDGE):
        run(["ip", "link", "del", config.BRIDGE])


def netns_path(host: Host) -> Path:
    return NETNS_DIR / host.netns


def host_network_ready(host: Host) -> bool:
    return (
        netns_path(host).exists()
        and link_exists(host.veth)
        and f"{host.address}/{config.PREFIX_LENGTH}" in _addresses("eth0", host.netns)
    )


def ensure_host_network(host: Host) -> bool:
    """Give the host its namespace, a veth on the bridge and its address; return whether anything changed."""
    if host_network_ready(host):
        return False
    remove_host_network(host)
    run(["ip", "netns", "add", host.netns])
    run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns])
    run(["ip", "link", "set", host.veth, "master", config.BRIDGE, "up"])
    inside = ["ip", "-n", host.netns]
    run([*inside, "link", "set", "eth0", "address", host.mac])
    run([*inside, "addr", "add", f"{host.address}/{config.PREFIX_LENGTH}", "dev", "eth0"])
    run([*inside, "link", "set", "eth0", "up"])
    run([*inside, "link", "set", "lo", "up"])
    return True


def remove_host_network(host: Host) -> None:
    if link_exists(host.veth):
        run(["ip", "link", "del", host.veth])
    if netns_path(host).exists():
        run(["ip", "netns", "del", host.netns], check=False)
    # A namespace file left behind by a crash (the bind mount gone, the file not) blocks `ip netns add`.
    if netns_path(host).exists():
        run(["umount", "-l", netns_path(host)], check=False)
        netns_path(host).unlink(missing_ok=True)
