"""The events lmforge adds to the HF Trainer's callbacks: a checkpoint staged (before it is
published under its name) and the final save done. Tests and callers hook them to kill a run at an
exact moment or to check the saved model."""

from __future__ import annotations

import transformers


class LmforgeCallback(transformers.TrainerCallback):
    """The events lmforge adds to the HF Trainer's (`transformers.TrainerCallback`). A callback
    passed to a method's `main(argv, callbacks=...)` (or to `train_and_save`) may define them;
    lmforge calls them on every callback of the Trainer that has the method (`lmforge_event`),
    so subclassing this class is optional. These are the no-op defaults:

      - `on_checkpoint_staged(args, state, staged_dir)`: on the main process, once the Trainer
        has written every file of checkpoint-`state.global_step` (all ranks' shards) into
        `staged_dir`, under its staging name, and before its manifest is written and it is
        published under its final name. A run killed here leaves an incomplete checkpoint.
      - `on_final_save(trainer)`: on every process, right after the final model is saved in the
        output directory (not after a run stopped by a signal). The in-memory model is still
        the trained one (sharded under FSDP / ZeRO-3: a forward pass there is a collective).
    """

    def on_checkpoint_staged(self, args, state, staged_dir: str) -> None:
        pass

    def on_final_save(self, trainer: transformers.Trainer) -> None:
        pass


def lmforge_event(trainer: transformers.Trainer, event: str, *args) -> None:
    """Call `event` (an `LmforgeCallback` method) on each of the Trainer's callbacks that has it."""
    for callback in trainer.callback_handler.callbacks:
        method = getattr(callback, event, None)
        if callable(method):
            method(*args)
