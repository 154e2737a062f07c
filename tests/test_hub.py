"""push / pull / Hub ids as artifact paths, with the real huggingface_hub client over real HTTP against
``tests/hub_server.py`` on 127.0.0.1 (the CLI in a fresh process: huggingface_hub reads HF_ENDPOINT at import)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from llmopt import artifact, hub
from tests._hardening import ROOT, assert_one_line_error, llmopt_subprocess, pytorch_artifact
from tests.hub_server import HubServer, Repo

TOKEN = "hf_llmoptTestSecret0123456789"


@pytest.fixture(scope="module")
def server():
    with HubServer(token=TOKEN) as running:
        yield running


@pytest.fixture()
def hub_env(server, tmp_path):
    """The CLI's environment: the local server, a token, online, private caches."""
    return {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"), "LLMOPT_CACHE_DIR": str(tmp_path / "llmopt-cache")}


@pytest.fixture(scope="module")
def art(tiny_llama, tmp_path_factory):
    return pytorch_artifact(tiny_llama, tmp_path_factory.mktemp("hub") / "art")


def cli(args, env, **kwargs):
    result = llmopt_subprocess(args, env=env, timeout=240, **kwargs)
    assert TOKEN not in result.stdout + result.stderr  # never printed, on success or failure
    return result


def test_push_then_pull_round_trip(server, art, hub_env, tmp_path):
    pushed = cli(["push", str(art), "me/tiny-art", "--json"], hub_env)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["commit"] == server.repos["me/tiny-art"].head
    remote = server.files("me/tiny-art")
    manifest = artifact.read_manifest(art)
    assert set(remote) == {*manifest.files, artifact.MANIFEST_NAME, hub.CARD_NAME}
    card = remote[hub.CARD_NAME].decode()
    for fact in ("| target | pytorch |", "sequence_length=32", "| precision | fp32 |", "| quantization | none |",
                 "| parity |", "torch "):
        assert fact in card, card
    assert "model.safetensors" in server.repos["me/tiny-art"].lfs  # large files went through LFS, not Xet

    pulled = cli(["pull", "me/tiny-art", "-o", str(tmp_path / "pulled")], hub_env)
    assert pulled.returncode == 0, pulled.stderr
    assert "files verified" in pulled.stdout
    assert artifact.load(tmp_path / "pulled", verify=True).files == manifest.files
    assert not any(path.name.startswith(".") for path in (tmp_path / "pulled").iterdir())  # no hub bookkeeping left


def test_hub_id_is_an_artifact_path_then_works_offline(server, art, hub_env):
    assert cli(["push", str(art), "me/run-me"], hub_env).returncode == 0
    verified = cli(["verify", "me/run-me"], hub_env)
    assert verified.returncode == 0, verified.stderr
    assert "files verified" in verified.stdout
    ran = cli(["run", "me/run-me", "Hi", "--max-new-tokens", "2", "--json"], hub_env)
    assert ran.returncode == 0, ran.stderr
    assert len(json.loads(ran.stdout.splitlines()[0])["token_ids"]) >= 1
    served = len(server.requests)
    offline = cli(["verify", "me/run-me"], {**hub_env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0, offline.stderr
    assert len(server.requests) == served  # served from the local copy


def test_corrupted_remote_file_refused(server, art, hub_env, tmp_path):
    assert cli(["push", str(art), "me/corrupt"], hub_env).returncode == 0
    server.corrupt("me/corrupt", "model.safetensors")
    result = cli(["pull", "me/corrupt", "-o", str(tmp_path / "out")], hub_env)
    assert result.returncode == 1
    error = assert_one_line_error(result.stderr)
    assert "model.safetensors" in error and "sha256" in error, error
    assert list(tmp_path.glob("out*")) == []  # nothing written, not even a partial directory


def test_missing_repo_refused_in_one_line(server, hub_env, tmp_path):
    result = cli(["pull", "me/does-not-exist", "-o", str(tmp_path / "out")], hub_env)
    assert result.returncode == 1
    assert "not found" in assert_one_line_error(result.stderr)
    assert not (tmp_path / "out").exists()
    run = cli(["verify", "me/does-not-exist"], hub_env)
    assert run.returncode == 1 and "not found" in assert_one_line_error(run.stderr)


def test_push_without_a_valid_token_refused(server, art, hub_env):
    result = cli(["push", str(art), "me/no-token"], {**hub_env, "HF_TOKEN": "hf_wrong"})
    assert result.returncode == 1
    assert "not allowed" in assert_one_line_error(result.stderr)
    assert "me/no-token" not in server.repos


def test_not_an_artifact_repo_refused(server, hub_env, tmp_path):
    server.repos["me/plain"] = Repo(head="a" * 40, commits={"a" * 40: {"notes.txt": b"hello"}})
    result = cli(["pull", "me/plain", "-o", str(tmp_path / "out")], hub_env)
    assert result.returncode == 1
    assert "llmopt.json" in assert_one_line_error(result.stderr)


def test_interrupted_pull_leaves_nothing(server, art, hub_env, tmp_path):
    assert cli(["push", str(art), "me/slow"], hub_env).returncode == 0
    output = tmp_path / "out"
    server.delays["model.safetensors"] = 30.0
    code = "import sys; from llmopt.cli.main import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "pull", "me/slow", "-o", str(output)], cwd=ROOT,
                               env={**__import__("os").environ, **hub_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(r.endswith("/model.safetensors") and r.startswith("GET") for r in server.requests[-5:]):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        process.kill()  # mid-download
        process.wait()
    finally:
        server.delays.clear()
    assert not output.exists()
    again = cli(["pull", "me/slow", "-o", str(output)], hub_env)
    assert again.returncode == 0, again.stderr
    assert artifact.load(output, verify=True)
    assert list(tmp_path.glob("out.partial-*")) == []  # the killed pull's staging directory swept


@pytest.mark.onnx
def test_remote_cache_compiles_each_recipe_once(server, tiny_llama, hub_env, tmp_path):
    """Two CI jobs with empty local caches share one Hub repo: the first compiles and uploads, the second downloads."""
    pytest.importorskip("onnxruntime_genai", reason="pip install 'llmopt[onnx]'")
    args = ["export", "-m", str(tiny_llama), "-t", "onnx", "--sequence-length", "32", "--no-validate",
            "--cache-repo", "ci/compile-cache", "--json"]
    first = cli([*args, "-o", str(tmp_path / "job1")], {**hub_env, "LLMOPT_CACHE_DIR": str(tmp_path / "cache1")})
    assert first.returncode == 0, first.stderr
    built = json.loads(first.stdout)
    assert not built["cached"]
    remote = server.files("ci/compile-cache")
    assert f"{built['cache_key']}/{artifact.MANIFEST_NAME}" in remote
    second = cli([*args, "-o", str(tmp_path / "job2")], {**hub_env, "LLMOPT_CACHE_DIR": str(tmp_path / "cache2")})
    assert second.returncode == 0, second.stderr
    fetched = json.loads(second.stdout)
    assert fetched["cached"] and fetched["cache_key"] == built["cache_key"]
    assert artifact.load(tmp_path / "job2", verify=True).files == artifact.load(tmp_path / "job1").files
    unreachable = cli([*args, "-o", str(tmp_path / "job3")], {**hub_env, "LLMOPT_CACHE_DIR": str(tmp_path / "cache3"),
                                                               "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert unreachable.returncode == 0, unreachable.stderr  # the remote only saves time: compiled here instead
    assert "compiling" in unreachable.stderr
