"""A one-machine rehearsal: two RPC workers on loopback, the head sharding a synthetic model across them,
the health report and one completion. Everything started here is stopped before it returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from inference.bench import CACHE, free_port, stop


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def run(shape: str = "tiny") -> int:
    from inference.synth import synth_model

    model = CACHE / "models" / f"{shape}-q8_0.gguf"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        synth_model(shape, "q8_0", model, seed=0)
    logs = CACHE / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "inference"]
    procs: list[subprocess.Popen] = []

    def spawn(name: str, args: list[str]) -> subprocess.Popen:
        log = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(py + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        endpoints = []
        for i in (1, 2):
            port = free_port()
            spawn(f"worker{i}", ["worker", "--port", str(port), "--threads", "1"])
            endpoints.append(f"127.0.0.1:{port}")
        time.sleep(1.5)
        api_port = free_port()
        head = spawn(
            "head", ["serve", "--model", str(model), "--rpc", ",".join(endpoints), "--port", str(api_port)]
        )
        url = f"http://127.0.0.1:{api_port}"
        started = time.monotonic()
        while True:
            if head.poll() is not None:
                print((logs / "head.log").read_text()[-2000:], file=sys.stderr)
                return 1
            try:
                health = _get(url + "/health")
                if health["status"] == "ok":
                    break
            except OSError:
                pass
            time.sleep(0.3)
        print(
            f"head ready in {time.monotonic() - started:.1f} s, model {model.name} sharded over {endpoints}"
        )
        print(json.dumps(health, indent=2))
        reply = _get(
            url + "/v1/completions", {"prompt": "A small cluster of Raspberry Pis", "max_tokens": 24}
        )
        print("completion:", json.dumps(reply["choices"][0]["text"]), "usage:", reply["usage"])
        print(f"logs: {logs}; everything started here has been stopped")
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(run(*sys.argv[1:2]))
