"""Training only the adapters of a pre-trained model (config.peft; the methods are `jaxmodels.nn.peft`'s).

A fine-tune run's train state is {"step", "params", "opt_state", "frozen"}: "params" holds only what is trained
(the LoRA factors, or the parameters of the modules a hook method adds) and so does the optimizer state; "frozen"
holds the pre-trained parameters, read from config.train.init_from (optionally stored in peft.base_dtype), which
the train step passes through unchanged (`make_train_step(..., reparametrize=FineTune.reparametrize)`) and the
checkpoints leave out: a resumed run reads them from init_from again. The model a step differentiates is
`reparametrize(params, frozen, draw)`, so every task and strategy works as for full training: for LoRA, the kernels
the model's layers use as projections are unfolded there (`nn.peft.LoraKernel`: no weight gradient of the frozen
kernels, and peft.dropout), the others folded. Evaluation and export take `combine`, the update folded (merged).
"""

import functools
from collections.abc import Callable

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmodels.models import make_model
from jaxmodels.nn.peft import (
    PeftSpec,
    lora_apply,
    lora_init,
    lora_projections,
    lora_targets,
    lora_unfold,
    merge_params,
    peft_spec_from_config,
    split_params,
)
from jaxmodels.ops.precision import DTYPES
from jaxmodels.parallel import sharding as sh
from jaxmodels.parallel.sharding import Rules
from jaxmodels.train.config import ConfigError

FROZEN = "frozen"  # the train state's entry of the pre-trained parameters


class FineTune:
    """The split of a model into trained and frozen parameters for the PEFT method `spec` (not "none").

    build_model: (rngs, peft=None) -> the model, with the modules of `peft`'s method if it adds some
      (`Task.build_model`). rngs: () -> the nnx.Rngs of parameter initialisation (the adapters are drawn from it).
    graphdef: the model with the method's modules. abstract_trainable, abstract_frozen: ShapeDtypeStruct trees.
    unfolded: the LoRA targets trained unfolded (`lora_projections`; none when peft.unfolded is False).
    Raises ValueError (naming config.peft.X) for LoRA targets that match nothing or do not fit (`lora_targets`),
    and for peft.dropout > 0 with a target the model cannot unfold.
    """

    def __init__(self, build_model: Callable[..., nnx.Module], spec: PeftSpec, rngs: Callable[[], nnx.Rngs]):
        self.build_model, self.spec, self.rngs = build_model, spec, rngs
        self.abstract_base = nnx.eval_shape(lambda: build_model(rngs()))
        abstract_model = nnx.eval_shape(lambda: build_model(rngs(), spec))
        self.graphdef = nnx.graphdef(abstract_model)
        self.abstract_model = abstract_model
        self.base_params = nnx.state(self.abstract_base, nnx.Param).to_pure_dict()
        self.targets = lora_targets(self.abstract_base, spec) if spec.method == "lora" else []
        self.unfolded = lora_projections(self.abstract_base, self.targets) if spec.unfolded else []
        folded = [t.name for t in self.targets if t not in self.unfolded]
        if spec.dropout and folded:
            raise ValueError(f"peft.dropout={spec.dropout} needs every LoRA target unfolded, but "
                             f"{type(self.abstract_base).__name__} uses {', '.join(folded)} otherwise than as a "
                             "projection (LORA_PROJECTIONS of its layers); set peft.dropout=0 or narrow peft.targets")
        base_dtype = DTYPES[spec.base_dtype] if spec.base_dtype else None
        self.abstract_frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, base_dtype or a.dtype),
                                            self.base_params)
        self.abstract_trainable = jax.eval_shape(self.init)

    def init(self) -> dict:
        """Fresh trained parameters (traceable: the trainer jits it with their shardings): LoRA's A and B
        (`lora_init`), or the parameters of the modules the method adds to the model."""
        if self.spec.method == "lora":
            return lora_init(self.rngs().params(), self.targets, self.spec.rank)
        params = nnx.state(self.build_model(self.rngs(), self.spec), nnx.Param).to_pure_dict()
        return split_params(params, self.abstract_frozen)[0]

    def combine(self, trainable: dict, frozen: dict) -> dict:
        """The model's parameters (a pure dict for `graphdef`) from the trained ones and the frozen ones, the
        latter cast back to the model's dtypes: W + (alpha / r) A B at LoRA's targets, or the union of both
        trees."""
        frozen = self._in_model_dtypes(frozen)
        if self.spec.method == "lora":
            return lora_apply(frozen, trainable, self.spec.scale)
        return merge_params(frozen, trainable)

    def reparametrize(self, trainable: dict, frozen: dict, draw: jax.Array) -> dict:
        """The model's parameters for a train step (`make_train_step`'s `reparametrize`): `combine`'s, except that
        the LoRA targets in `unfolded` are `LoraKernel`s (`lora_unfold`) whose dropout (peft.dropout) is drawn from
        the run's seed folded with `draw`, the step's int32 (step, micro-batch, data shard)."""
        if self.spec.method != "lora" or not self.unfolded:
            return self.combine(trainable, frozen)
        key = None
        if self.spec.dropout:
            rngs = self.rngs()
            rngs.params()  # the draw `init` took the factors from
            key = functools.reduce(jax.random.fold_in, draw, rngs.dropout())
        return lora_unfold(self._in_model_dtypes(frozen), trainable, self.spec.scale, self.unfolded,
                           dropout=self.spec.dropout, key=key)

    def _in_model_dtypes(self, frozen: dict) -> dict:
        """The frozen parameters (stored in peft.base_dtype) cast back to the model's dtypes."""
        return jax.tree.map(lambda f, a: f.astype(a.dtype), frozen, self.base_params)

    def specs(self, mesh: Mesh, rules: Rules) -> tuple[dict, dict, dict]:
        """PartitionSpecs of (trained, frozen, model) parameters: by the model's logical axes; LoRA's factors,
        small, are replicated."""
        model = sh.param_specs(self.abstract_model, mesh, rules)
        if self.spec.method == "lora":
            return jax.tree.map(lambda _: P(), self.abstract_trainable), model, model
        trained, frozen = split_params(model, self.abstract_frozen)
        return trained, frozen, model


def model_builder(config: ml_collections.ConfigDict) -> Callable[..., nnx.Module]:
    """(rngs, peft=None) -> `make_model(config.model, rngs, peft)`: what `Task.build_model` builds, without a task
    (for loading a run's model)."""
    return lambda rngs, peft=None: make_model(config.model, rngs, peft)


def fine_tune(config: ml_collections.ConfigDict, build_model: Callable[..., nnx.Module],
              rngs: Callable[[], nnx.Rngs]) -> FineTune | None:
    """The `FineTune` of config.peft for the model of `build_model` (`Task.build_model`), None when there is none
    (no section, or method "none": every parameter is trained). Raises ConfigError naming the field when its LoRA
    targets do not fit the model."""
    spec = peft_spec_from_config(config.get("peft"))
    if spec.method == "none":
        return None
    try:
        return FineTune(build_model, spec, rngs)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None

