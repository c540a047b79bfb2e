"""zkllm-hf's version, ``__version__``: a leaf module, so that any module can name the version without
importing the package face. It must equal ``[project] version`` in pyproject.toml (the release's source)."""

__version__ = "0.1.0"
