"""Automatic degradation: the ladder's decisions from token gaps, and a served model stepping down it."""

from __future__ import annotations

import contextlib
import threading

import pytest

from inference.degrade import Ladder, Level, levels
from tests.inference.conftest import Server, Worker, http, wait_for


def test_the_ladder_caps_max_tokens_then_takes_three_quarters_and_half_of_the_experts():
    assert [(r.max_tokens, r.experts_used) for r in levels(256, 8, None)] == [
        (None, None),
        (256, None),
        (256, 6),
        (256, 4),
    ]
    # --experts-used 4 is where the ladder starts from; a count that cannot shrink adds no rung.
    assert [r.experts_used for r in levels(64, 8, 4)] == [4, 4, 3, 2]
    assert [r.experts_used for r in levels(64, 2, None)] == [None, None, 1]
    assert [r.experts_used for r in levels(64, 1, None)] == [None, None]
    assert [r.experts_used for r in levels(64, None, None)] == [None, None]
    assert [r.index for r in levels(64, 8, None)] == [0, 1, 2, 3]


def _feed(ladder: Ladder, start: float, seconds: float, gap_ms: float) -> float:
    now = start
    while now < start + seconds:
        now += gap_ms / 1000
        ladder.observe(now, gap_ms / 1000)
    return now


def test_a_slow_window_steps_down_one_level_and_the_next_is_judged_on_a_full_window_of_its_own():
    ladder = Ladder(80, 10, levels(256, 8, None))
    now = _feed(ladder, 0.0, 10, 100)
    assert ladder.decide(now).index == 1
    assert "100.0 ms per output token" in ladder.reason and "above the target 80" in ladder.reason
    # Still slow, but not yet a full window at level 1.
    now = _feed(ladder, now, 5, 100)
    assert ladder.decide(now) is None
    now = _feed(ladder, now, 5, 100)
    assert ladder.decide(now).experts_used == 6
    now = _feed(ladder, now, 10, 100)
    assert ladder.decide(now).experts_used == 4
    # The last rung stays, however slow.
    now = _feed(ladder, now, 10, 100)
    assert ladder.decide(now) is None and ladder.level == 3


def test_it_steps_up_only_well_below_the_target_and_an_idle_service_stays_where_it_is():
    ladder = Ladder(80, 10, levels(256, 8, None))
    now = _feed(ladder, 0.0, 10, 90)
    assert ladder.decide(now).index == 1
    # 70 ms meets the target, but 0.7 x 80 = 56 ms is the bar for stepping up: the gap between the two
    # keeps the service from flapping between levels.
    now = _feed(ladder, now, 10, 70)
    assert ladder.decide(now) is None and ladder.level == 1
    now = _feed(ladder, now, 10, 40)
    level = ladder.decide(now)
    assert level.index == 0 and level.max_tokens is None
    assert "below 0.7 x the target 80" in ladder.reason
    # No tokens for a window (nobody asks): nothing to judge, the level stays.
    now = _feed(ladder, now, 10, 200)
    assert ladder.decide(now).index == 1
    assert ladder.decide(now + 30) is None and ladder.level == 1


def test_the_window_forgets_old_gaps():
    ladder = Ladder(80, 10, levels(256, 8, None), min_tokens=4)
    now = _feed(ladder, 0.0, 10, 200)
    assert ladder.mean_ms(now) == pytest.approx(200)
    now = _feed(ladder, now, 10, 20)
    assert ladder.mean_ms(now) == pytest.approx(20, rel=0.05)
    assert ladder.mean_ms(now + 60) is None


@contextlib.contextmanager
def busy(server: Server, prompt: str, max_tokens: int, clients: int = 1):
    """``clients`` threads sending completions back to back until the block ends; yields the list that
    collects every answer other than 200, as (status, body)."""
    stop = threading.Event()
    failures: list = []

    def client():
        while not stop.is_set():
            status, _, answer = server.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
            if status != 200:
                failures.append((status, answer))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield failures
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


def test_the_service_steps_down_caps_max_tokens_and_reloads_with_fewer_experts(tiny_model, tmp_path, procs):
    # A target no real model meets: every window is too slow, so the head goes down the whole ladder.
    server = procs(
        Server,
        tmp_path,
        tiny_model,
        "--degrade-target-ms-per-token",
        "0.001",
        "--degrade-window",
        "1",
        "--degrade-max-tokens",
        "5",
        "--parallel",
        "2",
    )
    health = server.health()
    assert health["degradation"]["level"] == 0 and health["degradation"]["levels"] == 3
    assert health["engine"]["model_experts_used"] == 2
    status, headers, body = server.complete("Load", max_tokens=40, ignore_eos=True)
    assert status == 200 and body["usage"]["completion_tokens"] == 40
    assert headers["X-Llmfleet-Degradation-Level"] == "0"

    with busy(server, "Keep it busy", 40, clients=2) as failures:
        wait_for(lambda: (server.health() or {}).get("degradation", {}).get("level") == 1, 30, "level 1")
        status, headers, body = server.complete("Capped", max_tokens=40, ignore_eos=True)
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        assert body["choices"][0]["finish_reason"] == "length"
        assert int(headers["X-Llmfleet-Degradation-Level"]) >= 1
        # Level 2 reloads the engine with 1 of the tiny model's 2 experts per token, behind a drain.
        final = wait_for(
            lambda: (
                (h := server.health()) and h["status"] == "ok" and h["engine"].get("experts_used") == 1 and h
            ),
            60,
            "the reload with one expert per token",
        )
        assert final["degradation"]["level"] == 2 and final["degradation"]["experts_used"] == 1
        assert "above the target 0.001 ms" in final["degradation"]["reason"]
    # Requests running when the reload stopped the engine may fail with the reason; none other.
    assert all("degradation step" in str(answer) for _, answer in failures), failures
    status, _, metrics = http("GET", server.url + "/metrics")
    assert "llmfleet_degradation_level 2.0" in metrics
    output = server.output()
    assert "degradation level 0 -> 1 (max_tokens capped at 5)" in output
    assert "degradation level 1 -> 2 (max_tokens capped at 5, 1 experts per token)" in output
    status, _, body = server.complete("Still served", max_tokens=40)
    assert status == 200 and body["usage"]["completion_tokens"] <= 5


def test_degradation_is_off_by_default_and_its_options_are_checked(tiny_model, tmp_path, procs):
    server = procs(Server, tmp_path, tiny_model)
    assert server.health()["degradation"] is None
    status, headers, _ = server.complete("Plain")
    assert status == 200 and "X-Llmfleet-Degradation-Level" not in headers
    from inference.config import ServeConfig
    from inference.worker import ConfigError

    for field, value, named in (
        ("degrade_target_ms_per_token", -1.0, "--degrade-target-ms-per-token"),
        ("degrade_window", 0.0, "--degrade-window"),
        ("degrade_max_tokens", 0, "--degrade-max-tokens"),
    ):
        with pytest.raises(ConfigError, match=named):
            ServeConfig(model=str(tiny_model), **{field: value}).validated()
    assert Level(1, 5, None).describe() == "max_tokens capped at 5"


def test_a_slow_link_steps_the_head_down_and_a_fast_one_back_up(tiny_model, tmp_path, procs):
    """The injected slowdown is real: a worker's link delayed 25 ms each way makes every token wait a round
    trip (well over the 50 ms target); once the delay is gone a token takes a few ms, under 0.7 x 50."""
    from inference.netsim import ProcessRelay

    worker = procs(Worker, tmp_path)
    relay = ProcessRelay(("127.0.0.1", worker.port)).start()
    try:
        server = procs(
            Server,
            tmp_path,
            tiny_model,
            "--rpc",
            relay.endpoint,
            "--degrade-target-ms-per-token",
            "50",
            "--degrade-window",
            "1",
            "--degrade-max-tokens",
            "8",
        )

        def level(wanted, experts):
            health = server.health() or {}
            degradation = health.get("degradation") or {}
            return (
                health.get("status") == "ok"
                and degradation.get("level") == wanted
                and health["engine"].get("experts_used") == experts
            )

        with busy(server, "Steady", 32) as failures:
            relay.set_link(delay_ms=25)
            wait_for(lambda: level(2, 1), 90, "the step down to 1 expert per token")
            relay.set_link(delay_ms=0)
            wait_for(lambda: level(0, None), 90, "the steps back up to the model's 2 experts")
        assert all("degradation step" in str(answer) for _, answer in failures), failures
        output = server.output()
        for step in ("0 -> 1", "1 -> 2", "2 -> 1", "1 -> 0"):
            assert f"degradation level {step} " in output, output[-3000:]
        assert "below 0.7 x the target 50 ms" in output
    finally:
        relay.stop()
