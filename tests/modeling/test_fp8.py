"""The float8 rule (`lmforge.modeling.fp8.choose`) and the layers it converts; float8 training itself,
its saving and its resume are in tests/training/test_resume.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.modeling import fp8

H100 = (9, 0)
BASE = dict(capability=H100, torchao=True, compiled=True, engine=None, adapters=False, hidden=2048)


@pytest.mark.parametrize("change, on, reason", [
    ({}, True, "SM90, hidden size 2048"),
    ({"hidden": 896}, False, "hidden size 896 < 2048"),
    ({"capability": (8, 0)}, False, "SM80 has no float8 matmuls"),
    ({"capability": (8, 9)}, True, "SM89"),
    ({"capability": None}, False, "no CUDA GPU"),
    ({"torchao": False}, False, "torchao is not installed"),
    ({"compiled": False}, False, "blocks not compiled"),
    ({"engine": "FSDP"}, False, "FSDP keeps fp32 weights"),
    ({"adapters": True}, False, "LoRA / QLoRA"),
])
def test_auto_rule(change, on, reason):
    chosen, why = fp8.choose("auto", **{**BASE, **change})
    assert chosen is on and reason in why


def test_false_is_off_and_true_is_refused_where_it_cannot_run():
    assert fp8.choose("false", **BASE) == (False, "--fp8 false")
    # true runs where auto would not (a CPU, a small model: for tests and for users who measured)
    assert fp8.choose("true", **{**BASE, "capability": None, "hidden": 64}) == (True, "--fp8 true")
    with pytest.raises(LmforgeError, match="--fp8 true cannot run here: DeepSpeed keeps"):
        fp8.choose("true", **{**BASE, "engine": "DeepSpeed"})
    with pytest.raises(LmforgeError, match="choose one of auto, true, false"):
        fp8.choose("maybe", **BASE)


def test_only_plain_linear_layers_of_float8_dimensions_convert():
    pytest.importorskip("torchao")
    blocks = [torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 24), torch.nn.LayerNorm(24))
              for _ in range(2)]
    head = torch.nn.Linear(24, 48)
    model = torch.nn.Sequential(*blocks, head)
    weights = [b[0].weight for b in blocks]
    assert fp8.convert(model, blocks) == 2  # 24 is not a multiple of 16
    assert [type(b[0]).__name__ for b in blocks] == ["Float8Linear"] * 2
    assert [type(b[1]) for b in blocks] == [torch.nn.Linear] * 2 and type(model[2]) is torch.nn.Linear
    assert all(b[0].weight is w for b, w in zip(blocks, weights))  # the optimizer's parameters, unchanged


@pytest.mark.gpu
def test_float8_blocks_compile_once_each_and_train_close_to_bf16():
    """On a GPU of SM89+: a 6-block model with float8 linear layers in compiled blocks runs a
    forward + backward with every block compiled (dynamo fails instead of falling back to eager
    when a limit is hit: the room `compile_settings` gives), and its loss and gradient norm are
    within float8's rounding of the same model in bf16."""
    import transformers

    from lmforge.modeling.load import compile_blocks, compile_settings, decoder_blocks

    if torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY:
        pytest.skip("float8 matmuls need SM89 or newer")
    pytest.importorskip("torchao")
    import torch._dynamo.config as dynamo_config

    config = transformers.AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                               num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
                                               max_position_embeddings=512)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).cuda().to(torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_config(config).cuda().to(torch.bfloat16)
    model.load_state_dict(reference.state_dict())
    assert fp8.convert(model, decoder_blocks(model)) == 6 * 7
    compile_blocks(model)
    ids = torch.randint(0, 512, (4, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step(m) -> tuple[float, float]:
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None]).norm()
        m.zero_grad()
        return loss.item(), norm.item()

    strict = (dynamo_config.patch(fail_on_recompile_limit_hit=True)
              if hasattr(dynamo_config, "fail_on_recompile_limit_hit") else contextlib.nullcontext())
    with compile_settings(0.8, 6, float8=True), strict:
        got = [step(model) for _ in range(2)]
    want = step(reference)
    for loss, norm in got:
        assert abs(loss - want[0]) <= 0.02 * want[0]
        assert abs(norm - want[1]) <= 0.1 * want[1]
