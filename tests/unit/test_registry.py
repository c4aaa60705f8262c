"""contract.registry: the built-in seed models, LV_MODELS_FILE entries and their errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from contract.broker import model_queue
from contract.registry import (
    BACKENDS,
    ModelSpec,
    RegistryError,
    configured_spec,
    get_spec,
    load_registry,
)

# (backend, name, pretrained) of each seed model named in SPEC.md
SEED_MODELS = {
    ("open_clip", "ViT-B-32", "openai"),
    ("open_clip", "ViT-H-14-378-quickgelu", "dfn5b"),
    ("open_clip", "hf-hub:timm/PE-Core-bigG-14-448", None),
    ("open_clip", "hf-hub:timm/ViT-gopt-16-SigLIP2-384", None),
    ("hf_clip", "openai/clip-vit-base-patch32", None),
    ("hf_clip", "openai/clip-vit-large-patch14", None),
    ("hf_dino", "facebook/dinov2-base", None),
    ("hf_dino", "facebook/dinov2-large", None),
}


def write_models(tmp_path: Path, toml: str, name: str = "models.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(toml), encoding="utf-8")
    return path


def registry_error(tmp_path: Path, toml: str) -> str:
    path = write_models(tmp_path, toml)
    with pytest.raises(RegistryError) as caught:
        load_registry(path)
    return str(caught.value)


# --- built-in entries ------------------------------------------------------------------------


def test_the_eight_seed_models_are_built_in() -> None:
    registry = load_registry()

    found = {(spec.backend, spec.name, spec.pretrained) for spec in registry.values()}
    assert found >= SEED_MODELS
    assert len(registry) >= 8


def test_builtin_entries_are_keyed_by_their_own_id() -> None:
    registry = load_registry()

    assert all(model_id == spec.model_id for model_id, spec in registry.items())
    assert all(spec.source == "built-in" for spec in registry.values())


def test_builtin_models_with_a_text_encoder_have_a_threshold() -> None:
    registry = load_registry()

    for spec in registry.values():
        if spec.backend != "hf_dino":
            assert spec.threshold is not None, spec.model_id


def test_the_default_model_is_clip_vit_b32_from_openai() -> None:
    spec = get_spec(load_registry(), "clip-vit-b32")

    assert (spec.backend, spec.name, spec.pretrained) == ("open_clip", "ViT-B-32", "openai")
    assert spec.threshold == 0.25


def test_the_queue_is_lv_dot_model_id() -> None:
    assert model_queue("dinov2-base") == "lv.dinov2-base"
    assert model_queue("x.y") == "lv.x.y"


# --- get_spec --------------------------------------------------------------------------------


def test_get_spec_for_an_unknown_id_lists_the_known_ids() -> None:
    registry = load_registry()

    with pytest.raises(RegistryError) as caught:
        get_spec(registry, "no-such-model")

    message = str(caught.value)
    assert "'no-such-model'" in message
    for model_id in registry:
        assert model_id in message


# --- LV_MODELS_FILE --------------------------------------------------------------------------


def test_a_models_file_adds_entries_to_the_builtin_ones(tmp_path: Path) -> None:
    path = write_models(
        tmp_path,
        """
        [models.my-clip]
        backend = "open_clip"
        name = "ViT-B-16"
        pretrained = "/ckpt/epoch_3.pt"
        threshold = 0.3
        batch_max_size = 32
        batch_max_wait_ms = 5
        prompt_templates = ["a photo of {}", "{} for sale"]
        precision = "fp16"
        description = "fine-tuned"
        """,
    )

    registry = load_registry(path)

    spec = get_spec(registry, "my-clip")
    assert spec == ModelSpec(
        model_id="my-clip",
        backend="open_clip",
        name="ViT-B-16",
        pretrained="/ckpt/epoch_3.pt",
        threshold=0.3,
        batch_max_size=32,
        batch_max_wait_ms=5,
        prompt_templates=("a photo of {}", "{} for sale"),
        precision="fp16",
        description="fine-tuned",
    )
    assert spec.source == str(path)
    assert "clip-vit-b32" in registry


def test_a_models_file_entry_overrides_the_builtin_of_the_same_id(tmp_path: Path) -> None:
    path = write_models(
        tmp_path,
        """
        [models.clip-vit-b32]
        backend = "hf_clip"
        name = "openai/clip-vit-base-patch32"
        threshold = 0.3
        """,
    )

    spec = get_spec(load_registry(path), "clip-vit-b32")

    assert (spec.backend, spec.threshold, spec.pretrained) == ("hf_clip", 0.3, None)
    assert spec.source == str(path)


def test_an_entry_gets_the_documented_defaults(tmp_path: Path) -> None:
    path = write_models(tmp_path, '[models.m]\nbackend = "hf_dino"\nname = "dino"\n')

    spec = get_spec(load_registry(path), "m")

    assert spec.pooling == "cls"
    assert spec.precision == "auto"
    assert spec.compile == "off"
    assert spec.prompt_templates == ()
    assert (spec.threshold, spec.batch_max_size, spec.batch_max_wait_ms) == (None, None, None)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("true", "default"), ("false", "off"), ('"reduce-overhead"', "reduce-overhead")],
)
def test_compile_is_a_switch_or_a_torch_compile_mode(tmp_path: Path, value: str, mode: str) -> None:
    entry = f'[models.m]\nbackend = "hf_dino"\nname = "dino"\ncompile = {value}\n'

    assert get_spec(load_registry(write_models(tmp_path, entry)), "m").compile == mode


def test_an_unknown_compile_mode_is_refused_with_the_modes(tmp_path: Path) -> None:
    message = registry_error(
        tmp_path, '[models.m]\nbackend = "hf_dino"\nname = "dino"\ncompile = "fast"\n'
    )

    assert "[models.m]" in message and "compile must be" in message and "max-autotune" in message


def test_an_integer_threshold_becomes_a_float(tmp_path: Path) -> None:
    path = write_models(tmp_path, '[models.m]\nbackend = "hf_clip"\nname = "n"\nthreshold = 1\n')

    threshold = get_spec(load_registry(path), "m").threshold

    assert threshold == 1.0
    assert isinstance(threshold, float)


def test_a_missing_models_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(RegistryError, match=r"nope\.toml"):
        load_registry(missing)


def test_a_models_file_that_is_not_toml_is_an_error_naming_it(tmp_path: Path) -> None:
    message = registry_error(tmp_path, "[models.m\nbackend = ")

    assert "models.toml" in message


def test_models_that_is_not_a_table_is_an_error(tmp_path: Path) -> None:
    assert "[models]" in registry_error(tmp_path, 'models = "clip"\n')


def test_relative_local_dir_resolves_against_the_files_folder(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    path = write_models(
        config,
        """
        [models.local]
        backend = "hf_clip"
        name = "local-dir:weights/clip"
        """,
    )

    assert get_spec(load_registry(path), "local").name == f"local-dir:{config / 'weights/clip'}"


def test_absolute_local_dir_is_kept(tmp_path: Path) -> None:
    path = write_models(tmp_path, '[models.m]\nbackend = "hf_clip"\nname = "local-dir:/w/c"\n')

    assert get_spec(load_registry(path), "m").name == "local-dir:/w/c"


def test_local_dir_expands_the_user_directory(tmp_path: Path) -> None:
    path = write_models(tmp_path, '[models.m]\nbackend = "hf_clip"\nname = "local-dir:~/w"\n')

    assert get_spec(load_registry(path), "m").name == f"local-dir:{Path.home() / 'w'}"


def test_relative_local_dir_in_a_relative_models_file_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_models(tmp_path, '[models.m]\nbackend = "hf_clip"\nname = "local-dir:weights"\n')
    monkeypatch.chdir(tmp_path)

    name = get_spec(load_registry(Path("models.toml")), "m").name

    assert name == f"local-dir:{tmp_path / 'weights'}"


def test_non_local_names_are_kept_verbatim(tmp_path: Path) -> None:
    path = write_models(
        tmp_path, '[models.m]\nbackend = "open_clip"\nname = "hf-hub:timm/some-model"\n'
    )

    assert get_spec(load_registry(path), "m").name == "hf-hub:timm/some-model"


# --- invalid entries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "entry", "complaint"),
    [
        ('[models."Bad_ID"]\nbackend = "hf_clip"\nname = "n"\n', "Bad_ID", "id must be"),
        ('[models."has space"]\nbackend = "hf_clip"\nname = "n"\n', "has space", "id must be"),
        ('[models."-lead"]\nbackend = "hf_clip"\nname = "n"\n', "-lead", "id must be"),
        ('[models.m]\nbackend = "tensorflow"\nname = "n"\n', "m", "backend must be one of"),
        ('[models.m]\nname = "n"\n', "m", "backend must be one of"),
        ('[models.m]\nbackend = "hf_clip"\nname = "n"\ncolour = 1\n', "m", "unknown keys"),
        ('[models.m]\nbackend = "hf_clip"\n', "m", "name is required"),
        ('[models.m]\nbackend = "hf_clip"\nname = ""\n', "m", "name is required"),
        ('[models.m]\nbackend = "hf_clip"\nname = 5\n', "m", "name is required"),
        ('[models.m]\nbackend = "hf_dino"\nname = "n"\npooling = "max"\n', "m", "pooling"),
        ('[models.m]\nbackend = "hf_clip"\nname = "n"\nprecision = "int8"\n', "m", "precision"),
        (
            '[models.m]\nbackend = "hf_clip"\nname = "n"\nprompt_templates = ["a photo"]\n',
            "m",
            "'{}'",
        ),
        (
            '[models.m]\nbackend = "hf_clip"\nname = "n"\nprompt_templates = ["{}", 3]\n',
            "m",
            "'{}'",
        ),
        ('[models.m]\nbackend = "hf_clip"\nname = "n"\nthreshold = "0.3"\n', "m", "number"),
        ('[models.m]\nbackend = "hf_clip"\nname = "n"\nthreshold = true\n', "m", "number"),
        ('[models.m]\nbackend = "hf_clip"\nname = "n"\nbatch_max_size = 1.5\n', "m", "whole"),
        ('[models.m]\nbackend = "hf_clip"\nname = "n"\nbatch_max_wait_ms = -1\n', "m", "whole"),
        ('[models]\nm = "hf_clip"\n', "m", "must be a table"),
    ],
    ids=[
        "uppercase-id",
        "space-in-id",
        "leading-dash-id",
        "unknown-backend",
        "missing-backend",
        "unknown-key",
        "missing-name",
        "empty-name",
        "name-not-a-string",
        "bad-pooling",
        "bad-precision",
        "template-without-braces",
        "template-not-a-string",
        "threshold-string",
        "threshold-bool",
        "batch-size-float",
        "batch-wait-negative",
        "entry-not-a-table",
    ],
)
def test_an_invalid_entry_raises_registry_error_naming_it(
    tmp_path: Path, toml: str, entry: str, complaint: str
) -> None:
    message = registry_error(tmp_path, toml)

    assert f"[models.{entry}]" in message
    assert "models.toml" in message
    assert complaint in message


def test_the_unknown_backend_error_lists_the_backends(tmp_path: Path) -> None:
    message = registry_error(tmp_path, '[models.m]\nbackend = "onnx"\nname = "n"\n')

    for backend in BACKENDS:
        assert backend in message


def test_the_unknown_key_error_names_the_key(tmp_path: Path) -> None:
    message = registry_error(tmp_path, '[models.m]\nbackend = "hf_clip"\nname = "n"\nthresold=1\n')

    assert "thresold" in message


def test_one_bad_entry_fails_the_whole_file(tmp_path: Path) -> None:
    message = registry_error(
        tmp_path,
        """
        [models.good]
        backend = "hf_clip"
        name = "n"

        [models.bad]
        backend = "hf_clip"
        """,
    )

    assert "[models.bad]" in message


@pytest.mark.parametrize("value", ["5", "true", '["openai"]'])
def test_a_pretrained_that_is_not_a_string_is_refused(tmp_path: Path, value: str) -> None:
    message = registry_error(
        tmp_path, f'[models.m]\nbackend = "open_clip"\nname = "ViT-B-32"\npretrained = {value}\n'
    )

    assert "[models.m]" in message
    assert "pretrained" in message


def pretrained_in_file(folder: Path, pretrained: str) -> str | None:
    path = write_models(
        folder,
        f'[models.m]\nbackend = "open_clip"\nname = "ViT-B-32"\npretrained = "{pretrained}"\n',
    )
    return get_spec(load_registry(path), "m").pretrained


def test_a_pretrained_tag_is_kept(tmp_path: Path) -> None:
    assert pretrained_in_file(tmp_path, "laion2b_s34b_b79k") == "laion2b_s34b_b79k"


def test_a_relative_checkpoint_path_resolves_against_the_files_folder(tmp_path: Path) -> None:
    assert pretrained_in_file(tmp_path, "ckpt/epoch_3.pt") == str(tmp_path / "ckpt/epoch_3.pt")


def test_an_absolute_checkpoint_path_is_kept(tmp_path: Path) -> None:
    assert pretrained_in_file(tmp_path, "/ckpt/epoch_3.pt") == "/ckpt/epoch_3.pt"


def test_a_checkpoint_path_expands_the_user_directory(tmp_path: Path) -> None:
    assert pretrained_in_file(tmp_path, "~/ckpt/e.pt") == str(Path.home() / "ckpt/e.pt")


def test_a_bare_checkpoint_file_name_resolves_against_the_files_folder(tmp_path: Path) -> None:
    assert pretrained_in_file(tmp_path, "epoch_3.pt") == str(tmp_path / "epoch_3.pt")


def test_an_unknown_lv_model_is_a_bad_setting_that_names_it() -> None:
    registry = load_registry()

    with pytest.raises(RegistryError) as caught:
        configured_spec(registry, "clip-vit-b23")

    message = str(caught.value)
    assert message.startswith("invalid setting LV_MODEL: unknown model 'clip-vit-b23'")
    assert "clip-vit-b32" in message  # what the operator could have meant
    assert configured_spec(registry, "lv-toy").model_id == "lv-toy"
