"""Measure a cost profile on a GPU with random-weight models of real geometry.

    python -m faser_sgl.sim.gpu_profile --out FILE [--dry-run] [--budget-s N]
    python -m faser_sgl.sim.gpu_profile --check-carry wheelhouse [--budget-mib 60]

It builds the target and the draft with the project's own executor (``CausalLM`` with
``fuse_projections``, a ``KVCache`` and the attention backend: FlashInfer on CUDA, the torch
backend in ``--dry-run``), with random bfloat16 weights (a pass's time does not depend on the
weights' values), and measures, each after a warm-up, with the device synchronised around every
timed pass (wall time: the eager executor's launch overhead is part of what a pass costs):

- the verification pass over batch size x tokens per request at a fixed context length;
- the draft pass over batch size x tokens per request;
- early exit: the target pass cut at each candidate exit layer (the prefix alone, and the pass
  that prunes every request to its first row there, as ``EarlyExitVerifier`` does);
- draft / verification overlap through ``speculative.lanes``' splits: serial, two CUDA streams,
  and green-context SM splits (``flashinfer.green_ctx``), against serial; and per split each
  side's pass timed while the other side keeps running (what the frontier controller's split
  curves hold), which becomes the profile's ``splits`` section (``gpu_splits.py``);
- how the verification pass grows with context length.

The results file is a cost profile the simulator loads (``faser_sgl.sim.cost_profile``:
``target`` and ``draft`` as points vs tokens) with the raw measurements under ``gpu_profile``.
It is rewritten after every measurement, so a run killed by its time limit leaves what it had.

Without CUDA only ``--dry-run`` runs (tiny shapes on the CPU): it checks the code path, its
numbers describe nothing.  ``--check-carry`` sums what the device tool carries (the working tree
git would list, plus the given paths) against a budget; scripts/build_wheelhouse.sh calls it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from faser_sgl.sim.gpu_splits import busy_sides, split_costs

MIB = 2 ** 20

# Geometries (config.json fields) of the models a GPU profile stands for.  Qwen3-0.6B's match its
# public config.json; Qwen3-32B's are from memory of its config (hidden 5120, 64 layers, 64 query
# / 8 KV heads of 128, intermediate 25600, untied embeddings).
SHAPES = {
    "qwen3-32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, intermediate_size=25600,
                      vocab_size=151936, tie_word_embeddings=False),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                       vocab_size=151936, tie_word_embeddings=True),
    # Dry-run shapes: a few MB, seconds on a CPU.
    "tiny-target": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=128,
                        vocab_size=512, tie_word_embeddings=False),
    "tiny-draft": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=64,
                       vocab_size=512, tie_word_embeddings=True),
}

PLANS = {
    "gpu": dict(target="qwen3-32b", draft="qwen3-0.6b", dtype="bfloat16", backend="flashinfer",
                context=512, batches=(1, 8, 32, 64, 128, 256), tokens=(1, 2, 4, 8),
                draft_tokens=(1, 2, 4), exit_fractions=(0.25, 0.5, 0.75),
                exit_shapes=((32, 4), (128, 4)), overlap_shapes=((32, 4), (128, 4)),
                context_sweep=(16, 4, (512, 2048, 8192)), warmup=2, reps=5),
    "dry-run": dict(target="tiny-target", draft="tiny-draft", dtype="float32", backend="torch",
                    context=16, batches=(1, 2, 4), tokens=(1, 2, 4), draft_tokens=(1, 2),
                    exit_fractions=(0.25, 0.5, 0.75), exit_shapes=((2, 2),),
                    overlap_shapes=((2, 2),), context_sweep=(2, 2, (16, 32)), warmup=1, reps=2),
}


# -- results file ------------------------------------------------------------------------------

def update_results(path: str | os.PathLike, **sections) -> dict:
    """Merge top-level keys into the JSON results file (created if missing or unreadable) and
    write it atomically, so that a kill mid-write never leaves half a file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data.update(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return data


def curve_points(cells: list[dict]) -> list[list[float]]:
    """(tokens, ms) points for the simulator from measured cells ({"tokens", "ms"}): cells of the
    same token count (e.g. 8 x 4 and 32 x 1) are averaged, since a profile's only input is the
    token count, and the curve is made non-decreasing (a running maximum): a pass carrying more
    tokens never costs less in the simulator, whatever the measurement noise."""
    by_tokens: dict[int, list[float]] = {}
    for c in cells:
        if c.get("ms") is not None:
            by_tokens.setdefault(int(c["tokens"]), []).append(float(c["ms"]))
    points, best = [], 0.0
    for n in sorted(by_tokens):
        best = max(best, statistics.fmean(by_tokens[n]))
        points.append([n, round(best, 4)])
    return points


# -- carry budget ------------------------------------------------------------------------------

def tree_size(root: str | os.PathLike = ".") -> int:
    """Bytes of the working tree the device tool carries: tracked files and untracked files git
    does not ignore (``git ls-files -co --exclude-standard``)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout
    total = 0
    for name in out.decode(errors="replace").split("\0"):
        p = Path(root) / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def dir_size(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def check_carry(paths: list[str], budget_mib: float, root: str | os.PathLike = ".",
                tree_bytes: int | None = None) -> dict:
    """Sizes of the carried paths plus the working tree against ``budget_mib``:
    {"tree_mib", "paths": {path: mib}, "total_mib", "budget_mib", "ok"}."""
    tree = tree_size(root) if tree_bytes is None else tree_bytes
    sizes = {p: dir_size(Path(root) / p) for p in paths}
    total = tree + sum(sizes.values())
    return {"tree_mib": round(tree / MIB, 2), "paths": {p: round(s / MIB, 2) for p, s in sizes.items()},
            "total_mib": round(total / MIB, 2), "budget_mib": budget_mib, "ok": total <= budget_mib * MIB}


# -- models ------------------------------------------------------------------------------------

def model_config(shape: str, num_layers: int | None = None):
    from faser_sgl.executor.config import ModelConfig

    cfg = dict(SHAPES[shape], architectures=["Qwen3ForCausalLM"], hidden_act="silu",
               rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    return ModelConfig.from_dict(cfg, source=shape)


def param_count(cfg) -> int:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2) + 2 * d
    per_layer = attn + 3 * h * i + 2 * h
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + emb + h


class RandomRunner:
    """What ModelRunner holds (model, KV cache, attention backend), with random weights built
    in place on the device instead of loaded from a checkpoint."""

    def __init__(self, cfg, dtype, device, backend: str, num_slots: int, seed: int = 0):
        import torch

        from faser_sgl.executor.attention import create_backend
        from faser_sgl.executor.kv_cache import KVCache
        from faser_sgl.executor.model import CausalLM, fuse_projections

        self.config, self.dtype, self.device = cfg, dtype, torch.device(device)
        with torch.device("meta"):
            model = CausalLM(cfg)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in list(model.named_parameters()):
                t = torch.empty(p.shape, dtype=dtype, device=self.device)
                if "norm" in name:
                    t.fill_(1.0)
                else:  # small enough that 64 layers of residuals stay finite in bfloat16
                    t.normal_(0.0, 0.02, generator=gen)
                module_path, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_path), attr, torch.nn.Parameter(t, requires_grad=False))
        model.eval()
        fuse_projections(model)
        self.model = model
        self.attn = create_backend(backend, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   dtype=dtype, device=self.device)
        self.kv_cache = KVCache.for_model(cfg, num_slots, dtype, self.device)
        self.num_slots = num_slots

    def forward(self, batch):
        import torch

        with torch.inference_mode():
            return self.model(batch, self.kv_cache, self.attn)


def make_batch(batch: int, q: int, context: int, device, vocab: int, stride: int | None = None,
               logits: str = "all", seed: int = 0):
    """B requests of ``context`` cached tokens, each bringing ``q`` new ones (distinct KV slots
    per request), on the device; logits for every new row ("all", verification) or the last."""
    import torch

    from faser_sgl.executor.forward_batch import ForwardBatch

    stride = stride or (context + q)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, q), generator=g).tolist()
    slots = [list(range(i * stride, i * stride + context + q)) for i in range(batch)]
    rows = [list(range(q)) if logits == "all" else [q - 1] for _ in range(batch)]
    return ForwardBatch.build(ids, slots, rows).to(device)


# -- timing ------------------------------------------------------------------------------------

class Profiler:
    def __init__(self, out: str, dry_run: bool, budget_s: float, plan: dict | None = None,
                 target_shape: str | None = None, device: str | None = None):
        import torch

        self.torch = torch
        self.out = out
        self.dry_run = dry_run
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.plan = dict(plan or PLANS["dry-run" if dry_run else "gpu"])
        if target_shape:
            self.plan["target"] = target_shape
        if device is None:
            device = "cpu" if dry_run else "cuda"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run on a CPU")
        from faser_sgl.executor.device import indexed_device

        self.device = indexed_device(device)  # "cuda:N": lanes and green contexts need the index
        self.dtype = getattr(torch, self.plan["dtype"])
        self.prof: dict = {"status": "running", "dry_run": dry_run, "budget_s": budget_s,
                           "plan": {k: v for k, v in self.plan.items()}, "skipped": {}, "errors": []}
        self.verify_cells: list[dict] = []
        self.draft_cells: list[dict] = []

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def save(self, status: str | None = None) -> None:
        if status:
            self.prof["status"] = status
        self.prof["elapsed_s"] = round(self.elapsed(), 2)
        self.prof["verify_grid"] = self.verify_cells
        self.prof["draft_grid"] = self.draft_cells
        sections = {"gpu_profile": self.prof, "units": "ms"}
        tp, dp = curve_points(self.verify_cells), curve_points(self.draft_cells)
        if tp:
            sections["target"] = {"points": tp}
        if dp:
            sections["draft"] = {"points": dp}
        splits = split_costs(self.prof.get("overlap"))  # (gpu_splits.py)
        if splits:
            sections["splits"] = splits
        env = self.prof.get("environment", {})
        models = self.prof.get("models", {})
        t, d = models.get("target", {}), models.get("draft", {})
        sections["name"] = ("dry-run-cpu-tiny" if self.dry_run else
                            f"gpu-{env.get('device_short', 'cuda')}-{self.plan['target']}-{self.plan['draft']}-random")
        sections["machine"] = (f"{env.get('device_name', self.device.type)}; torch {env.get('torch')}; "
                               f"{self.plan['dtype']}, {self.plan['backend']} attention; target "
                               f"{t.get('shape')} ({t.get('layers_measured')}/{t.get('layers_full')} layers), "
                               f"draft {d.get('shape')}; random weights; context {self.plan['context']}")
        sections["sources"] = {
            "target": "faser_sgl.sim.gpu_profile: verification passes (every new row gets logits) "
                      "over batch x tokens-per-request, same-token cells averaged, running max",
            "draft": "faser_sgl.sim.gpu_profile: draft passes (last row's logits) over batch x tokens",
            "splits": "faser_sgl.sim.gpu_profile overlap stage: each side's pass timed while the other side "
                      "keeps running, over the same pass on the whole device, mean over the overlap shapes",
            "caveat": ("dry run on a CPU with tiny shapes: checks the code path only" if self.dry_run else
                       "random weights of the real geometry; eager executor (no CUDA graphs); "
                       "wall time per pass with the device synchronised"),
        }
        if t.get("scale_to_full_depth"):
            sections["sources"]["depth"] = (f"target measured with {t['layers_measured']} of "
                                            f"{t['layers_full']} layers, curve scaled by layers")
        update_results(self.out, **sections)

    def time_fn(self, fn, warmup: int | None = None, reps: int | None = None) -> dict:
        warmup = self.plan["warmup"] if warmup is None else warmup
        reps = self.plan["reps"] if reps is None else reps
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t) * 1e3)
        return {"ms": round(statistics.median(times), 4), "ms_min": round(min(times), 4),
                "ms_max": round(max(times), 4), "reps": reps}

    def guard(self, what: str, need_s: float) -> bool:
        """True when ``need_s`` more seconds fit in the budget; else records the skip."""
        if self.left() < need_s:
            self.prof["skipped"][what] = f"budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"
            return False
        return True

    # -- stages
    def environment(self) -> None:
        torch = self.torch
        env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(self.device)}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env.update(device_name=props.name, device_short=props.name.split()[-1].lower(),
                       sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
            try:
                import flashinfer

                env["flashinfer"] = flashinfer.__version__
            except Exception as err:  # noqa: BLE001 - recorded, the backend will fail clearly
                env["flashinfer"] = f"not importable: {err}"
        else:
            env.update(device_name=f"CPU ({os.cpu_count()} cores)", threads=torch.get_num_threads())
        self.prof["environment"] = env

    def build(self) -> None:
        torch = self.torch
        plan = self.plan
        max_b, max_q = max(plan["batches"]), max(plan["tokens"])
        slots = max_b * (plan["context"] + max_q)
        sb, sq, sctx = plan["context_sweep"]
        slots = max(slots, sb * (max(sctx) + sq))
        tcfg = model_config(plan["target"])
        dcfg = model_config(plan["draft"])
        elem = torch.empty((), dtype=self.dtype).element_size()
        from faser_sgl.executor.kv_cache import kv_bytes_per_token

        def need(cfg):
            return param_count(cfg) * elem + slots * kv_bytes_per_token(cfg, self.dtype)

        layers_full = tcfg.num_layers
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # Activations of the largest pass (logits of 2048 rows in float32 and the MLP's
            # intermediate) and FlashInfer's workspaces: a generous fixed margin.
            margin = 8 * 2**30
            room = free - margin - need(dcfg)
            layers = layers_full
            while layers > 4 and need(model_config(plan["target"], layers)) > room:
                layers -= 4
            if layers != layers_full:
                tcfg = model_config(plan["target"], layers)
        t = time.monotonic()
        self.draft = RandomRunner(dcfg, self.dtype, self.device, plan["backend"], slots, seed=1)
        self.target = RandomRunner(tcfg, self.dtype, self.device, plan["backend"], slots, seed=0)
        self.sync()

        def describe(cfg, shape, full):
            return {"shape": shape, "layers_measured": cfg.num_layers, "layers_full": full,
                    "hidden": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                    "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
                    "vocab": cfg.vocab_size, "params_b": round(param_count(cfg) / 1e9, 3),
                    "weights_gib": round(param_count(cfg) * elem / 2**30, 2),
                    "scale_to_full_depth": cfg.num_layers != full}

        self.prof["models"] = {"target": describe(tcfg, plan["target"], layers_full),
                               "draft": describe(dcfg, plan["draft"], dcfg.num_layers),
                               "kv_slots": slots, "build_s": round(time.monotonic() - t, 2)}
        self.depth_scale = layers_full / tcfg.num_layers
        if self.device.type == "cuda":
            self.prof["models"]["memory_allocated_gib"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 2)

    def first_pass(self) -> None:
        """The first pass of each model builds FlashInfer's kernels (JIT, can take minutes)."""
        for name, runner in (("target", self.target), ("draft", self.draft)):
            t = time.monotonic()
            runner.forward(make_batch(1, 1, self.plan["context"], self.device, runner.config.vocab_size))
            self.sync()
            self.prof[f"first_pass_s_{name}"] = round(time.monotonic() - t, 2)
            self.save()

    def grid(self, runner, cells: list, tokens: tuple, logits: str, what: str, scale: float = 1.0) -> None:
        plan = self.plan
        shapes = sorted(((b, q) for b in plan["batches"] for q in tokens), key=lambda s: (s[0] * s[1], s[1]))
        last_ms = 1.0
        for b, q in shapes:
            need = (plan["warmup"] + plan["reps"] + 1) * last_ms / 1e3 * 2 + 2
            if not self.guard(f"{what} {b}x{q} and larger", need):
                break
            batch = make_batch(b, q, plan["context"], self.device, runner.config.vocab_size, logits=logits)
            r = self.time_fn(lambda: runner.forward(batch))
            last_ms = r["ms"]
            cell = {"batch": b, "tokens_per_request": q, "tokens": b * q, "context": plan["context"], **r}
            if scale != 1.0:
                cell["ms_measured"] = r["ms"]
                cell["ms"] = round(r["ms"] * scale, 4)
            cells.append(cell)
            self.save()

    def early_exit(self) -> None:
        import torch

        from faser_sgl.speculative.early_exit import LensPredictor

        runner, plan = self.target, self.plan
        model, kv, attn = runner.model, runner.kv_cache, runner.attn
        L = model.num_layers
        layers = sorted({min(L - 1, max(1, round(f * L))) for f in plan["exit_fractions"]})
        lens = LensPredictor(model)
        results = []
        self.prof["early_exit"] = {"layers_measured": L, "results": results}
        for b, q in plan["exit_shapes"]:
            if not self.guard(f"early exit {b}x{q}", 10):
                break
            batch = make_batch(b, q, plan["context"], self.device, runner.config.vocab_size)
            cands = torch.randint(3, runner.config.vocab_size, (b * q, 4), device=self.device)

            def prefix(e):
                attn.begin_forward(batch)
                h = model.embed(batch.input_ids)
                rope = model.rope(batch, h.dtype)
                h = model.forward_layers(h, batch, kv, attn, 0, e, rope)
                return h, rope, lens.margins(h, cands)

            def exit_pass(e):  # EarlyExitVerifier.forward when every request keeps its first row
                h, (cos, sin), _ = prefix(e)
                keep_rows = batch.qo_indptr[:-1]
                cut = batch.truncate([1] * b)
                attn.begin_forward(cut)
                h2 = model.forward_layers(h[keep_rows], cut, kv, attn, e, L, (cos[keep_rows], sin[keep_rows]))
                return model.compute_logits(h2[cut.logits_indices])

            with torch.inference_mode():
                full = self.time_fn(lambda: runner.forward(batch))
                entry = {"batch": b, "tokens_per_request": q, "full_ms": full["ms"], "exits": []}
                results.append(entry)
                for e in layers:
                    pre = self.time_fn(lambda: prefix(e))
                    ex = self.time_fn(lambda: exit_pass(e))
                    entry["exits"].append({
                        "layer": e, "fraction": round(e / L, 4), "prefix_ms": pre["ms"],
                        "prefix_fraction": round(pre["ms"] / full["ms"], 4),
                        "prune_to_one_ms": ex["ms"], "saving_ms": round(full["ms"] - ex["ms"], 4),
                        "saving_fraction": round(1 - ex["ms"] / full["ms"], 4)})
                    self.save()

    def splits(self) -> list:
        from faser_sgl.speculative import lanes

        if self.device.type != "cuda":
            return [("shared", lanes.SharedSplit())]
        total = self.torch.cuda.get_device_properties(self.device).multi_processor_count
        out = [("streams", lanes.CudaSplit(self.device, None))]
        for sms in (16, 32, total // 2 // 8 * 8):
            if 0 < sms < total:
                s = lanes.CudaSplit(self.device, sms)
                out.append((f"green_ctx_{sms}sm" if s.green else f"green_ctx_{sms}sm_unavailable", s))
        return out

    def overlap(self) -> None:
        plan = self.plan
        results = []
        self.prof["overlap"] = {"results": results}
        try:
            splits = self.splits()
        except Exception as err:  # noqa: BLE001 - recorded; the other measurements stand
            self.prof["overlap"]["error"] = repr(err)
            return
        self.prof["overlap"]["splits"] = [s.name for _, s in splits]
        fallbacks = {s.name: s.fallback_reason for _, s in splits if getattr(s, "fallback_reason", None)}
        if fallbacks:  # green contexts asked for and refused: why, beside the plain-stream numbers
            self.prof["overlap"]["green_ctx_fallbacks"] = fallbacks
        try:
            for b, q in plan["overlap_shapes"]:
                if not self.guard(f"overlap {b}x{q}", 15):
                    break
                vb = make_batch(b, q, plan["context"], self.device, self.target.config.vocab_size)
                db = make_batch(b, 1, plan["context"], self.device, self.draft.config.vocab_size, logits="last")
                verify = lambda: self.target.forward(vb)  # noqa: E731
                draft = lambda: self.draft.forward(db)  # noqa: E731
                serial_v = self.time_fn(verify)
                serial_d = self.time_fn(draft)
                serial = self.time_fn(lambda: (draft(), verify()))
                entry = {"batch": b, "verify_tokens_per_request": q, "draft_tokens_per_request": 1,
                         "verify_ms": serial_v["ms"], "draft_ms": serial_d["ms"], "serial_ms": serial["ms"],
                         "splits": []}
                results.append(entry)
                for label, split in splits:
                    if not self.guard(f"overlap {b}x{q} {label}", 8):
                        break

                    def draft_round(split=split):
                        with split.draft_side():
                            draft()

                    def verify_side(split=split):
                        with split.target_side():
                            verify()

                    def both(split=split):
                        fut = split.lane.submit(draft_round, split)
                        verify_side(split)
                        fut.result()

                    d_alone = self.time_fn(lambda: split.lane.submit(draft_round, split).result())
                    v_alone = self.time_fn(verify_side)
                    conc = self.time_fn(both)
                    v_busy, d_busy = busy_sides(self, split, draft_round, verify)
                    entry["splits"].append({
                        "split": label, "name": split.name, "draft_share": getattr(split, "draft_sms", None) or 0,
                        "draft_alone_ms": d_alone["ms"],
                        "verify_alone_ms": v_alone["ms"], "concurrent_ms": conc["ms"],
                        "speedup_vs_serial": round(serial["ms"] / conc["ms"], 4),
                        "verify_busy_ms": v_busy, "draft_busy_ms": d_busy})
                    self.save()
        finally:
            for _, s in splits:
                s.close()

    def context_sweep(self) -> None:
        b, q, contexts = self.plan["context_sweep"]
        cells = []
        self.prof["context_sweep"] = cells
        for ctx in contexts:
            if b * (ctx + q) > self.target.num_slots or not self.guard(f"context sweep {ctx}", 5):
                continue
            batch = make_batch(b, q, ctx, self.device, self.target.config.vocab_size)
            cells.append({"batch": b, "tokens_per_request": q, "context": ctx,
                          **self.time_fn(lambda: self.target.forward(batch))})
            self.save()

    def run(self) -> dict:
        self.environment()
        self.save()
        stages = [("build", self.build, 0), ("first_pass", self.first_pass, 0),
                  ("verify_grid", lambda: self.grid(self.target, self.verify_cells, self.plan["tokens"],
                                                    "all", "verify", self.depth_scale), 0),
                  ("draft_grid", lambda: self.grid(self.draft, self.draft_cells, self.plan["draft_tokens"],
                                                   "last", "draft"), 0),
                  ("early_exit", self.early_exit, 0), ("overlap", self.overlap, 0),
                  ("context_sweep", self.context_sweep, 0)]
        for name, stage, _ in stages:
            if not self.guard(name, 1):
                continue
            t = time.monotonic()
            try:
                stage()
            except Exception as err:  # noqa: BLE001 - recorded; later stages may still run
                import traceback

                self.prof["errors"].append({"stage": name, "error": repr(err),
                                            "traceback": traceback.format_exc()[-3000:]})
                if name in ("build", "first_pass"):
                    self.save("failed")
                    return self.prof
            self.prof.setdefault("stage_s", {})[name] = round(time.monotonic() - t, 2)
            self.save()
        done = not self.prof["errors"] and not self.prof["skipped"]
        self.save("complete" if done else "partial")
        return self.prof


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m faser_sgl.sim.gpu_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results JSON (a cost profile with the measurements under gpu_profile)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, torch attention")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting measurements after this")
    p.add_argument("--target-shape", choices=sorted(SHAPES), help="override the plan's target geometry")
    p.add_argument("--check-carry", nargs="*", metavar="PATH",
                   help="sum the working tree and these paths against --budget-mib, exit 1 if over")
    p.add_argument("--budget-mib", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.check_carry is not None:
        r = check_carry(args.check_carry, args.budget_mib)
        parts = ", ".join(f"{k} {v:.2f} MiB" for k, v in r["paths"].items())
        print(f"[carry] working tree {r['tree_mib']:.2f} MiB + {parts} = {r['total_mib']:.2f} MiB "
              f"(budget {r['budget_mib']:g} MiB): {'ok' if r['ok'] else 'OVER BUDGET'}")
        return 0 if r["ok"] else 1
    if not args.out:
        p.error("--out is required")
    prof = Profiler(args.out, args.dry_run, args.budget_s, target_shape=args.target_shape).run()
    print(f"[gpu_profile] {prof['status']} in {prof.get('elapsed_s')} s -> {args.out}")
    for err in prof["errors"]:
        print(f"[gpu_profile] error in {err['stage']}: {err['error']}", file=sys.stderr)
    return 0 if prof["status"] in ("complete", "partial") else 1


if __name__ == "__main__":
    sys.exit(main())
