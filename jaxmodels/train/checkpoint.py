"""Orbax checkpoints of the train state: interval and preemption saves, keep-N, atomic, and recovery past
unreadable steps; and the parameters alone, to start a run from (`config.train.init_from`)."""

import logging

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies
from orbax.checkpoint.checkpoint_manager import DEFAULT_ITEM_NAME

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class Checkpointer:
    """Saves every `every` steps, at a preemption sync point, and on demand; keeps the newest `keep`.

    The save decision is orbax's (`FixedIntervalPolicy` or `PreemptionCheckpointingPolicy`: on a multi-host
    run every host reaches JAX's preemption sync point at the same step after any of them is told to stop).
    Orbax writes each step to a temporary directory and renames it when complete, so an interrupted save
    never shadows the previous checkpoint. A step that cannot be restored while an older one can is moved
    to `unreadable_dir` (kept for inspection, never deleted) so that training past it can save it again.
    `transient`: entries of the state (a dict) that are neither saved nor restored, e.g. a fine-tune's frozen
    pre-trained parameters, which the run reads from config.train.init_from (`jaxmodels.train.finetune`).
    """

    def __init__(self, directory, *, every: int, keep: int, unreadable_dir=None, transient: tuple[str, ...] = ()):
        self.directory, self.transient = epath.Path(directory), transient
        self.unreadable_dir = epath.Path(unreadable_dir or self.directory.parent / f"{self.directory.name}.unreadable")
        policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()])
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, save_decision_policy=policy)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Save `state` (but its `transient` entries) as `step` if the policy says so (or `force`); returns whether
        it saved."""
        return self.manager.save(step, args=ocp.args.StandardSave(self._saved(state)), force=force)

    def _saved(self, state):
        return {k: v for k, v in state.items() if k not in self.transient} if self.transient else state

    def reached_preemption(self, step: int) -> bool:
        """Whether every host reached JAX's preemption sync point at `step` (False on a single process, whose
        signals the loop handles itself)."""
        return self.manager.reached_preemption(step)

    def save_final(self, step: int, state) -> None:
        """Make sure `step` is saved (after any in-flight save finishes), whatever the interval."""
        self.wait()
        if step not in self.manager.all_steps():
            self.save(step, state, force=True)
        self.wait()

    def restore_latest(self, abstract_state, hint: str = ""):
        """Restore the newest readable checkpoint into `abstract_state`'s structure and shardings (but its
        `transient` entries, which the restored state lacks).

        Returns (step, state), or (None, None) when there is none. A step that fails to read is reported with
        its step and skipped for the one before it; once an older step restores, the newer unreadable ones are
        moved to `unreadable_dir`. When none restores (a config that no longer fits them, more often than
        damage) nothing is moved and CheckpointError says so; `hint` (how this run's config differs from the
        one that wrote the checkpoints) ends its message.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(self._saved(abstract_state)))
            except Exception as e:  # any read failure means "try the previous one"
                log.warning("checkpoint at step %d is unreadable (%s: %s); trying an older one",
                            step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                self._reopen()  # a failed restore can leave the manager's view of the directory stale
                continue
            if i:
                self._move_aside(steps[:i])
            return step, state
        if steps:
            raise CheckpointError(f"none of the checkpoints at steps {steps} in {self.directory} could be "
                                  f"restored; move the directory away to start afresh{hint}")
        return None, None

    def _reopen(self) -> None:
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def _move_aside(self, steps: list[int]) -> None:
        """Move the step directories `steps` into unreadable_dir (as STEP, or STEP.N if taken), on process 0."""
        if jax.process_index() == 0:
            self.unreadable_dir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = self.unreadable_dir / str(step), 0
                while target.exists():
                    n += 1
                    target = self.unreadable_dir / f"{step}.{n}"
                (self.directory / str(step)).rename(target)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
        multihost_utils.sync_global_devices("jaxmodels: unreadable checkpoints moved aside")
        self._reopen()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


PARAMS_DIR = "params"  # the folder `save_params` writes


def save_params(directory, params) -> epath.Path:
    """Write `params` (a pytree of arrays, e.g. `nnx.state(model, nnx.Param).to_pure_dict()`) as the orbax
    checkpoint DIRECTORY/params holding {"params": params}, the subtree a train-state checkpoint has too, so
    that `restore_params` reads both alike. Returns that folder."""
    path = epath.Path(directory) / PARAMS_DIR
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"params": params})
        checkpointer.wait_until_finished()
    return path


def params_item(path, step: int | None = None) -> epath.Path:
    """The orbax item folder holding the params that `path` names: the latest checkpoint of a run's workdir
    (PATH/checkpoints/STEP), or its checkpoint of `step` when given, or PATH/params written by `save_params`
    (`python -m jaxmodels.interop.hf import`). ValueError naming `path` when it is neither, or has no checkpoint
    of `step`."""
    path = epath.Path(path)
    if (path / "checkpoints").exists():
        manager = ocp.CheckpointManager(path / "checkpoints")
        steps = manager.all_steps()
        manager.close()
        if step is not None and step not in steps:
            raise ValueError(f"{path} has no checkpoint of step {step}; it has steps {sorted(steps)}")
        if steps:
            return path / "checkpoints" / str(max(steps) if step is None else step) / DEFAULT_ITEM_NAME
    if (path / PARAMS_DIR).exists():
        return path / PARAMS_DIR
    raise ValueError(f"{path} holds no parameters to start from: expected a run's workdir (with checkpoints/) or "
                     f"a folder with {PARAMS_DIR}/ (python -m jaxmodels.interop.hf import writes one)")


def restore_params(path, abstract_params, shardings=None, *, step: int | None = None):
    """The params of the checkpoint `path` (and `step`) names (`params_item`), restored into the structure, dtypes and
    `shardings` (a matching pytree of shardings; None: the default device) of `abstract_params` (a pytree of
    jax.ShapeDtypeStruct, e.g. of `nnx.eval_shape`). The optimizer state and step of a workdir's checkpoint
    are not read.

    Before reading any array, a tensor missing on either side or of another shape raises ValueError naming
    the tensor and both shapes.
    """
    item = params_item(path, step)
    saved = ocp.PyTreeCheckpointHandler().metadata(item).tree.get("params", {})
    found, wanted = _shapes(saved), _shapes(abstract_params)
    problems = [f"{name}: {found.get(name, 'absent')} in the checkpoint, {wanted.get(name, 'absent')} in the model"
                for name in sorted(set(found) | set(wanted)) if found.get(name) != wanted.get(name)]
    if problems:
        raise ValueError(f"the params in {item} do not fit the model (tensor: checkpoint shape, model shape): "
                         + "; ".join(problems))
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract_params)
    restore_args = jax.tree.map(lambda a, s: ocp.ArrayRestoreArgs(sharding=s, dtype=a.dtype), abstract_params,
                                shardings)
    restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"blocks/0/attn/w_q": shape} for every array (or array metadata) of a pytree of dicts."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape) for keys, leaf in flat}
