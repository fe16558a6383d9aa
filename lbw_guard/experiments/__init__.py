"""The stress suite: reproduce the paper's learning-rate stress test end to end.

``lbw-guard stress`` (see :mod:`.cli`) trains a small causal LM under a learning-rate sweep with
plain AdamW, AdamW with gradient clipping and the guarded optimizer, and writes a results JSON,
a markdown report and plots. The modules each do one job: corpus, tokenizer, data, models,
lora, arms, train, stress (the sweep), report, plots, runner, cli.
"""

from .config import StressConfig

__all__ = ["StressConfig"]
