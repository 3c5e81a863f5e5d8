"""The Transformer LM gives the same logits and gradients with every attention implementation
(naive, sdpa, flash_torch, flash_triton) and norm implementation (torch, triton); the Triton
ones are one-line config errors where they cannot run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmrun import cli
from lmrun.errors import ConfigError
from lmrun.model import build_model

SMALL = ["model/size=tiny", "model.vocab_size=97", "model.context_length=32", "model.dropout=0"]
ATTENTION = ["naive", "sdpa", "flash_torch", "flash_triton"]
NORM = ["torch", "triton"]


def cfg(*overrides):
    return cli.compose(["stage=tokenizer", "model=swiglu_rope", *SMALL, *overrides]).model


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# every attention impl and every norm impl, against the default (sdpa, torch); the interpreter
# is slow, so not the full product
MHA = [("naive", "torch"), ("flash_torch", "torch"), ("flash_triton", "torch"), ("sdpa", "triton"),
       ("flash_triton", "triton")]
GQA = [("naive", "torch"), ("flash_torch", "torch"), ("flash_triton", "triton")]


@pytest.mark.parametrize("extra, combos", [([], MHA), (["model.n_kv_heads=2", "model.attention.qk_norm=true"], GQA)],
                         ids=["mha", "gqa_qknorm"])
@pytest.mark.slow
def test_every_attention_and_norm_impl_gives_the_same_model(interpret, extra, combos):
    assert {a for a, _ in MHA} | {"sdpa"} == set(ATTENTION) and {n for _, n in MHA} == set(NORM)
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 25))  # 24 positions: not a multiple of the Triton tiles (16)
    base = build_model(cfg(*extra))
    want_logits, want_grads = logits_and_grads(base, ids)
    for attn, norm in combos:
        model = build_model(cfg(f"model/attention={attn}", f"model.norm.impl={norm}", *extra))
        assert model.layers[0].attn.impl == attn and model.layers[0].ln1.impl == norm
        model.load_state_dict(base.state_dict())
        logits, grads = logits_and_grads(model, ids)
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5, msg=lambda m: f"{attn}/{norm}: {m}")
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{attn}/{norm} {name}: {m}")


def test_config_presets_and_validation():
    assert cfg("model/attention=flash_torch").attention.impl == "flash_torch"
    assert cfg("model/norm=rmsnorm_triton").norm.impl == "triton"
    with pytest.raises(ConfigError, match=r"model.norm.impl='triton': expected torch with model.norm.kind=layernorm"):
        build_model(cfg("model/norm=layernorm", "model.norm.impl=triton"))
    with pytest.raises(ConfigError, match=r"model.norm.impl='cuda': expected one of torch, triton"):
        build_model(cfg("model.norm.impl=cuda"))


def test_triton_impls_without_gpu_or_interpreter_fail_before_anything_runs(no_gpu_no_interpreter, capsys):
    with pytest.raises(ConfigError, match=r"^model.attention.impl=flash_triton: Triton kernels cannot run: no CUDA GPU"):
        build_model(cfg("model/attention=flash_triton"))
    with pytest.raises(ConfigError, match=r"^model.norm.impl=triton: Triton kernels cannot run"):
        build_model(cfg("model.norm.impl=triton"))
    # the CLI: one line on stderr, exit code 2, nothing written
    assert cli.main(["stage=pretrain", "logger=none", "model/attention=flash_triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmrun: error: model.attention.impl=flash_triton: Triton kernels cannot run: no CUDA GPU here "
                   "(set TRITON_INTERPRET=1 to run Triton kernels slowly on the CPU)"]
