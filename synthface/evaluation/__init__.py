"""The SynthFace world's evaluation: its evaluation models (a second recogniser and attribute classifiers, separate
from the models the method consumes: :mod:`.classifiers`), their scorer (:mod:`.scorer`), the protocol
(:mod:`.suite`, registered as the ``synthface`` suite of ``python -m infer.eval``), the real-image baselines
(:mod:`.baselines`) and the targets (:mod:`.targets`)."""
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
