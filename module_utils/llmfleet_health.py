"""Health and speed of the serving head (``python -m inference serve``), measured as a client sees them.

Reads ``/health`` (status loading|ok|degraded, the RPC workers and the slots) and ``/v1/models``, then streams
one short completion and times it: time to the first token, and the decode rate after it.
"""

from __future__ import annotations

import json
import time
import urllib.error

from ansible.module_utils.urls import open_url


class HealthError(Exception):
    """The head could not be asked, or answered something that is not the inference API."""


def _headers(api_key: str | None, body: bool = False) -> dict:
    headers = {"Accept": "application/json"}
    if body:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _describe_url_error(url: str, exc: Exception) -> str:
    reason = getattr(exc, "reason", exc)
    return f"cannot reach {url}: {reason}; is llmfleet-head.service running and the port open to this host?"


def _request(url: str, *, timeout: float, validate_certs: bool, api_key: str | None = None, body=None):
    data = None if body is None else json.dumps(body).encode()
    return open_url(
        url,
        data=data,
        headers=_headers(api_key, body is not None),
        method="POST" if body is not None else "GET",
        timeout=timeout,
        validate_certs=validate_certs,
        use_proxy=False,
        follow_redirects="none",
    )


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw.decode(errors="replace")[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return json.dumps(body)[:200]


def get_json(url: str, *, timeout: float, validate_certs: bool = True, api_key: str | None = None):
    """(HTTP status, parsed body) of a GET; error statuses are returned, not raised."""
    try:
        with _request(url, timeout=timeout, validate_certs=validate_certs, api_key=api_key) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise HealthError(_describe_url_error(url, exc)) from exc
    try:
        return status, json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HealthError(
            f"{url} answered HTTP {status} with something that is not JSON: {raw[:120]!r}"
        ) from exc


def read_health(base_url: str, timeout: float, validate_certs: bool = True) -> dict:
    """The head's /health, or ``{"status": "unreachable", "detail": ...}`` when it does not answer."""
    url = base_url + "/health"
    try:
        http_status, body = get_json(url, timeout=timeout, validate_certs=validate_certs)
    except HealthError as exc:
        return {"status": "unreachable", "http_status": None, "detail": str(exc), "workers": [], "slots": {}}
    if not isinstance(body, dict) or "status" not in body:
        return {
            "status": "unknown",
            "http_status": http_status,
            "detail": f"{url} answered HTTP {http_status} without a status field; is this an llmfleet head?",
            "workers": [],
            "slots": {},
        }
    return {
        "status": body["status"],
        "http_status": http_status,
        "detail": body.get("detail", ""),
        "model": body.get("model"),
        "workers": body.get("workers", []),
        "slots": body.get("slots", {}),
    }


def read_models(base_url: str, api_key: str | None, timeout: float, validate_certs: bool = True) -> list[str]:
    url = base_url + "/v1/models"
    status, body = get_json(url, timeout=timeout, validate_certs=validate_certs, api_key=api_key)
    if status == 401:
        hint = (
            "the api_key given is not the head's" if api_key else "give api_key (the head has --api-key-file)"
        )
        raise HealthError(
            f"{url} refused the request (HTTP 401: {_error_message(json.dumps(body).encode())}); {hint}"
        )
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise HealthError(f"{url} answered HTTP {status}: {json.dumps(body)[:200]}")
    return [item.get("id") for item in body["data"] if isinstance(item, dict)]


def stream_completion(
    base_url: str,
    api_key: str | None,
    prompt: str,
    max_tokens: int,
    timeout: float,
    validate_certs: bool = True,
    clock=time.perf_counter,
) -> dict:
    """Stream one greedy completion and time it.

    ``time_to_first_token_ms`` runs from sending the request to the first chunk with text;
    ``tokens_per_second`` is the decode rate after that token, ``(completion_tokens - 1)`` over the time from
    the first text to the finish, as llama.cpp reports its eval speed.
    """
    url = base_url + "/v1/completions"
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pieces: list[str] = []
    usage: dict = {}
    finish_reason = None
    first_at = finished_at = None
    started = clock()
    try:
        with _request(
            url, timeout=timeout, validate_certs=validate_certs, api_key=api_key, body=body
        ) as resp:
            for raw_line in resp:
                line = raw_line.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError as exc:
                    raise HealthError(f"{url} streamed a chunk that is not JSON: {data[:120]!r}") from exc
                if "error" in chunk:
                    raise HealthError(
                        f"{url} failed the completion mid-stream: {_error_message(data.encode())}"
                    )
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        if first_at is None:
                            first_at = clock()
                        pieces.append(choice["text"])
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                        finished_at = clock()
    except urllib.error.HTTPError as exc:
        message = _error_message(exc.read())
        hint = ""
        if exc.code == 401:
            hint = "; the api_key given is not the head's" if api_key else "; give api_key"
        raise HealthError(f"{url} answered HTTP {exc.code}: {message}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise HealthError(_describe_url_error(url, exc)) from exc
    ended = clock()
    finished_at = finished_at or ended
    completion_tokens = usage.get("completion_tokens", len(pieces))
    result = {
        "text": "".join(pieces),
        "finish_reason": finish_reason,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": completion_tokens,
        "total_ms": round((ended - started) * 1000.0, 3),
        "time_to_first_token_ms": None,
        "tokens_per_second": None,
        "ms_per_token": None,
    }
    if first_at is not None:
        result["time_to_first_token_ms"] = round((first_at - started) * 1000.0, 3)
        decode_s = finished_at - first_at
        if completion_tokens > 1 and decode_s > 0:
            rate = (completion_tokens - 1) / decode_s
            result["tokens_per_second"] = round(rate, 3)
            result["ms_per_token"] = round(1000.0 / rate, 3)
    return result


def worker_problems(workers: list[dict], expected: list[str]) -> list[str]:
    by_endpoint = {w.get("endpoint"): w for w in workers}
    found = []
    for endpoint in expected:
        worker = by_endpoint.get(endpoint)
        if worker is None:
            known = ", ".join(sorted(str(e) for e in by_endpoint)) or "none"
            found.append(
                f"worker {endpoint} is not one of the head's RPC workers ({known}); "
                "check the head's --rpc list (inference_head_rpc_workers)"
            )
        elif not worker.get("connected"):
            detail = worker.get("detail") or ("answers the hello" if worker.get("up") else "down")
            found.append(f"worker {endpoint} is not connected (up: {worker.get('up')}, {detail})")
    return found


def check(
    url: str,
    api_key: str | None = None,
    prompt: str = "The capital of France is",
    max_tokens: int = 16,
    min_tokens_per_second: float = 0.0,
    max_time_to_first_token_ms: float = 0.0,
    expected_workers: list[str] | None = None,
    timeout: float = 60.0,
    validate_certs: bool = True,
    completion: bool = True,
) -> tuple[dict, list[str]]:
    """Measure the head and judge it; returns (result, problems), problems empty when healthy."""
    base_url = url.rstrip("/")
    health = read_health(base_url, timeout, validate_certs)
    workers = health["workers"]
    result = {
        "url": base_url,
        "status": health["status"],
        "http_status": health["http_status"],
        "detail": health["detail"],
        "model": health.get("model"),
        "models": [],
        "workers": workers,
        "connected_workers": [w.get("endpoint") for w in workers if w.get("connected")],
        "slots": health["slots"],
        "completion": None,
        "time_to_first_token_ms": None,
        "tokens_per_second": None,
        "ms_per_token": None,
    }
    if health["status"] != "ok":
        down = [w.get("endpoint") for w in workers if not w.get("up")]
        message = f"the head at {base_url} is {health['status']}"
        if health["detail"]:
            message += f": {health['detail']}"
        if down:
            message += f" (workers down: {', '.join(down)})"
        return result, [message]
    found = worker_problems(workers, expected_workers or [])
    try:
        result["models"] = read_models(base_url, api_key, timeout, validate_certs)
        if completion:
            measured = stream_completion(base_url, api_key, prompt, max_tokens, timeout, validate_certs)
            result["completion"] = {
                key: measured[key]
                for key in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "total_ms")
            }
            for key in ("time_to_first_token_ms", "tokens_per_second", "ms_per_token"):
                result[key] = measured[key]
    except HealthError as exc:
        return result, [*found, str(exc)]
    if completion:
        found.extend(speed_problems(result, min_tokens_per_second, max_time_to_first_token_ms))
    return result, found


def speed_problems(
    result: dict, min_tokens_per_second: float, max_time_to_first_token_ms: float
) -> list[str]:
    found = []
    ttft, rate = result["time_to_first_token_ms"], result["tokens_per_second"]
    tokens = (result["completion"] or {}).get("completion_tokens")
    if max_time_to_first_token_ms and (ttft is None or ttft > max_time_to_first_token_ms):
        found.append(
            f"time to first token {'none: no text came back' if ttft is None else f'{ttft:.1f} ms'} "
            f"exceeds max_time_to_first_token_ms {max_time_to_first_token_ms:g}"
        )
    if min_tokens_per_second:
        if rate is None:
            found.append(
                f"the completion produced {tokens} token(s), too few to measure a rate against "
                f"min_tokens_per_second {min_tokens_per_second:g}; raise max_tokens or change the prompt"
            )
        elif rate < min_tokens_per_second:
            found.append(
                f"decode rate {rate:.2f} tokens/s ({result['ms_per_token']:.1f} ms/token over {tokens} tokens) "
                f"is below min_tokens_per_second {min_tokens_per_second:g}"
            )
    return found
