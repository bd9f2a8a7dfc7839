"""A jax.profiler trace of chosen train steps (config.train.profile_steps), written under WORKDIR/profile/."""

import os
import shutil
import tempfile

import jax
from etils import epath

from jaxmodels.train.config import ConfigError
from jaxmodels.train.paths import copy_tree, is_local


def check_profile_steps(profile_steps) -> None:
    """ConfigError unless config.train.profile_steps is (start, count): two integers >= 0."""
    if not (isinstance(profile_steps, (tuple, list)) and len(profile_steps) == 2
            and all(isinstance(n, int) and n >= 0 for n in profile_steps)):
        raise ConfigError(f"config.train.profile_steps={profile_steps!r} is not valid; give (start, count), two "
                          "integers >= 0, e.g. (10, 5) traces the 5 steps after step 10; (0, 0) traces none")


class StepProfiler:
    """Traces the `count` train steps that follow step `start` (profile_steps = (start, count)) when
    `enabled` (process 0). A local workdir gets the trace directly; for a URL the trace is written to a
    local temporary folder and copied there (jax.profiler writes with ordinary file I/O). A run resumed
    past `start` traces nothing. Open the trace with TensorBoard's profile plugin, XProf or Perfetto."""

    def __init__(self, profile_steps, workdir: epath.Path, enabled: bool):
        start, count = profile_steps
        self.start, self.stop = start, start + count
        self.active = enabled and count > 0
        self.destination, self.local_dir = workdir / "profile", None

    def before_step(self, step: int) -> None:
        """Call before dispatching the step that starts from `step` steps done."""
        if self.active and step == self.start:
            self.local_dir = os.fspath(self.destination) if is_local(self.destination) else tempfile.mkdtemp()
            jax.profiler.start_trace(self.local_dir)

    def after_step(self, step: int, outputs) -> None:
        """Call after dispatching the step that ends at `step` steps done; `outputs` are its results."""
        if self.local_dir is not None and step == self.stop:
            jax.block_until_ready(outputs)  # so that the trace holds the last step's device work
            self.finish()

    def finish(self) -> None:
        """Stop a trace in progress (also when the run ends or is interrupted before `stop`)."""
        if self.local_dir is None:
            return
        jax.profiler.stop_trace()
        if not is_local(self.destination):
            copy_tree(self.local_dir, self.destination)
            shutil.rmtree(self.local_dir)
        self.local_dir = None
