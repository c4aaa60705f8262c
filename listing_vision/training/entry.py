"""The registry entry a trained model needs: its backend, the name that loads it, the threshold
calibrated on the validation data, and the serving settings of the model it started from."""

from __future__ import annotations

import json
from dataclasses import replace

from contract.registry import ModelSpec


def finetuned_spec(base: ModelSpec, model_id: str, name: str, threshold: float) -> ModelSpec:
    """`base` as served (templates, precision, batching, compile), pointing at the new model."""
    return replace(
        base,
        model_id=model_id,
        name=name,
        pretrained=None,
        threshold=threshold,
        description=f"{base.model_id} fine-tuned by listing-vision train",
        source="listing-vision train",
    )


def registry_entry(spec: ModelSpec) -> str:
    """The TOML table to add to `LV_MODELS_FILE` (strings quoted as TOML basic strings)."""
    default = ModelSpec(spec.model_id, spec.backend, spec.name)
    lines = [
        f"[models.{spec.model_id}]",
        f"backend = {_string(spec.backend)}",
        f"name = {_string(spec.name)}",
        f"threshold = {spec.threshold!r}",
    ]
    for key in ("batch_max_size", "batch_max_wait_ms", "pooling", "precision", "compile"):
        value = getattr(spec, key)
        if value != getattr(default, key):
            lines.append(f"{key} = {_string(value) if isinstance(value, str) else value}")
    if spec.prompt_templates:
        templates = ", ".join(_string(t) for t in spec.prompt_templates)
        lines.append(f"prompt_templates = [{templates}]")
    lines.append(f"description = {_string(spec.description)}")
    return "\n".join(lines) + "\n"


def _string(value: str) -> str:
    # JSON's escapes (\" \\ \n \uXXXX) are TOML's basic-string escapes too.
    return json.dumps(value)
