#!/usr/bin/env python3
"""User and system CPU of breakwater and nginx over one `bench overhead` run.

Usage (from the repository, after cargo build --release -p breakwater-loadtest):
    docs/benchmarks/user-system-cpu.py --with-nginx --http2 --duration 8s

Reads /proc/PID/stat of every `breakwater` and `nginx` process every 0.2 s
while the bench runs (one round), and prints each program's user and system
seconds, and both per measured request (warm-up requests are not counted, so
the per-request figures are high by the warm-up's share; compare the two
programs, not the absolute values). docs/benchmarks.md, section 1f.
"""
import subprocess, sys, time, os, re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
p = subprocess.Popen([os.path.join(ROOT,'target/release/loadtest'),'bench','overhead','--rounds','1']+sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
last = {}
tck = os.sysconf('SC_CLK_TCK')
while p.poll() is None:
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            comm = open(f'/proc/{pid}/comm').read().strip()
            if comm not in ('breakwater','nginx'): continue
            f = open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split()
            last[pid] = (comm, int(f[11]), int(f[12]))
        except OSError: pass
    time.sleep(0.2)
out = p.stdout.read()
reqs = {}
for l in out.splitlines():
    m = re.match(r'^best\s+(\w+)\s+(\d+)', l)
    if m: reqs[m.group(1)] = int(m.group(2))
    if l.startswith('best'): print(l)
agg = {}
for pid,(c,u,s) in last.items():
    a = agg.setdefault(c,[0,0]); a[0]+=u; a[1]+=s
for c,(u,s) in agg.items():
    n = reqs.get(c, 0)
    # warm-up requests are not in the count: scale by (duration+warmup)/duration is unknown; report raw per measured request
    print(f"{c}: user {u/tck:.2f}s sys {s/tck:.2f}s; per measured request user {u/tck/n*1e6:.1f} us, sys {s/tck/n*1e6:.1f} us" if n else c)
