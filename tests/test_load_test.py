"""The load-test harness (python -m faser_sgl.bench) against real servers on 127.0.0.1: it starts
one per setting, replays the same Poisson and bursty arrivals against each, and writes JSON, CSV,
plots and a report whose numbers add up."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from faser_sgl.bench.cli import parse_args
from faser_sgl.bench.server_process import REPO
from faser_sgl.bench.workloads import load_prompts, mmpp_arrivals, poisson_arrivals, trace_arrivals

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# The partial draft (conftest.PARTIAL_DRAFT) agrees with the target often but not always (0.65-0.8
# of drafts accepted on these prompts); an unrelated draft (~0) or the target itself (1) is outside.
ACCEPT_BAND = (0.2, 0.95)


@pytest.fixture(scope="module")
def harness_run(tiny_model_factory, partial_draft_path, tmp_path_factory):
    """Two settings on the tiny model: no speculation, and fixed K=3 with a draft that partly
    agrees with the target (its weights with 2% noise), so drafts are rejected as well as
    accepted."""
    target = tiny_model_factory("llama", seed=0)
    draft = partial_draft_path
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "faser_sgl.bench",
           "--server-args", f"--model-path {target} --max-total-tokens 4096",
           "--setting", "none=--speculative-policy none",
           "--setting", f"k3=--speculative-policy fixed --speculative-draft-model-path {draft} "
                        "--speculative-num-draft-tokens 3",
           "--request-rates", "4,16", "--num-prompts", "6", "--bursty-num-prompts", "10",
           "--bursty-trough-rate", "1", "--bursty-peak-ratio", "20", "--bursty-mean-dwell", "0.5",
           "--output-len", "12", "--max-prompt-len", "600", "--output-dir", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def test_harness_writes_consistent_results(harness_run):
    out, stdout = harness_run
    data = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert [(r["setting"], r["workload"], r["rate"]) for r in results][:3] == [
        ("none", "poisson", 4.0), ("none", "poisson", 16.0), ("none", "bursty", results[2]["rate"])]
    assert len(results) == 6 and {r["setting"] for r in results} == {"none", "k3"}
    for r in results:
        m = r["metrics"]
        reqs = r["requests"]
        assert r["failed"] == 0 and m["completed"] == r["num_requests"] == len(reqs), r["errors"]
        assert m["total_output"] == sum(q["output_len"] for q in reqs)
        assert all(1 <= q["output_len"] <= 12 for q in reqs)
        assert all(0 < q["ttft_s"] <= q["latency_s"] for q in reqs)
        assert 0 < m["mean_ttft_ms"] <= m["p99_ttft_ms"]
        assert 0 < m["mean_e2e_latency_ms"] <= m["p99_e2e_latency_ms"]
        assert m["mean_e2e_latency_ms"] == pytest.approx(1e3 * np.mean([q["latency_s"] for q in reqs]))
        # Every request was sent at its offset, so the run lasts at least until the last arrival.
        assert r["duration_s"] >= max(q["arrival_s"] for q in reqs)
        assert m["output_throughput"] == pytest.approx(m["total_output"] / r["duration_s"])
        spec = r["spec"]
        if r["setting"] == "none":
            assert spec["spec_drafted_tokens"] == 0 and spec["accept_rate"] is None
        elif spec["spec_drafted_tokens"] == 0:
            # A burst of arrivals can leave no step without a prefill (such steps do not draft).
            assert spec["accept_rate"] is None and r["workload"] == "bursty", r
        else:
            assert spec["accept_rate"] == pytest.approx(
                spec["spec_accepted_tokens"] / spec["spec_drafted_tokens"])
    # Pooled over the speculative runs (a single run may draft only a dozen tokens): some drafts
    # accepted, some rejected, as the partial draft does; neither an unrelated draft nor the
    # target itself would pass.
    drafted = sum(r["spec"]["spec_drafted_tokens"] for r in results if r["setting"] == "k3")
    accepted = sum(r["spec"]["spec_accepted_tokens"] for r in results if r["setting"] == "k3")
    assert drafted > 0 and ACCEPT_BAND[0] < accepted / drafted < ACCEPT_BAND[1], (accepted, drafted)
    # Same prompts, same arrivals and greedy decoding: speculation changes no output text.
    by_key = {(r["setting"], r["workload"], r["rate"]): r for r in results}
    for (setting, workload, rate), r in by_key.items():
        if setting == "k3":
            base = by_key[("none", workload, rate)]
            assert [q["arrival_s"] for q in r["requests"]] == [q["arrival_s"] for q in base["requests"]]
            assert [q["text"] for q in r["requests"]] == [q["text"] for q in base["requests"]]
    assert "**k3** vs none, poisson" in stdout


def test_harness_csv_plots_and_report(harness_run):
    out, _ = harness_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        assert int(float(row["completed"])) == int(row["num_requests"])
        assert float(row["mean_e2e_ms"]) > 0 and float(row["output_tok_per_s"]) > 0
    for png in ("poisson_sweep.png", "bursty.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    report = (out / "results.md").read_text()
    assert "![Poisson sweep](poisson_sweep.png)" in report and "![Bursty traffic (MMPP)](bursty.png)" in report
    result_rows = [line for line in report.splitlines() if re.match(r"^\| (none|k3) \| [0-9.]+ \|", line)]
    assert len(result_rows) == 6
    assert all("| 1.00x | " in line for line in result_rows if line.startswith("| none |"))
    # The report can be rebuilt from results.json alone.
    (out / "results.md").unlink()
    subprocess.run([sys.executable, "-m", "faser_sgl.bench", "--output-dir", str(out), "--report-only"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    assert (out / "results.md").read_text() == report


def test_harness_measures_a_running_server(tiny_server, tmp_path):
    """--base-url: the harness measures a server someone else started and leaves it running."""
    from faser_sgl.bench.cli import run

    args = parse_args(["--base-url", tiny_server.base_url, "--label", "external",
                       "--request-rates", "8", "--num-prompts", "4", "--bursty-num-prompts", "0",
                       "--output-len", "6", "--max-prompt-len", "600", "--output-dir", str(tmp_path),
                       "--no-progress"])
    files = run(args, [])
    _, results = json.loads(files["json"].read_text()).values()
    assert [(r["setting"], r["workload"], r["rate"]) for r in results] == [("external", "poisson", 8.0)]
    assert results[0]["metrics"]["completed"] == 4 and results[0]["failed"] == 0
    assert tiny_server.proc.poll() is None  # still serving
    tiny_server.wait_kv_free()
    assert (tmp_path / "poisson_sweep.png").read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "bursty.png").exists()


def test_poisson_arrivals_have_the_asked_rate():
    arrivals = poisson_arrivals(20_000, 2.5, np.random.default_rng(0))
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0 and (gaps > 0).all()
    assert np.mean(gaps) == pytest.approx(1 / 2.5, rel=0.03)
    assert np.std(gaps) == pytest.approx(1 / 2.5, rel=0.05)  # exponential: std == mean


def test_mmpp_alternates_trough_and_peak():
    arrivals, periods = mmpp_arrivals(5_000, 0.5, 20.0, 10.0, np.random.default_rng(1))
    assert len(arrivals) == 5_000 and arrivals[0] == 0 and (np.diff(arrivals) >= 0).all()
    rates = {rate for _, _, rate in periods}
    assert rates == {0.5, 10.0}
    assert all(a[2] != b[2] for a, b in zip(periods, periods[1:]))  # states alternate
    assert all(b[0] == pytest.approx(a[1]) for a, b in zip(periods, periods[1:]))  # no gaps
    # The rate seen inside the peak periods is the peak rate (20x the trough).
    arr = np.asarray(arrivals)
    for want in rates:
        spans = [(s, e) for s, e, r in periods if r == want]
        count = sum(((arr >= s) & (arr < e)).sum() for s, e in spans)
        assert count / sum(e - s for s, e in spans) == pytest.approx(want, rel=0.15)


def test_trace_is_replayed_relative_to_its_first_entry(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": t, "input_length": 10}) for t in (5000, 1000, 1500)))
    assert trace_arrivals(str(trace), None) == [0.0, 0.5, 4.0]
    assert trace_arrivals(str(trace), 2) == [0.0, 0.5]


def test_humaneval_prompts_are_filtered_by_length(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts, lens = load_prompts("humaneval", tokenizer, 300)
    assert 0 < len(prompts) < 164 and max(lens) <= 300
    assert all("def " in p for p in prompts)  # HumanEval: a function signature and its docstring


def test_chat_prompts_go_through_the_chat_template(tiny_model_path):
    from transformers import AutoTokenizer

    from faser_sgl.bench.chat_prompts import CHAT_DATASET

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts, lens = load_prompts("chat", tokenizer, 10_000)
    assert len(prompts) == len(CHAT_DATASET) == 40 and len(set(prompts)) == 40
    for text, question, n in zip(prompts, CHAT_DATASET, lens):
        templated = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                  add_generation_prompt=True)
        assert text == templated and question in text and text != question
        assert n == len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("argv, message", [
    (["--setting", "no-equals-sign"], "NAME="),
    (["--setting", "a=", "--setting", "a=--x"], "unique"),
    (["--setting", "a=", "--baseline", "b"], "is not one of"),
    (["--request-rates", "0.1,-1"], "positive"),
    (["--bursty-peak-ratio", "1"], "peak-ratio"),
])
def test_bad_arguments_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_each_run_starts_with_an_empty_prefix_cache(tiny_server):
    """Repeats send the same prompts: the harness flushes the radix cache before every run, so
    the second run prefills what the first did instead of reading it from cache."""
    import requests

    from faser_sgl.bench.server_process import internal_state

    def hits_of(prompt_ids):
        before = internal_state(tiny_server.base_url)["prefix_cache_hit_tokens"]
        r = requests.post(f"{tiny_server.base_url}/generate", timeout=60,
                          json={"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200
        tiny_server.wait_kv_free()
        return internal_state(tiny_server.base_url)["prefix_cache_hit_tokens"] - before

    prompt = list(range(300, 364))
    hits_of(prompt)
    assert hits_of(prompt) > 0  # cached: the test can see a hit
    tiny_server.flush_prefix_cache()
    assert hits_of(prompt) == 0
