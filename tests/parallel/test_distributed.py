"""The start-up check that every process of a multi-process run has the same config and devices,
with the all-gather replaced by a table built from a second, simulated process."""

import numpy as np
import pytest

from jaxmodels.parallel.distributed import check_processes_agree, disagreements, fingerprint, section_hashes
from tests.tiny import tiny_config


def _with_second_process(other_rounds):
    """A `gather` that stacks this process's vector on the simulated one of the same round."""
    rounds = iter(other_rounds)
    return lambda ours: np.stack([ours, np.asarray(list(next(rounds).values()), np.int32)])


def test_disagreements_name_the_differing_columns_and_values():
    table = np.array([[1, 8, 5], [1, 4, 5], [1, 8, 5]])
    assert disagreements(["a", "local devices", "c"], table) == [
        "local devices: process 0 has 8, process 1 has 4, process 2 has 8"]
    assert disagreements(["a", "b", "c"], table[[0, 2]]) == []


def test_same_config_passes():
    config = tiny_config()
    check_processes_agree(config, gather=_with_second_process([fingerprint(tiny_config())]))


def test_different_config_names_the_section():
    config, other = tiny_config(), tiny_config(model__num_layers=2)
    with pytest.raises(ValueError, match=r"disagree .*: config\.model \(hash\): process 0 has -?\d+, process 1 has"):
        check_processes_agree(config, gather=_with_second_process([fingerprint(other), section_hashes(other)]))


def test_different_device_counts_are_named():
    config = tiny_config()
    other = dict(fingerprint(config), **{"jax.local_device_count()": 3})
    with pytest.raises(ValueError, match=r"jax.local_device_count\(\): process 0 has 8, process 1 has 3"):
        check_processes_agree(config, gather=_with_second_process([other]))
