"""``llmopt serve`` end to end: a real server process, the real ``openai`` client, loopback only.

The artifacts are tiny random Llamas (ONNX pinned to batch 2, OpenVINO dynamic), built once per
session; every request loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmopt.cli.main import main
from tests._hardening import assert_one_line_error

openai = pytest.importorskip("openai", reason="pip install 'llmopt[dev]'")
pytest.importorskip("fastapi", reason="pip install 'llmopt[serve]'")

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT_S = 90
PROMPTS = ["Hi", "The quick brown fox", "Compilers turn programs into machine code", "def generate(tokens):"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Server:
    """``llmopt serve`` in a child process on 127.0.0.1."""

    def __init__(self, artifact: Path, *flags: str, timeout: float = START_TIMEOUT_S):
        self.port = free_port()
        self.name = artifact.name
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        command = [sys.executable, "-c", "from llmopt.cli.main import entry; entry()", "serve", str(artifact),
                   "--host", HOST, "--port", str(self.port), *flags]
        self.log = open(artifact.parent / f"serve-{self.port}.log", "w+")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"llmopt serve exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                status, body = self.get("/health")
                if status == 200 and "llmopt: http://" in self.output():  # Ray: every replica is up
                    return
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"llmopt serve did not become healthy in {timeout}s:\n{self.output()}")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def client(self, **options):
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=options.pop("timeout", 60),
                             **options)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30):
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read().decode(), dict(response.getheaders())
        finally:
            connection.close()

    def get(self, path: str):
        status, body, _ = self.request("GET", path, timeout=5)
        return status, json.loads(body) if body.startswith(("{", "[")) else body

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.flush()
        return self.process.returncode


@pytest.fixture(scope="module")
def onnx_artifact(untied_llama, build_artifact):
    return build_artifact(untied_llama, target="onnx", **{"shapes.batch_size": 2, "shapes.sequence_length": 64})


@pytest.fixture(scope="module")
def ov_artifact(untied_llama, build_artifact):
    return build_artifact(untied_llama, target="openvino", **{"shapes.sequence_length": 64})


@pytest.fixture(scope="module")
def onnx_server(onnx_artifact):
    server = Server(onnx_artifact)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ov_server(ov_artifact):
    server = Server(ov_artifact)
    yield server
    server.stop()


def chat(client, name: str, prompt: str, **options):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}], **options)


# -- the API -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["onnx_server", "ov_server"])
def test_chat_and_completion_streaming_and_not(request, which):
    server = request.getfixturevalue(which)
    client = server.client()
    whole = chat(client, server.name, "The quick brown fox", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(chat(client, server.name, "The quick brown fox", max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # usage in every response

    text = client.completions.create(model=server.name, prompt="def generate(tokens):", max_tokens=8, temperature=0)
    assert text.usage.completion_tokens <= 8 and text.object == "text_completion"
    streamed = list(client.completions.create(model=server.name, prompt="def generate(tokens):", max_tokens=8,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == text.choices[0].text
    assert streamed[-1].choices == [] and streamed[-1].usage.total_tokens == text.usage.total_tokens
    assert [model.id for model in client.models.list().data] == [server.name]


@pytest.mark.parametrize("which, artifact", [("onnx_server", "onnx_artifact"), ("ov_server", "ov_artifact")])
def test_greedy_answers_equal_llmopt_run(request, which, artifact):
    """Token for token: the same text and the same number of tokens as `llmopt run --temperature 0`."""
    from llmopt import api

    server, path = request.getfixturevalue(which), request.getfixturevalue(artifact)
    expected_chat = api.run(path, PROMPTS, chat=True, temperature=0, max_new_tokens=16)
    expected_raw = api.run(path, PROMPTS, chat=False, temperature=0, max_new_tokens=16)
    client = server.client()
    for prompt, chat_result, raw_result in zip(PROMPTS, expected_chat, expected_raw):
        answer = chat(client, server.name, prompt, max_tokens=16, temperature=0)
        assert answer.choices[0].message.content == chat_result.text
        assert answer.usage.completion_tokens == len(chat_result.token_ids)
        assert answer.usage.prompt_tokens == chat_result.prompt_tokens
        assert answer.choices[0].finish_reason == chat_result.finish_reason
        completion = client.completions.create(model=server.name, prompt=prompt, max_tokens=16, temperature=0)
        assert completion.choices[0].text == raw_result.text
        assert completion.usage.completion_tokens == len(raw_result.token_ids)


@pytest.mark.parametrize("which", ["onnx_server", "ov_server"])
def test_sixteen_concurrent_clients_all_answered_like_one(request, which):
    """Batched (pinned batch of 2) or continuous: each of 16 concurrent answers equals the answer alone."""
    server = request.getfixturevalue(which)
    client = server.client()
    alone = {prompt: chat(client, server.name, prompt, max_tokens=10, temperature=0).choices[0].message.content
             for prompt in PROMPTS}
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        answers[index] = chat(server.client(), server.name, PROMPTS[index % 4], max_tokens=10,
                              temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(answers) == list(range(16))
    assert all(answers[index] == alone[PROMPTS[index % 4]] for index in range(16))


def test_per_request_sampling_stop_and_seed(onnx_server):
    client = onnx_server.client()
    greedy = client.completions.create(model=onnx_server.name, prompt="The quick brown fox", max_tokens=16,
                                       temperature=0).choices[0].text
    stop = greedy[3:5]
    assert stop, greedy
    cut = client.completions.create(model=onnx_server.name, prompt="The quick brown fox", max_tokens=16,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=onnx_server.name, prompt="The quick brown fox", max_tokens=16,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == cut.choices[0].text

    def sampled(seed: int) -> str:
        return client.completions.create(model=onnx_server.name, prompt="The quick brown fox", max_tokens=16,
                                         temperature=1.5, top_p=0.9, seed=seed).choices[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1
    assert client.completions.create(model=onnx_server.name, prompt="Hi", max_tokens=3).usage.completion_tokens <= 3


# -- bad input -----------------------------------------------------------------------------------------


def test_error_answers_name_the_problem(onnx_server):
    client = onnx_server.client()
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=onnx_server.name, prompt="The quick brown fox " * 40, max_tokens=4)
    message = too_long.value.body["message"]
    assert "accepts at most 63" in message and "the prompt has" in message
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        client.completions.create(model=onnx_server.name, prompt="Hi", extra_body={"max_tokenz": 3})
    assert "max_tokenz" in unknown.value.body["message"] and unknown.value.body["param"] == "max_tokenz"
    with pytest.raises(openai.UnprocessableEntityError) as bad_value:
        chat(client, onnx_server.name, "Hi", temperature=-1)
    assert bad_value.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        chat(client, "../../../../tmp/llmopt-serve-probe", "Hi")
    assert not Path("/tmp/llmopt-serve-probe").exists()

    status, body, _ = onnx_server.request("POST", "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400 and "malformed JSON" in json.loads(body)["error"]["message"]
    status, body, _ = onnx_server.request("POST", "/v1/completions", json.dumps({"model": onnx_server.name}).encode())
    assert status == 422 and json.loads(body)["error"]["param"] == "prompt"
    assert onnx_server.get("/health")[0] == 200  # still serving


def test_metrics_and_health(onnx_server):
    chat(onnx_server.client(), onnx_server.name, "Hi", max_tokens=4)
    status, text = onnx_server.get("/metrics")
    assert status == 200
    for name in ("llmopt_requests_total", "llmopt_queue_depth", "llmopt_time_to_first_token_seconds_count",
                 "llmopt_decode_tokens_per_second_bucket", 'llmopt_tokens_total{kind="completion"}'):
        assert name in text, name
    status, health = onnx_server.get("/health")
    assert status == 200 and health["engine"] == "pinned-batch" and health["pending"] == 0


# -- load, disconnects, SIGTERM: a server whose one slot a lone request holds for 1.5 s ------------------


@pytest.fixture
def slow_server(onnx_artifact):
    """Capacity 1; a lone request waits 1.5 s for a second one to share its batch of 2."""
    server = Server(onnx_artifact, "--max-queue", "1", "--batch-window-ms", "1500")
    yield server
    server.stop()


def test_over_capacity_refused_with_retry_after_never_lost(slow_server):
    outcomes: dict[int, object] = {}

    def ask(index: int) -> None:
        try:
            outcomes[index] = slow_server.client(timeout=30).completions.create(
                model=slow_server.name, prompt=PROMPTS[index % 4], max_tokens=4, temperature=0)
        except openai.RateLimitError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(16)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert time.monotonic() - started < 30 and sorted(outcomes) == list(range(16))
    answered = [item for item in outcomes.values() if not isinstance(item, Exception)]
    refused = [item for item in outcomes.values() if isinstance(item, Exception)]
    assert len(answered) >= 1 and len(refused) >= 1 and len(answered) + len(refused) == 16
    assert all(item.usage.completion_tokens >= 1 for item in answered)
    assert all(item.status_code == 429 and item.response.headers["retry-after"] == "1" for item in refused)


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    connection = http.client.HTTPConnection(HOST, slow_server.port, timeout=10)
    body = {"model": slow_server.name, "prompt": "Hi", "max_tokens": 4, "stream": True}
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    time.sleep(0.2)
    assert slow_server.get("/health")[1]["pending"] == 1
    response.close()
    connection.close()  # gone while its request waits for company
    deadline = time.monotonic() + 1.2  # well before the 1.5 s window would have ended it
    while slow_server.get("/health")[1]["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_server.get("/health")[1]["pending"] == 0


def test_sigterm_drains_in_flight_requests(slow_server):
    result: dict = {}

    def ask() -> None:
        result["answer"] = slow_server.client(timeout=30).completions.create(model=slow_server.name, prompt="Hi",
                                                                              max_tokens=4, temperature=0)

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.4)  # admitted, waiting in its batch window
    slow_server.process.send_signal(signal.SIGTERM)
    thread.join(30)
    # uvicorn re-raises the SIGTERM it handled once it has drained: the exit status says "terminated"
    assert slow_server.process.wait(30) in (0, -signal.SIGTERM), slow_server.output()
    assert result["answer"].usage.completion_tokens >= 1
    with pytest.raises(OSError):
        slow_server.request("GET", "/health", timeout=2)


# -- Ray Serve ------------------------------------------------------------------------------------------


def test_two_ray_serve_replicas(onnx_artifact, onnx_server):
    pytest.importorskip("ray.serve", reason="pip install 'llmopt[ray]'")
    expected = {prompt: chat(onnx_server.client(), onnx_server.name, prompt, max_tokens=8, temperature=0)
                .choices[0].message.content for prompt in PROMPTS}
    server = Server(onnx_artifact, "--replicas", "2", timeout=150)
    try:
        answers: dict[int, str] = {}
        replicas: set[str] = set()

        def ask(index: int) -> None:
            raw = server.client().chat.completions.with_raw_response.create(
                model=server.name, messages=[{"role": "user", "content": PROMPTS[index % 4]}], max_tokens=8,
                temperature=0)
            replicas.add(raw.headers["x-llmopt-replica"])
            answers[index] = raw.parse().choices[0].message.content

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert {index: answers.get(index) for index in range(8)} == {index: expected[PROMPTS[index % 4]]
                                                                     for index in range(8)}
        streamed = list(chat(server.client(), server.name, PROMPTS[1], max_tokens=8, temperature=0, stream=True))
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == expected[PROMPTS[1]]
        assert len(replicas) == 2, replicas  # both replicas answered
        assert "on 2 Ray Serve replicas" in server.output()
    finally:
        assert server.stop(90) in (0, -signal.SIGTERM), server.output()


# -- the CLI ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, code, words", [
    (["--replicas", "0"], 2, "--replicas"),
    (["--ray-address", "127.0.0.1:6379"], 2, "--replicas"),
    (["--port", "70000"], 2, "--port"),
    (["--max-queue", "0"], 2, "--max-queue"),
])
def test_bad_cli_input_is_one_line(capsys, onnx_artifact, arguments, code, words):
    assert main(["-q", "serve", str(onnx_artifact), *arguments]) == code
    assert words in assert_one_line_error(capsys.readouterr().err)


def test_missing_artifact_and_busy_port_are_one_line(capsys, tmp_path, onnx_server, onnx_artifact):
    assert main(["-q", "serve", str(tmp_path / "nope")]) in (1, 2)
    assert "nope" in assert_one_line_error(capsys.readouterr().err)
    assert main(["-q", "serve", str(onnx_artifact), "--port", str(onnx_server.port)]) == 1
    assert "already in use" in assert_one_line_error(capsys.readouterr().err)
