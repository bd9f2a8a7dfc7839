"""A UNet on latents conditioned on a class label through cross-attention (the latent-diffusion recipe of
Rombach et al. 2022, §3.3, with a learned label table in place of the text encoder)."""

import jax
from flax import nnx

from jaxmodels.models.unet import UNet
from jaxmodels.nn.diffusion import LabelEmbedding
from jaxmodels.ops.checks import one_of


class LabelContextUNet(nnx.Module):
    """A `UNet` on latents whose only conditioning besides the noise level is a class label given
    through cross-attention: the label's learned embedding (`LabelEmbedding`, row `num_classes` = the
    null label of classifier-free guidance) is a 1-token context (the LDM recipe, Rombach et al. 2022,
    §3.3, with a label table in place of the text encoder).

    __call__(x (B, h, w, latent_channels), c_noise (B,), labels (B,) int in [0, num_classes]) ->
    (B, h, w, latent_channels) float32. num_levels: 1 or 2 resolution levels (channel multipliers 1, 2),
    every level with attention.
    """

    def __init__(self, *, latent_channels: int, num_classes: int, base_channels: int, context_dim: int,
                 num_levels: int = 2, num_groups: int = 8, rngs: nnx.Rngs):
        one_of("num_levels", num_levels, (1, 2))
        self.num_classes = num_classes
        self.label_context = LabelEmbedding(num_classes, context_dim, rngs=rngs)
        self.unet = UNet(in_channels=latent_channels, base_channels=base_channels,
                         channel_mult=(1, 2)[:num_levels], num_res_blocks=1, attention_levels=tuple(range(num_levels)),
                         num_heads=4, num_groups=num_groups, context_dim=context_dim, rngs=rngs)

    def context(self, labels: jax.Array) -> jax.Array:
        """labels (B,) int -> the (B, 1, context_dim) cross-attention context."""
        return self.label_context(labels)[:, None, :]

    def __call__(self, x: jax.Array, c_noise: jax.Array, labels: jax.Array) -> jax.Array:
        return self.unet(x, c_noise, context=self.context(labels))
