"""Scaling laws: model shapes from parameter counts (:mod:`.shapes`), loading runs
(:mod:`.data`), the Chinchilla fits with bootstrap intervals (:mod:`.fits`) and plots
(:mod:`.plots`). Compute is counted by :mod:`lmrun.model.flops` (exact) beside C = 6·N·D."""
