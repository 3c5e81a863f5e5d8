"""Hydra discovers launcher plugins in the ``hydra_plugins`` namespace package; lmrun's live in
:mod:`lmrun.launch.basic_launcher` and :mod:`lmrun.launch.submitit_launcher` and are exposed here
under the names the configs use."""
