"""AdamW over fp32 master copies of 16-bit weights.

A model trained with fp32 weights under bf16 autocast keeps its residual stream, norms and
saved activations in fp32 and casts every weight and activation to bf16 on use; a model held
in bf16 avoids all of that (on the H100 bench it was the cheaper path), but plain AdamW on
bf16 weights loses every update smaller than bf16's resolution (about 0.4 % of the weight).
The usual answer, master weights, is what the HF Trainer lacks outside DeepSpeed: the model
computes in bf16, the optimizer keeps an fp32 copy of each trained weight, applies the update
there and writes the rounded result back.

Memory during the backward pass (the peak) is the same as fp32 training minus the fp32
activations: 2 + 2 bytes a parameter for the bf16 weight and gradient, 4 for the master, 8 for
the moments.

On a CUDA GPU the update is one Triton kernel per parameter group (`lmforge.kernels.optim_kernel`): it
reads the 16-bit gradient, scales it by the clipping's factor (`clip_grad_norm_` measures the
16-bit gradients in fp32 and leaves them as they are), and writes master, moments and 16-bit
weight in one pass; no fp32 gradient is made. Elsewhere (a CPU, a sharded DTensor, a tensor the
kernel cannot address) torch's AdamW runs over fp32 copies of the gradients that exist only
inside `step`. Both keep torch's AdamW state, so a checkpoint resumes on either.

fp16 weights (--torch_dtype float16 --fp16 True) need loss scaling as well: torch's GradScaler
refuses to unscale fp16 gradients, so the Trainer first copies them into the masters' fp32
gradients (`flush_grads`), and the scaler unscales and checks those; a step it finds overflowed
is handed its flag (`found_inf`) and changes nothing.
"""

from __future__ import annotations

import math

import torch

from lmforge.kernels import optim_kernel


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose parameters are fp32 masters of the model's 16-bit parameters.

    `param_groups` is given as for AdamW, with the model's parameters; schedulers and the Trainer
    see a normal optimizer. Gradient clipping goes through `clip_grad_norm_` (lmforge's Trainer
    calls it), which hands the step its factor.
    The masters are part of `state_dict()`, so a resumed run continues from them and not
    from the rounded weights."""

    # torch's GradScaler hands a step its overflow flag (`found_inf`) instead of skipping the
    # call: `step` always runs, and always drops the masters' gradients of the step.
    _step_supports_amp_scaling = True

    def __init__(self, param_groups: list[dict], **defaults):
        self.model_params: list[list[torch.Tensor]] = []
        master_groups = []
        for group in param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            self.model_params.append(params)
            masters = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in params]
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **defaults)
        self.grad_coef: torch.Tensor | None = None  # the clipping's factor for the next step
        self.grad_norm: torch.Tensor | None = None  # the gradients' norm, measured for the next step
        self._steps: dict[int, torch.Tensor] = {}  # a group's step counts (kernel path), by id(group)
        options = self.defaults
        self._kernel = (not options.get("amsgrad") and not options.get("maximize")
                        and not options.get("differentiable")
                        and all(optim_kernel.usable(g["params"], params)
                                for g, params in zip(self.param_groups, self.model_params) if params))

    def _pairs(self):
        for params, group in zip(self.model_params, self.param_groups):
            yield from zip(params, group["params"])

    def master_params(self) -> list[torch.Tensor]:
        return [m for group in self.param_groups for m in group["params"]]

    @torch.no_grad()
    def flush_grads(self) -> list[torch.Tensor]:
        """Give each master the fp32 copy of its model parameter's gradient (once a step; `step`
        does it when nobody did before) and return the masters. Under --fp16 the Trainer calls
        this before the loss scaler unscales the gradients and before clipping: both then act on
        fp32 gradients (fp16 ones cannot be unscaled, and a norm of scaled fp16 gradients
        overflows)."""
        from torch.distributed.tensor import DTensor

        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p, m in self._pairs():
            if p.grad is None or m.grad is not None:
                continue
            if isinstance(m, DTensor):  # a shard (FSDP2): converted on its own, as a DTensor
                m.grad = p.grad.to(torch.float32)
            else:
                by_device.setdefault(m.device, []).append((p, m))
        for device, pairs in by_device.items():
            # One fp32 buffer for all the step's gradients and one multi-tensor copy into it,
            # instead of a conversion kernel and an allocation per parameter: small models'
            # steps are bound by how fast the host launches kernels.
            flat = torch.empty(sum(m.numel() for _, m in pairs), dtype=torch.float32, device=device)
            views = [v.view_as(m) for v, (_, m) in zip(flat.split([m.numel() for _, m in pairs]), pairs)]
            torch._foreach_copy_(views, [p.grad for p, _ in pairs])
            for view, (_, m) in zip(views, pairs):
                m.grad = view
        return self.master_params()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total (L2) norm of the step's gradients, in fp32; when it exceeds `max_norm`
        (inf: measure only) the step scales them by max_norm / (norm + 1e-6), as torch's
        clip_grad_norm_ would. The 16-bit gradients are read as they are (their fp32 norm): the
        scaling happens on the fp32 gradient inside the update, so no scaled gradient is ever
        rounded to 16 bits. Where masters hold fp32 gradients (`flush_grads`, under --fp16),
        those are measured and scaled instead."""
        grads = [m.grad if m.grad is not None else p.grad for p, m in self._pairs()
                 if m.grad is not None or p.grad is not None]
        if not grads:
            return torch.zeros(())
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        norm = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
        if math.isfinite(max_norm):
            self.grad_coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        self.grad_norm = norm
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW does not take a closure")
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("MasterWeightAdamW takes unscaled gradients: call flush_grads() and the loss scaler's "
                               "unscale_(optimizer) before its step")
        coef, self.grad_coef, self.grad_norm = self.grad_coef, None, None
        found_inf = getattr(self, "found_inf", None)  # set by a loss scaler, or lmforge's NonFiniteGuard
        if not self._kernel_step(coef, found_inf):
            self._torch_step(coef, found_inf)
        for m in self.master_params():
            m.grad = None  # the fp32 gradient lives only for the update

    @property
    def uses_kernel(self) -> bool:
        """Whether the update runs as lmforge's one kernel a group (else torch's AdamW)."""
        return self._kernel

    def skips_on_found_inf(self) -> bool:
        """Whether `step` honours a device-side `found_inf` flag without reading it on the host."""
        return self._kernel or bool(self.defaults.get("fused"))

    def _kernel_step(self, coef: torch.Tensor | None, found_inf: torch.Tensor | None) -> bool:
        """The update as one kernel a group (`lmforge.kernels.optim_kernel`); False where it cannot run."""
        if not self._kernel:
            return False
        work = []
        for group, params, steps in zip(self.param_groups, self.model_params, self._group_steps()):
            chosen = [i for i, (p, m) in enumerate(zip(params, group["params"]))
                      if m.grad is not None or p.grad is not None]
            if not chosen:
                continue
            masters = [group["params"][i] for i in chosen]
            grads = [m.grad if m.grad is not None else params[i].grad for i, m in zip(chosen, masters)]
            plan = optim_kernel.plan(grads, [params[i] for i in chosen], masters,
                                     [self.state[m]["exp_avg"] for m in masters],
                                     [self.state[m]["exp_avg_sq"] for m in masters])
            if plan is None:
                self._kernel = False  # a tensor out of the kernel's reach: torch's update from now on
                return False
            work.append((group, plan, steps, chosen if len(chosen) < len(params) else None))
        advance = 1.0 if found_inf is None else 1.0 - found_inf  # a skipped step is not counted
        for group, plan, steps, chosen in work:
            if chosen is None:
                steps.add_(advance)
            else:  # some parameters got no gradient this step: torch's AdamW leaves them alone too
                steps[chosen] += advance
                steps = steps[chosen]
            optim_kernel.adamw_step(plan, steps, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                    weight_decay=group["weight_decay"], coef=coef, found_inf=found_inf)
        return True

    def _group_steps(self) -> list[torch.Tensor | None]:
        """Each group's step counts, one fp32 tensor on the device (None for a group without
        parameters); every master's state (torch's fused AdamW layout: step, exp_avg,
        exp_avg_sq) made where missing, its step a view of that tensor."""
        out = []
        for group in self.param_groups:
            masters = group["params"]
            steps = self._steps.get(id(group))
            # Made once (again after load_state_dict, which drops them): no scan of the state a step.
            if masters and steps is None:
                old = [self.state[m]["step"] if m in self.state else 0.0 for m in masters]
                steps = torch.tensor([float(s) for s in old], dtype=torch.float32, device=masters[0].device)
                self._steps[id(group)] = steps
                for i, m in enumerate(masters):
                    state = self.state[m]
                    state.setdefault("exp_avg", torch.zeros_like(m, memory_format=torch.preserve_format))
                    state.setdefault("exp_avg_sq", torch.zeros_like(m, memory_format=torch.preserve_format))
                    state["step"] = steps[i]
            out.append(steps)
        return out

    def _torch_step(self, coef: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        """torch's AdamW over the masters' fp32 gradients, then the masters copied back."""
        self.flush_grads()
        with_grad = [(p, m) for p, m in self._pairs() if m.grad is not None]
        if coef is not None and with_grad:
            torch._foreach_mul_([m.grad for _, m in with_grad], coef.to(with_grad[0][1].device))
        if found_inf is not None and not self.defaults.get("fused"):
            # Only the fused update skips itself on the device-side flag; the others are told
            # here (a host sync, as torch's GradScaler makes for them too).
            self.found_inf = None
            if not bool(found_inf.item()):
                super().step()
            self.found_inf = found_inf
        else:
            super().step()
        if with_grad:
            # A step the loss scaler skipped (an overflow) left the masters as they were: the
            # copy writes back the same weights.
            torch._foreach_copy_([p for p, _ in with_grad], [m for _, m in with_grad])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for m in self.master_params():
            m.grad = None  # flushed, then the step was not taken
        for params in self.model_params:
            for p in params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        state = super().state_dict()
        for entry in state["state"].values():  # the kernel path's steps are views of one tensor
            if torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].clone()
        state["master_params"] = [m.detach().clone() for m in self.master_params()]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_params", None)
        super().load_state_dict(state_dict)
        self._steps.clear()  # the kernel path's step counts: made again from the loaded state
        if masters is not None:
            pairs = list(self._pairs())
            if len(masters) != len(pairs):
                raise ValueError(f"optimizer state holds {len(masters)} master weights, the model trains {len(pairs)}")
            with torch.no_grad():
                for (p, m), saved in zip(pairs, masters):
                    m.copy_(saved)
                    p.copy_(saved)


# torch's AdamW, which lmforge's MasterWeightAdamW replaces over fp32 masters.
TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused")
# Optimizers whose moments are stored in a few bits (bytes of state per trained weight):
# transformers' names for torchao's AdamW8bit / AdamW4bit (blockwise-quantised moments) and for
# bitsandbytes' 8-bit AdamW.
LOW_BIT_STATE_BYTES = {"adamw_torch_8bit": 2, "adamw_torch_4bit": 1, "adamw_bnb_8bit": 2, "adamw_8bit": 2,
                       "paged_adamw_8bit": 2}
# torchao's low-bit AdamW take `bf16_stochastic_round`: the update of a bf16 weight rounded up or
# down at random in proportion to the remainder, so updates below bf16's resolution are kept on
# average instead of lost, with no fp32 master copy (4 bytes a weight saved).
STOCHASTIC_ROUNDING = ("adamw_torch_8bit", "adamw_torch_4bit")


def optim_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


def keeps_masters(args) -> bool:
    """Whether the run's optimizer can keep fp32 masters of 16-bit weights: torch's AdamW, and no
    engine that keeps its own (DeepSpeed, FSDP's mixed precision). Other optimizers (low-bit
    states, Adafactor, ...) run as the user chose them."""
    if args.deepspeed or args.fsdp:
        return False
    return optim_name(args) in TORCH_ADAMW


def state_bytes(args, dtype: torch.dtype) -> int:
    """Bytes of optimizer state per trained weight of `dtype`: AdamW's two fp32 moments, plus an
    fp32 master of a 16-bit weight where lmforge keeps one; a few bits' worth for the low-bit
    optimizers; DeepSpeed also keeps fp32 masters of its own."""
    name = optim_name(args) if args is not None else "adamw_torch"
    if name in LOW_BIT_STATE_BYTES:
        return LOW_BIT_STATE_BYTES[name]
    masters = dtype != torch.float32 and (args is None or keeps_masters(args) or bool(args.deepspeed))
    return 8 + (4 if masters else 0)


def with_stochastic_rounding(args, model) -> str | None:
    """For torchao's low-bit AdamW over bf16 weights: `bf16_stochastic_round=True` added to
    --optim_args unless the user set it; returns what was done (None: nothing)."""
    if optim_name(args) not in STOCHASTIC_ROUNDING or "bf16_stochastic_round" in (args.optim_args or ""):
        return None
    if not any(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters()):
        return None
    args.optim_args = ",".join(filter(None, [args.optim_args, "bf16_stochastic_round=True"]))
    return (f"--optim {optim_name(args)} over bf16 weights: stochastic rounding of the update, so updates below "
            "bf16's resolution are kept on average (--optim_args bf16_stochastic_round=False: round to nearest)")


def wants_master_weights(model, args) -> str | None:
    """Why the model's optimizer should keep fp32 masters (None: it should not): trained
    parameters in 16 bits and an optimizer that can keep them (`keeps_masters`)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained or all(p.dtype == torch.float32 for p in trained):
        return None
    if not keeps_masters(args):
        return None
    return f"{trained[0].dtype} weights"


def adapter_dtype(model_dtype: torch.dtype, args) -> torch.dtype | None:
    """The dtype LoRA adapters are held in (None: PEFT's fp32): the 16-bit dtype the model is
    held in, when the run computes in it (its autocast, if any, is that dtype) and the optimizer
    keeps fp32 masters. An adapter trained by an optimizer without masters stays fp32, or updates
    below 16-bit resolution would be lost."""
    autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if model_dtype not in (torch.bfloat16, torch.float16) or autocast not in (None, model_dtype):
        return None
    return model_dtype if keeps_masters(args) else None
