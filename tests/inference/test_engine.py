"""The engine in this process on the tiny model: a fault while admitting or sampling one sequence fails that
request alone, and the engine's own death is reported with its cause."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from inference import engine as engine_module
from inference.config import ServeConfig
from inference.engine import Engine, SamplingParams
from inference.metrics import Metrics
from inference.supervisor import MAX_RESTART_BACKOFF, RECOVERY_INTERVAL, Request, Supervisor


@pytest.fixture(scope="module")
def engine(tiny_model):
    config = ServeConfig(model=str(tiny_model), ctx=512, parallel=2, threads=1).validated()
    eng = Engine(config)
    yield eng


def _run(eng: Engine, steps: int = 50) -> dict[int, list]:
    out: dict[int, list] = {}
    for _ in range(steps):
        if not eng.sequences:
            break
        for request_id, token, finish in eng.step():
            out.setdefault(request_id, []).append((token, finish))
    return out


def test_a_sampler_that_cannot_be_built_fails_only_its_request(engine, monkeypatch):
    def refuse(*_args):
        raise ValueError("refused by llama.cpp")

    monkeypatch.setattr(engine_module, "_make_sampler", refuse)
    error = engine.submit(1, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.7))
    assert error == "could not set up sampling: ValueError: refused by llama.cpp"
    assert engine.submit(2, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0)) is None
    results = _run(engine)
    assert list(results) == [2]
    assert len(results[2]) <= 4 and results[2][-1][1] in ("length", "stop")
    assert len(engine.free_seq_ids) == 2  # nothing leaked


def test_a_sampling_fault_fails_only_that_sequence(engine, monkeypatch):
    real_choose = engine._choose

    def choose(seq, index):
        if seq.request_id == 3:
            raise RuntimeError("sampler exploded")
        return real_choose(seq, index)

    monkeypatch.setattr(engine, "_choose", choose)
    for request_id in (3, 4):
        assert engine.submit(request_id, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0)) is None
    results = _run(engine)
    assert results[3] == [(-1, "error:sampling failed: RuntimeError: sampler exploded")]
    assert results[4][-1][1] in ("length", "stop")
    assert not engine.sequences and len(engine.free_seq_ids) == 2


def test_every_sampling_parameter_builds_a_chain(engine):
    """llama-cpp-python's bindings follow its vendored llama.h, whose argument lists changed across versions
    (the penalties sampler takes the vocabulary size first here): a wrong call crashed the engine."""
    params = SamplingParams(
        max_tokens=3,
        temperature=0.9,
        top_p=0.9,
        top_k=20,
        min_p=0.1,
        seed=5,
        presence_penalty=0.4,
        frequency_penalty=-0.4,
        ignore_eos=True,
    )
    assert engine.submit(5, [1, 2], params) is None
    results = _run(engine)
    assert [finish for _, finish in results[5]] == [None, None, "length"]


def test_ignore_eos_never_chooses_an_end_of_generation_token(engine):
    assert engine.eog_tokens, "the tiny model has end-of-generation tokens"
    for request_id, temperature in ((6, 0.0), (7, 2.0)):
        params = SamplingParams(max_tokens=40, temperature=temperature, seed=1, ignore_eos=True)
        assert engine.submit(request_id, [3, 4], params) is None
    results = _run(engine, steps=100)
    for request_id in (6, 7):
        tokens = [token for token, _ in results[request_id]]
        assert len(tokens) == 40
        assert not set(tokens) & set(engine.eog_tokens)


def _supervisor(**config) -> Supervisor:
    return Supervisor(ServeConfig(model="unused.gguf", **config), Metrics(CollectorRegistry()))


def test_the_engine_s_last_words_become_the_reason_clients_and_health_see():
    supervisor = _supervisor()
    supervisor._handle(("fatal", "TypeError: an argument is missing"))
    assert supervisor._fatal == "TypeError: an argument is missing"
    assert supervisor.restart_delay() == RECOVERY_INTERVAL


def test_engines_that_fail_to_start_back_off_exponentially():
    supervisor = _supervisor()
    delays = []
    for failures in range(1, 10):
        supervisor._failed_starts = failures
        delays.append(supervisor.restart_delay())
    assert delays[:4] == [RECOVERY_INTERVAL * 2**i for i in range(4)]
    assert delays[-1] == MAX_RESTART_BACKOFF
    supervisor._handle(("ready", {}))
    assert supervisor._failed_starts == 0


class _Output:
    def __init__(self):
        self.failed = None

    def token(self, token):
        pass

    def finish(self, reason):
        pass

    def fail(self, message):
        self.failed = message


def test_requests_in_flight_fail_with_the_engine_s_cause():
    import asyncio

    async def scenario():
        supervisor = _supervisor()
        supervisor._loop = asyncio.get_running_loop()
        supervisor._probe_all = _noop  # no workers configured: nothing to probe
        output = _Output()
        supervisor.active[1] = Request([1], SamplingParams(max_tokens=2), output, id=1)
        supervisor._engine_was_ready = True
        supervisor._fatal = "EngineError: llama_decode failed with status -3"
        supervisor._engine_lost()
        await asyncio.sleep(0.05)
        await supervisor.close()
        return supervisor, output

    supervisor, output = asyncio.run(scenario())
    assert output.failed == "the engine stopped: EngineError: llama_decode failed with status -3"
    assert supervisor.state == "degraded"


async def _noop():
    return None
