#!/usr/bin/env python3
"""Side-by-side benchmark: direct upstream vs nginx reverse proxy vs taskcluster-proxy.

Run through bench/run.sh. Everything listens on 127.0.0.1. The proxy under test (ours or
nginx) is pinned to CPU 1; the upstream nginx and the load generator share CPU 0, so both
proxies get the same single core and the same load. Writes a JSON file and prints a
Markdown table with ratios ours/nginx and ours/direct.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "taskcluster-proxy"
GIB = 1 << 30
PROXY_CPU = "1"
LOAD_CPU = "0"
CONCURRENCY = [1, 16, 64, 256]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def proc_cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / tick


def proc_status_kib(pids, key):
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                total += int(line.split()[1])
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


NGINX_COMMON = """
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  client_body_temp_path {dir}/{name}-body;
  proxy_temp_path {dir}/{name}-proxy;
  fastcgi_temp_path {dir}/{name}-fcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi;
  scgi_temp_path {dir}/{name}-scgi;
  {body}
}}
"""

UPSTREAM = """
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    client_max_body_size 0;
    location ~ /small$ {{
      default_type application/json;
      return 200 '{{"taskId":"DSlhVLpwQhS-3fLhmbo1eQ","status":{{"state":"completed"}}}}';
    }}
    location ~ /big$ {{
      root {dir};
      rewrite ^ /big.bin break;
    }}
    location ~ /upload$ {{
      root {sink};
      dav_methods PUT;
      create_full_put_path on;
      client_body_temp_path {sink}/tmp;
    }}
  }}
"""

NGINX_PROXY = """
  upstream tc {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    client_max_body_size 0;
    location / {{
      proxy_pass http://tc;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization 'Hawk id="bench/client", mac="ifXNnkCSpZc9Tl/gdlm1rU1KoAoa9c42HG5ErsrBLdU=", ts="1700000000", nonce="kB3c9Yz1"';
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
"""


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="tcp-bench-"))
        self.sink = Path(tempfile.mkdtemp(prefix="tcp-bench-sink-", dir="/dev/shm"))
        self.procs = []
        self.results = {}

    def start(self, cmd, cpu, **kw):
        p = subprocess.Popen(["taskset", "-c", cpu] + cmd, **kw)
        self.procs.append(p)
        return p

    def nginx(self, name, body, cpu):
        conf = self.dir / f"{name}.conf"
        conf.write_text(NGINX_COMMON.format(dir=self.dir, name=name, body=body))
        p = self.start(["nginx", "-c", str(conf), "-p", str(self.dir)], cpu,
                       stderr=subprocess.DEVNULL)
        return p

    def setup(self):
        big = self.dir / "big.bin"
        with open(big, "wb") as f:
            f.truncate(GIB)
        # nginx workers run as an unprivileged user: let them read the file and write the sink.
        os.chmod(self.dir, 0o755)
        os.chmod(big, 0o644)
        os.chmod(self.sink, 0o777)
        (self.sink / "tmp").mkdir(mode=0o777)
        os.chmod(self.sink / "tmp", 0o777)
        self.upstream_port = free_port()
        self.nginx("upstream", UPSTREAM.format(port=self.upstream_port, dir=self.dir, sink=self.sink), LOAD_CPU)
        wait_port(self.upstream_port)

        self.nginx_port = free_port()
        nginx_proxy = self.nginx("proxy", NGINX_PROXY.format(port=self.nginx_port, upstream=self.upstream_port), PROXY_CPU)
        wait_port(self.nginx_port)
        time.sleep(0.3)
        self.nginx_pids = [nginx_proxy.pid] + children(nginx_proxy.pid)

        self.ours_port = free_port()
        conf = self.dir / "ours.yaml"
        conf.write_text(f"""version: 1
threads: {self.args.threads}
work_stealing: {str(self.args.work_stealing).lower()}
upstream_keepalive_pool_size: 1024
pid_file: {self.dir}/ours.pid
upgrade_sock: {self.dir}/ours.sock
taskcluster_proxy:
  listen:
    - address: "127.0.0.1:{self.ours_port}"
  root_url: http://127.0.0.1:{self.upstream_port}
  credentials:
    client_id: bench/client
    access_token: bench-access-token
  authorized_scopes: ["queue:get-task:*"]
  access_log: "off"
  log_level: warn
""")
        ours = self.start([str(BIN), "-c", str(conf)], PROXY_CPU,
                          stderr=open(self.dir / "ours.log", "wb"))
        wait_port(self.ours_port)
        self.ours_pids = [ours.pid]
        self.targets = {
            "direct": (self.upstream_port, None),
            "nginx": (self.nginx_port, self.nginx_pids),
            "ours": (self.ours_port, self.ours_pids),
        }

    def teardown(self):
        for p in self.procs:
            try:
                p.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.sink, ignore_errors=True)

    def wrk(self, port, conns, seconds):
        url = f"http://127.0.0.1:{port}/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ/small"
        threads = 1 if conns < 4 else 2
        out = subprocess.run(
            ["taskset", "-c", LOAD_CPU, "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s",
             "--latency", url],
            capture_output=True, text=True, check=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock_err = re.search(r"Socket errors: (.*)", out)

        def pct(p):
            m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
            v, unit = float(m.group(1)), m.group(2)
            return v * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

        return {"rps": rps, "requests": total, "p50_ms": pct(50), "p99_ms": pct(99),
                "non_2xx": int(errors.group(1)) if errors else 0,
                "socket_errors": sock_err.group(1) if sock_err else ""}

    def small_requests(self):
        res = {}
        for name, (port, pids) in self.targets.items():
            # warm up connections and pools
            self.wrk(port, 16, 1)
            res[name] = {}
            for c in CONCURRENCY:
                cpu0 = proc_cpu_seconds(pids) if pids else 0
                r = self.wrk(port, c, self.args.seconds)
                if pids:
                    cpu = proc_cpu_seconds(pids) - cpu0
                    r["cpu_s_per_100k"] = cpu / r["requests"] * 100_000
                res[name][c] = r
                print(f"  {name:6} c={c:<3} {r['rps']:>9.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
                      + (f"  cpu {r['cpu_s_per_100k']:.2f} s/100k" if pids else ""), flush=True)
        self.results["small"] = res

    def transfer(self, port, pids, upload):
        url = f"http://127.0.0.1:{port}/api/queue/v1/" + ("upload" if upload else "big")
        cmd = ["taskset", "-c", LOAD_CPU, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"]
        if upload:
            cmd += ["-T", str(self.dir / "big.bin")]
        out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout.split()
        code, secs = int(out[0]), float(out[1])
        if code >= 300:
            raise RuntimeError(f"{url}: HTTP {code}")
        for f in self.sink.rglob("upload"):
            f.unlink()
        return {"status": code, "seconds": secs, "mib_per_s": 1024 / secs,
                "peak_rss_kib": proc_status_kib(pids, "VmHWM") if pids else None}

    def transfers(self):
        res = {}
        for name, (port, pids) in self.targets.items():
            res[name] = {"download": self.transfer(port, pids, False),
                         "upload": self.transfer(port, pids, True)}
            d, u = res[name]["download"], res[name]["upload"]
            print(f"  {name:6} 1 GiB down {d['mib_per_s']:.0f} MiB/s ({d['status']}), up {u['mib_per_s']:.0f} MiB/s ({u['status']})"
                  + (f", peak RSS {u['peak_rss_kib'] / 1024:.1f} MiB" if pids else ""), flush=True)
        self.results["transfer"] = res

    def idle_connections(self, port, pids, n):
        socks = []
        req = (f"GET /api/queue/v1/task/x/small HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(req)
            socks.append(s)
        for s in socks:
            s.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        time.sleep(1)
        rss = proc_status_kib(pids, "VmRSS")
        for s in socks:
            s.close()
        return rss

    def memory(self):
        res = {}
        for name in ("nginx", "ours"):
            port, pids = self.targets[name]
            res[name] = {"rss_after_load_kib": proc_status_kib(pids, "VmRSS"),
                         "idle_conns": self.args.idle_conns,
                         "rss_idle_conns_kib": self.idle_connections(port, pids, self.args.idle_conns)}
            print(f"  {name:6} RSS after load {res[name]['rss_after_load_kib'] / 1024:.1f} MiB, "
                  f"with {self.args.idle_conns} idle keep-alive connections {res[name]['rss_idle_conns_kib'] / 1024:.1f} MiB", flush=True)
        self.results["memory"] = res

    def run(self):
        self.setup()
        try:
            self.results["rss_idle_kib"] = {
                "nginx": proc_status_kib(self.nginx_pids, "VmRSS"),
                "ours": proc_status_kib(self.ours_pids, "VmRSS"),
            }
            print("small requests:", flush=True)
            self.small_requests()
            print("1 GiB transfers:", flush=True)
            self.transfers()
            print("memory:", flush=True)
            self.memory()
        finally:
            self.teardown()


def ratio(a, b):
    return f"{a / b:.2f}×" if b else "n/a"


def markdown(r):
    s, t, m = r["small"], r["transfer"], r["memory"]
    lines = ["| measure | direct | nginx | ours | ours/nginx | ours/direct |", "|---|---|---|---|---|---|"]
    for c in CONCURRENCY:
        d, n, o = s["direct"][c], s["nginx"][c], s["ours"][c]
        lines.append(f"| req/s, {c} conns | {d['rps']:.0f} | {n['rps']:.0f} | {o['rps']:.0f} | {ratio(o['rps'], n['rps'])} | {ratio(o['rps'], d['rps'])} |")
        lines.append(f"| p50 / p99 ms, {c} conns | {d['p50_ms']:.3f} / {d['p99_ms']:.3f} | {n['p50_ms']:.3f} / {n['p99_ms']:.3f} | {o['p50_ms']:.3f} / {o['p99_ms']:.3f} | {ratio(o['p99_ms'], n['p99_ms'])} (p99) | |")
    for c in (64,):
        n, o = s["nginx"][c]["cpu_s_per_100k"], s["ours"][c]["cpu_s_per_100k"]
        lines.append(f"| proxy CPU s per 100k requests ({c} conns) | | {n:.2f} | {o:.2f} | {ratio(o, n)} | |")
    for kind in ("download", "upload"):
        d, n, o = t["direct"][kind], t["nginx"][kind], t["ours"][kind]
        lines.append(f"| 1 GiB {kind} MiB/s | {d['mib_per_s']:.0f} | {n['mib_per_s']:.0f} | {o['mib_per_s']:.0f} | {ratio(o['mib_per_s'], n['mib_per_s'])} | {ratio(o['mib_per_s'], d['mib_per_s'])} |")
    n, o = t["nginx"]["upload"]["peak_rss_kib"], t["ours"]["upload"]["peak_rss_kib"]
    lines.append(f"| proxy peak RSS after 1 GiB down + up, MiB | | {n / 1024:.1f} | {o / 1024:.1f} | {ratio(o, n)} | |")
    n, o = r["rss_idle_kib"]["nginx"], r["rss_idle_kib"]["ours"]
    lines.append(f"| RSS idle, MiB | | {n / 1024:.1f} | {o / 1024:.1f} | {ratio(o, n)} | |")
    n, o = m["nginx"]["rss_after_load_kib"], m["ours"]["rss_after_load_kib"]
    total = sum(s["ours"][c]["requests"] for c in CONCURRENCY)
    lines.append(f"| RSS after the small-request runs ({total} requests), MiB | | {n / 1024:.1f} | {o / 1024:.1f} | {ratio(o, n)} | |")
    n, o = m["nginx"]["rss_idle_conns_kib"], m["ours"]["rss_idle_conns_kib"]
    lines.append(f"| RSS with {m['ours']['idle_conns']} idle keep-alive connections, MiB | | {n / 1024:.1f} | {o / 1024:.1f} | {ratio(o, n)} | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    ap.add_argument("--idle-conns", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1, help="proxy worker threads")
    ap.add_argument("--work-stealing", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    b = Bench(args)
    b.run()
    b.results["machine"] = {"cpus": os.cpu_count(), "kernel": platform.release(),
                            "date": time.strftime("%Y-%m-%d"),
                            "pinning": f"proxy on CPU {PROXY_CPU}; upstream nginx and wrk/curl on CPU {LOAD_CPU}"}
    Path(args.out).write_text(json.dumps(b.results, indent=2))
    print()
    print(markdown(b.results))
    print(f"\n(JSON: {args.out})")


if __name__ == "__main__":
    sys.exit(main())
