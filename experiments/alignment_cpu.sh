#!/usr/bin/env bash
# The alignment_cpu chain (experiments/alignment_cpu.yaml): pretrain -> sft -> grpo, dpo,
# expert_iteration from the SFT model. Usage: bash experiments/alignment_cpu.sh [workdir]
# Runs land in <workdir>/runs/<stage>/; each stage's curves.png and summary.json are there.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-alignment_cpu_work}
mkdir -p "$WORK" && cd "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
lm() { python -m lmrun.cli experiment=alignment_cpu "$@"; }
latest() { ls -td "runs/$1"/*/ | head -1; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

lm stage=pretrain
BASE=$(latest pretrain)
lm stage=sft align.model="$BASE" align.train_examples=8000 align.steps=2400 align.eval_every=400 \
   align.log_every=400 optimizer.lr=1e-3
SFT=$(latest sft)
lm stage=grpo align.model="$SFT" align.steps=600 align.eval_every=50 align.log_every=25 align.batch_size=64 \
   align.microbatch_size=64 grpo.rollout_batch_size=128 grpo.group_size=8 optimizer.lr=1e-4
lm stage=expert_iteration align.model="$SFT" expert_iteration.iterations=6 expert_iteration.questions=512 \
   expert_iteration.samples_per_question=4 optimizer.lr=1e-4 schedule=constant
lm stage=dpo align.model="$SFT" align.steps=150 align.eval_every=25 align.log_every=25 dpo.pair_prompts=1024 \
   dpo.beta=0.1 optimizer.lr=3e-5
python "$REPO/experiments/alignment_cpu_plot.py" . alignment_cpu.png
for s in pretrain sft grpo expert_iteration dpo; do echo "$s: $(latest $s)"; cat "$(latest $s)/summary.json"; echo; done
