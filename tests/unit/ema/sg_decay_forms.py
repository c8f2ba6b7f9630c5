"""SuperGradients' custom EMA decay forms exactly as its documentation writes them (EMA.md,
"Adding your own decay schedule"), plus its ExpDecay and ThresholdDecay shapes, used by
test_ema_schedules_sg.py and tests/integration/test_train.py by import path
(``sg_decay_forms:LinearDecay`` with this folder on sys.path). Nothing here imports super_gradients."""

import math


class LinearDecay:  # SuperGradients' documentation: subclass of IDecayFunction, built with **kwargs
    def __init__(self, **kwargs):
        pass

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        training_progress = step / total_steps
        return decay * training_progress


class ExpDecay:  # SuperGradients' ExpDecay shape: an option in __init__, the rest in **kwargs
    def __init__(self, beta: float, **kwargs):
        self.beta = beta

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        return decay * (1 - math.exp(-step / total_steps * self.beta))


def linear(decay, step, total_steps):
    """The same linear ramp as a plain function of (decay, step, total_steps)."""
    return decay * step / total_steps


def threshold(decay, step, total_steps):
    """SuperGradients' ThresholdDecay as a plain function."""
    return min(decay, (1 + step) / (10 + step))
