"""Orbax checkpoints of the train state: periodic, keep-N, atomic; falls back past corrupt ones."""

import logging

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class Checkpointer:
    """Saves every `every` steps (and on demand), keeps the newest `keep`.

    Orbax writes each step to a temporary directory and renames it when complete, so an
    interrupted save never shadows the previous checkpoint.
    """

    def __init__(self, directory: str, *, every: int, keep: int):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Save `state` as `step` if step is a multiple of `every` (or force); returns whether it saved.

        (The interval is decided here: orbax's own would also save the first step of every run.)
        """
        if not force and step % self.every:
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def save_final(self, step: int, state) -> None:
        """Make sure `step` is saved (after any in-flight save finishes), whatever the interval."""
        self.wait()
        if step not in self.manager.all_steps():
            self.save(step, state, force=True)
        self.wait()

    def restore_latest(self, abstract_state, hint: str = ""):
        """Restore the newest readable checkpoint into `abstract_state`'s structure and shardings.

        Returns (step, state), or (None, None) when there is none. A checkpoint that fails to
        read is reported with its step and skipped for the one before it. `hint` (e.g. how this
        run's config differs from the one that wrote the checkpoints) ends the error's message.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                return step, state
            except Exception as e:
                log.warning("checkpoint at step %d is unreadable (%s: %s); trying an older one",
                            step, type(e).__name__, str(e).splitlines()[0][:200])
        if steps:
            raise CheckpointError(f"none of the checkpoints at steps {steps} in {self.manager.directory} "
                                  f"could be restored; move the directory away to start afresh{hint}")
        return None, None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
