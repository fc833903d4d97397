"""doctune: from a private document folder to a fine-tuned, evaluated open LLM."""

__version__ = "0.1.0"
