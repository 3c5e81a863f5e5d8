"""Launching stages as Slurm (or local submitit) jobs and sweeps: cluster profiles and per-stage
resources (:mod:`.config`, :mod:`.resources`), sweep directories, manifests and job states
(:mod:`.sweep`), preemption-safe requeue (:mod:`.preemption`) and the Hydra launchers
(:mod:`.submitit_launcher`). Nothing here imports torch."""
