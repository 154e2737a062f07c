"""Plan a benchmark: its subjects (artifacts, PyTorch baselines) and their cases, and the prompts.

Rules:

* Input lengths are ``ratio x`` each artifact's pinned sequence_length (or ``--input-lengths``);
  new tokens fill the rest of the sequence (capped by ``--new-tokens``), as the Inferentia2 guide
  sweeps 25/50/75 % and generates up to the sequence length.
* Batch sizes: an artifact runs only its own pinned batch size; a requested batch size other than
  that gives one ``skipped`` row with a note. The PyTorch baseline takes any batch size: it runs
  every requested one (default: the artifacts' own), at every (input, new tokens) pair an artifact
  of the same checkpoint runs, so each artifact row has a baseline row to compare with.
* Every subject sees the same prompts (built once here, from one tokenizer), greedy, end-of-sequence
  ignored, so every run generates exactly its number of new tokens.
* Subjects run one after another, each in a fresh process (``llmopt.benchmark.worker``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmopt import artifact, hub
from llmopt.benchmark import prompts as prompt_module
from llmopt.errors import UsageError
from llmopt.runners.base import Speculation
from llmopt.runners.pytorch import PyTorchRunner  # its module imports neither torch nor transformers

PYTORCH_MODES = ("eager", "static", "compile")
DEFAULT_SEQUENCE_LENGTH = 512  # a baseline-only run with no --sequence-length
GROUNDED_NEW_TOKENS = 128
# A plain run measures one case, as llama-bench does: a 128-token prompt, then 128 new tokens (both
# capped to fit the sequence length). The 25/50/75 % sweep is SWEEP_RATIOS (llmopt bench --sweep).
DEFAULT_INPUT_LENGTH = 128
DEFAULT_NEW_TOKENS = 128
SWEEP_RATIOS = (0.25, 0.5, 0.75)


@dataclass
class BenchConfig:
    artifacts: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)  # PyTorch modes
    baseline_model: str | None = None
    baseline_dtype: str = "fp32"
    input_ratios: list[float] | None = None  # fractions of each sequence_length (the sweep)
    input_lengths: list[int] | None = None  # absolute lengths; with neither, one DEFAULT_INPUT_LENGTH case
    new_tokens: int | None = None  # cap; default DEFAULT_NEW_TOKENS for the one case, the rest of the sequence otherwise
    batch_sizes: list[int] | None = None
    sequence_length: int | None = None  # only for a baseline-only run
    repetitions: int = 5
    warmup: int = 1
    seed: int = 0
    threads: int | None = None
    prompt_lookup: int = 0  # candidate tokens for prompt-lookup rows (0: none)
    drafts: list[str] = field(default_factory=list)  # draft models for assisted-generation rows
    draft_tokens: int = 5  # candidate tokens per step with a draft
    verify: bool = True
    profile: bool = False  # one more run of each subject's first case under its runtime's profiler
    extra_subjects: list["Subject"] = field(default_factory=list)  # pinned subjects built by scripts


@dataclass
class Case:
    batch_size: int
    input_length: int
    new_tokens: int
    prompt: str = "synthetic"  # or "grounded"
    speculation: Speculation | None = None

    @property
    def decoding(self) -> str:
        return self.speculation.label if self.speculation else "greedy"

    def key(self) -> tuple:
        return (self.batch_size, self.input_length, self.new_tokens, self.prompt, self.decoding)


@dataclass
class Subject:
    name: str
    kind: str  # "artifact" or "pytorch"
    path: str
    target: str
    sequence_length: int
    batch_size: int | None = None  # pinned (artifacts); None takes any
    mode: str | None = None
    dtype: str | None = None
    precision: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    speculation_methods: tuple[str, ...] = ()  # what its runner supports (runners.base.Speculation)
    factory: str | None = None  # kind "peer": "module:function" returning a runner (path, batch, length, threads=)
    pythonpath: str | None = None  # where the worker finds the factory's module
    tokenizer: str | None = None  # directory of the tokenizer, when ``path`` holds none
    cases: list[Case] = field(default_factory=list)
    skipped: list[tuple[Case | None, str]] = field(default_factory=list)


def parse_baselines(specs: list[str]) -> list[str]:
    """``pytorch`` (eager), ``pytorch:all`` (eager, static, compile), ``pytorch:eager,static``, or ``none``."""
    modes: list[str] = []
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item or item == "none":
                continue
            runtime, _, mode = item.partition(":")
            if runtime == "pytorch" and not mode:
                chosen = ["eager"]
            elif runtime == "pytorch" and mode == "all":
                chosen = list(PYTORCH_MODES)
            elif runtime == "pytorch" and mode in PYTORCH_MODES:
                chosen = [mode]
            elif not mode and item in PYTORCH_MODES:  # the second mode of "pytorch:eager,static"
                chosen = [item]
            else:
                raise UsageError(f"unknown baseline '{item}'; accepted: pytorch (eager), pytorch:all, "
                                 + ", ".join(f"pytorch:{mode}" for mode in PYTORCH_MODES) + ", none")
            modes += [mode for mode in chosen if mode not in modes]
    return modes


def _input_pairs(config: BenchConfig, sequence_length: int) -> tuple[list[tuple[int, int]], list[str]]:
    """(input length, new tokens) pairs for one sequence length, and notes on lengths that do not fit."""
    if not config.input_lengths and not config.input_ratios:  # the one default case
        length = min(DEFAULT_INPUT_LENGTH, sequence_length // 2)
        return [(length, min(config.new_tokens or DEFAULT_NEW_TOKENS, sequence_length - length))], []
    lengths = config.input_lengths or [max(1, round(ratio * sequence_length)) for ratio in config.input_ratios]
    pairs, notes = [], []
    for length in dict.fromkeys(lengths):
        if length >= sequence_length:
            notes.append(f"input length {length} leaves no room to generate in sequence_length {sequence_length}")
            continue
        room = sequence_length - length
        pairs.append((length, min(config.new_tokens, room) if config.new_tokens else room))
    return pairs, notes


def _checkpoint_of(manifest, config: BenchConfig) -> str | None:
    if config.baseline_model:
        return config.baseline_model
    checkpoint = (manifest.source or {}).get("checkpoint")
    return checkpoint if checkpoint and Path(checkpoint).is_dir() else None


def plan_subjects(config: BenchConfig) -> tuple[list[Subject], list[str], int]:
    """Every subject with its cases (and its skipped cases), run-wide notes, and the grounded prompt's
    token budget (0 without --prompt-lookup)."""
    from llmopt.registry import runner_class

    notes: list[str] = []
    subjects: list[Subject] = []
    for spec in config.artifacts:
        path = hub.artifact_path(spec)  # a Hub id of a pushed artifact: pulled once, verified
        manifest = artifact.read_manifest(Path(path))
        runner = runner_class(manifest.target, manifest.static)
        subject = Subject(
            name=str(spec), kind="artifact", path=str(Path(path).resolve()),
            target=manifest.target + ("-static" if manifest.static else ""),
            sequence_length=manifest.sequence_length, batch_size=manifest.batch_size,
            precision=manifest.precision, weights=(manifest.quantization or {}).get("weight_format", "none"),
            checkpoint=_checkpoint_of(manifest, config),
            speculation_methods=runner.speculation_methods,
        )
        if config.baselines and subject.checkpoint is None:
            notes.append(f"{path}: no baseline comparison: its source checkpoint "
                         f"'{(manifest.source or {}).get('checkpoint')}' is not here; pass --baseline-model")
        subjects.append(subject)
    for peer in config.extra_subjects:  # peers measured by the same machinery (bench/llamacpp_peer.py)
        subjects.append(replace(peer, checkpoint=peer.checkpoint or config.baseline_model, cases=[], skipped=[]))
    for subject in subjects:
        pairs, length_notes = _input_pairs(config, subject.sequence_length)
        subject.skipped += [(None, note) for note in length_notes]
        for batch_size in config.batch_sizes or [subject.batch_size]:
            if batch_size != subject.batch_size:
                subject.skipped.append((Case(batch_size, 0, 0), f"pinned to batch size {subject.batch_size}"))
                continue
            subject.cases += [Case(batch_size, length, new) for length, new in pairs]

    speculative = bool(config.prompt_lookup or config.drafts)
    if config.baselines or speculative:
        subjects += _baseline_subjects(config, subjects, notes)
    grounded_budget = _add_grounded_cases(config, subjects, notes) if speculative else 0
    return subjects, notes, grounded_budget


def _baseline_subjects(config: BenchConfig, artifacts: list[Subject], notes: list[str]) -> list[Subject]:
    groups: dict[str, list[Subject]] = {}
    for subject in artifacts:
        if subject.checkpoint:
            groups.setdefault(subject.checkpoint, []).append(subject)
    if not artifacts:
        if not config.baseline_model:
            raise UsageError("nothing to benchmark: give artifact directories, or --baseline pytorch with --baseline-model")
        groups[config.baseline_model] = []
    modes = list(config.baselines)
    if (config.prompt_lookup or config.drafts) and "eager" not in modes:
        modes.append("eager")  # speculative decoding is measured on the eager baseline (dynamic cache)
    baselines = []
    for checkpoint, members in groups.items():
        pairs: dict[tuple[int, int], None] = {}
        if members:
            for member in members:
                pairs.update(dict.fromkeys((case.input_length, case.new_tokens) for case in member.cases))
                pairs.update(dict.fromkeys(_input_pairs(config, member.sequence_length)[0]))
        else:
            sequence_length = config.sequence_length or DEFAULT_SEQUENCE_LENGTH
            pair_list, length_notes = _input_pairs(config, sequence_length)
            pairs.update(dict.fromkeys(pair_list))
            notes += length_notes
        batch_sizes = config.batch_sizes or sorted({member.batch_size for member in members}) or [1]
        sequence_length = max([length + new for length, new in pairs] or [config.sequence_length or DEFAULT_SEQUENCE_LENGTH])
        suffix = f"@{Path(checkpoint).name}" if len(groups) > 1 else ""
        for mode in modes:
            subject = Subject(
                name=f"pytorch:{mode}{suffix}", kind="pytorch", path=str(Path(checkpoint).resolve()), target="pytorch",
                sequence_length=sequence_length, mode=mode, dtype=config.baseline_dtype, precision=config.baseline_dtype,
                weights="none", checkpoint=checkpoint,
                speculation_methods=PyTorchRunner.speculation_methods if mode == "eager" else (),
            )
            if mode in config.baselines:
                subject.cases = [Case(bs, length, new) for bs in batch_sizes for length, new in sorted(pairs)]
            baselines.append(subject)
    return baselines


def _drafts_for(subject: Subject, drafts: list[str]) -> list[str]:
    """The drafts a subject can use: checkpoints for the PyTorch baseline, artifacts of its own target otherwise."""
    usable = []
    for draft in drafts:
        path = Path(draft)
        if (path / artifact.MANIFEST_NAME).is_file():
            fits = subject.kind == "artifact" and artifact.read_manifest(path).target == subject.target
        else:
            fits = subject.kind == "pytorch" and (path / "config.json").is_file()
        if fits and path.resolve() != Path(subject.path).resolve():
            usable.append(str(path.resolve()))
    return usable


def _add_grounded_cases(config: BenchConfig, subjects: list[Subject], notes: list[str]) -> int:
    """Batch-1 summarization prompt: a greedy row, then a prompt-lookup row and one row per usable draft,
    on every subject whose runner can do them. Returns the prompt's token budget (its length is known
    once it is tokenized)."""
    for draft in config.drafts:
        if not Path(draft).is_dir():
            raise UsageError(f"--draft '{draft}' is not a directory; give an artifact or a checkpoint directory")
    planned: list[tuple[Subject, list[Speculation]]] = []
    for subject in subjects:
        if subject.kind == "pytorch" and not subject.speculation_methods:
            continue  # measured on pytorch:eager; transformers speculates with a dynamic cache only
        wanted = []
        if config.prompt_lookup and "prompt-lookup" in subject.speculation_methods:
            wanted.append(Speculation("prompt-lookup", config.prompt_lookup))
        if "draft" in subject.speculation_methods:
            wanted += [Speculation("draft", config.draft_tokens, draft) for draft in _drafts_for(subject, config.drafts)]
        if not subject.speculation_methods:
            notes.append(f"{subject.name}: no speculative rows (the {subject.target} runner does not support it)")
        elif subject.batch_size not in (None, 1):
            notes.append(f"{subject.name}: no speculative rows (pinned to batch size {subject.batch_size}, needs 1)")
        elif wanted:
            planned.append((subject, wanted))
    if not planned:
        return 0
    pinned = [s.sequence_length for s, _ in planned if s.kind == "artifact"]
    budget = min(pinned) if pinned else (config.sequence_length or DEFAULT_SEQUENCE_LENGTH)
    new = min(config.new_tokens or GROUNDED_NEW_TOKENS, budget // 2)
    for subject, wanted in planned:
        subject.cases += [Case(1, -1, new, "grounded")] + [Case(1, -1, new, "grounded", spec) for spec in wanted]
        subject.sequence_length = max(subject.sequence_length, budget)
    return budget - new


def _tokenizer_dir(subject: Subject, subjects: list[Subject]) -> Path:
    """A subject's tokenizer: its own directory, else (a peer on a single weights file) the first one's."""
    for candidate in [subject] + subjects:
        directory = Path(candidate.tokenizer or candidate.path)
        if directory.is_dir():
            return directory
    raise UsageError("no subject has a tokenizer directory to build the prompts with")


def build_prompts(config: BenchConfig, subjects: list[Subject], grounded_budget: int = 0) -> tuple[list[list], list[str]]:
    """For each subject, the prompt ids of each of its cases, and notes.

    Synthetic prompts depend only on the normal vocabulary (and seed, length, batch size), so every
    subject whose tokenizer has the same vocabulary, which all builds of one checkpoint do, gets the
    very same ids. A subject with another vocabulary gets prompts valid for it, with a note.
    """
    from transformers import AutoTokenizer

    from llmopt.runners.base import read_eos_ids

    tokenizers: dict[Path, tuple] = {}
    synthetic: dict[tuple, list[list[int]]] = {}
    grounded: dict[Path, list[int]] = {}
    per_subject: list[list] = []
    for subject in subjects:
        if not subject.cases:
            per_subject.append([])
            continue
        directory = _tokenizer_dir(subject, subjects)
        if directory not in tokenizers:
            tokenizer = AutoTokenizer.from_pretrained(directory)
            vocab = prompt_module.normal_vocab(tokenizer, read_eos_ids(directory))
            tokenizers[directory] = (tokenizer, vocab, hashlib.sha256(vocab.tobytes()).hexdigest())
        tokenizer, vocab, vocab_key = tokenizers[directory]
        prompts = []
        for case in subject.cases:
            if case.prompt == "grounded":
                if directory not in grounded:
                    grounded[directory] = prompt_module.grounded_prompt(tokenizer, grounded_budget)
                case.input_length = len(grounded[directory])
                prompts.append([grounded[directory]])
                continue
            key = (vocab_key, case.batch_size, case.input_length)
            if key not in synthetic:
                synthetic[key] = prompt_module.synthetic_batch(vocab, case.input_length, case.batch_size, config.seed)
            prompts.append(synthetic[key])
        per_subject.append(prompts)
    vocabularies = {key for _, _, key in tokenizers.values()}
    notes = []
    if len(vocabularies) > 1:
        groups = ", ".join(f"{directory} ({len(vocab)} normal ids)" for directory, (_, vocab, _) in tokenizers.items())
        notes.append(f"the subjects have {len(vocabularies)} different vocabularies, so not all see the same prompts: {groups}")
    return per_subject, notes
