"""lmrun's Hydra launchers (conf/hydra/launcher/basic.yaml, slurm.yaml and submitit_local.yaml).
Hydra accepts only plugin classes defined in ``hydra_plugins``: the work is in lmrun.launch."""
from lmrun.launch.basic_launcher import BasicManifestLauncher
from lmrun.launch.submitit_launcher import LmrunSubmititLauncher


class LmrunBasicLauncher(BasicManifestLauncher):
    """Jobs one after another in this process, with the sweep's manifest (the default launcher;
    ``hydra/launcher=basic``)."""


class LmrunSlurmLauncher(LmrunSubmititLauncher):
    """Slurm job arrays through submitit (``hydra/launcher=slurm``)."""

    _EXECUTOR = "slurm"


class LmrunLocalLauncher(LmrunSubmititLauncher):
    """Local subprocesses through submitit (``hydra/launcher=submitit_local``)."""

    _EXECUTOR = "local"
