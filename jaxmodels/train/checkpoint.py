"""Orbax checkpoints of the train state: interval and preemption saves, keep-N, atomic, and recovery past
unreadable steps."""

import logging

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

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
    """

    def __init__(self, directory, *, every: int, keep: int, unreadable_dir=None):
        self.directory = epath.Path(directory)
        self.unreadable_dir = epath.Path(unreadable_dir or self.directory.parent / f"{self.directory.name}.unreadable")
        policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()])
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, save_decision_policy=policy)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Save `state` as `step` if the policy says so (or `force`); returns whether it saved."""
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

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
        """Restore the newest readable checkpoint into `abstract_state`'s structure and shardings.

        Returns (step, state), or (None, None) when there is none. A step that fails to read is reported with
        its step and skipped for the one before it; once an older step restores, the newer unreadable ones are
        moved to `unreadable_dir`. When none restores (a config that no longer fits them, more often than
        damage) nothing is moved and CheckpointError says so; `hint` (how this run's config differs from the
        one that wrote the checkpoints) ends its message.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
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
