"""The bench's outputs besides the JSON: the summary's figures, PNG plots, and the README's table.

``python -m mesh bench --write-readme`` rewrites the block between the README's ``<!-- bench-table -->``
markers from ``bench/results/latest.json`` (or the file given with ``--from``), so the README's
performance table is always a copy of a committed result file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh.bench_spec import TARGETS

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "<!-- bench-table -->"


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _k(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The summary's values (None where the run did not measure them)."""
    search, mem0, ingest = results.get("search", {}), results.get("mem0", {}), results.get("ingest", {})
    v: dict[str, Any] = {}
    for size in (1000, 10_000, 100_000):
        v[f"search_p95_ms_{_k(size)}"] = _get(search, "single", str(size), "p95_ms")
        native = v[f"search_p95_ms_{_k(size)}"]
        theirs = _get(mem0, "single", str(size), "p95_ms")
        v[f"search_p95_ms_{_k(size)}_mem0"] = theirs
        v[f"search_p95_ratio_mem0_{_k(size)}"] = round(theirs / native, 3) if theirs and native else None
    v["search_qps_8_10k"] = _get(search, "concurrency", "10000", "8", "qps")
    v["search_p95_ms_8_10k"] = _get(search, "concurrency", "10000", "8", "p95_ms")
    v["search_p95_ratio_ingesting"] = _get(search, "ingesting", "p95_ratio")
    v["chat_p95_ms_50"] = _get(results, "mesh", "chat", "turn", "p95_ms")
    v["chat_without_memory_50"] = _get(results, "mesh", "chat", "without_memory")
    v["chat_p95_ms_50_paced"] = _get(results, "mesh", "chat_paced", "turn", "p95_ms")
    v["chat_without_memory_50_paced"] = _get(results, "mesh", "chat_paced", "without_memory")
    v["ingest_per_s_1"] = _get(ingest, "short", "1", "per_s")
    v["ingest_per_s_1_long"] = _get(ingest, "long", "1", "per_s")
    v["ingest_scale_2"] = _get(ingest, "short", "scale_2")
    v["ingest_per_s_1_uncarried"] = _get(ingest, "short", "uncarried", "per_s")
    v["ingest_per_s_1_long_uncarried"] = _get(ingest, "long", "uncarried", "per_s")
    ready = _get(results, "mesh", "ready") or {}
    v["ready_s"] = max((r["median_s"] for r in ready.values()), default=None)
    counted = [r for group in ("single", "concurrency") for r in (mem0.get(group) or {}).values()]
    v["mem0_fewer_than_limit"] = sum(r["fewer_than_limit"] for r in counted) if counted else None
    return v


def mem0_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """mem0 over native, per size both measured: p50 and p95 of one requester."""
    out = {}
    for size, theirs in (_get(results, "mem0", "single") or {}).items():
        ours = _get(results, "search", "single", size)
        if ours and ours.get("p50_ms") and ours.get("p95_ms") and theirs.get("p50_ms"):
            out[size] = {"p50": round(theirs["p50_ms"] / ours["p50_ms"], 3),
                         "p95": round(theirs["p95_ms"] / ours["p95_ms"], 3),
                         "native_fewer_than_limit": ours["fewer_than_limit"],
                         "mem0_fewer_than_limit": theirs["fewer_than_limit"], "searches": theirs["n"]}
    return out


# --------------------------------------------------------------------------- plots
def plots(report: dict[str, Any], stem: Path) -> list[str]:
    """search latency against memories per user; throughput against requesters and against processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")

    results, written = report["results"], []
    title = f"{report['kind']} run, {report['generated_at']}, {report['machine']['cores']} cores"
    single = _get(results, "search", "single") or {}
    if single:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sizes = sorted(int(s) for s in single)
        for q, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^:")):
            ax.plot(sizes, [single[str(s)][f"{q}_ms"] for s in sizes], style, label=f"native {q}")
        theirs = _get(results, "mem0", "single") or {}
        if theirs:
            m = sorted(int(s) for s in theirs)
            ax.plot(m, [theirs[str(s)]["p50_ms"] for s in m], "o--", label="mem0 p50")
            ax.plot(m, [theirs[str(s)]["p95_ms"] for s in m], "s--", label="mem0 p95")
        ax.axhline(20, color="grey", linestyle=":", linewidth=1, label="target p95 at 10k (20 ms)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [_k(s) for s in sizes])
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("memories per user")
        ax.set_ylabel("search round trip through the bus (ms)")
        ax.set_title(f"ltm search, one requester\n{title}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-search-latency.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    conc = _get(results, "search", "concurrency") or {}
    procs = _get(results, "search", "processes") or {}
    ingest = results.get("ingest") or {}
    if conc or procs or ingest:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for size in sorted(conc, key=int):
            levels = sorted(conc[size], key=int)
            left.plot([int(n) for n in levels], [conc[size][n]["qps"] for n in levels], "o-",
                      label=f"{_k(int(size))} memories/user")
        left.axhline(150, color="grey", linestyle=":", linewidth=1, label="target at 10k (150/s)")
        left.set_xticks(sorted({int(n) for size in conc for n in conc[size]}))
        left.set_xlabel("concurrent requesters")
        left.set_ylabel("searches/s")
        left.set_title("search throughput, one ltm process", fontsize=9)
        left.legend(fontsize=8)
        cfg = report["config"]
        series = [(f"search, {max(cfg['concurrency'])} requesters, {_k(cfg['scale_size'])} memories/user", procs,
                   "qps")] if procs else []
        series += [(f"ingest, {k} turns", ingest.get(k) or {}, "per_s") for k in ("short", "long")]
        for label, data, key in series:
            ns = sorted((n for n in data if n.isdigit()), key=int)
            if ns:
                right.plot([int(n) for n in ns], [data[n][key] for n in ns], "o-", label=label)
        right.set_xticks([1, 2])
        right.set_xlabel("ltm processes")
        right.set_ylabel("per second (searches or updates)")
        right.set_yscale("log")
        right.yaxis.set_major_formatter(plain)
        right.yaxis.set_minor_formatter(plain)
        right.set_title("throughput against ltm processes", fontsize=9)
        right.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# --------------------------------------------------------------------------- README
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def readme_block(report: dict[str, Any], source: str) -> str:
    m = report["machine"]
    lines = [
        f"From `{source}` ({report['kind']} run, {report['generated_at']}, {m['cpu']}, {m['cores']} cores, "
        f"load average at start {m.get('loadavg_start', '-')}; {report['config']['seed']['rows']:,} memories in "
        f"`ltm_memories`). Regenerate with `python -m mesh bench --write-readme`.",
        "",
    ]
    ref = m.get("reference")
    if ref:  # the machine's speed at the time: shared VMs vary by 2x from one day to the next
        lines += [f"Machine speed at the start of the run: one query embedding {ref['embed_query_ms']} ms (ONNX, one "
                  f"thread), dot products over 10k vectors {ref['dot_10k_ms']} ms (medians).", ""]
    if report["kind"] != "full":
        lines += [f"This is a `{report['kind']}` run (smaller sizes and fewer repetitions than `make bench`): the "
                  "figures are indicative only; a full run's file replaces them.", ""]
    lines += [
        "| figure | measured | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for t in TARGETS:
        row = report["summary"].get(t.key)
        if row is None:
            continue
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(f"| {t.what} | {_fmt(row['value'])} {t.unit if row['value'] is not None else ''} | "
                     f"{row['target'] or '-'} | {met} |")
    lines.append("")
    lines += _cpu_lines(report.get("results", {}))
    lines += [f"![{Path(p).stem}]({Path(source).parent / p})" for p in report.get("plots", [])]
    return "\n".join(lines)


def _cores(cpu: dict[str, Any]) -> str:
    """"memory 0.57, ltm 0.62 (its children 0.21), ..." from a CPU meter's figures (mesh/bench_cpu.py)."""
    children = cpu.get("of_which_children", {})
    parts = []
    for label, cores in sorted(cpu["cores"].items(), key=lambda kv: -kv[1]):
        inner = children.get(f"{label}.children")
        parts.append(f"{label} {cores:.2f}" + (f" (its children {inner:.2f})" if inner else ""))
    return ", ".join(parts) + (f"; {cpu['cores_total']:.2f} in all" if cpu.get("cores_total") is not None else "")


def _cpu_lines(results: dict[str, Any]) -> list[str]:
    """Where the CPU went in the runs whose targets two cores bound: the chat burst and the ingest runs."""
    items = []
    chat = results.get("mesh", {}).get("chat", {})
    if chat.get("cpu"):
        items.append(f"- chat burst ({chat['turns_per_s']:g} turns/s): {_cores(chat['cpu'])}")
    for kind, runs in results.get("ingest", {}).items():
        if not isinstance(runs, dict):
            continue
        for n in ("1", "2"):
            run = runs.get(n)
            if isinstance(run, dict) and run.get("cpu"):
                items.append(f"- ingest, {kind} turns, {n} ltm process{'es' if n != '1' else ''} "
                             f"({run['per_s']:g} updates/s): {_cores(run['cpu'])}")
    if not items:
        return []
    return ["Cores each process used over the runs two cores bound (user + system time from `/proc`; a service "
            "with its children, such as ltm's ingest child; PostgreSQL with its backends):", "", *items, ""]


def write_readme(source: Path, readme: Path = README) -> None:
    report = json.loads(source.read_text(encoding="utf-8"))
    text = readme.read_text(encoding="utf-8")
    if text.count(MARK) != 2:
        raise SystemExit(f"{readme} needs two {MARK} lines around the bench table")
    head, _old, tail = text.split(MARK)
    try:
        shown = source.resolve().relative_to(readme.resolve().parent)
    except ValueError:
        shown = source
    readme.write_text(f"{head}{MARK}\n{readme_block(report, str(shown))}\n{MARK}{tail}", encoding="utf-8")
