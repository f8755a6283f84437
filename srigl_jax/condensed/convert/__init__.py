"""Conversion for inference: a params tree (`condense`) or a whole model (`convert_model`)."""

from srigl_jax.condensed.convert.converted import ConvertedModel, condensed_apply
from srigl_jax.condensed.convert.model import convert_model
from srigl_jax.condensed.convert.params import condense
