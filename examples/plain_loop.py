"""A plain PyTorch training loop under the guard (tiny random-init Llama, random tokens).

    python examples/plain_loop.py --steps 20 --trace trace.jsonl [--clip 1.0]

Prints one line per logged step with the guard's metrics (the last step's telemetry and the
guard's accounting: fractions of steps capped, skipped, frozen, the mean lr scale); regime
changes and interventions go to Python logging; --trace writes every record and event as JSONL.
With --clip the loop clips with torch.nn.utils.clip_grad_norm_ and hands the norm it returns
(the norm before the clip) to the guard in one line.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lbw_guard import FusedGuardedAdamW
from lbw_guard.guard import GuardConfig
from lbw_guard.integrations.logging import EventLogger, guard_metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trace", default=None, help="JSONL file for the guard's records and events")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--clip", type=float, default=0.0, help="clip_grad_norm_ to this norm (0: no clip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config)
    guard = GuardConfig(trace_path=args.trace)
    opt = FusedGuardedAdamW(model.parameters(), lr=args.lr, weight_decay=0.1, guard=guard, backend=args.backend)
    events = EventLogger(opt)

    data = torch.Generator().manual_seed(1)
    metrics = {}
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=data)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if args.clip > 0:  # the guard judges the norm before the clip, not the clipped gradients
            opt.record_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        opt.step(loss=loss)  # the loss is telemetry for the guard
        opt.zero_grad(set_to_none=True)
        events.update()
        if step % args.log_every == 0 or step == args.steps:
            metrics = {"step": step, "loss": loss.item(), **guard_metrics(opt)}
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print("summary:", {k: v for k, v in opt.guard.summary().items() if k != "scale"})
    opt.guard.close()
    return metrics


if __name__ == "__main__":
    main()
