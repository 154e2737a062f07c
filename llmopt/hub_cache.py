"""A Hub repo shared as the compile cache of many machines (a CI matrix compiles each recipe once).

The repo holds one folder per cache key, each a complete artifact (``<key>/llmopt.json`` and its
files). On a local miss ``fetch`` downloads the folder, checks every file's sha256 against its
manifest and moves it into the local cache in one ``os.replace``; after a build ``upload`` commits
the new entry. The remote only ever saves time: when it cannot be reached, or holds a bad entry,
the export warns and compiles.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from llmopt import artifact, events, hub
from llmopt._deps import require
from llmopt.errors import LlmoptError


class RemoteCache:
    def __init__(self, repo_id: str, revision: str | None = None):
        self.repo_id = repo_id
        self.revision = revision

    def fetch(self, key: str, entry: Path) -> bool:
        """Fill the local cache ``entry`` from the remote one of ``key``; False on a remote miss."""
        huggingface_hub = require("huggingface_hub", extra="hub")
        tmp = entry.with_name(f".tmp-remote-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with hub.hub_errors(self.repo_id, "read the cache in"):
                def download(name: str) -> None:
                    huggingface_hub.hf_hub_download(self.repo_id, f"{key}/{name}", revision=self.revision,
                                                    local_dir=tmp, endpoint=hub.endpoint())

                errors = huggingface_hub.errors
                try:
                    download(artifact.MANIFEST_NAME)
                except errors.LocalEntryNotFoundError:
                    raise  # unreachable, not a miss
                except (errors.RepositoryNotFoundError, errors.EntryNotFoundError):
                    events.info(f"remote cache miss in {self.repo_id}", cache_key=key)
                    return False
                with events.step("cache-fetch", f"remote cache hit: downloading {key[:12]} from {self.repo_id}"):
                    manifest = artifact.read_manifest(tmp / key)
                    for name in manifest.files:
                        download(name)
                    artifact.verify_files(tmp / key, manifest)
            os.replace(tmp / key, entry)
            return True
        except (LlmoptError, OSError) as exc:
            if entry.is_dir():  # another job on this machine filled it meanwhile
                return True
            events.warning(f"remote cache {self.repo_id} not used ({getattr(exc, 'message', exc)}); compiling")
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def upload(self, key: str, entry: Path) -> None:
        """Commit the local entry as ``<key>/`` in the remote; a failure only warns."""
        api = hub.client()
        try:
            with hub.hub_errors(self.repo_id, "fill the cache in"):
                with events.step("cache-upload", f"sharing {key[:12]} in {self.repo_id}"):
                    api.create_repo(self.repo_id, exist_ok=True, private=True)
                    api.upload_folder(repo_id=self.repo_id, folder_path=str(entry), path_in_repo=key,
                                      revision=self.revision, commit_message=f"llmopt cache entry {key}")
        except LlmoptError as exc:
            events.warning(f"could not share the artifact in {self.repo_id} ({exc.message}); the export itself succeeded")
