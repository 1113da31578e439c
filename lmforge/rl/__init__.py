"""Online RL with verifiable rewards (`lmforge grpo`: GRPO, DAPO, Dr. GRPO).

- `rollout.py`: prompts in, sampled completions out.
- `rewards.py`: reward functions with TRL's signature — the built-ins (`accuracy`, `format`,
  `overlong`), user functions loaded from files, and the scoring of one batch of completions.
- `surrogate.py`: group-relative advantages and the clipped surrogate loss.
- `trainer.py`: one GRPO optimizer step, top to bottom: generate → reward → advantages → updates.
"""
