"""llmopt: compile Hugging Face causal LMs into static-shape artifacts and run them."""

__version__ = "0.2.1"
