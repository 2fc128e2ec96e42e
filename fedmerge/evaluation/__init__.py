"""Evaluation: scores of models on splits, heterogeneity measures, λ/ρ tuning, checkpoint benchmarks."""

from fedmerge.evaluation.measures import data_measures, task_vector_measures
from fedmerge.evaluation.scores import Evaluator, Scores, normalized_accuracy, score
from fedmerge.evaluation.tuning import LAMBDA_GRID, TuningResult, scale_grid, tune, tune_method

__all__ = [
    "LAMBDA_GRID", "Evaluator", "Scores", "TuningResult", "data_measures", "normalized_accuracy", "scale_grid",
    "score", "task_vector_measures", "tune", "tune_method",
]
