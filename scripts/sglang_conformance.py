"""Run SGLang's own server tests, unmodified, against faser_sgl, and write the table.

    python scripts/sglang_conformance.py                       # all files, none and faser
    python scripts/sglang_conformance.py --policies none --files test_matched_stop

Which files: sglang_conformance_files.py (a pinned list: path, commit, sha256, and the files
and tests that do not apply to this server, each with the reason).  Where they come from: a
pinned copy in FASER_SGL_CACHE/sglang_tests (default ~/.cache/faser_sgl/sglang_tests), put there
at set-up by `--fetch` from GitHub at each file's commit and checked against its sha256; nothing
is fetched while the tests run, and the files are not committed here.

How: each file runs in its own pytest process with scripts/sglang_conformance_shim.py loaded,
which swaps SGLang's popen_launch_server for one that starts `python -m
faser_sgl.launch_server` with the test's own host, port, API key and flags (plus
`--speculative-policy P` for the policy under test) and maps the tests' Hub model ids to the
embedded model.  Results per test (junit XML) are merged into RESULTS (json) and the markdown
table is regenerated from it, so a subset can be rerun without losing the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sglang_conformance_files as manifest  # noqa: E402

RAW_URL = "https://raw.githubusercontent.com/sgl-project/sglang/{commit}/{path}"
PASS, FAIL, SKIP, NA = "pass", "fail", "skip", "n/a"


def tests_dir() -> Path:
    root = Path(os.environ.get("FASER_SGL_CACHE", Path.home() / ".cache" / "faser_sgl"))
    return root / "sglang_tests"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(files, root: Path) -> None:
    """Put each pinned file in root (from GitHub at its commit) and check its sha256."""
    for f in files:
        dest = root / f.path
        if not dest.exists() and not f.commit:
            raise SystemExit(f"{f.path} has no pinned commit (sglang_conformance_files.PROVENANCE): "
                             f"put the copy with sha256 {f.sha256} at {dest}")
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            url = RAW_URL.format(commit=f.commit, path=f.path)
            print(f"fetching {url}")
            with urllib.request.urlopen(url, timeout=60) as response:
                dest.write_bytes(response.read())
        if sha256(dest) != f.sha256:
            raise SystemExit(f"{dest}: sha256 {sha256(dest)} is not the pinned {f.sha256}")


def check_present(files, root: Path) -> None:
    missing = [f.path for f in files if not (root / f.path).exists()]
    if missing:
        raise SystemExit(f"not in {root}: {missing}; run with --fetch where GitHub is reachable")
    wrong = [f.path for f in files if sha256(root / f.path) != f.sha256]
    if wrong:
        raise SystemExit(f"these copies differ from the pinned sha256: {wrong}")


def test_key(path: str, classname: str, name: str) -> str:
    return f"{Path(path).name}::{classname.rsplit('.', 1)[-1]}::{name}"


def parse_junit(xml_path: Path, path: str) -> dict[str, dict]:
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        key = test_key(path, case.get("classname", ""), case.get("name", ""))
        status, message = PASS, ""
        for tag, st in (("failure", FAIL), ("error", FAIL), ("skipped", SKIP)):
            node = case.find(tag)
            if node is not None:
                status = st
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        out[key] = {"status": status, "message": message, "seconds": float(case.get("time", 0))}
    return out


def run_file(f, policy: str, root: Path, work: Path, timeout: float, port: int | None = None) -> dict[str, dict]:
    work.mkdir(parents=True, exist_ok=True)
    xml = work / f"{Path(f.path).stem}.xml"
    xml.unlink(missing_ok=True)
    env = dict(os.environ)
    # The test file's own directory too, for the server it starts: a processor class of a test
    # (custom logit processors) reaches the server by dill, which imports the class's module
    # (SGLang runs these files as scripts, where that module is __main__ and travels whole).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "scripts"), str(REPO), str((root / f.path).parent),
                                         env.get("PYTHONPATH", "")])
    env["FASER_CONFORMANCE_SERVER_ARGS"] = f"--speculative-policy {policy}"
    env["FASER_CONFORMANCE_LOG_DIR"] = str(work)
    if port:
        env["FASER_CONFORMANCE_PORT"] = str(port)
    env.setdefault("HF_HUB_OFFLINE", "1")
    skipped = {**manifest.NOT_APPLICABLE_TESTS, **manifest.NOT_RUN_HERE}
    deselect = [a for t in skipped if t.startswith(Path(f.path).name + "::")
                for a in ("--deselect", f"{f.path}::{t.split('::', 1)[1]}")]
    # Only unittest.TestCase classes, as SGLang runs these files (its Test*Mixin kits are not tests).
    cmd = [sys.executable, "-m", "pytest", f.path, "-p", "sglang_conformance_shim", "-q",
           "-o", "python_classes=UnittestOnly",
           "-p", "no:cacheprovider", "--rootdir", str(root), f"--junitxml={xml}", *deselect]
    start = time.monotonic()
    with open(work / f"{Path(f.path).stem}.log", "w") as log:
        try:
            subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\nTIMEOUT after {timeout} s\n")
    elapsed = time.monotonic() - start
    if not xml.exists():
        return {f"{Path(f.path).name}::(file)": {"status": FAIL, "seconds": elapsed,
                                                 "message": f"no result (see {work})"}}
    return parse_junit(xml, f.path)


def classify(results: dict) -> dict:
    """Attach the documented reason to each test that does not pass."""
    for policy_results in results.values():
        for key, r in policy_results.items():
            if r["status"] == FAIL and key in manifest.KNOWN_FAILURES:
                r["reason"] = manifest.KNOWN_FAILURES[key]
    return results


def write_report(results: dict, report: Path) -> None:
    policies = sorted(results)
    files = [f for f in manifest.FILES]
    lines = ["# SGLang's own server tests against faser_sgl", "",
             f"Generated by `python scripts/sglang_conformance.py` from "
             f"[{report.stem}/results.json]({report.stem}/results.json). Test files of SGLang "
             f"(sgl-project/sglang, Apache-2.0) at the commits listed, run unmodified through "
             f"scripts/sglang_conformance_shim.py; installed SGLang {manifest.SGLANG_VERSION}. "
             f"{manifest.PROVENANCE}", "", manifest.RUN_NOTES, "",
             "## Counts per file", "",
             "| file | commit | " + " | ".join(f"{p}: pass / fail / skip / n/a / not run" for p in policies) + " |",
             "|---|---|" + "---|" * len(policies)]
    for f in files:
        name = Path(f.path).name
        cells = []
        for p in policies:
            rows = [r for k, r in results[p].items() if k.startswith(name + "::")]
            na = sum(1 for t in manifest.NOT_APPLICABLE_TESTS if t.startswith(name + "::"))
            not_run = sum(1 for t in manifest.NOT_RUN_HERE if t.startswith(name + "::"))
            count = {s: sum(r["status"] == s for r in rows) for s in (PASS, FAIL, SKIP)}
            cells.append(f"{count[PASS]} / {count[FAIL]} / {count[SKIP]} / {na} / {not_run}"
                         if rows or na or not_run else "not run")
        lines.append(f"| {f.path} | {f.commit[:10] or 'sha256 only'} | " + " | ".join(cells) + " |")
    lines += ["", "## Files that do not apply", "", "| file | why |", "|---|---|"]
    lines += [f"| {path} | {why} |" for path, why in manifest.NOT_APPLICABLE_FILES.items()]
    lines += ["", "## Tests that do not apply (not run)", "", "| test | why |", "|---|---|"]
    lines += [f"| {t} | {why} |" for t, why in manifest.NOT_APPLICABLE_TESTS.items()]
    lines += ["", "## Tests that apply but were not run on this machine", "", "| test | why |", "|---|---|"]
    lines += [f"| {t} | {why} |" for t, why in manifest.NOT_RUN_HERE.items()]
    lines += ["", "## Tests that fail or are skipped", "",
              "| policy | test | status | reason (documented) or first line of the error |", "|---|---|---|---|"]
    for p in policies:
        for key, r in sorted(results[p].items()):
            if r["status"] != PASS:
                why = r.get("reason") or r.get("message", "")
                lines.append(f"| {p} | {key} | {r['status']} | {why.replace('|', '/')} |")
    lines += ["", "## Every test", "", "| test | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    keys = sorted({k for p in policies for k in results[p]})
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(results[p].get(key, {}).get("status", "-") for p in policies) + " |")
    report.write_text("\n".join(lines) + "\n")


def drop_stale(policy_results: dict, rerun: str | None = None) -> None:
    """Delete a policy's saved results that no longer stand: those of the file being rerun,
    of files no longer listed, and of tests now listed as not applicable or not run here."""
    listed = {Path(f.path).name for f in manifest.FILES}
    skipped = {**manifest.NOT_APPLICABLE_TESTS, **manifest.NOT_RUN_HERE}
    for key in list(policy_results):
        file_name = key.split("::")[0]
        if file_name == rerun or file_name not in listed or key in skipped:
            del policy_results[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="none,faser")
    p.add_argument("--files", default="", help="comma-separated substrings of file names (default: all)")
    p.add_argument("--fetch", action="store_true", help="fetch the pinned files from GitHub, then stop")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the table from the saved results (after the lists changed), run nothing")
    p.add_argument("--report", type=Path, default=REPO / "docs" / "sglang_conformance.md")
    p.add_argument("--work", type=Path, default=Path("/tmp/sglang_conformance"))
    p.add_argument("--timeout", type=float, default=2400.0, help="seconds per file")
    p.add_argument("--port", type=int, default=None,
                   help="the tests' server port (default: SGLang's DEFAULT_URL_FOR_TEST)")
    args = p.parse_args()
    root = tests_dir()
    if args.fetch:
        fetch(manifest.FILES, root)
        return
    results_path = args.report.parent / args.report.stem / "results.json"
    if args.report_only:
        results = json.loads(results_path.read_text())
        for policy_results in results.values():
            drop_stale(policy_results)
        results_path.write_text(json.dumps(classify(results), indent=1, sort_keys=True))
        write_report(results, args.report)
        return
    check_present(manifest.FILES, root)
    wanted = [f for f in manifest.FILES
              if not args.files or any(s in f.path for s in args.files.split(","))]
    for policy in args.policies.split(","):
        for f in wanted:
            name = Path(f.path).name
            print(f"[{time.strftime('%H:%M:%S')}] {policy}: {f.path}", flush=True)
            fresh = run_file(f, policy, root, args.work / policy, args.timeout, args.port)
            counts = {s: sum(r["status"] == s for r in fresh.values()) for s in (PASS, FAIL, SKIP)}
            print(f"    {counts}", flush=True)
            # Read, merge, write per file: another run (another policy, --port) may write too.
            results = json.loads(results_path.read_text()) if results_path.exists() else {}
            policy_results = results.setdefault(policy, {})
            drop_stale(policy_results, rerun=name)
            policy_results.update(fresh)
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(classify(results), indent=1, sort_keys=True))
            write_report(results, args.report)

if __name__ == "__main__":
    main()
