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
the moments. The fp32 gradient the update needs exists only inside `step`.

fp16 weights (--torch_dtype float16 --fp16 True) need loss scaling as well: torch's GradScaler
refuses to unscale fp16 gradients, so the Trainer first copies them into the masters' fp32
gradients (`flush_grads`), and the scaler unscales and checks those; a step it finds overflowed
is handed its flag (`found_inf`) and changes nothing.
"""

from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose parameters are fp32 masters of the model's 16-bit parameters.

    `param_groups` is given as for AdamW, with the model's parameters; schedulers, gradient
    clipping (on the model's gradients, before `step`) and the Trainer see a normal optimizer.
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
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW does not take a closure")
        self.flush_grads()
        with_grad = [(p, m) for p, m in self._pairs() if m.grad is not None]
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("MasterWeightAdamW takes unscaled gradients: call flush_grads() and the loss scaler's "
                               "unscale_(optimizer) before its step")
        found_inf = getattr(self, "found_inf", None)  # set by a loss scaler, or lmforge's NonFiniteGuard
        if found_inf is not None and not self.defaults.get("fused"):
            # Only the fused update skips itself on the device-side flag; the others are told
            # here (a host sync, as torch's GradScaler makes for them too).
            self.found_inf = None
            if not bool(found_inf.item()):
                super().step()
            self.found_inf = found_inf
        else:
            super().step()
        for _, m in with_grad:
            m.grad = None  # the fp32 gradient lives only for the update
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
        state["master_params"] = [m.detach().clone() for m in self.master_params()]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_params", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            pairs = list(self._pairs())
            if len(masters) != len(pairs):
                raise ValueError(f"optimizer state holds {len(masters)} master weights, the model trains {len(pairs)}")
            with torch.no_grad():
                for (p, m), saved in zip(pairs, masters):
                    m.copy_(saved)
                    p.copy_(saved)


def keeps_masters(args) -> bool:
    """Whether the run's optimizer can keep fp32 masters of 16-bit weights: torch's AdamW, and no
    engine that keeps its own (DeepSpeed, FSDP's mixed precision)."""
    if args.deepspeed or args.fsdp:
        return False
    return str(getattr(args.optim, "value", args.optim)).startswith("adamw_torch")


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
