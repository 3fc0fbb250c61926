"""Evaluation models (docs/method.md §9): on SynthFace, a second recogniser and attribute classifiers that are
separate from the models the method consumes (:mod:`.classifiers`)."""
from .classifiers import (
                          EVAL_RECOGNIZER_CONFIG,
                          AttributeClassifier,
                          ClassifierConfig,
                          EvalModels,
                          load_eval_models,
                          region_matrices,
                          train_classifier,
                          train_eval_recognizer,
)

__all__ = ["EVAL_RECOGNIZER_CONFIG", "AttributeClassifier", "ClassifierConfig", "EvalModels", "load_eval_models",
           "region_matrices", "train_classifier", "train_eval_recognizer"]
