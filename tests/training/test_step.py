"""The step's own hooks, on a tiny model: an epoch's row order does not depend on the global RNG
(`Trainer._get_train_sampler`; the Trainer's order does without accelerate's seedable sampler)."""

from __future__ import annotations

import torch
import transformers

from lmforge.config import TrainingArguments
from lmforge.data.collate import PaddedCollator
from lmforge.modeling.load import compile_settings


class Numbered(torch.utils.data.Dataset):
    """Row i holds token i + 1: a batch shows which rows it holds."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"input_ids": [i + 1] * 4, "labels": [i + 1] * 4}


def epoch_rows(trainer_cls, out: str, global_seed: int, skip_batches: int, seedable: bool) -> list[int]:
    """The rows epoch 1 reads, as `_run_epoch` reads them when it resumes after `skip_batches`
    batches; `global_seed` stands for whatever state the global RNG is in at that moment."""
    from accelerate import skip_first_batches

    config = transformers.AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, seed=3, report_to="none",
                             disable_tqdm=True, dataloader_pin_memory=False,
                             accelerator_config={"use_seedable_sampler": seedable})
    trainer = trainer_cls(model=transformers.AutoModelForCausalLM.from_config(config), args=args,
                          train_dataset=Numbered(), data_collator=PaddedCollator(0))
    loader = trainer.get_train_dataloader()
    torch.manual_seed(global_seed)
    if skip_batches:
        loader = skip_first_batches(loader, skip_batches)
    loader.set_epoch(1)
    return [int(row[0]) - 1 for batch in loader for row in batch["input_ids"]]


def test_epoch_order_does_not_depend_on_the_global_rng(tmp_path):
    from lmforge.training.step import Trainer

    out = str(tmp_path / "o")
    for seedable in (True, False):
        whole = epoch_rows(Trainer, out, 1, 0, seedable)
        assert sorted(whole) == list(range(10))
        assert epoch_rows(Trainer, out, 2, 2, seedable) == whole[4:]
    # The same permutation as accelerate's seedable sampler, the Trainer's default.
    assert epoch_rows(transformers.Trainer, out, 1, 0, True) == whole
    # Without that sampler, the Trainer's epoch order comes from the global RNG, so a run
    # resumed in epoch 1 would read other rows.
    assert epoch_rows(transformers.Trainer, out, 2, 2, False) != epoch_rows(transformers.Trainer, out, 1, 0, False)[4:]


def test_compile_settings_hold_while_the_trainer_runs_and_only_then(tmp_path):
    """The activation memory budget and, with float8 layers, dynamo's recompile room are set while
    train() runs (seen from a callback inside it) and are as they were before, after."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    from lmforge.training.step import Trainer

    before = (functorch_config.activation_memory_budget, dynamo_config.recompile_limit)
    seen = []

    class Look(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append((functorch_config.activation_memory_budget, dynamo_config.recompile_limit))

    config = transformers.AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, vocab_size=64, max_position_embeddings=64)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, max_steps=1,
                             report_to="none", disable_tqdm=True, dataloader_pin_memory=False, save_strategy="no",
                             compile_memory_budget=0.5)
    trainer = Trainer(model=transformers.AutoModelForCausalLM.from_config(config), args=args,
                      train_dataset=Numbered(), data_collator=PaddedCollator(0), callbacks=[Look()])
    trainer.train()
    assert seen == [(0.5, before[1])]  # no float8 layers: the recompile limit as it was
    assert (functorch_config.activation_memory_budget, dynamo_config.recompile_limit) == before
    with compile_settings(0.8, blocks=24, float8=True):  # 24 float8 blocks: room for 8 compiles each
        assert (functorch_config.activation_memory_budget, dynamo_config.recompile_limit) == (0.8, 200)
    assert (functorch_config.activation_memory_budget, dynamo_config.recompile_limit) == before
