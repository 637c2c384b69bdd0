"""Sampling defaults per model (pure data; read on the scheduler thread once the model is loaded).

A model that answers best away from the settings' general defaults has a row here, keyed by a
lower-case part of its file name. The service uses a row's values for the settings that no flag,
variable, file or option sets; a request's own values win over both. How the row of the built-in
model was measured: docs/sampling.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSampling:
    """A model's defaults; None leaves the setting's general default (`settings.MODEL_DEFAULTED`)."""

    temperature: float | None = None
    repeat_penalty: float | None = None

    def as_settings(self) -> dict[str, float]:
        return {name: value for name, value in asdict(self).items() if value is not None}


MODEL_SAMPLING: dict[str, ModelSampling] = {
    # Greedy: at any temperature it starts "L'Étoile…" instead of "The capital…" now and then (2 in
    # 20 even at 0.1). 1.05: at 1.0 it loops, at 1.1 it turns the lights on when asked to turn them off.
    "smollm2-135m": ModelSampling(temperature=0.0, repeat_penalty=1.05),
}


def model_sampling(model_name: str) -> ModelSampling:
    """The row whose key is part of `model_name` (case-insensitive), else no advice."""
    name = model_name.lower()
    return next((row for part, row in MODEL_SAMPLING.items() if part in name), ModelSampling())
