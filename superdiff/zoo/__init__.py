"""Embedded default models: data, evaluators, training and shipped weights.

* :mod:`.shapes`: captioned coloured shapes (16×16 RGB) and the pixel attribute checker;
* :mod:`.digits`: scikit-learn's 8×8 digits, their split, the digit classifier, Fréchet distance;
* :mod:`.tokenizer`: the offline CLIP tokenizer of the captions;
* :mod:`.train`: ``python -m superdiff.zoo.train digits|shapes|classifier``;
* :mod:`.registry`: loaders for the shipped weights (``load_digit_model``, ``embedded_path``, ...).

Submodules import torch only; diffusers and transformers are imported where a model is built.
"""

from .registry import embedded_path, load_digit_classifier, load_digit_model

__all__ = ["embedded_path", "load_digit_classifier", "load_digit_model"]
