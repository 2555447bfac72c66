"""Render docs/RESULTS.md from benchmark reports: every figure comes from a JSON file that a
``engram-ray bench ...`` command wrote, with the machine it ran on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..experiments.stats import interval_text, t95


def _read(folder: Path, name: str) -> dict[str, Any] | None:
    p = folder / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _machine(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('mem_gib', '?')} GiB, "
            f"Python {m.get('python', '?')}; {r.get('time_utc', '')}")


def _img(folder: Path, out: Path, name: str) -> str:
    png = folder / f"{name}.png"
    return f"\n![{name}]({os.path.relpath(png, out.parent)})\n" if png.exists() else ""


def _via(r: dict[str, Any]) -> str:
    via = r.get("memory", {}).get("via")
    return {"agent": ", read through the node-local lookup agent",
            "client": ", read through an EngramClient in the model's process"}.get(via, "")


def _offload(r: dict[str, Any], folder: Path, out: Path,
             title: str = "## Offload: what the Engram table costs by where it lives",
             name: str = "offload") -> list[str]:
    """Section: what the table costs by where it lives, per phase, with the time breakdown."""
    t, w = r["table"], r["workload"]
    phases = r.get("phases", ["prefill", "decode"])
    placement = ""
    if "engram" in r and "model" in r:
        placement = f" Engram at layers {r['engram']['layer_ids']} of {r['model']['n_layers']}."
    lines = [title, "",
             f"Machine: {_machine(r)}; device {r['device']}" + (f", backbone {r['dtype']}" if "dtype" in r else "")
             + ".", "", _offload_cores(r), "",
             f"Table: {t['logical_params'] / 1e9:.2f}B parameters ({t['logical_gib_float32']:.1f} GiB float32 "
             f"logical), {t['resident_gib_float32']:.2f} GiB resident"
             + (" (rows map into the resident store: every lookup still reads a random row of a large "
                "array in RAM)" if t["capped"] else "") + f", {t['shards']} shards{_via(r)}. Workload: "
             f"prefill {w['prefill_sequences']} sequences of Uniform{tuple(w['length_uniform'])} tokens, "
             "one at a time" + (", each one's rows asked for a forward ahead" if w.get("prefill_lookahead") else "")
             + f"; decode batch {w['decode_batch']} x {w['decode_tokens']} tokens"
             + (f"; serving {w['serving_requests']} requests, prompts Uniform{tuple(w['serving_prompt_uniform'])}, "
                f"outputs Uniform{tuple(w['serving_output_uniform'])}, continuous batching (at most "
                f"{w['serving_max_batch']} live, {w['serving_token_budget']} prefill tokens per step)"
                if "serving_requests" in w else "")
             + f". Median of {r['repeats']}, {r['order']}.{placement}", "",
             "| mode | " + " | ".join(f"{ph} tokens/s" for ph in phases) + " |",
             "|---|" + "---:|" * len(phases)]
    for m, v in r["results"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v[ph + '_tokens_per_s']:,.0f}" for ph in phases) + " |")
    o = r["overhead"]
    lines += ["", "| overhead | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for x, ref in (("remote", "local"), ("remote_lazy", "local"), ("remote", "no_engram"), ("local", "no_engram")):
        lines.append(f"| {x} vs {ref} | " + " | ".join(f"{100 * o[f'{ph}:{x}_vs_{ref}']:+.1f} %" for ph in phases)
                     + " |")
    if "overhead_paired" in r:
        pairs = [r["overhead_paired"][f"{ph}:remote_vs_local"] for ph in phases]
        lines.append("| remote vs local, paired per repetition: median [quartiles] | " + " | ".join(
            f"{100 * p['median']:+.1f} % [{100 * p['q1']:+.1f}, {100 * p['q3']:+.1f}]" for p in pairs) + " |")
    if r.get("lookup_p50_ms") is not None:
        lines += ["", f"Lookups: p50 {r['lookup_p50_ms']:.1f} ms, p99 {r['lookup_p99_ms']:.1f} ms; dedup ratio "
                  f"{r['dedup_ratio']:.2f}."]
    c = r.get("cache")
    if c:
        lines += ["", f"The agent's row cache ({c['policy']}, {c['capacity_rows']:,} rows, {c['bytes'] / 2**20:.0f} "
                  f"MiB): hit rate {100 * (c['hit_rate'] or 0):.1f} % of the unique rows looked up, "
                  f"{r['wire']['bytes_received'] / 2**20:.1f} MiB over gRPC and {r['wire']['bytes_saved'] / 2**20:.1f} "
                  "MiB from the cache. Every repetition replays the same requests, so the cache learns them in "
                  "the warm-up: this hit rate is an upper bound; `bench cache` below measures it on fresh text."]
    if "breakdown" in r:
        lines += _offload_breakdown(r)
    if r.get("trace"):
        lines += _offload_trace(r["trace"])
    lines.append(_img(folder, out, name))
    return lines


def _offload_trace(tr: dict[str, Any]) -> list[str]:
    """The ``--trace`` run per mode: the device's busy time against the wall time, and the host's
    cost of the same operators (launch-bound: the host's speed is the throughput)."""
    def per_call(t: dict[str, Any], call: str) -> str:
        c = next((x for x in t["runtime_calls"] if x["call"] == call), None)
        return f"{1e3 * c['host_ms'] / c['calls']:.1f}" if c and c["calls"] else "n/a"

    def host(t: dict[str, Any], op: str) -> str:
        h = next((x for x in t["host_top"] if x["op"] == op), None)
        return f"{h['self_ms']:.0f}" if h else "n/a"

    modes = list(tr["modes"].values())
    own = ("own time (less the CUDA calls inside them)" if modes and modes[0].get("host_self_excludes_runtime")
           else "time (this run's summary counted the CUDA calls made inside them too)")
    lines = ["", f"One {tr['phase']} run per mode under torch.profiler, after the timed runs (the profiler slows "
             "the host: compare the modes with each other, not with the table above). *busy*: the union of the "
             f"device's kernels and copies; the host's {own} in two of its operators, and what a kernel launch "
             "cost it:", "",
             "| mode | wall ms | device busy ms | device idle | aten::mm host ms | aten::mul host ms | "
             "cudaLaunchKernel us/call | blocking calls |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for mode, t in tr["modes"].items():
        busy = "n/a" if t["device_busy_ms"] is None else f"{t['device_busy_ms']:.1f}"
        idle = "n/a" if t["device_idle_share"] is None else f"{100 * t['device_idle_share']:.0f} %"
        blocking = ", ".join(f"{c['call']} x{c['calls']} ({c['host_ms']:.1f} ms)"
                             for c in t["runtime_calls"] if c["blocking"]) or "none"
        lines.append(f"| {mode} | {t['wall_ms']:.1f} | {busy} | {idle} | {host(t, 'aten::mm')} | "
                     f"{host(t, 'aten::mul')} | {per_call(t, 'cudaLaunchKernel')} | {blocking} |")
    return lines


def _offload_cache(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    return _offload(r, folder, out, title="### The same with the lookup agent's row cache on", name="offload_cache")


def _cache(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: the row cache's hit rate against its size on real text; Zipf fits; utilisation."""
    lines = ["## Hot rows: the lookup agent's cache on real text", "", f"Machine: {_machine(r)}.", "",
             "Each corpus's tokens stream in steps of batch x sequence through the table's hashing, one "
             "lookup per Engram layer per step (deduplicated, as the client sends it), replayed through the "
             "agent's `RowCache`; hit rate over the steps after a 25 % warm-up. The ceiling is the share of "
             "those lookups whose row had been read before (first reads miss in any cache).", "",
             "| corpus | layout | tokens | Zipf s | top 1 % of rows: reads | rows read | ceiling | "
             + " | ".join(f"{100 * c['share']:g} % {c['policy']}" for c in r["runs"][0]["curves"]) + " |",
             "|---|---|" + "---:|" * (5 + len(r["runs"][0]["curves"]))]
    for x in r["runs"]:
        lines.append(f"| {x['corpus']} | {x['preset']} | {x['tokens']:,} | {x['zipf_exponent']:.2f} | "
                     f"{100 * x['top1pct_share']:.0f} % | {100 * x['utilisation']:.3f} % | "
                     f"{100 * x['hit_rate_ceiling']:.1f} % | "
                     + " | ".join(f"{100 * c['hit_rate']:.1f} %" for c in x["curves"]) + " |")
    lines += ["", "Utilisation per table (distinct rows read / rows; the shards' HyperLogLog estimate beside it):", "",
              "| corpus | layout | layer | order | rows | read | utilisation | HyperLogLog |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["runs"]:
        for t in x["tables"]:
            lines.append(f"| {x['corpus']} | {x['preset']} | {t['layer']} | {t['order']} | {t['rows']:,} | "
                         f"{t['touched']:,} | {100 * t['utilisation']:.3f} % | {t['touched_hll']:,.0f} |")
    lines.append(_img(folder, out, "cache"))
    return lines


def _offload_cores(r: dict[str, Any]) -> str:
    """One sentence: which cores the model and the memory side had (read back from /proc)."""
    iso = r.get("isolation")
    if not iso:
        return "Cores: not recorded."
    if not iso["enabled"]:
        return "Cores: shared by the model, the shards, the client and Ray (not isolated)."
    procs = sorted({p["name"] for p in iso["processes"]})
    return (f"Cores: the model thread and its torch threads on {iso['compute_cores']}; the memory side "
            f"(the client's I/O and gRPC threads, {', '.join(procs) or 'no local processes'}) on "
            f"{iso['memory_cores']}; read back from /proc: {'as asked' if iso['ok'] else 'NOT as asked'}.")


def _offload_breakdown(r: dict[str, Any]) -> list[str]:
    """Where an offload run's time goes, per phase and mode, and the client's cost per lookup."""
    lines = ["", "Where a run's time goes (mean seconds per run; *wait* is time blocked for rows (for the "
              "in-process table: its gather), *stage* the rest of taking them (staging, the copy's event, the "
              "expand), *issue* the caller's cost of starting a fetch, *compute* the rest; *off-CPU* is the model "
              "thread's time asleep, inside the others: blocking proper; *memory busy* the memory cores' busy seconds, "
              "every process on them, at the kernel's 10 ms tick):", "",
              "| phase:mode | total s | spread (min-max) s | compute | hash | issue | wait | stage | off-CPU | "
              "memory busy |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, b in r["breakdown"].items():
        phase, mode = key.split(":")
        sp = r["results"][mode][f"{phase}_spread_s"]
        lines.append(f"| {key} | {b['total_s']:.3f} | {sp['min']:.3f}-{sp['max']:.3f} | {b['compute_s']:.3f} | "
                     f"{b['hash_s']:.3f} | {b['issue_s']:.3f} | {b['wait_s']:.3f} | "
                     + (f"{b['stage_s']:.3f} |" if "stage_s" in b else "n/a |")  # older reports: in compute
                     + (f" {b['off_cpu_s']:.3f} |" if "off_cpu_s" in b else " n/a |")
                     + (f" {b['memory_busy_s']:.3f} |" if "memory_busy_s" in b else " n/a |"))
    pl = r["per_lookup"]
    fc = r.get("fetch_cost")
    if fc:
        lines += ["", f"The model thread's cost per fetch through the agent ({fc['layers']} layers x "
                  f"{fc['ids_per_layer']} ids, decode-shaped): issue {fc['issue_us']['median']:.0f} µs + read "
                  f"the replies {fc['ready_us']['median']:.0f} µs = {fc['total_us']['median']:.0f} µs median "
                  f"({fc['total_us']['p90']:.0f} µs p90)"
                  + (f"; the rows were in {1e3 * fc['gap_s']:.0f} ms after the issue for "
                     f"{100 * fc['in_by_gap']:.0f} % of fetches (reading is the thread's CPU time)."
                     if "in_by_gap" in fc else " (measured before `in_by_gap`: reading may include rows "
                     "still travelling after the 2 ms gap).")]
    if not pl:
        return lines
    via_agent = r.get("memory", {}).get("via") == "agent"
    where = ("the agent's client (its I/O thread, or a connection's thread for direct lookups)"
             if pl.get("lookups_direct") else
             "the agent's client I/O thread" if via_agent else "the client's I/O thread")
    lines += ["", f"Per lookup, in {where} (ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in pl["client_io_ms"].items())
              + f"; {pl['rpcs_per_lookup']:.1f} RPCs per lookup, shard handler "
              f"{pl['server_handler_ms_per_rpc']:.2f} ms per RPC."
              + (f" {pl['lookups_direct']:,} of {pl['lookups']:,} lookups were answered directly on the agent's "
                 f"connection thread, {pl.get('lookups_streamed', 0):,} of them as messages on the shard's "
                 f"LookupStream ({pl['lookups_direct_failed']:,} tries fell back)."
                 if pl.get("lookups_direct") else "")]
    return lines


def _table(title: str, r: dict[str, Any], intro: str, columns: list[str], rows: list[list[str]],
           image: str = "") -> list[str]:
    """A section: its title, the machine, one paragraph, a table of right-aligned columns, and
    the plot beside the report if there is one."""
    align = "|".join(["---:"] * len(columns))
    return ([title, "", f"Machine: {_machine(r)}.", "", intro, "", "| " + " | ".join(columns) + " |", f"|{align}|"]
            + ["| " + " | ".join(row) + " |" for row in rows] + [image or ""])


def _lookup(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: the client's data plane against an in-process gather."""
    return _table("## Lookup data plane: client vs in-process gather", r,
                  f"{r['table_rows']:,} rows of {r['row_bytes']} B; {r['transport']}. Median of {r['repeats']}.",
                  ["shards", "rows", "client rows/s", "client GB/s", "in-process GB/s", "time ratio"],
                  [[f"{v['shards']}", f"{v['rows']:,}", f"{v['client_rows_per_s']:,.0f}", f"{v['client_gb_per_s']:.2f}",
                    f"{v['local_gb_per_s']:.2f}", f"{v['client_over_local']:.1f}x"] for v in r["results"]],
                  _img(folder, out, "lookup"))


def _latency(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: lookup latency against resident table size."""
    return _table("## Lookup latency vs table size (O(1))", r,
                  f"{r['batch_rows']:,} random rows per lookup, {r['calls_per_size']} lookups per size, "
                  f"{r['shards']} shards; {r['note']}.", ["resident GiB", "p50 ms", "p99 ms"],
                  [[f"{v['resident_gib']:.2f}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}"] for v in r["results"]],
                  _img(folder, out, "latency"))


def _latency_mmap(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: a memory-mapped shard's gather latency, pages warm or on disk."""
    return _table("## Disk-backed shards: gather latency, warm and cold pages", r,
                  f"{r['batch_rows']:,} random rows per lookup, {r['calls_per_size']} lookups per size and kind; "
                  f"{r['note']}.", ["table GiB", "warm p50 ms", "warm p99 ms", "cold p50 ms", "cold p99 ms"],
                  [[f"{v['table_gib']:.2f}"] + [f"{v[k]:.2f}" for k in ("warm_p50_ms", "warm_p99_ms", "cold_p50_ms",
                                                                         "cold_p99_ms")] for v in r["results"]],
                  _img(folder, out, "latency_mmap"))


def _agent_hop(r: dict[str, Any], folder: Path, out: Path, title: str = "") -> list[str]:
    """Section: a lookup's round trip through the lookup agent against an in-process client."""
    cores = "; ".join(f"{k} on {v}" for k, v in r["cores"].items())
    return _table(title or "## The lookup agent's hop", r,
                  f"{r['preset']} layout, {r['shards']} plain shards, {r['calls_per_size']} interleaved round trips "
                  f"per size (prefetch_unique -> result). Cores: {cores}.",
                  ["ids", "client p50 ms", "agent p50 ms", "client p90 ms", "agent p90 ms", "agent adds (p50)"],
                  [[f"{v['ids']:,}"] + [f"{v[k]:.3f}" for k in ("client_p50_ms", "agent_p50_ms", "client_p90_ms",
                                                                 "agent_p90_ms")] + [f"{v['agent_extra_ms']:+.3f} ms"]
                   for v in r["results"]])


def _agent_hop_own_core(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    return _agent_hop(r, folder, out, "### The same, with the agent on the worker's core (idle while it waits)")


def _load(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: errors and memory growth under sustained lookups."""
    m = r["memory"]
    lines = ["## Load: errors and memory under sustained lookups", "", f"Machine: {_machine(r)}.", "",
              f"{r['lookups']:,} lookups of {r['batch']} random ids ({r['ids']:,} ids) at concurrency "
              f"{r['concurrency']}, {r['shards']} shards: {r['errors']} errors, {r['retries']} retries, "
              f"{r['lookups_per_s']:,.0f} lookups/s, p50 {r['latency_p50_ms']:.1f} ms, p99 "
              f"{r['latency_p99_ms']:.1f} ms. RSS growth after warm-up: "
              f"client {100 * m['client_rss_growth']:+.1f} %, "
              f"shards (worst) {100 * m['shard_rss_growth']:+.1f} %.", _img(folder, out, "load")]
    return lines


def _recovery(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: a killed shard copy: reload or copy, and the lookups meanwhile."""
    lines = ["## Recovery: a killed shard copy", "", f"Machine: {_machine(r)}.", "",
              f"{r['shards']} shards; shard 0's first copy is killed during a stream of lookups "
              "(one copy: it reloads its recovery checkpoint; two: the other copy serves, and the "
              "killed one copies it when it returns).", "",
              "| copies | shard MiB | checkpoint s | first lookup after kill s | copy serving again s | "
              "reload / copy s | stream lookups meanwhile | failed |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in r["results"]:
        lines.append(f"| {v['replicas']} | {v['shard_mib']:.1f} | {v['checkpoint_s']:.3f} | "
                     f"{v['first_lookup_after_kill_s']:.3f} | {v['copy_serving_again_s']:.3f} | "
                     f"{v['reload_s']:.3f} | {v['stream_lookups_during']:,} | {v['stream_failures']} |")
    lines.append("")
    return lines


def _hash(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: hashing throughput against the reference's loop."""
    lines = ["## Hashing throughput", "", f"Machine: {_machine(r)}.", "",
              f"{r['source']} layout ({r['layers']} layers x {r['heads_per_layer']} heads), "
              "against the reference's "
              f"per-head loop, interleaved; median of {r['repeats']}.", "",
              "| phase | batch | seq | ours tokens/s | reference tokens/s | speedup |",
              "|---|---:|---:|---:|---:|---:|"]
    for v in r["results"]:
        lines.append(f"| {v['phase']} | {v['batch']} | {v['seq_len']} | {v['ours_tokens_per_s']:,.0f} | "
                     f"{v['reference_tokens_per_s']:,.0f} | {v['speedup']:.2f}x |")
    lines.append(_img(folder, out, "hash"))
    return lines


def _gpu(summary: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: the last GPU check (scripts/gpu_check.sh; ``folder`` = results/gpu)."""
    steps, env = summary["steps"], summary["steps"].get("env", {})
    lines = ["## On a GPU: scripts/gpu_check.sh", "",
             f"{env.get('device', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), "
             f"{env.get('cpus', '?')} CPU threads; started {summary.get('started', '?')}; no Ray there "
             "(shards and the lookup agent run as plain processes). Steps: "
             + ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in steps.items()) + "."
             + (f" The shards ran on cores {steps['shards']['cores']}." if steps.get("shards", {}).get("cores")
                else " The shards ran unpinned."), ""]
    tr = steps.get("train", {})
    if tr.get("ok"):
        lines += [f"Training through two `engram-ray shard` processes on {tr['device']}: {tr['steps']} steps, "
                  f"val loss {tr['val_loss_before']:.2f} -> {tr['val_loss_after']:.2f}, "
                  f"{tr['tokens_per_second']:,.0f} tokens/s, blocked for rows {tr['fetch_wait_seconds']:.3f} s "
                  f"of {tr['train_seconds']:.2f} s.", ""]
    r = _read(folder, "offload")
    if r:
        lines += _offload(r, folder, out, title="### Offload on the GPU")
    r = _read(folder / "trace", "offload")
    if r:  # a second, smaller run of the check with --trace (results/gpu/trace)
        lines += _offload(r, folder / "trace", out, title="### A smaller run of the same check, traced")
    return lines


def _allocation(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: the sparsity-allocation sweep (``engram-ray experiment allocation``)."""
    t, sc = r["train"], r["scale"]
    rows = [[x["arm"], str(x["routed_experts"]), f"{x['rho']:.3f}", f"{x['params']['total']:,}",
             f"{x['params']['activated']:,}", f"{x['val_loss']:.4f} +- {x['val_loss_se']:.4f}",
             "-" if x is r["summary"][0] else interval_text(x["vs_moe"]).split(" (")[0],
             "-" if x is r["summary"][0] else ("yes" if x["vs_moe"]["exceeds_noise"] else "no")]
            for x in r["summary"]]
    return _table("## Experiment: sparsity allocation (loss against rho)", r,
                  f"One parameter budget split between routed experts and Engram memory: routed experts removed "
                  f"(top-k held), their parameters given to the table. {len(r['seeds'])} seeds, {t['steps']} steps "
                  f"of {t['batch_size']} x {t['seq_len']} tokens on {r['corpus']} ({sc['tokens_per_run']:,} tokens, "
                  f"{sc['flops_per_run']:.2e} training FLOPs a run), the paper's recipe, val loss over "
                  f"{r['eval_batches']} fixed batches; val loss +- one standard error over seeds; the difference "
                  f"+- its 95 % interval (Student's t with {len(r['seeds']) - 1} degrees of freedom: "
                  f"{t95(len(r['seeds']) - 1):.1f} standard errors). Scale: "
                  f"{sc['total_params'] / 1e6:.1f}M parameters, {sc['note']}.",
                  ["arm", "routed experts", "rho", "total params", "activated", "val loss", "vs pure MoE",
                   "beyond the noise"], rows, _img(folder, out, "allocation"))


def _iso(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: one iso-parameter pair and the Engram-off ablation (``engram-ray experiment iso``)."""
    moe, eng = r["summary"]
    v, t = eng["vs_moe"], r["train"]
    rows = [[p["seed"], f"{p['moe']:.4f}", f"{p['engram']:.4f}", f"{p['engram_off']:.4f}",
             "-" if p["gain_remaining"] is None else f"{p['gain_remaining']:+.2f}"] for p in r["ablation"]["per_seed"]]
    return _table("## Experiment: iso-parameter MoE vs Engram-MoE, and Engram off at inference", r,
                  f"{moe['arm']} ({moe['params']['total']:,} params) against {eng['arm']} "
                  f"({eng['params']['total']:,} params, rho {eng['rho']:.3f}): {len(r['seeds'])} seeds, {t['steps']} "
                  f"steps of {t['batch_size']} x {t['seq_len']} tokens on {r['corpus']}. Gap with its 95 % "
                  f"interval: {interval_text(v)}. Engram off "
                  "(the paper's section 6.3): the Engram model evaluated with its Engram layers skipped, and the share "
                  f"of its gain over the MoE that remains (below 0: worse than the MoE). Scale: {r['scale']['note']}.",
                  ["seed", "MoE", "Engram-MoE", "Engram off", "gain remaining"],
                  [[str(c) for c in row] for row in rows] + [_iso_mean(r)])


def _iso_mean(r: dict[str, Any]) -> list[str]:
    """The iso table's mean row (the share of the gain is a ratio of small gains: per seed only)."""
    ps = r["ablation"]["per_seed"]
    mean = [sum(p[k] for p in ps) / len(ps) for k in ("moe", "engram", "engram_off")]
    return ["mean", *(f"{m:.4f}" for m in mean), "(per seed: a ratio of small gains)"]


def _interference(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: what work on the memory cores costs compute on the compute cores."""
    iso, w, g, m = r["isolation"], r["workload"], r["gather"], r["model"]
    rows = []
    for k, x in r["results"].items():
        q1, q3 = x["slowdown_quartiles"]
        rate = "-" if k == "idle" else f"{x['rate_per_s']:,.0f} {x['rate_unit']}/s" + (
            f" ({x['gib_per_s']:.2f} GiB/s{' read+write' if k == 'stream' else ''})" if "gib_per_s" in x else "")
        if k == "decode":  # paced: a step every cadence_ms, and what each role spent on it
            kept = f" ({100 * x['pace_kept']:.0f} % of that pace kept)" if "pace_kept" in x else ""
            rate += (f", a step every {x['cadence_ms']:.1f} ms{kept}; CPU per step: "
                     + ", ".join(f"{role} {us:,.0f} µs" for role, us in x["cpu_us_per_step"].items())
                     + f"; memory cores {100 * x['memory_side_busy']:.1f} % busy")
        rows.append([k, f"{1e3 * x['median_s']:.1f}", f"{100 * x['slowdown']:+.1f} %",
                     f"{100 * q1:+.1f} / {100 * q3:+.1f} %", rate])
    return _table("## Interference: the memory cores' work against the compute cores", r,
                  f"The decode-shaped forward of bench offload's backbone ({m['n_layers']} layers of {m['dim']}, batch "
                  f"{w['decode_batch']} x {w['positions']} positions, best of {w['best_of']}) on cores "
                  f"{iso['compute_cores']}, while one process per memory core ({iso['memory_cores']}) runs flat out "
                  f"at: nothing; Python arithmetic (spin); random lookups of {g['rows_per_lookup']} rows of "
                  f"{g['row_bytes']} B from a {g['table_gib_per_core']:g} GiB table (gather: a shard's reads without "
                  f"gRPC); copying 64 MiB (stream)"
                  + ("; a shard of the 100B layout with that many GiB resident, served over gRPC on loopback, "
                     "and a client in the same process asking it for as many random rows per call (lookup)"
                     if "lookup" in r["results"] else "")
                  + f". {r['rounds']} rounds after a warm-up round, the order rotated; "
                  "each load's slowdown is paired with its round's idle run (median, quartiles). The loads run flat "
                  "out (their rates are in the last column), far harder than a memory side answering one worker: "
                  "the figures bound what such work costs the model through the machine's shared cache, memory "
                  "and power."
                  + (" Except decode: bench offload's memory side itself (two shards of the 100B layout and the "
                     "lookup agent, plain processes on the memory cores) answering one decode step's lookups per "
                     "step of the forward, asked by a driver process there that stands in for the worker (its CPU "
                     "is counted apart: in bench offload that part runs on the compute cores). Its slowdown is what "
                     "the memory side's work costs the model on this machine."
                     if "decode" in r["results"] else ""),
                  ["load", "forward ms", "slowdown", "quartiles", "load's rate"], rows,
                  _img(folder, out, "interference"))


def _analyze(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: LogitLens and CKA of the iso pair (``engram-ray analyze``)."""
    a, t, pr = r["analysis"], r["train"], r["probe"]
    moe, eng = r["summary"]
    ll = a["logit_lens"]
    yes = {True: "yes", False: "no"}
    lens_rows = [[str(i), f"{ll['moe']['kl'][i]:.3f} +- {ll['moe']['kl_se'][i]:.3f}",
                  f"{ll['engram']['kl'][i]:.3f} +- {ll['engram']['kl_se'][i]:.3f}",
                  "-" if d is None else interval_text(d, 3).split(" (")[0],
                  "-" if d is None or d["ci95"] is None else yes[d["exceeds_noise"]],
                  f"{ll['moe']['loss'][i]:.3f}", f"{ll['engram']['loss'][i]:.3f}"]
                 for i, d in enumerate(ll["engram_minus_moe"])]
    lines = _table("## Analysis: LogitLens and CKA, Engram-MoE against MoE", r,
                   f"An iso pair built as `experiment iso` builds it, {r['arms'][0]['model']['n_layers']} "
                   f"layers ({moe['arm']}, {moe['params']['total']:,} params, against "
                   f"{eng['arm']}, {eng['params']['total']:,} params, rho {eng['rho']:.3f}; val loss "
                   f"{moe['val_loss']:.3f} vs {eng['val_loss']:.3f}), {len(r['seeds'])} seeds, {t['steps']} steps of "
                   f"{t['batch_size']} x {t['seq_len']} tokens on {r['corpus']}, probed on {pr['lens_tokens']:,} "
                   f"held-out tokens (CKA on the first {pr['cka_tokens']:,}). State 0 is the embedding, state i the "
                   f"residual stream after i blocks (Engram layers in blocks {r['arms'][1]['engram']['layer_ids']}: "
                   "block b's shows from state b + 1). LogitLens: KL(final || the state read through the final "
                   "norm and "
                   f"head), nats, mean +- se over {ll['engram']['se_over']}; the difference +- its 95 % interval; "
                   f"each state's own next-token loss beside. Scale: {r['scale']['note']}.",
                   ["state", "KL, MoE", "KL, Engram-MoE", "Engram - MoE", "beyond the noise", "loss, MoE",
                    "loss, Engram-MoE"], lens_rows, _img(folder, out, "analyze_logit_lens"))
    al = a["cka"]["alignment"]
    if "shift" in al[0]:
        cka_rows = [[str(x["state"]) + (" (before Engram)" if x.get("before_engram") else ""),
                     f"{x['alignment']:.2f}", f"{x['reference']:.2f}",
                     interval_text(x["shift"], 2).split(" (")[0],
                     "-" if x["shift"]["ci95"] is None else yes[x["shift"]["exceeds_noise"]]] for x in al]
        lines += ["", f"Linear CKA between every state of the two models; per Engram-MoE state, the paper's soft "
                      f"alignment index over the top-{a['top_k']} MoE states. Each pair crosses seeds (rows: the MoE "
                      "of seed s; columns: the Engram-MoE of the next seed), and the reference is the same index of "
                      "the next seed's MoE against the same rows: what seed noise and the index's bias at the ends "
                      "give. The shift is their difference, +- its 95 % interval (approximate: the pairs share "
                      "models); positive: the Engram state resembles deeper MoE states than another MoE's does. "
                      "States before the first Engram layer differ only through training." + _resolution_text(a), "",
                  "| Engram state | alignment | MoE-vs-MoE | shift | beyond the noise |", "|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in cka_rows]
    return lines + [_img(folder, out, "analyze_cka")]


def _resolution_text(a: dict[str, Any]) -> str:
    res = a["cka"].get("depth_resolution")
    if not res:
        return ""
    return (f" CKA's depth resolution at this scale, between two MoE seeds: {res['same_state']:.3f} for the same "
            f"state against {res['other_states']:.3f} for different states (gap {res['gap']:+.3f}); the smaller the "
            "gap, the less the alignment index can say.")


def _overlap(r: dict[str, Any], folder: Path, out: Path) -> list[str]:
    """Section: what a burst of lookups, and a sleep, cost the compute that follows."""
    c, iso = r["chunk"], r["isolation"]
    rows = []
    for setting, x in r["results"].items():
        for cond, y in x["conditions"].items():
            q1, q3 = y["extra_us_quartiles"]
            rows.append([setting, cond, f"{y['median_us']:,.0f}", f"{y['extra_us']:+.0f}", f"{q1:+.0f} / {q3:+.0f}"])
        for key, label in (("sleep_us", "idle - idle_poll"), ("memory_work_us", "after - idle_poll")):
            if key in x:
                m = x[key]
                rows.append([setting, label, "", f"{m['median']:+.0f}",
                             f"{m['quartiles'][0]:+.0f} / {m['quartiles'][1]:+.0f}"])
    trips = ", ".join(f"{k} {x['round_trip_us']:,.0f} µs" for k, x in r["results"].items())
    which = (" (the blocks before the first Engram layer)"
             if c["layers"] == c.get("first_engram_layer", c["layers"]) else "")
    return _table("## Overlap: a step's lookups against the compute around them", r,
                  f"One decode step of {c['layers']} blocks{which}, batch {c['decode_batch']} ({c['what']}) on "
                  f"cores {iso.get('compute_cores')}, the memory side on {iso.get('memory_cores')}: right after "
                  "the previous step (none), after sleeping (idle) or polling (idle_poll) for a lookup's round "
                  "trip, with a decode step's lookups in flight (inflight) and right after they came in "
                  "(after). shards: every lookup answered by a shard on this machine; agent_only: by the "
                  f"agent's row cache, the shards idle. Round trips: {trips}. {r['iterations']} iterations "
                  f"({r['order']}); extra µs paired with the setting's none run of the same iteration "
                  "(median, quartiles).",
                  ["memory side", "condition", "step µs", "extra µs", "quartiles"], rows)


#: Sections in page order, each rendered from ``<folder>/<name>.json`` when it exists.
SECTIONS = {"offload": _offload, "offload_cache": _offload_cache, "interference": _interference,
            "overlap": _overlap, "cache": _cache,
            "agent_hop": _agent_hop, "agent_hop_own_core": _agent_hop_own_core,
            "lookup": _lookup, "latency": _latency, "latency_mmap": _latency_mmap, "load": _load,
            "recovery": _recovery, "hash": _hash, "allocation": _allocation, "iso": _iso,
            "analyze": _analyze}


def write_results(results: str | Path, out: str | Path) -> Path:
    """Write the results page ``out`` from the benchmark JSON files in ``results``."""
    folder, out = Path(results), Path(out)
    lines = ["# Benchmark results", "",
             "Generated by `make bench` (`engram-ray bench ...` then `engram-ray bench report`) from the "
             f"JSON in `{folder}/`. Ratios are measured side by side in one run; absolute figures hold "
             "only for the machine named with each.", ""]
    for name, section in SECTIONS.items():
        r = _read(folder, name)
        if r:
            lines += section(r, folder, out)
    gpu = _read(folder / "gpu", "summary")
    if gpu:
        lines += _gpu(gpu, folder / "gpu", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
