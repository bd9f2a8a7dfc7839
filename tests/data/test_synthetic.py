"""Generated tasks: answers recoverable from the inputs, exact structure, pure in (seed, step, process)."""

import itertools

import numpy as np
import pytest

from jaxmodels.data import synthetic


def solve_copying(inputs, vocab_size, num_tokens):
    """Hand-written solver: the non-blank, non-marker tokens in order, then placed on the marker positions."""
    out = np.zeros_like(inputs)
    for i, x in enumerate(inputs):
        data = [t for t in x if t not in (synthetic.BLANK, vocab_size - 1)]
        out[i, -num_tokens:] = data
    return out


def solve_induction(inputs, vocab_size):
    """Hand-written solver: the token after the first trigger, answered at the last position."""
    out = np.zeros_like(inputs)
    for i, x in enumerate(inputs):
        first = list(x).index(vocab_size - 1)
        out[i, -1] = x[first + 1]
    return out


COPYING = dict(seq_len=64, num_tokens=8, vocab_size=10)
INDUCTION = dict(seq_len=48, vocab_size=12)


def copying(step=0, **kw):
    return synthetic.selective_copying(kw.pop("seed", 0), step, kw.pop("global_batch_size", 32), **(COPYING | kw))


def induction(step=0, **kw):
    return synthetic.induction_heads(kw.pop("seed", 0), step, kw.pop("global_batch_size", 32), **(INDUCTION | kw))


@pytest.mark.parametrize("seq_len,num_tokens,vocab_size", [(64, 8, 10), (16, 8, 3), (300, 16, 16)])
def test_selective_copying_structure(seq_len, num_tokens, vocab_size):
    b = synthetic.selective_copying(3, 5, 16, seq_len=seq_len, num_tokens=num_tokens, vocab_size=vocab_size)
    x, y, m = b["inputs"], b["targets"], b["mask"]
    assert x.shape == y.shape == m.shape == (16, seq_len)
    assert x.dtype == y.dtype == np.int32 and m.dtype == bool
    data_len = seq_len - num_tokens
    assert (x[:, data_len:] == vocab_size - 1).all() and (x[:, :data_len] != vocab_size - 1).all()
    assert ((x[:, :data_len] != synthetic.BLANK).sum(1) == num_tokens).all()  # exactly num_tokens data tokens
    assert ((y[:, :data_len] == 0).all() and (1 <= y[:, data_len:]).all() and (y[:, data_len:] <= vocab_size - 2).all())
    answer_positions = np.arange(seq_len) >= data_len
    np.testing.assert_array_equal(m, np.broadcast_to(answer_positions, m.shape))  # the mask counts only these
    np.testing.assert_array_equal(y, solve_copying(x, vocab_size, num_tokens))  # solver is 100% right
    assert m.sum() == 16 * num_tokens


def test_induction_heads_structure():
    b = induction(global_batch_size=64)
    x, y, m = b["inputs"], b["targets"], b["mask"]
    v = INDUCTION["vocab_size"]
    assert x.shape == y.shape == m.shape == (64, 48) and x.dtype == y.dtype == np.int32 and m.dtype == bool
    assert ((x == v - 1).sum(1) == 2).all() and (x[:, -1] == v - 1).all()  # trigger: once inside, once at the end
    assert ((x >= 0) & (x < v)).all() and (x[:, -2] != v - 1).all()  # the answer follows the trigger inside
    np.testing.assert_array_equal(m, np.broadcast_to(np.arange(48) == 47, m.shape))
    assert (y[:, :-1] == 0).all() and (y[:, -1] < v - 1).all()
    np.testing.assert_array_equal(y, solve_induction(x, v))


def test_trigger_and_data_positions_cover_the_range():
    x = induction(global_batch_size=512, seq_len=6)["inputs"]  # p in [0, 3]: all four positions occur
    assert set(np.argmax(x == 11, axis=1)) == {0, 1, 2, 3}
    x = copying(global_batch_size=256, seq_len=12, num_tokens=2)["inputs"]  # data positions in [0, 10)
    assert set(np.nonzero(x[:, :10])[1]) == set(range(10))


@pytest.mark.parametrize("make,vocab", [(copying, COPYING["vocab_size"] - 2), (induction, INDUCTION["vocab_size"] - 1)])
def test_a_constant_guess_gets_about_one_in_vocab(make, vocab):
    b = make(global_batch_size=512)
    answers = b["targets"][b["mask"]]
    accuracy = max(np.mean(answers == t) for t in range(INDUCTION["vocab_size"]))
    assert accuracy < 1.6 / vocab and abs(np.mean(answers == answers[0]) - 1 / vocab) < 0.6 / vocab
    assert len(np.unique(answers)) == vocab  # every answer token occurs


@pytest.mark.parametrize("make", [copying, induction])
def test_deterministic_in_seed_and_step(make):
    a, b = make(step=3), make(step=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], make(step=4)["inputs"])
    assert not np.array_equal(a["inputs"], make(step=3, seed=1)["inputs"])
    assert len({r.tobytes() for r in a["inputs"]}) == len(a["inputs"])  # rows differ within a batch


@pytest.mark.parametrize("make", [copying, induction])
@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_get_distinct_rows_that_stack_to_the_global_batch(make, process_count):
    local = [make(step=2, process_index=p, process_count=process_count) for p in range(process_count)]
    assert local[0]["inputs"].shape == (32 // process_count, local[0]["inputs"].shape[1])
    rows = [r.tobytes() for b in local for r in b["inputs"]]
    assert len(set(rows)) == len(rows)  # different processes get different examples
    for k in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), make(step=2)[k])


def test_batches_iterator_resumes_and_matches_the_functions():
    full = list(itertools.islice(synthetic.batches("induction_heads", seed=7, global_batch_size=4, seq_len=16), 5))
    resumed = list(itertools.islice(synthetic.batches("induction_heads", 3, seed=7, global_batch_size=4,
                                                      seq_len=16), 2))
    for step, b in enumerate(full):
        np.testing.assert_array_equal(b["inputs"], synthetic.induction_heads(7, step, 4, seq_len=16)["inputs"])
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    it = synthetic.batches("selective_copying", seed=0, global_batch_size=4, process_index=1, process_count=2,
                           seq_len=20, num_tokens=4, vocab_size=10)
    second_half = copying(global_batch_size=4, seq_len=20, num_tokens=4)["inputs"][2:]
    np.testing.assert_array_equal(next(it)["inputs"], second_half)


def test_long_sequences():
    b = synthetic.induction_heads(0, 0, 2, seq_len=16384)
    np.testing.assert_array_equal(b["targets"], solve_induction(b["inputs"], 16))
    b = synthetic.selective_copying(0, 0, 2)  # the paper's setting: L=4096, 16 tokens, V=16
    assert b["inputs"].shape == (2, 4096)
    np.testing.assert_array_equal(b["targets"], solve_copying(b["inputs"], 16, 16))


@pytest.mark.parametrize("call,match", [
    (lambda: copying(seq_len=15, num_tokens=8), "seq_len must be >= 2 \\* num_tokens"),
    (lambda: copying(vocab_size=2), "vocab_size"),
    (lambda: copying(num_tokens=0), "num_tokens"),
    (lambda: induction(seq_len=2), "seq_len"),
    (lambda: induction(global_batch_size=6, process_count=4), "multiple of process_count"),
    (lambda: induction(process_index=2, process_count=2), "process_index"),
    (lambda: induction(step=-1), "step"),
    (lambda: induction(seed=1.5), "seed"),
    (lambda: synthetic.batches("copying", seed=0, global_batch_size=2), "task='copying' is not valid; choose one of"),
    (lambda: synthetic.batches("induction_heads", seed=0, global_batch_size=2, seq_len=1), "seq_len"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError):
        synthetic.batches("induction_heads", seed=0, global_batch_size=2, num_tokens=3)
