"""Training: the HF Trainer and what lmforge adds around it, one module a concern.

  step.py        the Trainer subclass: one optimizer step, its order of events in the docstring
  guards.py      what stops a run: non-finite gradients, a collapse, SIGTERM / SIGINT, nothing left
  resume.py      which checkpoint a run continues from, and the flags a resume may change
  save.py        the final save (complete or absent), a full disk said in one line
  run_record.py  lmforge_run.json: written, updated and read (standard library only)
  events.py      lmforge's callback events (a checkpoint staged, the final save done)
  run.py         `train_and_save`: the part every method shares

Nothing is imported here, so that `lmforge.training.run_record` stays light.
"""
