"""``python -m zkllm_hf.cli``: the ``zkllm-hf`` command (as accelerate launch runs it)."""

import sys

from .entry import main

sys.exit(main())
