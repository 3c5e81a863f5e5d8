"""`lmrun stage=export` (issue 27): a pretrain checkpoint becomes a Hugging Face folder that
transformers loads offline with lmrun's logits and lmrun's token ids (special tokens included);
refusals are one line before anything is written; the folder goes back into lmrun through
generate, perplexity evaluate and model.init_from with the checkpoint's own results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmrun import cli  # noqa: E402
from lmrun.train.loading import (checkpoint_facts, checkpoint_tokenizer_files, load_model,  # noqa: E402
                                 resolve_checkpoint)
from tests.stages.test_pretrain_stage import SMALL  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "corpus_en.txt"
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 10-step pretrain run (swiglu_rope, tiny, context 64) and its checkpoint's model and tokenizer."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("LMRUN_CACHE", str(root / "cache"))
        assert cli.main(["stage=pretrain", *SMALL, "train.max_steps=10", "train.eval_every=100", "train.samples=0",
                         "train.eval_tokens=2048"]) == 0
    (run_dir,) = (root / "runs" / "pretrain").iterdir()
    path = resolve_checkpoint(str(run_dir))
    facts = checkpoint_facts(path)
    model, _ = load_model(path, facts, torch.device("cpu"))
    tok = checkpoint_tokenizer_files(facts, path).load(facts["tokenizer"]["special_tokens"])
    return run_dir, facts, model, tok


def stage(stage_name: str, *overrides: str, expect: int = 0) -> Path | None:
    runs = Path.cwd() / "runs" / stage_name
    before = set(runs.iterdir()) if runs.exists() else set()
    assert cli.main([f"stage={stage_name}", "logger=none", "progress=false", *overrides]) == expect
    new = set(runs.iterdir()) - before if runs.exists() else set()
    return new.pop() if new else None


def test_export_writes_a_folder_transformers_loads(pretrained, tmp_path, capsys):
    run_dir, facts, model, tok = pretrained
    out = tmp_path / "hf"
    assert stage("export", f"export.checkpoint={run_dir}", f"export.out={out}", "dry_run=true") is None
    assert "LlamaForCausalLM" in capsys.readouterr().out and not out.exists()
    run = stage("export", f"export.checkpoint={run_dir}", f"export.out={out}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["max_abs_logit_diff"] <= 1e-5 and summary["max_abs_logit_diff_reimport"] == 0.0
    assert summary["bytes"] == sum(p.stat().st_size for p in out.iterdir())

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    eot = tok.special_ids["<|endoftext|>"]
    assert hf.config.eos_token_id == hf.config.bos_token_id == hf.config.pad_token_id == eot
    assert hf.generation_config.eos_token_id == eot
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.pad_token_id) == (eot, eot, eot)
    # the exported tokenizer gives lmrun's ids on real text, special tokens included
    text = CORPUS.read_text(encoding="utf-8")[:20000]
    text = text[:5000] + "<|endoftext|>" + text[5000:]
    ids = tok.encode(text)
    assert eot in ids and hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.decode(ids) == text
    # logits on real token ids; greedy continuations agree for 32 tokens
    x = torch.tensor([ids[:64]])
    with torch.no_grad():
        assert float((hf(x).logits - model(x)).abs().max()) <= 1e-5
    from lmrun.inference.engine import InferenceEngine, SamplingParams

    ours = InferenceEngine(model, tok).generate([ids[:16]], SamplingParams(max_new_tokens=32, temperature=0))[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids[:16]]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.token_ids == theirs[0, 16:].tolist()


def test_bfloat16_export_and_default_out(pretrained):
    run_dir, *_ = pretrained
    run = stage("export", f"export.checkpoint={run_dir}", "export.dtype=bfloat16")
    out = run / "hf"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["max_abs_logit_diff"] <= 1e-4  # transformers' float32 run of the bf16 weights
    fp32 = json.loads((stage("export", f"export.checkpoint={run_dir}") / "summary.json").read_text())
    assert summary["bytes"] < 0.6 * fp32["bytes"]


def _foreign_checkpoint(pretrained, tmp_path, *overrides: str) -> Path:
    """A checkpoint of another architecture with the pretrain run's tokenizer facts."""
    from lmrun.model import build_model
    from lmrun.model.config import as_model_config
    from lmrun.train.checkpoint import save_checkpoint

    _, facts, _, _ = pretrained
    mc = as_model_config(cli.compose(["stage=tokenizer", "model/size=tiny", "tokenizer.vocab_size=512",
                                      "model.context_length=64", *overrides]).model)
    import dataclasses

    path = tmp_path / "foreign.pt"
    save_checkpoint(build_model(mc), None, 0, path, model_config=dataclasses.asdict(mc), tokenizer=facts["tokenizer"])
    return path


@pytest.mark.parametrize("overrides, reason", [
    (["model=mla"], "attention.kind=mla"),
    (["model=hyena"], "attention.kind=hyena"),
    (["model=linear_attention"], "attention.kind=linear"),
    (["model=post_norm"], "norm.placement=post"),
    (["model=nope"], "position.kind=none"),
    (["model/position=sinusoidal"], "position.kind=sinusoidal"),
    (["model=moe", "model.ffn.moe.shared_experts=1"], "shared_experts=1"),
])
def test_refusals_are_one_line_before_anything_is_written(pretrained, tmp_path, capsys, overrides, reason):
    ckpt = _foreign_checkpoint(pretrained, tmp_path, *overrides)
    out = tmp_path / "out"
    assert stage("export", f"export.checkpoint={ckpt}", f"export.out={out}", expect=2) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmrun: error: export.checkpoint=") and "\n" not in err
    assert reason in err and "exportable:" in err and "MixtralForCausalLM" in err
    assert not out.exists() and not (Path.cwd() / "runs" / "export").exists()


def test_bad_export_options(pretrained, tmp_path, capsys):
    run_dir, *_ = pretrained
    assert stage("export", expect=2) is None
    assert "export.checkpoint: required" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert stage("export", f"export.checkpoint={run_dir}", f"export.out={full}", expect=2) is None
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert stage("export", f"export.checkpoint={run_dir}", "export.dtype=float16", expect=2) is None
    assert "export.dtype" in capsys.readouterr().err
    assert stage("export", f"export.checkpoint={tmp_path / 'none'}", expect=2) is None
    assert "no such file or run directory" in capsys.readouterr().err


def test_exported_folder_in_generate_evaluate_and_init_from(pretrained, tmp_path):
    """The HF folder goes back through lmrun (converted to TransformerLM) with the checkpoint's results."""
    run_dir, facts, model, tok = pretrained
    out = tmp_path / "hf"
    stage("export", f"export.checkpoint={run_dir}", f"export.out={out}")
    gen = ["generate.prompt=ROMEO:", "generate.temperature=0", "generate.max_new_tokens=24",
           "generate.stop_at_special=false"]
    recs = [json.loads((stage("generate", f"generate.checkpoint={c}", *gen) / "generations.jsonl").read_text())
            for c in (run_dir, out)]
    assert recs[0]["token_ids"] == recs[1]["token_ids"] and len(recs[0]["token_ids"]) == 24
    ev = ["evaluate.split=val", "evaluate.max_tokens=3000"]
    res = [json.loads((stage("evaluate", f"evaluate.checkpoint={c}", *ev) / "eval.json").read_text())
           for c in (run_dir, out)]
    assert res[1]["backend"] == "lmrun" and res[0]["val_tokens"] == res[1]["val_tokens"] == 2999
    assert res[1]["val_loss"] == pytest.approx(res[0]["val_loss"], abs=1e-6)
    # pretraining from the folder's weights: with a negligible lr its validation loss is the checkpoint's
    base = ["stage=pretrain", *SMALL, "train.samples=0", "train.eval_every=100", "optimizer.lr=1e-12",
            "schedule=constant", "train.max_steps=1"]
    runs = Path.cwd() / "runs" / "pretrain"
    assert cli.main([*base, f"model.init_from={out}", "model.context_length=128"]) == 0
    (init_run,) = runs.iterdir()
    summary = json.loads((init_run / "summary.json").read_text())
    ref = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-6)
    saved = checkpoint_facts(resolve_checkpoint(str(init_run)))
    assert saved["model_config"]["context_length"] == 64 and saved["model_config"]["init_from"] == str(out)
    assert cli.main([*base, f"model.init_from={tmp_path}"]) == 2  # not an HF folder


def test_generate_accepts_a_transformers_llama_folder(tmp_path, capsys):
    """A Llama folder written by transformers (BOS-prefixing tokenizer) decodes through lmrun's engine
    with transformers' greedy tokens; generate used to refuse it with a misleading message."""
    from tests.eval.helpers import save_tiny_hf_model

    folder = save_tiny_hf_model(tmp_path / "llama", "llama")
    run = stage("generate", f"generate.checkpoint={folder}", "generate.prompt=ROMEO:", "generate.temperature=0",
                "generate.max_new_tokens=12", "generate.stop_at_special=false")
    rec = json.loads((run / "generations.jsonl").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    prompt = hf_tok("ROMEO:", return_tensors="pt")["input_ids"]
    assert prompt[0, 0] == 0  # the BOS prefix
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
    assert rec["token_ids"] == ref.tolist()
    assert "converted to lmrun's TransformerLM" in capsys.readouterr().err


def test_init_from_a_transformers_qwen2_folder(tmp_path):
    """model.init_from with a Qwen2 folder written by transformers: the run takes its architecture
    (q/k/v biases -> bias=true), shape and tokenizer, and starts from its weights."""
    from lmrun.model.hf import load_hf_model
    from tests.eval.helpers import save_tiny_hf_model

    folder = save_tiny_hf_model(tmp_path / "qwen2", "llama")  # its tokenizer files; the model is replaced
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (folder / f).unlink(missing_ok=True)
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0))
    qwen.save_pretrained(folder)
    assert cli.main(["stage=pretrain", *SMALL, "train.samples=0", "train.eval_every=100", "optimizer.lr=1e-12",
                     "schedule=constant", "train.max_steps=1", "train.eval_tokens=512",
                     f"model.init_from={folder}"]) == 0
    (run,) = (Path.cwd() / "runs" / "pretrain").iterdir()
    facts = checkpoint_facts(resolve_checkpoint(str(run)))
    mc = facts["model_config"]
    assert (mc["name"], mc["bias"], mc["n_kv_heads"], mc["d_model"], mc["vocab_size"]) == ("qwen2", True, 2, 64, 320)
    assert mc["context_length"] == 64  # the run's, at most the folder's 256
    reference, _ = load_hf_model(folder)
    ref = reference.state_dict()
    assert all(torch.allclose(facts["model"][k].float(), ref[k], atol=1e-6) for k in ref)
    assert facts["tokenizer"]["special_tokens"] == ["<|endoftext|>"]
