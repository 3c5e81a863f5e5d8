"""Issue 25 F6: the alignment stages refuse bad data and unreadable models in ``plan`` — exit 2,
one line naming the file (and line), and nothing written (no run directory)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmrun import cli
from lmrun.align.data import count_jsonl, read_jsonl, scan_jsonl
from lmrun.errors import DataError, FormatError

COMMON = ["logger=none", "progress=false", "align.steps=1", "align.batch_size=2", "align.microbatch_size=2"]


@pytest.fixture
def ckpt(tmp_path):
    """A small file that opens as an lmrun checkpoint (the pre-flight check reads no weights)."""
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{}")
    merges.write_text("")
    path = tmp_path / "ckpt_00000001.pt"
    torch.save({"model": {"w": torch.zeros(64, 64)}, "iteration": 1, "model_config": {"vocab_size": 300},
                "tokenizer": {"vocab": str(vocab), "merges": str(merges), "special_tokens": []}}, path)
    return path


def _write(path, text: str | bytes):
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


SFT_OK = '{"prompt": "1+1=", "response": "2"}\n'
BAD_SFT = {  # file content -> what the one-line error says
    "malformed": (SFT_OK + '{"prompt": "2+2=", "response": \n', "line 2 is not JSON"),
    "missing_key": (SFT_OK + SFT_OK + '{"prompt": "3+3="}\n', "line 3 lacks key 'response'"),
    "wrong_type": ('{"prompt": "x", "response": 7}\n', "line 1: 'response' is a JSON number, expected a string"),
    "not_object": ('["prompt", "response"]\n', "line 1 is not an object"),
    "empty": ("", "no records"),
    "blank": ("\n  \n", "no records"),
    "binary": (SFT_OK.encode() + b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256)), "not UTF-8 text at byte"),
}


@pytest.mark.parametrize("case", sorted(BAD_SFT))
def test_scan_jsonl_names_file_and_line(tmp_path, case):
    text, expected = BAD_SFT[case]
    path = _write(tmp_path / f"{case}.jsonl", text)
    with pytest.raises((DataError, FormatError)) as e:
        count_jsonl(path, ("prompt", "response"), "align.train_data")
    msg = str(e.value)
    assert expected in msg and f"align.train_data={path}" in msg and "\n" not in msg


def test_scan_jsonl_reports_the_byte_of_bad_utf8(tmp_path):
    bad_line = '{"prompt": "café", "response": "x"}\n'.encode("latin-1")
    path = _write(tmp_path / "latin1.jsonl", SFT_OK.encode() + bad_line)
    with pytest.raises(DataError, match=rf"not UTF-8 text at byte {len(SFT_OK) + 15} \(line 2\)"):
        count_jsonl(path, ("prompt", "response"), "k")


def test_scan_jsonl_streams_valid_records(tmp_path):
    path = _write(tmp_path / "ok.jsonl", "\ufeff" + SFT_OK + "\n" + '{"prompt": "é", "response": "ü", "extra": 1}\n')
    assert count_jsonl(path, ("prompt", "response"), "k") == 2
    assert [r["prompt"] for r in read_jsonl(path, ("prompt", "response"), "k")] == ["1+1=", "é"]
    first = next(scan_jsonl(path, ("prompt", "response"), "k"))
    assert first == {"prompt": "1+1=", "response": "2"}
    with pytest.raises(DataError, match="no such file"):
        count_jsonl(tmp_path / "nowhere.jsonl", ("prompt",), "k")
    with pytest.raises(DataError, match="not a regular file"):
        count_jsonl(tmp_path, ("prompt",), "k")


def _refused(capsys, workspace, argv, *expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    assert list(workspace.iterdir()) == [], "nothing may be written"  # no runs/ nor multiruns/


@pytest.mark.parametrize("case", sorted(BAD_SFT))
def test_sft_refuses_bad_data_before_writing(ckpt, isolated_workspace, tmp_path, capsys, case):
    text, expected = BAD_SFT[case]
    data = _write(tmp_path / f"{case}.jsonl", text)
    _refused(capsys, isolated_workspace, ["stage=sft", *COMMON, f"align.model={ckpt}", f"align.train_data={data}"],
             expected, str(data))


def test_sft_refuses_missing_and_bad_val_data(ckpt, isolated_workspace, tmp_path, capsys):
    ok = _write(tmp_path / "ok.jsonl", SFT_OK)
    _refused(capsys, isolated_workspace, ["stage=sft", *COMMON, f"align.model={ckpt}",
                                          f"align.train_data={tmp_path / 'gone.jsonl'}"], "no such file", "gone.jsonl")
    bad = _write(tmp_path / "val.jsonl", SFT_OK + "{oops\n")
    _refused(capsys, isolated_workspace, ["stage=sft", *COMMON, f"align.model={ckpt}", f"align.train_data={ok}",
                                          f"align.val_data={bad}"], "align.val_data=", "line 2 is not JSON")


def test_dpo_refuses_bad_pairs_and_bad_reference(ckpt, isolated_workspace, tmp_path, capsys):
    pairs = _write(tmp_path / "pairs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                             '{"prompt": "a", "chosen": "b"}\n')
    _refused(capsys, isolated_workspace, ["stage=dpo", *COMMON, f"align.model={ckpt}", f"align.train_data={pairs}"],
             f"align.train_data={pairs}: line 2 lacks key 'rejected'")
    good = _write(tmp_path / "good.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cut = _write(tmp_path / "ref.pt", ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _refused(capsys, isolated_workspace, ["stage=dpo", *COMMON, f"align.model={ckpt}", f"align.train_data={good}",
                                          f"align.reference={cut}"], f"align.reference={cut}", "truncated")


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "expert_iteration"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_checkpoint_is_refused_in_plan(ckpt, isolated_workspace, tmp_path, capsys, stage, keep):
    run_dir = tmp_path / "pretrain_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    data = ckpt.read_bytes()
    cut = _write(run_dir / "checkpoints" / "ckpt_00000002.pt", data[: int(len(data) * keep)])
    _refused(capsys, isolated_workspace, [f"stage={stage}", *COMMON, f"align.model={run_dir}",
                                          "align.task.name=arithmetic"],
             f"align.model={run_dir}", str(cut), "not a readable checkpoint (truncated or corrupt?)")


def test_foreign_checkpoint_and_lost_tokenizer_are_refused(ckpt, isolated_workspace, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    _refused(capsys, isolated_workspace, ["stage=grpo", *COMMON, f"align.model={other}", "align.task.name=arithmetic",
                                          "grpo.rollout_batch_size=4", "grpo.group_size=2"],
             "not an lmrun checkpoint (lacks model, iteration, model_config, tokenizer)")
    (tmp_path / "merges.txt").unlink()
    _refused(capsys, isolated_workspace, ["stage=sft", *COMMON, f"align.model={ckpt}", "align.task.name=arithmetic"],
             "tokenizer file is gone", "merges.txt")


def test_gsm8k_files_are_checked_for_grpo_and_expert_iteration(ckpt, isolated_workspace, tmp_path, capsys):
    good = _write(tmp_path / "test.jsonl", '{"question": "1+1?", "answer": "#### 2"}\n')
    bad = _write(tmp_path / "train.jsonl", '{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    task = ["align.task.name=gsm8k", f"align.task.train_path={bad}", f"align.task.test_path={good}"]
    _refused(capsys, isolated_workspace, ["stage=grpo", *COMMON, f"align.model={ckpt}", *task,
                                          "grpo.rollout_batch_size=4", "grpo.group_size=2"],
             f"align.task.train_path={bad}: line 2 lacks key 'answer'")
    _refused(capsys, isolated_workspace, ["stage=expert_iteration", *COMMON, f"align.model={ckpt}",
                                          "align.task.name=gsm8k", f"align.task.train_path={good}"],
             "align.task.test_path", "required")


def test_dry_run_shows_checked_inputs(ckpt, isolated_workspace, tmp_path, capsys):
    data = _write(tmp_path / "ok.jsonl", SFT_OK * 3)
    assert cli.main(["stage=sft", *COMMON, f"align.model={ckpt}", f"align.train_data={data}", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "kind: lmrun" in out and "align.train_data: 3" in out
    assert list(isolated_workspace.iterdir()) == []


def test_binary_data_from_the_console_script_is_one_line(ckpt, isolated_workspace, tmp_path):
    data = _write(tmp_path / "weights.jsonl", ckpt.read_bytes())
    p = subprocess.run([sys.executable, "-m", "lmrun.cli", "stage=sft", *COMMON, f"align.model={ckpt}",
                        f"align.train_data={data}"], capture_output=True, text=True, cwd=isolated_workspace)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "not UTF-8 text at byte" in p.stderr
    assert list(isolated_workspace.iterdir()) == []


def test_sft_shuffle_is_a_config_key(ckpt, isolated_workspace, tmp_path, capsys):
    data = _write(tmp_path / "ok.jsonl", SFT_OK * 3)
    base = ["stage=sft", *COMMON, f"align.model={ckpt}", f"align.train_data={data}", "dry_run=true"]
    assert cli.main(base + ["sft.packing=true", "sft.shuffle=true"]) == 0
    assert "shuffle: true" in capsys.readouterr().out
    assert cli.main(base + ["sft.shuffle=true"]) == 0  # without packing it changes nothing: shown as false
    assert "shuffle: false" in capsys.readouterr().out
