"""Master weights: a bf16 model trained by lmforge's optimizer follows fp32 AdamW on fp32
masters exactly, keeps updates bf16 alone would lose, and resumes from its masters."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import KERNEL_DEVICES
from lmforge.modeling.optim import MasterWeightAdamW


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
    from lmforge.training.step import Trainer
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


def test_clipping_scales_the_fp32_gradient_inside_the_update():
    """`clip_grad_norm_` measures the 16-bit gradients in fp32 and the step scales them in fp32:
    torch's clip_grad_norm_ and AdamW on fp32 copies, bit for bit."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(32, 16).to(torch.bfloat16)),
              torch.nn.Parameter(torch.randn(32).to(torch.bfloat16))]
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ours = MasterWeightAdamW([{"params": params}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    for scale in (10.0, 0.01, 10.0):  # clipped, not clipped, clipped
        for p, r in zip(params, reference):
            g = (torch.randn(p.shape) * scale).to(torch.bfloat16)
            p.grad, r.grad = g, g.float()
        norm = ours.clip_grad_norm_(1.0)
        want = torch.nn.utils.clip_grad_norm_(reference, 1.0)
        assert torch.equal(norm, want)
        assert all(p.grad.dtype == torch.bfloat16 for p in params)  # the 16-bit gradients are left as they are
        ours.step()
        ref.step()
        ours.zero_grad()
        for m, r in zip(ours.master_params(), reference):
            assert torch.equal(m, r)
    assert ours.grad_coef is None  # each clipping's factor serves one step
    assert torch.equal(ours.clip_grad_norm_(float("inf")), torch.zeros(()))  # no gradients: nothing measured


@pytest.mark.parametrize("kernel_device", KERNEL_DEVICES, indirect=True)
def test_update_kernel_follows_torchs_fused_adamw(kernel_device):
    """The one-kernel update (lmforge.kernels.optim_kernel) against torch's fused AdamW over the same
    masters: two groups (with and without decay) and an empty one, clipping, a parameter without
    a gradient, a step flagged non-finite, and a resume from the state it saves. On a GPU, and on
    a CPU under Triton's interpreter."""
    from lmforge.kernels import optim_kernel

    device = kernel_device
    assert optim_kernel.available() == (device == "cuda")
    torch.manual_seed(4)
    shapes = [(1000, 77), (4099,), (3, 5), (65536,)]

    def make(kernel: bool):
        params = [torch.nn.Parameter(torch.randn(s, device=device).to(torch.bfloat16)) for s in shapes]
        opt = MasterWeightAdamW([{"params": params[:2], "weight_decay": 0.1},
                                 {"params": params[2:], "weight_decay": 0.0},
                                 {"params": [], "weight_decay": 0.0}],  # as the Trainer makes for LoRA: no bias
                                lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
        assert opt._kernel == (device == "cuda")  # chosen where a CUDA GPU and Triton are
        opt._kernel = kernel
        return params, opt

    (ours, opt), (theirs, ref) = make(True), make(False)
    for p, q in zip(ours, theirs):
        q.data.copy_(p.data)
    for o in (opt, ref):
        for m, p in zip(o.master_params(), ours):
            m.data.copy_(p.data.float())
    for step in range(6):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if step == 2 and i == 1:
                continue  # no gradient this step
            g = (torch.randn(p.shape, device=device) * (5.0 if step % 2 else 0.01)).to(torch.bfloat16)
            p.grad, q.grad = g, g.clone()
        found = torch.tensor(1.0 if step == 4 else 0.0, device=device)
        for o in (opt, ref):
            norm = o.clip_grad_norm_(1.0)
            o.found_inf = found
            o.step()
            o.found_inf = None
            o.zero_grad()
        if step == 3:  # resume: a fresh optimizer over the same weights, from the saved state
            state = opt.state_dict()
            opt = MasterWeightAdamW([{"params": ours[:2], "weight_decay": 0.1},
                                     {"params": ours[2:], "weight_decay": 0.0}, {"params": [], "weight_decay": 0.0}],
                                    lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
            opt.load_state_dict(state)
            opt._kernel = True
        for m, r in zip(opt.master_params(), ref.master_params()):
            assert torch.allclose(m, r, rtol=1e-6, atol=1e-7), step
        for p, q in zip(ours, theirs):
            # masters a rounding apart may round to neighbouring 16-bit weights
            assert torch.allclose(p.data.float(), q.data.float(), rtol=2 ** -7, atol=1e-6), step
    assert norm.dtype == torch.float32
    assert [float(opt.state[m]["step"]) for m in opt.master_params()] == [5.0, 4.0, 5.0, 5.0]
    assert opt.state_dict()["state"][0]["step"].data_ptr() != opt.state_dict()["state"][1]["step"].data_ptr()


@pytest.mark.parametrize("kernel_device", ["interpreter"], indirect=True)
def test_a_gradient_the_kernel_cannot_address_sends_the_update_to_torch(kernel_device):
    """The kernel finds each gradient at an offset from the group's first, a multiple of 16
    elements. A gradient that is a view starting an odd number of elements into its buffer is
    not: the step, and every later one, is torch's AdamW, with the same result."""
    from lmforge.kernels import optim_kernel

    torch.manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in ((40, 8), (24,))]
    reference = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ours = MasterWeightAdamW([{"params": params}], lr=1e-2, fused=True)
    ours._kernel = True  # as on a GPU
    ref = torch.optim.AdamW(reference, lr=1e-2, fused=True)
    for step in range(2):
        buffer = torch.randn(3 + 24).to(torch.bfloat16)
        params[0].grad, params[1].grad = torch.randn(40, 8).to(torch.bfloat16), buffer[3:]
        if step == 0:
            assert optim_kernel.offsets([p.grad for p in params]) is None
        for p, r in zip(params, reference):
            r.grad = p.grad.float()
        ours.step()
        ref.step()
        assert not ours.uses_kernel
        for m, r in zip(ours.master_params(), reference):
            assert torch.equal(m, r)


# --- fp16 weights under a loss scaler -------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_fp16_masters_take_the_unscaled_gradient_and_skip_an_overflow(fused):
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(16, 8).to(torch.float16))
    reference = torch.nn.Parameter(weight.detach().float().clone())
    ours = MasterWeightAdamW([{"params": [weight]}], lr=1e-2, fused=fused)
    ref = torch.optim.AdamW([reference], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x = torch.randn(4, 8).to(torch.float16)

    def backward(loss_factor: float) -> torch.Tensor:
        probe = weight.detach().clone().requires_grad_(True)  # the gradient without scaling
        ((x @ probe.t()).float().square().mean() * loss_factor).backward()
        scaler.scale((x @ weight.t()).float().square().mean() * loss_factor).backward()
        return probe.grad

    for factor in (1.0, 1e30, 1.0):  # the second step's scaled gradients overflow fp16
        unscaled = backward(factor)
        masters = ours.flush_grads()
        scaler.unscale_(ours)
        if factor == 1.0:  # scaling by a power of two is exact: unscaled, the same gradient in fp32
            assert masters[0].grad.dtype == torch.float32 and torch.equal(masters[0].grad, unscaled.float())
        before = (weight.detach().clone(), masters[0].detach().clone())
        scaler.step(ours)
        scaler.update()
        if factor == 1.0:
            reference.grad = unscaled.float()
            ref.step()
            assert torch.equal(masters[0], reference)
            assert torch.equal(weight.data, reference.detach().to(torch.float16))
        else:
            assert torch.equal(weight.data, before[0]) and torch.equal(masters[0], before[1])  # skipped
            assert scaler.get_scale() == 2.0**9  # halved
        assert masters[0].grad is None  # the step (taken or skipped) dropped the fp32 gradient
        weight.grad = None


def scaled_on_the_cpu(init_scale: float, **kwargs):
    """lmforge's Trainer with the loss scaler accelerate makes for --fp16 on a GPU (it makes
    none on a CPU), starting at `init_scale`."""
    from lmforge.training.step import Trainer

    class Scaled(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.accelerator.native_amp = True  # fp16 autocast around the forward, as on a GPU
            self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)

    return Scaled(**kwargs)


def fp16_run(tmp_path, dtype: torch.dtype, init_scale: float, max_steps: int = 6, nan_loss: bool = False):
    from lmforge.config import TrainingArguments
    from lmforge.data.collate import PackedCollator
    from lmforge.data.pack import best_fit_decreasing, pack_records
    from lmforge.training.guards import NonFiniteGuard
    from tests.data.test_pack import ListDataset, records, tiny_model

    recs = records(60, seed=4)
    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], 48, seed=0)
    rows = ListDataset([pack_records([recs[i] for i in b]) for b in bins])
    model = tiny_model("sdpa").to(dtype)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to="none", disable_tqdm=True, logging_steps=1,
                             fp16=True, max_grad_norm=1.0, remove_unused_columns=False, dataloader_pin_memory=False,
                             save_strategy="no", overwrite_output_dir=True)
    trainer = scaled_on_the_cpu(init_scale, model=model, args=args, train_dataset=rows, data_collator=PackedCollator(0),
                                callbacks=[NonFiniteGuard()])  # as train_and_save adds it
    if nan_loss:
        compute_loss = trainer.compute_loss
        trainer.compute_loss = lambda *a, **k: compute_loss(*a, **k) * float("nan")
    trainer.train()
    return trainer, model, start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_fp16_run_goes_on_past_the_loss_scalers_overflows(tmp_path, dtype):
    # 2^24 makes the first steps' scaled fp16 gradients overflow; the scaler skips them and
    # halves its scale until they fit. Those are the scaler's business, not a diverged run.
    trainer, model, start = fp16_run(tmp_path, dtype, init_scale=2.0**24)
    scale = trainer.accelerator.scaler.get_scale()
    assert scale < 2.0**24  # there were overflows
    norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(norms) == 6
    # The logged norms are of the unscaled gradients (a norm of the scaled ones is about `scale`
    # times larger, or inf), and the steps after the overflows moved every weight.
    finite = [n for n in norms if n == n and n != float("inf")]
    assert finite and max(finite) < 100, norms
    for name, p in model.named_parameters():
        assert p.dtype == dtype and torch.isfinite(p).all(), name
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    inner = trainer.optimizer.optimizer
    assert isinstance(inner, MasterWeightAdamW) == (dtype == torch.float16)


def test_gradients_non_finite_at_every_loss_scale_stop_the_run(tmp_path):
    from lmforge.training.guards import NonFiniteGradients

    with pytest.raises(NonFiniteGradients, match=r"the loss scaler skipped step after step: the gradients were "
                                                 r"non-finite at every scale down to 0\.5"):
        fp16_run(tmp_path, torch.float16, init_scale=4.0, max_steps=10, nan_loss=True)


def test_low_bit_optimizers_run_as_chosen_with_stochastic_rounding_over_bf16():
    """Only torch's AdamW is replaced by the fp32-master AdamW; torchao's low-bit AdamW over bf16
    weights gets stochastic rounding once, unless the user set it; nothing else is touched."""
    from types import SimpleNamespace

    from lmforge.modeling.optim import keeps_masters, with_stochastic_rounding

    def args(optim: str, optim_args=None):
        return SimpleNamespace(optim=optim, optim_args=optim_args, deepspeed=None, fsdp="")

    assert [keeps_masters(args(o)) for o in ("adamw_torch", "adamw_torch_fused", "adamw_torch_8bit",
                                               "adamw_torch_4bit", "adamw_bnb_8bit", "adafactor")] == \
        [True, True, False, False, False, False]
    bf16 = torch.nn.Linear(4, 4).to(torch.bfloat16)
    a = args("adamw_torch_8bit")
    assert "stochastic rounding" in with_stochastic_rounding(a, bf16)
    assert a.optim_args == "bf16_stochastic_round=True"
    assert with_stochastic_rounding(a, bf16) is None and a.optim_args == "bf16_stochastic_round=True"
    b = args("adamw_torch_4bit", "block_size=128")
    with_stochastic_rounding(b, bf16)
    assert b.optim_args == "block_size=128,bf16_stochastic_round=True"
    for untouched in (args("adamw_torch_8bit", "bf16_stochastic_round=False"), args("adamw_bnb_8bit")):
        before = untouched.optim_args
        assert with_stochastic_rounding(untouched, bf16) is None and untouched.optim_args == before
    assert with_stochastic_rounding(args("adamw_torch_8bit"), torch.nn.Linear(4, 4)) is None  # fp32 weights
