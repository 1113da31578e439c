"""Training: the HF Trainer and what lmforge adds around it, one module a concern.

  step.py         the Trainer subclass: one optimizer step, its order of events in the docstring
  guards.py       what stops a run: non-finite gradients, a collapse, SIGTERM / SIGINT, nothing left
  resume.py       which checkpoint a run continues from, and the flags a resume may change
  checkpoint.py   checkpoints complete or absent: staging, manifest, verification, rotation
  save.py         the final save (complete or absent), a full disk said in one line
  verify_save.py  the final save checked whole: every parameter, each at its full shape
  run_lock.py     one run per output directory: the lock, taken over from a dead run
  run_record.py   lmforge_run.json: written, updated and read (standard library only)
  events.py       lmforge's callback events (a checkpoint staged, the final save done)
  progress.py     progress bar / lines, tokens/s and memory in the logs, the report at checkpoints
  preflight.py    the pre-flight check: marked example, steps, tokens per step, memory estimate
  samples.py      --eval_samples: held-out prompts answered at each evaluation
  fast_path.py    the fastest measured settings, chosen for the flags a user left unset
  graphs.py       CUDA graphs over whole micro-steps, recorded once per batch shape
  distributed.py  several processes: the layer class FSDP wraps, data tokenized first on each machine
  dpo_trainer.py  DPO on the Trainer: preference losses, the reference model, its metrics
  run.py          `train_and_save`: the part every method shares

Nothing is imported here, so that `lmforge.training.run_record` stays light.
"""
