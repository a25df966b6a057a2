#!/usr/bin/env python3
"""Writes the benchmark page from the results folder that bench/run.sh fills.

Reads meta.json, runs.jsonl (one record per nexus-load run), each run's
result, /proc samples and perf profile, machine-load.jsonl, servers.txt and
commands.txt, computes the medians and ratios, and writes Markdown. The
notes in bench/analysis.md, when present, are copied in under their own
heading.
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import judge_chat  # noqa: E402

SERVER_NAMES = {
    "nexus": "Nexus Chat",
    "nexus-broadcast": "Nexus Chat, presence broadcast",
    "gateway": "reference gateway",
    "cluster": "Nexus Chat, six hosts",
}

GOAL_CONNECTIONS_PER_HOST = 19_000
GOAL_CLUSTER_CONNECTIONS = 100_000
GOAL_BYTES_PER_CONNECTION = 8 * 1024
GOAL_THROUGHPUT_RATIO = 5.0
GOAL_LATENCY_P99_MS = 10.0
GOAL_CONNECTS_PER_S = 5_000
GOAL_INVOKE_US = 10


# ------------------------------------------------------------- loading


class Results:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.runs = self.read_lines("runs.jsonl")
        self.machine_load = self.read_lines("machine-load.jsonl")
        for run in self.runs:
            run["result"] = self.read_json(run["file"])
            run["sample_list"] = self.read_json(run["samples"]) or []

    def read_lines(self, name):
        path = self.folder / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def read_json(self, name):
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def select(self, **tags):
        return [run for run in self.runs if all(run.get(k) == v for k, v in tags.items())]

    def text(self, name):
        path = self.folder / name
        return path.read_text() if path.exists() else ""


# ------------------------------------------------------------- numbers


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def number(value, digits=0):
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def ms(value):
    if value is None:
        return "n/a"
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def kib(value_bytes):
    return "n/a" if value_bytes is None else f"{value_bytes / 1024:.1f} KiB"


def ratio_text(value):
    return "n/a" if value is None else f"{value:.2f}x"


def safe_ratio(top, bottom):
    if top is None or bottom in (None, 0):
        return None
    return top / bottom


def latency(run, histogram, field):
    result = run.get("result") or {}
    return (result.get("latency_ms") or {}).get(histogram, {}).get(field)


def counter(run, name):
    result = run.get("result") or {}
    return (result.get("counters") or {}).get(name)


def window(run, start_margin=1.0, end_margin=0.5):
    """Returns (t0, t1): the measured phase of a run in Unix seconds."""
    result = run.get("result")
    if not result:
        return None
    start = result["started_at_unix_ms"] / 1000 + result["setup_s"]
    return start + start_margin, start + result["run_s"] - end_margin


def samples_in(run, span):
    if span is None:
        return []
    return [sample for sample in run["sample_list"] if span[0] <= sample["t"] <= span[1]]


def cpu_cores(run, span):
    """Returns {group: cores used on average} over the span, from the samples."""
    inside = samples_in(run, span)
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    seconds = last["t"] - first["t"]
    if seconds <= 0:
        return {}
    return {
        group: (last["cpu"].get(group, 0.0) - first["cpu"].get(group, 0.0)) / seconds
        for group in last["cpu"]
    }


def other_cores(run, span=None):
    """Returns the cores that processes outside the benchmark used during the run.

    It is the machine's busy time less the sampled groups, so it also counts
    Postgres's background writers and the sampler itself.
    """
    cores = cpu_cores(run, span or window(run))
    if "machine" not in cores:
        return None
    ours = sum(value for group, value in cores.items() if group != "machine")
    return max(cores["machine"] - ours, 0.0)


def cpu_per_message_us(run):
    """Returns {group: CPU microseconds per delivered message} in the sending phase."""
    result = run.get("result")
    if not result:
        return {}
    rate = result["throughput"]["delivered_per_s"]
    if not rate:
        return {}
    cores = cpu_cores(run, window(run))
    return {group: value / rate * 1e6 for group, value in cores.items() if group != "machine"}


def held_status(run):
    """Returns the last /proc status sample per pid while the connections were held."""
    span = window(run, start_margin=0.5, end_margin=0.2)
    inside = samples_in(run, span)
    if not inside:
        return {}
    return {pid: status for pid, status in inside[-1]["status"].items() if status}


# ------------------------------------------------------------- scenarios


class Chat:
    """The throughput search: per server and run, the highest passing rate."""

    def __init__(self, results):
        self.results = results
        self.max_p99 = results.meta["settings"].get("chat_max_p99_ms", 50)
        self.by_server = {}
        for server in ("nexus", "gateway"):
            runs = {}
            for run in results.select(scenario="chat", server=server):
                if run.get("role") in ("probe", "step"):
                    runs.setdefault(run["rep"], []).append(run)
            self.by_server[server] = [self.summarize(rep, steps) for rep, steps in sorted(runs.items())]

    def summarize(self, rep, runs):
        probe = next((run for run in runs if run["role"] == "probe"), None)
        steps = [run for run in runs if run["role"] == "step"]
        tried = []
        best = None
        for run in steps:
            reasons = judge_chat(run["result"], run["rate"], self.max_p99)
            tried.append((run, reasons))
            if not reasons and (best is None or run["rate"] > best["rate"]):
                best = run
        saturated = None
        if probe and probe["result"]:
            saturated = probe["result"]["throughput"]["delivered_per_s"]
        return {
            "rep": rep,
            "probe": probe,
            "saturated": saturated,
            "saturated_p99": latency(probe, "delivery", "p99_ms") if probe else None,
            "best": best,
            "best_rate": best["result"]["throughput"]["delivered_per_s"] if best else 0.0,
            "lowest_failed": min((run["rate"] for run, reasons in tried if reasons), default=None),
            "tried": tried,
        }

    def median_best(self, server):
        return median([summary["best_rate"] for summary in self.by_server[server]])

    def median_saturated(self, server):
        return median([summary["saturated"] for summary in self.by_server[server]])


def median_latency(runs, histogram, field):
    return median([latency(run, histogram, field) for run in runs])


def throughput(run, field="delivered_per_s"):
    result = run.get("result") or {}
    return (result.get("throughput") or {}).get(field)


def connects_per_s(run):
    result = run.get("result") or {}
    return (result.get("connects") or {}).get("connects_per_s")


def memory_per_connection(run):
    result = run.get("result") or {}
    return result.get("memory_per_connection_bytes")


# ------------------------------------------------------------- profiles

GROUPS = [
    (("wasmtime", "cranelift"), "Wasmtime (instantiation, calls, host glue)"),
    (("tokio", "mio", "futures", "futures_util", "futures_core", "bytes"),
     "async runtime (tokio, futures, bytes)"),
    (("redis", "combine"), "Redis client"),
    (("tokio_postgres", "postgres_protocol", "postgres_types", "deadpool", "deadpool_postgres"),
     "Postgres client"),
    (("hyper", "hyper_util", "axum", "tungstenite", "tokio_tungstenite", "http", "httparse",
      "tower", "h2"), "HTTP and WebSocket"),
    (("serde", "serde_json"), "JSON"),
    (("tracing", "tracing_subscriber", "tracing_core"), "logging"),
    (("nexus_host",), "nexus-host's own code"),
]
# jemalloc is linked into nexus-host. Its exported functions carry
# tikv-jemalloc-sys's `_rjem_` prefix, and the other patterns are names of
# its internal functions.
JEMALLOC_SYMBOLS = re.compile(
    r"^(_rjem_|je_|do_rallocx|imalloc|ifree|isfree|malloc_default|free_default|sdallocx_default|"
    r"arena_|tcache_|extent_|large_|emap_|edata_|ecache_|pac_|hpa_|sec_|bin_|tsd_|pages_)"
)

MALLOC_SYMBOLS = re.compile(
    r"^(_int_malloc|malloc|cfree|free|_int_free|_int_realloc|realloc|calloc|__libc_calloc|"
    r"malloc_consolidate|unlink_chunk|_int_memalign|tcache_|__libc_malloc|__libc_free|"
    r"__libc_realloc|alloc_perturb|sysmalloc|systrim|arena_get)"
)
# Path segments that name a standard-library module, not the crate whose code
# runs (as in `core::ptr::drop_in_place<tokio::...>`).
SKIPPED_CRATES = {
    "core", "alloc", "std", "dyn", "impl", "as", "mut", "const", "ptr", "str", "sync", "any",
    "string", "raw_vec", "hash", "fmt", "vec", "slice", "iter", "mem", "ops", "option", "result",
    "cell", "rc", "boxed", "future", "task", "collections", "io", "net", "thread", "panicking",
    "panic", "num", "char", "array", "cmp", "clone", "convert", "default", "marker", "borrow",
    "sys", "__rustc", "hash_map", "btree", "map",
}


def symbol_group(dso, symbol):
    if dso == "[kernel.kallsyms]":
        return "kernel (network stack, scheduler, page faults)"
    if dso.startswith("[JIT]") or dso.startswith("perf-"):
        return "JIT-compiled code (wasm guests or JavaScript)"
    if dso.startswith("libc"):
        return "malloc and free (glibc)" if MALLOC_SYMBOLS.match(symbol) else "libc, other"
    if dso.startswith("libgcc_s"):
        return "stack unwinding (libgcc_s)"
    if dso in ("node", "nodejs") or dso.startswith("libnode"):
        return "node (V8 and libuv)"
    if dso.startswith("nexus-host"):
        if JEMALLOC_SYMBOLS.match(symbol):
            return "malloc and free (jemalloc)"
        for crate in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)::", symbol):
            if crate in SKIPPED_CRATES:
                continue
            for prefixes, name in GROUPS:
                if any(crate == prefix or crate.startswith(prefix + "_") for prefix in prefixes):
                    return name
            return "other Rust code"
        return "other Rust code"
    return f"other ({dso})"


# The --percent-limit of the perf reports of the recorded run; later runs of
# bench/bench.py list every symbol.
PERF_PERCENT_LIMIT = 0.2


def read_perf(text):
    """Parses `perf report -t '|'` lines into (percent, dso, symbol)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("#") or "|" not in line:
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        percent = float(parts[0].rstrip("%"))
        symbol = re.sub(r"^\[[.k]\]\s*", "", parts[2])
        rows.append((percent, parts[1], symbol))
    return rows


def perf_groups(rows):
    groups = {}
    for percent, dso, symbol in rows:
        name = symbol_group(dso, symbol)
        groups[name] = groups.get(name, 0.0) + percent
    return sorted(groups.items(), key=lambda item: -item[1])


# ------------------------------------------------------------- page


class Page:
    def __init__(self):
        self.lines = []

    def add(self, *lines):
        self.lines.extend(lines)

    def table(self, header, rows):
        self.add("| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |")
        for row in rows:
            self.add("| " + " | ".join(str(cell) for cell in row) + " |")
        self.add("")

    def text(self):
        return "\n".join(self.lines).rstrip() + "\n"


def shortfall(measured, goal, higher_is_better=True, unit=""):
    """Describes how far a measured value is from its goal."""
    if measured is None:
        return "not measured"
    if higher_is_better:
        if measured >= goal:
            return "met"
        missing = goal - measured
        return f"not met: {number(missing, 1 if goal < 100 else 0)}{unit} short ({missing / goal:.0%} below the goal)"
    if measured <= goal:
        return "met"
    excess = measured - goal
    return f"not met: {number(excess, 1)}{unit} over ({excess / goal:.0%} above the goal)"


def write_intro(page, results, elapsed):
    meta = results.meta
    settings = meta["settings"]
    reps = settings.get("reps")
    page.add(
        "# Benchmarks",
        "",
        "Nexus Chat (`nexus-host` with its three components) and the reference Socket.IO",
        "gateway, measured side by side in one run of `bench/run.sh` on one machine.",
        "Each server has its own private `redis-server` with the same settings, and its",
        "own fresh database on the same Postgres server (synchronous commits on). Each",
        f"figure is the median of {reps} run(s) per server, and the runs of the two servers",
        "alternate.",
        "This page is generated by `bench/report.py` from the run recorded below",
        f"({meta['date']}, {settings.get('mode')} mode, {elapsed / 60:.0f} minutes of scenarios),",
        "except the section of notes written by hand after that run.",
        "",
    )
    busy_runs = [run for run in results.runs if run.get("role") != "warmup"
                 and (other_cores(run) or 0) >= 0.25]
    busy_checks = [record for record in results.machine_load if record["busy"]]
    if busy_runs or busy_checks:
        page.add(
            f"Other work ran on the machine during the run: {len(busy_runs)} measured run(s) had",
            "a quarter of a core or more of other load (see \"Other load on the machine\").",
            "",
        )
    if settings.get("mode") == "quick":
        page.add(
            "**Quick mode:** tiny runs that check the script; these figures say nothing",
            "about performance.",
            "",
        )


def write_summary(page, results, chat, latency_runs, connect_runs, idle_runs, cluster_runs):
    page.add("## Goals", "")
    nexus_idle = [run for run in idle_runs if run["server"] == "nexus"]
    idle_held = median([counter(run, "connected") for run in nexus_idle])
    idle_open = median([(run["result"] or {}).get("open_at_stop") for run in nexus_idle])
    idle_memory = median([memory_per_connection(run) for run in nexus_idle])
    target_idle = results.meta["settings"].get("idle_nexus_n")
    cluster_open = median([(run["result"] or {}).get("open_at_stop") for run in cluster_runs])
    cluster_memory = median([memory_per_connection(run) for run in cluster_runs])
    target_cluster = results.meta["settings"].get("cluster_n")

    chat_nexus = chat.median_best("nexus")
    chat_gateway = chat.median_best("gateway")
    chat_ratio = safe_ratio(chat_nexus, chat_gateway)
    latency_nexus = median_latency([r for r in latency_runs if r["server"] == "nexus"], "delivery", "p99_ms")
    latency_gateway = median_latency([r for r in latency_runs if r["server"] == "gateway"], "delivery", "p99_ms")
    connects = median([connects_per_s(run) for run in connect_runs if run.get("role") == "goal"])

    def held(open_count, target):
        if open_count is None:
            return "not measured"
        return f"{number(open_count)} of {number(target)} held"

    rows = [
        [
            f"idle authenticated connections on one host process",
            f"{number(GOAL_CONNECTIONS_PER_HOST)}, at most 8 KiB each",
            f"{held(idle_open, target_idle)}, {kib(idle_memory)} each",
            idle_goal_result(idle_open, GOAL_CONNECTIONS_PER_HOST, idle_memory),
        ],
        [
            f"idle authenticated connections over six host processes",
            f"{number(GOAL_CLUSTER_CONNECTIONS)}, at most 8 KiB each",
            f"{held(cluster_open, target_cluster)}, {kib(cluster_memory)} each",
            idle_goal_result(cluster_open, GOAL_CLUSTER_CONNECTIONS, cluster_memory),
        ],
        [
            "chat throughput at p99 ≤ 50 ms, Nexus Chat ÷ reference gateway",
            "≥ 5x",
            f"{number(chat_nexus)} vs {number(chat_gateway)} messages/s: {ratio_text(chat_ratio)}",
            shortfall(chat_ratio, GOAL_THROUGHPUT_RATIO, unit="x"),
        ],
        [
            f"send-to-receive p99 at {number(results.meta['settings'].get('latency_rate'))} messages/s across two instances",
            "≤ 10 ms",
            f"{ms(latency_nexus)} (gateway: {ms(latency_gateway)})",
            shortfall(latency_nexus, GOAL_LATENCY_P99_MS, higher_is_better=False, unit=" ms"),
        ],
        [
            "authenticated connects per second, one host",
            "≥ 5,000",
            f"{number(connects)} per second",
            shortfall(connects, GOAL_CONNECTS_PER_S, unit=" per second"),
        ],
        invoke_goal_row(results),
    ]
    page.table(["what", "goal", "measured (median)", "result"], rows)


INVOKE_MEDIAN = re.compile(r"median ([0-9.]+) us")


def invoke_rep(path):
    """Return the rep number N of an invoke-N.txt file."""
    return int(path.stem.split("-")[1])


def invoke_medians(results):
    """Return the medians of the `cargo bench` runs (invoke-N.txt), in run order."""
    medians = []
    for path in sorted(results.folder.glob("invoke-*.txt"), key=invoke_rep):
        match = INVOKE_MEDIAN.search(path.read_text())
        if match:
            medians.append(float(match.group(1)))
    return medians


def invoke_goal_row(results):
    goal_name = "component instantiate + handle, no I/O (`cargo bench`)"
    medians = invoke_medians(results)
    if not medians:
        return [goal_name, f"median ≤ {GOAL_INVOKE_US} µs", "not measured", "not measured"]
    median = statistics.median(medians)
    runs = ", ".join(f"{value:.1f}" for value in medians)
    measured = f"{median:.1f} µs (runs: {runs} µs)"
    if median <= GOAL_INVOKE_US:
        result = "met"
    else:
        over = median - GOAL_INVOKE_US
        result = f"not met: {over:.1f} µs over ({median / GOAL_INVOKE_US:.1f}x)"
    return [goal_name, f"median ≤ {GOAL_INVOKE_US} µs", measured, result]


def idle_goal_result(open_count, goal_count, memory):
    if open_count is None:
        return "not measured"
    parts = []
    if open_count < goal_count:
        parts.append(f"{number(goal_count - open_count)} connections short")
    if memory is not None and memory > GOAL_BYTES_PER_CONNECTION:
        over = memory - GOAL_BYTES_PER_CONNECTION
        parts.append(
            f"{over / 1024:.1f} KiB per connection over ({over / GOAL_BYTES_PER_CONNECTION:.0%} above 8 KiB)"
        )
    if open_count < goal_count and results_quick():
        parts.append("quick mode ran fewer connections")
    return "met" if not parts else "not met: " + "; ".join(parts)


_QUICK = {"value": False}


def results_quick():
    return _QUICK["value"]


def write_setup(page, results):
    meta = results.meta
    settings = meta["settings"]
    page.add("## Machine and software", "")
    dirty = meta.get("dirty") or []
    commit = meta.get("commit", "unknown")
    if dirty:
        commit += f" with uncommitted changes in {len(dirty)} path(s) of the work tree"
    rows = [
        ["CPU", f"{meta['cpu_model']}, {meta['nproc']} cores (`nproc`)"],
        ["memory", f"{meta['memory_gib']} GiB"],
        ["kernel", meta["kernel"]],
        ["open files per process", meta["open_files_limit"]],
        ["rustc", meta["rustc"]],
        ["node", meta["node"]],
        ["redis-server", meta["redis"]],
        ["Postgres", f"{meta['postgres']}; synchronous_commit={meta['synchronous_commit']}, fsync={meta['fsync']}"],
        ["Nexus Chat commit", commit],
        ["gateway packages", ", ".join(f"{k} {v}" for k, v in (meta.get("gateway_packages") or {}).items())],
        ["perf", meta.get("perf")],
    ]
    page.table(["", ""], rows)
    if dirty:
        page.add("Uncommitted paths when the run started: " + ", ".join(f"`{line[3:]}`" for line in dirty), "")

    page.add("### Other load on the machine", "")
    page.add(
        "Load average (1, 5, 15 minutes, counting the benchmark's own processes too)",
        "and the processes outside the benchmark that used at least 5% of a core over",
        "one second, at the start and end of each scenario:",
        "",
    )
    rows = []
    for record in results.machine_load:
        busy = ", ".join(f"{p['command'].split()[0].rsplit('/', 1)[-1]} {p['cores']:.2f}" for p in record["busy"])
        rows.append([record["when"], " / ".join(f"{v:.2f}" for v in record["loadavg"]), busy or "none"])
    page.table(["when", "load average", "other busy processes (cores)"], rows)

    page.add(
        "CPU that processes outside the benchmark used during each measured run (the",
        "machine's busy time from `/proc/stat` less the benchmark's own processes, in",
        "cores out of 2; it includes Postgres's background writers):",
        "",
    )
    rows = []
    for scenario in ("chat", "commit", "latency", "connect", "idle", "cluster"):
        runs = [run for run in results.runs
                if run.get("scenario") == scenario and run.get("role") not in ("warmup",)]
        values = [(run, other_cores(run)) for run in runs]
        values = [(run, value) for run, value in values if value is not None]
        if not values:
            continue
        busy = [run["file"].removesuffix(".json") for run, value in values if value >= 0.25]
        rows.append([
            scenario, len(values),
            f"{median([value for _, value in values]):.2f}",
            f"{max(value for _, value in values):.2f}",
            ", ".join(busy) if busy else "none",
        ])
    page.table(["scenario", "runs", "median", "max", "runs with 0.25 cores or more"], rows)

    page.add(
        "### Server settings",
        "",
        "- nexus-host ran with `NODE_ENV=production` (JSON logs at level info),",
        "  `BIND_ADDRESS=127.0.0.1`, `SPIN_VARIABLE_MESSAGE_RATE_LIMIT=1000000`,",
        "  `MAX_EVENTS_PER_SECOND=100000` and `MAX_CONNECTIONS_PER_IP=200000`, so that",
        "  no limit of its own shaped the load. Everything else kept its default:",
        "  presence to conversation partners, and a Postgres pool of 16 per host (4 in",
        "  the six-host run).",
        "- The reference gateway ran unmodified with `NODE_ENV=production`. Its message",
        "  limit (100 per user per 60 s) is a constant in `server.js`. So the chat runs",
        f"  spread the load over {settings.get('chat_pairs', 0) * settings.get('chat_rotate', 0) * 2} users "
        f"(`--pairs {settings.get('chat_pairs')} --rotate {settings.get('chat_rotate')}`), with fresh",
        "  users in each run, which keeps every user under 100 messages per run at every",
        "  rate measured here. Nexus Chat got the same users and connections.",
        "- The gateway sends `USER_PRESENCE_UPDATE` to every connected socket on each",
        "  connect and disconnect, so opening N connections costs it N²/2 frames",
        "  (and nexus-load as much to read them). Nexus Chat sends presence to",
        "  conversation partners by default; the connect scenario also runs it with",
        "  `SPIN_VARIABLE_PRESENCE_REACH=broadcast` for a like-for-like row.",
        "- Both servers logged to files. nexus-load, the servers, Redis and Postgres",
        "  shared the machine's cores.",
        "",
    )


def write_chat(page, results, chat):
    settings = results.meta["settings"]
    page.add(
        f"## Chat throughput at p99 ≤ {chat.max_p99:g} ms",
        "",
        f"One instance of each server; {settings.get('chat_pairs')} pairs × {settings.get('chat_rotate')}"
        f" users a side, 64-byte messages. Each run is a search: a {settings.get('chat_probe_s')} s run at",
        "`--rate 0` (4 messages in flight per connection) gives the saturated throughput T,",
        f"then a bisection over (0, T) of {settings.get('chat_steps')} runs of {settings.get('chat_step_s')} s each.",
        f"A rate passes when the delivery p99 is at most {chat.max_p99:g} ms, 99% of the messages",
        "arrive, the generator sends at least 95% of the rate and nothing is rejected or",
        "dropped. The figure is the delivered rate of the highest passing run.",
        "",
    )
    reps = max((len(chat.by_server[s]) for s in chat.by_server), default=0)
    header = ["server"] + [f"run {i + 1}" for i in range(reps)] + ["median", "saturated T (median)"]
    rows = []
    for server in ("nexus", "gateway"):
        summaries = chat.by_server[server]
        cells = [chat_cell(s) for s in summaries]
        cells += [""] * (reps - len(cells))
        rows.append([SERVER_NAMES[server]] + cells + [
            f"**{number(chat.median_best(server))}**",
            f"{number(chat.median_saturated(server))} (p99 {ms(median([s['saturated_p99'] for s in summaries]))})",
        ])
    ratio = safe_ratio(chat.median_best("nexus"), chat.median_best("gateway"))
    saturated_ratio = safe_ratio(chat.median_saturated("nexus"), chat.median_saturated("gateway"))
    rows.append(["ratio, Nexus Chat ÷ gateway"] + [""] * reps + [f"**{ratio_text(ratio)}**", ratio_text(saturated_ratio)])
    page.table(header, rows)

    page.add("Rates tried by each search, in order:", "")
    rows = []
    for server in ("nexus", "gateway"):
        for summary in chat.by_server[server]:
            rows.append([SERVER_NAMES[server], summary["rep"], "saturation (`--rate 0`)",
                         number(summary["saturated"]), ms(summary["saturated_p99"]), "",
                         cores_text(other_cores(summary["probe"])) if summary["probe"] else "n/a"])
            for run, reasons in summary["tried"]:
                rows.append([
                    SERVER_NAMES[server], summary["rep"], number(run["rate"]),
                    number(throughput(run)), ms(latency(run, "delivery", "p99_ms")),
                    "pass" if not reasons else "fail: " + ", ".join(reasons),
                    cores_text(other_cores(run)),
                ])
    page.table(["server", "run", "target messages/s", "delivered/s", "delivery p99", "verdict",
                "other processes (cores)"], rows)

    page.add(
        "CPU time per delivered message in the sending phase (µs, from `/proc/PID/stat`",
        "sampled every 0.5 s; Postgres counts the backends of the server's database only):",
        "",
    )
    header = ["server", "run", "rate", "server process", "Redis", "Postgres", "nexus-load", "all",
              "other processes (cores)"]
    rows = []
    for server in ("nexus", "gateway"):
        for summary in chat.by_server[server]:
            if summary["best"]:
                rows.append(cpu_row(server, f"run {summary['rep']}, highest passing", summary["best"]))
        for run in results.select(scenario="chat", server=server, role="profile"):
            rows.append(cpu_row(server, "profile run", run))
    page.table(header, rows)


def chat_cell(summary):
    if summary["best"]:
        return f"{number(summary['best_rate'])} messages/s"
    if summary["lowest_failed"] is not None:
        return f"none passed (lowest tried: {number(summary['lowest_failed'])})"
    return "not measured"


def cpu_row(server, label, run):
    cpu = cpu_per_message_us(run)
    total = sum(cpu.values()) if cpu else None
    return [
        SERVER_NAMES[server], label, f"{number(throughput(run))}/s",
        number(cpu.get("server")), number(cpu.get("redis")), number(cpu.get("postgres")),
        number(cpu.get("generator")), number(total), cores_text(other_cores(run)),
    ]


def cores_text(value):
    return "n/a" if value is None else f"{value:.2f}"


def write_commit(page, results, runs):
    settings = results.meta["settings"]
    page.add(
        "## Postgres commits (diagnostic)",
        "",
        "Both servers store each message before they acknowledge and deliver it, so",
        "every message waits for a Postgres commit, and with `synchronous_commit=on`",
        "for the WAL's fdatasync. This diagnostic repeats fixed-rate chat runs (one",
        f"instance each, {settings.get('commit_s')} s, one run per cell) on databases with",
        "`synchronous_commit` on and off. Off is not what the contract allows; it only",
        "shows how much of the latency is the commit's wait for the disk.",
        "",
    )
    rows = []
    for server in ("nexus", "gateway"):
        for rate in str(settings.get("commit_rates", "")).split():
            cells = [SERVER_NAMES[server], number(float(rate))]
            for mode in ("on", "off"):
                chosen = [r for r in runs if r["server"] == server and r.get("commit") == mode
                          and str(r.get("rate")) == rate]
                cells += [
                    ms(median_latency(chosen, "delivery", "p50_ms")),
                    ms(median_latency(chosen, "delivery", "p99_ms")),
                    cores_text(median([other_cores(r) for r in chosen])),
                ]
            rows.append(cells)
    if rows:
        page.table(["server", "messages/s", "on: p50", "on: p99", "on: other processes (cores)",
                    "off: p50", "off: p99", "off: other processes (cores)"], rows)
    fsync = results.read_lines("fsync.jsonl")
    if fsync:
        page.add(
            "Latency of an 8 KiB write followed by fdatasync (500 in a row, the WAL's sync",
            "method here) on the file system of the temporary folder, at the start and end",
            "of each scenario:",
            "",
        )
        page.table(["when", "p50", "p99", "max", "same device as Postgres's data"],
                   [[record["when"], ms(record["p50_ms"]), ms(record["p99_ms"]), ms(record["max_ms"]),
                     results.meta.get("fsync_same_device", "unknown")] for record in fsync])


def write_latency(page, results, runs):
    settings = results.meta["settings"]
    page.add(
        f"## Send-to-receive latency at {number(settings.get('latency_rate'))} messages/s across two instances",
        "",
        f"Two instances of each server on one Redis; `--cross-instance` puts the two users of",
        f"every pair on different instances, so every message crosses Redis. {settings.get('latency_s')} s",
        f"per run, with as many pairs and users as the chat runs. Latency is measured from the send time",
        "written in the message to its arrival at the receiver, on one clock.",
        "",
    )
    reps = max((len([r for r in runs if r["server"] == s]) for s in ("nexus", "gateway")), default=0)
    header = ["server", "delivered/s", "p50", "p95", "p99", "max"] + [f"p99 run {i + 1}" for i in range(reps)]
    rows = []
    p99s = {}
    for server in ("nexus", "gateway"):
        chosen = [r for r in runs if r["server"] == server]
        p99s[server] = median_latency(chosen, "delivery", "p99_ms")
        rows.append([
            SERVER_NAMES[server],
            number(median([throughput(r) for r in chosen])),
            ms(median_latency(chosen, "delivery", "p50_ms")),
            ms(median_latency(chosen, "delivery", "p95_ms")),
            f"**{ms(p99s[server])}**",
            ms(median_latency(chosen, "delivery", "max_ms")),
        ] + [ms(latency(r, "delivery", "p99_ms")) for r in chosen])
    rows.append(["ratio of p99, gateway ÷ Nexus Chat", "", "", "", f"**{ratio_text(safe_ratio(p99s['gateway'], p99s['nexus']))}**", ""] + [""] * reps)
    page.table(header, rows)
    lost = []
    for run in runs:
        sent, delivered = counter(run, "sent"), counter(run, "delivered")
        if sent and delivered is not None and delivered < sent:
            lost.append(f"{SERVER_NAMES[run['server']]} run {run['rep']}: {number(sent - delivered)} of {number(sent)} not delivered")
    if lost:
        page.add("Undelivered messages: " + "; ".join(lost) + ".", "")
    rows = []
    for server in ("nexus", "gateway"):
        for run in [r for r in runs if r["server"] == server]:
            rows.append(cpu_row(server, f"run {run['rep']}", run))
    page.add("CPU time per delivered message (µs; server is both instances together):", "")
    page.table(["server", "run", "rate", "server processes", "Redis", "Postgres", "nexus-load", "all",
                "other processes (cores)"], rows)


def write_connect(page, results, runs):
    settings = results.meta["settings"]
    page.add(
        "## Connect storm",
        "",
        f"`nexus-load connect` with {settings.get('connect_concurrency')} handshakes in flight; a",
        "connect counts once `CONNECTION_SUCCESS` arrives (Nexus Chat: token in the",
        "`Authorization` header of the WebSocket upgrade; gateway: Engine.IO handshake,",
        "then the `authenticate` event). The connections stay open until the storm ends.",
        "",
    )
    goal = [run for run in runs if run.get("role") == "goal"]
    if goal:
        page.add(f"Goal row, {number(settings.get('connect_goal_n'))} connections on one Nexus Chat host:", "")
        page.table(
            ["server", "connects/s (median)", "per run", "handshake p50", "handshake p99", "server CPU per connect"],
            [[
                SERVER_NAMES["nexus"],
                f"**{number(median([connects_per_s(r) for r in goal]))}**",
                ", ".join(number(connects_per_s(r)) for r in goal),
                ms(median_latency(goal, "handshake", "p50_ms")),
                ms(median_latency(goal, "handshake", "p99_ms")),
                cpu_per_connect(goal),
            ]],
        )
    compare = [run for run in runs if run.get("role") == "compare"]
    if compare:
        page.add(f"Both servers, {number(settings.get('connect_compare_n'))} connections each:", "")
        rows = []
        medians = {}
        for server in ("nexus", "nexus-broadcast", "gateway"):
            chosen = [r for r in compare if r["server"] == server]
            medians[server] = median([connects_per_s(r) for r in chosen])
            presence = median([counter(r, "presence_updates") for r in chosen])
            rows.append([
                SERVER_NAMES[server],
                f"**{number(medians[server])}**",
                ", ".join(number(connects_per_s(r)) for r in chosen),
                ms(median_latency(chosen, "handshake", "p50_ms")),
                ms(median_latency(chosen, "handshake", "p99_ms")),
                number(presence),
                cpu_per_connect(chosen),
            ])
        rows.append(["ratio, Nexus Chat ÷ gateway", f"**{ratio_text(safe_ratio(medians['nexus'], medians['gateway']))}**", "", "", "", "", ""])
        rows.append(["ratio, Nexus Chat with broadcast ÷ gateway",
                     f"**{ratio_text(safe_ratio(medians['nexus-broadcast'], medians['gateway']))}**", "", "", "", "", ""])
        page.table(["server", "connects/s (median)", "per run", "handshake p50", "handshake p99",
                    "presence frames received", "server CPU per connect"], rows)


def cpu_per_connect(runs):
    values = []
    for run in runs:
        result = run.get("result") or {}
        connected = counter(run, "connected")
        servers = result.get("servers") or []
        if connected:
            values.append(sum(server["cpu_s"] for server in servers) / connected * 1e6)
    value = median(values)
    return "n/a" if value is None else f"{value:,.0f} µs"


def write_idle(page, results, runs):
    settings = results.meta["settings"]
    page.add(
        "## Idle connections",
        "",
        "Each run gets a fresh server, warmed by a 2 s chat of 10 users. Then `nexus-load",
        f"idle` opens the connections and keeps them open {settings.get('idle_hold_s')} s. It reads the server's",
        "VmRSS before the first connection and at the end, while all are open. Memory per",
        "connection is that growth divided by the open connections. The gateway's count",
        "is what it opens in bounded time: its presence broadcast makes the connection",
        "phase quadratic in the count.",
        "",
    )
    rows = []
    for server in ("nexus", "gateway"):
        chosen = [r for r in runs if r["server"] == server]
        if not chosen:
            continue
        statuses = [next(iter(held_status(r).values()), None) for r in chosen]
        rows.append([
            SERVER_NAMES[server],
            number(median([r.get("connections") for r in chosen])),
            number(median([(r["result"] or {}).get("open_at_stop") for r in chosen])),
            f"**{kib(median([memory_per_connection(r) for r in chosen]))}**",
            ", ".join(kib(memory_per_connection(r)) for r in chosen),
            f"{median([(r['result'] or {}).get('setup_s') for r in chosen]) or 0:.1f} s",
            anon_growth_text(chosen),
            number(median([s.get("Threads") for s in statuses if s])),
            after_close_text(chosen),
            kernel_slab_text(chosen),
        ])
    nexus = median([memory_per_connection(r) for r in runs if r["server"] == "nexus"])
    gateway = median([memory_per_connection(r) for r in runs if r["server"] == "gateway"])
    page.table(
        ["server", "connections", "open at the end", "memory per connection (median)", "per run",
         "connection phase", "RssAnon growth per connection", "threads", "VmRSS 5 s after close",
         "kernel slab growth per connection"],
        rows,
    )
    page.add(f"Ratio of memory per connection, gateway ÷ Nexus Chat: **{ratio_text(safe_ratio(gateway, nexus))}**"
             " (at different connection counts).", "")
    page.add(
        "Kernel memory for the sockets is not in VmRSS. The last column is the growth",
        "of the machine's slab memory (`/proc/meminfo` Slab) while the connections were",
        "held, divided by the connections: both ends of each loopback connection, and",
        "anything else the machine allocated meanwhile.",
        "",
    )


def after_close_text(runs):
    values = []
    for run in runs:
        after = run.get("after_close_status") or {}
        status = next((s for s in after.values() if s), None)
        if status:
            values.append(status["VmRSS"] / 1024)
    value = median(values)
    return "n/a" if value is None else f"{value:,.0f} MiB"


def kernel_slab_text(runs):
    """Returns the growth of the kernel's slab memory per held connection."""
    values = []
    for run in runs:
        connections = (run.get("result") or {}).get("open_at_stop")
        samples = run["sample_list"]
        inside = samples_in(run, window(run, start_margin=0.5, end_margin=0.2))
        if not connections or not samples or not inside:
            continue
        before = samples[0].get("slab_kib")
        held = inside[-1].get("slab_kib")
        if before is not None and held is not None:
            values.append(max(held - before, 0) * 1024 / connections)
    return kib(median(values))


def anon_growth_text(runs):
    """Returns the growth of RssAnon per held connection, from the /proc samples."""
    values = []
    for run in runs:
        connections = (run.get("result") or {}).get("open_at_stop")
        samples = run["sample_list"]
        held = held_status(run)
        if not connections or not samples or not held:
            continue
        pid, status = next(iter(held.items()))
        first = samples[0]["status"].get(pid)
        if first and "RssAnon" in first and "RssAnon" in status:
            values.append((status["RssAnon"] - first["RssAnon"]) * 1024 / connections)
    return kib(median(values))


def write_cluster(page, results, runs):
    settings = results.meta["settings"]
    page.add(
        f"## {number(settings.get('cluster_n'))} idle connections over {settings.get('cluster_hosts')} hosts",
        "",
        f"{settings.get('cluster_hosts')} nexus-host processes on one Redis and one database,",
        "nexus-load split into as many processes as its open-file limit needs, 16 source",
        "addresses. Memory per connection sums the growth of all six hosts.",
        "",
    )
    if not runs:
        page.add("Not run.", "")
        return
    rows = []
    for run in runs:
        result = run.get("result") or {}
        servers = result.get("servers") or []
        reasons = ", ".join(f"{k} {v}" for k, v in (result.get("close_reasons") or {}).items())
        errors = ", ".join(f"{k} {v}" for k, v in (result.get("connect_errors") or {}).items())
        rows.append([
            f"run {run['rep']}",
            number(counter(run, "connected")),
            number(result.get("open_at_stop")),
            number(counter(run, "connect_failed")),
            number(counter(run, "not_attempted")),
            f"{result.get('setup_s', 0):.1f} s",
            kib(memory_per_connection(run)),
            ", ".join(f"{s['rss_kib_after'] / 1024:,.0f}" for s in servers),
            result.get("processes", "n/a"),
            (reasons + " " + errors).strip() or "none",
            f"exit {run['exit_code']}",
        ])
    page.table(["run", "connected", "open at the end", "failed", "not attempted", "connection phase",
                "memory per connection", "VmRSS per host at the end (MiB)", "nexus-load processes",
                "close reasons and connect errors", "nexus-load"], rows)
    page.add(
        f"Median open at the end: **{number(median([(r['result'] or {}).get('open_at_stop') for r in runs]))}**, "
        f"memory per connection **{kib(median([memory_per_connection(r) for r in runs]))}**.",
        "",
    )


def write_profiles(page, results):
    page.add(
        "## Profiles",
        "",
        "`perf record -e cpu-clock -F 499 -g` on the server process during a fixed-rate",
        "chat run (and, for Nexus Chat, during a connect storm); the table gives the",
        "share of the process's CPU samples by where the sampled instruction was",
        "(self time, libraries and crates grouped). The machine has no hardware",
        "counters for perf, so these are timer samples.",
        "",
    )
    profiles = [
        ("Nexus Chat, chat", results.select(scenario="chat", server="nexus", role="profile")),
        ("reference gateway, chat", results.select(scenario="chat", server="gateway", role="profile")),
        ("Nexus Chat, connect storm", results.select(scenario="connect", server="nexus", role="profile")),
    ]
    found = False
    for title, runs in profiles:
        for run in runs:
            rows = read_perf(results.text(run.get("perf") or ""))
            if not rows:
                continue
            found = True
            extra = ""
            if run["scenario"] == "chat":
                extra = f", {number(throughput(run))} messages/s, delivery p99 {ms(latency(run, 'delivery', 'p99_ms'))}"
            else:
                extra = f", {number(connects_per_s(run))} connects/s"
            page.add(f"### {title}{extra}", "")
            listed = sum(percent for percent, _, _ in rows)
            group_rows = [[name, f"{share:.1f}%"] for name, share in perf_groups(rows)[:12]]
            if listed < 99:
                group_rows.append([f"symbols under {PERF_PERCENT_LIMIT}% each, not listed by the report",
                                   f"{100 - listed:.1f}%"])
            page.table(["where", "share of samples"], group_rows)
            page.add("Top symbols:", "")
            page.table(["share", "library", "symbol"],
                       [[f"{p:.1f}%", dso, f"`{symbol[:90]}`"] for p, dso, symbol in rows[:12]])
    if not found:
        page.add(f"No profile: perf was {results.meta.get('perf')}.", "")


def write_analysis(page, analysis_path):
    if analysis_path and analysis_path.exists():
        page.add(analysis_path.read_text().rstrip(), "")


def placeholders(command):
    """Replaces the ports, pids and temporary paths of one run in a command line."""
    command = re.sub(r"/tmp/nexus-bench\.\w+/", "$WORK/", command)
    command = re.sub(r"\$WORK/app/nexus-(load|host)", r"nexus-\1", command)
    command = re.sub(r"redis://127\.0\.0\.1:\d+", "redis://127.0.0.1:$REDIS_PORT", command)
    command = re.sub(r"\bREDIS_PORT=\d+", "REDIS_PORT=$REDIS_PORT", command)
    command = re.sub(r"\bPORT=\d+", "PORT=$PORT", command)
    command = re.sub(r"--port \d+", "--port $PORT", command)
    command = re.sub(r"(ws|http)://127\.0\.0\.1:\d+", r"\1://127.0.0.1:$PORT", command)
    command = re.sub(r"--server-pid \d+", "--server-pid $PID", command)
    command = re.sub(r"nexus_bench_\d+_\w+", "nexus_bench_$$_$SCENARIO", command)
    return re.sub(r"  +", " ", command)


def write_commands(page, results, elapsed):
    settings = results.meta["settings"]
    mode_flag = " --quick" if settings.get("mode") == "quick" else ""
    page.add(
        "## Commands",
        "",
        "The whole page:",
        "",
        "```sh",
        f"bench/run.sh /path/to/socketio-gateway{mode_flag}",
        "```",
        "",
        f"(this run: {elapsed / 60:.0f} minutes). Servers, as started (JWT_SECRET is random per run and",
        "passed in the environment; ports are free ports picked at start-up):",
        "",
        "```",
    )
    seen = set()
    for line in results.text("servers.txt").splitlines():
        kind, _, command = line.partition(": ")
        template = placeholders(command)
        if (kind.split()[0], template) not in seen:
            seen.add((kind.split()[0], template))
            page.add(f"{kind.split()[0]}: {template}")
    page.add("```", "", "nexus-load, one command per kind of run (the search varies `--rate`):", "", "```")
    seen = set()
    for run in results.runs:
        key = (run.get("scenario"), run.get("server"), run.get("role"))
        if key in seen:
            continue
        seen.add(key)
        page.add(f"# {run.get('scenario')}, {SERVER_NAMES.get(run.get('server'), run.get('server'))}, {run.get('role')}")
        page.add(placeholders(re.sub(r"--out \S+ ", "", run["command"])))
    page.add("```", "")
    commands = results.text("commands.txt").splitlines()
    page.add(
        f"All {len(commands)} nexus-load runs are listed in `target/bench/{settings.get('mode')}/commands.txt`",
        "after a run, beside each run's JSON result, /proc samples and perf report.",
        "",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="folder that bench/run.sh filled")
    parser.add_argument("--out", required=True, help="Markdown file to write")
    parser.add_argument("--elapsed", type=float, default=0, help="seconds the scenarios took")
    parser.add_argument("--analysis", default=str(Path(__file__).resolve().parent / "analysis.md"),
                        help="Markdown notes to include (default bench/analysis.md)")
    args = parser.parse_args()

    results = Results(args.results)
    _QUICK["value"] = results.meta["settings"].get("mode") == "quick"
    chat = Chat(results)
    latency_runs = results.select(scenario="latency", role="measure")
    connect_runs = results.select(scenario="connect")
    idle_runs = results.select(scenario="idle", role="measure")
    cluster_runs = results.select(scenario="cluster", role="measure")

    page = Page()
    write_intro(page, results, args.elapsed)
    write_summary(page, results, chat, latency_runs, connect_runs, idle_runs, cluster_runs)
    write_setup(page, results)
    write_chat(page, results, chat)
    write_commit(page, results, results.select(scenario="commit", role="measure"))
    write_latency(page, results, latency_runs)
    write_connect(page, results, connect_runs)
    write_idle(page, results, idle_runs)
    write_cluster(page, results, cluster_runs)
    write_profiles(page, results)
    if not _QUICK["value"]:
        write_analysis(page, Path(args.analysis))
    write_commands(page, results, args.elapsed)
    Path(args.out).write_text(page.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
