"""The load harness's --repeats aggregation and --record-steps cost-model report, on synthetic
records and a fake server: no model is loaded and nothing listens on a port."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from faser_sgl.bench import cli, report, report_costmodel
from faser_sgl.bench.cli import parse_args

METRIC_KEYS = ["completed", "output_throughput", "request_throughput", "mean_e2e_latency_ms",
               "p99_e2e_latency_ms", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
               "mean_itl_ms", "total_output"]


def record(setting, workload, rate, repeat, tput, e2e_ms, texts, drafted=0, accepted=0):
    """A result record as runner.run_workload returns it (plus cli's setting and repeat);
    repeat None: a record from before --repeats, without the key."""
    metrics = {k: 1.0 for k in METRIC_KEYS}
    metrics.update(completed=float(len(texts)), output_throughput=tput, mean_e2e_latency_ms=e2e_ms,
                   p99_e2e_latency_ms=2 * e2e_ms, mean_ttft_ms=e2e_ms / 4)
    out = {"setting": setting, "workload": workload, "rate": rate, "num_requests": len(texts),
           "failed": 0, "errors": [], "duration_s": 10.0, "metrics": metrics,
           "spec": {"spec_verify_steps": drafted // 2, "spec_drafted_tokens": drafted,
                    "spec_accepted_tokens": accepted, "spec_pipelined_steps": 0,
                    "accept_rate": accepted / drafted if drafted else None},
           "requests": [{"arrival_s": float(i), "prompt_len": 5, "output_len": 3, "success": True,
                         "ttft_s": 0.1, "latency_s": e2e_ms / 1e3, "text": t} for i, t in enumerate(texts)],
           "detail": {}}
    if repeat is not None:
        out["repeat"] = repeat
    return out


META = {"date": "d", "machine": "m", "command": "c", "settings": {"none": "", "k3": "--x"},
        "baseline": "none", "dataset": "humaneval", "max_prompt_len": 512, "output_len": 8,
        "temperature": 0.0, "ignore_eos": False, "seed": 0, "num_prompt_pool": 3}


def _table_rows(text: str, setting: str) -> list[list[str]]:
    """The result-table rows of a setting (a load in the second column, unlike its line in the
    settings table), split into cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(rf"^\| {re.escape(setting)} \| [0-9.]+ \|", line)]


def test_repeats_are_aggregated_to_means_with_spread_and_ratios_of_means(tmp_path):
    # The ratio of the means (15 / 15 = 1.00x) differs from the mean of per-repeat ratios (1.25x).
    results = [
        record("none", "poisson", 0.5, 0, 10.0, 2000.0, ["a", "b"]),
        record("none", "poisson", 0.5, 1, 20.0, 2400.0, ["a", "B"]),
        record("k3", "poisson", 0.5, 0, 20.0, 1000.0, ["a", "b"], drafted=10, accepted=5),
        record("k3", "poisson", 0.5, 1, 10.0, 1400.0, ["a", "x"], drafted=30, accepted=5),
    ]
    rows = {r["setting"]: r for r in report.aggregate(results)}
    k3 = rows["k3"]
    assert k3["metrics"]["output_throughput"] == pytest.approx(15.0)
    assert k3["metrics"]["mean_e2e_latency_ms"] == pytest.approx(1200.0)
    assert k3["spread"]["output_throughput"] == (10.0, 20.0)
    assert k3["spec"]["accept_rate"] == pytest.approx(10 / 40)  # pooled over the runs
    assert report.spread(k3, "output_throughput") == "10.00-20.00 (66.7%)"
    assert report.spread(k3, "mean_e2e_latency_ms", 1e-3) == "1.00-1.40 (33.3%)"
    assert [r["repeat"] for r in k3["runs"]] == [0, 1]

    lines = report.headline(results, "none")
    assert "throughput 1.00x, mean latency 1.83x" in lines[0]  # 2200 / 1200
    assert any("over 2 repeats" in line for line in lines)

    files = report.write_all(tmp_path, tmp_path / "results.md", {**META, "repeats": 2}, results)
    text = files["report"].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| setting | load"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    [k3_row] = _table_rows(text, "k3")
    cell = dict(zip(columns, k3_row))
    assert cell["done"] == "4/4" and cell["tput vs base"] == "1.00x" and cell["e2e vs base"] == "1.83x"
    assert cell["tput spread"] == "10.00-20.00 (66.7%)" and cell["e2e spread (s)"] == "1.00-1.40 (33.3%)"
    # Each repeat's texts against the baseline's repeat 0 ("a", "b"): 1 + 2 of 4 identical; the
    # baseline's own row compares its repeat 1 with its repeat 0.
    assert cell["same text as base"] == "3/4"
    assert dict(zip(columns, _table_rows(text, "none")[0]))["same text as base"] == "1/2"
    assert "ran 2 times" in text and "identical prompts and arrival times across repeats and settings" in text
    with open(files["csv"]) as f:
        assert [(r["setting"], r["repeat"]) for r in csv.DictReader(f)] == [
            ("none", "0"), ("none", "1"), ("k3", "0"), ("k3", "1")]


def test_records_without_repeat_load_as_repeat_zero(tmp_path):
    results = [record("none", "poisson", 0.5, None, 10.0, 2000.0, ["a"]),
               record("k3", "poisson", 0.5, None, 12.0, 1000.0, ["a"])]
    (tmp_path / "results.json").write_text(json.dumps({"meta": META, "results": results}))
    files = cli.run(parse_args(["--output-dir", str(tmp_path), "--report-only"]))
    text = files["report"].read_text()
    assert "spread" not in text.split("## Poisson sweep")[1]  # one run: no spread columns
    assert "ran once per setting" in text
    [k3_row] = _table_rows(text, "k3")
    assert k3_row[:5] == ["k3", "0.5", "1/1", "12.00", "1.20x"] and k3_row[-1] == "1/1"
    with open(files["csv"]) as f:
        assert {r["repeat"] for r in csv.DictReader(f)} == {"0"}
    assert all("repeat" not in r for r in report.read_json(files["json"])[1])  # records kept as they were


def _step(wall, predicted=None, draft=False):
    line = {"t": 0.0, "wall": wall, "passes": [["target", 4, wall]], "decodes": 1, "prefill_tokens": 0}
    if draft:
        line["passes"].insert(0, ["draft", 3, 0.01])
    if predicted is not None:
        line["predicted"], line["predicted_no_draft"] = predicted, predicted
    return json.dumps(line)


def test_prediction_error_summary_from_a_step_file(tmp_path):
    path = report_costmodel.steps_path(tmp_path, "k3")
    path.parent.mkdir()
    # Drafted: wall/predicted 1.1, 0.8, 1.5 -> errors 10, 20, 50 %; not drafted: 1.0, 1.2.
    path.write_text("\n".join([_step(0.11, 0.1, True), _step(0.08, 0.1, True), _step(0.15, 0.1, True),
                               _step(0.1, 0.1), _step(0.12, 0.1), _step(0.3), '{"t": 1, "wa']) + "\n")
    s = report_costmodel.summarize_steps(path)
    assert s["steps"] == 6 and s["predicted"] == 5  # the cut-off last line is skipped
    drafted, plain, every = (s["groups"][k] for k in ("drafted", "no_draft", "all"))
    assert drafted["n"] == 3 and drafted["median_abs_err_pct"] == pytest.approx(20.0)
    assert drafted["median_ratio"] == pytest.approx(1.1)
    assert drafted["p90_abs_err_pct"] == pytest.approx(44.0)  # between 20 and 50, numpy's linear
    assert plain["n"] == 2 and plain["median_abs_err_pct"] == pytest.approx(10.0)
    assert every["n"] == 5 and every["median_ratio"] == pytest.approx(1.1)

    report_costmodel.steps_path(tmp_path, "none").write_text(_step(0.2) + "\n")
    assert report_costmodel.summarize_steps(report_costmodel.steps_path(tmp_path, "none"))["groups"] is None

    # --report-only: the step files present are read into meta, and the section is rebuilt from
    # meta alone once they are gone.
    results = [record("none", "poisson", 0.5, 0, 10.0, 2000.0, ["a"]),
               record("k3", "poisson", 0.5, 0, 12.0, 1000.0, ["a"])]
    (tmp_path / "results.json").write_text(json.dumps({"meta": META, "results": results}))
    files = cli.run(parse_args(["--output-dir", str(tmp_path), "--report-only"]))
    text = files["report"].read_text()
    section = text.split("## Cost model: predicted vs measured step time")[1]
    assert "`none`: no cost model (1 steps, none predicted)" in section
    assert "| drafted | 3 | 20.0% | 44.0% | 1.100 |" in section
    assert "| no draft | 2 | 10.0% |" in section and "| all | 5 |" in section
    assert report.read_json(files["json"])[0]["prediction_error"]["k3"]["predicted"] == 5
    for name in ("k3", "none"):
        report_costmodel.steps_path(tmp_path, name).unlink()
    files["report"].unlink()
    assert cli.run(parse_args(["--output-dir", str(tmp_path), "--report-only"]))["report"].read_text() == text


def test_record_steps_adds_the_flag_to_each_server(tmp_path):
    stale = report_costmodel.steps_path(tmp_path, "a/b")
    stale.parent.mkdir()
    stale.write_text("old run\n")
    argv = cli.server_command("--model-path m --speculative-policy fixed", "a/b", tmp_path, True)
    assert argv == ["--model-path", "m", "--speculative-policy", "fixed",
                    "--faser-record-steps", str(tmp_path / "steps" / "a_b.jsonl")]
    assert not stale.exists()  # the recorder appends: an earlier run's lines must not mix in
    # The same setting's next server start in this run (--interleave: one per repeat) keeps
    # what the first wrote.
    stale.write_text("repeat 0\n")
    cli.server_command("--model-path m", "a/b", tmp_path, True, first_start=False)
    assert stale.read_text() == "repeat 0\n"
    assert cli.server_command("--model-path m", "a", tmp_path, False) == ["--model-path", "m"]


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats"),
    (["--record-steps", "--base-url", "http://x"], "--record-steps"),
])
def test_bad_repeat_and_record_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


class FakeServer:
    def __init__(self, argv):
        self.argv, self.base_url, self.kv_waits, self.flushes = argv, "http://fake", 0, 0

    def wait_kv_free(self, timeout):
        self.kv_waits += 1

    def flush_prefix_cache(self):
        assert self.kv_waits == self.flushes + 1  # once the server is idle, before each run
        self.flushes += 1

    def stop(self):
        pass


def fake_cli(monkeypatch, start_server, run_workload) -> None:
    """cli.run with these fake server starts and workload runs, and no machine, tokenizer or
    dataset behind it."""
    monkeypatch.setattr(cli, "start_server", start_server)
    monkeypatch.setattr(cli, "run_workload", run_workload)
    monkeypatch.setattr(cli, "describe_machine", lambda: "test machine")
    monkeypatch.setattr(cli, "_tokenizer_for", lambda url: None)
    monkeypatch.setattr(cli, "load_prompts", lambda *a: (["p1", "p2", "p3"], [3, 4, 5]))


def test_run_repeats_every_workload_with_the_same_arrivals(tmp_path, monkeypatch):
    """cli.run against fake servers: repeat order, repeat indexes, a KV check before each run,
    the step file flag, and the trace workload replayed identically in every repeat."""
    servers, sent = [], []

    def start_server(argv, log_dir, timeout):
        servers.append(FakeServer(argv))
        steps = Path(argv[argv.index("--faser-record-steps") + 1])
        speculative = "fixed" in argv
        steps.write_text(_step(0.12, 0.1 if speculative else None, speculative) + "\n")
        return servers[-1]

    def run_workload(base_url, workload, tokenizer, temperature, ignore_eos, progress, label):
        sent.append((workload.name, workload.arrivals_s, workload.prompts))
        n = len(sent)
        out = record("x", workload.name, workload.rate, None, 10.0 + n, 1000.0 + n,
                     [f"t{i}" for i in range(workload.num_requests)]) | {"detail": workload.detail}
        del out["setting"]  # run_workload's records do not name their setting; cli adds it
        return out

    fake_cli(monkeypatch, start_server, run_workload)
    args = parse_args(["--setting", "none=--speculative-policy none",
                       "--setting", "k2=--speculative-policy fixed", "--repeats", "3", "--record-steps",
                       "--request-rates", "1,2", "--num-prompts", "2", "--bursty-num-prompts", "5",
                       "--trace", "azure-code", "--trace-time-scale", "10", "--trace-sample", "0.5",
                       "--output-dir", str(tmp_path), "--no-progress"])
    files = cli.run(args, [])
    meta, results = report.read_json(files["json"])
    order = [(r["setting"], r["repeat"], r["workload"], r["rate"]) for r in results]
    trace_rate = results[2]["rate"]
    per_repeat = [("poisson", 1.0), ("poisson", 2.0), ("trace", trace_rate)]
    assert order == [(s, rep, w, rate) for s in ("none", "k2") for rep in range(3) for w, rate in per_repeat]
    assert [s.kv_waits for s in servers] == [9, 9]
    # Repeats send the same prompts: each run starts with an empty prefix cache.
    assert [s.flushes for s in servers] == [9, 9]
    assert all(s.argv[-2] == "--faser-record-steps" for s in servers)
    # The workloads were built once: every repeat and setting sent the same arrivals and prompts.
    assert all(sent[i] == sent[i % 3] for i in range(len(sent)))
    trace_runs = [r for r in results if r["workload"] == "trace"]
    assert len(trace_runs) == 6 and len(trace_runs[0]["requests"]) == 5
    assert meta["repeats"] == 3 and meta["prediction_error"]["none"]["groups"] is None
    assert meta["prediction_error"]["k2"]["groups"]["drafted"]["median_ratio"] == pytest.approx(1.2)
    text = files["report"].read_text()
    trace_section = text.split("## Recorded trace")[1]
    assert "faser_sgl/data/traces/AzureLLMInferenceTrace_code.csv" in trace_section
    assert "time x10" in trace_section and "each entry kept with probability 0.5" in trace_section
    assert "15/15" in trace_section and "(" in _table_rows(trace_section, "k2")[0][5]  # tput spread
    assert "![Recorded trace](trace.png)" in text and "### k2" in text


def test_the_trace_can_run_beside_the_bursty_mmpp(tmp_path):
    """--trace-num-prompts keeps the MMPP run and adds the trace (issue 25 asks for both in one
    run); without it the trace replaces the MMPP as before.  Each gets its own plot."""
    from faser_sgl.bench.workloads import build_workloads

    common = ["--request-rates", "1", "--num-prompts", "2", "--bursty-num-prompts", "6",
              "--trace", "azure-code", "--trace-time-scale", "10"]
    prompts, lens = [f"p{i}" for i in range(10)], list(range(3, 13))
    both = build_workloads(parse_args([*common, "--trace-num-prompts", "4"]), prompts, lens)
    assert [(w.name, w.num_requests) for w in both] == [("poisson", 2), ("bursty", 6), ("trace", 4)]
    alone = build_workloads(parse_args(common), prompts, lens)
    assert [(w.name, w.num_requests) for w in alone] == [("poisson", 2), ("trace", 6)]
    results = [record("none", w.name, w.rate, None, 10.0, 1000.0, [f"t{i}" for i in range(w.num_requests)])
               | {"detail": w.detail, "requests": [
                   {"arrival_s": t, "prompt_len": 3, "output_len": 4, "success": True, "ttft_s": 0.1,
                    "latency_s": 1.0, "text": "x"} for t in w.arrivals_s]}
               for w in both]
    meta = {"date": "d", "machine": "m", "command": "c", "settings": {"none": ""}, "baseline": "none",
            "dataset": "humaneval", "max_prompt_len": 512, "output_len": 4, "temperature": 0.0,
            "ignore_eos": False, "seed": 0, "num_prompt_pool": 10,
            "reruns": {"none": {"date": "d2", "command": "c2", "why": "a reason"}}}
    files = report.write_all(tmp_path, tmp_path / "results.md", meta, results)
    assert files["bursty"].name == "bursty.png" and files["trace"].name == "trace.png"
    text = files["report"].read_text()
    assert "![Bursty traffic (MMPP)](bursty.png)" in text and "![Recorded trace](trace.png)" in text
    assert "- Rerun of `none`: d2, `c2` (a reason)" in text  # a setting run again is named


def test_interleave_cycles_through_the_settings_once_per_repeat(tmp_path, monkeypatch):
    """--interleave: repeat 0 of every setting (each on its own server start), then repeat 1 of
    every setting, so that a drift of the machine's speed lands on all settings alike; the
    report says the run was interleaved."""
    servers, sent = [], []

    def start_server(argv, log_dir, timeout):
        servers.append(FakeServer(argv))
        return servers[-1]

    def run_workload(base_url, workload, tokenizer, temperature, ignore_eos, progress, label):
        sent.append((workload.arrivals_s, workload.prompts))
        out = record("x", workload.name, workload.rate, None, 10.0, 1000.0,
                     [f"t{i}" for i in range(workload.num_requests)])
        del out["setting"]
        return out

    fake_cli(monkeypatch, start_server, run_workload)
    args = parse_args(["--setting", "none=--speculative-policy none",
                       "--setting", "k2=--speculative-policy fixed", "--repeats", "2", "--interleave",
                       "--request-rates", "1,2", "--num-prompts", "2", "--bursty-num-prompts", "0",
                       "--output-dir", str(tmp_path), "--no-progress"])
    files = cli.run(args, [])
    meta, results = report.read_json(files["json"])
    order = [(r["setting"], r["repeat"], r["rate"]) for r in results]
    assert order == [(s, rep, rate) for rep in range(2) for s in ("none", "k2") for rate in (1.0, 2.0)]
    assert [s.argv[s.argv.index("--speculative-policy") + 1] for s in servers] == ["none", "fixed"] * 2
    assert [s.kv_waits for s in servers] == [2, 2, 2, 2]
    assert all(sent[i] == sent[i % 2] for i in range(len(sent)))
    assert meta["interleave"] is True
    assert "settings interleaved in time" in files["report"].read_text()
