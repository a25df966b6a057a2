#!/usr/bin/env python3
"""Helpers that bench/run.sh calls: free ports, one recorded nexus-load run
(with CPU, memory and perf samples of the servers from /proc), verdicts on
results, machine facts and waiting for a server to go quiet.

Every record goes to RESULTS/runs.jsonl, one JSON object per nexus-load run;
bench/report.py turns that file and the result files into the page.
"""

import argparse
import errno
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmData", "Threads")


def port_bindable(port):
    """Reports whether PORT can be bound on every address, IPv6 too where present."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        return True
    except OSError as error:
        if error.errno != errno.EAFNOSUPPORT:
            return False
    try:
        with socket.socket(socket.AF_INET) as sock:
            sock.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False


def free_port():
    """Returns a TCP port below the ephemeral range that nothing has bound.

    Ports in the ephemeral range are taken by the load's client sockets,
    thousands at a time, and a server that binds every address (as the
    gateway does) fails on a port that any of them holds.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(10_000, low))
    random.shuffle(candidates)
    for port in candidates:
        if port_bindable(port):
            return port
    raise RuntimeError(f"no free TCP port between 10000 and {low}")


def cpu_seconds(pid):
    """Returns utime + stime of a process in seconds, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces, so split after its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def process_status(pid):
    """Returns the memory fields of /proc/PID/status in KiB (Threads as a count)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    status = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            status[key] = int(value.split()[0])
    return status


def all_processes():
    """Yields (pid, ppid, cmdline) of every process that can be read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        yield int(entry.name), ppid, cmdline.replace(b"\0", b" ").decode(errors="replace")


def postgres_backends(databases):
    """Returns the pids of Postgres backends connected to one of DATABASES.

    A backend's title is `postgres: [CLUSTER:] USER DATABASE HOST(PORT) STATE`
    (Debian's clusters add `15/main:`), so the database is the second or
    third word after `postgres:`.
    """
    pids = []
    for pid, _, cmdline in all_processes():
        words = cmdline.split()
        if len(words) >= 4 and words[0] == "postgres:" and set(words[2:4]) & set(databases):
            pids.append(pid)
    return pids


def descendants(root):
    children = {}
    for pid, ppid, _ in all_processes():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def machine_busy_seconds():
    """Returns the CPU time all cores spent outside idle and iowait since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND


def slab_kib():
    """Returns the kernel's slab memory (/proc/meminfo Slab) in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return None


def loadavg():
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def sockstat():
    """Returns /proc/net/sockstat's TCP line as numbers (mem is in pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()[1:]
            return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}
    return {}


class Sampler(threading.Thread):
    """Samples CPU time of named process groups and memory of watched pids.

    The groups are each `--watch NAME=PID`, `postgres`, `generator` and
    `machine`. `postgres` is the backends of the given databases, looked up
    anew at each sample because pools open connections lazily. `generator`
    is the nexus-load process and its workers. `machine` is the busy time of
    all cores, so what other processes used is `machine` less the rest. Each
    sample also has the TCP line of /proc/net/sockstat and the kernel's slab
    memory.
    """

    def __init__(self, watch, databases, status_pids, interval):
        super().__init__(daemon=True)
        self.watch = watch
        self.databases = databases
        self.status_pids = status_pids
        self.interval = interval
        self.generator_pid = None
        self.samples = []
        self.stopped = threading.Event()

    def sample(self):
        cpu = {}
        for name, pids in self.watch.items():
            cpu[name] = sum(cpu_seconds(pid) or 0.0 for pid in pids)
        if self.databases:
            cpu["postgres"] = sum(
                cpu_seconds(pid) or 0.0 for pid in postgres_backends(self.databases)
            )
        if self.generator_pid is not None:
            cpu["generator"] = sum(
                cpu_seconds(pid) or 0.0 for pid in descendants(self.generator_pid)
            )
        cpu["machine"] = machine_busy_seconds()
        memory = {str(pid): process_status(pid) for pid in self.status_pids}
        self.samples.append({"t": time.time(), "cpu": cpu, "status": memory, "tcp": sockstat(),
                             "slab_kib": slab_kib()})

    def run(self):
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)

    def stop(self):
        self.stopped.set()
        self.join()
        self.sample()


def parse_tags(pairs):
    tags = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            tags[key] = json.loads(value)
        except json.JSONDecodeError:
            tags[key] = value
    return tags


def parse_watch(pairs):
    watch = {}
    for pair in pairs:
        name, _, pid = pair.partition("=")
        watch.setdefault(name, []).append(int(pid))
    return watch


def start_perf(pid, data_path, seconds):
    return subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", "499", "-g", "-p", str(pid),
         "-o", str(data_path), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def perf_report(data_path, text_path):
    """Writes the flat profile (self time by library and symbol) of a perf file,
    and beside it the call chains that lead to symbols of 1% or more."""
    with open(text_path, "w") as out:
        subprocess.run(
            ["perf", "report", "-i", str(data_path), "--no-children", "--sort", "dso,sym",
             "-g", "none", "--stdio", "-t", "|", "--percent-limit", "0"],
            stdout=out,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
    with open(text_path.with_suffix(".callers.txt"), "w") as out:
        subprocess.run(
            ["perf", "report", "-i", str(data_path), "--no-children", "--sort", "sym",
             "--stdio", "-G", "--percent-limit", "1"],
            stdout=out,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )


def command_load(args):
    out = Path(args.out)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    # --out is a global option of nexus-load; it goes before the scenario.
    command = [command[0], "--out", str(out)] + command[1:]
    runs = Path(args.runs)
    with open(runs.parent / "commands.txt", "a") as log:
        log.write(shlex.join(command) + "\n")

    sampler = Sampler(
        parse_watch(args.watch), args.postgres_db, args.status_pid, args.interval
    )
    sampler.sample()
    before = {"loadavg": loadavg(), "sockstat": sockstat()}
    sampler.start()
    started = time.time()
    perf = None
    perf_timer = None
    perf_data = out.with_suffix(".perf.data")
    if args.perf_pid:
        def begin_perf():
            nonlocal perf
            perf = start_perf(args.perf_pid, perf_data, args.perf_seconds)
        perf_timer = threading.Timer(args.perf_delay, begin_perf)
        perf_timer.start()

    with open(out.with_suffix(".txt"), "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True)
        sampler.generator_pid = child.pid
        try:
            code = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            # nexus-load stops by itself; this only catches a hung run.
            os.killpg(child.pid, signal.SIGINT)
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            code = 124
    finished = time.time()
    sampler.generator_pid = None
    sampler.stop()

    if perf_timer is not None:
        perf_timer.cancel()
        if perf is not None:
            try:
                perf.wait(timeout=args.perf_seconds + 30)
            except subprocess.TimeoutExpired:
                perf.send_signal(signal.SIGINT)
                perf.wait(timeout=30)
            if perf_data.exists():
                perf_report(perf_data, out.with_suffix(".perf.txt"))
                perf_data.unlink()

    after_close = None
    if args.after_close > 0 and args.status_pid:
        time.sleep(args.after_close)
        after_close = {str(pid): process_status(pid) for pid in args.status_pid}

    samples_path = out.with_suffix(".samples.json")
    samples_path.write_text(json.dumps(sampler.samples))
    record = dict(parse_tags(args.tag))
    record.update({
        "file": out.name,
        "samples": samples_path.name,
        "perf": out.with_suffix(".perf.txt").name if args.perf_pid else None,
        "exit_code": code,
        "started": started,
        "finished": finished,
        "before": before,
        "after": {"loadavg": loadavg(), "sockstat": sockstat()},
        "after_close_status": after_close,
        "command": shlex.join(command),
    })
    with open(runs, "a") as log:
        log.write(json.dumps(record) + "\n")
    print(f"{out.name}: exit {code}, {finished - started:.1f} s", file=sys.stderr)
    return 0 if code == 0 else code


def load_result(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def judge_chat(result, rate, max_p99_ms):
    """Returns why a chat result fails the bound: an empty list is a pass.

    A pass needs the delivery p99 within max_p99_ms, at least 99% of the
    sent messages delivered, the generator at 95% of the target rate or
    more (rate 0: no target), and no errors, rate limits or drops.
    """
    if result is None:
        return ["no result file"]
    counters = result["counters"]
    delivery = result["latency_ms"].get("delivery", {})
    reasons = []
    p99 = delivery.get("p99_ms")
    if p99 is None or delivery.get("count", 0) == 0:
        reasons.append("nothing delivered")
    elif p99 > max_p99_ms:
        reasons.append(f"p99 {p99:.1f} ms")
    sent = counters["sent"]
    if counters["delivered"] < 0.99 * sent:
        reasons.append(f"delivered {counters['delivered']} of {sent}")
    if rate > 0 and result["throughput"]["sent_per_s"] < 0.95 * rate:
        reasons.append(f"sent only {result['throughput']['sent_per_s']:.0f}/s")
    for counter in ("errors", "rate_limited", "dropped", "send_failed", "connect_failed"):
        if counters.get(counter, 0) > 0:
            reasons.append(f"{counters[counter]} {counter}")
    if result.get("worker_failures"):
        reasons.append("worker failures")
    return reasons


def command_judge(args):
    """Prints `pass` or `fail: REASONS` for a chat result against a p99 bound."""
    reasons = judge_chat(load_result(args.file), args.rate, args.max_p99_ms)
    print("pass" if not reasons else "fail: " + ", ".join(reasons))
    return 0


def command_value(args):
    value = load_result(args.file)
    for key in args.path.split("."):
        if value is None:
            break
        value = value[int(key)] if isinstance(value, list) else value.get(key)
    print("" if value is None else value)
    return 0


def command_wait_idle(args):
    """Waits until every pid uses under --below of a core, at most --max-seconds."""
    deadline = time.time() + args.max_seconds
    while time.time() < deadline:
        first = [cpu_seconds(pid) or 0.0 for pid in args.pid]
        time.sleep(0.5)
        second = [cpu_seconds(pid) or 0.0 for pid in args.pid]
        if all((b - a) / 0.5 < args.below for a, b in zip(first, second)):
            return 0
    print(f"servers {args.pid} were still busy after {args.max_seconds} s", file=sys.stderr)
    return 0


def command_fsync_latency(args):
    """Times COUNT 8 KiB writes, each followed by fdatasync, as a WAL commit does."""
    path = Path(args.dir) / f"fsync-test-{os.getpid()}"
    block = os.urandom(8192)
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for index in range(args.count):
            os.pwrite(fd, block, (index % 128) * 8192)
            begun = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - begun) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    times.sort()

    def percentile(share):
        return times[min(len(times) - 1, int(share * len(times)))]

    record = {
        "when": args.label,
        "dir": args.dir,
        "count": len(times),
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "max_ms": times[-1],
        "mean_ms": sum(times) / len(times),
    }
    with open(args.out, "a") as log:
        log.write(json.dumps(record) + "\n")
    return 0


def same_device(first, second):
    try:
        return "yes" if os.stat(first).st_dev == os.stat(second).st_dev else "no"
    except OSError:
        return "unknown"


def run_text(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "not found"


def command_meta(args):
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
         if line.startswith("model name")),
        "unknown",
    )
    memory = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    psql = ["psql", args.admin_url, "-tAc"]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": int(run_text(["nproc"]) or 0),
        "memory_gib": round(memory / 1024 / 1024, 1),
        "cpu_model": model,
        "kernel": run_text(["uname", "-r"]),
        "open_files_limit": run_text(["bash", "-c", "ulimit -n"]),
        "rustc": run_text(["rustc", "--version"]),
        "node": run_text(["node", "--version"]),
        "redis": run_text(["redis-server", "--version"]),
        "postgres": run_text(psql + ["SELECT version()"]),
        "synchronous_commit": run_text(psql + ["SHOW synchronous_commit"]),
        "fsync": run_text(psql + ["SHOW fsync"]),
        "commit": run_text(["git", "-C", args.root, "rev-parse", "HEAD"]),
        "dirty": [line for line in subprocess.run(
            ["git", "-C", args.root, "status", "--porcelain"], capture_output=True, text=True,
            timeout=30, check=False).stdout.splitlines() if line],
        "perf": args.perf,
        "fsync_same_device": same_device(args.work, run_text(psql + ["SHOW data_directory"])),
        "settings": parse_tags(args.setting),
    }
    lock = Path(args.gateway) / "package-lock.json"
    if lock.exists():
        packages = json.loads(lock.read_text()).get("packages", {})
        meta["gateway_packages"] = {
            name.removeprefix("node_modules/"): packages[name].get("version")
            for name in ("node_modules/socket.io", "node_modules/@socket.io/redis-adapter",
                         "node_modules/redis", "node_modules/pg", "node_modules/jsonwebtoken")
            if name in packages
        }
    Path(args.out).write_text(json.dumps(meta, indent=2))
    return 0


def command_machine_load(args):
    """Appends the load average and the processes outside the benchmark that
    used at least 5% of a core over one second."""
    ours = set()
    for pid in args.ours:
        ours.update(descendants(pid))
    first = {}
    names = {}
    for pid, _, cmdline in all_processes():
        if pid in ours or any(text in cmdline for text in args.exclude):
            continue
        first[pid] = cpu_seconds(pid)
        names[pid] = cmdline[:80]
    time.sleep(1.0)
    busy = []
    for pid, before in first.items():
        after = cpu_seconds(pid)
        if before is None or after is None:
            continue
        share = after - before
        if share >= 0.05:
            busy.append({"pid": pid, "cores": round(share, 2), "command": names[pid]})
    busy.sort(key=lambda process: -process["cores"])
    record = {"when": args.label, "time": time.time(), "loadavg": loadavg(), "busy": busy[:8]}
    with open(args.out, "a") as log:
        log.write(json.dumps(record) + "\n")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)

    commands.add_parser("free-port", help="print a free TCP port on 127.0.0.1")

    load = commands.add_parser("load", help="run nexus-load once and record it")
    load.add_argument("--runs", required=True, help="runs.jsonl to append the record to")
    load.add_argument("--out", required=True, help="nexus-load's JSON result file")
    load.add_argument("--timeout", type=float, required=True, help="seconds before the run is stopped")
    load.add_argument("--tag", action="append", default=[], help="KEY=VALUE stored in the record")
    load.add_argument("--watch", action="append", default=[], help="GROUP=PID whose CPU time is sampled")
    load.add_argument("--postgres-db", action="append", default=[], help="database whose backends' CPU is sampled")
    load.add_argument("--status-pid", action="append", type=int, default=[], help="pid whose /proc status is sampled")
    load.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    load.add_argument("--after-close", type=float, default=0, help="seconds to wait after the run before a last status sample")
    load.add_argument("--perf-pid", type=int, help="pid to profile with perf record")
    load.add_argument("--perf-delay", type=float, default=0, help="seconds after the start before perf starts")
    load.add_argument("--perf-seconds", type=float, default=10, help="seconds perf records")
    load.add_argument("command", nargs=argparse.REMAINDER, help="-- nexus-load ARGS")

    judge = commands.add_parser("judge", help="pass or fail a chat result")
    judge.add_argument("file")
    judge.add_argument("--rate", type=float, default=0, help="target rate, messages/s (0: none)")
    judge.add_argument("--max-p99-ms", type=float, required=True)

    value = commands.add_parser("value", help="print a field of a JSON file by dotted path")
    value.add_argument("file")
    value.add_argument("path")

    idle = commands.add_parser("wait-idle", help="wait until processes stop using CPU")
    idle.add_argument("--pid", type=int, action="append", required=True)
    idle.add_argument("--below", type=float, default=0.05, help="share of one core")
    idle.add_argument("--max-seconds", type=float, default=30)

    meta = commands.add_parser("meta", help="write machine and version facts")
    meta.add_argument("--out", required=True)
    meta.add_argument("--root", required=True)
    meta.add_argument("--gateway", required=True)
    meta.add_argument("--admin-url", required=True)
    meta.add_argument("--perf", default="not checked")
    meta.add_argument("--work", default="/tmp", help="temporary folder whose file system the fsync test uses")
    meta.add_argument("--setting", action="append", default=[], help="KEY=VALUE of the run")

    machine = commands.add_parser("machine-load", help="record the load average and busy processes")
    machine.add_argument("--out", required=True)
    machine.add_argument("--label", required=True)
    machine.add_argument("--ours", type=int, action="append", default=[], help="pid whose tree is the benchmark's own")
    machine.add_argument("--exclude", action="append", default=[], help="text in the command line of the benchmark's own processes")

    fsync = commands.add_parser("fsync-latency", help="time 8 KiB writes with fdatasync")
    fsync.add_argument("--dir", required=True, help="folder on the file system under test")
    fsync.add_argument("--count", type=int, default=500)
    fsync.add_argument("--label", required=True)
    fsync.add_argument("--out", required=True, help="JSON lines file to append to")

    args = parser.parse_args()
    if args.action == "free-port":
        print(free_port())
        return 0
    handlers = {
        "load": command_load,
        "judge": command_judge,
        "value": command_value,
        "wait-idle": command_wait_idle,
        "meta": command_meta,
        "machine-load": command_machine_load,
        "fsync-latency": command_fsync_latency,
    }
    return handlers[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
