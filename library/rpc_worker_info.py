#!/usr/bin/python
"""Ask a llama.cpp RPC worker for its protocol version, devices and free memory, and time its round trips."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: rpc_worker_info
short_description: Check a llama.cpp RPC worker over its own protocol
description:
  - Connects to a ggml RPC server (C(python -m inference worker), or llama.cpp's C(rpc-server)) and speaks
    the protocol itself, so the controller needs no llama.cpp.
  - Says hello to read the protocol version, then asks for the device count and the free and total memory
    of each device, and times a few DEVICE_COUNT round trips.
  - A worker serves one client at a time. While the head is connected, the kernel still accepts a new
    connection but nobody answers the hello; the module reports that as C(busy) ("busy, served by another
    client"; a hung worker looks the same) and fails on it only with O(require_idle=true).
  - Once the worker's listen queue is full (the head's own liveness probes fill it), new connections time
    out as if a firewall dropped them. Run from the head, the module then finds the head's established
    connection to the worker in C(/proc/net/tcp) and reports C(busy) too; from anywhere else a timeout
    is C(unreachable).
  - So C(unreachable) is either a refused connection (no worker listens there) or no TCP connection at all
    (host down, firewall, or that full queue seen from elsewhere); the message says which.
  - Fails when the worker cannot be reached (the address is in the message), when ggml's client would refuse
    its protocol version (another major version than O(expected_major), or a minor version newer than
    O(expected_minor); both versions are in the message), or when the free memory is below
    O(min_free_bytes). The result keys are returned on failure too, so C(until) can test them.
version_added: "0.1.0"
author: llmfleet
options:
  host:
    description: Address of the worker, as the head reaches it (IPv4; the ggml RPC server binds IPv4 only).
    type: str
    required: true
  port:
    description: TCP port of the worker.
    type: int
    default: 50052
  timeout:
    description:
      - Seconds to wait for the TCP connection, then again for each answer.
      - A busy worker is only told apart from a slow one by this timeout.
    type: float
    default: 5.0
  expected_major:
    description: RPC protocol major version the head speaks; another major version fails.
    type: int
    default: 7
  expected_minor:
    description:
      - RPC protocol minor version the head speaks; a worker with a newer minor version fails, an older one
        passes, as ggml's client decides.
      - The default is the version of llmfleet's patched llama-cpp-python build (0.3.36+llmfleet.8, whose
        graph cache by uid made it 7.1).
    type: int
    default: 1
  min_free_bytes:
    description:
      - Free memory the worker must have, summed over its devices, e.g. the size of its planned shard.
      - C(0) checks nothing. Only an idle worker can be checked; a busy one already holds the head's share.
    type: int
    default: 0
  require_idle:
    description: Fail when the worker is serving another client, instead of reporting O(busy=true).
    type: bool
    default: false
  rtt_samples:
    description: How many DEVICE_COUNT round trips to time; the median is reported.
    type: int
    default: 5
attributes:
  check_mode:
    support: full
    description: The module only reads; it runs the same in check mode.
  diff_mode:
    support: none
    description: Nothing changes, so there is nothing to diff.
notes:
  - Run it from the head (C(delegate_to)): the firewall role opens the RPC port to the head alone.
  - Each call holds the worker's only connection for a few milliseconds; a head connecting at that moment
    waits in the listen backlog and gets in right after.
seealso:
  - module: inference_health
"""

EXAMPLES = r"""
- name: Wait until every RPC worker answers, from the head
  rpc_worker_info:
    host: "{{ hostvars[item].ansible_host }}"
    port: 50052
    min_free_bytes: "{{ 4 * 1024 ** 3 }}"
  delegate_to: "{{ groups['inference_head'][0] }}"
  loop: "{{ groups['rpc_workers'] }}"
  register: workers
  until: workers.state in ['ok', 'busy']
  retries: 30
  delay: 2

- name: Require that no head holds the worker, e.g. before a benchmark
  rpc_worker_info:
    host: 10.0.0.11
    require_idle: true
"""

RETURN = r"""
endpoint:
  description: The worker as C(host:port).
  returned: always
  type: str
  sample: 10.0.0.11:50052
state:
  description: C(ok), C(busy) (connected, but the hello unanswered - served by another client, or hung),
    C(unreachable) (connection refused, or no TCP connection at all) or C(protocol_error) (answered, but not
    as a ggml RPC server we can talk to).
  returned: always
  type: str
  sample: ok
reachable:
  description: Whether the TCP connection was accepted.
  returned: always
  type: bool
  sample: true
busy:
  description: Whether the worker serves another client - it accepted the connection but did not answer the
    hello, or its listen queue is full while this host holds a connection to it.
  returned: always
  type: bool
  sample: false
protocol_version:
  description: RPC protocol version of the worker, C(major.minor.patch); null unless the hello was answered.
  returned: always
  type: str
  sample: 7.1.0
protocol:
  description: The same version as numbers; null unless the hello was answered.
  returned: always
  type: dict
  sample: {"major": 7, "minor": 1, "patch": 0}
device_count:
  description: Number of devices the worker serves.
  returned: always
  type: int
  sample: 1
devices:
  description: Free and total memory of each device, in bytes.
  returned: always
  type: list
  elements: dict
  sample: [{"index": 0, "free_bytes": 7812345856, "total_bytes": 8443219968}]
free_bytes:
  description: Free memory summed over the devices.
  returned: always
  type: int
  sample: 7812345856
total_bytes:
  description: Total memory summed over the devices.
  returned: always
  type: int
  sample: 8443219968
rtt_ms:
  description: Round-trip times of DEVICE_COUNT commands in milliseconds (median, min, max, samples).
  returned: always
  type: dict
  sample: {"median": 0.21, "min": 0.18, "max": 0.35, "samples": 5}
connect_ms:
  description: Milliseconds from connecting to the hello's answer.
  returned: when the hello was answered
  type: float
  sample: 1.52
detail:
  description: Why the state is not C(ok), in words.
  returned: always
  type: str
  sample: ""
"""

# Ansible's module layout puts the imports after the documentation strings.
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.llmfleet_rpc import DEFAULT_PORT, probe, problems  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            host=dict(type="str", required=True),
            port=dict(type="int", default=DEFAULT_PORT),
            timeout=dict(type="float", default=5.0),
            expected_major=dict(type="int", default=7),
            expected_minor=dict(type="int", default=1),
            min_free_bytes=dict(type="int", default=0),
            require_idle=dict(type="bool", default=False),
            rtt_samples=dict(type="int", default=5),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if not 0 < params["port"] < 65536:
        module.fail_json(msg=f"port {params['port']} is not a TCP port; give 1-65535 (the worker's --port)")
    if params["timeout"] <= 0:
        module.fail_json(msg=f"timeout {params['timeout']} must be positive seconds, e.g. 5")
    if params["min_free_bytes"] < 0 or params["rtt_samples"] < 1:
        module.fail_json(
            msg=f"min_free_bytes {params['min_free_bytes']} must be 0 or more and rtt_samples "
            f"{params['rtt_samples']} at least 1"
        )
    info = probe(params["host"], params["port"], params["timeout"], params["rtt_samples"])
    found = problems(
        info,
        params["expected_major"],
        params["min_free_bytes"],
        params["require_idle"],
        expected_minor=params["expected_minor"],
    )
    if found:
        module.fail_json(msg="; ".join(found), changed=False, **info)
    module.exit_json(changed=False, **info)


if __name__ == "__main__":
    main()
