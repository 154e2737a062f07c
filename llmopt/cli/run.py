"""``llmopt run``: load an artifact and generate, streaming tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from llmopt import api
from llmopt.cli import _output
from llmopt.cli.main import app
from llmopt.errors import UsageError
from llmopt.runners.base import Speculation


def read_prompts_file(path: Path) -> list[str]:
    """Text (one prompt per line) or JSONL (objects with a "prompt" field, or JSON strings)."""
    if not path.is_file():
        raise UsageError(f"prompts file '{path}' not found")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"prompts file '{path}' line {number}: not valid JSON ({exc.msg})") from exc
            if isinstance(item, dict) and isinstance(item.get("prompt"), str):
                item = item["prompt"]
            if not isinstance(item, str):
                raise UsageError(f"prompts file '{path}' line {number}: expected a string or an object with \"prompt\"")
            prompts.append(item)
        else:
            prompts.append(line)
    return prompts


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="Artifact directory made by llmopt export or quantize."),
    prompts: list[str] = typer.Argument(None, help="One or more prompts."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="Prompts: text (one per line) or JSONL."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "--max_new_tokens", min=1),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="0 means greedy. Unset: the "
                                                "checkpoint's generation_config.json, else 0.7 (top-p 0.9, seed 0)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "--top_k", min=0),
    top_p: Optional[float] = typer.Option(None, "--top-p", "--top_p", min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout."),
    prompt_lookup: int = typer.Option(0, "--prompt-lookup", min=0, help="Prompt-lookup decoding: N candidate tokens "
                                      "copied from the prompt per step (helps when the output quotes the input)."),
    draft: Optional[Path] = typer.Option(None, "--draft", help="Assisted generation: a draft model sharing the "
                                         "tokenizer (an artifact of the same target, e.g. its int4 build)."),
    draft_tokens: int = typer.Option(5, "--draft-tokens", min=1, help="Candidate tokens per step with --draft."),
) -> None:
    """Generate from one or more prompts, streaming tokens to stdout."""
    all_prompts = list(prompts or [])
    if prompts_file is not None:
        all_prompts += read_prompts_file(prompts_file)
    if not all_prompts:
        raise UsageError("no prompt given; pass PROMPT arguments or --prompts-file")
    stream = not json_output and len(all_prompts) == 1

    def on_text(index: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt_lookup and draft is not None:
        raise UsageError("--prompt-lookup and --draft are two ways to propose candidates; choose one")
    speculation = None
    if prompt_lookup:
        speculation = Speculation("prompt-lookup", prompt_lookup)
    elif draft is not None:
        speculation = Speculation("draft", draft_tokens, str(draft))
    results = api.run(
        artifact, all_prompts, chat=not raw, on_text=on_text if stream else None, speculation=speculation,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
    )
    for result in results:
        if json_output:
            _output.print_json(result.to_dict())
        elif stream:
            sys.stdout.write("\n")
        else:
            typer.echo(f"### {result.prompt}\n{result.text}\n")
    for result in results:
        if not json_output:
            sys.stderr.write(
                f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated, "
                f"ttft {result.ttft_ms:.0f} ms, {result.tokens_per_s:.1f} tokens/s, finish: {result.finish_reason}, "
                f"{result.sampling}]\n"
            )
