"""The stress suite: reproduce the paper's learning-rate stress test end to end.

``lbw-guard stress`` (see :mod:`.cli`) trains a small causal LM under a learning-rate sweep with
plain AdamW, AdamW with gradient clipping and the guarded optimizer, and writes a results JSON,
a markdown report and plots. The modules each do one job: corpus, tokenizer, data, models,
lora, arms, train, stress (the sweep), report, plots, runner, cli.

``lbw-guard stress --matrix`` runs the generalization matrix instead (:mod:`.matrix`): slices of
architectures x schedules x learning-rate multiples, LoRA/LoRA+ fine-tuning and injected faults,
against AdamW, clipping and published baselines (:mod:`.baselines`: OLMo-core's SkipStep, ZClip),
with :mod:`.schedules`, :mod:`.faults`, :mod:`.matrix_report` and :mod:`.matrix_plots`.
"""

from .config import StressConfig

__all__ = ["StressConfig"]
