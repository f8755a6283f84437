"""Serving an exported model: the artefact folder, its loader and its preprocessing.

  model = srigl_jax.serving.load_inference_model(PATH)   # or srigl_jax.load_inference_model
  logits = model(model.preprocess(raw_uint8_images))

`artefact` is the folder's format (marker, manifest, variables, report) and
its loader, which checks it all before anything is built; `manifest` what a
manifest must say; `folder` how a folder is owned and replaced atomically;
`model` the loaded `InferenceModel`, `preprocessing` the eval preprocessing
replayed on raw images, and `report` the export report as text. Serving
imports the models, the condensed kernels and the augmentation maths, and
nothing of the trainer or the data pipeline.
"""

from srigl_jax.serving.artefact import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MARKER_FILE,
    REPORT_FILE,
    VARIABLES_DIR,
    ArtefactError,
    load_inference_model,
)
from srigl_jax.serving.model import InferenceModel
from srigl_jax.serving.preprocessing import apply_preprocessing

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MARKER_FILE",
    "REPORT_FILE",
    "VARIABLES_DIR",
    "ArtefactError",
    "InferenceModel",
    "apply_preprocessing",
    "load_inference_model",
]
