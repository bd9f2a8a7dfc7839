"""Generated sequence tasks: selective copying and induction heads (Gu & Dao 2023, Mamba, §4.1).

Each task is a pure function of (seed, step, process_index, process_count): nothing is stored,
nothing is downloaded, and resuming needs only the step. Example `row` of the global batch of
`step` is drawn from its own `np.random.default_rng((task id, seed, step, row))`, and process p
gets the rows [p*B_l, (p+1)*B_l) with B_l = global_batch_size // process_count, so the processes'
batches stacked in order make the one-process batch (as in `jaxmodels.data.lm`).

A batch is a dict of NumPy arrays, all `(B_l, seq_len)`:
  "inputs"   int32 token ids fed to the model;
  "targets"  int32 token ids the model must output at each position (0 where "mask" is False);
  "mask"     bool, True only at the answer positions: the loss and accuracy count only these.
Targets are aligned with inputs (the output at position t is read after seeing inputs[:t + 1]),
so a causal sequence model is trained on cross entropy of its position-t output against targets[t].

Token ids (vocab_size V counts every id the model sees, special ones included):
  selective copying  0 = blank (noise), 1 .. V-2 = data tokens, V-1 = marker
  induction heads    0 .. V-2 = ordinary tokens, V-1 = trigger
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np

from jaxmodels.ops.checks import one_of

BLANK = 0  # selective copying: the noise token between data tokens


def copying_marker(vocab_size: int) -> int:
    """Selective copying's marker token id, `vocab_size - 1`."""
    return vocab_size - 1


def induction_trigger(vocab_size: int) -> int:
    """Induction heads' trigger token id, `vocab_size - 1`."""
    return vocab_size - 1


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _rows(seed: int, step: int, global_batch_size: int, process_index: int, process_count: int) -> range:
    """The global-batch rows of this process; checks the arguments shared by every task."""
    _check_int("seed", seed, 0)
    _check_int("step", step, 0)
    _check_int("process_count", process_count, 1)
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if _check_int("global_batch_size", global_batch_size, 1) % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of process_count={process_count}")
    local = global_batch_size // process_count
    return range(process_index * local, (process_index + 1) * local)


def _empty_batch(rows: range, seq_len: int) -> dict[str, np.ndarray]:
    return {"inputs": np.zeros((len(rows), seq_len), np.int32), "targets": np.zeros((len(rows), seq_len), np.int32),
            "mask": np.zeros((len(rows), seq_len), bool)}


def selective_copying(seed: int, step: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                      *, seq_len: int = 4096, num_tokens: int = 16, vocab_size: int = 16) -> dict[str, np.ndarray]:
    """This process's batch of the selective copying task at `step` (Gu & Dao 2023, §4.1.1, Table 1).

    The copying task of Arjovsky et al. (2016) with random spacing, as in the S4/Mamba code
    (`torch_copying_data(..., variable=True)`): the first `seq_len - num_tokens` positions hold
    `num_tokens` data tokens, uniform in [1, vocab_size - 2], at sorted uniformly random distinct
    positions, and BLANK (0) elsewhere; the last `num_tokens` positions hold the marker
    (`vocab_size - 1`). At the i-th marker the model must output the i-th data token, so targets
    and mask are non-zero only on the last `num_tokens` positions. The paper uses seq_len 4096,
    num_tokens 16, vocab_size 16. A constant guess is right 1 time in `vocab_size - 2`.

    Returns {"inputs", "targets": int32, "mask": bool}, each `(global_batch_size // process_count,
    seq_len)`. Raises ValueError on bad arguments (seq_len < 2 * num_tokens, vocab_size < 3, ...).
    """
    rows = _rows(seed, step, global_batch_size, process_index, process_count)
    num_tokens = _check_int("num_tokens", num_tokens, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 3)
    if _check_int("seq_len", seq_len, 2) < 2 * num_tokens:
        raise ValueError(f"seq_len must be >= 2 * num_tokens = {2 * num_tokens} (data region, then markers), "
                         f"got {seq_len}")
    data_len = seq_len - num_tokens
    batch = _empty_batch(rows, seq_len)
    batch["inputs"][:, data_len:] = copying_marker(vocab_size)
    batch["mask"][:, data_len:] = True
    for i, row in enumerate(rows):
        rng = np.random.default_rng((0, seed, step, row))
        positions = np.sort(rng.choice(data_len, num_tokens, replace=False))
        tokens = rng.integers(1, vocab_size - 1, num_tokens)
        batch["inputs"][i, positions] = tokens
        batch["targets"][i, data_len:] = tokens
    return batch


def induction_heads(seed: int, step: int, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                    *, seq_len: int = 256, vocab_size: int = 16) -> dict[str, np.ndarray]:
    """This process's batch of the induction heads task at `step` (Gu & Dao 2023, §4.1.2, Table 2;
    Olsson et al. 2022, "In-context Learning and Induction Heads").

    Inputs are uniform ordinary tokens in [0, vocab_size - 2], except that the trigger
    (`vocab_size - 1`) stands at one uniformly random position p in [0, seq_len - 3] and at the last
    position, and nowhere else. At the last position the model must output the token at p + 1,
    the one that followed the first trigger; targets and mask are non-zero only there. The paper
    trains at seq_len 256, vocab_size 16 and tests lengths 2^6 .. 2^20. A constant guess is right
    1 time in `vocab_size - 1`.

    Returns {"inputs", "targets": int32, "mask": bool}, each `(global_batch_size // process_count,
    seq_len)`. Raises ValueError on bad arguments (seq_len < 3, vocab_size < 3, ...).
    """
    rows = _rows(seed, step, global_batch_size, process_index, process_count)
    seq_len = _check_int("seq_len", seq_len, 3)
    vocab_size = _check_int("vocab_size", vocab_size, 3)
    trigger = induction_trigger(vocab_size)
    batch = _empty_batch(rows, seq_len)
    batch["mask"][:, -1] = True
    for i, row in enumerate(rows):
        rng = np.random.default_rng((1, seed, step, row))
        batch["inputs"][i] = rng.integers(0, trigger, seq_len)
        p = rng.integers(0, seq_len - 2)
        batch["inputs"][i, [p, -1]] = trigger
        batch["targets"][i, -1] = batch["inputs"][i, p + 1]
    return batch


TASKS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "selective_copying": selective_copying,
    "induction_heads": induction_heads,
}


def batches(task: str, start_step: int = 0, *, seed: int, global_batch_size: int, process_index: int = 0,
            process_count: int = 1, **task_options) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's batches of `task` for steps start_step, start_step + 1, ...

    `task` is a name in TASKS; `task_options` are its keyword options (seq_len, vocab_size, ...).
    Batch k is `TASKS[task](seed, start_step + k, global_batch_size, process_index, process_count,
    **task_options)`, so resuming at `start_step` gives exactly the batches of an uninterrupted run.
    Arguments are checked here, before the first batch is asked for (ValueError; TypeError for an
    unknown option).
    """
    one_of("task", task, sorted(TASKS))

    def make(step: int) -> dict[str, np.ndarray]:
        return TASKS[task](seed, step, global_batch_size, process_index, process_count, **task_options)

    first = make(start_step)  # raises now on bad arguments
    return itertools.chain([first], map(make, itertools.count(start_step + 1)))
