"""The command line: thin typer wiring over ``llmopt.api``."""
