"""The scripted fake backend: texts by prompt, continuation rules, stop/length, scores, chat, config loading."""

from __future__ import annotations

import json

import pytest

from ckptdpo.backends import make_backend
from ckptdpo.backends.base import Backend, GenerationRequest, problem_message
from ckptdpo.backends.fake import FakeBackend, count_words
from ckptdpo.configs import backend_config
from ckptdpo.errors import UserError

SCRIPT = {
    "template": "<|user|>\n{message}\n<|assistant|>\n",
    "problems": {
        "What is 2+3?": {"samples": ["First 2+3=5.\n\nWait, check: \\boxed{5}", "So it is \\boxed{6}"]},
        "Loop?": {"samples": [{"text": "Wait, same.\n\nWait, same.", "finish_reason": "loop"}]},
    },
    "continuations": [
        {"after": "\n\nWait", "texts": [", no. \\boxed{7}", ", yes. \\boxed{5}", ", hmm. \\boxed{5}"]},
        {"after": "check:\n\nWait", "texts": [", checked. \\boxed{5}"]},
    ],
    "scores": [
        {"prompt_endswith": "\\boxed{", "continuation": "5}", "logprob": -0.25},
        {"continuation": "6}", "logprob": -3.0},
    ],
    "chat": [{"contains": "segment 2", "reply": "REDUNDANT because it repeats"}],
    "default_reply": "KEEP",
}


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(SCRIPT)


def test_is_a_backend_with_stable_revision(fake: FakeBackend) -> None:
    assert isinstance(fake, Backend)
    assert fake.model_id == "fake"
    assert fake.revision == FakeBackend(json.loads(json.dumps(SCRIPT))).revision
    changed = dict(SCRIPT, default_reply="DROP")
    assert fake.revision != FakeBackend(changed).revision


def test_initial_samples_cycle_by_sample_index(fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("What is 2+3?")
    assert prompt == f"<|user|>\n{problem_message('What is 2+3?')}\n<|assistant|>\n"
    (res,) = fake.generate([GenerationRequest(prompt, n=3, max_tokens=100)])
    samples = SCRIPT["problems"]["What is 2+3?"]["samples"]
    assert [s.text for s in res.samples] == [samples[0], samples[1], samples[0]]
    assert res.error is None and res.prompt_tokens == count_words(prompt)
    assert [s.num_tokens for s in res.samples] == [count_words(t) for t in (samples[0], samples[1], samples[0])]
    assert {s.finish_reason for s in res.samples} == {"stop"}


def test_scripted_finish_reason_is_kept(fake: FakeBackend) -> None:
    (res,) = fake.generate([GenerationRequest(fake.chat_prompt("Loop?"))])
    assert res.samples[0].finish_reason == "loop"


def test_continuations_use_longest_rule_and_seed(fake: FakeBackend) -> None:
    base = fake.chat_prompt("What is 2+3?")
    texts = SCRIPT["continuations"][0]["texts"]
    (a, b) = fake.generate(
        [GenerationRequest(base + "First.\n\nWait", n=2, seed=2), GenerationRequest(base + "x\n\nWait", seed=4)]
    )
    assert [s.text for s in a.samples] == [texts[2], texts[0]]  # (seed + j) % 3 for j = 0, 1
    assert [s.text for s in b.samples] == [texts[4 % 3]]
    (c,) = fake.generate([GenerationRequest(base + "check:\n\nWait", n=2)])
    assert [s.text for s in c.samples] == [", checked. \\boxed{5}"] * 2


def test_unmatched_prompt_is_a_request_error_not_a_batch_error(fake: FakeBackend) -> None:
    good = GenerationRequest(fake.chat_prompt("What is 2+3?"))
    results = fake.generate([GenerationRequest("no rule here"), good, GenerationRequest((1, 2, 3))])
    assert results[0].error and not results[0].samples
    assert results[1].error is None and results[1].samples
    assert "token ids" in results[2].error
    with_default = FakeBackend(dict(SCRIPT, default_continuation="fallback \\boxed{1}"))
    (res,) = with_default.generate([GenerationRequest("no rule here", n=2)])
    assert [s.text for s in res.samples] == ["fallback \\boxed{1}"] * 2


def test_stop_strings_and_max_tokens(fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("What is 2+3?")
    (stopped, cut, both) = fake.generate(
        [
            GenerationRequest(prompt, stop=("\n\nWait", "zzz")),
            GenerationRequest(prompt, max_tokens=2),
            GenerationRequest(prompt, max_tokens=1, stop=("\\boxed",)),
        ]
    )
    assert stopped.samples[0].text == "First 2+3=5." and stopped.samples[0].finish_reason == "stop"
    assert cut.samples[0].text == "First 2+3=5." and cut.samples[0].finish_reason == "length"
    assert cut.samples[0].num_tokens == 2
    assert both.samples[0].text == "First" and both.samples[0].finish_reason == "length"


def test_stats_count_requests_samples_and_tokens(fake: FakeBackend) -> None:
    prompt = fake.chat_prompt("What is 2+3?")
    results = fake.generate([GenerationRequest(prompt, n=2), GenerationRequest("unmatched")])
    assert fake.stats.requests == 2 and fake.stats.samples == 2
    assert fake.stats.completion_tokens == sum(s.num_tokens for s in results[0].samples)
    assert fake.stats.prompt_tokens_computed == count_words(prompt) + 1
    assert fake.stats.finish_reasons == {"stop": 2}


def test_score_rules_and_default(fake: FakeBackend) -> None:
    scores = fake.score(["... \\boxed{", "x \\boxed{", "other"], ["5}", "6}", "5}"])
    assert scores == [-0.25, -3.0, -20.0]
    with pytest.raises(ValueError):
        fake.score(["a"], [])


def test_chat_rules_use_last_user_message(fake: FakeBackend) -> None:
    convs = [
        [{"role": "user", "content": "judge segment 2"}],
        [{"role": "user", "content": "judge segment 2"}, {"role": "assistant", "content": "x"},
         {"role": "user", "content": "judge segment 3"}],
    ]  # fmt: skip
    assert fake.chat(convs, max_tokens=16) == ["REDUNDANT because it repeats", "KEEP"]
    assert fake.chat(convs[:1], max_tokens=1) == ["REDUNDANT"]


def test_count_tokens_is_word_count(fake: FakeBackend) -> None:
    assert fake.count_tokens(["a b  c\n\nd", ""]) == [4, 0]


def test_from_config_loads_yaml_and_json(tmp_path) -> None:
    yml = tmp_path / "script.yaml"
    yml.write_text("problems:\n  'Q?':\n    samples: ['A \\boxed{1}']\n")
    backend = make_backend(backend_config(kind="fake", script=str(yml)), home=tmp_path)
    (res,) = backend.generate([GenerationRequest(backend.chat_prompt("Q?"))])
    assert res.samples[0].text == "A \\boxed{1}"
    js = tmp_path / "script.json"
    js.write_text(json.dumps(SCRIPT))
    assert (
        FakeBackend.from_config(backend_config(kind="fake", script=str(js))).revision == FakeBackend(SCRIPT).revision
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "not found"),
        ("problems: [unclosed", "cannot read"),
        ("- a list", "mapping"),
        ("problems:\n  Q:\n    samples: []\n", "problems.Q.samples"),
        ("continuations: [{after: x, texts: [y], extra: 1}]", "unknown key"),
    ],
)
def test_from_config_user_errors(tmp_path, content, needle) -> None:
    path = tmp_path / "s.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=needle) as err:
        FakeBackend.from_config(backend_config(kind="fake", script=str(path)))
    assert str(path) in str(err.value)
    with pytest.raises(UserError, match="backend.script"):
        FakeBackend.from_config(backend_config(kind="fake"))


def test_template_with_braces_in_problem() -> None:
    fake = FakeBackend({"template": "U: {message}\nA:", "problems": {"Find $\\{x\\}$": {"samples": ["ok"]}}})
    (res,) = fake.generate([GenerationRequest(fake.chat_prompt("Find $\\{x\\}$"))])
    assert res.samples[0].text == "ok"
