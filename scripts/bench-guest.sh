#!/bin/bash
# scripts/bench-guest.sh - the benchmark of issue #6, INSIDE the test VM (started by
# scripts/bench.sh through nvm_vm_boot; runs as root on Debian's 6.12 kernel).
#
#   bench-guest.sh                 run every configuration, raw results into $BENCH_OUT/raw
#   bench-guest.sh --one CONFIG    (internal) set up, measure and tear down one configuration
#   bench-guest.sh --report DIR    (host or guest) print the Markdown report of DIR/raw
#
# Configurations (the same fio jobs, warm-up and run time for each):
#   null     1: nvmirror-null, a ublk device that completes every I/O at once (ublk's floor)
#   single   2: nvmirrord, one node, no partner (staging + flush)
#   single-ins 2i: configuration 2 computing crc32c by the CPU's instruction only
#               (`NVMIRROR_CRC32C=instruction`), against the engine's timed choice in 2
#   single-pin 2p: configuration 2 with each ublk queue thread pinned to the CPUs the kernel
#               maps to its queue (`lun.pin_queues = true`, libublk's placement), against 2's
#               queue threads free to run on any CPU (the default)
#   pmem     2b: the same with the NVRAM on the emulated NVDIMM /dev/pmem0
#   rdma     3: two nvmirrords in this VM, mirror link over Soft-RoCE (rxe on a dummy netdev),
#               each node's NVRAM on device-DAX (/dev/daxN.0 on an emulated NVDIMM of its own)
#   rdma-nomac 3m: configuration 3 with `cluster.frame_mac = false` (no MAC per message)
#   tcp      4: the same over TCP (127.0.0.1), NVRAM in tmpfs
#   tcp-nomac 4m: configuration 4 with `cluster.frame_mac = false` (frames carry crc32c, only
#               the handshake is authenticated: DRBD's default), to show what the MACs cost
#   own      4o: configuration 4 in shared-nothing mode (`storage = "own"`, issue #17): each
#               node its own medium (as DRBD's two backing devices), a 4 MiB arbiter;
#               then the cost of contention (both nodes writing one portion, a note) and
#               node-b's reads of node-a's ranges, forwarded and under a read lease (a note)
#   drbd     5: DRBD 8.4 (in-tree module) protocol C, two resources on 127.0.0.1 with swapped
#               ports, fio on the primary's /dev/drbd0
#   raw      6a: the loop device itself, O_DIRECT
#   rawsync  6b: the loop device, O_DIRECT + fsync after every write
#   scale    one node with 1, 2 and 4 ublk queues, each under 1, 2 and 4 fio jobs (4 KiB random
#            write and read, QD32 per job, one run each), and the daemon's anonymous RSS
#   ship     claim set C: 1, 2 and 3 log-shipping sources (TCP) into one destination, writing
#            at once: per-source 4K random write QD1 latency and QD32 IOPS, the destination's
#            ingest against its disk's sequential write bandwidth
# Medium for all: files on ext4 on the virtio disk (/dev/vda, the host's image), each behind a
# loop device with direct I/O on (so a write reaches the virtio disk, not the guest's page
# cache). nvmirror's NVRAM: a file in the VM's tmpfs for configurations 2 and 4, the emulated
# NVDIMM /dev/pmem0 for 2b, and device-DAX on two more emulated NVDIMMs for 3 (on this kernel
# the RDMA link cannot register a /dev/pmemN mapping, ibv_reg_mr fails with EFAULT).
#
# Workloads (fio, --direct=1 --ioengine=io_uring, --ramp_time=$BENCH_RAMP, --runtime=$BENCH_RUNTIME):
#   qd1    4 KiB random write, QD1   (clat p50 / p99 / p99.9)
#   qd32w  4 KiB random write, QD32  (IOPS)
#   seqw   128 KiB sequential write, QD8 (MiB/s)
#   qd32r  4 KiB random read, QD32   (IOPS)
#   mixed  4 KiB random 70% read / 30% write, QD16 (IOPS, read + write)
# run BENCH_REPEATS times in that order per configuration (nothing drained in between).
# Per daemon: peak RSS (VmHWM), anonymous RSS, CPU time (utime + stime) over the measured
# runs, divided by the GiB written to the device under test.
#
# Environment: NVM_BIN (release binaries), BENCH_OUT (writable, host-visible), BENCH_RUNTIME
# (s, default 4), BENCH_RAMP (s, default 1), BENCH_REPEATS (default 3), BENCH_CONFIGS (default
# all, in the order above), BENCH_MEDIUM_MB (each medium file, default 1024), BENCH_REGION_MB
# (the part fio uses, default 896), BENCH_NVRAM_MB (a node's own log, default 256), BENCH_PERF=1
# (after the measured runs, profile one more run of each write workload and of the 70/30 mix with perf record -a;
# BENCH_PERF_WORKLOADS names others, e.g. "qd32r").
# After the measured runs of an nvmirror configuration, one extra QD1 run with the flusher
# paused is reported as a diagnostic (not in the medians).
set -uo pipefail

CONFIG_ORDER=(null single single-ins single-pin pmem rdma rdma-nomac tcp tcp-nomac own drbd raw rawsync scale ship)
WORKLOADS=(qd1 qd32w seqw qd32r mixed)

# =============================================================================== report ===
# Reads DIR/raw/<config>/... (written below) and DIR/meta-*.env; prints Markdown.
report() {
	python3 - "$1" <<'PY'
import json, os, re, statistics, sys

out = sys.argv[1]
raw = os.path.join(out, "raw")

def env(path):
    d = {}
    try:
        for line in open(path):
            line = line.rstrip("\n")
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                d[k] = v
    except OSError:
        pass
    return d

meta = env(os.path.join(out, "meta-host.env"))
meta.update(env(os.path.join(out, "meta-guest.env")))

LABEL = {
    "null": "1 ublk null device (floor)",
    "single": "2 nvmirror, 1 node",
    "single-ins": "2i nvmirror, 1 node, crc32c by the CPU instruction (`NVMIRROR_CRC32C=instruction`)",
    "single-pin": "2p nvmirror, 1 node, queue threads pinned to their queue's CPU (`lun.pin_queues = true`)",
    "pmem": "2b nvmirror, 1 node, NVRAM on /dev/pmem0",
    "rdma": "3 nvmirror, 2 nodes, RDMA (rxe), NVRAM on device-DAX",
    "rdma-nomac": "3m nvmirror, 2 nodes, RDMA (rxe), no frame MACs (`frame_mac = false`)",
    "tcp": "4 nvmirror, 2 nodes, TCP",
    "tcp-nomac": "4m nvmirror, 2 nodes, TCP, no frame MACs (`frame_mac = false`)",
    "own": "4o nvmirror, 2 nodes, TCP, each its own medium",
    "drbd": "5 DRBD 8.4 protocol C",
    "raw": "6a loop, O_DIRECT",
    "rawsync": "6b loop, O_DIRECT + fsync/write",
}
ORDER = ["null", "single", "single-ins", "single-pin", "pmem", "rdma", "rdma-nomac", "tcp", "tcp-nomac", "own", "drbd", "raw", "rawsync"]
# metric name -> (workload, extractor, unit, higher is better)
def pct(side, p):
    return lambda j: j["jobs"][0][side]["clat_ns"]["percentile"][p] / 1000.0
METRICS = [
    ("p50", "qd1", pct("write", "50.000000"), "µs", False),
    ("p99", "qd1", pct("write", "99.000000"), "µs", False),
    ("p99.9", "qd1", pct("write", "99.900000"), "µs", False),
    ("qd32w", "qd32w", lambda j: j["jobs"][0]["write"]["iops"], "IOPS", True),
    ("seqw", "seqw", lambda j: j["jobs"][0]["write"]["bw_bytes"] / 2**20, "MiB/s", True),
    ("qd32r", "qd32r", lambda j: j["jobs"][0]["read"]["iops"], "IOPS", True),
    ("mixed", "mixed", lambda j: j["jobs"][0]["read"]["iops"] + j["jobs"][0]["write"]["iops"], "IOPS", True),
]

configs = [c for c in ORDER if os.path.isdir(os.path.join(raw, c))]
vals = {}      # (config, metric) -> [values]
errors = {}
for c in configs:
    d = os.path.join(raw, c)
    e = os.path.join(d, "error")
    if os.path.exists(e):
        errors[c] = open(e).read().strip().replace("\n", " ").replace("|", "/")
    for name, wl, fn, _, _ in METRICS:
        xs = []
        for f in sorted(os.listdir(d)):
            if f.startswith(wl + ".") and f.endswith(".json") and f.split(".")[1].isdigit():
                try:
                    j = json.load(open(os.path.join(d, f)))
                    if j["jobs"][0].get("error", 0) == 0:
                        xs.append(fn(j))
                except (ValueError, KeyError, IndexError, OSError):
                    pass
        if xs:
            vals[(c, name)] = xs

def med(c, m):
    xs = vals.get((c, m))
    return statistics.median(xs) if xs else None

def fmt(x):
    if x is None:
        return "n/a"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"

def cell(c, m):
    xs = vals.get((c, m))
    if not xs:
        return "n/a"
    s = fmt(statistics.median(xs))
    if len(xs) > 1:
        s += f" ({fmt(min(xs))}–{fmt(max(xs))})"
    return s

def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None

def rfmt(r):
    return "n/a" if r is None else f"{r:.2f}x"

reps = meta.get("BENCH_REPEATS", "?")
p = print
p(f"Measured {meta.get('DATE', '?')} by `scripts/bench.sh`. Host: {meta.get('HOST_CPU', '?')}, "
  f"{meta.get('HOST_CORES', '?')} cores. VM: {meta.get('ACCEL', '?').upper()}, "
  f"{meta.get('GUEST_CPUS', '?')} vCPUs, {meta.get('GUEST_MEM_MIB', '?')} MiB RAM, kernel "
  f"{meta.get('GUEST_KERNEL', '?')}.")
p()
p(f"Medium (every configuration): {meta.get('MEDIUM', '?')}. "
  f"NVRAM: {meta.get('NVRAM', '?')}. fio {meta.get('FIO', '?')}, `--direct=1 --ioengine=io_uring`, "
  f"{meta.get('BENCH_RAMP', '?')} s warm-up + {meta.get('BENCH_RUNTIME', '?')} s per run over the first "
  f"{meta.get('BENCH_REGION_MB', '?')} MiB of each device; each cell is the median of {reps} runs "
  f"(min–max). Workloads run in the order of the columns, nothing drained in between.")
if meta.get("BUILD"):
    p()
    p(f"Binaries: release build of {meta['BUILD']}.")
if meta.get("LOAD_NOTE"):
    p()
    p(meta["LOAD_NOTE"])
p()
hdr = ["configuration", "4K randwrite QD1 p50 µs", "p99 µs", "p99.9 µs",
       "4K randwrite QD32 IOPS", "128K seq write QD8 MiB/s", "4K randread QD32 IOPS",
       "70/30 randrw QD16 IOPS"]
p("| " + " | ".join(hdr) + " |")
p("|" + " --- |" * len(hdr))
for c in configs:
    if c in errors and not any((c, m[0]) in vals for m in METRICS):
        p(f"| {LABEL[c]} | failed: {errors[c]} |" + " |" * (len(hdr) - 2))
        continue
    p(f"| {LABEL[c]} | " + " | ".join(cell(c, m[0]) for m in METRICS) + " |")
p()
p("Ratios of the medians, vs the ublk null floor (1) / vs DRBD protocol C (5). Latency: lower "
  "is better; IOPS and MiB/s: higher is better.")
p()
rh = ["configuration", "QD1 p50", "QD1 p99", "QD32 randwrite", "seq write", "QD32 randread", "70/30 mixed"]
p("| " + " | ".join(rh) + " |")
p("|" + " --- |" * len(rh))
for c in configs:
    row = []
    for m in ["p50", "p99", "qd32w", "seqw", "qd32r", "mixed"]:
        row.append(f"{rfmt(ratio(med(c, m), med('null', m)))} / {rfmt(ratio(med(c, m), med('drbd', m)))}")
    p(f"| {LABEL[c]} | " + " | ".join(row) + " |")
p()

# ---- resources
p("Daemons: peak RSS (VmHWM, includes the touched NVRAM mapping), anonymous RSS at the end, "
  "and CPU time (utime + stime) over all measured runs of the configuration (reads included) "
  "per GiB written to the device under test.")
p()
p("| configuration | process | peak RSS MiB | anon RSS MiB | CPU s | GiB written | CPU s per GiB written |")
p("| --- | --- | --- | --- | --- | --- | --- |")
for c in configs:
    d = os.path.join(raw, c)
    for f in sorted(os.listdir(d)):
        if not f.startswith("res-"):
            continue
        r = env(os.path.join(d, f))
        try:
            cpu = float(r.get("cpu_s", "nan"))
            gib = float(r.get("written_bytes", "0")) / 2**30
        except ValueError:
            continue
        hwm = r.get("hwm_kb", "")
        anon = r.get("anon_kb", "")
        hwm_s = f"{int(hwm) / 1024:.0f}" if hwm.isdigit() else "—"
        anon_s = f"{int(anon) / 1024:.1f}" if anon.isdigit() else "—"
        per = f"{cpu / gib:.1f}" if gib > 0 else "n/a"
        p(f"| {LABEL[c]} | {r.get('name', f[4:])} | {hwm_s} | {anon_s} | {cpu:.1f} | {gib:.2f} | {per} |")
p()

# ---- scale: queues x fio jobs (one node)
scale_dir = os.path.join(raw, "scale")
scale_rss = {}
if os.path.isdir(scale_dir):
    try:
        for line in open(os.path.join(scale_dir, "rss")):
            q, anon, hwm = line.split()
            scale_rss[int(q)] = (int(anon), int(hwm))
    except (OSError, ValueError):
        pass
    def scale_iops(q, jobs, wl):
        try:
            j = json.load(open(os.path.join(scale_dir, f"q{q}-j{jobs}-{wl}.json")))
            side = "write" if wl == "randwrite" else "read"
            return j["jobs"][0][side]["iops"] if j["jobs"][0].get("error", 0) == 0 else None
        except (OSError, ValueError, KeyError, IndexError):
            return None
    p("One node (configuration 2's set-up) with 1, 2 and 4 ublk queues, under 1, 2 and 4 fio jobs "
      "of 4K random I/O at QD32 each (one run per cell): IOPS, write / read, and the daemon's "
      "anonymous RSS after the runs.")
    p()
    p("| ublk queues | 1 job | 2 jobs | 4 jobs | anon RSS MiB |")
    p("| --- | --- | --- | --- | --- |")
    for q in (1, 2, 4):
        cells = [f"{fmt(scale_iops(q, j, 'randwrite'))} / {fmt(scale_iops(q, j, 'randread'))}" for j in (1, 2, 4)]
        rss = f"{scale_rss[q][0] / 1024:.1f}" if q in scale_rss else "n/a"
        p(f"| {q} | " + " | ".join(cells) + f" | {rss} |")
    if os.path.exists(os.path.join(scale_dir, "error")):
        p()
        p("scale: ERROR: " + open(os.path.join(scale_dir, "error")).read().strip().replace("\n", " "))
    p()

# ---- ship: N log-shipping sources into one destination (claim set C)
ship_dir = os.path.join(raw, "ship")
if os.path.isdir(ship_dir):
    def ship_job(n, wl, i, r):
        try:
            j = json.load(open(os.path.join(ship_dir, f"n{n}-{wl}-src{i}-r{r}.json")))
            return j["jobs"][0] if j["jobs"][0].get("error", 0) == 0 else None
        except (OSError, ValueError, KeyError, IndexError):
            return None
    ingest = {}
    try:
        ingest_lines = open(os.path.join(ship_dir, "ingest")).read().splitlines()
    except OSError:
        ingest_lines = []
    for line in ingest_lines:
        try:  # (a line whose status read failed is skipped, not the rest)
            n, wl, r, b0, b1, t0, t1 = line.split()
            ingest[(int(n), wl, int(r))] = (int(b1) - int(b0)) / 2**20 / max(float(t1) - float(t0), 1e-9)
        except ValueError:
            pass
    ship_repeats = sorted({int(m.group(1)) for f in os.listdir(ship_dir)
                           for m in [re.match(r"n\d+-qd\d+-src\d+-r(\d+)\.json$", f)] if m}) or [1]

    def spread(xs):
        """The median over the repeats, and their range."""
        xs = [x for x in xs if x is not None]
        if not xs:
            return "n/a"
        s = fmt(statistics.median(xs))
        return s + (f" ({fmt(min(xs))}–{fmt(max(xs))})" if len(xs) > 1 else "")

    def med_or_none(xs):
        return statistics.median(xs) if xs else None
    disk_bw = None
    try:
        disk_bw = json.load(open(os.path.join(ship_dir, "disk.json")))["jobs"][0]["write"]["bw_bytes"] / 2**20
    except (OSError, ValueError, KeyError, IndexError):
        pass
    p("Log shipping (claim set C, issue #18): 1, 2 and 3 sources (TCP, NVRAM in tmpfs, "
      "`degraded = \"write-through\"`) writing at once into one destination whose log files "
      "and images are on the disk. Per source (median over the active sources): 4K random "
      "write QD1 p50 / p99 µs and QD32 IOPS; the destination's ingest = bytes appended to "
      "its log files per second of the QD32 run (the fio runs' warm-up included), against "
      f"the same disk's sequential write bandwidth (fio 1 MiB QD4: {fmt(disk_bw)} MiB/s). "
      f"Each cell: the median of {len(ship_repeats)} run(s) (min–max).")
    p()
    p("| sources | QD1 p50 µs | QD1 p99 µs | QD32 IOPS per source | QD32 IOPS in all | ingest MiB/s | ingest / disk |")
    p("| --- | --- | --- | --- | --- | --- | --- |")
    for n in (1, 2, 3):
        p50, p99, per_source, in_all, ing = [], [], [], [], []
        for r in ship_repeats:
            qd1 = [ship_job(n, "qd1", i, r) for i in range(1, n + 1)]
            qd32 = [ship_job(n, "qd32", i, r) for i in range(1, n + 1)]
            p50.append(med_or_none([j["write"]["clat_ns"]["percentile"]["50.000000"] / 1000 for j in qd1 if j]))
            p99.append(med_or_none([j["write"]["clat_ns"]["percentile"]["99.000000"] / 1000 for j in qd1 if j]))
            iops = [j["write"]["iops"] for j in qd32 if j]
            per_source.append(med_or_none(iops))
            in_all.append(sum(iops) if len(iops) == n else None)
            ing.append(ingest.get((n, "qd32", r)))
        share = [ratio(x, disk_bw) for x in ing]
        share = [100 * x for x in share if x is not None]
        p(f"| {n} | {spread(p50)} | {spread(p99)} | {spread(per_source)} | {spread(in_all)} "
          f"| {spread(ing)} | {f'{statistics.median(share):.2f}%' if share else 'n/a'} |")
    for f in ("error", "notes"):
        if os.path.exists(os.path.join(ship_dir, f)):
            p()
            p(f"ship: {f}: " + open(os.path.join(ship_dir, f)).read().strip().replace("\n", " "))
    p()

# ---- targets
def target(name, value, limit, higher, how):
    if value is None:
        return f"| {name} | n/a ({how}) | {'≥' if higher else '≤'} {limit}x | not measured |"
    ok = value >= limit if higher else value <= limit
    return f"| {name} | {value:.2f}x ({how}) | {'≥' if higher else '≤'} {limit}x | {'**met**' if ok else '**missed**'} |"

medium_bw = med("raw", "seqw")
link = {}
try:
    link["rdma"] = float(meta.get("LINK_RDMA_MIBS", ""))
except ValueError:
    link["rdma"] = None
try:
    link["tcp"] = float(meta.get("LINK_TCP_MIBS", ""))
except ValueError:
    link["tcp"] = None
link["single"] = None

p("Targets of issue #16 (same-run ratios; the engine rows are host CPU microseconds).")
p()
p("| target | measured | goal | result |")
p("| --- | --- | --- | --- |")
raw_r, raw_mixed = med("raw", "qd32r"), med("raw", "mixed")
a = med("single", "qd32r")
p(target("1 node, 4K randread QD32 vs raw medium (6a)", ratio(a, raw_r), 0.9, True, f"{fmt(a)} / {fmt(raw_r)}"))
a = med("single", "mixed")
p(target("1 node, 70/30 QD16 vs raw medium", ratio(a, raw_mixed), 0.8, True, f"{fmt(a)} / {fmt(raw_mixed)}"))
a = med("single", "seqw")
p(target("1 node, 128K seq write vs medium", ratio(a, medium_bw), 0.8, True, f"{fmt(a)} / {fmt(medium_bw)} MiB/s"))
for c in ["rdma", "tcp"]:
    short = "RDMA" if c == "rdma" else "TCP"
    a, b = med(c, "qd32w"), med("drbd", "qd32w")
    p(target(f"2 nodes {short}, 4K randwrite QD32 vs DRBD C", ratio(a, b), 2.0, True, f"{fmt(a)} / {fmt(b)}"))
    a = med(c, "seqw")
    cands = [x for x in (medium_bw, link.get(c)) if x]
    floor = min(cands) if cands else None
    what = "medium" if link.get(c) is None or (medium_bw is not None and medium_bw <= link[c]) else "link"
    p(target(f"2 nodes {short}, seq write vs min(medium, link)", ratio(a, floor), 0.8, True,
             f"{fmt(a)} / {fmt(floor)} MiB/s, the {what}"))
    a = med(c, "qd32r")
    p(target(f"2 nodes {short}, randread QD32 vs raw medium", ratio(a, raw_r), 0.9, True, f"{fmt(a)} / {fmt(raw_r)}"))
    for m, goal in (("p50", 0.3), ("p99", 0.5)):
        a, b = med(c, m), med("drbd", m)
        p(target(f"2 nodes {short}, 4K QD1 {m} vs DRBD C", ratio(a, b), goal, False, f"{fmt(a)} / {fmt(b)} µs"))

for c, short in (("rdma-nomac", "(3m) 2 nodes RDMA"), ("tcp-nomac", "(4m) 2 nodes TCP")):
    # Not target rows: the same targets with the frame MACs off, to show their share.
    if c not in configs:
        continue
    a, b = med(c, "qd32w"), med("drbd", "qd32w")
    p(target(f"{short} without frame MACs, 4K randwrite QD32 vs DRBD C", ratio(a, b), 2.0, True, f"{fmt(a)} / {fmt(b)}"))
    for m, goal in (("p50", 0.3), ("p99", 0.5)):
        a, b = med(c, m), med("drbd", m)
        p(target(f"{short} without frame MACs, 4K QD1 {m} vs DRBD C", ratio(a, b), goal, False, f"{fmt(a)} / {fmt(b)} µs"))

def absolute(name, value, limit, unit, how):
    if value is None:
        return f"| {name} | n/a | ≤ {limit} {unit} | not measured |"
    return f"| {name} | {fmt(value)} {unit} ({how}) | ≤ {limit} {unit} | {'**met**' if value <= limit else '**missed**'} |"

for key, name, limit in (("ENGINE_HOST_SINGLE", "engine on the host, CPU per 4K write at QD32, 1 node", 2),
                         ("ENGINE_HOST_TCP", "engine on the host, CPU per 4K write at QD32, mirrored over TCP", 8)):
    try:
        wall, cpu = (float(x) for x in meta.get(key, "").split())
    except ValueError:
        wall = cpu = None
    p(absolute(name, cpu, limit, "µs", f"all threads; {fmt(wall)} µs wall per write" if wall else ""))
try:
    # Not a target row: the mirrored engine without frame MACs, to show their share.
    wall, cpu = (float(x) for x in meta.get("ENGINE_HOST_TCP_NOMAC", "").split())
    p(absolute("(4m) engine on the host, CPU per 4K write at QD32, mirrored over TCP without frame MACs",
               cpu, 8, "µs", f"all threads; {fmt(wall)} µs wall per write"))
except ValueError:
    pass
rss4 = scale_rss.get(4)
p(absolute("daemon anonymous RSS with 4 queues", rss4[0] / 1024 if rss4 else None, 64, "MiB",
           f"peak RSS {rss4[1] / 1024:.0f} MiB with the NVRAM mapping" if rss4 else ""))
p()
p()
if "own" in configs:
    p("Targets of issue #17's benchmark: shared-nothing (configuration 4o) against DRBD protocol C, "
      "which also keeps one backing device per node; reads against the raw medium.")
    p()
    p("| target | measured | goal | result |")
    p("| --- | --- | --- | --- |")
    a, b = med("own", "p50"), med("drbd", "p50")
    p(target("shared-nothing, 4K QD1 write p50 vs DRBD C", ratio(a, b), 0.5, False, f"{fmt(a)} / {fmt(b)} µs"))
    a, b = med("own", "qd32w"), med("drbd", "qd32w")
    p(target("shared-nothing, 4K randwrite QD32 vs DRBD C", ratio(a, b), 1.5, True, f"{fmt(a)} / {fmt(b)}"))
    a = med("own", "qd32r")
    p(target("shared-nothing, 4K randread QD32 vs raw medium", ratio(a, raw_r), 0.9, True, f"{fmt(a)} / {fmt(raw_r)}"))
    p()

# Where a read's time goes: fio's mean completion latency against the daemon's own mean
# (its `lun_io_latency`: from the queue thread taking the read to its result, so the medium
# read and the daemon's work, without the ublk round trip to the kernel and fio). Means, not
# medians: Little's law (in flight = rate x mean latency) ties them to the IOPS.
def daemon_means(c, wl):
    d = os.path.join(raw, c)
    out = []
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if not (f.startswith(wl + ".") and f.endswith(".daemon-latency")):
            continue
        run = f.split(".")[1]
        try:
            before, after = open(os.path.join(d, f)).read().split("--")
            def parse(t):
                return {l.split()[0]: (int(l.split()[1]), float(l.split()[2])) for l in t.strip().splitlines() if l.strip()}
            b, a = parse(before), parse(after)
            j = json.load(open(os.path.join(d, f"{wl}.{run}.json")))["jobs"][0]
        except (ValueError, KeyError, IndexError, OSError):
            continue
        for op in ("read", "write"):
            if op not in a or op not in b or a[op][0] <= b[op][0] or j[op]["iops"] <= 0:
                continue
            n = a[op][0] - b[op][0]
            mean_us = (a[op][1] - b[op][1]) / n * 1e6
            out.append((run, op, j[op]["iops"], j[op]["clat_ns"]["mean"] / 1000.0, mean_us))
    return out

def raw_read_mean():
    xs = []
    d = os.path.join(raw, "raw")
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if f.startswith("qd32r.") and f.endswith(".json") and f.split(".")[1].isdigit():
            try:
                xs.append(json.load(open(os.path.join(d, f)))["jobs"][0]["read"]["clat_ns"]["mean"] / 1000.0)
            except (ValueError, KeyError, IndexError, OSError):
                pass
    return statistics.median(xs) if xs else None

rows = [(c, wl, r) for c in configs for wl in ("qd1", "qd32r", "mixed") for r in daemon_means(c, wl)]
if rows:
    p("Where an I/O's time goes (the first node's daemon): fio's mean completion latency against the "
      "daemon's mean from its queue thread taking the I/O to its result (`lun_io_latency`; for a read "
      "mostly the medium's read; for a write staging, mirroring and the partner's acknowledgement), per run. The rest is the ublk round trip (kernel to the queue thread "
      "and back) and fio. In flight = IOPS x mean (Little's law). The raw medium (6a) read by fio "
      f"itself at QD32: mean {fmt(raw_read_mean())} µs.")
    p()
    p("| configuration | workload | run | op | IOPS | fio mean µs | daemon mean µs | outside the daemon µs | in flight in the daemon |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c, wl, (run, op, iops, fio_us, d_us) in rows:
        p(f"| {LABEL.get(c, c)} | {wl} | {run} | {op} | {fmt(iops)} | {fmt(fio_us)} | {fmt(d_us)} | "
          f"{fmt(fio_us - d_us)} | {fmt(iops * d_us / 1e6)} |")
    p()
notes = []
notes.append(f"Medium bandwidth = configuration 6a's 128K QD8 sequential write ({fmt(medium_bw)} MiB/s).")
if link["rdma"] is not None:
    notes.append(f"RDMA link bandwidth = `{meta.get('LINK_RDMA_HOW', 'ib_write_bw')}` on the same rxe device: {fmt(link['rdma'])} MiB/s.")
if meta.get("LINK_RDMA_LAT_US"):
    notes.append(f"RDMA link latency = `ib_write_lat -s 4160` (perftest, RC, median, half a round trip) on the same rxe device: {meta['LINK_RDMA_LAT_US']} µs. A mirrored write waits for a round trip (record there, acknowledgement back), so the link alone adds about {2 * float(meta['LINK_RDMA_LAT_US']):.0f} µs to a single node's latency.")
if meta.get("ENGINE_ALONE"):
    alone = meta["ENGINE_ALONE"].strip()
    crc = re.search(r"crc32c ([0-9.]+) us \(([0-9]+) MB/s[;)]", alone)
    per = re.search(r"([0-9.]+) us per write", alone)
    share = ""
    if crc and per and float(per.group(1)) > 0:
        share = (f" The record checksum (crc32c, {crc.group(2)} MB/s here) is "
                 f"{100 * float(crc.group(1)) / float(per.group(1)):.0f}% of that time per write: "
                 "under TCG the crc32c instruction is emulated bit by bit, so the engine's timed "
                 "choice (`rdma_link::checksum`) takes slice-by-16 tables here; natively the "
                 "instruction runs at several GB/s and is the one chosen.")
    notes.append(f"The engine alone on this VM's CPUs (`examples/write_path single 1000 8 128`: NVRAM in tmpfs, medium in memory, no ublk, no medium I/O): {alone}.{share}")
for c in ("rdma", "tcp"):
    try:
        p50, p99, busy = meta.get(f"LINK_STACK_{c.upper()}", "").split()
        notes.append(f"nvmirror's link alone over {'RDMA (rxe)' if c == 'rdma' else 'TCP'} (`nvmirror-linktest`, 4 KiB post to durable acknowledgement, QD1, busy poll {busy} µs as the daemons here; no engine, no ublk): p50 {float(p50):.0f} µs, p99 {float(p99):.0f} µs.")
    except ValueError:
        pass
if link["tcp"] is not None:
    notes.append(f"TCP link bandwidth = {meta.get('LINK_TCP_HOW', 'a loopback TCP stream')}: {fmt(link['tcp'])} MiB/s.")
for c in configs:
    f = os.path.join(raw, c, "notes")
    if os.path.exists(f):
        for line in open(f):
            line = line.strip()
            if line:
                notes.append(f"{LABEL[c]}: {line}")
    if c in errors:
        notes.append(f"{LABEL[c]}: ERROR: {errors[c]}")
for n in notes:
    p(f"- {n}")
PY
}

if [[ ${1:-} == --report ]]; then
	report "${2:?usage: bench-guest.sh --report DIR}"
	exit $?
fi

# ================================================================= shared (in the VM) ===
: "${NVM_BIN:?}" "${BENCH_OUT:?}"
RUNTIME=${BENCH_RUNTIME:-4}
RAMP=${BENCH_RAMP:-1}
REPEATS=${BENCH_REPEATS:-3}
MEDIUM_MB=${BENCH_MEDIUM_MB:-1024}
REGION_MB=${BENCH_REGION_MB:-896}
NVRAM_MB=${BENCH_NVRAM_MB:-256}
NVMD=$NVM_BIN/nvmirrord
NVMCTL=$NVM_BIN/nvmirrorctl
NULLD=$NVM_BIN/nvmirror-null
LINKTEST=$NVM_BIN/nvmirror-linktest
MNT=/bench
RAW=$BENCH_OUT/raw
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CLK_TCK=$(getconf CLK_TCK)

say() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

# utime + stime of PIDs (summed), in seconds.
cpu_of() {
	local t=0 p f
	for p in "$@"; do
		[[ -r /proc/$p/stat ]] || continue
		f=$(sed 's/.*) //' "/proc/$p/stat")
		# after "pid (comm) ": state=1 ... utime=12 stime=13
		t=$((t + $(awk '{ print $12 + $13 }' <<<"$f")))
	done
	awk -v t="$t" -v h="$CLK_TCK" 'BEGIN { printf "%.2f", t / h }'
}
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null; }
sectors_written() { awk '{ print $7 }' "/sys/block/$1/stat"; }

# ============================================================ one configuration =========
if [[ ${1:-} == --one ]]; then
	CFG=$2
	D=$RAW/$CFG
	W=/run/bench-$CFG # scratch: configs, sockets, state, logs (tmpfs)
	mkdir -p "$D" "$W" /bench-nvram
	cd "$W" || exit 1
	PIDS=()
	LOOPS=()
	EXTRA_CLEANUP=()
	cfail() {
		say "ERROR ($CFG): $*"
		printf '%s\n' "$*" >>"$D/error"
		exit 1
	}
	note() { printf '%s\n' "$*" >>"$D/notes"; }
	# shellcheck disable=SC2317 # run by the EXIT trap
	cleanup() {
		set +e
		local p c
		for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
		for p in "${PIDS[@]}"; do
			for _ in $(seq 600); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
			kill -KILL "$p" 2>/dev/null
		done
		for c in "${EXTRA_CLEANUP[@]}"; do eval "$c"; done
		for f in /sys/class/ublk-char/ublkc*; do
			[[ -e $f ]] && "$NVMCTL" del "${f##*ublkc}" >/dev/null 2>&1
		done
		for p in "${LOOPS[@]}"; do losetup -d "$p" 2>/dev/null; done
		cp -f "$W"/*.log "$W"/*.toml "$W"/*.conf "$D/" 2>/dev/null
		rm -f "$MNT/$CFG"-*.img
		mountpoint -q /bench-nvram && umount /bench-nvram
		cd / && rm -rf "$W"
	}
	trap cleanup EXIT
	trap 'exit 143' TERM INT

	# medium NAME VAR: VAR = a loop device (direct I/O) over a fresh, fully written file on
	# the disk (not in a $(...) subshell: cfail and LOOPS must reach this shell)
	medium() {
		local f=$MNT/$CFG-$1.img dev
		dd if=/dev/zero of="$f" bs=1M count="$MEDIUM_MB" oflag=direct status=none || cfail "writing $f"
		dev=$(losetup --find --show --direct-io=on "$f") || cfail "losetup $f"
		LOOPS+=("$dev")
		[[ $(cat "/sys/block/${dev#/dev/}/loop/dio" 2>/dev/null) == 1 ]] || note "loop device $dev has no direct I/O"
		printf -v "$2" '%s' "$dev"
	}

	# nvram NAME -> a path for that node's NVRAM: pmem = the NVDIMM (blanked), else a file
	# in tmpfs that nvmirrord creates (and allocates) at the configured size
	nvram() {
		if [[ $1 == pmem ]]; then
			[[ -b /dev/pmem0 ]] || cfail "no /dev/pmem0 (boot the VM with --nvdimm)"
			# The first NVDIMM (the others are for device-DAX): same size as scripts/bench.sh gave it.
			[[ $(blockdev --getsize64 /dev/pmem0) == $(((NVRAM_MB + 64) << 20)) ]] ||
				cfail "/dev/pmem0 is not the $((NVRAM_MB + 64)) MiB NVDIMM scripts/bench.sh gives for 2b"
			dd if=/dev/zero of=/dev/pmem0 bs=1M count=1 oflag=direct status=none
			echo /dev/pmem0
		else
			mountpoint -q /bench-nvram || mount -t tmpfs -o size=$((4 * NVRAM_MB + 64))m tmpfs /bench-nvram ||
				cfail "mounting a tmpfs for the NVRAM files"
			echo "/bench-nvram/nvram-$1.img"
		fi
	}

	# dax_nvram -> /dev/daxX.Y: the first raw namespace of 2 x NVRAM_MB + 64 MiB (scripts/bench.sh
	# gives two such NVDIMMs; each call converts one) turned into device-DAX
	dax_nvram() {
		local ns out
		modprobe -a dax_pmem device_dax 2>/dev/null
		command -v ndctl >/dev/null || cfail "ndctl is not installed"
		ns=$(ndctl list -N 2>/dev/null | python3 -c '
import json, sys
want = (2 * int(sys.argv[1]) + 64) << 20
found = sorted(n["dev"] for n in json.load(sys.stdin) if n.get("size") == want and n.get("mode") == "raw")
print(found[0] if found else "")' "$NVRAM_MB")
		[[ -n $ns ]] || cfail "no raw NVDIMM namespace of $((2 * NVRAM_MB + 64)) MiB left (scripts/bench.sh boots the VM with two): $(ndctl list -N 2>&1 | tr -d '\n')"
		out=$(ndctl create-namespace --force --reconfig="$ns" --mode=devdax 2>&1) ||
			cfail "ndctl create-namespace --reconfig=$ns --mode=devdax: $out"
		out=$(printf '%s' "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["daxregion"]["devices"][0]["chardev"])') ||
			cfail "no device-DAX chardev in ndctl's answer"
		for _ in $(seq 50); do [[ -c /dev/$out ]] && break; sleep 0.1; done
		[[ -c /dev/$out ]] || cfail "no /dev/$out after ndctl create-namespace"
		echo "/dev/$out"
	}

	# After the daemons stopped: the device-DAX namespaces back to raw, for the next
	# configuration's dax_nvram.
	dax_to_raw() {
		local ns
		for ns in $(ndctl list -N 2>/dev/null | python3 -c '
import json, sys
print(" ".join(n["dev"] for n in json.load(sys.stdin) if n.get("mode") == "devdax"))'); do
			ndctl create-namespace --force --reconfig="$ns" --mode=raw >/dev/null 2>&1 ||
				say "could not turn $ns back to raw"
		done
	}

	nvm_daemon() { # CONFIG LOGNAME
		"$NVMD" --config "$1" --state-dir "$W/state" >>"$W/$2" 2>&1 &
		PIDS+=($!)
		LAST_PID=$!
		echo "$LAST_PID" >>"$D/pids"
		"$NVMCTL" --config "$1" wait --timeout 90 >/dev/null ||
			cfail "nvmirrord ($1) did not come up: $(tail -3 "$W/$2" | tr '\n' ' ')"
	}

	node_config() { # FILE NAME NVRAM MB DEV_ID MEDIUM [CLUSTER_TOML]; MB empty: the whole device
		local size_line=''
		[[ -z $4 ]] || size_line="size = \"$4MiB\""
		cat >"$1" <<-CFG
		[node]
		name = "$2"
		control_socket = "$W/$2.sock"

		[nvram]
		path = "$3"
		$size_line
		partitions = 4
		$7

		[metrics]
		listen = "127.0.0.1:$((METRICS_PORT_BASE + $5))"

		[[lun]]
		name = "lun0"
		medium = "$6"
		device_id = $5
		queue_depth = 64
		${BENCH_QUEUES:+queues = $BENCH_QUEUES}
		${PIN_QUEUES:+pin_queues = true}
		CFG
	}

	# The daemon's own view of the I/O (`lun_io_latency`, from its queue thread taking an
	# I/O to the result): count and sum per op of the first status node, read from its
	# metrics endpoint. Printed as "op count sum_seconds" lines.
	METRICS_PORT_BASE=9477
	daemon_latency() { # CONFIG
		local port
		port=$(awk -F'[:"]' '/^listen = "127.0.0.1:/ { print $(NF - 1) }' "$1") || return 0
		python3 - "$port" <<-'PY' 2>/dev/null
		import re, sys, urllib.request
		text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
		got = {}
		for m in re.finditer(r'^nvmirror_lun_io_latency_seconds_(sum|count)\{[^}]*op="(\w+)"[^}]*\} (\S+)$', text, re.M):
		    got.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
		for op, v in sorted(got.items()):
		    print(op, int(v.get("count", 0)), v.get("sum", 0.0))
		PY
	}

	cluster_section() { # TRANSPORT ADDRESS
		[[ -f $W/secret ]] || head -c 48 /dev/urandom | base64 >"$W/secret"
		cat <<-CFG
		[cluster]
		id = 6
		secret_file = "$W/secret"
		transport = "$1"
		heartbeat_interval_ms = 250
		heartbeat_timeout_ms = 5000
		takeover = "manual"
		${BENCH_BUSY_POLL_US:+busy_poll_us = $BENCH_BUSY_POLL_US}

		[[cluster.node]]
		name = "node-a"
		address = "$2:7801"

		[[cluster.node]]
		name = "node-b"
		address = "$2:7802"
		CFG
	}

	wait_link_up() { # CONFIG
		for _ in $(seq 300); do
			"$NVMCTL" --config "$1" status --json 2>/dev/null | grep -q '"link": "Up' && return 0
			sleep 0.2
		done
		cfail "the mirror link of $1 did not come up"
	}

	setup_rxe() {
		modprobe rdma_rxe || cfail "modprobe rdma_rxe"
		modprobe dummy 2>/dev/null
		ip link add bench0 type dummy || cfail "ip link add bench0 type dummy"
		ip addr add 10.99.6.1/24 dev bench0 || cfail "ip addr add"
		ip link set bench0 up || cfail "ip link set bench0 up"
		EXTRA_CLEANUP+=("ip link del bench0 2>/dev/null")
		rdma link add benchrxe0 type rxe netdev bench0 || cfail "rdma link add"
		# removed before the netdev, after the daemons (cleanup order)
		EXTRA_CLEANUP=("rdma link delete benchrxe0 2>/dev/null" "${EXTRA_CLEANUP[@]}")
		for _ in $(seq 50); do rdma link show benchrxe0/1 2>/dev/null | grep -q ACTIVE && break; sleep 0.1; done
	}

	# perftest NAME PORT ARGS...: one perftest program (NAME: ib_write_bw, ib_write_lat) as
	# server and client on the same rxe device; the client's report goes to $W/NAME.log.
	perftest() {
		local name=$1 port=$2 gid srv
		shift 2
		gid=$(ibv_devinfo -v -d benchrxe0 2>/dev/null | awk '/GID\[/ && index($0, "10.99.6.1") { gsub(/.*GID\[ */, ""); gsub(/\].*/, ""); print; exit }')
		gid=${gid:-1}
		timeout 60 "$name" -d benchrxe0 -x "$gid" -p "$port" "$@" >"$W/$name.server.log" 2>&1 &
		srv=$!
		sleep 1
		timeout 60 "$name" -d benchrxe0 -x "$gid" -p "$port" "$@" 10.99.6.1 >"$W/$name.log" 2>&1
		wait "$srv" 2>/dev/null
	}

	# The link's raw bandwidth (for the sequential-write target) and latency floor.
	measure_rdma_link() {
		perftest ib_write_bw 18600 -s 65536 -D 3
		# columns: bytes iterations BW_peak BW_average[MB/s = 2^20 B/s] MsgRate
		local bw
		bw=$(awk '$1 == 65536 && NF >= 5 { print $4; exit }' "$W/ib_write_bw.log")
		if [[ -n $bw ]]; then
			{
				echo "LINK_RDMA_MIBS=$bw"
				echo "LINK_RDMA_HOW=ib_write_bw -s 65536 -D 3 (perftest, RC, MB/s = MiB/s)"
			} >>"$BENCH_OUT/meta-guest.env"
		else
			note "ib_write_bw gave no figure: $(tail -2 "$W/ib_write_bw.log" | tr '\n' ' ')"
		fi
		# A mirrored 4K write's floor: one RDMA WRITE of a record (4 KiB + its 64-byte
		# header) there, an acknowledgement back.
		perftest ib_write_lat 18601 -s 4160 -n 500
		# columns: bytes iterations t_min t_max t_typical t_avg ... (usec, half a round trip)
		local lat
		lat=$(awk '$1 == 4160 && NF >= 5 { print $5; exit }' "$W/ib_write_lat.log")
		if [[ -n $lat ]]; then
			echo "LINK_RDMA_LAT_US=$lat" >>"$BENCH_OUT/meta-guest.env"
		else
			note "ib_write_lat gave no figure: $(tail -2 "$W/ib_write_lat.log" | tr '\n' ' ')"
		fi
	}

	# Loopback TCP stream (one connection, 1 MiB writes, 3 s): the TCP link's raw bandwidth.
	# measure_link_stack TRANSPORT ADDRESS: nvmirror's own link alone (nvmirror-linktest, no
	# engine, no ublk): 4 KiB posts to a durable acknowledgement at QD1, with the busy polling
	# the daemons use here. Tells the link stack's share of a mirrored write from the rest.
	measure_link_stack() {
		local t=$1 addr=$2 busy secret srv res
		busy=${BENCH_BUSY_POLL_US:-$(($(nproc) >= 4 ? 1000 : 0))}
		secret=$(head -c 32 /dev/urandom | base64)
		local common=(--transport "$t" --secret "$secret" --cluster 9 --busy-poll-us "$busy" --region-mb 64)
		timeout 120 "$LINKTEST" server "${common[@]}" --listen "$addr:7950" --node 2 --peer 1 \
			--duration-s 100 >"$W/linktest-server.log" 2>&1 &
		srv=$!
		sleep 1
		res=$(timeout 100 "$LINKTEST" client "${common[@]}" --connect "$addr:7950" --node 1 --peer 2 \
			--count 1000 --size 4096 --qd 1 2>"$W/linktest-client.log" | grep '^RESULT' | tail -1)
		kill "$srv" 2>/dev/null
		wait "$srv" 2>/dev/null
		if [[ $res =~ p50_us=([0-9.]+)\ p99_us=([0-9.]+) ]]; then
			echo "LINK_STACK_${t^^}=${BASH_REMATCH[1]} ${BASH_REMATCH[2]} $busy" >>"$BENCH_OUT/meta-guest.env"
		else
			note "nvmirror-linktest ($t) gave no figure: $(tail -2 "$W/linktest-client.log" | tr '\n' ' ')"
		fi
	}

	measure_tcp_bw() {
		local bw
		bw=$(timeout 30 python3 - <<-'PY'
		import socket, threading, time
		srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
		port = srv.getsockname()[1]
		got = [0]
		def sink():
		    c, _ = srv.accept()
		    while True:
		        b = c.recv(1 << 20)
		        if not b:
		            break
		        got[0] += len(b)
		t = threading.Thread(target=sink); t.start()
		s = socket.create_connection(("127.0.0.1", port))
		buf = b"x" * (1 << 20)
		t0 = time.time()
		while time.time() - t0 < 3:
		    s.sendall(buf)
		s.close(); t.join()
		print(f"{got[0] / (time.time() - t0) / 2**20:.1f}")
		PY
		)
		if [[ -n $bw ]]; then
			{
				echo "LINK_TCP_MIBS=$bw"
				echo "LINK_TCP_HOW=one loopback TCP stream of 1 MiB writes for 3 s (python3, in the VM)"
			} >>"$BENCH_OUT/meta-guest.env"
		fi
	}

	m='' ma='' mb=''
	DEV='' FIO_EXTRA=() RES_PIDS=() RES_NAMES=() STATUS_CFGS=() STAT_DEV=''
	case $CFG in
	null)
		modprobe ublk_drv || cfail "modprobe ublk_drv"
		"$NULLD" --id 0 --queues 1 --depth 64 --size $((MEDIUM_MB << 20)) >"$W/null.out" 2>"$W/null.log" &
		PIDS+=($!)
		echo "$!" >>"$D/pids"
		RES_PIDS=($!) RES_NAMES=(nvmirror-null)
		for _ in $(seq 100); do [[ -s $W/null.out && -b /dev/ublkb0 ]] && break; sleep 0.1; done
		DEV=$(head -1 "$W/null.out")
		[[ -b $DEV ]] || cfail "nvmirror-null did not come up: $(cat "$W/null.log")"
		;;
	single | single-ins | single-pin | pmem)
		modprobe ublk_drv || cfail "modprobe ublk_drv"
		medium m m
		[[ $CFG == single-pin ]] && PIN_QUEUES=1
		node_config "$W/single.toml" bench-single "$(nvram "$([[ $CFG == pmem ]] && echo pmem || echo single)")" "$NVRAM_MB" 0 "$m" ""
		if [[ $CFG == single-ins ]]; then
			NVMIRROR_CRC32C=instruction nvm_daemon "$W/single.toml" daemon-single.log
		else
			nvm_daemon "$W/single.toml" daemon-single.log
		fi
		RES_PIDS=("$LAST_PID") RES_NAMES=(nvmirrord)
		STATUS_CFGS=("$W/single.toml")
		DEV=/dev/ublkb0
		;;
	rdma | rdma-nomac | tcp | tcp-nomac | own)
		modprobe ublk_drv || cfail "modprobe ublk_drv"
		addr=127.0.0.1
		if [[ $CFG == rdma* ]]; then
			setup_rxe
			addr=10.99.6.1
			ulimit -l unlimited 2>/dev/null
			[[ $CFG != rdma ]] || measure_rdma_link
		elif [[ $CFG == tcp ]]; then
			measure_tcp_bw
		fi
		[[ $CFG == own || $CFG == *-nomac ]] || measure_link_stack "$CFG" "$addr"
		# Both nodes see the shared medium (own: each node its own, m and mb); node-a owns
		# every range (owners = ["node-a"]), so fio on node-a's device measures staging +
		# mirroring, never forwarding; node-b holds the mirror (second store) and serves
		# nothing (own: it also writes every record to its medium when node-a asks).
		medium shared m
		mb=$m
		cs=$(cluster_section "$([[ $CFG == rdma* ]] && echo rdma || echo tcp)" "$addr")
		[[ $CFG != *-nomac ]] || cs=$(sed 's|^takeover = .*|&\nframe_mac = false|' <<<"$cs")
		if [[ $CFG == own ]]; then
			medium own-b mb
			truncate -s 4M "$MNT/own-arbiter.img"
			arbiter=$(losetup --find --show "$MNT/own-arbiter.img") || cfail "losetup of the arbiter"
			LOOPS+=("$arbiter")
			# takeover = "auto": `nvmirrorctl write-priority on` (the contention runs) is
			# refused with "manual"; with a 5 s heartbeat timeout nothing is taken over.
			cs=$(sed "s|^takeover = .*|takeover = \"auto\"\nstorage = \"own\"\narbiter = \"$arbiter\"|" <<<"$cs")
		fi
		# NVRAM: half own logs, half the partner's mirror -> twice the single node's size.
		# RDMA: device-DAX, as in production (the whole device: its size less its metadata).
		if [[ $CFG == rdma* ]]; then
			nva=$(dax_nvram) || exit 1
			nvb=$(dax_nvram) || exit 1
			EXTRA_CLEANUP+=(dax_to_raw)
			node_config "$W/node-a.toml" node-a "$nva" "" 0 "$m" "$cs"
			node_config "$W/node-b.toml" node-b "$nvb" "" 1 "$m" "$cs"
		else
			node_config "$W/node-a.toml" node-a "$(nvram a)" $((2 * NVRAM_MB)) 0 "$m" "$cs"
			node_config "$W/node-b.toml" node-b "$(nvram b)" $((2 * NVRAM_MB)) 1 "$mb" "$cs"
		fi
		for n in a b; do
			printf 'ranges = 4\nowners = ["node-a"]\n' >>"$W/node-$n.toml"
			[[ $CFG != own ]] || printf 'size = "%sMiB"\n' "$MEDIUM_MB" >>"$W/node-$n.toml"
		done
		nvm_daemon "$W/node-a.toml" daemon-a.log
		pa=$LAST_PID
		nvm_daemon "$W/node-b.toml" daemon-b.log
		pb=$LAST_PID
		wait_link_up "$W/node-a.toml"
		wait_link_up "$W/node-b.toml"
		RES_PIDS=("$pa" "$pb") RES_NAMES=("nvmirrord node-a (writes)" "nvmirrord node-b (mirror)")
		STATUS_CFGS=("$W/node-a.toml" "$W/node-b.toml")
		DEV=/dev/ublkb0
		;;
	scale)
		# One node, 1, 2 and 4 ublk queues, each under 1, 2 and 4 fio jobs (QD32 each); one
		# run per cell. The daemon's anonymous RSS after each queue count's runs.
		modprobe ublk_drv || cfail "modprobe ublk_drv"
		medium m m
		for q in 1 2 4; do
			nv=$(nvram "scale$q")
			BENCH_QUEUES=$q node_config "$W/scale-$q.toml" bench-scale "$nv" "$NVRAM_MB" 0 "$m" ""
			nvm_daemon "$W/scale-$q.toml" "daemon-scale-$q.log"
			for jobs in 1 2 4; do
				for wl in randwrite randread; do
					timeout -k 5 $((RAMP + RUNTIME + 60)) fio --name="scale-q$q-j$jobs-$wl" \
						--filename=/dev/ublkb0 --direct=1 --ioengine=io_uring --size="${REGION_MB}M" \
						--time_based=1 --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap=1 \
						--randrepeat=0 --rw="$wl" --bs=4k --iodepth=32 --numjobs="$jobs" \
						--group_reporting=1 --output-format=json \
						--output="$D/q$q-j$jobs-$wl.json" >/dev/null 2>"$W/fio-scale.err" ||
						note "fio scale q$q j$jobs $wl failed: $(head -c 300 "$W/fio-scale.err" | tr '\n' ' ')"
				done
			done
			printf '%s %s %s\n' "$q" "$(status_kb "$LAST_PID" RssAnon)" "$(status_kb "$LAST_PID" VmHWM)" >>"$D/rss"
			kill -TERM "$LAST_PID"
			for _ in $(seq 300); do kill -0 "$LAST_PID" 2>/dev/null || break; sleep 0.2; done
			kill -0 "$LAST_PID" 2>/dev/null && cfail "nvmirrord with $q queues did not stop"
			for f in /sys/class/ublk-char/ublkc*; do [[ -e $f ]] && "$NVMCTL" del "${f##*ublkc}" >/dev/null 2>&1; done
			rm -f "$nv"
			say "scale: $q queues done"
		done
		say "$CFG: done"
		exit 0
		;;
	ship)
		# Claim set C (issue #18): 1, 2 and 3 log-shipping sources (TCP) into one destination,
		# whose log files and images are on the disk (next to the media). With n sources
		# writing at once: each source's 4K random write latency at QD1 and IOPS at QD32; the
		# destination's ingest (bytes its log files took per second, from its status) against
		# the disk's own sequential write bandwidth (fio, 1 MiB QD4, a file on the same disk).
		modprobe ublk_drv || cfail "modprobe ublk_drv"
		MEDIUM_MB=256
		SHIP_NVRAM_MB=64
		head -c 48 /dev/urandom | base64 >"$W/secret"
		mkdir -p "$MNT/ship-logs"
		EXTRA_CLEANUP+=("rm -rf '$MNT/ship-logs' '$MNT/ship-disk.img'")
		link_lines="id = 8
secret_file = \"$W/secret\"
transport = \"tcp\"
heartbeat_interval_ms = 250
heartbeat_timeout_ms = 5000"
		{
			printf '[node]\nname = "dest"\ncontrol_socket = "%s/dest.sock"\n\n' "$W"
			printf '[nvram]\npath = "%s"\nsize = "%sMiB"\npartitions = 4\n\n' "$(nvram dest)" $((3 * SHIP_NVRAM_MB))
			printf '[shipping]\nrole = "destination"\n%s\ndir = "%s"\n' "$link_lines" "$MNT/ship-logs"
			for i in 1 2 3; do
				printf '\n[[shipping.source]]\nname = "src%s"\nlisten = "127.0.0.1:%s"\nnvram_size = "%sMiB"\n' \
					"$i" $((7860 + i)) "$SHIP_NVRAM_MB"
			done
		} >"$W/dest.toml"
		"$NVMD" --config "$W/dest.toml" --state-dir "$W/state" >>"$W/daemon-dest.log" 2>&1 &
		PIDS+=($!)
		echo "$!" >>"$D/pids"
		for _ in $(seq 150); do "$NVMCTL" --config "$W/dest.toml" status >/dev/null 2>&1 && break; sleep 0.2; done
		for i in 1 2 3; do
			medium "src$i" ms
			node_config "$W/src$i.toml" "src$i" "$(nvram "src$i")" "$SHIP_NVRAM_MB" $((i - 1)) "$ms" \
				"$(printf '[shipping]\nrole = "source"\n%s\ndegraded = "write-through"\n\n[shipping.destination]\nname = "dest"\naddress = "127.0.0.1:%s"' "$link_lines" $((7860 + i)))"
			nvm_daemon "$W/src$i.toml" "daemon-src$i.log"
		done
		for i in 1 2 3; do
			for _ in $(seq 150); do
				"$NVMCTL" --config "$W/src$i.toml" status --json 2>/dev/null | python3 -c '
import json, sys
sys.exit(0 if json.load(sys.stdin)["engine"]["mirror"]["state"] == "mirroring" else 1)' && break
				sleep 0.2
			done
		done
		ingested() { # bytes the destination's log files took so far, over every source
			"$NVMCTL" --config "$W/dest.toml" status --json |
				python3 -c 'import json, sys; print(sum(p["appended_bytes"] for s in json.load(sys.stdin)["sources"] for p in s["log_files"]))'
		}
		for n in 1 2 3; do
			for r in $(seq "$REPEATS"); do
				for wl in qd1 qd32; do
					qd=${wl#qd}
					b0=$(ingested) t0=$(date +%s.%N)
					fpids=()
					for i in $(seq "$n"); do
						timeout -k 5 $((RAMP + RUNTIME + 60)) fio --name="ship-n$n-$wl-src$i" \
							--filename=/dev/ublkb$((i - 1)) --direct=1 --ioengine=io_uring --size=200M \
							--time_based=1 --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap=1 \
							--randrepeat=0 --rw=randwrite --bs=4k --iodepth="$qd" --output-format=json \
							--output="$D/n$n-$wl-src$i-r$r.json" >/dev/null 2>"$W/fio-ship-$i.err" &
						fpids+=($!)
					done
					for f in "${fpids[@]}"; do wait "$f" || note "fio n$n $wl failed: $(head -c 300 "$W"/fio-ship-*.err | tr '\n' ' ')"; done
					b1=$(ingested) t1=$(date +%s.%N)
					echo "$n $wl $r $b0 $b1 $t0 $t1" >>"$D/ingest"
				done
			done
			say "ship: $n source(s) done ($REPEATS repeat(s))"
		done
		timeout -k 5 $((RAMP + RUNTIME + 60)) fio --name=ship-disk --filename="$MNT/ship-disk.img" --size=512M \
			--direct=1 --ioengine=io_uring --rw=write --bs=1M --iodepth=4 --time_based=1 --runtime="$RUNTIME" \
			--ramp_time="$RAMP" --output-format=json --output="$D/disk.json" >/dev/null 2>"$W/fio-disk.err" ||
			note "fio on the destination's disk failed: $(head -c 300 "$W/fio-disk.err" | tr '\n' ' ')"
		"$NVMCTL" --config "$W/dest.toml" status >"$D/dest-status.txt" 2>&1
		say "$CFG: done"
		exit 0
		;;
	drbd)
		modprobe drbd || cfail "modprobe drbd"
		# /var/lock -> /run/lock and /run is a fresh tmpfs in the VM; /var/lib/drbd is in the
		# VM's RAM overlay (writable). The config is ours (drbdadm -c), not /etc/drbd.conf.
		mkdir -p /run/lock /run/drbd /var/lib/drbd
		medium a ma
		medium b mb
		host=$(uname -n)
		cat >"$W/drbd.conf" <<-CFG
		global { usage-count no; }
		common { protocol C; }
		# Two resources on this one host, each the other's peer: r0 (primary, fio) on $ma,
		# r1 (its peer) on $mb; the "peer" host names only complete the pairs.
		resource r0 {
			on $host { device /dev/drbd0 minor 0; disk $ma; address 127.0.0.1:7790; meta-disk internal; }
			on peer-r0 { device /dev/drbd0 minor 0; disk $ma; address 127.0.0.1:7791; meta-disk internal; }
		}
		resource r1 {
			on $host { device /dev/drbd1 minor 1; disk $mb; address 127.0.0.1:7791; meta-disk internal; }
			on peer-r1 { device /dev/drbd1 minor 1; disk $mb; address 127.0.0.1:7790; meta-disk internal; }
		}
		CFG
		dadm() { drbdadm -c "$W/drbd.conf" "$@" >>"$W/drbd.log" 2>&1 || cfail "drbdadm $* failed: $(tail -2 "$W/drbd.log" | tr '\n' ' ')"; }
		EXTRA_CLEANUP=("drbdadm -c '$W/drbd.conf' down all >>'$W/drbd.log' 2>&1")
		for r in r0 r1; do printf 'yes\nyes\n' | dadm create-md --force "$r"; done
		dadm up r0
		dadm up r1
		for _ in $(seq 100); do [[ $(grep -c 'cs:Connected' /proc/drbd) == 2 ]] && break; sleep 0.2; done
		[[ $(grep -c 'cs:Connected' /proc/drbd) == 2 ]] || cfail "DRBD did not connect: $(tr '\n' ' ' </proc/drbd)"
		# Fresh, identical (zeroed) backing devices: skip the initial sync.
		dadm -- --clear-bitmap new-current-uuid r0
		for _ in $(seq 100); do [[ $(grep -c 'ds:UpToDate/UpToDate' /proc/drbd) == 2 ]] && break; sleep 0.2; done
		dadm primary r0
		grep -q 'cs:Connected ro:Primary/Secondary ds:UpToDate/UpToDate C' /proc/drbd ||
			cfail "DRBD r0 is not Connected Primary/Secondary UpToDate/UpToDate: $(tr '\n' ' ' </proc/drbd)"
		cp /proc/drbd "$D/proc-drbd.start"
		drbdsetup-84 show >"$D/drbdsetup-show.txt" 2>&1 || drbdsetup show >"$D/drbdsetup-show.txt" 2>&1
		note "$(head -1 /proc/drbd | cut -d' ' -f1-2), drbd-utils $(dpkg-query -W -f='${Version}' drbd-utils 2>/dev/null), default options (no tuning; protocol C acks when the peer's write completed, no flush per write)"
		DEV=/dev/drbd0
		;;
	raw | rawsync)
		medium m DEV
		[[ $CFG == rawsync ]] && FIO_EXTRA=(--fsync=1)
		;;
	*) cfail "unknown configuration $CFG" ;;
	esac
	STAT_DEV=${DEV#/dev/}

	# Kernel threads of DRBD: their CPU is the closest thing to a daemon's.
	if [[ $CFG == drbd ]]; then
		mapfile -t kt < <(pgrep '^drbd_')
		RES_PIDS=("${kt[@]}") RES_NAMES=("DRBD kernel threads (drbd_w/r/a_*, both resources)")
	fi
	say "$CFG: measuring $DEV (${RES_NAMES[*]:-no daemon})"
	cpu0=()
	for i in "${!RES_PIDS[@]}"; do
		if [[ $CFG == drbd ]]; then cpu0[i]=$(cpu_of "${RES_PIDS[@]}"); break; fi
		cpu0[i]=$(cpu_of "${RES_PIDS[$i]}")
	done
	sec0=$(sectors_written "$STAT_DEV")

	fio_run() { # WORKLOAD REPEAT
		local wl=$1 r=$2 job
		case $wl in
		qd1) job=(--rw=randwrite --bs=4k --iodepth=1) ;;
		qd32w) job=(--rw=randwrite --bs=4k --iodepth=32) ;;
		seqw) job=(--rw=write --bs=128k --iodepth=8) ;;
		qd32r) job=(--rw=randread --bs=4k --iodepth=32) ;;
		mixed) job=(--rw=randrw --rwmixread=70 --bs=4k --iodepth=16) ;;
		esac
		local lat0=''
		((${#STATUS_CFGS[@]})) && lat0=$(daemon_latency "${STATUS_CFGS[0]}")
		timeout -k 5 $((RAMP + RUNTIME + 60)) fio --name="$CFG-$wl" --filename="$DEV" --direct=1 \
			--ioengine=io_uring --size="${REGION_MB}M" --time_based=1 --runtime="$RUNTIME" \
			--ramp_time="$RAMP" --norandommap=1 --randrepeat=0 "${job[@]}" "${FIO_EXTRA[@]}" \
			--output-format=json --output="$D/$wl.$r.json" >/dev/null 2>"$W/fio-$wl.$r.err" ||
			{ note "fio $wl run $r failed: $(head -c 300 "$W/fio-$wl.$r.err" | tr '\n' ' ')"; return 0; }
		# The daemon's mean latency per op over the run (ramp included) next to fio's: what
		# the daemon spends (mostly the medium's I/O for a read) against the whole path.
		if [[ -n $lat0 ]]; then
			{ echo "$lat0"; echo --; daemon_latency "${STATUS_CFGS[0]}"; } >"$D/$wl.$r.daemon-latency"
		fi
		# NVRAM fill right after the run (how much the flusher was behind).
		local c
		for c in "${STATUS_CFGS[@]:0:1}"; do
			"$NVMCTL" --config "$c" status --json 2>/dev/null | python3 -c '
import json, sys
p = json.load(sys.stdin)["engine"]["partitions"]
print("%.0f" % (100.0 * sum(x["used_bytes"] for x in p) / max(1, sum(x["capacity_bytes"] for x in p))))' \
				>>"$W/fill-$wl" 2>/dev/null
		done
	}
	for r in $(seq 1 "$REPEATS"); do
		for wl in "${WORKLOADS[@]}"; do
			fio_run "$wl" "$r"
		done
		say "$CFG: repeat $r of $REPEATS done"
	done

	written=$((($(sectors_written "$STAT_DEV") - sec0) * 512))
	for i in "${!RES_PIDS[@]}"; do
		f=$D/res-$i
		if [[ $CFG == drbd ]]; then
			c1=$(cpu_of "${RES_PIDS[@]}")
			printf 'name=%s\ncpu_s=%s\nwritten_bytes=%s\n' "${RES_NAMES[0]}" \
				"$(awk -v a="${cpu0[0]}" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')" "$written" >"$f"
			break
		fi
		p=${RES_PIDS[$i]}
		c1=$(cpu_of "$p")
		printf 'name=%s\nhwm_kb=%s\nanon_kb=%s\ncpu_s=%s\nwritten_bytes=%s\n' "${RES_NAMES[$i]}" \
			"$(status_kb "$p" VmHWM)" "$(status_kb "$p" RssAnon)" \
			"$(awk -v a="${cpu0[$i]}" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')" "$written" >"$f"
	done
	fills=''
	for wl in "${WORKLOADS[@]}"; do
		[[ -f $W/fill-$wl ]] && fills+="${fills:+, }$wl $(paste -sd/ "$W/fill-$wl")"
	done
	[[ -z $fills ]] || note "NVRAM fill (% of the node's own logs) right after each run: $fills"
	for c in "${STATUS_CFGS[@]}"; do
		"$NVMCTL" --config "$c" status --json >"$D/status-$(basename "$c" .toml).json" 2>/dev/null
	done
	if [[ $CFG == rdma* || $CFG == tcp* || $CFG == own ]]; then
		python3 - "$D/status-node-a.json" <<-'PY' >>"$D/notes" 2>/dev/null
		import json, sys
		m = json.load(open(sys.argv[1]))["engine"]["mirror"]
		print(f"node-a's mirror at the end: link {str(m.get('link')).split('(')[0]}, {m.get('mirrored_records')} records mirrored, "
		      f"{m.get('degraded_records')} degraded (written without a partner copy)")
		PY
	fi
	[[ $CFG == drbd ]] && cp /proc/drbd "$D/proc-drbd.end"
	# Diagnostic (not in the medians): QD1 again with the (first) node's flusher paused, to
	# tell the staging path's own latency from the flusher's interference.
	if ((${#STATUS_CFGS[@]})) && "$NVMCTL" --config "${STATUS_CFGS[0]}" flush pause >/dev/null 2>&1; then
		fio_run qd1 nf
		"$NVMCTL" --config "${STATUS_CFGS[0]}" flush resume >/dev/null 2>&1
		python3 - "$D/qd1.nf.json" <<-'PY' >>"$D/notes" 2>/dev/null
		import json, sys
		w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
		p = w["clat_ns"]["percentile"]
		print(f"diagnostic, one extra 4K QD1 run with the flusher paused (not in the medians): "
		      f"p50 {p['50.000000'] / 1000:.0f} µs, p99 {p['99.000000'] / 1000:.0f} µs, {w['iops']:.0f} IOPS")
		PY
	fi
	# Shared-nothing (issue #17): the cost of contention. Every range is node-a's (it holds
	# the write priority), so node-b's writes to them are forwarded to it. 4K random writes
	# at QD16 to one 64 MiB portion: node-a alone, node-b alone, then both at once.
	# portion_fio NAME DEVICE RW IODEPTH: one 4K run over the portion, into $D/NAME.json.
	portion_fio() {
		timeout -k 5 $((RAMP + RUNTIME + 60)) fio --name="$1" --filename="$2" \
			--direct=1 --ioengine=io_uring --size=64M --time_based=1 --runtime="$RUNTIME" \
			--ramp_time="$RAMP" --norandommap=1 --randrepeat=0 --rw="$3" --bs=4k \
			--iodepth="$4" --output-format=json --output="$D/$1.json" \
			>/dev/null 2>"$W/fio-$1.err" ||
			note "fio $1 failed: $(head -c 300 "$W/fio-$1.err" | tr '\n' ' ')"
	}
	if [[ $CFG == own ]]; then
		contend() { portion_fio "contend-$1" "$2" randwrite 16; } # NAME DEVICE
		contend a-alone /dev/ublkb0
		contend b-alone /dev/ublkb1
		contend a-both /dev/ublkb0 &
		both_a=$!
		contend b-both /dev/ublkb1
		wait "$both_a"
		python3 - "$D" <<-'PY' >>"$D/notes" 2>/dev/null
		import json, sys
		def w(name):
		    j = json.load(open(f"{sys.argv[1]}/contend-{name}.json"))["jobs"][0]["write"]
		    return j["iops"], j["clat_ns"]["percentile"]["50.000000"] / 1000
		(a, pa), (b, pb) = w("a-alone"), w("b-alone")
		(a2, pa2), (b2, pb2) = w("a-both"), w("b-both")
		print(f"contention (issue #17), 4K random writes QD16 to one 64 MiB portion whose write "
		      f"priority node-a holds (node-b's writes forwarded to it), one run each: node-a alone "
		      f"{a:.0f} IOPS (p50 {pa:.0f} µs); node-b alone {b:.0f} (p50 {pb:.0f} µs); both at once "
		      f"node-a {a2:.0f} (p50 {pa2:.0f} µs) + node-b {b2:.0f} (p50 {pb2:.0f} µs) = "
		      f"{a2 + b2:.0f}, {(a2 + b2) / max(a, 1):.2f}x node-a alone")
		PY
		# The same with write priority following the writer (`nvmirrorctl write-priority on`,
		# the config's defaults: ask after 256 forwarded writes within 1 s, keep a range
		# written within 5 s). node-b alone: it asks, node-a hands the range over once its
		# own last write is 5 s old (hence the pause), then node-b's writes are local. Both
		# at once: the holder keeps it and the other forwards (no bouncing).
		if "$NVMCTL" --config "$W/node-a.toml" write-priority on >/dev/null 2>"$W/wp.err" &&
			"$NVMCTL" --config "$W/node-b.toml" write-priority on >/dev/null 2>>"$W/wp.err"; then
			sleep 6
			contend wp-b-alone /dev/ublkb1
			moves_b=$("$NVMCTL" --config "$W/node-b.toml" status --json |
				python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["write_priority_moves"])')
			contend wp-a-both /dev/ublkb0 &
			both_a=$!
			contend wp-b-both /dev/ublkb1
			wait "$both_a"
			moves_all=$("$NVMCTL" --config "$W/node-b.toml" status --json |
				python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["write_priority_moves"])')
			python3 - "$D" "$moves_b" "$moves_all" <<-'PY' >>"$D/notes" 2>/dev/null
			import json, sys
			def w(name):
			    j = json.load(open(f"{sys.argv[1]}/contend-{name}.json"))["jobs"][0]["write"]
			    return j["iops"], j["clat_ns"]["percentile"]["50.000000"] / 1000
			(a, pa) = w("a-alone")
			(b, pb) = w("wp-b-alone")
			(a2, pa2), (b2, pb2) = w("wp-a-both"), w("wp-b-both")
			print(f"contention with write priority following the writer (nvmirrorctl write-priority on, "
			      f"default policy), same portion, one run each: node-b alone {b:.0f} IOPS (p50 {pb:.0f} µs, "
			      f"{b / max(a, 1):.2f}x node-a alone; {sys.argv[2]} range move(s) on request by then); "
			      f"both at once node-a {a2:.0f} (p50 {pa2:.0f} µs) + node-b {b2:.0f} (p50 {pb2:.0f} µs) = "
			      f"{a2 + b2:.0f}, {(a2 + b2) / max(a, 1):.2f}x node-a alone; {sys.argv[3]} move(s) in all")
			PY
			"$NVMCTL" --config "$W/node-a.toml" write-priority off >/dev/null 2>&1
			"$NVMCTL" --config "$W/node-b.toml" write-priority off >/dev/null 2>&1
			# Every range back to node-a (the configured owner) for what follows.
			"$NVMCTL" --config "$W/node-b.toml" giveback >/dev/null 2>&1 ||
				note "giveback after the write-priority runs failed"
		else
			note "write-priority on refused: $(head -c 300 "$W/wp.err" | tr '\n' ' ')"
		fi
		# Writes queued until granted (`nvmirrorctl write-priority queue --min-hold-ms 250`):
		# a write to a range the other node holds waits for the range instead of being
		# forwarded. node-b alone: its first writes wait for the hand-over, the rest are
		# local. Both at once: the nodes take turns of at least 250 ms, each turn a move.
		if "$NVMCTL" --config "$W/node-a.toml" write-priority queue --min-hold-ms 250 >/dev/null 2>"$W/wq.err" &&
			"$NVMCTL" --config "$W/node-b.toml" write-priority queue --min-hold-ms 250 >/dev/null 2>>"$W/wq.err"; then
			engine_field() { # NODE FIELD
				"$NVMCTL" --config "$W/node-$1.toml" status --json |
					python3 -c "import json,sys; print(json.load(sys.stdin)['engine']['$2'])"
			}
			contend q-b-alone /dev/ublkb1
			moves_b=$(engine_field b write_priority_moves)
			contend q-a-both /dev/ublkb0 &
			both_a=$!
			contend q-b-both /dev/ublkb1
			wait "$both_a"
			moves_all=$(engine_field b write_priority_moves)
			queued="node-a $(engine_field a writes_queued) queued, $(engine_field a writes_queued_then_forwarded) forwarded; node-b $(engine_field b writes_queued) queued, $(engine_field b writes_queued_then_forwarded) forwarded"
			python3 - "$D" "$moves_b" "$moves_all" "$queued" <<-'PY' >>"$D/notes" 2>/dev/null
			import json, sys
			def w(name):
			    j = json.load(open(f"{sys.argv[1]}/contend-{name}.json"))["jobs"][0]["write"]
			    return j["iops"], j["clat_ns"]["percentile"]["50.000000"] / 1000
			(a, pa) = w("a-alone")
			(b, pb) = w("q-b-alone")
			(a2, pa2), (b2, pb2) = w("q-a-both"), w("q-b-both")
			print(f"contention with writes queued until granted (nvmirrorctl write-priority queue "
			      f"--min-hold-ms 250), same portion, one run each: node-b alone {b:.0f} IOPS "
			      f"(p50 {pb:.0f} µs, {b / max(a, 1):.2f}x node-a alone; node-b counts {sys.argv[2]} "
			      f"move(s) by then); both at once node-a {a2:.0f} (p50 {pa2:.0f} µs) + node-b {b2:.0f} "
			      f"(p50 {pb2:.0f} µs) = {a2 + b2:.0f}, {(a2 + b2) / max(a, 1):.2f}x node-a alone; "
			      f"node-b counts {sys.argv[3]} move(s) in all; writes {sys.argv[4]}")
			PY
			"$NVMCTL" --config "$W/node-a.toml" write-priority off >/dev/null 2>&1
			"$NVMCTL" --config "$W/node-b.toml" write-priority off >/dev/null 2>&1
			"$NVMCTL" --config "$W/node-b.toml" giveback >/dev/null 2>&1 ||
				note "giveback after the queued-write runs failed"
		else
			note "write-priority queue refused: $(head -c 300 "$W/wq.err" | tr '\n' ' ')"
		fi
	fi
	# Reads of node-a's ranges through node-b: forwarded (`nvmirrorctl local-reads off`),
	# then served from node-b's medium (its own, or the shared one) and second store under
	# node-a's read lease (on by default with own storage, turned on here with a shared
	# medium), against node-a reading its own. 4K random reads QD32, same portion.
	if [[ $CFG == own || $CFG == tcp ]]; then
		readb() { portion_fio "readb-$1" "$2" randread 32; } # NAME DEVICE
		readb a-own /dev/ublkb0
		"$NVMCTL" --config "$W/node-b.toml" local-reads off >/dev/null 2>&1 ||
			note "local-reads off refused"
		readb b-forwarded /dev/ublkb1
		if "$NVMCTL" --config "$W/node-b.toml" local-reads on >/dev/null 2>"$W/lr.err"; then
			sleep 2
			readb b-local /dev/ublkb1
			leased=$("$NVMCTL" --config "$W/node-b.toml" status --json |
				python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"]["luns"][0]["reads_leased"])')
			python3 - "$D" "$leased" "$([[ $CFG == own ]] && echo "each node its own medium" || echo "a shared medium")" <<-'PY' >>"$D/notes" 2>/dev/null
			import json, sys
			def r(name):
			    j = json.load(open(f"{sys.argv[1]}/readb-{name}.json"))["jobs"][0]["read"]
			    return j["iops"], j["clat_ns"]["percentile"]["50.000000"] / 1000
			(a, pa), (f, pf), (l, pl) = r("a-own"), r("b-forwarded"), r("b-local")
			print(f"reads of node-a's ranges through node-b ({sys.argv[3]}), 4K random reads QD32 to one "
			      f"64 MiB portion, one run each: node-a (the owner) {a:.0f} IOPS (p50 {pa:.0f} µs); "
			      f"node-b forwarded (local-reads off) {f:.0f} (p50 {pf:.0f} µs, {f / max(a, 1):.2f}x); node-b under "
			      f"node-a's read lease (local-reads on) {l:.0f} (p50 {pl:.0f} µs, "
			      f"{l / max(a, 1):.2f}x; {sys.argv[2]} read(s) served locally)")
			PY
		else
			note "local-reads on refused: $(head -c 300 "$W/lr.err" | tr '\n' ' ')"
		fi
	fi
	# Optional profile (BENCH_PERF=1): one more run of each write workload under a system-wide
	# perf record (cpu-clock: the VM has no PMU), after the measured runs.
	if [[ ${BENCH_PERF:-0} == 1 ]] && command -v perf >/dev/null; then
		for wl in ${BENCH_PERF_WORKLOADS:-qd1 qd32w seqw mixed}; do
			perf record -a -g -e cpu-clock -F 499 -o "$W/perf-$wl.data" >"$W/perf-$wl.log" 2>&1 &
			pp=$!
			# perf takes seconds to start under TCG: profile only once it records.
			for _ in $(seq 100); do [[ -s $W/perf-$wl.data ]] && break; sleep 0.2; done
			sleep 2
			fio_run "$wl" perf
			kill -INT "$pp"
			wait "$pp"
			cp "$W/perf-$wl.log" "$D/"
			perf report -i "$W/perf-$wl.data" --stdio --no-children -g none --sort comm \
				>"$D/perf-$wl.comm.txt" 2>/dev/null
			perf report -i "$W/perf-$wl.data" --stdio --no-children -g none --sort comm,dso,symbol \
				--percent-limit 0.3 >"$D/perf-$wl.sym.txt" 2>/dev/null
			perf report -i "$W/perf-$wl.data" --stdio --no-children -G --percent-limit 2 \
				--comm nvmirrord >"$D/perf-$wl.graph.txt" 2>/dev/null
			rm -f "$W/perf-$wl.data"
		done
	fi
	say "$CFG: done"
	exit 0
fi

# ================================================================= main (in the VM) ======
mkdir -p "$RAW"
t_start=$SECONDS
# Fresh ext4 on the benchmark disk (the host's image).
disk=/dev/vda
[[ -b $disk ]] || { echo "bench-guest: no virtio disk $disk (boot with --disk)"; exit 1; }
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$disk" || exit 1
mkdir -p "$MNT" && mount "$disk" "$MNT" || exit 1
nvram_desc="a file in the VM's tmpfs for 2 and 4 (as in the VM tests), the emulated NVDIMM /dev/pmem0 (QEMU memory-backend-file on the host) for 2b, device-DAX on two more emulated NVDIMMs for 3 (RDMA cannot register a /dev/pmemN mapping on this kernel: ibv_reg_mr fails with EFAULT; the whole device, about 2 x the own log); ${NVRAM_MB} MiB own log per node in 4 partitions (a cluster node's NVRAM is twice that: its own logs + the partner's mirror)"
{
	echo "GUEST_KERNEL=$(uname -r)"
	echo "GUEST_CPUS=$(nproc)"
	echo "GUEST_MEM_MIB=$(awk '/MemTotal/ { printf "%d", $2 / 1024 }' /proc/meminfo)"
	echo "FIO=$(fio --version)"
	echo "MEDIUM=a ${MEDIUM_MB} MiB file per device on ext4 on the virtio disk $disk (QEMU cache=none, the host's ${BENCH_DISK_DESC:-image}), fully written before use, behind a loop device with direct I/O"
	echo "NVRAM=$nvram_desc"
	echo "BENCH_RUNTIME=$RUNTIME"
	echo "BENCH_RAMP=$RAMP"
	echo "BENCH_REPEATS=$REPEATS"
	echo "BENCH_REGION_MB=$REGION_MB"
} >"$BENCH_OUT/meta-guest.env"
# The engine alone on this VM's CPUs (no ublk, no medium I/O): what one 128 KiB write's
# checksum and copy cost here; under TCG the crc32c instruction is emulated.
if [[ -x $NVM_BIN/examples/write_path ]]; then
	engine_alone=$(timeout 120 "$NVM_BIN/examples/write_path" single 1000 8 128 2>&1 | tr '\n' ' ')
	echo "ENGINE_ALONE=$engine_alone" >>"$BENCH_OUT/meta-guest.env"
fi

read -r -a configs <<<"${BENCH_CONFIGS:-${CONFIG_ORDER[*]}}"
for cfg in "${configs[@]}"; do
	rm -rf "${RAW:?}/$cfg"
	mkdir -p "$RAW/$cfg"
	limit=$((180 + REPEATS * ${#WORKLOADS[@]} * (RAMP + RUNTIME + 15)))
	say "=== configuration $cfg (time limit ${limit}s)"
	t0=$SECONDS
	timeout -k 20 "$limit" bash "$0" --one "$cfg"
	rc=$?
	((rc == 124)) && echo "timed out after ${limit}s" >>"$RAW/$cfg/error"
	((rc != 0)) && [[ ! -s $RAW/$cfg/error ]] && echo "exited with status $rc" >>"$RAW/$cfg/error"
	echo "$((SECONDS - t0))" >"$RAW/$cfg/seconds"
	say "=== $cfg: status $rc after $((SECONDS - t0))s"
	# Whatever a failed configuration left behind must not disturb the next one.
	if [[ -f $RAW/$cfg/pids ]]; then
		while read -r p; do kill -KILL "$p" 2>/dev/null; done <"$RAW/$cfg/pids"
		rm -f "$RAW/$cfg/pids"
	fi
	for f in /sys/class/ublk-char/ublkc*; do [[ -e $f ]] && "$NVMCTL" del "${f##*ublkc}" >/dev/null 2>&1; done
	[[ -f /run/bench-$cfg/drbd.conf ]] && drbdadm -c "/run/bench-$cfg/drbd.conf" down all >/dev/null 2>&1
	rdma link delete benchrxe0 2>/dev/null
	ip link del bench0 2>/dev/null
	losetup -D 2>/dev/null
	rm -f "$MNT"/*.img
	mountpoint -q /bench-nvram && umount /bench-nvram
done
umount "$MNT"
say "all configurations done in $((SECONDS - t_start))s"
