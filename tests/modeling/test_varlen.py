"""lmforge's varlen attention: the documents' offsets, the way they reach every attention layer,
and (on a GPU) PyTorch's flash kernel giving packed == unpacked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from lmforge.data.collate import CU_SEQLENS, cu_seqlens
from lmforge.data.collate import PackedCollator, PaddedCollator
from lmforge.data.pack import best_fit_decreasing, pack_records
from lmforge.modeling import attention
from lmforge.modeling.attention import VARLEN, document_attention_mask, is_no_mask, register_varlen
from tests.data.test_pack import VOCAB, loss_and_grads, records, tiny_model


def test_cu_seqlens_starts_every_document_row_and_padding_run():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1],
                        [0, 1, 1, 1, 2, 2],
                        [0, 0, 0, 0, -1, -1]])
    # row 0: 0..3, 3..5, pad 5..6; row 1: 6..7, 7..10, 10..12; row 2: 12..16, pad 16..18
    assert cu_seqlens(ids).tolist() == [0, 3, 5, 6, 7, 10, 12, 16, 18]
    assert cu_seqlens(ids).dtype == torch.int32
    # the same id continuing across a row boundary is still two sequences
    assert cu_seqlens(torch.tensor([[0, 0], [0, 0]])).tolist() == [0, 2, 4]


class ReferenceKernel:
    """A CPU stand-in for PyTorch's flash varlen function, with the newer signature: causal SDPA
    on each sequence separately, over the last `left + 1` keys when given window_size=(left, 0).
    Counts its calls and records the key / value head counts and windows it was given.
    `native_gqa`: whether it takes fewer key / value heads without enable_gqa."""

    def __init__(self, native_gqa: bool = False):
        self.calls, self.kv_heads, self.windows, self.native_gqa = 0, [], [], native_gqa

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, scale=None):
        left, right = window_size
        assert right == 0 and torch.equal(cu_q, cu_k) and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
        if k.shape[1] != q.shape[1]:
            assert enable_gqa or self.native_gqa, "grouped heads given to a kernel not told about them"
        self.calls += 1
        self.kv_heads.append(k.shape[1])
        self.windows.append(left)
        out = torch.empty_like(q)
        for start, stop in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            part = [x[start:stop].transpose(0, 1).float() for x in (q, k, v)]
            n = stop - start
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            if left >= 0:
                allowed &= ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-left - 1)
            out[start:stop] = F.scaled_dot_product_attention(*part, attn_mask=allowed, scale=scale,
                                                             enable_gqa=k.shape[1] != q.shape[1]
                                                             ).transpose(0, 1).to(q.dtype)
        return out


@pytest.fixture
def reference_kernel(monkeypatch):
    register_varlen()
    kernel = ReferenceKernel()
    monkeypatch.setattr(attention._Kernel, "fn", kernel)
    monkeypatch.setattr(attention._Kernel, "windowed", True)
    monkeypatch.setattr(attention._Kernel, "gqa", True)
    monkeypatch.setattr(attention._Kernel, "scale", True)
    monkeypatch.setattr(attention._Kernel, "dtypes", (torch.float32,))  # the reference takes fp32
    return kernel


def varlen_batch(recs: list[dict], capacity: int) -> dict:
    """A packed batch as lmforge's Trainer hands it to a varlen model: the zero-size placeholder
    mask, the offsets."""
    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], capacity, seed=0)
    batch = PackedCollator(pad_token_id=0)([pack_records([recs[i] for i in b]) for b in bins])
    documents = batch.pop("document_ids")
    batch["attention_mask"] = document_attention_mask(documents, VARLEN, torch.float32)
    assert is_no_mask(batch["attention_mask"])
    batch[CU_SEQLENS] = cu_seqlens(documents)
    return batch


def test_varlen_attention_reaches_every_layer_and_equals_unpacked(reference_kernel):
    """With a reference kernel in place of the flash one: the offsets reach both layers' attention
    (two calls a forward), grouped-query heads go through, and packed loss and gradients equal
    the unpacked padded run."""
    model = tiny_model(VARLEN)
    recs = records(12)
    unpacked, grads_u = loss_and_grads(model, PaddedCollator(pad_token_id=0)(recs))
    calls_unpacked = reference_kernel.calls
    packed, grads_p = loss_and_grads(model, varlen_batch(recs, capacity=64))
    assert calls_unpacked == 0  # an unpacked batch goes to SDPA with transformers' mask
    assert reference_kernel.calls == model.config.num_hidden_layers
    assert abs(packed - unpacked) <= 1e-5 * abs(unpacked)
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-7), name


def test_varlen_in_fp32_falls_back_to_sdpa_with_the_same_documents(monkeypatch):
    """The flash kernel takes 16-bit inputs only; an fp32 run (no autocast) goes to SDPA with a
    mask built from the offsets, and still equals the unpacked run."""
    register_varlen()

    def never(*args, **kwargs):
        raise AssertionError("the flash kernel was called with fp32 inputs")

    monkeypatch.setattr(attention._Kernel, "fn", never)
    model = tiny_model(VARLEN)
    recs = records(12)
    unpacked, grads_u = loss_and_grads(model, PaddedCollator(pad_token_id=0)(recs))
    packed, grads_p = loss_and_grads(model, varlen_batch(recs, capacity=64))
    assert abs(packed - unpacked) <= 1e-5 * abs(unpacked)
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-7), name


def test_no_mask_spares_transformers_packing_detection(reference_kernel, monkeypatch):
    """With the placeholder, transformers neither looks for packing in the position_ids (which
    reads a GPU flag on the host) nor builds a mask; without it, it does both (the control)."""
    from transformers import masking_utils

    seen = []
    find = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: seen.append("find") or find(p))
    model = tiny_model(VARLEN)
    model.config.use_cache = False  # as lmforge trains (with a cache transformers skips the detection)
    batch = varlen_batch(records(12), capacity=64)
    with torch.no_grad():
        model(**batch)
        assert seen == [] and reference_kernel.calls == model.config.num_hidden_layers
        model(**{k: v for k, v in batch.items() if k != "attention_mask"})
    assert seen == ["find"]


def test_grouped_heads_go_to_the_kernel_unrepeated_when_it_takes_them(reference_kernel, monkeypatch):
    """A kernel without enable_gqa that takes fewer key / value heads (what `probe_native_gqa`
    finds) gets the model's 2 heads, not 4 repeated ones, and the result still equals the
    unpacked run; one that does not take them gets the heads repeated."""
    monkeypatch.setattr(attention._Kernel, "gqa", False)
    model = tiny_model(VARLEN)
    recs = records(12)
    unpacked, grads_u = loss_and_grads(model, PaddedCollator(pad_token_id=0)(recs))
    for native, heads in ((True, 2), (False, 4)):
        kernel = ReferenceKernel(native_gqa=native)
        monkeypatch.setattr(attention._Kernel, "fn", kernel)
        monkeypatch.setattr(attention._Kernel, "native_gqa", native)
        packed, grads_p = loss_and_grads(model, varlen_batch(recs, capacity=64))
        assert kernel.kv_heads == [heads] * model.config.num_hidden_layers
        assert abs(packed - unpacked) <= 1e-5 * abs(unpacked)
        for name in grads_u:
            assert torch.allclose(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-7), name


def sliding_model(attn: str, window: int):
    config = transformers.AutoConfig.for_model(
        "mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=window, head_dim=8)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def test_sliding_window_reaches_the_kernel_as_transformers_means_it(reference_kernel, monkeypatch):
    """A sliding-window model (window 5, records up to 30 tokens): the kernel gets window_size
    (4, 0), and packed varlen loss and gradients equal transformers' own sliding-window SDPA run
    unpacked, so the window covers the same keys. A kernel that takes no window is refused."""
    reference = sliding_model("sdpa", window=5)
    model = sliding_model(VARLEN, window=5)
    model.load_state_dict(reference.state_dict())
    recs = records(12)
    unpacked, grads_u = loss_and_grads(reference, PaddedCollator(pad_token_id=0)(recs))
    packed, grads_p = loss_and_grads(model, varlen_batch(recs, capacity=64))
    assert reference_kernel.windows == [4] * model.config.num_hidden_layers
    assert abs(packed - unpacked) <= 1e-5 * abs(unpacked)
    for name in grads_u:
        assert torch.allclose(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6), name
    monkeypatch.setattr(attention._Kernel, "windowed", False)
    with pytest.raises(ValueError, match="sliding window of 5 tokens"):
        model(**varlen_batch(recs, capacity=64))


def test_trainer_batches_carry_offsets_and_label_positions_from_the_collator(reference_kernel, tmp_path,
                                                                             monkeypatch):
    """The Trainer's data loader yields packed batches that already carry the label positions and
    the documents' offsets (computed on the CPU, before the batch moves to a GPU), and a training
    step of a varlen model never runs transformers' packing detection."""
    from transformers import masking_utils

    from lmforge.config import TrainingArguments
    from lmforge.data.collate import LABEL_POSITIONS, label_positions
    from lmforge.training.step import Trainer
    from tests.data.test_pack import ListDataset

    seen = []
    find = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: seen.append("find") or find(p))
    recs = records(40, seed=7)
    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], 48, seed=0)
    rows = ListDataset([pack_records([recs[i] for i in b]) for b in bins])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             report_to="none", disable_tqdm=True, save_strategy="no", remove_unused_columns=False,
                             dataloader_pin_memory=False, fused_loss=True)
    model = tiny_model(VARLEN)
    model.config.use_cache = False
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=PackedCollator(0))
    batch = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(batch[CU_SEQLENS], cu_seqlens(batch["document_ids"]))
    assert torch.equal(batch[LABEL_POSITIONS], label_positions(batch["labels"]))
    trainer.train()
    assert reference_kernel.calls == 2 * 2  # 2 steps x 2 layers
    assert seen == []


def test_offsets_mask_is_causal_within_each_sequence():
    mask = attention.offsets_mask(torch.tensor([0, 2, 3, 4, 6], dtype=torch.int32), batch=2, length=3)
    # row 0 holds sequences [0, 2) and [2, 3); row 1 holds [3, 4) and [4, 6)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_attention_is_sdpa_without_a_gpu(capsys):
    from lmforge.flags import ModelArguments
    from lmforge.modeling.load import attention_implementation

    assert attention_implementation(ModelArguments(config_name="x")) == "sdpa"
    assert attention_implementation(ModelArguments(config_name="x"), flash_attn=True) == "sdpa"
    logged = capsys.readouterr().out.splitlines()
    assert all("no GPU" in line for line in logged) and len(logged) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_varlen_refused_without_a_gpu():
    from lmforge.errors import LmforgeError
    from lmforge.flags import ModelArguments
    from lmforge.modeling.load import attention_implementation

    with pytest.raises(LmforgeError, match="varlen .*CUDA GPU"):
        attention_implementation(ModelArguments(config_name="x", attn_implementation="varlen"))


@pytest.mark.gpu  # the varlen flash kernels run on CUDA only
@pytest.mark.parametrize("kernel", attention.KERNELS)
def test_varlen_flash_kernel_packed_equals_unpacked_on_gpu(kernel):
    """The real kernel (PyTorch's, flash-attn-4's where it runs), bf16 autocast over fp32 weights
    (the Trainer's bf16 mode): packed loss equals the unpacked SDPA run within bf16 noise,
    gradients point the same way, and a record's logits do not move when another record of its
    row changes."""
    from lmforge.kernels import flash4

    if kernel == "flash-attn-4" and flash4.unavailable(torch.cuda.get_device_capability(), flash4.installed()):
        pytest.skip(flash4.unavailable(torch.cuda.get_device_capability(), flash4.installed()))
    register_varlen(kernel)
    recs = records(16)

    def gpu_model(attn: str):  # head size 64, as real models have (the tiny one's 8 is padded by the kernel)
        config = transformers.AutoConfig.for_model(
            "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).cuda()

    reference, model = gpu_model("sdpa"), gpu_model(VARLEN)
    model.load_state_dict(reference.state_dict())
    to_gpu = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unpacked, grads_u = loss_and_grads(reference, to_gpu(PaddedCollator(pad_token_id=0)(recs)))
        packed, grads_p = loss_and_grads(model, to_gpu(varlen_batch(recs, capacity=64)))
    assert abs(packed - unpacked) <= 2e-2 * abs(unpacked)
    flat = lambda g: torch.cat([x.flatten().float() for x in g.values()])  # noqa: E731
    assert F.cosine_similarity(flat(grads_p), flat(grads_u), dim=0) > 0.999

    changed = [dict(r) for r in recs]
    changed[0] = {"input_ids": [(t + 1) % VOCAB for t in recs[0]["input_ids"]], "labels": recs[0]["labels"]}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = model(**{k: v for k, v in to_gpu(varlen_batch(recs, 64)).items() if k != "labels"}).logits
        b = model(**{k: v for k, v in to_gpu(varlen_batch(changed, 64)).items() if k != "labels"}).logits
    differs = (a - b).abs().amax(dim=-1) > 0  # [rows, T]: the positions whose logits moved

    bins = best_fit_decreasing([len(r["input_ids"]) for r in recs], 64, seed=0)
    for row, members in enumerate(bins):
        pos = 0
        for i in members:
            n = len(recs[i]["input_ids"])
            assert bool(differs[row, pos:pos + n].any()) == (i == 0), (row, i)
            pos += n


@pytest.mark.parametrize("requested, capability, installed, expected", [
    ("auto", (9, 0), True, "flash-attn-4"),  # H100 / H200
    ("auto", (10, 0), True, "flash-attn-4"),  # B200
    ("auto", (9, 0), False, "torch"),  # not installed
    ("auto", (8, 0), True, "torch"),  # A100: no flash-attn-4 training path
    ("auto", (12, 0), True, "torch"),  # consumer Blackwell
    ("torch", (9, 0), True, "torch"),
    ("flash-attn-4", (9, 0), True, "flash-attn-4"),
])
def test_varlen_kernel_choice(requested, capability, installed, expected):
    chosen, why = attention.choose_kernel(requested, capability, installed)
    assert chosen == expected
    if requested == "auto" and expected == "torch":
        assert ("not installed" in why) if not installed else (f"SM{capability[0]}{capability[1]}" in why)


@pytest.mark.parametrize("capability, head_dim, expected", [
    ((9, 0), 64, "flash-attn-4"), ((9, 0), 80, "flash-attn-4"), ((9, 0), 256, "flash-attn-4"),
    ((9, 0), 512, "torch"), ((9, 0), 60, "torch"),  # too large; not a multiple of 8
    ((10, 0), 128, "flash-attn-4"), ((10, 0), 256, "flash-attn-4"), ((10, 0), 192, "torch"),
])
def test_varlen_kernel_choice_by_head_size(capability, head_dim, expected):
    chosen, why = attention.choose_kernel("auto", capability, True, head_dim)
    assert chosen == expected
    assert expected != "torch" or f"no head size {head_dim}" in why


def test_head_size_of_a_config():
    from lmforge.modeling.load import head_size

    llama = transformers.AutoConfig.for_model("llama", hidden_size=256, num_attention_heads=4)
    assert head_size(llama) == 64
    llama.head_dim = 128  # set apart from hidden / heads, as Qwen3 and Gemma do
    assert head_size(llama) == 128


@pytest.mark.parametrize("capability, installed, reason", [
    ((8, 0), True, "SM80"), ((9, 0), False, "not installed"), (None, True, "no CUDA GPU")])
def test_flash_attn_4_forced_where_it_cannot_run_is_refused_with_the_reason(capability, installed, reason):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match=f"--varlen_kernel flash-attn-4 cannot run here: .*{reason}"):
        attention.choose_kernel("flash-attn-4", capability, installed)


def test_flash_attn_4_op_is_opaque_with_known_shapes():
    """The compiler sees the custom op's fake implementation only: output [T, Hq, D] and an fp32
    log-sum-exp [Hq, T], grouped-query heads kept; the backward's gradients match their inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmforge.kernels import flash4

    with FakeTensorMode():
        q = torch.empty(40, 14, 64, dtype=torch.bfloat16)
        k, v = (torch.empty(40, 2, 64, dtype=torch.bfloat16) for _ in range(2))
        cu = torch.empty(5, dtype=torch.int32)
        out, lse = torch.ops.lmforge.flash4_varlen_forward(q, k, v, cu, 16, 0.125, -1)
        grads = torch.ops.lmforge.flash4_varlen_backward(out, q, k, v, out, lse, cu, 16, 0.125, -1)
    assert out.shape == (40, 14, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (14, 40) and lse.dtype == torch.float32
    assert [tuple(g.shape) for g in grads] == [(40, 14, 64), (40, 2, 64), (40, 2, 64)]
    assert flash4._window(-1) == (None, None) and flash4._window(7) == (7, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads, dim, window", [(14, 2, 64, -1), (32, 8, 64, -1), (28, 4, 128, -1),
                                                          (8, 8, 128, 100)])
def test_flash_attn_4_equals_torch_varlen_on_gpu(heads, kv_heads, dim, window):
    """flash-attn-4's kernel against an fp32 reference (causal SDPA per document) on packed
    documents: outputs and the three gradients within bf16 rounding, eager and inside a compiled
    function (one graph: fullgraph)."""
    from lmforge.kernels import flash4

    if flash4.unavailable(torch.cuda.get_device_capability(), flash4.installed()):
        pytest.skip(flash4.unavailable(torch.cuda.get_device_capability(), flash4.installed()))
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [700, 1, 1300, 48, 2000]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total = sum(lengths)
    leaves = [torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
              for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)

    def run(fn, dtype):
        q, k, v = (x.to(dtype).requires_grad_() for x in leaves)
        out = fn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(window, 0), scale=dim ** -0.5)
        out.backward(grad_out.to(dtype))
        return [out.detach().float()] + [x.grad.float() for x in (q, k, v)]

    expected = run(lambda *a, **kw: ReferenceKernel()(*a, enable_gqa=True, **kw), torch.float32)
    eager = run(flash4.varlen_attn, torch.bfloat16)
    compiled = run(torch.compile(flash4.varlen_attn, fullgraph=True), torch.bfloat16)
    for name, e, a, c in zip(("out", "dq", "dk", "dv"), expected, eager, compiled):
        scale = e.abs().max()
        assert (a - e).abs().max() <= 2e-2 * scale, name
        assert (c - e).abs().max() <= 2e-2 * scale, name


class StandInFlash4:
    """flash-attn-4's two private entry points as lmforge calls them, computed by SDPA on each
    document in fp32 on any device, following the package's contract: causal, a window of
    `window_size_left` earlier keys (None: all), grouped-query heads native, the log-sum-exp
    [heads, tokens] returned with the output, the backward from (q, k, v, out, dout, lse)."""

    calls: list[str] = []

    @staticmethod
    def _documents(q, k, v, cu, scale, left):
        """Per document: (slice, q, k, v with the key / value heads repeated, in fp32; the softmax P)."""
        group = q.shape[1] // k.shape[1]
        for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qq, kk, vv = (x[start:stop].transpose(0, 1).float() for x in (q, k, v))
            kk, vv = (x.repeat_interleave(group, dim=0) for x in (kk, vv))
            n = stop - start
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            if left is not None:
                allowed &= ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-left - 1)
            scores = (qq @ kk.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
            yield slice(start, stop), qq, kk, vv, scores

    @classmethod
    def _flash_attn_fwd(cls, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                        causal, window_size_left, window_size_right, return_lse):
        assert causal and return_lse and cu_seqlens_q is cu_seqlens_k
        assert (window_size_left, window_size_right) == (None, None) or window_size_right == 0
        cls.calls.append("forward")
        out, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        for doc, qq, kk, vv, scores in cls._documents(q, k, v, cu_seqlens_q, softmax_scale, window_size_left):
            lse[:, doc] = scores.logsumexp(-1)
            out[doc] = (scores.softmax(-1) @ vv).transpose(0, 1).to(q.dtype)
        return out, lse, None, None, None

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, dout, lse, softmax_scale, causal, *, window_size_left, window_size_right,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic):
        """The attention backward written out (no autograd inside an op): with P = softmax(S),
        dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q; the
        repeated key / value heads summed back into their group."""
        cls.calls.append("backward")
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        group = q.shape[1] // k.shape[1]
        for doc, qq, kk, vv, scores in cls._documents(q, k, v, cu_seqlens_q, softmax_scale, window_size_left):
            p = torch.exp(scores - lse[:, doc, None])
            do, o = (x[doc].transpose(0, 1).float() for x in (dout, out))
            ds = p * (do @ vv.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
            fold = lambda x: x.unflatten(0, (-1, group)).sum(1).transpose(0, 1)  # noqa: E731
            dq[doc] = (softmax_scale * ds @ kk).transpose(0, 1).to(q.dtype)
            dk[doc] = fold(softmax_scale * ds.transpose(1, 2) @ qq).to(k.dtype)
            dv[doc] = fold(p.transpose(1, 2) @ do).to(v.dtype)
        return dq, dk, dv


@pytest.mark.parametrize("window", [-1, 5])
def test_flash_attn_4_op_plumbing_on_cpu(monkeypatch, window):
    """lmforge's custom ops around flash-attn-4, run on a CPU with a stand-in for the package:
    output and gradients equal the reference kernel's (grouped-query heads, a sliding window),
    eagerly and compiled into one graph (fullgraph: the compiler sees the op, not the package),
    and the backward goes through the package's backward (one call a backward)."""
    from lmforge.kernels import flash4

    monkeypatch.setattr(flash4, "_interface", lambda: StandInFlash4)
    StandInFlash4.calls = []
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 4]
    cu = torch.tensor([0, 7, 8, 20, 24], dtype=torch.int32)
    leaves = [torch.randn(24, h, 16, generator=gen) for h in (4, 2, 2)]
    grad_out = torch.randn(24, 4, 16, generator=gen)

    def run(fn):
        q, k, v = (x.clone().requires_grad_() for x in leaves)
        out = fn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=(window, 0), scale=0.3)
        out.backward(grad_out)
        return [out.detach()] + [x.grad for x in (q, k, v)]

    expected = run(lambda *a, **kw: ReferenceKernel()(*a, enable_gqa=True, **kw))
    for fn in (flash4.varlen_attn, torch.compile(flash4.varlen_attn, fullgraph=True, backend="aot_eager")):
        got = run(fn)
        for name, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
            assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), name
    assert StandInFlash4.calls == ["forward", "backward"] * 2
