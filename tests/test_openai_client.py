"""The OpenAI Python client against a real faser_sgl server (speculative, tiny models): chat and
completions with logprobs / top_logprobs, echo, n=2 with seeds, response_format, stop and
streaming return what the client expects; unsupported features get a 400 naming them."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from server_utils import start_server


@pytest.fixture(scope="module")
def server(tiny_model_path, partial_draft_path, tmp_path_factory):
    srv = start_server(tiny_model_path, tmp_path_factory.mktemp("openai"),
                       ["--max-total-tokens", "4096", "--speculative-policy", "faser",
                        "--speculative-draft-model-path", partial_draft_path,
                        "--speculative-num-draft-tokens", "3"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none")


def model_name(client):
    return client.models.list().data[0].id


MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_chat_logprobs_and_top_logprobs(client, server):
    r = client.chat.completions.create(model=model_name(client), messages=MESSAGES, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0.0 and len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
    # Same numbers from SGLang's native route.
    native = requests.post(f"{server.base_url}/generate", timeout=60, json={
        "text": MESSAGES[0]["content"], "sampling_params": {"temperature": 0, "max_new_tokens": 4},
        "return_logprob": True, "top_logprobs_num": 2}).json()
    assert len(native["meta_info"]["output_token_logprobs"]) == 4
    assert all(len(row) == 2 for row in native["meta_info"]["output_top_logprobs"])


def test_completions_logprobs_with_echo(client):
    r = client.completions.create(model=model_name(client), prompt="The quick brown fox", max_tokens=5,
                                  temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The quick brown fox")
    # Echo: prompt tokens first (the very first without a logprob), then the 5 outputs.
    assert lp.token_logprobs[0] is None
    assert len(lp.tokens) == r.usage.prompt_tokens + 5
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[-5:])


def test_n2_with_seed_gives_distinct_reproducible_samples(client):
    kw = dict(model=model_name(client), messages=MESSAGES, max_tokens=12, temperature=1.0, n=2, seed=1)
    a = [c.message.content for c in client.chat.completions.create(**kw).choices]
    b = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert len(a) == 2 and a[0] != a[1]
    assert sorted(a) == sorted(b)
    single = client.chat.completions.create(**{**kw, "n": 1}).choices[0].message.content
    assert single in a  # the first sample of n uses the seed itself
    c = client.completions.create(model=model_name(client), prompt="Once upon", max_tokens=8,
                                  temperature=1.0, n=2, seed=5)
    assert len(c.choices) == 2 and c.choices[0].text != c.choices[1].text


def test_response_format_json(client):
    r = client.chat.completions.create(model=model_name(client), messages=MESSAGES, max_tokens=48,
                                       temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        json.loads(text)
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}},
              "required": ["colour"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model_name(client), messages=MESSAGES, max_tokens=32, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["colour"] in ("red", "green")


def test_stop_and_streaming(client):
    full = client.completions.create(model=model_name(client), prompt="Count: 1 2 3", max_tokens=16,
                                     temperature=0).choices[0].text
    assert len(full) > 2
    stop = full[1:3]
    r = client.completions.create(model=model_name(client), prompt="Count: 1 2 3", max_tokens=16,
                                  temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert full.startswith(r.choices[0].text)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model_name(client), messages=MESSAGES, max_tokens=10, temperature=0, stream=True)]
    whole = client.chat.completions.create(model=model_name(client), messages=MESSAGES, max_tokens=10,
                                           temperature=0).choices[0].message.content
    assert "".join(pieces) == whole


@pytest.mark.parametrize("feature,call", [
    ("multimodal", lambda c, m: c.chat.completions.create(model=m, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])),
    ("embedding", lambda c, m: c.embeddings.create(model=m, input="hello")),
])
def test_unsupported_features_get_a_clear_400(client, server, feature, call):
    with pytest.raises(openai.APIStatusError) as err:
        call(client, model_name(client))
    assert 400 <= err.value.status_code < 500, err.value
    # The server keeps serving.
    assert client.completions.create(model=model_name(client), prompt="hi", max_tokens=2).choices


def test_lora_is_refused_with_a_message(server):
    r = requests.post(f"{server.base_url}/generate", timeout=60, json={
        "text": "hi", "lora_path": "my-adapter", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 400 and "lora" in r.text.lower()
