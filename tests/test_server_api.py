"""End to end through a real server on 127.0.0.1: SGLang's front half + faser_sgl's scheduler."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from reference import hf_greedy, load_hf_model
from server_utils import stream_events


def generate(server, **body) -> dict:
    r = requests.post(f"{server.base_url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def hf_ref(tiny_model_path):
    """The independent reference: HF transformers float32 and the tiny model's own tokenizer."""
    from transformers import AutoTokenizer

    return load_hf_model(tiny_model_path), AutoTokenizer.from_pretrained(tiny_model_path)


def hf_continuation(hf_ref, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    """HF's greedy ids for prompt_ids and their text (special tokens skipped, as the server does)."""
    model, tokenizer = hf_ref
    ids = hf_greedy(model, list(prompt_ids), n)
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(autouse=True)
def kv_pool_free_after_each_test(tiny_server):
    yield
    tiny_server.wait_kv_free()


def test_generate_text_non_streaming(tiny_server, hf_ref):
    out = generate(tiny_server, text="def foo(x):", sampling_params={
        "max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    meta = out["meta_info"]
    prompt_ids = hf_ref[1].encode("def foo(x):")
    ref_ids, ref_text = hf_continuation(hf_ref, prompt_ids, 12)
    assert meta["completion_tokens"] == 12
    assert meta["prompt_tokens"] == len(prompt_ids)
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert out["output_ids"] == ref_ids
    assert out["text"] == ref_text


def test_streaming_matches_non_streaming(tiny_server, hf_ref):
    params = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    whole = generate(tiny_server, text="hello world", sampling_params=params)
    ref_ids, ref_text = hf_continuation(hf_ref, hf_ref[1].encode("hello world"), 16)
    assert whole["output_ids"] == ref_ids and whole["text"] == ref_text
    r = requests.post(f"{tiny_server.base_url}/generate", stream=True, timeout=120,
                      json={"text": "hello world", "sampling_params": params, "stream": True})
    assert r.status_code == 200
    events = stream_events(r)
    assert len(events) >= 2, "a 16-token stream must arrive in several chunks"
    # SGLang's /generate streams the text so far in every event.
    texts = [e["text"] for e in events]
    assert all(b.startswith(a.rstrip("\ufffd")) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == whole["text"]
    # ...and all output ids so far.
    ids = [e["output_ids"] for e in events]
    assert all(b[:len(a)] == a and len(b) > len(a) for a, b in zip(ids, ids[1:]))
    assert ids[-1] == ref_ids
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert events[-1]["meta_info"]["completion_tokens"] == 16


def test_greedy_batch_matches_transformers(tiny_server, hf_ref):
    """Mixed-length prompts served concurrently give HF's float32 greedy tokens exactly."""
    hf = hf_ref[0]
    prompts = [[5, 17, 33], list(range(40, 90)), [7] * 11, list(range(100, 123)), [3, 9]]
    lengths = [20, 8, 30, 15, 25]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, lengths)]

    def run(i):
        return generate(tiny_server, input_ids=prompts[i], sampling_params={
            "max_new_tokens": lengths[i], "temperature": 0, "ignore_eos": True})["output_ids"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(run, range(len(prompts))))
    assert got == expected


def test_stop_string_and_stop_token(tiny_server):
    base = generate(tiny_server, input_ids=[11, 12, 13], sampling_params={
        "max_new_tokens": 20, "temperature": 0, "ignore_eos": True})
    ids = base["output_ids"]
    # Stop token: the 6th generated token ends the output (the detokenizer trims it from text).
    out = generate(tiny_server, input_ids=[11, 12, 13], sampling_params={
        "max_new_tokens": 20, "temperature": 0, "stop_token_ids": [ids[5]]})
    first = ids.index(ids[5])
    assert out["output_ids"] == ids[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[5]}
    # Stop string: a piece of the greedy text ends the output before it.
    text = base["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        out = generate(tiny_server, input_ids=[11, 12, 13], sampling_params={
            "max_new_tokens": 20, "temperature": 0, "stop": [stop]})
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert stop not in out["text"]
        assert text.startswith(out["text"])


def test_stop_regex_ends_the_output_at_its_first_match(tiny_server, hf_ref):
    """SGLang's stop_regex: the pattern is searched in the output's tail text; the output ends
    with the first token that completes a match, and matched_stop is the pattern.  A pattern
    that does not compile is a 400."""
    import re

    tokenizer = hf_ref[1]
    base = generate(tiny_server, input_ids=[11, 12, 13], sampling_params={
        "max_new_tokens": 20, "temperature": 0, "ignore_eos": True})["output_ids"]
    text = tokenizer.decode(base, skip_special_tokens=True)
    letters = [c for c in text if c.isalpha()]
    assert len(letters) > 2, text
    pattern = re.escape(letters[len(letters) // 2]) + "|" + re.escape(letters[-1])
    out = generate(tiny_server, input_ids=[11, 12, 13], sampling_params={
        "max_new_tokens": 20, "temperature": 0, "ignore_eos": True, "stop_regex": pattern})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    ids = out["output_ids"]
    assert ids == base[:len(ids)]
    assert re.search(pattern, tokenizer.decode(ids, skip_special_tokens=True))
    assert not re.search(pattern, tokenizer.decode(ids[:-1], skip_special_tokens=True))
    bad = requests.post(f"{tiny_server.base_url}/generate", timeout=60, json={
        "input_ids": [11, 12, 13], "sampling_params": {"max_new_tokens": 4, "stop_regex": "(unclosed"}})
    assert bad.status_code == 400, bad.text


def test_seeded_sampling_is_reproducible(tiny_server):
    params = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "sampling_seed": 1234,
              "ignore_eos": True}
    a = generate(tiny_server, input_ids=[1, 2, 3, 4], sampling_params=params)["output_ids"]
    b = generate(tiny_server, input_ids=[1, 2, 3, 4], sampling_params=params)["output_ids"]
    c = generate(tiny_server, input_ids=[1, 2, 3, 4], sampling_params={**params, "sampling_seed": 99})
    assert a == b
    assert a != c["output_ids"]


def test_openai_completions(tiny_server, hf_ref):
    r = requests.post(f"{tiny_server.base_url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_ids = hf_ref[1].encode("def add(a, b):")
    _, ref_text = hf_continuation(hf_ref, prompt_ids, 10)
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == 10
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == ref_text


def test_openai_chat_streaming(tiny_server, hf_ref):
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="none")
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True})
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    # The server applies the model's chat template; HF continues the same templated prompt.
    prompt_ids = chat_prompt_ids(hf_ref[1], [{"role": "user", "content": "hello there"}])
    _, ref_text = hf_continuation(hf_ref, prompt_ids, 12)
    assert whole.choices[0].message.content == ref_text
    assert "".join(pieces) == ref_text
    assert finish == "length"
    assert whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(prompt_ids)


def test_info_flush_and_health_endpoints(tiny_server, tiny_model_path):
    info = requests.get(f"{tiny_server.base_url}/get_model_info", timeout=30).json()
    assert info["model_path"] == str(tiny_model_path)
    assert info["is_generation"] is True
    state = tiny_server.internal_state()
    assert state["backend"] == "faser_sgl"
    assert state["kv_total_slots"] == state["kv_free_slots"] + state["kv_used_slots"]
    assert requests.post(f"{tiny_server.base_url}/flush_cache", timeout=30).status_code == 200
    assert requests.get(f"{tiny_server.base_url}/health_generate", timeout=60).status_code == 200


def test_sgl_frontend_program(tiny_server, hf_ref):
    import sglang as sgl

    @sgl.function
    def multi_turn(s, question_1, question_2):
        s += sgl.user(question_1)
        s += sgl.assistant(sgl.gen("answer_1", max_tokens=8, temperature=0, ignore_eos=True))
        s += sgl.user(question_2)
        s += sgl.assistant(sgl.gen("answer_2", max_tokens=8, temperature=0, ignore_eos=True))

    backend = sgl.RuntimeEndpoint(tiny_server.base_url)
    state = multi_turn.run(question_1="what is x?", question_2="and y?", backend=backend)
    msgs = state.messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == state["answer_1"]
    # The frontend rendered the conversation with its chat template (for this model: SGLang's
    # plain default) and sent /generate the text so far at each gen().
    roles = backend.get_chat_template().role_prefix_and_suffix
    (user_pre, user_suf), (asst_pre, asst_suf) = roles["user"], roles["assistant"]
    prompt_1 = user_pre + "what is x?" + user_suf + asst_pre
    prompt_2 = prompt_1 + state["answer_1"] + asst_suf + user_pre + "and y?" + user_suf + asst_pre
    assert state.text() == prompt_2 + state["answer_2"] + asst_suf
    for prompt, answer in ((prompt_1, state["answer_1"]), (prompt_2, state["answer_2"])):
        direct = generate(tiny_server, text=prompt, sampling_params={
            "max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert answer == direct["text"]
        # The second answer continued the text holding the first: the same greedy tokens HF gives.
        assert direct["output_ids"] == hf_continuation(hf_ref, hf_ref[1].encode(prompt), 8)[0]


def test_bench_serving_random_ids(tiny_server, tiny_model_path, tmp_path):
    import subprocess
    import sys

    port = tiny_server.base_url.rsplit(":", 1)[1]
    out_file = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
           "--host", "127.0.0.1", "--port", port, "--dataset-name", "random-ids",
           "--num-prompts", "6", "--random-input-len", "32", "--random-output-len", "8",
           "--random-range-ratio", "1.0", "--tokenizer", str(tiny_model_path),
           "--model", str(tiny_model_path), "--output-file", str(out_file),
           "--disable-tqdm", "--request-rate", "inf"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out_file.read_text().strip().splitlines()[-1])
    assert result["completed"] == 6
    # random-ids with range ratio 1.0: every prompt has 32 ids and asks for exactly 8 tokens
    # (bench_serving sets ignore_eos), so the server must have produced all 6 * 8 of them.
    assert result["total_input_tokens"] == 6 * 32
    assert result["total_output_tokens"] == 6 * 8


def test_unsupported_control_requests_get_an_answer(tiny_server):
    """Weight updates and sessions are refused with a clear answer, not a hung HTTP call."""
    r = requests.post(f"{tiny_server.base_url}/update_weights_from_disk", timeout=30,
                      json={"model_path": "/nonexistent"})
    assert r.status_code >= 400 or r.json().get("success") is False, r.text
    assert "not supported by faser_sgl" in r.text
    r = requests.post(f"{tiny_server.base_url}/open_session", timeout=30, json={"capacity_of_str_len": 100})
    assert r.status_code >= 400 or r.json() in (None, False) or "session" in r.text.lower(), r.text
    # And the server keeps serving.
    assert requests.post(f"{tiny_server.base_url}/generate", timeout=60, json={
        "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}).status_code == 200
