"""``llmopt bench``: latency, throughput and memory of artifacts and the PyTorch baseline, side by side.

``run(BenchConfig(...))`` plans the subjects (artifacts and baselines) and their cases, runs each
subject in a fresh worker process (``python -m llmopt.benchmark worker``) and returns one row per
measurement; ``llmopt.benchmark.report`` renders the rows. See ``suite`` for the rules and
``stats`` for the metric definitions.
"""

from llmopt.benchmark.suite import BenchConfig, BenchResult, parse_baselines, run

__all__ = ["BenchConfig", "BenchResult", "parse_baselines", "run"]
