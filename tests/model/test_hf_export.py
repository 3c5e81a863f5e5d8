"""lmrun <-> Hugging Face (``lmrun.model.hf``): every exportable preset computes the same logits in
transformers (float32, max abs diff <= 1e-5) on random and briefly trained weights, greedy decoding
gives the same 64 tokens, import∘export is the identity on the state dict, Llama / Qwen2 / GPT-2
folders written by transformers import with transformers' logits, and every architecture without
an HF class is refused in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
import transformers as tf  # noqa: E402

from lmrun import cli  # noqa: E402
from lmrun.errors import ConfigError, FormatError  # noqa: E402
from lmrun.model import build_model  # noqa: E402
from lmrun.model.config import as_model_config  # noqa: E402
from lmrun.model.hf import (export_hf_model, from_hf_config, from_hf_state_dict, hf_architecture,  # noqa: E402
                            load_hf_model, rope_permutation, to_hf_config, to_hf_model, to_hf_state_dict)

VOCAB, CONTEXT = 97, 96
tf.utils.logging.set_verbosity_error()
tf.utils.logging.disable_progress_bar()


def preset(name: str, *overrides: str):
    """The preset's model config (its norm / FFN / position / attention / bias / tying choices) at
    a tiny shape."""
    mc = as_model_config(cli.compose(["stage=tokenizer", f"model={name}", *overrides]).model)
    return dataclasses.replace(mc, vocab_size=VOCAB, context_length=CONTEXT, d_model=64, num_layers=2, num_heads=4,
                               d_ff=None if mc.ffn.kind != "moe" else 96)


EXPORTABLE = {
    "swiglu_rope": ("llama", []),
    "gqa": ("llama", []),
    "gpt2": ("gpt2", []),
    "moe": ("mixtral", []),
    "swiglu_rope_tied_bias": ("llama", ["model=swiglu_rope", "model.tie_embeddings=true", "model.bias=true"]),
    "mqa_qk_norm": ("qwen3", ["model=gqa", "model.n_kv_heads=1", "model.attention.qk_norm=true"]),
    "geglu": ("llama", ["model=swiglu_rope", "model/ffn=geglu"]),
    "gpt2_untied_relu": ("gpt2", ["model=gpt2", "model.tie_embeddings=false", "model/ffn=relu"]),
    "gpt2_gelu_tanh": ("gpt2", ["model=gpt2", "model/ffn=gelu_tanh"]),
}


def exportable(name: str):
    arch, overrides = EXPORTABLE[name]
    return arch, (preset(overrides[0][6:], *overrides[1:]) if overrides else preset(name))


def random_model(mc, seed: int = 0):
    """A model with random weights everywhere (norm gains and biases too, not their ones/zeros init)."""
    torch.manual_seed(seed)
    model = build_model(mc)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def trained(model, steps: int = 8):
    """A few AdamW steps on random next-token data (weights no init distribution would give)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 33), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def max_logit_diff(model, hf, seq_len: int = CONTEXT) -> float:
    x = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return float((model(x) - hf(x).logits).abs().max())


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_exported_logits_equal_lmrun_logits(name):
    arch, mc = exportable(name)
    assert hf_architecture(mc) == arch
    model = random_model(mc)
    hf = to_hf_model(model, mc)
    assert hf.config.model_type == arch
    assert max_logit_diff(model, hf) <= 1e-5
    trained(model)
    assert max_logit_diff(model, to_hf_model(model, mc)) <= 1e-5


def test_rope_needs_the_pair_permutation():
    """Without the q/k row permutation the exported Llama computes another function."""
    _, mc = exportable("swiglu_rope")
    model = random_model(mc)
    hf = to_hf_model(model, mc)
    assert max_logit_diff(model, hf) <= 1e-5
    inv = torch.argsort(rope_permutation(16))
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(proj.weight.reshape(-1, 16, 64)[:, inv].reshape(-1, 64))  # undo it
    assert max_logit_diff(model, hf) > 1e-2
    assert torch.equal(rope_permutation(6), torch.tensor([0, 2, 4, 1, 3, 5]))


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_greedy_generations_are_identical(name):
    from lmrun.inference.engine import InferenceEngine, SamplingParams

    _, mc = exportable(name)
    model = trained(random_model(mc, seed=3))
    hf = to_hf_model(model, mc)
    prompt = [5, 17, 42, 8]
    ours = InferenceEngine(model).generate([prompt], SamplingParams(max_new_tokens=64, temperature=0))[0].token_ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ours) == 64 and ours == theirs


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_import_of_export_is_the_identity(name, tmp_path):
    _, mc = exportable(name)
    model = random_model(mc)
    export_hf_model(model, mc, tmp_path / "hf", eos_token_id=0)
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    back, back_mc = load_hf_model(tmp_path / "hf")
    ours, theirs = model.state_dict(), back.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for key in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "bias", "tie_embeddings"):
        assert getattr(back_mc, key) == getattr(mc, key), key
    assert back_mc.norm.kind == mc.norm.kind and back_mc.attention.qk_norm == mc.attention.qk_norm
    assert back_mc.ffn.kind == mc.ffn.kind
    # the mapping alone, without files, is the identity as well
    mapped = from_hf_state_dict(to_hf_state_dict(ours, mc), from_hf_config(to_hf_config(mc)))
    assert all(torch.equal(mapped[k], ours[k]) for k in ours)


def test_bfloat16_export(tmp_path):
    _, mc = exportable("gqa")
    model = random_model(mc)
    export_hf_model(model, mc, tmp_path / "hf", dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        ref = build_model(mc)
        ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
        assert max_logit_diff(ref.eval(), hf) <= 1e-5


@pytest.mark.parametrize("name, overrides, reason", [
    ("mla", [], "attention.kind=mla"),
    ("linear_attention", [], "attention.kind=linear"),
    ("hyena", [], "attention.kind=hyena"),
    ("post_norm", [], "norm.placement=post"),
    ("no_norm", [], "norm.kind=none"),
    ("nope", [], "position.kind=none"),
    ("swiglu_rope", ["model/position=sinusoidal"], "position.kind=sinusoidal"),
    ("sliding_window", [], "attention.window="),
    ("swiglu_rope", ["model.logit_softcap=30"], "logit_softcap=30"),
    ("swiglu_rope", ["model/ffn=relu2"], "ffn.kind=relu2"),
    ("swiglu_rope", ["model/norm=layernorm"], "norm.kind=layernorm with RoPE"),
    ("swiglu_rope", ["model.attention.qk_norm=true", "model.bias=true"], "QK-norm with biases"),
    ("moe", ["model.ffn.moe.top_k=1"], "top_k=1"),
    ("moe", ["model.ffn.moe.shared_experts=1"], "shared_experts=1"),
    ("moe", ["model.ffn.moe.capacity_factor=1.25"], "capacity_factor=1.25"),
    ("gpt2", ["model.n_kv_heads=2"], "n_kv_heads=2"),
    ("gpt2", ["model/norm=rmsnorm"], "norm.kind=rmsnorm with learned positions"),
])
def test_architectures_without_an_hf_class_are_refused(name, overrides, reason):
    mc = preset(name, *overrides)
    with pytest.raises(ConfigError) as e:
        hf_architecture(mc)
    msg = str(e.value)
    assert "\n" not in msg and reason in msg and "exportable:" in msg and "LlamaForCausalLM" in msg
    with pytest.raises(ConfigError):
        to_hf_config(mc)


def _save(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "gpt2_gelu_new", "llama_tied_gqa"])
def test_import_of_transformers_folders(kind, tmp_path):
    """Tiny random Llama / Qwen2 / GPT-2 models saved by transformers load as TransformerLM with
    transformers' logits (Qwen2's q/k/v biases, GQA, tied embeddings, GPT-2's Conv1D)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=CONTEXT)
    if kind == "llama":
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**shape, rope_parameters=rope))
    elif kind == "llama_tied_gqa":
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**shape, num_key_value_heads=2, tie_word_embeddings=True))
    elif kind == "qwen2":
        hf = tf.Qwen2ForCausalLM(tf.Qwen2Config(**shape, num_key_value_heads=2))
    else:  # GPT-2's own activation is gelu_new (tanh-approximate GELU: lmrun's gelu_tanh)
        act = "gelu_new" if kind == "gpt2_gelu_new" else "gelu"
        hf = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=CONTEXT,
                                              activation_function=act, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))  # norm gains and biases away from 1 / 0
    hf.eval()
    model, mc = load_hf_model(_save(hf, tmp_path))
    assert type(model).__name__ == "TransformerLM"
    assert max_logit_diff(model, hf) <= 1e-5
    if kind == "qwen2":
        assert mc.bias and torch.equal(model.layers[0].attn.output_proj.bias, torch.zeros(64))
    if kind == "llama":
        assert mc.position.theta == 500000.0
    assert mc.ffn.kind == {"gpt2": "gelu", "gpt2_gelu_new": "gelu_tanh"}.get(kind, "swiglu")


def test_import_refusals(tmp_path):
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                            activation_function="quick_gelu", bos_token_id=0, eos_token_id=0))
    with pytest.raises(FormatError, match="activation_function=quick_gelu"):
        load_hf_model(_save(gpt2, tmp_path / "a"), key="model.init_from")
    scaled = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 10000.0})
    with pytest.raises(FormatError, match="rope_type=linear"):
        from_hf_config(scaled)
    with pytest.raises(FormatError, match="model_type 'bert'"):
        from_hf_config(tf.BertConfig())


def test_gelu_tanh_is_torch_tanh_gelu():
    """The activation GPT-2 folders use (transformers' gelu_new) equals PyTorch's tanh GELU."""
    from lmrun.model.ffn import gelu_tanh

    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-12, rtol=0)
    assert float((gelu_tanh(x) - torch.nn.functional.gelu(x)).abs().max()) > 1e-4  # not the exact GELU
