"""Adapters from Hugging Face entry points (``generate``, ``Trainer``) to the capture engine."""
