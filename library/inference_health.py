#!/usr/bin/python
"""Check the serving head: /health, /v1/models and the speed of one streamed completion."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: inference_health
short_description: Check the llmfleet serving head and measure its speed
description:
  - Reads the head's C(/health) (status C(loading), C(ok) or C(degraded), its RPC workers and slots) and
    C(/v1/models), then streams one short greedy completion from C(/v1/completions) with
    C(stream_options.include_usage) and measures the time to the first token and the decode rate.
  - Fails when the head is not C(ok), when a worker of O(expected_workers) is not connected, when the API
    refuses the request, or when the measured speed misses a threshold; the message carries the numbers.
  - Every result key is returned on failure too, so a task can wait with C(until) on C(status) or on the
    measurements.
version_added: "0.1.0"
author: llmfleet
options:
  url:
    description: Base URL of the head, without a path.
    type: str
    required: true
  api_key:
    description: "The head's API key, sent as C(Authorization: Bearer <key>); needed when the head has one."
    type: str
  prompt:
    description: Prompt of the measured completion.
    type: str
    default: The capital of France is
  max_tokens:
    description: Tokens to generate; at least 2 are needed to measure a rate.
    type: int
    default: 16
  min_tokens_per_second:
    description: Fail when the decode rate is below this; C(0) checks nothing.
    type: float
    default: 0.0
  max_time_to_first_token_ms:
    description: Fail when the first token takes longer than this many milliseconds; C(0) checks nothing.
    type: float
    default: 0.0
  expected_workers:
    description:
      - RPC workers, as C(host:port) exactly as in the head's C(--rpc) list, that must be connected.
    type: list
    elements: str
    default: []
  completion:
    description: Run the measured completion; C(false) only reads C(/health) and C(/v1/models).
    type: bool
    default: true
  timeout:
    description: Seconds each request may take, the whole streamed completion included.
    type: float
    default: 60.0
  validate_certs:
    description: Verify the TLS certificate when O(url) is C(https).
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description: The module changes nothing on the head (a completion leaves no state); it runs the same in
      check mode.
  diff_mode:
    support: none
    description: Nothing changes, so there is nothing to diff.
seealso:
  - module: rpc_worker_info
"""

EXAMPLES = r"""
- name: Wait for the head to load the model and answer fast enough
  inference_health:
    url: http://127.0.0.1:8080
    api_key: "{{ inference_api_key }}"
    expected_workers: [10.0.0.11:50052, 10.0.0.12:50052]
    min_tokens_per_second: 5
    max_time_to_first_token_ms: 3000
  register: head
  until: head.status == 'ok' and head is not failed
  retries: 60
  delay: 5

- name: Only read the status, without generating
  inference_health:
    url: http://gpu1:8080
    completion: false
"""

RETURN = r"""
url:
  description: The base URL checked.
  returned: always
  type: str
  sample: http://127.0.0.1:8080
status:
  description: C(loading), C(ok) or C(degraded) from C(/health); C(unreachable) when it did not answer.
  returned: always
  type: str
  sample: ok
http_status:
  description: HTTP status of C(/health) (200 only when ok); null when unreachable.
  returned: always
  type: int
  sample: 200
detail:
  description: The head's own words on its state.
  returned: always
  type: str
  sample: serving
model:
  description: Name the head serves the model under.
  returned: when the head answered
  type: str
  sample: qwen3-30b-a3b-q4_k
models:
  description: Model ids from C(/v1/models).
  returned: always
  type: list
  elements: str
  sample: [qwen3-30b-a3b-q4_k]
workers:
  description: The head's RPC workers as C(/health) lists them (endpoint, up, connected, protocol, detail).
  returned: always
  type: list
  elements: dict
  sample: [{"endpoint": "10.0.0.11:50052", "up": true, "connected": true, "protocol": "7.1.0", "detail": ""}]
connected_workers:
  description: Endpoints of the workers the engine is connected to.
  returned: always
  type: list
  elements: str
  sample: [10.0.0.11:50052]
slots:
  description: Sequence slots (total, active, waiting).
  returned: always
  type: dict
  sample: {"total": 4, "active": 0, "waiting": 0}
completion:
  description: The measured completion (text, finish_reason, prompt_tokens, completion_tokens, total_ms);
    null when none ran.
  returned: always
  type: dict
  sample: {"text": " Paris.", "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 16,
           "total_ms": 812.4}
time_to_first_token_ms:
  description: Milliseconds from sending the request to the first streamed text.
  returned: always
  type: float
  sample: 143.2
tokens_per_second:
  description: Decode rate after the first token, (completion_tokens - 1) over the time to the finish.
  returned: always
  type: float
  sample: 21.7
ms_per_token:
  description: The same rate as milliseconds per token.
  returned: always
  type: float
  sample: 46.1
"""

# Ansible's module layout puts the imports after the documentation strings.
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.llmfleet_health import check  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            url=dict(type="str", required=True),
            api_key=dict(type="str", no_log=True),
            prompt=dict(type="str", default="The capital of France is"),
            max_tokens=dict(type="int", default=16),
            min_tokens_per_second=dict(type="float", default=0.0),
            max_time_to_first_token_ms=dict(type="float", default=0.0),
            expected_workers=dict(type="list", elements="str", default=[]),
            completion=dict(type="bool", default=True),
            timeout=dict(type="float", default=60.0),
            validate_certs=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if not params["url"].startswith(("http://", "https://")):
        module.fail_json(msg=f"url {params['url']!r} needs a scheme; give e.g. http://10.0.0.21:8080")
    if params["max_tokens"] < 1 or params["timeout"] <= 0:
        module.fail_json(
            msg=f"max_tokens {params['max_tokens']} must be at least 1 and timeout {params['timeout']} positive"
        )
    result, found = check(
        params["url"],
        api_key=params["api_key"],
        prompt=params["prompt"],
        max_tokens=params["max_tokens"],
        min_tokens_per_second=params["min_tokens_per_second"],
        max_time_to_first_token_ms=params["max_time_to_first_token_ms"],
        expected_workers=params["expected_workers"],
        timeout=params["timeout"],
        validate_certs=params["validate_certs"],
        completion=params["completion"],
    )
    if found:
        module.fail_json(msg="; ".join(found), changed=False, **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
