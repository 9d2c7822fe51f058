#!/usr/bin/env python3
"""Shared mode (one proxy, many tasks) against single-task mode, measured in one run.

Run through bench/shared.sh. Reuses bench/driver.py's set-up: the same upstream nginx, the
same single-task proxy (driver.py's configuration file) and the same pinning (proxies on
CPU 1; upstream nginx, wrk and this script on CPU 0). Shared-mode proxies get that same
configuration file (same Pingora settings) minus the single-task keys, plus an admin socket.

Measures:
  * small requests at 64 and 256 connections: single-task mode, shared mode with --tasks
    registered tasks and, if --many-tasks, shared mode with that many; in shared mode each
    request takes the next task's /_task/<token>/ prefix (round robin over all tokens);
  * proxy RSS before any registration, after --tasks and after --many-tasks registrations,
    with permanent credentials and with a ~1 KB temporary-credential certificate;
  * time to register the tasks one after the other over the admin socket (each registration
    also rewrites the proxy's state file, as deployed: beside the upgrade socket, in /tmp).
Every task is registered with the single-task proxy's authorizedScopes, so both modes sign
the same way. Writes a JSON file and prints Markdown tables.
"""

import argparse
import base64
import http.client
import json
import os
import platform
import re
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from driver import (  # noqa: E402  (bench/ is not a package)
    BIN, LOAD_CPU, PROXY_CPU, ROOT, Bench, children, free_port, proc_cpu_seconds,
    proc_status_kib, ratio, wait_port)

# The small request driver.py sends (the upstream answers it with a small JSON document).
SMALL_PATH = "/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ/small"
CONCURRENCY = [64, 256]
# Keys of driver.py's configuration file that only single-task mode accepts.
SINGLE_ONLY_KEYS = ("  credentials:", "    client_id:", "    access_token:", "  authorized_scopes:")

# Round robin over the paths; each wrk thread starts at a different place in the list.
WRK_LUA = """
local paths = {{
{paths}
}}
local requests = {{}}
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  for i, p in ipairs(paths) do requests[i] = wrk.format("GET", p) end
  n = (id * 7919) % #paths
end
function request()
  n = n % #paths + 1
  return requests[n]
end
"""

# Realistic scopes of a task's temporary credentials, repeated with variations up to ~1 KB.
CERT_SCOPES = [
    "assume:worker-id:bench-workers/i-0123456789abcdef{i}",
    "queue:create-artifact:public/build/target.tar.{i}",
    "queue:get-artifact:project/releng/private/{i}/*",
    "secrets:get:project/releng/gecko/build/level-3/{i}",
    "docker-worker:cache:gecko-level-3-checkouts-sparse-v3-{i}",
    "index:insert-task:gecko.v2.mozilla-central.revision.{i}.*",
    "queue:route:tc-treeherder.v2.mozilla-central.{i}",
]
CERT_TARGET_BYTES = 1024


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the admin Unix socket."""

    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.socket_path = str(path)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.socket_path)
        self.sock = s


def certificate():
    """A temporary-credential certificate of about CERT_TARGET_BYTES (unsigned: the proxy does
    not check signatures, and neither does the upstream nginx)."""
    now = int(time.time() * 1000)
    cert = {"version": 1, "scopes": [], "start": now - 60_000, "expiry": now + 3 * 86_400_000,
            "seed": secrets.token_urlsafe(33),
            "signature": base64.b64encode(secrets.token_bytes(32)).decode(),
            "issuer": "static/taskcluster/queue"}
    i = 0
    while len(json.dumps(cert, separators=(",", ":"))) < CERT_TARGET_BYTES - 60:
        cert["scopes"].append(CERT_SCOPES[i % len(CERT_SCOPES)].format(i=i))
        i += 1
    return json.dumps(cert, separators=(",", ":"))


def make_tasks(count, prefix, with_certificate):
    tasks = []
    for i in range(count):
        task_id = f"{prefix}-{i:05d}"
        if with_certificate:
            client_id = f"task-client/{task_id}/0/on/bench-workers/i-{i:016x}/until/{int(time.time()) + 86400}"
        else:
            client_id = f"bench/task-{i:05d}"
        credentials = {"clientId": client_id, "accessToken": secrets.token_urlsafe(33)}
        if with_certificate:
            credentials["certificate"] = certificate()
        tasks.append({"task_id": task_id, "client_id": client_id,
                      "token": secrets.token_urlsafe(24), "credentials": credentials})
    return tasks


def parse_wrk(out):
    """Figures of one wrk run; latencies in milliseconds."""
    def number(pattern, cast=float, default=None):
        m = re.search(pattern, out)
        return cast(m.group(1)) if m else default

    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
    latency = {p: float(v) * scale[u]
               for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)$", out, re.M)}
    return {"rps": number(r"Requests/sec:\s+([\d.]+)"),
            "requests": number(r"(\d+) requests in", int),
            "p50_ms": latency["50"], "p99_ms": latency["99"],
            "non_2xx": number(r"Non-2xx or 3xx responses: (\d+)", int, 0),
            "socket_errors": number(r"Socket errors: (.*)", str, "")}


class Proxy:
    """A running taskcluster-proxy: its process, port and (shared mode) admin socket."""

    def __init__(self, proc, port, admin=None, state=None):
        self.proc, self.port, self.admin, self.state = proc, port, admin, state
        self.tasks = []

    @property
    def pids(self):
        return [self.proc.pid] + children(self.proc.pid)

    def rss_kib(self):
        return proc_status_kib(self.pids, "VmRSS")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # as driver.py
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def register(self, tasks, scopes):
        """Registers tasks one after the other on one admin connection; returns the seconds
        each registration took."""
        conn = UnixHTTPConnection(self.admin)
        took = []
        for t in tasks:
            start = time.perf_counter()
            body = json.dumps({"credentials": t["credentials"], "authorizedScopes": scopes,
                               "identity": {"token": t["token"]}})
            conn.request("PUT", f"/tasks/{t['task_id']}", body=body,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            answer = r.read()
            if r.status != 201:
                raise RuntimeError(f"PUT /tasks/{t['task_id']}: HTTP {r.status} {answer[:300]!r}")
            took.append(time.perf_counter() - start)
        conn.close()
        self.tasks.extend(tasks)
        return took

    def paths(self):
        if self.admin is None:
            return [SMALL_PATH]
        return [f"/_task/{t['token']}{SMALL_PATH}" for t in self.tasks]


class SharedBench(Bench):
    def setup(self):
        super().setup()  # upstream nginx, nginx proxy (idle here) and the single-task proxy
        single_conf = (self.dir / "ours.yaml").read_text()
        scopes = re.search(r"^  authorized_scopes: (.*)$", single_conf, re.M)
        self.scopes = json.loads(scopes.group(1)) if scopes else None
        self.single = Proxy(self.procs[-1], self.ours_port)

    def start_shared(self, name):
        """A shared-mode proxy with driver.py's configuration minus the single-task keys."""
        port = free_port()
        admin = self.dir / f"{name}.admin.sock"
        lines = (self.dir / "ours.yaml").read_text().splitlines()
        kept = [line for line in lines if not line.startswith(SINGLE_ONLY_KEYS)]
        if len(lines) - len(kept) != len(SINGLE_ONLY_KEYS):
            raise RuntimeError("driver.py's configuration changed: cannot derive the shared-mode one")
        conf = self.dir / f"{name}.yaml"
        conf.write_text("\n".join(kept).replace("ours.pid", f"{name}.pid")
                        .replace("ours.sock", f"{name}.sock")
                        .replace(f"127.0.0.1:{self.ours_port}", f"127.0.0.1:{port}") + "\n")
        proc = self.start([str(BIN), "-c", str(conf), "-p", str(port), "-i", "127.0.0.1",
                           "--root-url", f"http://127.0.0.1:{self.upstream_port}",
                           "--admin-socket", str(admin)],
                          PROXY_CPU, stderr=open(self.dir / f"{name}.log", "wb"))
        wait_port(port)
        end = time.time() + 10
        while not admin.exists() and time.time() < end:
            time.sleep(0.05)
        time.sleep(0.5)
        # The registry's state file (for upgrade hand-over): beside the upgrade socket.
        return Proxy(proc, port, admin, self.dir / f"{name}.sock.state.json")

    def populate(self, proxy, count, marks, with_certificate, prefix):
        """Registers `count` tasks, recording RSS and elapsed time at each mark."""
        tasks = make_tasks(count, prefix, with_certificate)
        res = {"rss_empty_kib": proxy.rss_kib(), "rss_kib": {}, "register_seconds": {}}
        if with_certificate:
            res["certificate_bytes"] = statistics.mean(len(t["credentials"]["certificate"]) for t in tasks)
        took = []
        for mark in marks:
            took += proxy.register(tasks[len(took):mark], self.scopes)
            time.sleep(0.5)
            res["rss_kib"][mark] = proxy.rss_kib()
            res["register_seconds"][mark] = sum(took)
        # Whether a registration costs more as the registry grows.
        n = min(100, len(took) // 2)
        res["register_ms_first_last"] = {"n": n, "first": statistics.mean(took[:n]) * 1000,
                                         "last": statistics.mean(took[-n:]) * 1000}
        res["state_file_bytes"] = proxy.state.stat().st_size if proxy.state.exists() else None
        first = marks[0]
        res["bytes_per_task"] = {f"0-{first}": (res["rss_kib"][first] - res["rss_empty_kib"]) * 1024 / first}
        if len(marks) > 1:
            last = marks[-1]
            res["bytes_per_task"][f"{first}-{last}"] = (
                (res["rss_kib"][last] - res["rss_kib"][first]) * 1024 / (last - first))
        res["registrations_per_s"] = marks[-1] / sum(took)
        log = ", ".join(f"{m} tasks {res['rss_kib'][m] / 1024:.1f} MiB ({res['register_seconds'][m]:.2f} s)"
                        for m in marks)
        fl = res["register_ms_first_last"]
        print(f"  {prefix}: empty {res['rss_empty_kib'] / 1024:.1f} MiB, {log}; "
              + ", ".join(f"{k}: {v:.0f} B/task" for k, v in res["bytes_per_task"].items())
              + f"; ms per registration, first {fl['n']} {fl['first']:.2f}, last {fl['n']} {fl['last']:.2f}; "
              f"state file {res['state_file_bytes']} B", flush=True)
        return res

    def check(self, proxy, samples=20):
        """Plain requests before the load: expected statuses and the right task's clientId."""
        problems = []

        def get(path):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            conn.close()
            client = r.getheader("X-Taskcluster-Proxy-Perm-ClientId") or r.getheader("X-Taskcluster-Proxy-Temp-ClientId")
            return r.status, client, body

        picks = secrets.SystemRandom().sample(proxy.tasks, min(samples, len(proxy.tasks))) or [None]
        for t in picks:
            path = f"/_task/{t['token']}{SMALL_PATH}" if t else SMALL_PATH
            status, client, body = get(path)
            want = t["client_id"] if t else None
            if status != 200 or b"DSlhVLpwQhS" not in body or (want and client != want):
                problems.append(f"{path}: HTTP {status}, clientId {client!r} (want {want!r}), body {body[:120]!r}")
        if proxy.admin:
            status, _, body = get(f"/_task/{secrets.token_urlsafe(24)}{SMALL_PATH}")
            if status != 403:
                problems.append(f"unknown token: HTTP {status} (want 403), body {body[:120]!r}")
        return {"requests": len(picks) + (1 if proxy.admin else 0), "problems": problems}

    def wrk_script(self, name, proxy):
        script = self.dir / f"{name}.lua"
        script.write_text(WRK_LUA.format(paths=",\n".join(json.dumps(p) for p in proxy.paths())))
        return script

    def wrk(self, port, conns, seconds, script):
        cmd = ["taskset", "-c", LOAD_CPU, "wrk", f"-t{1 if conns < 4 else 2}", f"-c{conns}",
               f"-d{seconds}s", "--latency", "-s", str(script), f"http://127.0.0.1:{port}/"]
        return parse_wrk(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    def small_requests(self, targets):
        scripts = {name: self.wrk_script(name, p) for name, p in targets.items()}
        for name, p in targets.items():
            self.wrk(p.port, 16, 1, scripts[name])  # warm up connections and pools
        runs = {name: {c: [] for c in CONCURRENCY} for name in targets}
        for c in CONCURRENCY:
            for _ in range(self.args.rounds):
                for name, p in targets.items():  # interleaved: neighbours see the same noise
                    cpu0 = proc_cpu_seconds(p.pids)
                    r = self.wrk(p.port, c, self.args.seconds, scripts[name])
                    r["cpu_s_per_100k"] = (proc_cpu_seconds(p.pids) - cpu0) / r["requests"] * 100_000
                    runs[name][c].append(r)
                    print(f"  {name:13} c={c:<3} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                          f"p99 {r['p99_ms']:.3f} ms  cpu {r['cpu_s_per_100k']:.2f} s/100k  "
                          f"non-2xx {r['non_2xx']}" + (f"  socket errors: {r['socket_errors']}" if r["socket_errors"] else ""),
                          flush=True)
        res = {}
        for name in targets:
            res[name] = {}
            for c, rs in runs[name].items():
                summary = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms", "cpu_s_per_100k")}
                summary["requests"] = sum(r["requests"] for r in rs)
                summary["non_2xx"] = sum(r["non_2xx"] for r in rs)
                summary["socket_errors"] = "; ".join(r["socket_errors"] for r in rs if r["socket_errors"])
                if len(rs) > 1:
                    summary["rounds"] = rs
                res[name][c] = summary
        return res

    def run(self):
        a = self.args
        self.setup()
        try:
            self.results["rss_single_idle_kib"] = self.single.rss_kib()
            print("registrations (permanent credentials):", flush=True)
            targets = {"single": self.single}
            few = self.start_shared("shared-few")
            self.results["memory_throughput_instance"] = self.populate(few, a.tasks, [a.tasks], False, "perm")
            targets[f"shared_{a.tasks}"] = few
            if a.many_tasks:
                many = self.start_shared("shared-many")
                self.results["memory_permanent"] = self.populate(
                    many, a.many_tasks, [a.tasks, a.many_tasks], False, "perm-many")
                targets[f"shared_{a.many_tasks}"] = many
            else:
                self.results["memory_permanent"] = self.results["memory_throughput_instance"]
            self.results["checks"] = {name: self.check(p) for name, p in targets.items()}
            for name, c in self.results["checks"].items():
                print(f"  check {name}: {c['requests']} requests, "
                      + ("OK" if not c["problems"] else "PROBLEMS:\n    " + "\n    ".join(c["problems"])), flush=True)
            print("small requests:", flush=True)
            self.results["small"] = self.small_requests(targets)
            self.results["rss_after_load_kib"] = {name: p.rss_kib() for name, p in targets.items()}
            for p in targets.values():
                if p is not self.single:
                    p.stop()
            print(f"registrations (permanent credentials and a ~{CERT_TARGET_BYTES} B certificate):", flush=True)
            cert = self.start_shared("shared-cert")
            marks = [a.tasks, a.many_tasks] if a.many_tasks else [a.tasks]
            self.results["memory_certificate"] = self.populate(cert, marks[-1], marks, True, "cert")
            cert.stop()
            self.results["proxy_logs"] = {name: log_summary(self.dir / f"{name}.log")
                                          for name in ("ours", "shared-few", "shared-many", "shared-cert")
                                          if (self.dir / f"{name}.log").exists()}
        finally:
            self.teardown()


def log_summary(path):
    """Line count of a proxy's log; "Downstream ConnectionClosed" lines (wrk dropping its
    in-flight requests when a run ends) are counted apart, up to 5 other lines kept."""
    lines = path.read_text(errors="replace").splitlines()
    other = [line for line in lines if "Downstream ConnectionClosed" not in line]
    return {"lines": len(lines), "downstream_closed": len(lines) - len(other), "other": other[:5]}


def mib(kib):
    return f"{kib / 1024:.1f}"


def markdown(r, tasks, many):
    s = r["small"]
    names = ["single", f"shared_{tasks}"] + ([f"shared_{many}"] if many else [])
    head = ["measure", "single-task", f"shared, {tasks:,} tasks", "shared/single"]
    if many:
        head += [f"shared, {many:,} tasks", f"shared {many:,}/single"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    for c in CONCURRENCY:
        base = s["single"][c]
        for label, key, fmt in ((f"req/s, {c} conns", "rps", "{:.0f}"),
                                (f"p50 latency ms, {c} conns", "p50_ms", "{:.3f}"),
                                (f"p99 latency ms, {c} conns", "p99_ms", "{:.3f}"),
                                (f"proxy CPU s per 100k requests, {c} conns", "cpu_s_per_100k", "{:.2f}")):
            cells = [label, fmt.format(base[key])]
            for name in names[1:]:
                cells += [fmt.format(s[name][c][key]), ratio(s[name][c][key], base[key])]
            lines.append("| " + " | ".join(cells) + " |")
        errors = [f"{s[n][c]['non_2xx']}" + (f" ({s[n][c]['socket_errors']})" if s[n][c]["socket_errors"] else "")
                  for n in names]
        cells = [f"non-2xx responses (socket errors), {c} conns", errors[0]]
        for e in errors[1:]:
            cells += [e, ""]
        lines.append("| " + " | ".join(cells) + " |")
    rss = r["rss_after_load_kib"]
    cells = ["proxy RSS after the runs, MiB", mib(rss["single"])]
    for name in names[1:]:
        cells += [mib(rss[name]), ratio(rss[name], rss["single"])]
    lines.append("| " + " | ".join(cells) + " |")

    p, c = r["memory_permanent"], r["memory_certificate"]
    marks = sorted(p["rss_kib"], key=int)
    lines += ["", f"| shared mode, memory and registration | permanent credentials | with a {c['certificate_bytes']:.0f} B certificate |",
              "|---|---|---|",
              f"| proxy RSS, no task registered, MiB | {mib(p['rss_empty_kib'])} | {mib(c['rss_empty_kib'])} |"]
    for m in marks:
        lines.append(f"| proxy RSS with {int(m):,} tasks, MiB | {mib(p['rss_kib'][m])} | {mib(c['rss_kib'][m])} |")
    for span in p["bytes_per_task"]:
        lines.append(f"| RSS bytes per registered task ({span.replace('-', ' → ')} tasks) | "
                     f"{p['bytes_per_task'][span]:.0f} | {c['bytes_per_task'][span]:.0f} |")
    for m in marks:
        lines.append(f"| register {int(m):,} tasks sequentially (one admin connection), s | "
                     f"{p['register_seconds'][m]:.2f} | {c['register_seconds'][m]:.2f} |")
    lines.append(f"| registrations/s | {p['registrations_per_s']:.0f} | {c['registrations_per_s']:.0f} |")
    pf, cf = p["register_ms_first_last"], c["register_ms_first_last"]
    lines.append(f"| ms per registration, first {pf['n']} / last {pf['n']} | "
                 f"{pf['first']:.2f} / {pf['last']:.2f} | {cf['first']:.2f} / {cf['last']:.2f} |")
    lines.append(f"| state file size after the last registration, KiB | "
                 f"{p['state_file_bytes'] / 1024:.0f} | {c['state_file_bytes'] / 1024:.0f} |")
    lines.append(f"| (single-task proxy RSS idle, MiB) | {mib(r['rss_single_idle_kib'])} | |")
    return "\n".join(lines)


def machine():
    cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    version = subprocess.run([str(BIN), "--short-version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu_model": cpu.group(1) if cpu else None,
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "load_average_at_start": os.getloadavg(), "git": rev, "proxy_version": version,
            "pinning": f"proxies on CPU {PROXY_CPU}; upstream nginx, wrk and the registering "
                       f"client on CPU {LOAD_CPU}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    ap.add_argument("--tasks", type=int, default=1000, help="registered tasks for the main comparison")
    ap.add_argument("--many-tasks", type=int, default=0,
                    help="also a shared proxy with this many tasks, and certificates up to this many "
                         "(0: none; registration time grows with the square: 10000 takes ~20 min)")
    ap.add_argument("--rounds", type=int, default=2, help="wrk runs per target and concurrency (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="proxy worker threads (both modes)")
    ap.add_argument("--work-stealing", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "shared-results.json"))
    args = ap.parse_args()
    if args.many_tasks and args.many_tasks <= args.tasks:
        ap.error("--many-tasks must be 0 or more than --tasks")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    info = machine()
    b = SharedBench(args)
    b.run()
    b.results["machine"] = info
    b.results["config"] = {"seconds": args.seconds, "tasks": args.tasks, "many_tasks": args.many_tasks,
                           "rounds": args.rounds, "threads": args.threads,
                           "work_stealing": args.work_stealing, "concurrency": CONCURRENCY,
                           "authorized_scopes": b.scopes, "upstream_path": SMALL_PATH,
                           "shared_request": f"/_task/<token>{SMALL_PATH}, round robin over all tasks"}
    Path(args.out).write_text(json.dumps(b.results, indent=2))
    print()
    print(markdown(b.results, args.tasks, args.many_tasks))
    for name, log in b.results["proxy_logs"].items():
        print(f"\nlog of {name}: {log['lines']} lines, {log['downstream_closed']} 'Downstream ConnectionClosed'"
              + "".join(f"\n  {line}" for line in log["other"]))
    print(f"\n(JSON: {args.out})")


if __name__ == "__main__":
    sys.exit(main())
