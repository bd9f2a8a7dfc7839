"""Pallas kernels, kept apart from the mathematics: `fused_scan` (Mamba's selective scan), `grouped_matmul`
(dropless MoE experts) and `flash_attention` (FlashAttention-2 with every mask of `ops.attention`).

A kernel module holds the kernel, its launch and VJP code and a `supports(...)` predicate that names what
it cannot run; the math module (`ops.scan`, `ops.moe`, `ops.attention`) owns the public function and chooses the kernel
with its `implementation=` argument (`jaxmodels.ops.dispatch`). On CPU the kernels run through the Pallas
interpreter (`interpret=True`).
"""
