"""Weight-only int8: error bounds per element and per output, and a quantized model still decodes."""
from __future__ import annotations

import torch

from lmrun.inference import InferenceEngine, SamplingParams
from lmrun.inference.quantize import Int8Linear, quantize_int8, quantize_weight_int8, weight_bytes
from lmrun.model.layers import Linear
from lmrun.model.transformer import TransformerLM


def test_weight_error_within_half_a_step_and_output_bound():
    torch.manual_seed(0)
    lin = Linear(48, 20, bias=True)
    lin.weight.data[3] = 0.0  # a zero row
    lin.weight.data[5, 7] = 9.0  # an outlier widens its row's step only
    q, s = quantize_weight_int8(lin.weight)
    assert q.dtype == torch.int8 and s.shape == (20,) and int(q.abs().max()) <= 127
    err = (q.float() * s[:, None] - lin.weight.detach()).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())
    assert float(err[3].max()) == 0.0
    assert float(s[5]) > 5 * float(s[4])
    x = torch.randn(6, 48)
    with torch.no_grad():
        y, yq = lin(x), Int8Linear(lin)(x)
    bound = x.abs().sum(-1, keepdim=True) * s[None, :] / 2 + 1e-5
    assert bool(((y - yq).abs() <= bound).all())
    assert float((y - yq).abs().max()) > 0  # it is quantized


def test_quantized_model_decodes_close_to_the_float_model():
    torch.manual_seed(0)
    model = TransformerLM(50, 32, 32, 2, 4, 64, attention_kind="mla").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 50, (2, 12))
    ref = model(ids)
    before = weight_bytes(model)
    quantize_int8(model, skip=("lm_head",))
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * (6 + 3)  # MLA: q, kv_down, k_rope, k_up, v_up, output; SwiGLU: w1-w3
    assert weight_bytes(model) < before
    out = model(ids)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    c = InferenceEngine(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert len(c.token_ids) == 5
