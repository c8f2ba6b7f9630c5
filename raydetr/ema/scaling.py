"""EMA batch-size scaling (Busbridge et al. 2023, "How to Scale Your EMA").

An EMA with per-step decay d keeps weight d**n on the model of n steps ago. With an effective
batch k times the reference batch, one step sees k times the images, so the decay that keeps the
same weight on the model of N images ago is d**k: (d**k)**(N / (k B)) = d**(N / B). The warmup
length tau (in updates) shrinks by the same k so it also spans the same number of images.

    s = scale_for_batch([0.993], tau=100, effective_batch=16, reference_batch=8)
    s.decays == [0.993**2]; s.tau == 50.0; s.describe() -> the log line's text
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from raydetr.ema.shadow import Shadow


@dataclass(frozen=True)
class EmaScaling:
    decays: list[float]  # per-step decays the run uses, in the order of the configured ones
    tau: float  # warmup length in optimizer updates the run uses
    k: float  # effective batch / reference batch (1.0: no scaling)
    configured: list[float]
    effective_batch: int
    reference_batch: int | None

    def shadows(self) -> list[Shadow]:
        """One typed identity per configured decay (configured and effective decay)."""
        return [Shadow(i, c, e) for i, (c, e) in enumerate(zip(self.configured, self.decays))]

    def describe(self) -> str:
        if self.reference_batch is None:
            return f"EMA decays {self.decays} (ema.reference_batch unset: not scaled)"
        return (
            f"EMA decays {[round(d, 8) for d in self.decays]}, tau {self.tau:g}: configured "
            f"{self.configured} for reference batch {self.reference_batch}, scaled by "
            f"k = {self.effective_batch}/{self.reference_batch} = {self.k:g} (decay**k, tau/k)"
        )


def scale_for_batch(decays: Sequence[float], tau: float, effective_batch: int,
                    reference_batch: int | None) -> EmaScaling:
    """Decays and tau for ``effective_batch`` given values meant for ``reference_batch``."""
    configured = [float(d) for d in decays]
    if effective_batch < 1:
        raise ValueError(f"effective batch must be >= 1, got {effective_batch}")
    if reference_batch is None:
        return EmaScaling(configured, float(tau), 1.0, configured, effective_batch, None)
    if reference_batch < 1:
        raise ValueError(f"ema.reference_batch must be >= 1, got {reference_batch}")
    k = effective_batch / reference_batch
    return EmaScaling([d**k for d in configured], float(tau) / k, k, configured,
                      effective_batch, int(reference_batch))
