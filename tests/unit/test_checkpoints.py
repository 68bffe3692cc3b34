"""The tiny offline checkpoints: built without a network, loadable by transformers, rebuilt atomically."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import cast

import pytest

# Before transformers is imported: it reads these once. Nothing here may touch a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from services.worker import checkpoints
from services.worker.checkpoints import (
    BUILD_INFO_FILE,
    build_tiny_checkpoint,
    ensure_tiny_checkpoints,
    main,
)


def refuse_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the checkpoint build tried to open a network connection")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both tiny checkpoints, built once for the module with every socket connection refused."""
    directory = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse_network)
        patch.setattr(socket.socket, "connect_ex", refuse_network)
        patch.setattr(socket, "create_connection", refuse_network)
        ensure_tiny_checkpoints(directory, log=lambda line: None)
    return directory


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.iterdir())


def test_builds_both_checkpoints_as_complete_directories(models_dir: Path) -> None:
    for name in ("tiny-light", "tiny-heavy"):
        files = {file.name for file in (models_dir / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        assert BUILD_INFO_FILE in files
    # No staging or replaced directories are left behind.
    assert sorted(path.name for path in models_dir.iterdir()) == ["tiny-heavy", "tiny-light"]


@pytest.mark.parametrize(("name", "layers", "hidden"), [("tiny-light", 2, 64), ("tiny-heavy", 4, 128)])
def test_checkpoint_reloads_with_transformers(models_dir: Path, name: str, layers: int, hidden: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = models_dir / name
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)

    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (layers, hidden)
    assert model.config.vocab_size == len(tokenizer)
    assert 512 <= len(tokenizer) <= 1024
    assert directory_size(path) < 5 * 1024 * 1024
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert model.config.eos_token_id == tokenizer.eos_token_id

    with torch.inference_mode():
        logits = model(torch.tensor([tokenizer.encode("Hello there")])).logits
    assert logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_any_text(models_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-light", local_files_only=True)
    for text in ("The lighthouse stood at the end of the pier.", "héllo wörld 🌍 — 東京", "a\n\tb  c"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # Trained on English: common words are single tokens, so text is shorter in tokens than in bytes.
    sentence = "The train left the station and the water was cold."
    assert len(tokenizer.encode(sentence, add_special_tokens=False)) < len(sentence.encode()) / 2


def test_chat_template_writes_turns_and_generation_prompt(models_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny-light", local_files_only=True)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n"
        "<|assistant|>\nHello!<|eos|>\n<|user|>\nBye<|eos|>\n<|assistant|>\n"
    )
    without_prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    assert isinstance(without_prompt, str) and not without_prompt.endswith("<|assistant|>\n")
    # Role markers are single special tokens, which decoding with skip_special_tokens removes.
    ids = cast(list[int], tokenizer.apply_chat_template(conversation[:2], tokenize=True, return_dict=False))
    assert tokenizer.convert_tokens_to_ids("<|user|>") in ids
    assert "<|" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_build_info_describes_the_build(models_dir: Path) -> None:
    info = json.loads((models_dir / "tiny-heavy" / BUILD_INFO_FILE).read_text())
    assert info["size"] == "heavy"
    assert info["seed"] == 0
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["shape"]["num_hidden_layers"] == 4
    assert info["parameters"] > 0
    assert info["tokenizer"]["vocab_size"] >= 512


def test_ensure_is_idempotent(models_dir: Path) -> None:
    weights = models_dir / "tiny-light" / "model.safetensors"
    before = (weights.stat().st_mtime_ns, file_digest(weights))
    lines: list[str] = []

    paths = ensure_tiny_checkpoints(models_dir, log=lines.append)

    assert paths == [models_dir / "tiny-light", models_dir / "tiny-heavy"]
    assert (weights.stat().st_mtime_ns, file_digest(weights)) == before
    assert all("present" in line for line in lines) and len(lines) == 2


def test_ensure_builds_only_what_is_missing(tmp_path: Path, models_dir: Path) -> None:
    import shutil

    shutil.copytree(models_dir / "tiny-light", tmp_path / "tiny-light")
    lines: list[str] = []

    ensure_tiny_checkpoints(tmp_path, log=lines.append)

    assert any(line.startswith("tiny-light: present") for line in lines)
    assert any(line.startswith("tiny-heavy: building") for line in lines)
    assert (tmp_path / "tiny-heavy" / "config.json").is_file()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path: Path, models_dir: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", size="light", seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", size="light", seed=1)
    original = file_digest(models_dir / "tiny-light" / "model.safetensors")

    assert file_digest(again / "model.safetensors") == original
    assert file_digest(other / "model.safetensors") != original
    assert file_digest(again / "tokenizer.json") == file_digest(models_dir / "tiny-light" / "tokenizer.json")


def test_a_crash_mid_build_leaves_no_half_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash_after_partial_write(directory: Path, size: str, seed: int) -> dict:
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoints, "write_checkpoint", crash_after_partial_write)

    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_checkpoint(tmp_path / "tiny-light", size="light")
    assert list(tmp_path.iterdir()) == []


def test_a_crash_while_rebuilding_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_tiny_checkpoint(tmp_path / "tiny-light", size="light")
    before = file_digest(path / "model.safetensors")

    def crash(directory: Path, size: str, seed: int) -> dict:
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoints, "write_checkpoint", crash)
    with pytest.raises(RuntimeError):
        ensure_tiny_checkpoints(tmp_path, force=True, log=lambda line: None)

    assert file_digest(path / "model.safetensors") == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-light"]


def test_force_rebuilds_a_present_checkpoint(tmp_path: Path) -> None:
    path = build_tiny_checkpoint(tmp_path / "tiny-light", size="light", seed=1)
    seeded_one = file_digest(path / "model.safetensors")
    (path / "stray-file").write_text("from the old build")

    build_tiny_checkpoint(path, size="light", seed=0)

    assert file_digest(path / "model.safetensors") != seeded_one
    assert not (path / "stray-file").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-light"]


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint size"):
        build_tiny_checkpoint(tmp_path / "x", size="huge")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_command_line_builds_then_reports_present(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models-dir", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "tiny-light: building" in first and "tiny-heavy: built" in first

    assert main(["--models-dir", str(tmp_path)]) == 0
    second = capsys.readouterr().out
    assert "building" not in second and second.count("present") == 2


def test_command_line_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--models-dir" in capsys.readouterr().out
