"""Pallas kernels, kept apart from the mathematics: `fused_scan` (Mamba's selective scan) and `grouped_matmul`
(dropless MoE experts).

A kernel module holds the kernel, its launch and VJP code and a `supports(...)` predicate that names what
it cannot run; the math module (`ops.scan`, `ops.moe`) owns the public function and chooses the kernel
with its `implementation=` argument (`jaxmodels.ops.dispatch`). On CPU the kernels run through the Pallas
interpreter (`interpret=True`).
"""
