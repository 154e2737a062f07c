"""``llmopt push`` and ``llmopt pull``: artifacts to and from the Hugging Face Hub ($HF_ENDPOINT, $HF_TOKEN)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llmopt import hub
from llmopt.cli import _output
from llmopt.cli.main import app


@app.command()
def push(
    artifact: Path = typer.Argument(..., help="Artifact directory made by llmopt export or quantize."),
    repo_id: str = typer.Argument(..., help="Hub repo to push to, e.g. me/smollm2-onnx-int4 (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
) -> None:
    """Upload an artifact (re-hashed first) with a model card; the manifest travels with it."""
    result = hub.push(artifact, repo_id, private=private, message=message)
    if json_output:
        _output.print_json(result)
        return
    typer.echo(f"{result['url']}  commit={result['commit'][:12]}  {result['files']} files  "
               f"{result['size_bytes'] / 1e6:.1f} MB")


@app.command()
def pull(
    repo_id: str = typer.Argument(..., help="Hub repo of a pushed artifact: org/name."),
    output: Path = typer.Option(..., "--output", "-o", help="Artifact directory to create."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact (atomically)."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
) -> None:
    """Download an artifact; every file's sha256 and the backend versions are checked before it lands."""
    result = hub.pull(repo_id, output, revision=revision, force=force)
    manifest = result["manifest"]
    if json_output:
        _output.print_json({"repo_id": repo_id, "commit": result["commit"], "output": result["output"],
                            "target": manifest.target, "files_verified": len(manifest.files)})
        return
    typer.echo(f"{result['output']}  target={manifest.target}  commit={str(result['commit'])[:12]}  "
               f"{len(manifest.files)} files verified")
