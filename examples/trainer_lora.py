"""Hugging Face Trainer + PEFT LoRA under the guard (tiny random-init Llama, random tokens).

    python examples/trainer_lora.py --steps 10 --output-dir /tmp/lora-run [--report-to tensorboard]

One parameter group per LoRA-adapted module, so the guard can freeze a spiking adapter
alone (with --lora-plus RATIO, LoRA+: each module's B matrices in a group of their own at
RATIO x lr). GuardedTrainer feeds each step's loss to the guard, moves the Trainer's gradient
clip (max_grad_norm, 1.0 by default) into the optimizer so the guard sees the gradients
before it, keeps the lr schedule still on steps the guard skipped, and puts the guard's
accounting (scale, regime, fractions of steps capped / skipped / frozen, interventions) in
the Trainer's logs, hence in TensorBoard / W&B through --report-to. Checkpoints carry the
guard state; --resume continues exactly.
"""

from __future__ import annotations

import argparse
import logging

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from lbw_guard import FusedGuardedAdamW
from lbw_guard.integrations.hf import GuardedTrainer
from lbw_guard.integrations.peft import group_names, lora_param_groups


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--output-dir", default="trainer_lora_out")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--lora-plus", type=float, default=None, help="LoRA+ ratio for the B matrices (e.g. 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    vocab, seq = 256, 32
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=seq))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    groups = lora_param_groups(model, by="module", lr=args.lr, weight_decay=0.0, lora_plus_ratio=args.lora_plus)
    opt = FusedGuardedAdamW(groups, lr=args.lr, backend=args.backend)
    print("parameter groups:", group_names(opt))

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (16 * args.steps, seq), generator=g)
    dataset = [{"input_ids": row, "labels": row.clone()} for row in ids]
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, logging_steps=1, report_to=args.report_to, use_cpu=not torch.cuda.is_available(),
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        max_grad_norm=1.0,  # clipped inside the optimizer, after the guard has seen the gradients
        lr_scheduler_type="cosine", disable_tqdm=True, seed=0, data_seed=0,
    )
    trainer = GuardedTrainer(model=model, args=training_args, train_dataset=dataset, optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=args.resume)
    last = [h for h in trainer.state.log_history if "guard/regime" in h][-1]
    print("final:", {k: v for k, v in last.items() if k.startswith("guard/") or k == "loss"})
    return trainer


if __name__ == "__main__":
    main()
