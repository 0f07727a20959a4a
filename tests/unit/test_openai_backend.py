"""The openai backend against the fault-injection server (tests/openai_server.py) serving the fake or the hf backend:
retries, routing, and the JSON it sends (what vLLM 0.33's protocol reads). Real-server behaviour (transformers serve)
is in tests/slow/test_transformers_serve.py."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from ckptdpo.backends import make_backend
from ckptdpo.backends.base import GenerationRequest, problem_message
from ckptdpo.backends.fake import FakeBackend
from ckptdpo.backends.openai import OpenAIBackend, OpenAIError, ServerCapabilityError, draw_seed
from ckptdpo.backends.openai_http import split_proportionally
from ckptdpo.configs import Recipe, backend_config
from ckptdpo.errors import UserError
from tests.openai_server import OpenAIServer

SCRIPT = {
    "template": "<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n",
    "problems": {
        "What is 2+3?": {"samples": ["So 2+3=5.\n\nWait, yes. \\boxed{5}", "It is \\boxed{6}", "Hmm \\boxed{5}"]},
        "Loop?": {"samples": ["Wait, same.\n\n" * 6 + "And so on", {"text": "x y x y", "finish_reason": "loop"}]},
    },
    "continuations": [{"after": "\n\nWait", "texts": [", no. \\boxed{7}", ", yes. \\boxed{5}"]}],
    "scores": [
        {"prompt_endswith": "\\boxed{", "continuation": "5", "logprob": -0.5},
        {"prompt_endswith": "{5", "continuation": "}", "logprob": -0.25},
    ],
    "chat": [{"contains": "segment 2", "reply": "REDUNDANT"}],
    "default_reply": "KEEP",
}


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(*urls: str, sleeps: Sleeps | None = None, model: str = "served-model", **cfg) -> OpenAIBackend:
    config = backend_config(kind="openai", model=model, base_urls=list(urls), **cfg)
    return OpenAIBackend(config, backoff_base_s=0.01, sleep=sleeps if sleeps is not None else Sleeps(), seed=0)


def posts(srv: OpenAIServer, path: str = "/v1/completions") -> list[dict]:
    """The request bodies the server received on `path` (the backend's GET /v1/models probe left out)."""
    return [b for b in srv.log if b["path"] == path]


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(SCRIPT)


@pytest.fixture
def server(fake: FakeBackend):
    with OpenAIServer(fake) as srv:
        yield srv


def test_n_samples_stop_and_max_tokens_match_the_served_backend(server: OpenAIServer, fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("What is 2+3?")
    reqs = [
        GenerationRequest(prompt, n=3, max_tokens=100, seed=7),
        GenerationRequest(prompt, n=1, max_tokens=100, stop=("\n\nWait",)),
        GenerationRequest(prompt, n=2, max_tokens=2, top_k=20),
    ]
    be = client(server.base_url)
    got = be.generate(reqs)
    want = FakeBackend(SCRIPT).generate(reqs)
    for g, w in zip(got, want, strict=True):
        assert g.error is None
        assert [(s.text, s.finish_reason) for s in g.samples] == [(s.text, s.finish_reason) for s in w.samples]
        assert g.prompt_tokens == w.prompt_tokens
        # usage.completion_tokens is a total: n = 1 is exact, n > 1 is split and keeps the sum.
        assert sum(s.num_tokens for s in g.samples) == sum(s.num_tokens for s in w.samples)
    assert got[1].samples[0].num_tokens == want[1].samples[0].num_tokens
    # Requests run concurrently, so the log is in arrival order: find each body by its max_tokens and n.
    bodies = {(b["max_tokens"], b["n"]): b for b in posts(server)}
    assert bodies[100, 3]["seed"] == 7 and bodies[100, 3]["model"] == "served-model"
    assert bodies[100, 3]["top_k"] == -1 and bodies[2, 2]["top_k"] == 20
    assert bodies[100, 1]["stop"] == ["\n\nWait"] and "stop" not in bodies[100, 3]
    assert be.stats.requests == 3 and be.stats.samples == 6
    be.close()


def test_seed_reaches_the_server(server: OpenAIServer, fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("What is 2+3?") + "So.\n\nWait"
    texts = SCRIPT["continuations"][0]["texts"]
    (res,) = client(server.base_url).generate([GenerationRequest(prompt, n=2, seed=1)])
    assert [s.text for s in res.samples] == [texts[1], texts[0]]


def test_request_error_does_not_fail_the_batch(server: OpenAIServer, fake: FakeBackend) -> None:
    be = client(server.base_url)
    bad, good, ids = be.generate(
        [GenerationRequest("unscripted prompt"), GenerationRequest(fake.chat_prompt("What is 2+3?")),
         GenerationRequest((1, 2, 3))]
    )  # fmt: skip
    assert bad.error and "400" in bad.error and not bad.samples
    assert good.error is None and good.samples
    assert ids.error and "token ids" in ids.error
    assert any(b["prompt"] == [1, 2, 3] for b in posts(server))  # token-id prompts travel as a list of ints
    assert len(posts(server)) == 3  # a 400 is not retried


def test_retries_503_then_429_then_succeeds(fake: FakeBackend) -> None:
    sleeps = Sleeps()
    with OpenAIServer(fake, fail_first=[503, 429]) as srv:
        (res,) = client(srv.base_url, sleeps=sleeps, max_retries=3).generate(
            [GenerationRequest(fake.chat_prompt("What is 2+3?"))]
        )
    assert res.error is None and res.samples[0].text.startswith("So 2+3=5.")
    assert len(posts(srv)) == 3
    # exponential backoff with jitter in [0.5, 1] of 0.01 * 2**attempt
    assert len(sleeps) == 2 and 0.005 <= sleeps[0] <= 0.01 and 0.01 <= sleeps[1] <= 0.02


def test_retry_after_is_honoured(fake: FakeBackend) -> None:
    sleeps = Sleeps()
    with OpenAIServer(fake, fail_first=[429], retry_after="0.3") as srv:
        (res,) = client(srv.base_url, sleeps=sleeps).generate([GenerationRequest(fake.chat_prompt("What is 2+3?"))])
    assert res.error is None and sleeps == [0.3]


def test_retries_exhausted_is_a_request_error(fake: FakeBackend) -> None:
    with OpenAIServer(fake, fail_first=[500] * 10) as srv:
        (res,) = client(srv.base_url, max_retries=2).generate([GenerationRequest(fake.chat_prompt("What is 2+3?"))])
    assert res.error and "after 3 attempts" in res.error and "HTTP 500" in res.error
    assert len(posts(srv)) == 3


def test_connection_errors_are_retried_then_reported() -> None:
    with OpenAIServer(FakeBackend(SCRIPT)) as srv:
        url = srv.base_url
    sleeps = Sleeps()  # the server is gone: every attempt is refused
    (res,) = client(url, sleeps=sleeps, max_retries=2).generate([GenerationRequest("x")])
    assert res.error and "ConnectError" in res.error and len(sleeps) == 2


def test_api_key_is_sent_as_bearer(fake: FakeBackend) -> None:
    with OpenAIServer(fake, api_key="sekrit") as srv:
        base = backend_config(kind="openai", model="m", base_urls=[srv.base_url], api_key_env="CKPT_KEY")
        ok = make_backend(base, home=".", api_key="sekrit").generate(
            [GenerationRequest(fake.chat_prompt("What is 2+3?"))]
        )
        denied = OpenAIBackend(base).generate([GenerationRequest(fake.chat_prompt("What is 2+3?"))])
    assert ok[0].error is None
    assert denied[0].error and "401" in denied[0].error


def test_sticky_routing_by_route_key_across_two_servers(fake: FakeBackend) -> None:
    prefix = fake.chat_prompt("What is 2+3?")
    with OpenAIServer(fake) as a, OpenAIServer(fake) as b:
        be = client(a.base_url, b.base_url)
        keys = [f"traj-{i}" for i in range(12)]
        for round_ in range(3):  # three rounds of continuations per trajectory
            be.generate([GenerationRequest(f"{prefix}{k} r{round_}\n\nWait", route_key=k) for k in keys])
        where = {}
        for name, srv in (("a", a), ("b", b)):
            for body in posts(srv):
                key = body["prompt"][len(prefix) :].split(" ")[0]
                where.setdefault(key, set()).add(name)
        assert set(where) == set(keys)
        assert all(len(servers) == 1 for servers in where.values())  # every trajectory stayed on one server
        assert {s for servers in where.values() for s in servers} == {"a", "b"}  # and both servers got work
        assert all(len(posts(srv)) % 3 == 0 for srv in (a, b))
        assert [be.route(k) for k in keys] == [client(a.base_url, b.base_url).route(k) for k in keys]  # stable
        na, nb = len(posts(a)), len(posts(b))
        be.generate([GenerationRequest(prefix) for _ in range(4)])  # no key: round-robin
        assert (len(posts(a)) - na, len(posts(b)) - nb) == (2, 2)


def test_loop_guard_cuts_returned_text(server: OpenAIServer, fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("Loop?")
    (res,) = client(server.base_url).generate([GenerationRequest(prompt, n=2)])
    looped, engine_loop = res.samples
    assert looped.finish_reason == "loop" and looped.text == "\n\n".join(["Wait, same."] * 4)
    assert 0 < looped.num_tokens < 14  # the server counted 14 words for the whole text; the cut keeps ~4/6
    assert engine_loop.finish_reason == "loop" and engine_loop.text == "x y x y"  # served as "repetition"
    (off,) = client(server.base_url, loop_guard=False).generate([GenerationRequest(prompt)])
    assert off.samples[0].finish_reason == "stop" and off.samples[0].text.endswith("And so on")


def test_concurrency_is_bounded(fake: FakeBackend) -> None:
    with OpenAIServer(fake, delay_s=0.05) as srv:
        be = client(srv.base_url, max_concurrency=2)
        results = be.generate([GenerationRequest(fake.chat_prompt("What is 2+3?"), seed=i) for i in range(6)])
    assert all(r.error is None for r in results)
    assert srv.max_inflight == 2


def test_score_via_echo_sums_only_the_continuation(server: OpenAIServer) -> None:
    be = client(server.base_url)
    # default_logprob -20 for every other token: counting a prompt token or the generated one would show.
    assert be.score(["Q: x \\boxed{", "Q: y \\boxed{"], ["5}", "5"]) == [-0.75, -0.5]
    body = server.log[-1]
    assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1


def test_score_is_not_shifted_by_a_server_bos(fake: FakeBackend) -> None:
    with OpenAIServer(fake, bos_text="<|begin_of_text|>") as srv:
        assert client(srv.base_url).score(["Q: x \\boxed{"], ["5}"]) == [-0.75]


def test_score_without_echo_support_names_the_server_and_the_probe_setting(fake: FakeBackend) -> None:
    with OpenAIServer(fake, echo_supported=False) as srv:
        with pytest.raises(ServerCapabilityError, match="dto.probe: sample") as info:
            client(srv.base_url).score(["Q: x \\boxed{"], ["5}"])
    assert srv.base_url in str(info.value) and isinstance(info.value, UserError)  # the CLI prints it, exits 2


def test_chat_completions(server: OpenAIServer) -> None:
    convs = [[{"role": "user", "content": "judge segment 2"}], [{"role": "user", "content": "judge segment 3"}]]
    assert client(server.base_url).chat(convs, max_tokens=8) == ["REDUNDANT", "KEEP"]
    body = posts(server, "/v1/chat/completions")[-1]
    assert body["max_tokens"] == 8 and body["temperature"] == 0.0 and body["top_k"] == -1 and body["seed"] == 0


def test_chat_prompt_fallback_is_chatml_and_counts_are_estimates() -> None:
    be = client("http://127.0.0.1:9/v1")
    assert be.chat_prompt("P") == f"<|im_start|>user\n{problem_message('P')}<|im_end|>\n<|im_start|>assistant\n"
    assert be.count_tokens(["abcdefgh", "abc"]) == [2, 1]
    assert be.revision == "unpinned" and be.model_id == "served-model"


def test_config_errors() -> None:
    with pytest.raises(UserError, match="base_urls"):
        OpenAIBackend(backend_config(kind="openai"))


def test_split_proportionally_keeps_the_total() -> None:
    assert split_proportionally(10, [1, 1, 2]) == [3, 2, 5]
    assert split_proportionally(7, [0, 0]) == [4, 3]
    assert split_proportionally(0, []) == []
    assert split_proportionally(5, [5]) == [5]


# -- issue 14: what vLLM 0.33 reads from the request, and what it reports back --------------------------------------


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A local directory holding only the demo model's tokenizer (what `backend.model` points at)."""
    source = Path(request.getfixturevalue("demo_model_path"))
    target = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    return target


def test_text_prompts_ask_the_server_to_add_no_special_tokens(server: OpenAIServer, fake: FakeBackend) -> None:
    (res,) = client(server.base_url).generate([GenerationRequest(fake.chat_prompt("What is 2+3?"))])
    (body,) = posts(server)
    assert res.error is None
    # vLLM's default add_special_tokens=True would put a second BOS before a template that already has one.
    assert isinstance(body["prompt"], str) and body["add_special_tokens"] is False


def test_every_sampling_field_is_sent(server: OpenAIServer, fake: FakeBackend) -> None:
    req = GenerationRequest(fake.chat_prompt("What is 2+3?"), n=2, seed=3, max_tokens=50, temperature=0.7, top_p=0.9)
    (res,) = client(server.base_url).generate([req])
    (body,) = posts(server)
    assert res.error is None
    # Omitted fields take the model's generation_config defaults on vLLM: another distribution than the hf backend.
    want = {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "seed": 3}
    assert {k: body.get(k) for k in want} == want
    assert body["n"] == 2 and body["max_tokens"] == 50 and body["return_token_ids"] is True


def test_a_local_tokenizer_sends_token_ids(tokenizer_dir: Path, fake: FakeBackend) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with OpenAIServer(fake, decode=tok.decode, decode_prompts=True) as srv:
        be = client(srv.base_url, model=str(tokenizer_dir))
        prompt = fake.chat_prompt("What is 2+3?")
        (res,) = be.generate([GenerationRequest(prompt, max_tokens=100)])
    (body,) = posts(srv)
    assert res.error is None and res.samples[0].text == fake.generate([GenerationRequest(prompt)])[0].samples[0].text
    assert body["prompt"] == tok(prompt, add_special_tokens=False)["input_ids"]  # no BOS added here or there


def test_token_counts_are_the_servers_not_a_re_encoding(tokenizer_dir: Path, fake: FakeBackend) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = fake.chat_prompt("What is 2+3?")
    (served,) = fake.generate([GenerationRequest(prompt, max_tokens=100)])
    text, server_count = served.samples[0].text, served.samples[0].num_tokens
    assert server_count != len(tok(text, add_special_tokens=False)["input_ids"])  # the two counts differ here
    with OpenAIServer(fake, decode=tok.decode, decode_prompts=True) as srv:
        (res,) = client(srv.base_url, model=str(tokenizer_dir)).generate([GenerationRequest(prompt, max_tokens=100)])
    assert res.samples[0].text == text and res.samples[0].num_tokens == server_count


def test_max_tokens_is_capped_by_the_servers_max_model_len(tokenizer_dir: Path, fake: FakeBackend) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = fake.chat_prompt("What is 2+3?")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with OpenAIServer(fake, max_model_len=n_prompt + 40, decode=tok.decode, decode_prompts=True) as srv:
        be = client(srv.base_url, model=str(tokenizer_dir))
        ok, too_long = be.generate([GenerationRequest(prompt, max_tokens=32768), GenerationRequest(prompt * 3)])
        (no_tok,) = client(srv.base_url).generate([GenerationRequest(prompt, max_tokens=32768)])
    assert ok.error is None and ok.samples  # vLLM answers 400 to max_tokens above max_model_len
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert [b["max_tokens"] for b in posts(srv) if b["prompt"] == ids] == [40]
    assert too_long.error and "max_model_len" in too_long.error  # fails alone, before any request
    # Without a tokenizer the prompt's length is unknown here: capped at the limit (vLLM clamps below it).
    assert no_tok.error is None and posts(srv)[-1]["max_tokens"] == n_prompt + 40


def test_cached_prompt_tokens_are_reported_as_not_computed(fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("What is 2+3?")
    with OpenAIServer(fake, cached_tokens=5) as srv:
        be = client(srv.base_url)
        (res,) = be.generate([GenerationRequest(prompt)])
    assert res.prompt_tokens > 5
    assert res.prompt_tokens_requested == res.prompt_tokens and res.prompt_tokens_computed == res.prompt_tokens - 5
    assert be.stats.prompt_tokens_computed == res.prompt_tokens - 5


def test_n_is_emulated_by_seeded_single_requests_where_the_server_ignores_it(fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("What is 2+3?")
    with OpenAIServer(fake, max_n=1) as srv:
        be = client(srv.base_url)
        (res,) = be.generate([GenerationRequest(prompt, n=3, seed=7)])
        first = [(b["n"], b["seed"]) for b in posts(srv)]
        (again,) = be.generate([GenerationRequest(prompt, n=2, seed=9)])
        later = [(b["n"], b["seed"]) for b in posts(srv)][len(first) :]
    assert res.error is None and len(res.samples) == 3
    assert first == [(3, 7), (1, draw_seed(7, 1)), (1, draw_seed(7, 2))]
    assert len({draw_seed(7, i) for i in range(3)}) == 3
    assert len(again.samples) == 2 and later == [(1, 9), (1, draw_seed(9, 1))]  # learned: no n > 1 any more
    assert res.prompt_tokens_requested == 3 * res.prompt_tokens  # three prompts went through the server


def test_n_is_emulated_where_the_server_refuses_it_by_name(fake: FakeBackend) -> None:
    with OpenAIServer(fake, refuse_n=True) as srv:
        (res,) = client(srv.base_url).generate([GenerationRequest(fake.chat_prompt("What is 2+3?"), n=2, seed=4)])
    assert res.error is None and len(res.samples) == 2
    assert [(b["n"], b["seed"]) for b in posts(srv)] == [(2, 4), (1, 4), (1, draw_seed(4, 1))]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("generate.temperature=2.5", "generate.temperature"),
        ("generate.temperature=0", "generate.temperature"),
        ("generate.stop=['']", "generate.stop"),
        ("generate.top_p=0", "generate.top_p"),
        ("generate.top_p=1.5", "generate.top_p"),
        ("resample.temperature=0", "resample.temperature"),
        ("eval.temperature=3", "eval.temperature"),
        ("dto.probe_temperature=0", "dto.probe_temperature"),
        ("dto.judge.temperature=2.01", "dto.judge.temperature"),
    ],
)
def test_settings_vllm_refuses_are_refused_at_recipe_load(override: str, field: str) -> None:
    from ckptdpo.configs import ConfigError
    from ckptdpo.configs.recipe import parse_override

    key, value = parse_override(override)
    data: dict = {}
    node = data
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = value
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(data, source="r.yaml")
    message = str(info.value)
    assert f"'{field}'" in message and message.count(". ") == 0 and message.endswith(".")


def test_greedy_single_samples_and_temperature_two_still_load() -> None:
    recipe = Recipe.from_dict(
        {"generate": {"temperature": 0, "num_samples": 1}, "eval": {"temperature": 2.0}, "dto": {"judge": {}}}
    )
    assert recipe.generate.temperature == 0 and recipe.eval.temperature == 2.0
    assert Recipe.from_dict({"resample": {"temperature": 0, "max_attempts": 1}}).resample.temperature == 0


@pytest.mark.slow
def test_against_a_server_serving_the_hf_backend(request: pytest.FixtureRequest) -> None:
    if importlib.util.find_spec("ckptdpo.backends.hf") is None:
        pytest.skip("the hf backend is missing (ckptdpo/backends/hf.py not written yet)")
    try:
        model_path = Path(request.getfixturevalue("demo_model_path"))
        hf = request.getfixturevalue("hf_backend")  # the session's loaded demo model
    except pytest.FixtureLookupError:
        pytest.skip("the demo_model_path / hf_backend fixtures (tests/conftest.py) are missing")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    with OpenAIServer(hf, decode=lambda ids: tok.decode(ids)) as srv:
        be = OpenAIBackend(backend_config(kind="openai", model=str(model_path), base_urls=[srv.base_url]))
        prompt = be.chat_prompt("What is 2+3?")
        assert prompt == hf.chat_prompt("What is 2+3?")  # the local tokenizer's template
        req = GenerationRequest(prompt, n=2, max_tokens=6, seed=3, temperature=0.7)
        (res,) = be.generate([req])
        (direct,) = hf.generate([req])  # the hf backend is reproducible for a seed and a batch
        assert res.error is None and [s.text for s in res.samples] == [s.text for s in direct.samples]
        assert [s.num_tokens for s in res.samples] == [len(s.token_ids) for s in direct.samples]
        assert res.prompt_tokens == direct.prompt_tokens
        # A short prompt: the test server scores echo token by token (one sequence per prompt token).
        pair = (["2 and 3 make"], [" 5 in all."])
        assert be.score(*pair) == pytest.approx(hf.score(*pair), abs=1e-3)
        (reply,) = be.chat([[{"role": "user", "content": "Say hi."}]], max_tokens=8)
        assert reply == hf.chat([[{"role": "user", "content": "Say hi."}]], max_tokens=8)[0] and reply
        be.close()


# -- issue 26: a reply that breaks the API contract fails its request, naming the field and the server ---------------


def _choices(edit):
    """A reply hook applying `edit(choice, body)` to every choice of a completion reply."""

    def hook(body: dict, reply: dict) -> dict:
        for c in reply.get("choices") or []:
            edit(c, body)
        return reply

    return hook


def _usage(**fields):
    def hook(body: dict, reply: dict) -> dict:
        reply["usage"] = {**reply.get("usage", {}), **fields}
        return reply

    return hook


def _details(**fields):
    def hook(body: dict, reply: dict) -> dict:
        reply["usage"]["prompt_tokens_details"] = fields
        return reply

    return hook


def _reply(**fields):
    def hook(body: dict, reply: dict) -> dict:
        return {**reply, **fields}

    return hook


def _double(body: dict, reply: dict) -> dict:
    """Twice the choices the request asked for."""
    return {**reply, "choices": reply["choices"] + [{**c, "index": c["index"] + 10} for c in reply["choices"]]}


BROKEN_REPLIES = {
    "text null": (_choices(lambda c, b: c.update(text=None)), "choices[0].text"),
    "text a number": (_choices(lambda c, b: c.update(text=5)), "choices[0].text"),
    "token ids not ints": (_choices(lambda c, b: c.update(token_ids=["a"])), "choices[0].token_ids"),
    "negative token id": (_choices(lambda c, b: c.update(token_ids=[-1, 3])), "choices[0].token_ids"),
    "more token ids than max_tokens": (_choices(lambda c, b: c.update(token_ids=[1] * 500)), "max_tokens"),
    "negative prompt tokens": (_usage(prompt_tokens=-5), "usage.prompt_tokens"),
    "prompt tokens a string": (_usage(prompt_tokens="many"), "usage.prompt_tokens"),
    "negative completion tokens": (_usage(completion_tokens=-1), "usage.completion_tokens"),
    "more completion tokens than asked": (_usage(completion_tokens=10_000), "usage.completion_tokens"),
    "more cached than prompt tokens": (_details(cached_tokens=10_000), "cached_tokens"),
    "finish reason abort": (_choices(lambda c, b: c.update(finish_reason="abort")), "finish_reason"),
    "finish reason unknown": (_choices(lambda c, b: c.update(finish_reason="banana")), "finish_reason"),
    "finish reason null": (_choices(lambda c, b: c.update(finish_reason=None)), "finish_reason"),
    "choices not a list": (_reply(choices={"text": "x"}), "choices"),
    "a choice not an object": (_reply(choices=["x", "y"]), "choices[0]"),
    "two choices with one index": (_choices(lambda c, b: c.update(index=0)), "index"),
    "more choices than n": (_double, "choices"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_REPLIES))
def test_a_reply_that_breaks_the_contract_fails_the_request_naming_the_field_and_the_server(
    case: str, fake: FakeBackend
) -> None:
    hook, field = BROKEN_REPLIES[case]
    with OpenAIServer(fake, reply_hook=hook) as srv:
        be = client(srv.base_url)
        (res,) = be.generate([GenerationRequest(fake.chat_prompt("What is 2+3?"), n=2, max_tokens=100)])
    assert res.error and field in res.error and srv.base_url in res.error, res.error
    assert res.samples == [] and be.stats.samples == 0  # nothing of a broken reply is kept


def test_fewer_choices_than_asked_never_makes_a_short_or_empty_result(fake: FakeBackend) -> None:
    """A server that always sends one choice fewer than `n`: single requests then get none, which is an error."""

    def one_fewer(body: dict, reply: dict) -> dict:
        return {**reply, "choices": reply["choices"][: body["n"] - 1]}

    prompt = fake.chat_prompt("What is 2+3?")
    with OpenAIServer(fake, reply_hook=one_fewer) as srv:
        be = client(srv.base_url)
        (first,) = be.generate([GenerationRequest(prompt, n=2)])
        (second,) = be.generate([GenerationRequest(prompt, n=2)])  # n is known not to work: single requests only
    for res in (first, second):
        assert res.error and "choice" in res.error and srv.base_url in res.error and res.samples == [], res.error


def test_a_good_reply_still_passes_with_every_field_checked(server: OpenAIServer, fake: FakeBackend) -> None:
    (res,) = client(server.base_url).generate([GenerationRequest(fake.chat_prompt("What is 2+3?"), n=3)])
    assert res.error is None and len(res.samples) == 3 and all(s.num_tokens >= 0 for s in res.samples)


def test_a_chat_reply_without_text_is_an_error_naming_the_field(fake: FakeBackend) -> None:
    def null_content(body: dict, reply: dict) -> dict:
        for c in reply["choices"]:
            c["message"]["content"] = None
        return reply

    with OpenAIServer(fake, reply_hook=null_content) as srv, pytest.raises(OpenAIError) as info:
        client(srv.base_url).chat([[{"role": "user", "content": "judge segment 2"}]], max_tokens=8)
    assert "message.content" in str(info.value) and srv.base_url in str(info.value)


def test_a_positive_log_probability_is_an_error_naming_the_field(fake: FakeBackend) -> None:
    def positive(body: dict, reply: dict) -> dict:
        lp = reply["choices"][0]["logprobs"]
        lp["token_logprobs"] = [None if v is None else abs(v) + 1 for v in lp["token_logprobs"]]
        return reply

    with OpenAIServer(fake, reply_hook=positive) as srv, pytest.raises(OpenAIError) as info:
        client(srv.base_url).score(["Q: x \\boxed{"], ["5}"])
    assert "token_logprobs" in str(info.value) and srv.base_url in str(info.value)


def test_result_problem_names_what_breaks_the_protocol() -> None:
    from ckptdpo.backends.base import GenerationResult, Sample, result_problem

    req = GenerationRequest("p", n=2)
    ok = [Sample("a", 1, "stop"), Sample("", 0, "length")]
    assert result_problem(req, GenerationResult(ok, 3)) is None
    assert result_problem(req, GenerationResult([], 0, error="HTTP 500")) is None
    assert "1 sample(s) for a request of n=2" in result_problem(req, GenerationResult(ok[:1], 3))
    assert "0 sample(s)" in result_problem(req, GenerationResult([], 0))  # empty without an error
    assert "text None" in result_problem(req, GenerationResult([Sample(None, 1, "stop"), ok[1]], 3))
    assert "num_tokens -1" in result_problem(req, GenerationResult([Sample("a", -1, "stop"), ok[1]], 3))
    assert "finish_reason 'abort'" in result_problem(req, GenerationResult([Sample("a", 1, "abort"), ok[1]], 3))
    assert "prompt_tokens = -5" in result_problem(req, GenerationResult(ok, -5))
