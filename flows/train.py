"""The train flow: resolve the base model and the pair stages, then one training task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ckptdpo.errors import UserError
from ckptdpo.models import resolve_model
from ckptdpo.shards import read_manifest, stage_fingerprint
from tasks.common import load_recipe, stage_dir
from tasks.environment import ckptdpo_home, hub_offline
from tasks.rundir import holds_run_dir
from tasks.train import train_model

# `<run_dir>/pairs` is the union of every pair-producing stage (resample, dto).
PAIR_STAGES = ("pairs",)


def resolve_accelerate_config(path: str, recipe_path: str) -> str:
    """An accelerate config path as given, else relative to the recipe's folder, else relative to the recipes/ root."""
    recipe_dir = Path(recipe_path).resolve().parent
    for candidate in (Path(path).expanduser(), recipe_dir / path, recipe_dir.parent / path):
        if candidate.is_file():
            return str(candidate.resolve())
    raise UserError(f"{recipe_path}: train.accelerate_config '{path}' not found; give a path to an accelerate YAML.")


@flow(name="train", flow_run_name="train {run_dir}", timeout_seconds=14 * 24 * 3600)
@holds_run_dir
def train_flow(recipe_path: str, run_dir: str, overrides: dict[str, Any] | None = None) -> dict:
    """DPO / SimPO on `<run_dir>/pairs` -> `<run_dir>/train/model` and the train section of stats.json."""
    recipe = load_recipe(recipe_path, overrides)
    get_run_logger().info("train of recipe %s, config hash %s", recipe.name, recipe.config_hash("train"))
    model = resolve_model(recipe.backend.model, ckptdpo_home(), offline=hub_offline())
    train = recipe.train
    if train.accelerate_config:
        train = train.model_copy(
            update={"accelerate_config": resolve_accelerate_config(train.accelerate_config, recipe_path)}
        )
    pairs_dirs = [str(stage_dir(run_dir, s)) for s in PAIR_STAGES]
    if not any((read_manifest(d) or {}).get("num_rows") for d in pairs_dirs):
        raise UserError(
            f"{run_dir}/pairs: this run made no preference pairs, so there is nothing to train on; generate more "
            "problems or samples, or raise generate.max_tokens / resample.max_tokens so answers get finished."
        )
    fingerprints = {s: stage_fingerprint(d) for s, d in zip(PAIR_STAGES, pairs_dirs, strict=True)}
    return train_model(run_dir, train, model, pairs_dirs, fingerprints)
