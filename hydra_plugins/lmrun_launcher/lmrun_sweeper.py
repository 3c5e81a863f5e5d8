"""lmrun's Optuna sweeper (conf/hparams_search/): hydra-optuna-sweeper's, except that a search in
which no trial completed ends with one log line — lmrun then reports each failed trial and exits
with status 1 — instead of Optuna's "No trials are completed yet" traceback."""
import logging
from typing import List

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger("lmrun")


class LmrunOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=optuna`` with ``_target_`` set to this class (conf/hparams_search/*.yaml)."""

    def sweep(self, arguments: List[str]) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory ..."
        try:
            return super().sweep(arguments)
        except ValueError as e:
            if "No trials are completed" not in str(e):
                raise
            log.error("no trial of the search completed: there is no best value")
            return None
