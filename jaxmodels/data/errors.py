"""The one error a damaged data file raises: `DataError`, naming the file(s) and the fix.

Raised when a data set's files are missing, truncated, empty, hold fewer or more records than
their `dataset_info.json` says, or hold a record that cannot be read; always chained (`from`)
from the underlying tfds, ArrayRecord or Riegeli exception. The training loop catches it around
`next(batches)`, saves the last finished step and re-raises: the fix (re-preparing the data)
changes no batch, so the run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence


class DataError(RuntimeError):
    """A data file is missing or corrupt.

    `problem` says what is wrong, `files` are the paths at fault, `fix` what to do, `step` the
    training step whose batch was being read (None when not reading a batch). The message holds
    all of them: "{problem} [while reading the batch of step S]: {files}. To fix: {fix}".
    """

    def __init__(self, problem: str, files: Sequence[str], fix: str, step: int | None = None):
        self.problem, self.files, self.fix, self.step = problem, tuple(map(str, files)), fix, step
        where = "" if step is None else f" while reading the batch of step {step}"
        super().__init__(f"{problem}{where}: {', '.join(self.files)}. To fix: {fix}")

    def __reduce__(self):  # picklable although the constructor takes more than the message
        return DataError, (self.problem, self.files, self.fix, self.step)

    def at_step(self, step: int) -> DataError:
        """The same error, naming the training step whose batch was being read."""
        return DataError(self.problem, self.files, self.fix, step)
