"""The one entry point: train and evaluate an experiment config.

    python -m jaxmodels.main --config experiments/configs/lm_tiny.py --workdir /tmp/run \
        [--config.train.num_steps=200 --config.model.num_layers=2 ...]

The console script `jaxmodels-train` and, from a checkout, `python -m experiments.main` run the same.
Configs are files; one that imports another (`from experiments.configs import lm_tiny`) needs the
checkout's root importable, as `python -m` from that root makes it. Re-running with the same workdir
resumes from its latest checkpoint. Under a multi-process launcher (launch/), JAX's distributed
runtime is initialised first.
"""

import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_ALLOW_CHANGES = flags.DEFINE_bool(
    "allow_config_changes", False, "Resume a workdir's checkpoints under a config that changes the model, "
    "the objective or the data set (refused by default; the changes are printed either way).")
flags.mark_flags_as_required(["config", "workdir"])


def unknown_override(config, path: str) -> str | None:
    """An error message if `path` (e.g. "model.num_layerz") names no field of config, else None."""
    node, walked = config, []
    for part in path.split("."):
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        if part not in fields:
            where = "config" + "".join("." + w for w in walked)
            return f"unknown config field '{path}': {where} has no field '{part}'; valid fields: {fields}"
        node, walked = node[part], walked + [part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that first names any unknown --config.* override and its valid siblings."""
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_path is None and "--config" in argv[:-1]:
        config_path = argv[argv.index("--config") + 1]
    if config_path:
        config = runpy.run_path(config_path)["get_config"]()
        for arg in argv:
            if arg.startswith("--config."):
                message = unknown_override(config, arg[len("--config."):].split("=", 1)[0])
                if message:
                    sys.exit(f"error: {message}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    from jaxmodels.parallel.distributed import maybe_initialize

    maybe_initialize()
    from jaxmodels.data.errors import DataError
    from jaxmodels.train.checkpoint import CheckpointError
    from jaxmodels.train.config import ConfigError
    from jaxmodels.train.loop import train_and_evaluate
    from jaxmodels.train.paths import WorkdirError
    from jaxmodels.train.workdir import WorkdirLockedError

    try:
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_changes=_ALLOW_CHANGES.value)
    # Refusals and failures with a fix to state: a config, a workdir, a resume, damaged data.
    except (ConfigError, WorkdirError, WorkdirLockedError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    if summary["interrupted"]:
        sys.exit(143)


def run():
    """Parse the command line and train: the console script `jaxmodels-train`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
