"""The monitoring role's dashboards: the Grafana dashboard (files/grafana/llmfleet.json) and the Prometheus
console page (files/consoles/llmfleet.html with files/console_libraries/llmfleet.lib).

Every query of both is valid PromQL (promtool), the recording rules it reads exist, and a real Prometheus on
127.0.0.1 that scrapes the head's and a worker's own metrics code (and a node exporter's metric names)
returns data for each; the same Prometheus serves the console page, its static files and its values.

``panel_queries()`` lists every query with the dashboard's variables filled in, for the cluster tests to run
against the cluster's Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
ROLE = REPO / "roles" / "monitoring"
DASHBOARD = ROLE / "files" / "grafana" / "llmfleet.json"
PROVISIONING = ROLE / "files" / "grafana" / "provisioning"
CONSOLES = ROLE / "files" / "consoles"
CONSOLE = CONSOLES / "llmfleet.html"
CONSOLE_LIBRARIES = ROLE / "files" / "console_libraries"
RULES_TEMPLATE = ROLE / "templates" / "llmfleet-rules.yml.j2"

# What a dashboard variable stands for when a query runs outside Grafana: every host, and the rate windows
# Grafana would pick for a 15s scrape interval.
VARIABLES = {"host": ".+", "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
# The console's graphs, and the queries its template runs on the server (a Go raw string after "query" or
# "(args"; the page uses backticks for nothing else).
_CONSOLE_GRAPHS = re.compile(r'<script type="application/json" id="llmfleet-graphs">(.*?)</script>', re.S)
_CONSOLE_SERVER_QUERY = re.compile(r"(?:\bquery|\(args)\s+`([^`]*)`")


def substitute(expr: str) -> str:
    """``expr`` with the dashboard's variables ($host, ${host}, $__rate_interval, ...) filled in."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise ValueError(f"unknown dashboard variable ${name} in {expr!r}")
        return VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def grafana_queries() -> list[str]:
    """The expr of every panel target of the Grafana dashboard, as written."""
    return [
        target["expr"]
        for panel in _panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def console_graphs() -> list[dict]:
    """The console page's graph specifications (its "llmfleet-graphs" JSON list), sections left out."""
    match = _CONSOLE_GRAPHS.search(CONSOLE.read_text())
    assert match, f"{CONSOLE.name} has no llmfleet-graphs list"
    return [spec for spec in json.loads(match.group(1)) if "expr" in spec]


def console_queries() -> list[str]:
    """Every query of the console page: its graphs' and those its template runs, as written."""
    graphs = [expr for spec in console_graphs() for expr in spec["expr"]]
    return graphs + _CONSOLE_SERVER_QUERY.findall(CONSOLE.read_text())


def panel_queries() -> list[str]:
    """Every query of the Grafana dashboard and the console page, once each, with the variables filled in
    ($host matches every host): each must return data on a cluster that has served a request."""
    variables = [
        match.group(1)
        for variable in dashboard()["templating"]["list"]
        if (match := re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable.get("definition", "")))
    ]
    return list(
        dict.fromkeys(substitute(expr) for expr in [*grafana_queries(), *console_queries(), *variables])
    )


def recording_rules() -> dict:
    """The recording rule group of the role's rules template (it needs no Ansible variable)."""
    groups = yaml.safe_load(RULES_TEMPLATE.read_text())["groups"]
    (group,) = (g for g in groups if all("record" in rule for rule in g["rules"]))
    return group


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make system-packages` installs Debian's prometheus package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, check=False)


# ---------------------------------------------------------------------------------------------- offline


def test_every_query_is_valid_promql(tmp_path):
    queries = panel_queries()
    rules = [{"record": f"llmfleet_dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries)]
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]})
    )
    result = promtool("check", "rules", "queries.yml", cwd=tmp_path)
    listing = "\n".join(f"{i}: {expr}" for i, expr in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{listing}"
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_the_console_queries_are_all_found():
    text = CONSOLE.read_text()
    server = _CONSOLE_SERVER_QUERY.findall(text)
    assert text.count("`") == 2 * len(server), "a backtick outside a server-side query"
    assert text.count('template "llmfleet_value"') + text.count("range query") == len(server)
    assert "{{" not in _CONSOLE_GRAPHS.search(text).group(1)
    assert len(console_graphs()) >= 10
    for spec in console_graphs():
        # prom_console.js drops what follows a series name's last [[label]]
        assert len(spec["name"]) == len(spec["expr"]), spec["title"]
        assert all(name.endswith("]]") for name in spec["name"] if "[[" in name), spec["title"]


def test_the_recording_rules_the_dashboards_read_exist():
    recorded = {rule["record"] for rule in recording_rules()["rules"]}
    used = {
        name for expr in panel_queries() for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", expr)
    }
    assert used, "the dashboards read no recording rule"
    assert used <= recorded, f"not recorded by {RULES_TEMPLATE.name}: {sorted(used - recorded)}"


def test_the_grafana_dashboard_is_provisionable():
    board = dashboard()
    assert board["uid"] == "llmfleet" and board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    host = variables["host"]
    assert host["definition"] == "label_values(node_uname_info, host)"
    assert host["includeAll"] and host["multi"] and host["allValue"] == ".+"
    ids = [panel["id"] for panel in _panels(board["panels"])]
    assert len(ids) == len(set(ids))
    for panel in _panels(board["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "llmfleet.yml").read_text())
    assert dashboards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/llmfleet"
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    assert datasources["datasources"][0]["url"] == "http://localhost:9090"


# ------------------------------------------------------------------------------ a Prometheus on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    """The metrics of a head, an RPC worker and a node exporter, each scrape one request further on. The head
    and the worker expose through their own metrics code (inference.metrics, inference.worker_metrics); the
    node exporter's text carries the metric names Debian's prometheus-node-exporter 1.5.0 exports."""

    def __init__(self):
        from prometheus_client import CollectorRegistry

        from inference.metrics import Metrics
        from inference.worker_metrics import RpcTraffic, TcpInfo, build_registry

        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.head = Metrics(CollectorRegistry())
        self.head.set_state("ok")
        self.head.degradation_level.set(0)
        for port in (50052, 50053):
            self.head.worker_up.labels(f"10.77.0.1{port - 50051}:{port}").set(1)
        self.exchanged = 0

        def sample(_port: int) -> dict:
            return {"10.77.0.21:41234": TcpInfo(self.exchanged * 3, self.exchanged * 5, 20, 400)}

        self.traffic = RpcTraffic(50052, sample=sample)
        self.worker = build_registry(self.traffic, "10.77.0.11:50052", "3.0.0")

    def head_metrics(self) -> bytes:
        from prometheus_client import generate_latest

        with self.lock:
            head = self.head
            head.requests.labels("/v1/completions", "200").inc()
            head.prompt_tokens.inc(12)
            head.completion_tokens.inc(16)
            head.time_to_first_token.observe(0.3)
            for _ in range(15):
                head.time_per_output_token.observe(0.04)
            head.queue_depth.set(1)
            head.active_sequences.set(2)
            head.kv_cache_tokens.set(56)
            head.kv_cache_usage.set(0.1)
            return generate_latest(head.registry)

    def worker_metrics(self) -> bytes:
        from prometheus_client import generate_latest

        with self.lock:
            self.exchanged += 100_000
            self.traffic.update()
            return generate_latest(self.worker)

    def node_metrics(self) -> bytes:
        t = time.monotonic() - self.started + 100
        lines = [
            f'node_cpu_seconds_total{{cpu="{cpu}",mode="{mode}"}} {t * share:.3f}'
            for cpu in range(4)
            for mode, share in (("idle", 0.6), ("user", 0.3), ("system", 0.1))
        ]
        lines += [
            "node_memory_MemTotal_bytes 8.0e+09",
            "node_memory_MemAvailable_bytes 5.0e+09",
            'node_uname_info{domainname="(none)",machine="aarch64",nodename="node",release="6.1.0",'
            'sysname="Linux",version="#1 SMP"} 1',
        ]
        for device, rate in (("eth0", 125_000.0), ("lo", 1_000.0)):
            lines += [
                f'node_network_receive_bytes_total{{device="{device}"}} {t * rate:.0f}',
                f'node_network_transmit_bytes_total{{device="{device}"}} {t * rate / 2:.0f}',
            ]
        return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def exporter() -> Iterator[str]:
    cluster = FakeCluster()
    pages = {"/head": cluster.head_metrics, "/worker": cluster.worker_metrics, "/node": cluster.node_metrics}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            page = pages.get(self.path)
            body = page() if page else b"not found\n"
            self.send_response(200 if page else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


@pytest.fixture(scope="module")
def prometheus(exporter, tmp_path_factory) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 that scrapes the fake cluster every second (the local inventory's host
    names: head gpu1, worker pi1), evaluates the role's recording rules and serves the role's consoles."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: `make system-packages` installs Debian's prometheus package"
    directory = tmp_path_factory.mktemp("prometheus")
    port = free_port()

    def job(name: str, path: str, hosts: list[str]) -> dict:
        static = [{"targets": [exporter], "labels": {"host": host}} for host in hosts]
        return {"job_name": name, "metrics_path": path, "static_configs": static}

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
            job("node", "/node", ["gpu1", "pi1"]),
            job("llmfleet_head", "/head", ["gpu1"]),
            job("llmfleet_worker", "/worker", ["pi1"]),
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    (directory / "rules.yml").write_text(yaml.safe_dump({"groups": [recording_rules()]}))
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            exe,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.console.templates={CONSOLES}",
            f"--web.console.libraries={CONSOLE_LIBRARIES}",
        ],
        cwd=directory,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (directory / "prometheus.log").read_text()
            try:
                if get(f"{url}/-/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (directory / "prometheus.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def instant(url: str, expr: str) -> list[dict]:
    status, body = get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", f"{expr}: {body!r}"
    return answer["data"]["result"]


@pytest.mark.slow
def test_every_query_returns_data_from_the_services_metrics(prometheus):
    empty = panel_queries()
    deadline = time.monotonic() + 60
    while empty and time.monotonic() < deadline:
        time.sleep(1)
        empty = [expr for expr in empty if not instant(prometheus, expr)]
    assert not empty, "no data for:\n" + "\n".join(empty)
    # the rate-based figures are numbers: the fake head served requests between its scrapes
    for expr in (
        "instance:llmfleet_time_to_first_token_seconds:p95_5m",
        "instance:llmfleet_completion_tokens:rate1m",
    ):
        (sample,) = instant(prometheus, expr)
        assert float(sample["value"][1]) > 0, expr


@pytest.mark.slow
def test_prometheus_serves_the_console(prometheus):
    deadline = time.monotonic() + 60
    while not instant(prometheus, "instance:llmfleet_time_to_first_token_seconds:p95_5m"):
        assert time.monotonic() < deadline, "the recording rules give no data"
        time.sleep(1)
    status, body = get(f"{prometheus}/consoles/llmfleet.html")
    page = body.decode()
    assert status == 200, page
    assert ">-</a>" not in page, "a value of the side table has no data"
    assert page.lstrip().startswith("<!doctype html>"), page[:500]
    assert 'id="llmfleet-graphs"' in page and "new PromConsole.Graph(" in page
    assert "new PromConsole.TimeControl()" in page
    assert 'href="/consoles/llmfleet.html?host=gpu1"' in page  # the host list ran its query
    # every script and stylesheet the page loads is one this Prometheus serves
    assets = re.findall(r'(?:src|href)="(/classic/static/[^"]+)"', page)
    assert len(assets) >= 7
    for asset in assets:
        assert get(f"{prometheus}{asset}")[0] == 200, asset
    status, _ = get(f"{prometheus}/consoles/llmfleet.html?host=pi1")
    assert status == 200
