"""The ``lmrun`` entry point: compose ``conf/config.yaml`` with Hydra, validate, dispatch ``stage=``.

Before handing over to ``@hydra.main`` (which creates the run directory, configures logging,
and runs multirun sweeps and launchers), the CLI composes every job's config itself and
validates it — schema (unknown keys, wrong types), values and combinations, and the inputs the
stage will read — so that a user's mistake is one line on stderr, exit code 2, and nothing is
written. ``dry_run=true`` stops after printing each job's plan. For a single run the CLI
creates the run directory, ``<runs_dir>/<stage>/<timestamp>-<config hash>`` (claimed with
``os.mkdir``: never shared, even by identical commands started in the same second); a directory
given as ``hydra.run.dir=`` is checked before Hydra writes into it (only a resumable stage may
resume its own run there, and a completed run only with the same config). A multirun holds the
sweep directory's lock while it launches (one launch per sweep at a time). Ctrl-C ends with one
line and exit code 130.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
import time

# OpenMP threads that find no work sleep instead of spinning (set before torch loads its OpenMP
# runtime; an explicit OMP_WAIT_POLICY wins). With another process on the cores, spinning threads
# steal each other's time slices: the main job's step ran at 2,550 tokens/s with the default and
# 10,318 with PASSIVE beside another training on 2 cores; on an idle machine PASSIVE costs up to
# ~20% (OMP_WAIT_POLICY=ACTIVE for a dedicated node; README "Performance").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from types import ModuleType

from lmrun.configs import check_schema, register_configs, validate
from lmrun.errors import ConfigError, LmrunError

log = logging.getLogger("lmrun")


def _find_conf() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):  # wheel install, then source checkout
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SystemExit("lmrun: error: config tree not found (expected lmrun/conf or conf/ beside the package)")


CONF_DIR = _find_conf()


def stage_names() -> list[str]:
    """The registered stages: one YAML per working stage in ``conf/stage/``."""
    return sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))


def stage_catalogue() -> str:
    """One line per registered stage: its name and the description from conf/stage/<name>.yaml."""
    import yaml

    rows = []
    for name in stage_names():
        desc = (yaml.safe_load((CONF_DIR / "stage" / f"{name}.yaml").read_text()) or {}).get("description", "")
        rows.append(f"  {name:<10} {desc}")
    return "== Stages ==\n" + "\n".join(rows)


def load_stage(name: str) -> ModuleType:
    """The module ``lmrun.stages.<name>`` (exposes ``plan(cfg) -> dict`` and ``run(cfg) -> dict``)."""
    if name not in stage_names():
        raise ConfigError(f"stage={name!r}: expected one of {', '.join(stage_names())}")
    return importlib.import_module(f"lmrun.stages.{name}")


# --- error messages ----------------------------------------------------------------------------
def _allowed_keys(object_type) -> str:
    if object_type is not None and dataclasses.is_dataclass(object_type):
        return ", ".join(f.name for f in dataclasses.fields(object_type))
    return ""


def _field_type(object_type, key) -> str:
    if object_type is not None and dataclasses.is_dataclass(object_type):
        for f in dataclasses.fields(object_type):
            if f.name == key:
                return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return ""


def explain(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, the value, what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
            allowed = _allowed_keys(getattr(e, "object_type", None))
            key = getattr(e, "full_key", None) or getattr(e, "key", "?")
            return f"{key}: unknown key" + (f"; allowed keys here: {allowed}" if allowed else "")
        if isinstance(e, ValidationError):
            key = getattr(e, "full_key", None) or getattr(e, "key", "?")
            value = getattr(e, "value", None)
            msg = str(e).split("\n")[0]
            expected = _field_type(getattr(e, "object_type", None), getattr(e, "key", None))
            return f"{key}={value!r}: {msg}" + (f" (expected {expected})" if expected else "")
        if isinstance(e, MissingMandatoryValue):
            return f"{getattr(e, 'full_key', '?')}: a value is required"
        if isinstance(e, MissingConfigException):
            text = str(e)
            group = text.split("Could not find '")[-1].split("'")[0] if "Could not find '" in text else "?"
            options = getattr(e, "options", None) or []
            if "/" in group:
                grp, opt = group.rsplit("/", 1)
                return f"{grp}={opt}: no such option; available: {', '.join(options)}"
            return " ".join(text.split())
        if isinstance(e, OverrideParseException):
            return " ".join(str(e).split())
    for e in chain:
        text = " ".join(str(e).split())
        if "You must specify '" in text:  # a group without a default, e.g. stage
            group = text.split("You must specify '")[1].split("'")[0]
            options = text.split("Available options:")[-1].split() if "Available options:" in text else []
            return f"{group}: required; choose one of: {', '.join(options)} (e.g. {group}={(options or ['NAME'])[0]})"
        if text:
            return text
    return type(exc).__name__


# --- pre-flight: compose and validate every job ---------------------------------------------------
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _sample(o) -> str:
    """One value of a sweep override as a plain override: the first choice or range value, the
    lower end of an interval."""
    from hydra.core.override_parser.types import IntervalSweep, OverrideType

    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(o.type, "")
    value = o.value()
    if isinstance(value, IntervalSweep):
        first = value.start
    else:
        first = next(iter(o.sweep_string_iterator()))
    return f"{prefix}{o.get_key_element()}={first}"


def _expand_jobs(overrides: list[str], multirun: bool) -> tuple[list[list[str]], dict | None]:
    """The override list of every job Hydra's basic sweeper will launch: the sweep in
    ``hydra.sweeper.params`` (e.g. from an experiment preset) combined with the command line's
    (which wins for the same key). Returns ``(jobs, search)``; ``search`` is None for the basic
    sweeper. Another sweeper (``hydra/sweeper=optuna``, e.g. from ``hparams_search=...``) picks
    its jobs while the sweep runs: ``jobs`` is then one sample of the search space (checked
    before launching) and ``search`` describes it (sweeper, space, trials, direction)."""
    if not multirun:
        return [list(overrides)], None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
        probe = [_sample(o) if o.is_sweep_override() else o.input_line for o in parsed]
        sweeper = compose(probe, with_hydra=True).hydra.sweeper
        params = sweeper.get("params") or {}
        space = [f"{k}={v}" for k, v in params.items()] + list(overrides)
        merged = parser.parse_overrides(space)
        if str(sweeper.get("_target_", BASIC_SWEEPER)) == BASIC_SWEEPER:
            return [job for batch in BasicSweeper.split_arguments(merged, None) for job in batch], None
        last = {o.get_key_element(): o for o in merged}  # the command line wins for the same key
        sample = [_sample(o) if o.is_sweep_override() else o.input_line for o in last.values()]
    except LmrunError:
        raise
    except Exception as e:
        raise ConfigError(explain(e)) from None
    search = {"sweeper": str(sweeper._target_).rsplit(".", 1)[-1].removeprefix("Lmrun"),
              "space": [o.input_line for o in last.values() if o.is_sweep_override()],
              "identity": [o.input_line for o in last.values()],
              "n_trials": sweeper.get("n_trials"), "direction": _plain(sweeper.get("direction"))}
    return [sample], search


def _plain(value):
    from omegaconf import OmegaConf

    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return getattr(value, "name", value)


#: extra config directories (``--config-dir``) and the primary config's name (``--config-name``),
#: set by :func:`main` for its pre-flight composition; Hydra gets the same options itself
_CONFIG = {"dirs": [], "name": "config"}


def _quote(path: str) -> str:
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _with_config_dirs(overrides: list[str]) -> list[str]:
    """``overrides`` with ``--config-dir``'s directory put first in ``hydra.searchpath``, where
    Hydra puts it: after lmrun's conf/, before the command line's ``hydra.searchpath`` entries."""
    if not _CONFIG["dirs"]:
        return list(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    extra = [f"file://{d}" for d in _CONFIG["dirs"]]
    out, found = [], False
    for o in overrides:
        if o.split("=", 1)[0] == "hydra.searchpath":
            try:
                value = OverridesParser.create().parse_override(o).value()
            except Exception as e:
                raise ConfigError(explain(e)) from None
            o, found = "hydra.searchpath=[" + ",".join(_quote(str(p)) for p in extra + list(value or [])) + "]", True
        out.append(o)
    if not found:
        out.append("hydra.searchpath=[" + ",".join(_quote(p) for p in extra) + "]")
    return out


def _quiet_schema_warnings() -> None:
    from lmrun.launch.submitit_launcher import _quiet_schema_warnings as quiet

    quiet()
    # optuna (the Optuna sweeper) imports alembic, which logs every plugin it sets up at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)


def compose(overrides: list[str], with_hydra: bool = False):
    """Compose ``config.yaml`` with ``overrides`` (Compose API); ConfigError on any mistake.
    ``with_hydra`` keeps Hydra's own node (launcher, sweeper, ...) in the result. Extra config
    directories given to :func:`main` (``--config-dir``) are searched after lmrun's ``conf/``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    _quiet_schema_warnings()
    GlobalHydra.instance().clear()
    try:
        overrides = _with_config_dirs(overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="lmrun"):
            return hydra_compose(_CONFIG["name"], overrides=overrides, return_hydra_config=with_hydra)
    except LmrunError:
        raise
    except Exception as e:  # Hydra and OmegaConf raise many types; all are the user's input here
        raise ConfigError(explain(e)) from None


def preflight(overrides: list[str]) -> tuple[object, dict]:
    """Compose, validate values, and let the stage resolve its inputs: returns (cfg, plan)."""
    cfg = compose(overrides)
    try:
        check_schema(cfg)
        validate(cfg)
        return cfg, load_stage(cfg.stage.name).plan(cfg)
    except LmrunError:
        raise
    except Exception as e:
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, OmegaConfBaseException):
            raise ConfigError(explain(e)) from None
        raise


def format_plan(plan: dict, job: list[str]) -> str:
    import yaml

    body = yaml.safe_dump(json.loads(json.dumps(plan, default=str)), sort_keys=False, width=120)
    return f"lmrun dry run (nothing written): {' '.join(job) or '(defaults)'}\n" + "\n".join(
        "  " + line for line in body.splitlines())


def _create_run_dir(cfg) -> Path:
    """Create this single run's directory, ``<runs_dir>/<stage>/<timestamp>-<config hash>``, and
    return its absolute path. The directory is claimed with ``os.mkdir`` (which fails if it
    exists), so two identical commands started in the same second get two directories: the
    later one takes the first free ``-1``, ``-2``, ... suffix. Hydra and the run then fill the
    empty directory. DataError (one line) if it cannot be created (permissions, full disk)."""
    from lmrun.errors import DataError
    from lmrun.tracking.run import config_hash

    base = Path(cfg.paths.runs_dir) / cfg.stage.name / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{config_hash(cfg)}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            run_dir = base if n == 0 else base.with_name(f"{base.name}-{n}")
            try:
                os.mkdir(run_dir)
            except FileExistsError:
                continue
            return run_dir.absolute()
    except OSError as e:
        raise DataError(f"paths.runs_dir={cfg.paths.runs_dir}: cannot create the run directory "
                        f"({e.strerror or e})") from None
    raise DataError(f"paths.runs_dir={cfg.paths.runs_dir}: no free run directory name for {base}")


def _check_run_dir(cfg, value: str, overrides: list[str]) -> None:
    """Pre-flight for ``hydra.run.dir=<value>`` on the command line (before Hydra writes its
    ``.hydra/`` there): a directory that holds a run (``run.json``) may only be given to a
    resumable stage (one that declares ``RESUMABLE = True``, e.g. pretrain) to resume that same
    stage's run, and a completed run only with the same resolved config (its config hash);
    resuming a failed, preempted or interrupted run with another config is allowed (the stage
    checks what it loads), and not while another process writes it (its lock). ``overrides`` (the
    command line's) name what changed in the message.
    A path with an interpolation (``${now:...}``) is not checked.
    ConfigError (one line, nothing written) otherwise, or if run.json is unreadable."""
    if "${" in value:
        return
    from lmrun.tracking.run import RUN_LOCK, config_hash, lock_run_dir

    run_dir = Path(value).expanduser()
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        return
    key = f"hydra.run.dir={value}"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: unreadable {info_path} ({e}); choose a new directory") from None
    stage, status = str(info.get("stage")), str(info.get("status", "running"))
    if not getattr(load_stage(cfg.stage.name), "RESUMABLE", False):
        raise ConfigError(f"{key}: run directory already used (a {stage} run, {status}); runs are never "
                          f"overwritten and stage {cfg.stage.name} does not resume: choose a new directory")
    if stage != cfg.stage.name:
        raise ConfigError(f"{key}: holds a {stage} run, not a {cfg.stage.name} run; choose a new directory")
    if (run_dir / RUN_LOCK).exists():  # a resume of this run already running? (the run's own lock is the guard)
        try:
            lock_run_dir(run_dir).release()
        except LmrunError as e:
            raise ConfigError(f"{key}: {e}") from None
    if status == "completed" and info.get("config_hash") != config_hash(cfg):
        was = set(info.get("overrides") or [])
        now = {o for o in overrides if not o.lstrip("+~").startswith("hydra.")}
        changed = sorted(now - was) + [f"(was {o})" for o in sorted(was - now)]
        raise ConfigError(f"{key}: holds a completed run with another config (hash {info.get('config_hash')}, "
                          f"now {config_hash(cfg)}" + (f": {' '.join(changed)}" if changed else "")
                          + "); resuming it would rewrite its records: choose a new directory")


# --- the Hydra task ---------------------------------------------------------------------------
def _task(cfg):
    """Run one job: the stage's summary; in a multirun with ``sweep.objective`` set, that summary
    metric as a float (None if the job failed) — the value an optimizing sweeper (Optuna)
    receives. Every job still writes its summary.json."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lmrun.launch import sweep as sweeps
    from lmrun.launch.preemption import Preempted
    from lmrun.tracking.files import json_dumps
    from lmrun.tracking.run import end_run, lock_run_dir, start_run

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    stage = load_stage(cfg.stage.name)
    overrides = list(hc.overrides.task)
    out_dir = Path(hc.runtime.output_dir)
    num = int(hc.job.num) if multirun else 0
    resumable = getattr(stage, "RESUMABLE", False)
    objective = (cfg.sweep.get("objective") or None) if multirun else None
    rank = _rank()
    if rank > 0:  # a distributed job's other processes: rank 0 writes the run directory and the log
        from lmrun.distributed.env import quiet_non_main_logging

        quiet_non_main_logging(rank)
        start_run(cfg, out_dir, overrides, resumable=resumable, writes=False)
        try:
            return stage.run(cfg)
        finally:
            end_run()
    lock = None
    try:
        if multirun and (out_dir / "run.json").exists():  # a sweep run again: this job ran before
            lock = lock_run_dir(out_dir)  # before looking: an earlier launch's job may still be running
            info = sweeps.read_json(out_dir / "run.json") or {}
            if sweeps.job_identity(info.get("overrides", [])) != sweeps.job_identity(overrides):
                lock.release()
                raise ConfigError(f"{out_dir} holds a different job ({' '.join(info.get('overrides', []))}); "
                                  "choose a new sweep.dir")
            status = info.get("status")
            if status == "completed" and bool(cfg.sweep.skip_done):
                lock.release()
                log.info("job %d already completed in %s: skipped (sweep.skip_done=true)", num, out_dir)
                sweeps.record_outcome(num, overrides, "skipped", str(out_dir))
                return sweeps.job_result(sweeps.read_json(out_dir / "summary.json"), objective)
            if status == "completed" or not resumable:
                log.info("job %d: earlier attempt (%s) moved to %s", num, status, sweeps.archive_attempt(out_dir))
        run = start_run(cfg, out_dir, overrides, resumable=resumable, lock=lock)
    except ConfigError:
        raise
    except LmrunError as e:  # the directory is in use or already used: nothing of that run was touched
        if lock is not None:
            lock.release()
        log.error("%s", e)
        if multirun:
            sweeps.record_outcome(num, overrides, "failed", str(out_dir), str(e))
            return sweeps.job_result(None, objective)
        raise SystemExit(2)
    log.info("stage %s -> %s", cfg.stage.name, run.dir)
    try:
        validate(cfg)
        summary = stage.run(cfg)
    except LmrunError as e:
        run.finish({}, status="failed", error=str(e))
        end_run()
        log.error("%s", e)
        if multirun:  # reported with the other jobs' outcomes when the sweep ends
            sweeps.record_outcome(num, overrides, "failed", str(run.dir), str(e))
            return sweeps.job_result(None, objective)
        raise SystemExit(1)
    except Preempted as e:
        run.finish({}, status="preempted", error=str(e))
        end_run()
        log.warning("%s", e)
        raise
    except KeyboardInterrupt as e:  # Ctrl-C: main() prints one line and exits 130
        with _sigint_ignored():  # a second Ctrl-C must not tear run.json
            run.finish({}, status="interrupted", error=interrupted_message(e))
            end_run()
        e.lmrun_run_dir = str(run.dir)
        raise
    except BaseException as e:
        run.finish({}, status="failed", error=repr(e))
        end_run()
        raise
    run.finish(summary)
    end_run()
    log.info("summary: %s", json_dumps(summary))
    result = sweeps.job_result(summary, objective)
    if objective and result is None:  # the run completed, but the search cannot use it
        numeric = [k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        error = (f"sweep.objective={objective}: not a number in stage {cfg.stage.name}'s summary; "
                 f"numeric keys: {', '.join(numeric)}")
        log.error("%s", error)
        sweeps.record_outcome(num, overrides, "failed", str(run.dir), error)
    elif multirun:
        sweeps.record_outcome(num, overrides, "completed", str(run.dir))
    return result if multirun else summary


def interrupted_message(exc: BaseException) -> str:
    """What a KeyboardInterrupt says, as one line: ``interrupted (Ctrl-C)``, then the stage's
    message if it gave one (e.g. the step reached and the checkpoint saved)."""
    detail = " ".join(str(exc).split())
    return "interrupted (Ctrl-C)" + (f": {detail}" if detail else "")


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT (Ctrl-C) is ignored inside (in the main thread; elsewhere this does nothing)."""
    import signal
    import threading

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _rank() -> int:
    """This process's rank in a distributed job (0 for a single process)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").strip():
            world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
            return int(os.environ[name]) if int(world) > 1 else 0
    return 0


def _single_run_dir(cfg) -> Path:
    """The run directory of a single run, created (:func:`_create_run_dir`). Under torchrun
    (WORLD_SIZE > 1) every process composes the command itself: rank 0 creates the directory
    and, once the process group is joined, the others take its path, so all ranks use one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _create_run_dir(cfg)
    import torch.distributed as dist

    from lmrun.distributed.env import init_distributed

    init_distributed(str(cfg.train.device), str(cfg.distributed.backend), float(cfg.distributed.timeout_s))
    box = [str(_create_run_dir(cfg)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _register_launchers() -> None:
    """Make lmrun's launcher plugins known to Hydra even where its plugin scan cannot list
    ``hydra_plugins/lmrun_launcher`` (setuptools' editable installs use an import hook)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.lmrun_launcher.lmrun_launcher import LmrunBasicLauncher, LmrunLocalLauncher, LmrunSlurmLauncher

    for cls in (LmrunBasicLauncher, LmrunSlurmLauncher, LmrunLocalLauncher):
        Plugins.instance().register(cls)
    try:  # needs hydra-optuna-sweeper (a dependency; an older install may lack it)
        from hydra_plugins.lmrun_launcher.lmrun_sweeper import LmrunOptunaSweeper
    except ImportError:
        return
    Plugins.instance().register(LmrunOptunaSweeper)


def _hydra_entry() -> None:
    import hydra

    register_configs()
    _register_launchers()
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()


SUBMITIT_LAUNCHERS = ("LmrunSlurmLauncher", "LmrunLocalLauncher")


def _sweep_alias(overrides: list[str]) -> list[str]:
    """``sweep=<dir>`` (the sweep to collect or to launch into) means ``sweep.dir=<dir>``."""
    return [("sweep.dir=" + o.split("=", 1)[1]) if o.startswith("sweep=") else o for o in overrides]


def _launcher_of(job: list[str]) -> str:
    target = str(compose(job, with_hydra=True).hydra.launcher.get("_target_", ""))
    return target.rsplit(".", 1)[-1]


def _sweep_dir(checked: list, search: dict | None = None) -> Path:
    from lmrun.launch.sweep import default_sweep_dir

    cfg = checked[0][1]
    if cfg.sweep.dir:
        return Path(str(cfg.sweep.dir)).expanduser().absolute()
    first = checked[0][0]
    name = next((o.split("=", 1)[1] for o in first if o.lstrip("+").startswith("experiment=")), None)
    if search is not None:  # named by the search space (the trials are not known yet)
        name = name or next((o.split("=", 1)[1] for o in first if o.lstrip("+").startswith("hparams_search=")),
                            "search")
        return default_sweep_dir(cfg.paths.multiruns_dir, cfg.stage.name, name, [search["identity"]]).absolute()
    return default_sweep_dir(cfg.paths.multiruns_dir, cfg.stage.name, name, [job for job, _, _ in checked]).absolute()


def _sweep_plan(checked: list, sweep_dir: Path, launcher: str, search: dict | None = None) -> str:
    """The dry run of a sweep: per job its overrides, run directory, state, resources and plan
    (for a search, the space and the one sample that was checked)."""
    from lmrun.launch.resources import job_resources
    from lmrun.launch.sweep import run_status

    if search is None:
        lines = [f"lmrun dry run of a sweep (nothing written or submitted): {len(checked)} job(s) in {sweep_dir}"
                 + (f", launcher {launcher}" if launcher else "")]
    else:
        cfg = checked[0][1]
        lines = [f"lmrun dry run of a search (nothing written or submitted): {search['n_trials']} trial(s) chosen by "
                 f"{search['sweeper']} in {sweep_dir}" + (f", launcher {launcher}" if launcher else ""),
                 f"  objective: {cfg.sweep.objective} ({search['direction']})",
                 f"  search space: {' '.join(search['space']) or '(none)'}",
                 "  checked with one sample of the space:"]
    for num, (job, cfg, plan) in enumerate(checked):
        status = run_status(sweep_dir / str(num))
        will = "skip (completed)" if status == "completed" and cfg.sweep.skip_done else (
            "run" if status == "missing" else f"run again (was {status})")
        entry = {"job": num, "overrides": " ".join(job) or "(defaults)", "run_dir": str(sweep_dir / str(num)),
                 "action": will}
        if search is not None:
            entry = {"sample": " ".join(job)}
        if launcher in SUBMITIT_LAUNCHERS:
            entry["resources"] = {k: v for k, v in job_resources(cfg).items() if v not in (None, [], {})}
        entry["plan"] = plan
        lines.append(format_plan(entry, job).split("\n", 1)[1])
    return "\n".join(lines)


def _check_search(checked: list, search: dict, launcher: str) -> None:
    """A search needs the metric each job returns (``sweep.objective``) and, on a submitit
    launcher, to wait for the jobs (the sweeper reads their results before choosing the next)."""
    cfg = checked[0][1]
    if not cfg.sweep.objective:
        raise ConfigError(f"sweep.objective=None: hydra/sweeper {search['sweeper']} optimizes the value each job "
                          "returns; name a summary metric, e.g. sweep.objective=val_bpb")
    if launcher in SUBMITIT_LAUNCHERS and not cfg.launch.wait:
        raise ConfigError(f"launch.wait=false: {search['sweeper']} chooses each trial from the results of the "
                          "previous ones; use launch.wait=true")
    if not search["space"]:
        raise ConfigError(f"hydra.sweeper.params: {search['sweeper']} has nothing to search; give a space, e.g. "
                          "'optimizer.lr=tag(log, interval(1e-4, 1e-2))'")


def _report_search(sweep_dir: Path, search: dict, objective: str) -> None:
    """After a search: print the best trial (the sweeper's optimization_results.yaml) and record it
    in the sweep's manifest under ``search``."""
    import yaml

    from lmrun.launch import sweep as sweeps

    results_path = sweep_dir / "optimization_results.yaml"
    if not results_path.is_file():
        print(f"lmrun: no trial completed: no best {objective}", file=sys.stderr)
        return
    results = yaml.safe_load(results_path.read_text(encoding="utf-8")) or {}
    manifest = sweeps.load_manifest(sweep_dir)
    best = results.get("best_params") or {}
    wanted = {f"{k}={v}" for k, v in best.items()}
    best_job = next((int(n) for n, j in sorted(manifest.get("jobs", {}).items(), key=lambda kv: int(kv[0]))
                     if wanted and wanted <= set(j.get("overrides", []))), None)
    manifest["search"] = {"sweeper": search["sweeper"], "objective": objective, "direction": search["direction"],
                          "space": search["space"], "best_value": results.get("best_value"), "best_params": best,
                          "best_job": best_job, "results": results_path.name}
    sweeps.save_manifest(sweep_dir, manifest)
    if "best_value" in results:
        where = f" (job {best_job}: {sweep_dir / str(best_job)})" if best_job is not None else ""
        print(f"lmrun: best {objective} = {results['best_value']:.6g} with "
              f"{' '.join(sorted(wanted)) or '(no parameters)'}{where}", file=sys.stderr)
    print(f"lmrun: search results: {results_path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Console script ``lmrun``. Returns the exit code (0 ok, 1 failed run or job, 2 invalid input,
    130 interrupted by Ctrl-C: one line on stderr, no traceback)."""
    from hydra._internal.utils import get_args_parser

    argv_given = argv
    argv = _sweep_alias(list(sys.argv[1:] if argv is None else argv))
    args = get_args_parser().parse_args(argv)
    _quiet_schema_warnings()
    if args.config_path is not None:
        print("lmrun: error: --config-path: lmrun's config tree is fixed; add your own configs with "
              "--config-dir DIR (searched after lmrun's conf/) or hydra.searchpath=[file://DIR]", file=sys.stderr)
        return 2
    if args.config_dir is not None and not os.path.isdir(args.config_dir):
        print(f"lmrun: error: --config-dir {args.config_dir}: no such directory", file=sys.stderr)
        return 2
    _CONFIG.update(dirs=[os.path.abspath(args.config_dir)] if args.config_dir else [],
                   name=args.config_name or "config")
    try:
        code = _main(argv, args)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback; the run recorded "interrupted"
        message, where = interrupted_message(e), getattr(e, "lmrun_run_dir", None)
        print(f"lmrun: {message}" + (f" (run directory {where})" if where and where not in message else ""),
              file=sys.stderr, flush=True)
        code = 130
    finally:
        _CONFIG.update(dirs=[], name="config")
    if argv_given is None:
        _end_distributed_process(code)
    return code


def _end_distributed_process(code: int) -> None:
    """A console-script process that was a rank of a distributed job (torchrun) ends here with
    ``os._exit(code)`` once its logs and streams are flushed (the process group is already
    destroyed). Why: gloo's worker thread (``ProcessGroupGloo::runLoop``) can still be releasing a
    finished barrier's work, whose tensors hold Python references, when the main thread reaches
    interpreter finalization; its GIL acquire then ends the thread mid-destructor and the rank
    aborts with "terminate called without an active exception" (SIGABRT; core dump backtrace,
    about 1 in 40 runs under load), so torchrun fails a finished job. Skipping finalization
    closes that window. Single processes return normally."""
    if "lmrun.distributed.env" not in sys.modules:
        return
    from lmrun.distributed.env import joined_process_group

    if not joined_process_group():
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: list[str], args) -> int:
    informational = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.resolve
    search = None
    if not informational:
        try:
            launcher = _launcher_of(args.overrides) if _mentions_launcher(args) and not args.multirun else ""
            if launcher in SUBMITIT_LAUNCHERS:
                args.multirun = True  # launchers run only in multirun mode: a one-job sweep
                argv.insert(0, "--multirun")
            jobs, search = _expand_jobs(args.overrides, args.multirun)
            if args.multirun and not launcher and _mentions_launcher(args):
                launcher = _launcher_of(jobs[0])
            if search is not None:
                print(f"lmrun: checking one sample of the search space before launching {search['n_trials']} "
                      f"trial(s) ({search['sweeper']})", file=sys.stderr)
            elif args.multirun:
                print(f"lmrun: checking {len(jobs)} job(s) before launching", file=sys.stderr)
            checked = [(job, *preflight(job)) for job in jobs]
            sweep_dir = _sweep_dir(checked, search) if args.multirun else None
        except LmrunError as e:
            print(f"lmrun: error: {e}", file=sys.stderr)
            return 2
        try:
            if launcher in SUBMITIT_LAUNCHERS:
                _check_tasks(checked)
            if search is not None:
                _check_search(checked, search, launcher)
        except LmrunError as e:
            print(f"lmrun: error: {e}", file=sys.stderr)
            return 2
        if any(bool(cfg.dry_run) for _, cfg, _ in checked):
            if args.multirun:
                print(_sweep_plan(checked, sweep_dir, launcher, search))
            else:
                for job, _, plan in checked:
                    print(format_plan(plan, job))
            return 0
        if args.multirun and not any(o.startswith("hydra.sweep.dir=") for o in args.overrides):
            argv.append(f"hydra.sweep.dir={sweep_dir}")
        if not args.multirun:
            given = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.run.dir=")), None)
            try:
                if given is None:
                    argv.append(f"hydra.run.dir={_single_run_dir(checked[0][1])}")
                else:
                    _check_run_dir(checked[0][1], given, checked[0][0])
            except LmrunError as e:
                print(f"lmrun: error: {e}", file=sys.stderr)
                return 2
    elif args.cfg or args.info:
        try:
            compose(args.overrides)  # a bad override is one line here too, not Hydra's traceback
        except LmrunError as e:
            print(f"lmrun: error: {e}", file=sys.stderr)
            return 2
    if args.help and not any(o.split("=")[0].lstrip("+~") == "stage" for o in args.overrides):
        argv.append(f"stage={stage_names()[0]}")  # help lists the groups; composing it needs some stage
    sys.argv = [sys.argv[0] if sys.argv else "lmrun"] + argv
    code = 0
    with contextlib.ExitStack() as held:
        if not informational and args.multirun:  # one launch per sweep directory at a time (all launchers)
            from lmrun.launch.sweep import sweep_lock

            given = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.sweep.dir=")), None)
            if given is None or "${" not in given:  # (a directory named by an interpolation is not known yet)
                try:
                    held.enter_context(sweep_lock(Path(given).absolute() if given else sweep_dir))
                except LmrunError as e:  # launched by another process now: nothing written or submitted
                    print(f"lmrun: error: {e}", file=sys.stderr)
                    return 2
        try:
            _hydra_entry()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if args.help and code == 0:
        print(stage_catalogue())
    if not informational and args.multirun:
        from lmrun.launch.sweep import format_outcomes, take_outcomes

        outcomes = take_outcomes()
        if outcomes:
            print(f"lmrun: {format_outcomes(outcomes)}", file=sys.stderr)
            if code == 0 and any(o["state"] not in ("completed", "skipped") for o in outcomes):
                code = 1
        if search is not None:
            hydra_dir = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.sweep.dir=")), None)
            _report_search(Path(hydra_dir).absolute() if hydra_dir else sweep_dir, search,
                           str(checked[0][1].sweep.objective))
    return code


def _check_tasks(checked: list) -> None:
    """A job of several processes (tasks) needs a stage that runs distributed (declares
    ``DISTRIBUTED = True``); otherwise every process would run the whole stage."""
    from lmrun.launch.resources import job_resources

    for _, cfg, _ in checked:
        r = job_resources(cfg)
        if r["nodes"] * r["tasks_per_node"] > 1 and not getattr(load_stage(cfg.stage.name), "DISTRIBUTED", False):
            raise ConfigError(f"stage.resources: {r['nodes']} node(s) x {r['tasks_per_node']} task(s), but stage "
                              f"{cfg.stage.name} runs as one process; set stage.resources.tasks_per_node=1 "
                              "stage.resources.nodes=1 (and at most 1 GPU)")


def _mentions_launcher(args) -> bool:
    """Whether the command line or an experiment may select a launcher (composing Hydra's node
    costs ~0.1 s, so plain runs skip it)."""
    return any(o.startswith(("hydra/launcher", "experiment=", "+experiment=")) for o in args.overrides)


if __name__ == "__main__":
    sys.exit(main())
