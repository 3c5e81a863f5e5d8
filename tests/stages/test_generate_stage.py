"""`lmrun stage=generate` on a checkpoint from `stage=pretrain`: streamed single prompt, JSONL in
and out, speculative decoding with a draft checkpoint, and one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

from lmrun import cli
from lmrun.inference.sampling import sample
from lmrun.train.loading import checkpoint_facts, checkpoint_tokenizer_files, load_model, resolve_checkpoint
from tests.stages.test_pretrain_stage import run_pretrain


def _outputs(workspace):
    runs = sorted((workspace / "runs" / "generate").iterdir())
    run = runs[-1]
    return run, [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()], \
        json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_generate_stage(isolated_workspace, tmp_path, capsys):
    run_dir = run_pretrain("train.max_steps=10", "train.eval_every=100", "train.samples=0", "train.eval_tokens=null")
    base = ["stage=generate", "logger=none", "progress=false", f"generate.checkpoint={run_dir}"]
    assert cli.main([*base, "generate.prompt=ROMEO:", "dry_run=true"]) == 0
    assert "ckpt_00000010.pt" in capsys.readouterr().out and not (isolated_workspace / "runs" / "generate").exists()

    assert cli.main([*base, "generate.prompt=ROMEO:", "generate.temperature=0", "generate.max_new_tokens=20",
                     "generate.stop_at_special=false"]) == 0
    _, (rec,), summary = _outputs(isolated_workspace)
    assert rec["text"] in capsys.readouterr().out  # streamed
    path = resolve_checkpoint(str(run_dir))
    facts = checkpoint_facts(path)
    model, _ = load_model(path, facts, torch.device("cpu"))
    tok = checkpoint_tokenizer_files(facts, path).load(facts["tokenizer"]["special_tokens"])
    ref = sample(model, tok.encode("ROMEO:"), 20, context_length=64, temperature=0)
    assert rec["token_ids"] == ref and rec["text"] == tok.decode(ref) and rec["finish_reason"] == "length"
    assert summary["new_tokens"] == 20 and summary["decode_tokens_per_s"] > 0

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ROMEO:"}\n"First Citizen"\n\n{"prompt": "a"}\n')
    assert cli.main([*base, f"generate.prompts_file={prompts}", "generate.temperature=0", "generate.max_new_tokens=20",
                     "generate.stop_at_special=false", f"generate.draft_checkpoint={run_dir}",
                     "generate.speculative_k=3", "generate.batch_size=2"]) == 0
    _, recs, summary = _outputs(isolated_workspace)
    assert [r["prompt"] for r in recs] == ["ROMEO:", "First Citizen", "a"]
    assert recs[0]["token_ids"] == ref  # speculative greedy = target greedy
    assert summary["acceptance_rate"] == 1.0  # the target as its own draft

    assert cli.main([*base, f"generate.prompts_file={prompts}", "generate.num_samples=2", "generate.max_new_tokens=8",
                     "generate.int8=true"]) == 0
    _, recs, _ = _outputs(isolated_workspace)
    assert len(recs) == 6 and all(1 <= len(r["token_ids"]) <= 8 for r in recs)

    capsys.readouterr()
    assert cli.main([*base]) == 2
    assert "generate.prompt" in capsys.readouterr().err
    assert cli.main([*base, "generate.prompt=x", "generate.top_p=0"]) == 2
    assert "generate.top_p" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert cli.main([*base, f"generate.prompts_file={bad}"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    # a prompt plus max_new_tokens beyond the context (64): capped to what the context leaves, with a warning
    assert cli.main([*base, "generate.prompt=ROMEO:", "generate.max_new_tokens=64"]) == 0
    err = capsys.readouterr().err
    assert "generate.max_new_tokens=64 does not fit" in err and "Traceback" not in err
