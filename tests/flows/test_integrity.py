"""No silent loss (issue 13): failed requests, damaged shards and bad input are caught, never recorded as done.

Every case runs the real CLI (`python -m commands run`) on the fake backend; bad input must exit 2 with one sentence
and leave the run directory exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ckptdpo.shards import read_manifest, read_stage
from tests.conftest import write_fake_recipe
from tests.flows.test_pipeline import PROBLEMS, SCRIPT

FAST_RETRIES = {"retries": 1, "retry_delay_s": [0.1]}


def run(recipe: Path, run_dir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "commands", "run", str(recipe), "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def hashes(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def recipe_of(tmp: Path, script: dict = SCRIPT, **sections) -> Path:
    resample = {"max_rounds": 2, "max_attempts": 4, "max_tokens": 100}
    return write_fake_recipe(tmp, script, PROBLEMS, resample=resample, task_runner=FAST_RETRIES, **sections)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run_dir) of one whole run; tests that change the run work on a copy."""
    tmp = tmp_path_factory.mktemp("integrity")
    recipe, run_dir = recipe_of(tmp), tmp / "run"
    r = run(recipe, run_dir)
    assert r.returncode == 0, r.stderr
    return recipe, run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def pair_ids(run_dir: Path) -> list[str]:
    return sorted(read_stage(run_dir / "pairs", ["pair_id"]).column("pair_id").to_pylist())


# --- failed requests fail the stage; the next run retries them -------------------------------------------------------


def test_failed_generation_requests_fail_the_stage_and_the_next_run_recovers(tmp_path: Path):
    # A problem the script does not know is a request error in the fake backend, every time it is asked.
    broken = {**SCRIPT, "problems": {"What is 2 + 3?": SCRIPT["problems"]["What is 2 + 3?"]}}
    recipe, run_dir = recipe_of(tmp_path, broken), tmp_path / "run"
    r = run(recipe, run_dir)
    assert r.returncode == 1 and "request(s) failed" in r.stderr, r.stderr
    assert read_manifest(run_dir / "generate") is None, "a stage with failed requests must not be recorded as done"
    # The "endpoint recovers" (a full script: for the fake backend also a new model fingerprint, so the stage is
    # recomputed): the pairs are those of a run that never failed.
    (tmp_path / "script.yaml").write_text(yaml.safe_dump(SCRIPT))
    r = run(recipe, run_dir)
    assert r.returncode == 0, r.stderr
    assert read_manifest(run_dir / "generate")["num_rows"] == 4
    clean = tmp_path / "clean"
    clean.mkdir()
    recipe_clean = recipe_of(clean)
    assert run(recipe_clean, clean / "run").returncode == 0
    assert pair_ids(run_dir) == pair_ids(clean / "run")


def test_a_failure_budget_tolerates_rows_lists_them_and_retries_them_next_run(tmp_path: Path):
    broken = {**SCRIPT, "problems": {"What is 2 + 3?": SCRIPT["problems"]["What is 2 + 3?"]}}
    recipe, run_dir = recipe_of(tmp_path, broken, failure_budget={"generate": 1}), tmp_path / "run"
    r = run(recipe, run_dir, "--stages", "generate")
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(run_dir / "generate")
    assert manifest["failed"] == [{"shard": "part-00001.parquet", "ids": ["p2"]}]
    assert manifest["num_rows"] == 2 and manifest["stats"]["failed_rows"] == 1
    (tmp_path / "script.yaml").write_text(yaml.safe_dump(SCRIPT))
    r = run(recipe, run_dir, "--stages", "generate")
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(run_dir / "generate")
    assert manifest["failed"] == [] and manifest["num_rows"] == 4


# --- damaged shards are detected and rewritten ----------------------------------------------------------------------


def test_a_deleted_pair_shard_is_rewritten_on_rerun(finished, tmp_path: Path):
    recipe, source = finished
    run_dir = copy_run(source, tmp_path)
    before = pair_ids(run_dir)
    (run_dir / "resample" / "pairs" / "part-00000.parquet").unlink()
    (run_dir / "pairs" / "part-00000.parquet").unlink()
    r = run(recipe, run_dir)
    assert r.returncode == 0, r.stderr
    assert "rewriting" in r.stderr
    assert pair_ids(run_dir) == before
    assert read_manifest(run_dir / "pairs")["num_rows"] == len(before)


def test_a_truncated_generate_shard_is_rewritten_and_nothing_downstream_changes(finished, tmp_path: Path):
    recipe, source = finished
    run_dir = copy_run(source, tmp_path)
    before = pair_ids(run_dir)
    shard = run_dir / "generate" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    r = run(recipe, run_dir)
    assert r.returncode == 0, r.stderr
    assert pair_ids(run_dir) == before
    assert read_manifest(run_dir / "generate")["num_rows"] == 4


def test_a_damaged_input_shard_of_a_stage_run_alone_is_one_sentence(finished, tmp_path: Path):
    recipe, source = finished
    run_dir = copy_run(source, tmp_path)
    shard = run_dir / "generate" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    (run_dir / "verify" / "_manifest.json").unlink()
    before = hashes(run_dir)
    r = run(recipe, run_dir, "--stages", "verify")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "part-00000.parquet" in r.stderr, r.stderr
    assert hashes(run_dir) == before


# --- bad input: exit 2, one sentence, nothing touched ----------------------------------------------------------------


def _bad_cases(tmp: Path, recipe: Path, run_dir: Path) -> list[tuple[str, Path, list[str], str]]:
    empty = tmp / "empty.yaml"
    empty.write_text("")
    empty_model = tmp / "empty-model"
    empty_model.mkdir()
    garbage_model = tmp / "garbage-model"
    garbage_model.mkdir()
    (garbage_model / "config.json").write_text("{not json")
    (garbage_model / "model.safetensors").write_bytes(b"\0" * 64)
    bad_script = tmp / "bad-script.yaml"
    bad_script.write_text("problems: [1, 2\n")
    hf = ["--set", "backend.kind=hf", "--set"]
    big = ["--set", "generate.num_samples=4096", "--set", "generate.max_tokens=1000000", "--set"]
    demo = ["--set", "problems.source=demo", "--set"]
    return [
        ("empty recipe", empty, [], "empty"),
        ("--stages ,", recipe, ["--stages", ","], "names no stage"),
        ("--set =3", recipe, ["--set", "=3"], "no key"),
        ("temperature 5", recipe, ["--set", "generate.temperature=5"], "temperature"),
        ("empty model dir", recipe, [*hf, f"backend.model={empty_model}"], "config.json"),
        ("garbage config.json", recipe, [*hf, f"backend.model={garbage_model}"], "config.json"),
        ("malformed fake script", recipe, ["--set", f"backend.script={bad_script}"], "bad-script.yaml"),
        ("--stages verify on a fresh directory", recipe, ["--stages", "verify"], "generate"),
        # issue 26: absurd sizes, settings that would do nothing, a stage named twice
        ("a billion samples", recipe, ["--set", "generate.num_samples=1000000000"], "generate.num_samples"),
        ("a shard of absurd planned text", recipe, [*big, "generate.shard_size=1000"], "generate.shard_size"),
        ("problems.path with the demo source", recipe, [*demo, "problems.path=p.jsonl"], "problems.path does nothing"),
        ("--stages generate,verify,generate", recipe, ["--stages", "generate,verify,generate"], "more than once"),
        ("--set on a stage not run", recipe, ["--stages", "generate", "--set", "dto.threshold=0.5"], "does nothing"),
    ]


def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(tmp_path: Path):
    recipe = recipe_of(tmp_path)
    for name, path, extra, needle in _bad_cases(tmp_path, recipe, tmp_path / "run"):
        run_dir = tmp_path / f"run-{abs(hash(name))}"
        r = run(path, run_dir, *extra, timeout=120)
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), (name, r.stderr)
        assert needle in r.stderr, (name, r.stderr)
        assert not run_dir.exists(), name


def test_damaged_manifest_or_stats_file_is_one_sentence(finished, tmp_path: Path):
    recipe, source = finished
    for damaged in ("verify/_manifest.json", "stats.json"):
        run_dir = copy_run(source, tmp_path / damaged.replace("/", "-"))
        (run_dir / damaged).write_text("{garbage")
        before = hashes(run_dir)
        r = run(recipe, run_dir)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and damaged.split("/")[-1] in r.stderr, r.stderr
        assert hashes(run_dir) == before


def test_a_judge_that_answers_nonsense_fails_the_stage(tmp_path: Path):
    from tests.flows.test_dto_flow import JUDGE, POLICY
    from tests.flows.test_dto_flow import PROBLEMS as DTO_PROBLEMS

    nonsense = {**JUDGE, "chat": [], "default_reply": "I like turtles."}
    recipe = write_fake_recipe(
        tmp_path,
        {**POLICY, **nonsense},
        DTO_PROBLEMS,
        stages=["generate", "verify", "checkpoints", "dto"],
        generate={"num_samples": 3, "max_tokens": 100, "shard_size": 1},
        dto={"threshold": 0.5},
        task_runner=FAST_RETRIES,
    )
    r = run(recipe, tmp_path / "run")
    assert r.returncode == 2 and "could not be parsed" in r.stderr, r.stderr
    assert read_manifest(tmp_path / "run" / "dto") is None


def test_a_second_run_into_a_held_run_directory_is_refused_and_touches_nothing(finished, tmp_path: Path):
    from tasks.rundir import run_dir_lock

    recipe, source = finished
    run_dir = copy_run(source, tmp_path)
    with run_dir_lock(run_dir):  # this test process plays the first run
        before = hashes(run_dir)
        r = run(recipe, run_dir)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"in use by pid {os.getpid()}" in r.stderr, r.stderr
        assert hashes(run_dir) == before
    r = run(recipe, run_dir)  # released (as it is when its holder dies): the next run goes ahead
    assert r.returncode == 0, r.stderr


# --- a flaky or absent OpenAI-compatible endpoint (the case as it was reported) --------------------------------------

ENDPOINT_SCRIPT = {
    "template": "<|user|>\n{message}\n<|assistant|>\n",
    "problems": {},
    "default_continuation": "Let me think.\n\nWait, it is 5.\n\nSo the answer is \\boxed{5}.",
}


def endpoint_recipe(tmp: Path, url: str) -> Path:
    backend = {"kind": "openai", "model": "served-model", "base_urls": [url], "max_retries": 3}
    return write_fake_recipe(
        tmp, None, PROBLEMS, stages=["generate", "verify"], backend=backend, task_runner=FAST_RETRIES
    )


def test_a_flaky_endpoint_loses_no_sample(tmp_path: Path):
    from ckptdpo.backends.fake import FakeBackend
    from tests.openai_server import OpenAIServer

    # Five 500s: the first request exhausts its retries (1 + 3), so its shard fails once and is retried.
    with OpenAIServer(FakeBackend(ENDPOINT_SCRIPT), fail_first=[500] * 5) as srv:
        r = run(endpoint_recipe(tmp_path, srv.base_url), tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "run" / "generate")["num_rows"] == 4  # 2 problems x 2 samples, none dropped


def test_an_endpoint_that_is_down_fails_the_run_and_the_rerun_after_it_recovers_completes(tmp_path: Path):
    import socket

    from ckptdpo.backends.fake import FakeBackend
    from tests.openai_server import OpenAIServer

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = endpoint_recipe(tmp_path, f"http://127.0.0.1:{port}/v1")
    r = run(recipe, tmp_path / "run", "--set", "backend.max_retries=0")
    assert r.returncode == 1 and "request(s) failed" in r.stderr, r.stderr
    assert read_manifest(tmp_path / "run" / "generate") is None
    with OpenAIServer(FakeBackend(ENDPOINT_SCRIPT)) as srv:
        recipe = endpoint_recipe(tmp_path, srv.base_url)
        r = run(recipe, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "run" / "generate")["num_rows"] == 4


# --- issue 26: manifests that point elsewhere, shards of another stage, replies that break the API ------------------


def forge_entry(stage: Path, index: int, name: str, source: Path) -> None:
    """List `name` as shard `index` of a stage's manifest with `source`'s size, sha256 and rows (a consistent edit)."""
    import json

    import pyarrow.parquet as pq

    manifest = json.loads((stage / "_manifest.json").read_text())
    data = source.read_bytes()
    manifest["shards"][index] = {
        "name": name,
        "num_rows": pq.ParquetFile(source).metadata.num_rows,
        "num_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (stage / "_manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_naming_a_file_outside_its_stage_is_damaged_and_the_stage_redone(finished, tmp_path: Path):
    recipe, source = finished
    run_dir = copy_run(source, tmp_path)
    before = pair_ids(run_dir)
    secret = tmp_path / "secret.parquet"  # run_dir/pairs/../../secret.parquet
    secret.write_bytes((run_dir / "pairs" / "part-00000.parquet").read_bytes())
    kept = secret.read_bytes()
    forge_entry(run_dir / "pairs", 0, "../../secret.parquet", secret)
    r = run(recipe, run_dir)
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr and "../../secret.parquet" in r.stderr, r.stderr
    names = [s["name"] for s in read_manifest(run_dir / "pairs")["shards"]]
    assert all("/" not in n for n in names) and (run_dir / "pairs" / names[0]).exists()
    assert pair_ids(run_dir) == before
    assert secret.read_bytes() == kept  # never read as a shard, never deleted


def test_a_shard_of_another_stage_with_its_entry_updated_is_rewritten(finished, tmp_path: Path):
    recipe, source = finished
    run_dir = copy_run(source, tmp_path)
    before, verdicts = pair_ids(run_dir), (run_dir / "verify" / "part-00000.parquet").read_bytes()
    shard = run_dir / "verify" / "part-00000.parquet"
    shard.write_bytes((run_dir / "generate" / "part-00000.parquet").read_bytes())
    forge_entry(run_dir / "verify", 0, "part-00000.parquet", shard)
    r = run(recipe, run_dir)
    assert r.returncode == 0, r.stderr
    assert "part-00000.parquet" in r.stderr and "columns" in r.stderr, r.stderr  # named, with the reason
    assert shard.read_bytes() == verdicts and pair_ids(run_dir) == before
    # Run alone, a stage that reads such a shard says which file, and how to rewrite it, in one sentence.
    shard.write_bytes((run_dir / "generate" / "part-00000.parquet").read_bytes())
    forge_entry(run_dir / "verify", 0, "part-00000.parquet", shard)
    (run_dir / "checkpoints" / "_manifest.json").unlink()
    r = run(recipe, run_dir, "--stages", "checkpoints")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "verify/part-00000.parquet" in r.stderr and "add verify to --stages" in r.stderr, r.stderr


def _serve_broken(tmp_path: Path, hook, *extra: str) -> subprocess.CompletedProcess:
    from ckptdpo.backends.fake import FakeBackend
    from tests.openai_server import OpenAIServer

    with OpenAIServer(FakeBackend(ENDPOINT_SCRIPT), reply_hook=hook) as srv:
        r = run(endpoint_recipe(tmp_path, srv.base_url), tmp_path / "run", "--set", "backend.max_retries=0", *extra)
        r.url = srv.base_url
    return r


def test_a_null_text_fails_the_stage_naming_the_field_and_the_server(tmp_path: Path):
    def null_text(body: dict, reply: dict) -> dict:
        for c in reply["choices"]:
            c["text"] = None
        return reply

    r = _serve_broken(tmp_path, null_text)
    assert r.returncode == 1 and "choices[0].text" in r.stderr and r.url in r.stderr, r.stderr
    assert read_manifest(tmp_path / "run" / "generate") is None


def test_a_negative_token_count_fails_the_stage_instead_of_being_stored(tmp_path: Path):
    def negative(body: dict, reply: dict) -> dict:
        reply["usage"]["prompt_tokens"] = -5
        return reply

    r = _serve_broken(tmp_path, negative)
    assert r.returncode == 1 and "usage.prompt_tokens" in r.stderr and "-5" in r.stderr, r.stderr
    assert read_manifest(tmp_path / "run" / "generate") is None


def test_fewer_choices_than_asked_fail_the_shard_with_the_reason_after_the_colon(tmp_path: Path):
    import re

    def one_fewer(body: dict, reply: dict) -> dict:
        return {**reply, "choices": reply["choices"][: body["n"] - 1]}

    r = _serve_broken(tmp_path, one_fewer)
    assert r.returncode == 1, r.stderr
    reason = re.search(r"request\(s\) failed \(failure budget 0\): (\S.*)", r.stderr)
    assert reason and "choice" in reason.group(1), r.stderr


# --- a full disk: one line, no temporary file left, and the rerun after freeing space completes --------------------


def _mount_namespace() -> list[str] | None:
    """A command prefix giving a private mount namespace where a tmpfs can be mounted (root, or a user namespace)."""
    import shutil

    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_a_full_disk_fails_in_one_line_leaves_no_temporary_file_and_the_rerun_completes(tmp_path: Path):
    """The run directory on a 2 MB tmpfs, filled after the second generate shard: the real write path hits ENOSPC."""
    prefix = _mount_namespace()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs root or user namespaces)")
    script = {**SCRIPT, "problems": dict(SCRIPT["problems"]), "delay_s": 0.3}
    problems = list(PROBLEMS)
    for i in range(20):
        script["problems"][f"Copy {i}: what is 2 + 3?"] = {"samples": SCRIPT["problems"]["What is 2 + 3?"]["samples"]}
        problems.append({"id": f"c{i}", "problem": f"Copy {i}: what is 2 + 3?", "answer": "5"})
    recipe = write_fake_recipe(tmp_path, script, problems, stages=["generate", "verify"])
    reference = tmp_path / "reference"
    assert run(recipe, reference).returncode == 0
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    cli = f"{sys.executable} -m commands run {recipe} --run-dir {disk}/run"
    steps = f"""
        mount -t tmpfs -o size=2m tmpfs {disk}
        {cli} --set task_runner.retries=0 > {out}/first.txt 2>&1 &
        pid=$!
        while [ ! -e {disk}/run/generate/part-00001.parquet ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
        dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null
        wait $pid; echo $? > {out}/first.rc
        ls -aR {disk}/run > {out}/first.ls
        rm {disk}/filler
        {cli} > {out}/second.txt 2>&1; echo $? > {out}/second.rc
        ls -aR {disk}/run > {out}/second.ls
        cp -r {disk}/run {out}/run
    """
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    subprocess.run([*prefix, "bash", "-c", steps], env=env, timeout=900, check=True)
    first = (out / "first.txt").read_text()
    assert (out / "first.rc").read_text().strip() == "1", first
    last = first.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device writing ") and ".parquet" in last, first
    assert "Traceback" not in first, first  # the traceback only with -v
    assert ".tmp-" not in (out / "first.ls").read_text()  # the failed write removed its temporary file
    assert read_manifest(out / "run" / "generate") is not None
    assert (out / "second.rc").read_text().strip() == "0", (out / "second.txt").read_text()
    assert ".tmp-" not in (out / "second.ls").read_text()
    for stage in ("generate", "verify"):
        got = [s["sha256"] for s in read_manifest(out / "run" / stage)["shards"]]
        assert got == [s["sha256"] for s in read_manifest(reference / stage)["shards"]], stage
