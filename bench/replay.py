#!/usr/bin/env python3
"""What keeping request bodies for replay costs, measured side by side in one run.

Two proxies against one nginx upstream: `on` with the default replay settings (1 MiB per
request, 64 MiB budget) and `off` with `replay_buffer_bytes: 0`. Prints, for 1 MiB PUTs:
proxy CPU per request (sequential), peak RSS under 64 concurrent uploads, and the latency
of a PUT whose upstream always answers 503 (retried to max_attempts when kept).
Run through bench/replay.sh (builds the release binary, installs nginx).
"""
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from driver import (BIN, LOAD_CPU, NGINX_COMMON, PROXY_CPU, free_port,  # noqa: E402
                    proc_cpu_seconds, proc_status_kib, wait_port)

MIB = 1 << 20
BODY = bytes(i % 251 for i in range(MIB))

UPSTREAM = """
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    client_max_body_size 0;
    location ~ /fail$ {{ access_log {dir}/fail.log; return 503; }}
    location / {{
      client_body_in_single_buffer on;
      client_body_buffer_size 2m;
      return 201;
    }}
  }}
"""


def start(cmd, cpu, **kw):
    return subprocess.Popen(["taskset", "-c", cpu] + cmd, **kw)


def put(port, path, body=BODY):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("PUT", path, body=body)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def main():
    d = Path(tempfile.mkdtemp(prefix="tcp-replay-"))
    procs = []
    try:
        up = free_port()
        conf = d / "up.conf"
        conf.write_text(NGINX_COMMON.format(dir=d, name="up", body=UPSTREAM.format(port=up, dir=d)))
        procs.append(start(["nginx", "-c", str(conf), "-p", str(d)], LOAD_CPU,
                           stderr=subprocess.DEVNULL))
        wait_port(up)
        ports = {}
        for name, extra in (("on", ""), ("off", "    replay_buffer_bytes: 0\n")):
            port = free_port()
            y = d / f"{name}.yaml"
            y.write_text(f"""version: 1
threads: 1
pid_file: {d}/{name}.pid
upgrade_sock: {d}/{name}.sock
taskcluster_proxy:
  listen:
    - address: "127.0.0.1:{port}"
  root_url: http://127.0.0.1:{up}
  credentials: {{client_id: bench/client, access_token: bench-access-token}}
  access_log: "off"
  log_level: warn
  retries:
    max_attempts: 3
    initial_backoff_ms: 100
{extra}""")
            p = start([str(BIN), "-c", str(y)], PROXY_CPU, stderr=open(d / f"{name}.log", "wb"))
            procs.append(p)
            wait_port(port)
            ports[name] = (port, [p.pid])

        results = {}
        n = 1000
        for name, (port, pids) in ports.items():
            put(port, "/api/queue/v1/warm")
            cpu0, t0 = proc_cpu_seconds(pids), time.monotonic()
            for _ in range(n):
                assert put(port, "/api/queue/v1/upload") == 201
            wall, cpu = time.monotonic() - t0, proc_cpu_seconds(pids) - cpu0
            rss0 = proc_status_kib(pids, "VmRSS")
            threads = [threading.Thread(target=put, args=(port, "/api/queue/v1/upload"))
                       for _ in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            log = d / "fail.log"
            seen = len(log.read_text().splitlines()) if log.exists() else 0
            t0 = time.monotonic()
            status = put(port, "/api/queue/v1/fail")
            fail_ms = (time.monotonic() - t0) * 1000
            time.sleep(0.2)  # nginx writes its log line after answering
            attempts = len(log.read_text().splitlines()) - seen
            results[name] = {
                "cpu_us_per_mib_put": cpu / n * 1e6,
                "mib_per_s_sequential": n / wall,
                "rss_before_concurrent_mib": rss0 / 1024,
                "peak_rss_mib": proc_status_kib(pids, "VmHWM") / 1024,
                "failing_put_status": status,
                "failing_put_ms": fail_ms,
                "failing_put_attempts": attempts,
            }
        on, off = results["on"], results["off"]
        print("| 1 MiB PUT | replay on (default) | replay off | on/off |")
        print("|---|---|---|---|")
        for key, label in (("cpu_us_per_mib_put", "proxy CPU per PUT, µs"),
                           ("mib_per_s_sequential", "sequential MiB/s"),
                           ("peak_rss_mib", "peak RSS after 64 concurrent, MiB"),
                           ("failing_put_ms", "PUT to an always-503 upstream, ms")):
            print(f"| {label} | {on[key]:.1f} | {off[key]:.1f} | {on[key] / off[key]:.2f}× |")
        for name, r in results.items():
            print(f"always-503 PUT, replay {name}: {r['failing_put_status']} after "
                  f"{r['failing_put_attempts']} upstream attempt(s)")
        if "--json" in sys.argv:
            json.dump(results, sys.stdout, indent=1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)  # fast shutdown for Pingora and nginx
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
