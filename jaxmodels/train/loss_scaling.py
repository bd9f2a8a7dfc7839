"""Loss scaling in the train step, from `config.precision` (float16 training; Micikevicius et al. 2018, §3.2).

float16 (`config.model.dtype="float16"`) has 5 exponent bits: activation gradients below 2^-24 flush to zero and
above 65504 overflow. The step multiplies the loss by S before differentiation and divides the gradients by S
before the optimizer (`jaxmodels.ops.precision`). `config.precision.loss_scale`:

- "none" (default): no scale; the train state has no "loss_scale" entry and the step is the unscaled one, so
  runs and checkpoints are those of before loss scaling existed.
- "static": a fixed S = init_scale.
- "dynamic": S starts at init_scale; a step whose gradients overflow is skipped and S multiplied by
  backoff_factor (0.5), and after growth_interval finite steps in a row S is multiplied by growth_factor (2):
  the schedule of apex and PyTorch's GradScaler (S never falls below 1).

The state (`ops.precision.StaticLossScale` / `DynamicLossScale`, float32 scalars) is train_state["loss_scale"],
replicated under every strategy and checkpointed with the rest, so a resumed run continues with the scale it had.
Which steps are skipped is decided in one place, the train step's non-finite guard (`jaxmodels.train.step`): the
scale's update takes the same `finite` flag. The step logs the scale it multiplied the loss by as
metrics["loss_scale"].

bfloat16 has float32's exponent range and needs no scaling. Loss scaling with a float32 or bfloat16 model is
allowed rather than refused (it is harmless: a power-of-two scale multiplies and divides exactly, so such a run
only gains the skips of gradients that overflow float32) and `note` says it is pointless; a float16 model without
loss scaling gets a note too.
"""

import dataclasses

import jax
import ml_collections
from jax.sharding import PartitionSpec as P

from jaxmodels.nn.spec import spec_from_section
from jaxmodels.ops import precision
from jaxmodels.ops.checks import one_of, positive_int, real_in_range

LOSS_SCALES = ("none", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """The `config.precision` section. loss_scale: one of LOSS_SCALES; init_scale: S at step 0 (> 0, finite;
    2^15); growth_interval: finite steps in a row before S grows (an int >= 1); growth_factor (> 1) and
    backoff_factor (in (0, 1)): what S is multiplied by then and after an overflow. ValueError / TypeError
    naming config.precision.X for a value outside its range."""

    loss_scale: str = "none"
    init_scale: float = 2.0**15
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5

    def __post_init__(self):
        one_of("config.precision.loss_scale", self.loss_scale, LOSS_SCALES)
        real_in_range("config.precision.init_scale", self.init_scale, 0, include_low=False)
        positive_int("config.precision.growth_interval", self.growth_interval)
        real_in_range("config.precision.growth_factor", self.growth_factor, 1, include_low=False)
        real_in_range("config.precision.backoff_factor", self.backoff_factor, 0, 1, include_low=False,
                      include_high=False)

    @property
    def enabled(self) -> bool:
        return self.loss_scale != "none"

    def state(self) -> dict:
        """The train state's entries: {"loss_scale": the initial scale state}, or {} for "none"."""
        if self.loss_scale == "static":
            return {"loss_scale": precision.static_loss_scale(self.init_scale)}
        if self.loss_scale == "dynamic":
            return {"loss_scale": precision.dynamic_loss_scale(self.init_scale)}
        return {}

    def state_specs(self) -> dict:
        """PartitionSpecs of `state()`: replicated scalars."""
        return jax.tree.map(lambda _: P(), self.state())

    def update(self, state: precision.LossScale, finite: jax.Array) -> precision.LossScale:
        """The scale after a step whose gradients were `finite` (bool ()): `ops.precision.update` with this
        section's growth_interval, growth_factor and backoff_factor (a static scale comes back unchanged)."""
        return precision.update(state, finite, growth_interval=self.growth_interval,
                                growth_factor=self.growth_factor, backoff_factor=self.backoff_factor)

    def note(self, model_config: ml_collections.ConfigDict) -> str | None:
        """A remark on this section against the model's dtypes (config.model.dtype / param_dtype), or None:
        float16 without loss scaling risks underflowing gradients; loss scaling without float16 is pointless."""
        policy = precision.Policy(param=model_config.param_dtype, compute=model_config.dtype)
        if policy.needs_loss_scaling and not self.enabled:
            return ("note: the model computes in float16 and config.precision.loss_scale='none': activation "
                    "gradients below 2^-24 flush to zero; config.precision.loss_scale='dynamic' scales them up")
        if self.enabled and not policy.needs_loss_scaling:
            return (f"note: config.precision.loss_scale={self.loss_scale!r} with a model computing in {policy.compute} "
                    f"(parameters {policy.param}) is pointless: its gradients have float32's exponent range (only "
                    "float16 needs scaling)")
        return None


def loss_scaling_from_config(config: ml_collections.ConfigDict) -> LossScaling:
    """The `LossScaling` of config.precision; a config without that section has none."""
    return spec_from_section(LossScaling, config.get("precision"), "config.precision")
