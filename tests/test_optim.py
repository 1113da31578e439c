"""Master weights: a bf16 model trained by lmforge's optimizer follows fp32 AdamW on fp32
masters exactly, keeps updates bf16 alone would lose, and resumes from its masters."""

from __future__ import annotations

import copy

import torch

from lmforge.optim import MasterWeightAdamW


def test_step_is_fp32_adamw_on_the_masters_written_back_in_bf16():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32).to(torch.bfloat16))
    bias = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in (weight, bias)]
    ours = MasterWeightAdamW([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([{"params": [reference[0]], "weight_decay": 0.1},
                             {"params": [reference[1]], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        grads = [torch.randn(64, 32), torch.randn(64)]
        for p, r, g in zip((weight, bias), reference, grads):
            p.grad = g.to(torch.bfloat16)
            r.grad = g.to(torch.bfloat16).float()  # the same (bf16) gradient the model computed
        ours.step()
        ref.step()
        ours.zero_grad()
    masters = [m for g in ours.param_groups for m in g["params"]]
    for m, r, p in zip(masters, reference, (weight, bias)):
        assert m.dtype == torch.float32
        assert torch.equal(m, r)  # exactly fp32 AdamW
        assert torch.equal(p.data, r.detach().to(torch.bfloat16))  # written back rounded
        assert p.grad is None and m.grad is None


def test_small_updates_accumulate_in_the_master():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([{"params": [p]}], lr=1e-4, weight_decay=0.0)
    plain = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        p.grad = torch.ones(8, dtype=torch.bfloat16)
        plain.grad = torch.ones(8, dtype=torch.bfloat16)
        opt.step()
        plain_opt.step()
    assert torch.equal(plain.data, torch.ones(8, dtype=torch.bfloat16))  # bf16 alone lost every update
    assert p.data[0].item() < 1.0  # 100 x 1e-4 below one: the master kept them


def test_state_dict_restores_the_masters():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))
    opt = MasterWeightAdamW([{"params": [p]}], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn(16).to(torch.bfloat16)
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint file holds it
    q = torch.nn.Parameter(p.detach().clone())  # what a checkpoint's bf16 weights give back
    resumed = MasterWeightAdamW([{"params": [q]}], lr=1e-2)
    resumed.load_state_dict(state)
    grad = torch.randn(16).to(torch.bfloat16)
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()
    resumed.step()
    assert torch.equal(p.data, q.data)
    assert torch.equal(opt.param_groups[0]["params"][0], resumed.param_groups[0]["params"][0])


def test_trainer_uses_master_weights_for_a_bf16_model_and_resumes(tmp_path):
    from lmforge.config import TrainingArguments
    from lmforge.data.collate import PackedCollator
    from lmforge.data.pack import best_fit_decreasing, pack_records
    from lmforge.train import Trainer
    from tests.data.test_pack import ListDataset, records, tiny_model

    recs = records(40, seed=3)
    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], 48, seed=0)
    rows = ListDataset([pack_records([recs[i] for i in b]) for b in bins])

    def train(max_steps: int, resume: str | None):
        model = tiny_model("sdpa").to(torch.bfloat16)
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to="none", disable_tqdm=True, save_steps=2,
                                 remove_unused_columns=False, dataloader_pin_memory=False, overwrite_output_dir=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=PackedCollator(0))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    trainer, straight = train(4, None)
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      MasterWeightAdamW)
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    _, resumed = train(4, checkpoint)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b), name  # the masters came back from the checkpoint, not the rounded weights
