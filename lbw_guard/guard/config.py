"""GuardConfig: every bound the guard works within, validated at construction, and presets.

All step counts are optimizer steps. How the defaults were chosen (measurements on models,
data and schedules outside the stress suite) is written down next to each group of fields
and in ``docs``-style notes of the policies they configure; the generalization matrix
(``lbw-guard stress --matrix``) checks them on held-out settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Any

MODES = ("act", "monitor")
GOVERNORS = ("evidence", "off")


@dataclass(frozen=True)
class GuardConfig:
    """Bounds and thresholds of the training guard.

    ``mode="monitor"`` observes, classifies and logs what it would do, but never acts
    (scale 1, gate 1, no device-side checks, no clamping).
    """

    mode: str = "act"

    # --- running statistics of the detectors --------------------------------------------
    warmup_steps: int = 20
    """Records folded into the statistics before z-scores are trusted."""
    ema_beta: float = 0.97
    """EMA factor of the innovation variance (window about 1 / (1 - beta) records)."""
    winsor_z: float = 3.0
    """An accepted value is clamped to mean +- winsor_z * std before folding (robustness)."""
    min_grad_log_std: float = 0.2
    """Floor of the std of log grad norm: a grad-norm spike is at least exp(z_grad * 0.2) =
    3.3x its level. Healthy runs move the grad norm 2-3x within a few steps early on."""
    min_loss_rel_std: float = 0.02
    """Floor of the loss std, relative to the level."""

    # --- detection ----------------------------------------------------------------------
    z_grad: float = 6.0
    """Upward z-score of the log grad norm that counts as a gradient spike."""
    z_loss: float = 6.0
    """Upward z-score of the loss that counts as a loss spike (and the device-side loss limit)."""
    spike_fraction: float = 0.05
    """A record whose fraction of gradient elements over the per-element bound exceeds this is
    a gradient spike too (scale-free, no warm-up needed: a x1e3 spike puts nearly every element
    over the bound; healthy runs stay orders of magnitude below)."""
    warmup_grad_factor: float = 100.0
    """During warm-up, a grad norm above this multiple of the largest seen is a spike; in the
    first records since the start, one above this multiple of its neighbours' was a spike that
    the per-element bound could not hold (``Recovery._unbounded_spike``)."""
    level_shift_records: int = 2
    """Consecutive records with a loss spike but normal gradients after which the loss is taken
    as a new level (a change of data, not divergence) and its statistics restart; likewise
    records with a gradient spike but a normal (given) loss restart the gradient statistics. A
    gradient scale change that stays (a loss weight, gradient accumulation summed instead of
    averaged) leaves Adam's steps as they were; before this rule it was persistent trouble,
    and grads x8 from mid-run rolled a healthy held-out Qwen3 and Cohere back once and capped
    31% of their steps (+2.3% and +2.2% loss against AdamW). Records whose loss and gradients
    both spiked by one factor (``rescale_tolerance``) are a rescaled objective and restart both
    statistics."""
    rescale_tolerance: float = 0.5
    """Largest difference of log(loss / its level) and log(grad norm / its level) for which a
    record whose loss and gradients both spiked reads as a rescaled objective (a loss weight:
    both move by the weight) rather than divergence (the grad norm moves far more). Measured:
    weights x8, x30 and x1000 on the loss of held-out Qwen3 and Cohere read 0.03-0.10; every
    record with both spikes in 16 held-out runs (10x runs, a natural spike at 1x, Granite's
    surges, random-token batches) read 1.2-4.4 (loss x1.8-3.6 against grad norm x10-200).
    Before the rule a x8 weight rolled those runs back and capped 31% of their steps (+2.3%
    and +2.2% against AdamW); with it, three steps are skipped and they end +0.2% and +1.0%."""
    lr_spike_factor: float | None = 10.0
    """A group's commanded lr more than this factor above the highest lr commanded to it so
    far in the run is an lr spike (a scheduler bug, a mistyped manual lr): the group's step is
    skipped (gated off before it is taken), and after ``level_shift_records`` such steps in a
    row the new lr is taken as the user's (a deliberate bump) and runs. ``None``: off. Judged
    from step ``spike_warmup + 1``: a warm-up from a small factor rises fastest at its start
    (torch's ``LinearLR`` from 0.01 over 8 steps: 13x on its second step); after the first 10
    steps no schedule of the matrix or the held-out sets (13 kinds, 60-300 steps) rises above
    1.13x its earlier peak in one step (warm restarts and cyclic schedules return to it).
    Measured (an MLP regressor, a 2-layer ViT encoder, logistic regression, an MLP fine-tune,
    tiny GPT-2 and Llama language models from configs; 2 seeds, 300 steps, the lr multiplied at
    40% and 70% of the run): x10 for one step left every run within 4% of its clean run, so 10
    passes it. Without the rule x100 left the ViT 1.83x its clean run and x1000 logistic
    regression 30x, the MLP 1.4-2.0x and GPT-2 2.5x (bounded gradients: the damage read as a
    loss-only level shift and was rebaselined); with it all 36 runs at x100 and x1000 (one step
    or two) end within 4% of their clean runs. A 100x lr held for 5 steps is taken as the
    user's after 2: the ViT ends 1.7-1.8x its clean run, the MLP regressor up to 1.14x, the
    others within 3%."""

    # --- in-pass protection (inside the fused kernel) ----------------------------------
    spike_k: float = 30.0
    """Per-element bound k: |g| <= k * max(sqrt(v_hat_prev), the tensor's RMS sqrt(v_hat) of the
    previous step) (the floor: ``lbw_kernels.contract``). Measured at the best lr on Qwen2 and
    GPT-2 (steps 20-150): 1e-3 of the elements cross 10 sigma each step, mostly rows of rare
    tokens in the embeddings (legitimate, and slowed by a bound); 30 sigma: 2e-4 and 8e-6;
    100 sigma: 3e-5 and 4e-8. Without the floor, tensors waking up early in a run (attention
    weights, steps 13-45 of the matrix's runs) put up to 50% of their elements over the bound
    in one step and the clamp cost GPT-2 3.7% of its loss under warmup + cosine; with it the
    steps touched fell from 41-67% to 0-5%. Known cost: models whose matrices take natural
    gradient surges at their best lr are held back (the third held-out set: Granite +10.9%,
    Cohere +1.4% against AdamW; within 0.03% with ``clamp_spikes=False``). 100 was tried on
    every suite (``benchmarks/results/spike-k100``) and lost more than it gained: it removed
    those misses, but x1e3 spikes ended 2.4-4.3% above their clean runs (clipping: 0.1%), 10x
    runs within 15% of the best fell from 15 to 13 of 16 (LoRA) and from 20 to 18 of 30 (first
    held-out set), and single clamped steps moved chaotic 1x runs by -1.4..+6%."""
    spike_warmup: int = 10
    """Records before the per-element bound is ``spike_k`` (``spike_k_warmup`` until then):
    early in a run the gradients of some tensors legitimately grow tenfold within a few steps
    (measured: up to 29% of GPT-2's elements at step 16 at its best lr), and a tight bound from
    so few samples would clamp them."""
    spike_k_warmup: float = 1000.0
    """The per-element bound during the first ``spike_warmup`` records (the kernels add none
    before a tensor's third step: ``lbw_kernels.contract``); ``inf``: none. While the start is
    held, a spike there also rolls the run back to it (``Recovery._unbounded_spike``): the
    bound lets a share of the elements into v. Without it a x1e4
    gradient spike at steps 3-9 went whole into v and stalled the run (a small MLP: eval loss
    4.0-4.3 where the clean run ends at 0.0096, as under plain AdamW; with it 0.0097-0.018).
    A x1e4 spike crosses it on ~90% of the elements (x1e3 on ~30%). In the first 14 steps of
    the 30 held-out scenarios (seed 0, their best lr) no full-training run put an element over
    it; five LoRA runs put 7-206 elements over it once (zero-initialised factors waking up),
    and ended within 0.04% of their runs without it."""
    clamp_spikes: bool = True
    """Feed elements over the bound to the moments at their typical size, sqrt(v_hat) with their
    sign (SPAM-style; ``lbw_kernels.contract``); False only counts them."""
    loss_check: bool = True
    """Skip a step on the device when its loss is not finite or above the loss limit."""
    same_step_grad_skip: bool = False
    """Also run a gradient-norm pre-pass so a grad-norm spike skips the step it occurs in
    (one more read of the gradients; the default relies on the per-element bound)."""

    # --- step-size governor -------------------------------------------------------------
    governor: str = "evidence"
    """``"evidence"``: cut the lr on measured oscillation and keep each step inside the update
    envelope (see :mod:`lbw_guard.guard.governor`); ``"off"``: the scale stays 1."""
    min_scale: float = 0.1
    max_update_ratio: float | None = 1.0
    """Update envelope of the first ``early_records``: a step predicted to move a group's
    matrices by more than this fraction of their norm (RMS over the matrices of
    ||u_i|| / ||theta_i||) is cut to half of it (None: no envelope)."""
    early_records: int = 20
    """Records at the start of a run during which the envelope acts and the ceiling it set does
    not rise (omega means little before the moments have a history)."""
    omega_low: float = 0.05
    """Oscillation: cut while the filtered omega (geometric mean over every matrix of the model)
    is below this. Measured: 0.6-1.9 at the best lr on tiny models, down to 0.19-0.25 near the
    peak of a warmup + cosine schedule on micro GPT-2 and GPT-NeoX, and 0.04-0.15 for GPT-NeoX
    on prose at its code-tuned lr; 10x runs fall to 0.01-0.06, 20-40 steps after the damage is
    done. 0.15 capped healthy runs (GPT-NeoX, and a tiny GPT-2 under warmup + cosine: 21% of its
    steps, +1.7% loss) and its late cuts left warmup + cosine runs at 10x worse than no cut at
    all (Qwen2 5.57 vs 5.45, Llama 5.42 vs 5.31); 0.05 cuts only deep oscillation."""
    omega_high: float = 0.5
    """Recovery needs the filtered omega above this (or none measured). Below the healthy band:
    a Llama with init 0.002 at its best lr reads 0.55-0.9 for its whole run, so at 0.9 the
    ceiling the envelope set on its first step never rose again (capped 100% of steps; 38% at
    0.5). The matrix's 10x constant runs the envelope holds at ~3x read 0.2-0.8 late in the
    run; at 0.5 the Llama ones are released in part and end 1.12 instead of 1.09 of the best
    loss (3 seeds), and the 30x runs under warm restarts up to 1.15 instead of 1.05."""
    omega_recent_max: float | None = 0.5
    """A cut also needs the filtered omega_recent (Adam's momentum energy against the recent
    gradients' white-noise level, whole model) below this. omega divides by v, which remembers
    the gradients of the last ~1/(1-beta2) steps: after large early gradients it reads 0.01 while
    the gradients themselves do not cancel (omega_recent 1.2-1.5, rsLoRA at 10x), and cutting
    there left that run 6% worse than AdamW. Uncorrelated gradients read 1; a share f of the
    gradient energy that flips sign every step reads about (1 - f) + f (1 - b1) / (1 + b1), so
    0.5 asks for about half of it to alternate (b1 = 0.9). Measured at the cuts of held-out
    10x runs: cuts that helped read 0.41-0.45 (GPT-BigCode and Gemma, 1.117 and 1.174 of the
    best loss against 1.165 and 1.208 uncut); cuts at 0.6-1.05 hurt (OLMo-2, Starcoder2,
    Mistral under hard restarts: the normalised update had already collapsed, and OLMo-2 cut to
    a fifth of its lr ended 1.41 of the best loss against plain AdamW's 1.11). Over the 60
    held-out 10x runs (3 seeds) 1.0 -> 0.7 -> 0.5 took the mean from 1.146 to 1.137 and 1.130 of
    the best loss and the runs within 15% from 30 to 32 and 35; the matrix's runs with a cut
    were unchanged on the mean (1.076). None: omega alone."""
    efficiency_records: int = 12
    """Records at the start of a run in which the loss efficiency can cut (0: never). Later the
    schedule moves the lr (the end of a warmup, a restart) and healthy runs read 0.0-0.1;
    reaching to the end of a 24-step warmup (30) cut a held-out Gemma at 10x late and left it
    worse than no cut. See :mod:`lbw_guard.guard.governor`."""
    efficiency_window: int = 6
    """Steps the loss efficiency needs before it is judged: the loss's fall since the start of
    the run (or the last cut) against the first-order decrease the steps predicted
    (``-sum g.u``). Since the start, not over the last steps only: a run that overshoots on one
    early step and recovers (an MLP language model at its best lr) is no too-high lr."""
    efficiency_low: float = 0.15
    """Overshoot at the start of a run: cut while the loss efficiency is below this and the
    filtered whole-model cosine of g_t with the previous step's direction is below 0. Measured
    in the first 12 records where judged: 0.21-0.84 at the best lr, -0.06-0.06 at 10x on a
    constant lr (OPT 0.13-0.15); a loss plateau reads as low, but its gradients keep agreeing
    with the last step."""
    efficiency_min_drop: float = 0.3
    """The efficiency is judged only when the steps predicted a decrease of at least this
    fraction of the loss: below it the minibatch noise of two losses decides."""
    efficiency_large_drop: float | None = 1.0
    """Below this fraction of the loss, a predicted decrease is judged only while the steps keep
    predicting: a record's grad norm since the window began at ``efficiency_grad_rise`` x the
    first record's, or the window's last three steps predicting at least as much as its first
    three. A first-order prediction of losing the whole loss is the step outrunning the loss's
    curvature on its own; a smaller one that dies out as the gradients fall is also what a
    healthy start near its loss floor, or on a noisy loss, reads. Measured at the records where
    the rule fired with ``efficiency_min_drop`` alone (the 270 held-out runs at 1x, 3x and 10x
    their best lr; the matrix's runs, seed 0; the low-loss fine-tunes of
    ``benchmarks/results/lowloss-finetune/``): the healthy 1x starts (PiSSA, 3 seeds; rank-64
    LoRA; GPT-2 and Llama fine-tunes near their loss floor, 5 runs) predicted 0.30-0.69 of the
    loss over the records judged, with grad norms at most 2.03x the first and their last three
    predictions 0.19-0.50 of their first three. The held-out and matrix runs at 10x that
    predicted less than the loss (LoRA and LoRA+, DoRA, LoRA on the MLP) had their gradients at
    3.7-11x the first, or (Llama LoRA under warmup + cosine, 2.2x) their last predictions 2.5x
    their first; every other 10x firing predicted more than the loss. Lost: the matrix's Llama
    under OneCycle at 30x (0.82 of the loss, gradients 2.3x, predictions 0.25x: no restart, 1.267
    of the best loss instead of 1.106; AdamW 1.281) and the low-loss fine-tunes at 10x their best
    lr (where AdamW ends 2% above its best). Not asked once the run went back to its start for
    its lr (see ``StepSizeGovernor._steps_keep_predicting``). None: ``efficiency_min_drop``
    alone."""
    efficiency_grad_rise: float = 3.0
    """See ``efficiency_large_drop``: the grad-norm rise, over the window's first record, that
    shows the steps still predicting."""
    omega_worsening: float = 0.7
    """A further oscillation cut needs omega below this fraction of its value at the last cut.
    1.0 (cut again whenever omega is still under ``omega_low``) left the held-out 10x runs
    worse: 1.138 of the best loss on the mean instead of 1.126 (seed 0)."""
    omega_window: int = 8
    """Records over which omega is averaged (EMA time constant)."""
    min_evidence: int = 3
    """Records of a signal needed before it can cut."""
    cut_factor: float = 0.6
    """Multiplicative cut per decision. 0.35 left the held-out 10x runs worse (seed 0: 1.140 of
    the best loss on the mean instead of 1.126): cut after the damage, a lower lr does not undo
    it."""
    cut_interval: int = 4
    """Records between two cuts: the signals need a few steps to answer one."""
    recovery_rate: float = 0.02
    """Multiplicative recovery per record while the signals are healthy (x1.02: from the
    envelope's ~1/3 back to the commanded lr in ~55 records, from ``min_scale`` in ~116). x1.05
    freed the small-init Llama sooner (capped 23% of its steps instead of 38%), but released the
    30x runs the envelope holds: Llama at 30x constant ended 5.50 instead of 4.99 (3 seeds;
    AdamW 5.89)."""
    release_drop: float | None = 0.5
    """The climb back is a probe: once the effective lr rose more than 10% past where the climb
    began, the filtered omega falling below this fraction of the highest it read since sends
    the ceilings back there (None: not omega). Without it a tiny Qwen2 at 15x its lr, cut to
    1.7x its best lr at the start, climbed back to 12x while omega fell from 1.29 to 0.14."""
    release_loss_z: float | None = 1.0
    """... as does the loss, filtered over ``omega_window`` records, rising above where it was
    when the climb began by this many standard deviations of one step's loss (None: not the
    loss). GPT-NeoX LoRA at 10x climbed with omega at 0.5-0.6 while its loss rose 6%."""
    max_scale_increase: float = 0.05
    """Largest increase of the issued scale from one step to the next."""

    # --- recovery: snapshots, rollback, freezing, escalation -----------------------------
    snapshots: bool = True
    """Keep verified snapshots for rollback (False: no rollback, escalation instead)."""
    snapshot_interval: int = 0
    """Steps between snapshots; 0 chooses it from ``snapshot_budget`` (every 10 steps under
    torch.distributed, so that every rank snapshots on the same steps)."""
    snapshot_budget: float = 0.02
    """Fraction of the step time the snapshot copies may cost (with snapshot_interval 0)."""
    snapshot_ring: int = 2
    snapshot_device: str = "cpu"
    """Where snapshots live: ``"cpu"`` (pinned host memory, copied on a side stream) or
    ``"device"`` (the parameters' device: fast, costs device memory)."""
    snapshots_in_state_dict: bool = False
    """Save the snapshot ring in ``state_dict`` (bigger checkpoints)."""
    max_rollback_distance: int = 50
    max_rollbacks: int = 3
    """Rollbacks allowed per ``rollback_window`` steps."""
    rollback_window: int = 500
    rollback_scale: float = 0.5
    """The lr scale is multiplied by this after a rollback (the run diverged at the old one)."""
    start_rise: float | None = 0.2
    """Divergence from the start: in the first ``start_rise_records`` records, a loss above
    (1 + this) x the loss of the first record (the state the run began from) in two of the last
    three records rolls the run back to that state (held until then), within
    ``max_rollbacks``, at ``rollback_scale`` of the lr. Measured (the second-highest of three
    records' losses over the first record's) on the held-out fine-tuning runs (LoRA+, rank-64
    LoRA, rsLoRA, DoRA) and the full-training runs traced at 1x and 3x their best lr: at most
    1.09; at 10x the LoRA runs read 1.23-1.93 within 4 steps and an MLP 2.1-5.2, and then stayed
    above the best lr's loss whatever the later cuts (Adam's second moment keeps the early
    gradients). None: off."""
    start_rise_records: int = 10
    """The rise from the start is judged in the first this many records only (the start is still
    held for the other rules through ``early_records``). The reference is one minibatch's loss,
    and every record judged is another chance for noise to clear a fixed bar, while the harm of
    a too-high lr shows at once. Every rollback of the rise traced (held-out fine-tuning and full
    training at 1x, 3x and 10x their best lr, 3 seeds; the matrix's GPT-NeoX and GPT-2 LoRA
    runs, seed 0) fired by the 7th record (LoRA under warmup + cosine at 10x), most by the 4th.
    Past that it fired only on noise, and the cap the rollback leaves held the rest of the run
    down: LoRA with one sequence per batch at 0.3x and 1x the best lr (records 12 and 18, two
    single-sequence losses 25% above the first; GPT-2 LoRA+ at 1x ended 4.3% above AdamW, with
    the window 0.8%), and an MLP regression fine-tuned at a third of its best lr (record 11, the
    loss drifting up 15-20% while Adam's fresh moments settle: 7.7% above AdamW, with the window
    equal). For the default beta1, 10 is also 1 / (1 - beta1), the span over which Adam's first
    moment is still made of its first gradients."""
    start_rise_grad: float | None = 3.0
    """A record counts towards the rise from the start only if its grad norm is also above this
    times the first record's: a too-high lr that makes the loss rise in the first steps grows the
    gradients far more (measured on the 18 held-out runs the rise rolled back, at 3x and 10x their
    best lr: 2.4-415x the first record's at the records that fired, loss 1.2-2x), while minibatch
    noise moves both together. Without it, a small MLP regression at a good lr with batches of 16
    (first losses 5.5, 11.0, 9.8, 5.3, 11.2: one lucky first batch) went back to its start 3 times,
    was capped at 0.17x and ended 30-44x above AdamW's loss on 3 of 6 seeds (grad norms 1.7-2.2x
    the first's). None: the loss alone."""
    overshoot_restart: bool = True
    """The loss efficiency's cut (a start that overshoots), while the state the run began from is
    held and the run has not gone back to it before, also sends the run back there, to continue
    at a lower lr (``restart_cut``): a too-high lr does its harm in the first steps, and a later
    cut does not undo it (AdamW at 10x cut to 3x after 5 steps ends 27 of the 30 held-out runs
    within 15% of the best, after 10 steps 20). Held-out QK-norm Qwen3 at 10x sat on a plateau
    under the cuts (1.36-1.43 of the best loss, plain AdamW 1.27-1.33) and ended at 1.25-1.30
    with the restart at the cut's lr.
    Once only: a run that went back to its start already continues from an lr chosen on
    evidence, and restarting it again cost held-out MLP runs 9-19% of their loss. Only when the
    cut lowered the parameters' lr, element-weighted, by at least half a cut: where the update
    envelope already holds most of them at ``min_scale`` the cut lowers only the small groups
    above it (norm weights and biases), and going back would replay the same start at the same
    lr, throwing the steps away (the stress demo at 33x its best lr: perplexity 214 with that
    restart, 156 without; no held-out run restarted so). With ``start_cap`` that lr is also
    the most the restarted run may climb back to. The measurements:
    ``benchmarks/results/overshoot-restart/``. False: the cut alone."""
    restart_cut: float = 0.3
    """The overshoot's restart continues at this fraction of the effective lr the start overshot
    at (the cut in place, without a restart, stays ``cut_factor``; a value above it restarts at
    the cut). The restart has undone the steps taken at the too-high lr, so a deeper cut no
    longer comes after the damage (why ``cut_factor`` stays 0.6), and AdamW at 10x cut to 3x
    after 5 steps ends 27 of 30 held-out runs within 15% of the best: 0.3 takes a 10x start
    to 3x. Against 0.6 (only a restarted run can change: the 41 held-out runs with a rollback,
    3 sets x 3 seeds; the matrix's 21 seed-0 and 25 3-seed cells with one): held-out Qwen3 and Mixtral
    under a constant lr 1.22-1.31 -> 1.13-1.19 of the best loss, OPT 1.14-1.15 -> 1.08-1.09,
    Falcon under StepLR 1.03-1.11 -> 0.99-1.04; over the 90 held-out 10x runs 62 -> 66 within
    15%, mean 1.126 -> 1.112; worse but within 15% where the best lr region is wide (LoRA on
    Llama's MLP 1.00-1.01 -> 1.03-1.07, rank-64 LoRA seed 1 1.028 -> 1.096); the matrix's
    LoRA cells at 10x 1.026 -> 1.011 (seed 0), its full-training 10x and 30x means over 3
    seeds 1.078 -> 1.079 and 1.087 -> 1.088. What it costs: a false overshoot (a healthy start
    read as one, still open: a small CNN classifier at its best lr) continues at 0.3x its lr
    instead of 0.6x (on its training loss, 1.3-1.9x AdamW's -> 1.8-2.4x; on held-out samples
    15-18% above AdamW, ``benchmarks/results/classifiers/``)."""
    start_cap: bool = True
    """After a rollback to the start, the lr scale it continues from (the scale it diverged at x
    ``rollback_scale``: a fraction of the schedule's lr, so a warmup still reaches that fraction
    of its peak) is also the most the scale may climb back to, for the rest of the run (kept
    through data changes). Without it, runs sent back to their start climbed back to the lr
    that had damaged them and diverged late: held-out rsLoRA at 10x, seed 1, 1.358 of the best
    loss, 1.047 with it. The overshoot's restart (``overshoot_restart``) caps the same way, at
    the scale its cut set: without it, restarted runs climbed back and ended worse than with the
    cut alone (matrix, seed 0: GPT-2 LoRA at 10x under a constant lr 1.161 of the best loss
    against 1.012, GPT-NeoX under warm restarts at 10x 1.146 against 0.991; with the cap 1.013
    and 1.003, and every LoRA and LoRA+ cell at 10x within 15% of the best, mean 1.026). No run
    without a return to the start can change."""
    freeze_steps: int = 20
    max_frozen_fraction: float = 0.25
    """Largest fraction of all parameters (by element count) frozen at once."""
    give_up_after: int = 25
    """Consecutive records in trouble, with no rollback left, after which the guard raises
    ``GuardGaveUp`` (or calls ``Guard(on_give_up=...)``) instead of skipping forever; at once
    when the parameters are non-finite and no rollback is possible."""

    # --- plumbing -----------------------------------------------------------------------
    event_capacity: int = 1000
    """Events kept in memory (a ring); counters keep every event's count."""
    lag: int = 1
    """Records are processed this many steps after they were produced (same on CPU and GPU)."""
    trace_path: str | None = None
    """If set, every processed record and event is appended to this JSONL file."""
    keep_trace: int = 0
    """Keep the last N trace lines (processed records, and markers such as snapshots) in memory
    for ``Guard.write_jsonl`` (0: none)."""

    def __post_init__(self) -> None:
        if isinstance(self.trace_path, os.PathLike):
            object.__setattr__(self, "trace_path", os.fspath(self.trace_path))
        if self.keep_trace is True or self.keep_trace is False:  # the v1 flag
            object.__setattr__(self, "keep_trace", 10_000 if self.keep_trace else 0)
        for f in fields(self):  # NumPy scalars (a sweep over np.linspace) as Python numbers
            value = getattr(self, f.name)
            if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)):
                if isinstance(value, numbers.Integral):
                    object.__setattr__(self, f.name, int(value))
                elif isinstance(value, numbers.Real):
                    object.__setattr__(self, f.name, float(value))
        errors = _validate(self)
        if errors:
            raise ValueError("invalid GuardConfig: " + "; ".join(errors))

    @property
    def acts(self) -> bool:
        return self.mode == "act"

    def replace(self, **changes: Any) -> "GuardConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "GuardConfig":
        if not isinstance(values, dict):
            raise TypeError(f"GuardConfig.from_dict expects a dict, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GuardConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> "GuardConfig":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def _validate(c: GuardConfig) -> list[str]:
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def number(name: str) -> float:
        value = getattr(c, name)
        try:
            finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            errors.append(f"{name} must be a finite number, got {value!r:.40}")
            return float("nan")
        return float(value)

    def above_or_none(name: str, low: float) -> None:
        """A threshold above ``low``, or None: the rule is off."""
        if getattr(c, name) is not None:
            check(not number(name) <= low, f"{name} must be > {low:g} or None (off), got {getattr(c, name)}")

    def integer(name: str, low: int) -> int:
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{name} must be an int, got {value!r}")
            return low
        check(value >= low, f"{name} must be >= {low}, got {value}")
        return value

    def flag(name: str) -> None:
        check(isinstance(getattr(c, name), bool), f"{name} must be a bool, got {getattr(c, name)!r}")

    check(c.mode in MODES, f"mode must be one of {MODES}, got {c.mode!r}")
    check(c.governor in GOVERNORS, f"governor must be one of {GOVERNORS}, got {c.governor!r}")
    check(c.snapshot_device in ("cpu", "device"), f"snapshot_device must be 'cpu' or 'device', got {c.snapshot_device!r}")
    for name in ("clamp_spikes", "loss_check", "same_step_grad_skip", "snapshots", "snapshots_in_state_dict", "start_cap", "overshoot_restart"):
        flag(name)
    integer("warmup_steps", 1)
    for name in ("freeze_steps", "lag", "snapshot_interval", "keep_trace", "max_rollbacks", "spike_warmup"):
        integer(name, 0)
    integer("early_records", 0)
    integer("start_rise_records", 1)
    for name in ("level_shift_records", "omega_window", "min_evidence", "cut_interval",
                 "snapshot_ring", "max_rollback_distance", "rollback_window", "give_up_after", "event_capacity"):
        integer(name, 1)

    beta = number("ema_beta")
    check(0.0 < beta < 1.0, f"ema_beta must be in (0, 1), got {c.ema_beta}")
    for name in ("winsor_z", "min_grad_log_std", "min_loss_rel_std", "z_grad", "z_loss", "spike_k", "rescale_tolerance"):
        check(not number(name) <= 0.0, f"{name} must be > 0, got {getattr(c, name)}")
    warm_k = c.spike_k_warmup
    check(not isinstance(warm_k, bool) and isinstance(warm_k, (int, float)) and warm_k > 0  # inf allowed
          and (isinstance(warm_k, float) or warm_k < 2 ** 1023),  # an int must fit a float
          f"spike_k_warmup must be > 0 (inf: no bound in the warm-up), got {c.spike_k_warmup!r:.40}")
    check(not number("warmup_grad_factor") <= 1.0, f"warmup_grad_factor must be > 1, got {c.warmup_grad_factor}")
    above_or_none("lr_spike_factor", 1.0)
    frac = number("spike_fraction")
    check(0.0 < frac <= 1.0, f"spike_fraction must be in (0, 1], got {c.spike_fraction}")

    floor = number("min_scale")
    check(0.0 < floor <= 1.0, f"min_scale must be in (0, 1], got {c.min_scale}")
    low, high = number("omega_low"), number("omega_high")
    check(low > 0.0, f"omega_low must be > 0, got {c.omega_low}")
    check(not low > high, f"omega_low ({c.omega_low}) must not exceed omega_high ({c.omega_high})")
    if c.release_drop is not None:
        drop = number("release_drop")
        check(not (drop <= 0.0 or drop >= 1.0), f"release_drop must be in (0, 1) or None, got {c.release_drop}")
    if c.release_loss_z is not None:
        check(not number("release_loss_z") < 0.0, f"release_loss_z must be >= 0 or None, got {c.release_loss_z}")
    above_or_none("omega_recent_max", 0.0)
    integer("efficiency_records", 0)
    integer("efficiency_window", 1)
    for name in ("efficiency_low", "efficiency_min_drop"):
        check(not number(name) <= 0.0, f"{name} must be > 0, got {getattr(c, name)}")
    above_or_none("efficiency_large_drop", 0.0)
    check(not number("efficiency_grad_rise") <= 1.0,
          f"efficiency_grad_rise must be > 1, got {c.efficiency_grad_rise}")
    worse = number("omega_worsening")
    check(0.0 < worse <= 1.0, f"omega_worsening must be in (0, 1], got {c.omega_worsening}")
    above_or_none("max_update_ratio", 0.0)
    cut = number("cut_factor")
    check(0.0 < cut < 1.0, f"cut_factor must be in (0, 1), got {c.cut_factor}")
    restart = number("restart_cut")
    check(0.0 < restart <= 1.0, f"restart_cut must be in (0, 1], got {c.restart_cut}")
    rec = number("recovery_rate")
    check(0.0 < rec <= 1.0, f"recovery_rate must be in (0, 1], got {c.recovery_rate}")
    inc = number("max_scale_increase")
    check(0.0 < inc <= 1.0, f"max_scale_increase must be in (0, 1], got {c.max_scale_increase}")
    above_or_none("start_rise", 0.0)
    above_or_none("start_rise_grad", 1.0)
    rb = number("rollback_scale")
    check(0.0 < rb <= 1.0, f"rollback_scale must be in (0, 1], got {c.rollback_scale}")
    budget = number("snapshot_budget")
    check(0.0 < budget <= 1.0, f"snapshot_budget must be in (0, 1], got {c.snapshot_budget}")
    frozen = number("max_frozen_fraction")
    check(0.0 <= frozen < 1.0, f"max_frozen_fraction must be in [0, 1), got {c.max_frozen_fraction}")

    if not errors:
        check(c.snapshot_interval <= c.max_rollback_distance,
              f"snapshot_interval ({c.snapshot_interval}) > max_rollback_distance "
              f"({c.max_rollback_distance}): no snapshot would ever be close enough to roll back to")
    if c.trace_path is not None and not isinstance(c.trace_path, str):
        errors.append(f"trace_path must be a str, a path or None, got {c.trace_path!r}")
    return errors


PRESETS: dict[str, GuardConfig] = {
    # Act within the default envelope.
    "default": GuardConfig(),
    # Observe, classify and log what would be done; never touch the run.
    "monitor": GuardConfig(mode="monitor"),
    # Fewer, later interventions, for runs whose telemetry is noisy by nature: spikes must be
    # larger, the oscillation deeper and the first steps larger before anything acts (and a
    # ceiling recovers at the default level: a higher one would hold it longer).
    "conservative": GuardConfig(z_grad=8.0, z_loss=8.0, spike_k=50.0, omega_low=0.03, max_update_ratio=2.0),
    # Faults only (spikes, non-finite values, divergence): the lr scale is never touched.
    "faults-only": GuardConfig(governor="off"),
}


def preset(name: str) -> GuardConfig:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown guard preset {name!r}; choose one of {sorted(PRESETS)}") from None
