"""The model registry: built-in entries plus `LV_MODELS_FILE`, as plain data (no torch here).

The producer reads it too, to refuse an unknown `--model` before anything is queued; the worker
turns an entry into a loaded backend (`worker.backends.create_backend`).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

# "sim" is for benchmarks only (a simulated accelerator); no built-in entry uses it.
Backend = Literal["open_clip", "hf_clip", "hf_siglip", "hf_dino", "sim"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
BUILTIN_FILE = Path(__file__).with_name("builtin_models.toml")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_KNOWN_KEYS = {
    "backend",
    "name",
    "pretrained",
    "threshold",
    "batch_max_size",
    "batch_max_wait_ms",
    "prompt_templates",
    "pooling",
    "precision",
    "compile",
    "description",
}
# torch.compile modes a registry entry may ask for its image tower ("off": eager, the default).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class RegistryError(ValueError):
    """A registry file or entry is invalid, or a model id is unknown."""


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to load a model and how to judge its scores."""

    model_id: str
    backend: Backend
    name: str
    pretrained: str | None = None
    threshold: float | None = None
    batch_max_size: int | None = None
    batch_max_wait_ms: int | None = None
    prompt_templates: tuple[str, ...] = ()
    pooling: str = "cls"
    precision: str = "auto"
    compile: str = "off"
    description: str = ""
    source: str = field(default="built-in", compare=False)


Registry = dict[str, ModelSpec]


def load_registry(models_file: Path | None = None) -> Registry:
    """Built-in entries, then `models_file`'s entries (same id replaces the built-in one)."""
    registry = _read_file(BUILTIN_FILE, "built-in")
    if models_file is not None:
        if not models_file.is_file():
            raise RegistryError(f"LV_MODELS_FILE {models_file} does not exist")
        registry.update(_read_file(models_file.resolve(), str(models_file.resolve())))
    return registry


def get_spec(registry: Registry, model_id: str) -> ModelSpec:
    """The entry for `model_id`, or a `RegistryError` listing the ids that exist."""
    try:
        return registry[model_id]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise RegistryError(f"unknown model {model_id!r}; the registry has: {known}") from None


def configured_spec(registry: Registry, model_id: str) -> ModelSpec:
    """The entry `LV_MODEL` names: an unknown id is a bad setting, and the error says which."""
    try:
        return get_spec(registry, model_id)
    except RegistryError as error:
        raise RegistryError(f"invalid setting LV_MODEL: {error}") from None


def _read_file(path: Path, source: str) -> dict[str, ModelSpec]:
    """Entries of one file; relative paths in it resolve against its folder."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise RegistryError(f"cannot read model registry {path}: {error}") from None
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise RegistryError(f"{path}: [models] must be a table of entries")
    return {
        model_id: _parse_entry(model_id, entry, source, path.parent)
        for model_id, entry in models.items()
    }


def _parse_entry(model_id: str, entry: Any, source: str, base: Path) -> ModelSpec:
    where = f"{source}: [models.{model_id}]"
    if not _MODEL_ID.match(model_id):
        raise RegistryError(f"{where}: id must be lowercase letters, digits, '.', '_' or '-'")
    if not isinstance(entry, dict):
        raise RegistryError(f"{where} must be a table")
    unknown = set(entry) - _KNOWN_KEYS
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)}")
    backend = entry.get("backend")
    if backend not in BACKENDS:
        raise RegistryError(f"{where}: backend must be one of {', '.join(BACKENDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{where}: name is required")
    pooling = entry.get("pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise RegistryError(f"{where}: pooling must be 'cls' or 'mean'")
    precision = entry.get("precision", "auto")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise RegistryError(f"{where}: precision must be auto, fp32, bf16 or fp16")
    compile_mode = _compile_mode(entry.get("compile", "off"), where)
    pretrained = entry.get("pretrained")
    if pretrained is not None and not isinstance(pretrained, str):
        raise RegistryError(f"{where}: pretrained must be a tag or a checkpoint path (a string)")
    templates = entry.get("prompt_templates", [])
    if not all(isinstance(t, str) and "{}" in t for t in templates):
        raise RegistryError(f"{where}: each prompt template must contain '{{}}'")
    return ModelSpec(
        model_id=model_id,
        backend=backend,
        name=_expand_local_dir(name, base),
        pretrained=_expand_checkpoint(pretrained, base),
        threshold=_optional_number(entry, "threshold", where, float),
        batch_max_size=_optional_number(entry, "batch_max_size", where, int),
        batch_max_wait_ms=_optional_number(entry, "batch_max_wait_ms", where, int),
        prompt_templates=tuple(templates),
        pooling=pooling,
        precision=precision,
        compile=compile_mode,
        description=str(entry.get("description", "")),
        source=source,
    )


def _compile_mode(value: Any, where: str) -> str:
    """`compile = true` is torch.compile's default mode, `false` none; or a mode by name."""
    if isinstance(value, bool):
        return "default" if value else "off"
    if value not in COMPILE_MODES:
        raise RegistryError(f"{where}: compile must be true, false or one of {COMPILE_MODES}")
    return str(value)


def _optional_number(entry: dict[str, Any], key: str, where: str, kind: type) -> Any:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RegistryError(f"{where}: {key} must be a number")
    if kind is int and (not isinstance(value, int) or value < 0):
        raise RegistryError(f"{where}: {key} must be a whole number >= 0")
    return kind(value)


def _expand_checkpoint(pretrained: str | None, base: Path) -> str | None:
    """A checkpoint path (not a tag) resolves against the registry file's folder."""
    if pretrained is None:
        return None
    if "/" not in pretrained and not pretrained.endswith(_CHECKPOINT_SUFFIXES):
        return pretrained  # an open_clip tag such as "openai"
    path = Path(pretrained).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _expand_local_dir(name: str, base: Path) -> str:
    """`local-dir:~/m` and relative paths resolve against the registry file's folder."""
    if not name.startswith("local-dir:"):
        return name
    path = Path(name.removeprefix("local-dir:")).expanduser()
    return f"local-dir:{path if path.is_absolute() else (base / path).resolve()}"
