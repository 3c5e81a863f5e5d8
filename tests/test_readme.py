"""Every command the README shows runs, as written, on a fresh install (issue 24).

``test_readme_commands`` (marker ``readme``: CI's full tier, not the quick one) takes every
command from the README's ```bash blocks and from the "example" column of its tables (backticked
``lmrun ...``), in README order, and runs each with bash:

- in a fresh copy of the clone (the files git tracks or would track: a clean clone of the working
  tree), so relative paths mean what they mean for a user at the clone's root, and later commands
  see what earlier ones wrote (``runs/``, ``multiruns/``);
- on a fresh virtual environment (``python -m venv``, no system site-packages) where the README's
  own install command (``pip install torch==2.13.0 -e .``, base install: no extras) is the first
  thing that runs; ``lmrun`` is the console script of that environment;
- with a fresh ``LMRUN_CACHE``, and without this process's test settings (``PYTHONPATH``,
  ``TRITON_INTERPRET``, ``WANDB_*``, ``LMRUN_*``, ``PYTEST_*`` are removed from the environment).

Variable assignments of a block (``D=examples/alignment``) are kept for the rest of that block;
comments are dropped; ``\\``-continued lines are joined. A command fails the test by a non-zero
exit; all commands run, and the failures are reported together.

Changes to a command before it runs — three tables, each entry with its reason:

- ``SUBSTITUTIONS``: placeholders. A path with ``<...>`` parts (``runs/pretrain/<run>``,
  ``multiruns/pretrain/ablate_norm-<hash>``, ``runs/scaling/<plan run dir>``) becomes the most
  recently modified existing path matching it with each ``<...>`` read as ``*`` — the run an
  earlier command created; none is an error. Then the literal replacements of the table.
- ``BUDGETS``: overrides appended to an ``lmrun`` command by its stage (``stage=X``, or the
  ``override /stage`` of its ``experiment=X`` preset), so a full run takes seconds; Hydra lets a
  later override of the same key win, so the command's own values are replaced.
- ``SKIP``: commands that cannot run here, with the reason; kept short (a quick-tier test checks
  that every entry still matches a README command). Commands with ``hydra/launcher=slurm`` run
  when a Slurm cluster answers (CI starts one: ``.ci/run``) and are skipped otherwise, or fail
  with ``LMRUN_REQUIRE_SLURM=1``.

Run it:  ``python -m pytest tests/test_readme.py -m readme -s`` (prints a table: line, seconds,
exit status, the command as run). ``LMRUN_README=<file>`` checks another README (e.g. a copy
with a planted broken command); ``LMRUN_README_VENV=<dir>`` keeps the virtual environment in
``<dir>`` and reuses it when it exists (faster reruns; the README's install command still runs).
The quick-tier tests below check the extraction and the tables without running anything.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = Path(os.environ.get("LMRUN_README", REPO / "README.md"))

# --- what changes before a command runs -----------------------------------------------------------

# (regex, replacement, why): applied in order after the <...> placeholders are resolved
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r"\bcluster=h100\b", "cluster=local",
     "CI's one-node cluster has the local profile's partition and no GPUs"),
    (r"(?<![\w.])/scratch/", "scratch/",
     "a shared directory on a cluster; here a folder in the clone"),
    (r"curate\.inputs=\[\.\.\.\]", "curate.inputs=[examples/iana.warc.gz]",
     "'[...]' stands for the inputs of the local curate command above"),
]

_PRETRAIN_BUDGET = ("train.max_steps=5 train.max_tokens=null train.max_time=null train.max_flops=null "
                    "train.eval_tokens=4096 train.sample_tokens=32")
_ALIGN_EVAL = "align.eval_examples=4 align.eval_every=0 align.max_new_tokens=8"

# (stage, regex the command must also match or "", overrides appended, why)
BUDGETS: list[tuple[str, str, str, str]] = [
    ("pretrain", r"train\.max_flops=\d", "train.eval_tokens=4096 train.sample_tokens=32",
     "keeps the command's FLOP budget (an IsoFLOP sweep is defined by it: keep README examples small)"),
    ("pretrain", "", _PRETRAIN_BUDGET, "5 optimizer steps instead of the run's budget; validation on "
     "4,096 tokens, samples of 32 tokens"),
    ("sft", "", f"align.steps=2 align.batch_size=4 align.microbatch_size=4 {_ALIGN_EVAL}",
     "2 steps of 4 sequences, 4 held-out questions"),
    ("grpo", "", f"align.steps=1 align.batch_size=8 align.microbatch_size=8 grpo.group_size=4 "
     f"grpo.rollout_batch_size=8 {_ALIGN_EVAL}", "one rollout batch of 2 questions x 4 answers"),
    ("dpo", "", f"align.steps=2 align.batch_size=4 align.microbatch_size=4 dpo.pair_prompts=8 {_ALIGN_EVAL}",
     "2 steps; pairs from 8 questions"),
    ("expert_iteration", "", f"expert_iteration.iterations=1 expert_iteration.questions=8 "
     f"expert_iteration.samples_per_question=2 {_ALIGN_EVAL}", "one round of 8 questions x 2 samples"),
    ("evaluate", r"evaluate\.task=", "evaluate.limit=1 evaluate.max_new_tokens=8",
     "the first example (MMLU: of each subject), 8 new tokens"),
    ("generate", "", "generate.max_new_tokens=16", "16 new tokens"),
    ("scaling", r"experiment=isoflop_cpu",
     "scaling.first_budget=3e11 scaling.budget_factor=2 scaling.sizes_per_budget=3 "
     "scaling.exploration_budget=3e12 scaling.target_budget=1e13",
     "two IsoFLOP rounds of 3 sizes at 3e11 and 6e11 FLOPs (2.7e12 FLOPs of training): the next command fits them"),
    ("scaling", r"scaling\.mode=plan",
     "scaling.first_budget=3e11 scaling.sizes_per_budget=3 scaling.exploration_budget=1e12 scaling.target_budget=1e13",
     "one IsoFLOP round of 3 sizes at 3e11 FLOPs"),
    ("scaling", "", "scaling.n_boot=20", "20 bootstrap resamples instead of 200"),
    ("benchmark", "", "benchmark.warmup_ms=1 benchmark.rep_ms=1 benchmark.min_reps=1 "
     "'benchmark.passes=[forward]' 'benchmark.head_dims=[32]'",
     "one timed repetition per case; forward only, one head size: fewer torch.compile graphs (the "
     "README's attention example took 10 min on the loaded 2-core machine without this, 2 min of CPU)"),
]

# (regex, why): a command matching one is not run
SKIP: list[tuple[str, str]] = [
    (r"\bpython -m pytest\b", "the test suite itself: CI runs its tiers (.ci/run)"),
    (r"""pip install .*-e ["']?\.\[""",
     "installs extras; these commands run on the base install (CI installs [dev] for the suite)"),
    (r"^sudo\b", "root on a workstation: CI installs and starts the one-node cluster itself (.ci/run)"),
    (r"~/venvs/|^pip install torch\s*$",
     "a GPU cluster's install: PyPI's CUDA torch, over the network"),
    (r"\$H\b|\$TRAIN\b|runs/curation_ablation/",
     "the curation_ablation chain needs Debian's python3.11-doc HTML (apt-get install python3.11-doc)"),
    (r"evaluate\.checkpoint=~/models/", "a local Hugging Face model: none is shipped (and it needs the [hf] extra)"),
]

SLURM_PATTERN = r"hydra/launcher=slurm"
COMMAND_TIMEOUT_S = 1200


# --- extraction ---------------------------------------------------------------------------------

@dataclass
class Command:
    """One logical command of the README: ``text`` as written (continuations joined, comment
    dropped), ``line`` where it starts, ``source`` ("bash" or "table"), ``assignments`` made
    earlier in the same block (``NAME=value`` lines)."""
    line: int
    text: str
    source: str
    assignments: list[str] = field(default_factory=list)


_ASSIGNMENT = re.compile(r"""^[A-Za-z_]\w*=("[^"]*"|'[^']*'|\S*)$""")


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (``#`` at the start or after a blank, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_and(text: str) -> list[str]:
    """``a && b`` -> ``["a", "b"]`` (outside quotes)."""
    parts, quote, start, i = [], None, 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif text.startswith("&&", i):
            parts.append(text[start:i].strip())
            start = i + 2
            i += 1
        i += 1
    parts.append(text[start:].strip())
    return parts


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)]


def extract_commands(text: str) -> list[Command]:
    """The commands of a README, in order: each logical line of a ```bash block (comment lines
    and blank lines skipped, ``NAME=value`` lines kept as assignments for the rest of the block),
    and each backticked span starting with ``lmrun`` in a table column headed "example"."""
    commands: list[Command] = []
    lines = text.splitlines()
    fence = None          # the language of the code block we are in, or None
    assignments: list[str] = []
    pending, pending_line = "", 0
    example_col = None    # column index of "example" in the current table
    in_table = False
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:].strip().lower() or "text"
                assignments, pending = [], ""
                in_table = False
                continue
            if stripped.startswith("|"):
                cells = _cells(stripped)
                if not in_table:
                    in_table = True
                    example_col = cells.index("example") if "example" in cells else None
                elif example_col is not None and example_col < len(cells) and not set(stripped) <= set("|-: "):
                    for span in re.findall(r"`([^`]+)`", cells[example_col]):
                        if re.match(r"lmrun(\s|$)", span):
                            commands.append(Command(n, span.strip(), "table"))
            else:
                in_table = False
            continue
        if stripped.startswith("```"):
            fence = None
            continue
        if fence not in ("bash", "sh", "shell"):
            continue
        code = strip_comment(raw)
        if not code.strip() and not pending:
            continue
        if not pending:
            pending_line = n
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        logical = (pending + code.strip()).strip()
        pending = ""
        if _ASSIGNMENT.match(logical):
            assignments.append(logical)
        elif logical:
            commands.append(Command(pending_line, logical, "bash", list(assignments)))
    return commands


# --- planning: skip, placeholders, budgets ------------------------------------------------------

_PLACEHOLDER = re.compile(r"<[^<>\n]+>")


def skip_reason(cmd: Command) -> str | None:
    for pattern, why in SKIP:
        if any(re.search(pattern, seg) for seg in split_and(cmd.text)):
            return why
    return None


def resolve_placeholders(text: str, work: Path) -> str:
    """Each whitespace-separated token with ``<...>`` parts: its path (after the last ``=`` before
    the first placeholder) becomes the most recently modified existing match in ``work`` with
    each ``<...>`` read as ``*``. FileNotFoundError names the pattern when nothing matches."""
    marked = _PLACEHOLDER.sub("\0", text)

    def repl(m: re.Match) -> str:
        token = m.group(0)
        head = token.split("\0", 1)[0]
        cut = head.rfind("=") + 1
        key, path = token[:cut], token[cut:]
        pattern = path.replace("\0", "*").rstrip("/")
        matches = sorted(work.glob(pattern), key=lambda p: p.stat().st_mtime)
        if not matches:
            shown = path.replace("\0", "<...>")
            raise FileNotFoundError(f"no earlier command created {shown} (glob {pattern!r} in the clone)")
        return key + str(matches[-1].relative_to(work))

    return re.sub(r"\S*\0\S*", repl, marked)


def stage_of(segment: str, repo: Path = REPO) -> str | None:
    """The stage an ``lmrun`` command runs: ``stage=X``, else its ``experiment=X`` preset's
    ``override /stage``; None for other commands."""
    if not re.search(r"(^|[\s\"(])lmrun(\s|$)|-m lmrun\.cli\b", segment):
        return None
    m = re.search(r"(?:^|\s)stage=(\w+)", segment)
    if m:
        return m.group(1)
    m = re.search(r"(?:^|\s)experiment=(\w+)", segment)
    if m:
        preset = repo / "experiments" / f"{m.group(1)}.yaml"
        if preset.exists():
            s = re.search(r"override /stage:\s*(\w+)", preset.read_text())
            return s.group(1) if s else None
    return None


def budget_for(segment: str) -> list[str]:
    stage = stage_of(segment)
    if stage is None:
        return []
    for budget_stage, pattern, overrides, _ in BUDGETS:
        if budget_stage == stage and (not pattern or re.search(pattern, segment)):
            return overrides.split()
    return []


def plan(cmd: Command, work: Path) -> str:
    """The command line that runs: placeholders resolved, substitutions made, budgets appended
    to each ``lmrun`` segment."""
    segments = []
    for seg in split_and(cmd.text):
        seg = resolve_placeholders(seg, work)
        for pattern, replacement, _ in SUBSTITUTIONS:
            seg = re.sub(pattern, replacement, seg)
        extra = budget_for(seg)
        segments.append(" ".join([seg, *extra]))
    return " && ".join(segments)


# --- running ------------------------------------------------------------------------------------

def slurm_cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


def copy_clone(dest: Path) -> None:
    """The working tree as a clean clone would have it: files git tracks or would track."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dest / rel)
            else:
                shutil.copy2(src, dest / rel)


def command_env(venv: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "WANDB_", "LMRUN_", "PYTHON", "VIRTUAL_ENV", "CONDA"))
           and k != "TRITON_INTERPRET"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["LMRUN_CACHE"] = str(cache)
    return env


def cancel_our_slurm_jobs(work: Path) -> None:
    ids = set()
    for manifest in work.glob("multiruns/**/sweep.json"):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        ids |= set(re.findall(r'"(?:job_id|slurm_job_id)":\s*"?(\d+)', json.dumps(data)))
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *sorted(ids)], capture_output=True)


@pytest.mark.readme
@pytest.mark.slow
def test_readme_commands(tmp_path):
    commands = extract_commands(README.read_text())
    assert commands, f"no commands found in {README}"
    work, cache = tmp_path / "clone", tmp_path / "lmrun-cache"
    work.mkdir()
    copy_clone(work)
    venv = Path(os.environ["LMRUN_README_VENV"]) if os.environ.get("LMRUN_README_VENV") else tmp_path / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = command_env(venv, cache)
    cluster = slurm_cluster_up()
    require_slurm = os.environ.get("LMRUN_REQUIRE_SLURM") == "1"

    rows, failures, installed = [], [], False
    t_all = time.perf_counter()
    try:
        for cmd in commands:
            where = f"README line {cmd.line} ({cmd.source})"
            reason = skip_reason(cmd)
            if reason is None and re.search(SLURM_PATTERN, cmd.text) and not cluster:
                if require_slurm:
                    failures.append(f"{where}: {cmd.text}\n  no Slurm cluster answers (LMRUN_REQUIRE_SLURM=1)")
                    rows.append((cmd.line, 0.0, "FAIL", cmd.text))
                    continue
                reason = "no Slurm cluster answers (CI starts one)"
            if reason:
                rows.append((cmd.line, 0.0, "skip", f"{cmd.text}  [{reason}]"))
                continue
            try:
                line = plan(cmd, work)
            except FileNotFoundError as e:
                failures.append(f"{where}: {cmd.text}\n  {e}")
                rows.append((cmd.line, 0.0, "FAIL", cmd.text))
                continue
            if re.search(r"\bpip install\b", line):
                installed = True
            elif not installed and stage_of(line) is not None:
                failures.append(f"{where}: {cmd.text}\n  runs lmrun before any README command installs it")
            script = "\n".join([*cmd.assignments, line])
            t0 = time.perf_counter()
            try:
                out = subprocess.run(["bash", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT_S)
                rc, output = out.returncode, out.stdout
            except subprocess.TimeoutExpired as e:
                rc, output = "timeout", e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            dt = time.perf_counter() - t0
            rows.append((cmd.line, dt, str(rc), line))
            print(f"README line {cmd.line}: exit {rc} after {dt:.1f} s: {line}", flush=True)
            if rc != 0:
                tail = "\n    ".join(output.strip().splitlines()[-25:])
                failures.append(f"{where}: exit {rc} after {dt:.0f} s\n  ran: {line}\n    {tail}")
    finally:
        cancel_our_slurm_jobs(work)
        report = [f"README commands of {README} ({time.perf_counter() - t_all:.0f} s in all):",
                  f"{'line':>5} {'s':>6} {'exit':>7}  command"]
        report += [f"{n:>5} {dt:>6.1f} {rc:>7}  {text}" for n, dt, rc, text in rows]
        print("\n".join(report))
        (tmp_path / "readme_commands.log").write_text("\n".join(report) + "\n")
    assert not failures, f"{len(failures)} README command(s) failed:\n\n" + "\n\n".join(failures)


# --- quick tier: the extraction and the tables, without running anything --------------------------

SAMPLE = """\
Intro `lmrun stage=tokenizer` in prose is not a command.

| stage | what | example |
|---|---|---|
| `a` | x \\| y | `lmrun stage=a a.x=1` and `lmrun stage=a a.y=[1,2]` |
| `b` | no example | `b` |

```bash
X=some/dir      # an assignment
lmrun stage=b data.train=$X/f.txt   # a comment
lmrun -m stage=pretrain a=1,2 \\
      b="c # not a comment"          # continued
# a comment line
pip install -e . && lmrun stage=pretrain
```

```text
$ lmrun stage=not_a_command
```
"""


def test_extraction_of_a_sample():
    cmds = extract_commands(SAMPLE)
    assert [(c.source, c.text) for c in cmds] == [
        ("table", "lmrun stage=a a.x=1"),
        ("table", "lmrun stage=a a.y=[1,2]"),
        ("bash", "lmrun stage=b data.train=$X/f.txt"),
        ("bash", 'lmrun -m stage=pretrain a=1,2 b="c # not a comment"'),
        ("bash", "pip install -e . && lmrun stage=pretrain"),
    ]
    assert cmds[2].assignments == ["X=some/dir"] and cmds[2].line == 10
    assert split_and(cmds[4].text) == ["pip install -e .", "lmrun stage=pretrain"]


def test_plan_resolves_placeholders_and_appends_budgets(tmp_path):
    (tmp_path / "runs" / "sft" / "old").mkdir(parents=True)
    time.sleep(0.01)
    (tmp_path / "runs" / "sft" / "new").mkdir(parents=True)
    os.utime(tmp_path / "runs" / "sft" / "old", (1, 1))
    line = plan(Command(1, "lmrun stage=evaluate evaluate.checkpoint=runs/sft/<run> evaluate.task=gsm8k "
                           "evaluate.limit=100", "bash"), tmp_path)
    assert line.startswith("lmrun stage=evaluate evaluate.checkpoint=runs/sft/new evaluate.task=gsm8k")
    assert line.endswith("evaluate.limit=100 evaluate.limit=1 evaluate.max_new_tokens=8")
    line = plan(Command(1, "pip install -e . && lmrun stage=pretrain model=gpt2", "bash"), tmp_path)
    assert line == f"pip install -e . && lmrun stage=pretrain model=gpt2 {_PRETRAIN_BUDGET}"
    assert budget_for("OMP_NUM_THREADS=1 lmrun experiment=isoflop_cpu")[0] == "scaling.first_budget=3e11"
    assert budget_for("lmrun -m stage=pretrain model.target_params=1e5,2e5 train.max_flops=3e11,6e11") == \
        ["train.eval_tokens=4096", "train.sample_tokens=32"]
    with pytest.raises(FileNotFoundError, match="runs/grpo/<...>"):
        plan(Command(1, "lmrun stage=dpo align.model=runs/grpo/<run>", "bash"), tmp_path)


def test_readme_commands_are_planned():
    """Every README command either runs (no ``../shared``: examples use shipped data) or is
    skipped for a listed reason; every skip rule still matches a command; the skip list is short."""
    commands = extract_commands(README.read_text())
    sources = {c.source for c in commands}
    assert sources == {"bash", "table"}, sources
    skipped = [c for c in commands if skip_reason(c)]
    for c in commands:
        assert "../shared" not in c.text, f"README line {c.line} reads ../shared: {c.text}"
    for pattern, why in SKIP:
        assert any(re.search(pattern, seg) for c in commands for seg in split_and(c.text)), \
            f"SKIP rule {pattern!r} ({why}) matches no README command: remove it"
    assert len(skipped) <= 15, [c.text for c in skipped]
    lmrun_commands = [c for c in commands if not skip_reason(c) and any(stage_of(s) for s in split_and(c.text))]
    assert len(lmrun_commands) >= 20


def test_ci_runs_the_readme_test_commands():
    """.ci/run runs the README's test commands (both tiers) verbatim."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    tests = [c.text for c in extract_commands(README.read_text()) if "python -m pytest" in c.text]
    assert len(tests) >= 2, tests
    for text in tests:
        assert text in ci, f"README test command not run by .ci/run: {text}"


def test_readme_table_rows_have_their_header_s_cells():
    """A ``|`` inside a cell must be escaped (``\\|``), even in backticks: otherwise the row gets
    an extra cell, GitHub shifts or drops the rest (an example column loses its command)."""
    bad, header = [], None
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = len(cells)
        elif len(cells) != header:
            bad.append(f"line {n}: {len(cells)} cells, header {header}: {line[:80]}")
    assert not bad, bad
