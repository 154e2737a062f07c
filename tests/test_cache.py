"""The compile cache: key, memoized source hashes, verified restore, atomic and concurrent stores."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys

import pytest

from llmopt import artifact, cache
from llmopt.cache import ArtifactCache
from llmopt.cli.main import main
from llmopt.recipe import Recipe

from tests._hardening import edit_manifest, flip_byte, largest_file, pytorch_artifact, small_tmpfs

BACKENDS = ("torch", "transformers")


def _recipe(checkpoint, **shapes) -> Recipe:
    return Recipe.model_validate({"model": {"id": str(checkpoint)}, "target": "onnx", "shapes": shapes})


@pytest.fixture
def checkpoint(tiny_llama, tmp_path):
    return shutil.copytree(tiny_llama, tmp_path / "ckpt")


@pytest.fixture
def store(tmp_path):
    return ArtifactCache(tmp_path / "cache")


def _cached_artifact(checkpoint, directory, key):
    """A real artifact whose manifest carries ``key`` (the manifest is not itself hashed)."""
    path = pytorch_artifact(checkpoint, directory)
    edit_manifest(path, cache_key=key)
    return path


# -- the key ------------------------------------------------------------------------------------


def test_key_is_stable_and_covers_every_input(store, checkpoint):
    key = store.key(_recipe(checkpoint), checkpoint, BACKENDS, validated=True)
    assert len(key) == 64 and key == store.key(_recipe(checkpoint), checkpoint, BACKENDS, validated=True)
    assert key != store.key(_recipe(checkpoint, sequence_length=64), checkpoint, BACKENDS, validated=True)
    assert key != store.key(_recipe(checkpoint), checkpoint, BACKENDS, validated=False)
    assert key != store.key(_recipe(checkpoint), checkpoint, ("torch", "onnx"), validated=True)
    generation = _recipe(checkpoint).model_copy(update={"generation": _recipe(checkpoint).generation.model_copy(update={"top_k": 7})})
    assert key != store.key(generation, checkpoint, BACKENDS, validated=True)  # defaults are stored in the artifact

    (checkpoint / ".cache").mkdir()  # download metadata does not change the artifact
    (checkpoint / ".cache" / "x.metadata").write_text("etag")
    assert key == store.key(_recipe(checkpoint), checkpoint, BACKENDS, validated=True)

    config = checkpoint / "config.json"
    data = json.loads(config.read_text())
    data["rms_norm_eps"] = 1e-5 if data.get("rms_norm_eps") != 1e-5 else 1e-6
    config.write_text(json.dumps(data))
    assert key != store.key(_recipe(checkpoint), checkpoint, BACKENDS, validated=True)


def test_source_files_hashed_once(store, checkpoint, monkeypatch):
    calls = []
    real = artifact.sha256_file
    monkeypatch.setattr(artifact, "sha256_file", lambda path, *a: calls.append(path.name) or real(path, *a))
    first = store.source_hashes(checkpoint)
    assert sorted(calls) == sorted(first) and "model.safetensors" in first
    calls.clear()
    assert store.source_hashes(checkpoint) == first and calls == []  # memoized by (path, size, mtime)
    (checkpoint / "config.json").write_text((checkpoint / "config.json").read_text() + " ")
    assert store.source_hashes(checkpoint) != first and calls == ["config.json"]


def test_unreadable_index_is_rebuilt(store, checkpoint):
    store.root.mkdir(parents=True)
    (store.root / cache.SOURCE_INDEX).write_text("{not json")
    assert store.source_hashes(checkpoint)
    assert json.loads((store.root / cache.SOURCE_INDEX).read_text())


# -- entries ------------------------------------------------------------------------------------


def test_store_then_restore_is_a_verified_copy(store, checkpoint, tmp_path):
    source = _cached_artifact(checkpoint, tmp_path / "built", "k" * 64)
    store.store("k" * 64, source)
    output = tmp_path / "out"
    manifest = store.restore("k" * 64, output)
    assert manifest is not None and manifest.cache_key == "k" * 64
    assert artifact.load(output).files == artifact.load(source).files
    weights = output / "model.safetensors"
    assert not weights.is_symlink() and os.stat(weights).st_ino != os.stat(store.entry("k" * 64) / "model.safetensors").st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "cache", "ckpt", "out"]  # no partial dir left


def test_restore_miss(store, tmp_path):
    assert store.restore("0" * 64, tmp_path / "out") is None
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest", "other-key"])
def test_corrupt_entry_is_removed_never_served(store, checkpoint, tmp_path, damage):
    key = "c" * 64
    store.store(key, _cached_artifact(checkpoint, tmp_path / "built", key))
    entry = store.entry(key)
    weights = largest_file(entry)
    if damage == "flip":
        flip_byte(weights)
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        weights.unlink()
    elif damage == "manifest":
        (entry / artifact.MANIFEST_NAME).write_text("{")
    else:
        edit_manifest(entry, cache_key="d" * 64)
    output = tmp_path / "out"
    assert store.restore(key, output) is None
    assert not entry.exists() and not output.exists()
    assert not [p for p in tmp_path.iterdir() if artifact.PARTIAL_MARKER in p.name]


def test_restore_keeps_existing_output_without_force(store, checkpoint, tmp_path):
    from llmopt.errors import UsageError

    key = "e" * 64
    store.store(key, _cached_artifact(checkpoint, tmp_path / "built", key))
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        store.restore(key, tmp_path / "out")
    assert store.restore(key, tmp_path / "out", force=True) is not None
    artifact.load(tmp_path / "out")


def test_full_output_disk_keeps_the_entry(store, checkpoint, tmp_path):
    """ENOSPC while restoring is the output's problem, not a bad entry: it propagates, the entry stays."""
    import errno

    key = "9" * 64
    store.store(key, _cached_artifact(checkpoint, tmp_path / "built", key))
    with small_tmpfs(tmp_path / "small", "64k") as disk:
        with pytest.raises(OSError) as error:
            store.restore(key, disk / "out")
        assert error.value.errno == errno.ENOSPC
        assert list(disk.iterdir()) == []
    artifact.load(store.entry(key))


def _store_in_child(root, key, source):
    ArtifactCache(root).store(key, source)


def test_concurrent_stores_of_one_key(store, checkpoint, tmp_path):
    key = "f" * 64
    source = _cached_artifact(checkpoint, tmp_path / "built", key)
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_store_in_child, args=(store.root, key, source)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert artifact.load(store.entry(key)).cache_key == key
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []


def test_copies_left_by_killed_jobs_are_swept(store, checkpoint, tmp_path):
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join()
    leftover = store.root / f".tmp-{dead.pid}-abcd@{socket.gethostname()}"
    other_host = store.root / f".tmp-{dead.pid}-abcd@some-other-host"
    for path in (leftover, other_host):
        path.mkdir(parents=True)
    store.store("a" * 64, _cached_artifact(checkpoint, tmp_path / "built", "a" * 64))
    assert not leftover.exists() and other_host.exists()  # another host's pid cannot be checked here


def test_store_failure_does_not_fail(store, checkpoint, tmp_path):
    store.root.parent.mkdir(exist_ok=True)
    store.root.write_text("not a directory")  # an unusable cache path
    store.store("b" * 64, pytorch_artifact(checkpoint, tmp_path / "built"))  # warns, does not raise


# -- through the CLI (real ONNX exports) ----------------------------------------------------------


def _export(checkpoint, output, *flags):
    return main(["--log-format", "json", "export", "-m", str(checkpoint), "-t", "onnx", "--sequence-length", "32",
                 "-o", str(output), "--json", *flags])


def _events(stderr):
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_second_export_is_served_from_cache(tiny_llama, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    assert _export(tiny_llama, tmp_path / "a", "--cache-dir", str(cache_dir)) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cached"] is False and len(first["cache_key"]) == 64
    assert (cache_dir / first["cache_key"] / artifact.MANIFEST_NAME).is_file()

    assert _export(tiny_llama, tmp_path / "b", "--cache-dir", str(cache_dir)) == 0
    captured = capsys.readouterr()
    second = json.loads(captured.out)
    steps = {event.get("step") for event in _events(captured.err)}
    assert second["cached"] is True and second["cache_key"] == first["cache_key"]
    assert "restore" in steps and "export" not in steps and "validate" not in steps
    assert any(first["cache_key"] in event["message"] for event in _events(captured.err))
    assert artifact.load(tmp_path / "b").files == artifact.load(tmp_path / "a").files
    assert artifact.load(tmp_path / "b").cache_key == first["cache_key"]

    # a corrupt entry is detected, removed and rebuilt, never served
    flip_byte(largest_file(cache_dir / first["cache_key"]))
    assert _export(tiny_llama, tmp_path / "c", "--cache-dir", str(cache_dir)) == 0
    captured = capsys.readouterr()
    third = json.loads(captured.out)
    assert third["cached"] is False
    assert any(e["level"] == "warning" and "unusable" in e["message"] for e in _events(captured.err))
    artifact.load(tmp_path / "c")
    artifact.load(cache_dir / first["cache_key"])  # stored again, intact


def test_no_cache_and_env_dir(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "envcache"))
    assert cache.default_dir() == tmp_path / "envcache" / "artifacts"
    assert _export(tiny_llama, tmp_path / "a", "--no-cache") == 0
    assert json.loads(capsys.readouterr().out)["cache_key"] is None
    assert not (tmp_path / "envcache").exists()
    assert _export(tiny_llama, tmp_path / "b", "--no-validate") == 0
    key = json.loads(capsys.readouterr().out)["cache_key"]
    assert (tmp_path / "envcache" / "artifacts" / key).is_dir()


def test_changed_source_misses(tiny_llama, tmp_path, capsys):
    checkpoint = shutil.copytree(tiny_llama, tmp_path / "ckpt")
    cache_dir = tmp_path / "cache"
    assert _export(checkpoint, tmp_path / "a", "--cache-dir", str(cache_dir), "--no-validate") == 0
    first = json.loads(capsys.readouterr().out)["cache_key"]
    generation_config = checkpoint / "generation_config.json"
    generation_config.write_text(generation_config.read_text().replace("}", ', "note": 1}', 1))
    assert _export(checkpoint, tmp_path / "b", "--cache-dir", str(cache_dir), "--no-validate") == 0
    second = json.loads(capsys.readouterr().out)
    assert second["cached"] is False and second["cache_key"] != first


def test_hit_from_another_path_records_this_source(tiny_llama, tmp_path, capsys):
    """The key is the content, not the path: a copy of the checkpoint hits, and the restored
    manifest names the copy (the bench finds its baseline checkpoint there)."""
    cache_dir = tmp_path / "cache"
    assert _export(tiny_llama, tmp_path / "a", "--cache-dir", str(cache_dir), "--no-validate") == 0
    first = json.loads(capsys.readouterr().out)
    moved = shutil.copytree(tiny_llama, tmp_path / "moved-ckpt")
    assert _export(moved, tmp_path / "b", "--cache-dir", str(cache_dir), "--no-validate") == 0
    second = json.loads(capsys.readouterr().out)
    assert second["cached"] is True and second["cache_key"] == first["cache_key"]
    restored = artifact.load(tmp_path / "b", verify=True)
    assert restored.source["checkpoint"] == str(moved) and restored.source["model"] == str(moved)
    assert restored.recipe["model"]["id"] == str(moved)
    assert artifact.load(cache_dir / first["cache_key"]).source["checkpoint"] == str(tiny_llama)  # entry untouched


def test_two_jobs_share_a_cache(tiny_llama, tmp_path):
    """Two CI jobs at once, one cache directory: both succeed and leave one intact entry."""
    cache_dir = tmp_path / "cache"
    code = "import sys; from llmopt.cli.main import main; sys.exit(main(sys.argv[1:]))"
    jobs = [
        subprocess.Popen([sys.executable, "-c", code, "-q", "export", "-m", str(tiny_llama), "-t", "onnx",
                          "--sequence-length", "32", "-o", str(tmp_path / f"out{i}"), "--cache-dir", str(cache_dir),
                          "--no-validate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for i in range(2)
    ]
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    entries = [p for p in cache_dir.iterdir() if not p.name.startswith((".", "source-"))]
    assert len(entries) == 1
    artifact.load(entries[0])
    for i in range(2):
        artifact.load(tmp_path / f"out{i}")
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
