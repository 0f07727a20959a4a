"""The Docker images and the compose stack, checked statically (no Docker engine on these machines): each image
installs the extras and entry point that pyproject and the README promise, copies only what exists and is not
ignored, and the compose services point at existing Dockerfiles and at the work pools of deployments/prefect.yaml.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Which extras each image is for, and the package that extra must bring (what the README's layout promises:
# "CPU demo, GPU generation (vLLM), GPU training (DeepSpeed)").
IMAGES = {
    "Dockerfile.cpu": ({"train"}, None),
    "Dockerfile.gpu-vllm": ({"gpu"}, "vllm"),
    "Dockerfile.train": ({"train"}, "deepspeed"),
}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# vLLM's own server image: vLLM 0.33 cannot share an environment with Prefect 3.8, so it never installs the project.
SERVER_IMAGE = "Dockerfile.vllm-server"
VLLM_SERVER_BASE = "vllm/vllm-openai:v0.33.0"
SERVE_RECIPE = REPO / "recipes" / "r1-distill-qwen-1.5b" / "deepscaler-serve.yaml"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        op, _, args = buf.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    return out


def pip_installs(steps: list[tuple[str, str]]) -> list[tuple[int, list[str]]]:
    """(step index, arguments) of every `pip install` inside RUN steps."""
    found = []
    for i, (op, args) in enumerate(steps):
        if op != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if len(words) >= 2 and words[0] in ("pip", "pip3") and words[1] == "install":
                found.append((i, words[2:]))
    return found


def project_install(steps) -> tuple[int, set[str]]:
    """The step that installs the project itself (`pip install .[extras]`) and its extras."""
    for i, words in pip_installs(steps):
        for w in words:
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", w)
            if m:
                return i, set(filter(None, (m.group(1) or "").split(",")))
    raise AssertionError("the image never installs the project (`pip install .[...]`)")


def dockerignored(rel: str) -> bool:
    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(pre, pat.removeprefix("**/")) or fnmatch.fnmatch(pre, pat)
        for pre in prefixes
        for pat in patterns
    )


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_installs_its_extras_and_the_entry_point(name: str):
    steps = instructions(DOCKER / name)
    extras_wanted, brings = IMAGES[name]
    index, extras = project_install(steps)
    declared = PYPROJECT["project"]["optional-dependencies"]
    assert extras == extras_wanted and extras <= set(declared), f"{name} installs .[{','.join(sorted(extras))}]"
    if brings:
        assert any(dep.startswith(brings) for e in extras for dep in declared[e]), f"{name}: no {brings} in its extras"

    # Everything setuptools packages (pyproject's packages.find) is copied in before the project is installed.
    copied_before = {src for op, a in steps[:index] if op == "COPY" for src in shlex.split(a)[:-1]}
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert any(fnmatch.fnmatch(c, pattern) for c in copied_before), f"{name} installs before copying {pattern}"
    assert {"pyproject.toml", "README.md"} <= copied_before  # setuptools reads both
    for op, args in steps:
        if op == "COPY":
            for src in shlex.split(args)[:-1]:
                assert (REPO / src).exists(), f"{name} copies {src}, which does not exist"
                assert not dockerignored(src), f"{name} copies {src}, which .dockerignore leaves out of the context"

    # The console script pyproject declares is what the image runs, and the build checks that it is installed.
    (script,) = PYPROJECT["project"]["scripts"]
    entry = [json.loads(a) for op, a in steps if op == "ENTRYPOINT"]
    assert entry == [[script]], f"{name} must use the `{script}` entry point"
    assert any(op == "RUN" and f"{script} --help" in a for op, a in steps[index:])
    (cmd,) = [json.loads(a) for op, a in steps if op == "CMD"]
    from commands.cli import make_parser

    make_parser().parse_args(cmd)  # the default command is one the CLI accepts (SystemExit otherwise)
    if "--stages" in cmd:
        from ckptdpo.configs import STAGES

        assert set(cmd[cmd.index("--stages") + 1].split(",")) <= set(STAGES)
    for arg in cmd:
        if arg.startswith("recipes/"):
            assert (REPO / arg).is_file(), f"{name} runs {arg}, which does not exist"


def test_cpu_image_installs_cpu_torch_first_and_gpu_images_do_not():
    makefile_pin = re.search(r"pip install (?:-q )?(torch==[\d.]+)", (REPO / "Makefile").read_text()).group(1)
    steps = instructions(DOCKER / "Dockerfile.cpu")
    project, _ = project_install(steps)
    torch_steps = [(i, w) for i, w in pip_installs(steps) if makefile_pin in w]
    first, words = torch_steps[0]
    assert first < project and CPU_INDEX in words, "the CPU image must install the CPU torch wheel before the project"
    # The project install repeats the pin, so no dependency can swap in another (CUDA) torch.
    assert any(i == project and makefile_pin in w for i, w in pip_installs(steps))
    for name in ("Dockerfile.gpu-vllm", "Dockerfile.train"):
        assert CPU_INDEX not in (DOCKER / name).read_text(), f"{name} must not install the CPU build of torch"


def test_dockerignore_keeps_what_the_images_need_and_drops_the_rest():
    for needed in ("pyproject.toml", "README.md", "commands/cli.py", "flows/pipeline.py", "tasks/planning.py",
                   "deployments/prefect.yaml", "recipes/demo.yaml"):  # fmt: skip
        assert not dockerignored(needed), needed
    for dropped in (".git", ".venv/bin/python", "runs/demo/pairs/part-00000.parquet", "tests/flows/test_ops.py",
                    "ckptdpo/__pycache__/cli.cpython-311.pyc", ".prefect/prefect.db"):  # fmt: skip
        assert dockerignored(dropped), dropped


def test_compose_builds_existing_images_and_serves_the_deployments_pools():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    built = {}
    for name, svc in services.items():
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == REPO, f"{name}: the build context must be the repository root"
            assert (context / svc["build"]["dockerfile"]).is_file(), f"{name}: no {svc['build']['dockerfile']}"
            built[svc["image"]] = svc["build"]["dockerfile"]
    assert set(built.values()) == {f"docker/{n}" for n in [*IMAGES, SERVER_IMAGE]}, "every image in docker/ is built"
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image in built or not image.startswith("ckptdpo:"), f"{name} uses {image}, which nothing builds"

    # The server runs on Postgres, published on loopback only.
    server = services["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert all(str(p).startswith("127.0.0.1:") for p in server["ports"])

    # Workers serve exactly the pools and queues deployments/prefect.yaml uses; the GPU ones ask for GPUs.
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    used = {(d["work_pool"]["name"], d["work_pool"].get("work_queue_name") or "default") for d in spec["deployments"]}
    served = set()
    for svc in services.values():
        cmd = svc.get("entrypoint", [])
        if cmd[:3] != ["prefect", "worker", "start"]:
            continue
        pool = cmd[cmd.index("--pool") + 1]
        queue = cmd[cmd.index("--work-queue") + 1] if "--work-queue" in cmd else None
        served |= {(p, q) for p, q in used if p == pool and queue in (None, q)}
        assert svc["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert svc["environment"]["CKPTDPO_REPO"] == "/app", "the pull step of prefect.yaml runs flows from /app"
        if pool == "gpu":
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"]
            assert built[svc["image"]] != "docker/Dockerfile.cpu"
    assert served == used, f"no worker serves {used - served}"
    deploy = " ".join(services["deploy"]["command"])
    assert "--prefect-file deployments/prefect.yaml" in deploy
    assert all(f"work-pool create {p} --type process" in deploy for p, _ in used)


def _served_model(svc: dict, image_cmd: list[str]) -> tuple[str, list[str]]:
    args = svc.get("command") or image_cmd
    return args[0], args


def test_vllm_server_image_serves_what_the_openai_backend_relies_on():
    steps = instructions(DOCKER / SERVER_IMAGE)
    assert steps[0] == ("FROM", VLLM_SERVER_BASE)
    assert not pip_installs(steps), "the vLLM server image must not install the project (Prefect pins fastapi)"
    (entry,) = [json.loads(a) for op, a in steps if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(a) for op, a in steps if op == "CMD"]
    assert entry == ["vllm", "serve"]
    # Cached prompt tokens in usage, prefix caching for continuations, vLLM's sampling defaults, not the model's.
    assert {"--enable-prompt-tokens-details", "--enable-prefix-caching"} <= set(cmd)
    assert cmd[cmd.index("--generation-config") + 1] == "vllm" and cmd[cmd.index("--port") + 1] == "8000"


def test_compose_vllm_servers_are_the_ones_the_serve_recipe_reaches():
    from urllib.parse import urlparse

    from ckptdpo.configs import Recipe

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    (image_cmd,) = [json.loads(a) for op, a in instructions(DOCKER / SERVER_IMAGE) if op == "CMD"]
    servers = {n: s for n, s in services.items() if s.get("build", {}).get("dockerfile") == f"docker/{SERVER_IMAGE}"}
    assert servers, "compose runs no vLLM server"
    gpus_by_profile: dict[str, list[str]] = {}
    for name, svc in servers.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["device_ids"], f"{name} reserves no GPU"
        for profile in svc["profiles"]:
            gpus_by_profile.setdefault(profile, []).extend(device["device_ids"])
        assert "8000/health" in " ".join(svc["healthcheck"]["test"])
    for profile, gpus in gpus_by_profile.items():
        assert len(gpus) == len(set(gpus)), f"two vLLM servers of profile {profile} share a GPU: {gpus}"

    recipe = Recipe.from_yaml(SERVE_RECIPE)
    workers = [s for s in services.values() if s.get("entrypoint", [])[:3] == ["prefect", "worker", "start"]]
    backends = [recipe.backend, *recipe.eval.backends.values()]
    assert all(b.kind == "openai" for b in backends)
    for backend in backends:
        for url in backend.base_urls:
            parsed = urlparse(url)
            assert parsed.hostname in servers and parsed.port == 8000 and parsed.path == "/v1", url
            model, args = _served_model(servers[parsed.hostname], image_cmd)
            # The served name is the path, and the workers see the same directory (tokenizer, chat template).
            assert model == backend.model, f"{parsed.hostname} serves {model}, the recipe asks for {backend.model}"
            assert int(args[args.index("--max-model-len") + 1]) > recipe.generate.max_tokens
            for svc in [servers[parsed.hostname], *workers]:
                mounts = [v.split(":", 1)[1] for v in svc["volumes"]]
                assert any(backend.model.startswith(m + "/") for m in mounts), f"{backend.model} is not mounted"
    assert recipe.dto.probe == "sample"  # the likelihood probe needs echo; the sampled one runs on any server


def test_compose_grpo_server_is_trl_vllm_serve_that_the_grpo_recipe_reaches():
    """TRL's vLLM server mode: `trl vllm-serve` runs where vLLM and TRL share an environment (the gpu-vllm image),
    serves the base model on the host and port the recipe's grpo section reaches, with room for its completions;
    the trainer's launcher needs no DeepSpeed (the image has none)."""
    from trl.scripts.vllm_serve import build_command, make_parser

    from ckptdpo.configs import Recipe

    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    svc = services["grpo-vllm"]
    assert svc["entrypoint"] == ["trl", "vllm-serve"] and "grpo" in svc["profiles"]
    built = {s["image"]: s["build"]["dockerfile"] for s in services.values() if "build" in s}
    assert built[svc["image"]] == "docker/Dockerfile.gpu-vllm"
    _, extras = project_install(instructions(DOCKER / "Dockerfile.gpu-vllm"))
    declared = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("vllm") for e in extras for d in declared[e])
    assert any(d.startswith("trl") for d in PYPROJECT["project"]["dependencies"])
    (args,) = make_parser().parse_args_and_config(args=svc["command"])
    assert "--weight-transfer-config" in build_command(args)  # the engine the trainer pushes its weights through

    recipe = Recipe.from_yaml(REPO / "recipes" / "r1-distill-qwen-1.5b" / "deepscaler.yaml")
    g = recipe.grpo
    assert g.use_vllm and g.vllm_mode == "server" and "grpo" in recipe.stages
    assert (g.vllm_server_host, g.vllm_server_port) == ("grpo-vllm", args.port) and args.host == "0.0.0.0"
    assert args.max_model_len > g.max_completion_length
    assert any(args.model.startswith(v.split(":", 1)[1] + "/") for v in svc["volumes"]), "the model is not mounted"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
    launcher = yaml.safe_load((REPO / g.accelerate_config).read_text())
    assert launcher["distributed_type"] == "MULTI_GPU" and "deepspeed_config" not in launcher and not g.zero_stage
