"""Evaluation: perplexity lives in ``lmrun.train.evaluation``; task evaluations here.

- ``models``: ``load_causal_lm(path, device) -> CausalLM`` (our checkpoints; ``hf``: local Hugging
  Face model directories, the ``[hf]`` extra).
- ``datasets``: readers of GSM8K, MMLU, AlpacaEval and SimpleSafetyTests files.
- ``parsing``: answer extraction (GSM8K numbers, MMLU letters).
- ``scoring``: continuation log-likelihoods and batched response generation for any ``CausalLM``.
- ``tasks``: ``evaluate_gsm8k``, ``evaluate_mmlu``, ``evaluate_alpaca_eval``, ``evaluate_safety``.
- ``judge``: the pairwise log-likelihood judge behind the AlpacaEval win rate.
- ``config``: the ``evaluate`` config node (``stage=evaluate``).
"""
