"""``python -m llmopt.benchmark worker --plan PLAN.json --result RESULT.json`` (started by ``llmopt bench``)."""

import sys

from llmopt.benchmark.worker import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "worker":
        sys.stderr.write("usage: python -m llmopt.benchmark worker --plan PLAN.json --result RESULT.json\n")
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))
