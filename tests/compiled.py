"""A model called compiled whole, for tests that compare its outputs: one XLA compilation per input shape and
structure, where an eager call compiles every operation separately (seconds per call on the CPU)."""

from flax import nnx


@nnx.jit(static_argnames="return_aux")
def forward(model, *args, return_aux=None, **kwargs):
    """model(*args, **kwargs) under nnx.jit; `return_aux` (static) is passed on only when given."""
    if return_aux is not None:
        kwargs["return_aux"] = return_aux
    return model(*args, **kwargs)
