"""lmrun's Hydra launchers (conf/hydra/launcher/slurm.yaml and submitit_local.yaml)."""
from lmrun.launch.submitit_launcher import LmrunSubmititLauncher


class LmrunSlurmLauncher(LmrunSubmititLauncher):
    """Slurm job arrays through submitit (``hydra/launcher=slurm``)."""

    _EXECUTOR = "slurm"


class LmrunLocalLauncher(LmrunSubmititLauncher):
    """Local subprocesses through submitit (``hydra/launcher=submitit_local``)."""

    _EXECUTOR = "local"
