"""The load bench: N concurrent streaming clients against a running server, timed from the client side.

Each client sends chat completions one after another (streaming, greedy, a fixed number of new
tokens) until it has sent ``requests_per_client``; time to first token is measured at the first
chunk with text. Plain threads and ``http.client``: no dependency beyond the standard library.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROMPT = "Write a short story about a compiler that learns to optimize itself. Explain each step."


@dataclass
class LoadResult:
    clients: int
    requests: int = 0
    refused: int = 0
    failed: int = 0
    seconds: float = 0.0
    completion_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)

    def row(self) -> dict:
        ttft = sorted(self.ttft_s)

        def percentile(share: float) -> float | None:
            return round(ttft[min(len(ttft) - 1, int(share * len(ttft)))] * 1000, 1) if ttft else None

        return {"clients": self.clients, "requests": self.requests, "refused": self.refused, "failed": self.failed,
                "requests_per_s": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
                "ttft_p50_ms": percentile(0.50), "ttft_p99_ms": percentile(0.99),
                "tokens_per_s": round(self.completion_tokens / self.seconds, 1) if self.seconds else 0.0}


def one_request(url: str, model: str, max_tokens: int, prompt: str, timeout: float) -> tuple[int, float | None, int]:
    """(HTTP status, seconds to the first text, completion tokens) of one streamed chat completion."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    try:
        connection.request("POST", parts.path.rstrip("/") + "/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            return response.status, None, 0
        first, tokens = None, 0
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return 200, first, tokens
    finally:
        connection.close()


def run_load(url: str, model: str, clients: int, requests_per_client: int = 4, max_tokens: int = 64,
             prompt: str = PROMPT, timeout: float = 300.0) -> LoadResult:
    """``clients`` threads, each sending ``requests_per_client`` requests back to back."""
    result, lock = LoadResult(clients), threading.Lock()

    def client() -> None:
        for _ in range(requests_per_client):
            try:
                status, ttft, tokens = one_request(url, model, max_tokens, prompt, timeout)
            except OSError:
                status, ttft, tokens = 0, None, 0
            with lock:
                if status == 200:
                    result.requests += 1
                    result.completion_tokens += tokens
                    if ttft is not None:
                        result.ttft_s.append(ttft)
                elif status in (429, 503):
                    result.refused += 1
                else:
                    result.failed += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * requests_per_client)
    result.seconds = time.perf_counter() - started
    return result


def served_model(url: str) -> str:
    """The one model a server serves (GET /v1/models)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    try:
        connection.request("GET", parts.path.rstrip("/") + "/models")
        return json.loads(connection.getresponse().read())["data"][0]["id"]
    finally:
        connection.close()


def table(rows: list[dict]) -> str:
    """Markdown: one row per (server, clients)."""
    columns = ["server", "clients", "requests", "refused", "failed", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms",
               "tokens_per_s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
