"""benchmarks/peft.py's JAX cases run on the CPU at the --small shape (its GPU figures come from the full run): LoRA
unfolded (the default) and folded train the same adapters, and the table reports both."""

import argparse

from benchmarks import peft


def test_small_lora_cases_unfolded_and_folded_run_and_tabulate(tmp_path):
    args = argparse.Namespace(small=True, size="1b", steps=2, seq_len=32)
    base = str(tmp_path / "base")
    peft.write_base(args, base)
    rows = [peft.jax_case(args, name, base) for name in ("lora", "lora_folded")]
    assert rows[0]["trained_params"] == rows[1]["trained_params"] == 2 * 2 * (64 * 16 + 16 * 64)  # 2 layers, q and v
    assert all(r["step_time_s"] > 0 and r["xla_arguments_gib"] > 0 for r in rows)
    lines = peft.table(rows).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["lora", "lora_folded"]
