"""Hugging Face causal LMs from a local directory behind ``load_causal_lm``: tiny randomly
initialised GPT-2 and Llama models saved here (nothing downloaded); logits equal transformers'
own, cached batched generation equals greedy full recomputation, stop rules, raw log-probs."""
from __future__ import annotations

import pytest
import torch

from lmrun.errors import DataError, FormatError
from lmrun.eval.models import load_causal_lm
from lmrun.inference.engine import SamplingParams
from tests.eval.helpers import save_tiny_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_tiny_hf_model(root / arch, arch) for arch in ("gpt2", "llama")}


def test_load_gives_an_hf_causal_lm_with_transformers_logits(hf_dirs):
    from lmrun.eval.hf import HFCausalLM

    lm = load_causal_lm(hf_dirs["gpt2"])
    assert isinstance(lm, HFCausalLM) and lm.kind == "hf"
    assert (lm.context_length, lm.vocab_size, lm.eos_token_id, lm.prefix_ids) == (256, 320, 0, [])
    text = "ROMEO: To be, or not to be?"
    ids = lm.encode(text)
    assert lm.decode(ids) == text and len(ids) < len(text)  # BPE merges, and decoding is exact
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["gpt2"], local_files_only=True).eval()
    x = torch.tensor([ids])
    with torch.no_grad():  # converted to lmrun's TransformerLM (issue 27): the same logits to float32 rounding
        torch.testing.assert_close(lm.logits(x), ref(x).logits, atol=1e-5, rtol=0)
    from lmrun.eval.hf import ConvertedHFCausalLM, load_hf_causal_lm

    assert isinstance(lm, ConvertedHFCausalLM) and type(lm.model).__name__ == "TransformerLM"
    raw = load_hf_causal_lm(hf_dirs["gpt2"], convert=False)  # the transformers fallback: transformers' own logits
    assert type(raw) is HFCausalLM and raw.context_length == 256
    with torch.no_grad():
        assert torch.equal(raw.logits(x), ref(x).logits)
    llama = load_causal_lm(hf_dirs["llama"])
    assert llama.prefix_ids == [0] and llama.encode("hi") == lm.encode("hi")  # BOS only through prefix_ids


def _greedy_reference(lm, prompt: str, n: int) -> tuple[list[int], list[float]]:
    seq = lm.prefix_ids + lm.encode(prompt)
    tokens, logps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.logits(torch.tensor([seq]))[0, -1].double()
            t = int(logits.argmax())
            tokens.append(t)
            logps.append(float(torch.log_softmax(logits, -1)[t]))
            seq.append(t)
    return tokens, logps


@pytest.mark.parametrize("convert", [True, False])  # lmrun's engine on the converted model / transformers' HFEngine
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_generation_equals_greedy_recomputation(hf_dirs, arch, convert):
    from lmrun.eval.hf import load_hf_causal_lm

    lm = load_hf_causal_lm(hf_dirs[arch], convert=convert)
    prompts = ["ROMEO:", "First Citizen: Before we proceed any further, hear me"]  # left padding
    out = lm.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    for prompt, c in zip(prompts, out):
        tokens, logps = _greedy_reference(lm, prompt, 10)
        assert c.prompt_ids == lm.prefix_ids + lm.encode(prompt)
        assert c.token_ids == tokens and c.finish_reason == "length"
        assert c.logprobs == pytest.approx(logps, abs=1e-4)
        assert c.text == lm.decode(tokens)


def test_stop_rules_sampling_seed_and_raw_logprobs(hf_dirs):
    lm = load_causal_lm(hf_dirs["gpt2"])
    greedy = lm.generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0))[0]
    first = greedy.token_ids[0]
    stopped = lm.generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [first] and stopped.text == "" and stopped.finish_reason == "stop"
    text = greedy.text
    cut = lm.decode(greedy.token_ids[2:4])
    by_string = lm.generate(["ROMEO:"], SamplingParams(max_new_tokens=8, temperature=0, stop_strings=(cut,)))[0]
    assert by_string.finish_reason == "stop" and by_string.text == text[:text.find(cut)]
    params = SamplingParams(max_new_tokens=6, temperature=1.3, top_p=0.9, seed=7)
    a, b = (lm.generate(["ROMEO:", "JULIET:"], params) for _ in range(2))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    seq = lm.encode("JULIET:")
    with torch.no_grad():
        for t, lp in zip(a[1].token_ids, a[1].logprobs):  # raw distribution: no temperature, no top-p
            logits = lm.logits(torch.tensor([seq]))[0, -1].double()
            assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[t]), abs=1e-4)
            seq.append(t)
    with pytest.raises(ValueError, match="exceeds context_length=256"):
        lm.generate(["x" * 300], SamplingParams(max_new_tokens=8))


def test_save_round_trip_and_bad_directories(hf_dirs, tmp_path):
    lm = load_causal_lm(hf_dirs["llama"])
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(2.0)  # "trained" weights
    lm.save(tmp_path / "saved", iteration=3, note="sft")
    back = load_causal_lm(tmp_path / "saved")
    x = torch.tensor([lm.prefix_ids + lm.encode("to be")])
    with torch.no_grad():
        assert torch.allclose(back.logits(x), lm.logits(x))
    assert back.prefix_ids == [0]
    assert (tmp_path / "saved" / "lmrun.json").read_text().count('"iteration": 3') == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="cannot load it as a Hugging Face causal LM") as e:
        load_causal_lm(broken, key="evaluate.checkpoint")
    assert "\n" not in str(e.value) and str(e.value).startswith("evaluate.checkpoint=")
    with pytest.raises(DataError, match="no such checkpoint"):
        load_causal_lm(tmp_path / "nope")
