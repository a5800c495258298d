#!/usr/bin/env bash
# NBD read benchmark (issue 4/8, "Benchmark"): cairn's image export against
# qemu-nbd and nbdkit serving the same 1 GiB real-content raw file, on loopback.
#
#   bench/nbd-bench.sh            # as root (drops the page cache for the cold pass)
#
# Environment knobs (defaults in brackets):
#   CAIRN_BIN   cairn binary                       [target/release/cairn]
#   REPS        nbdcopy reps per server and pass   [3]
#   FIO_REPS    fio reps per server and pass       [3]
#   FIO_RUNTIME fio seconds per rep                [10]
#   COLD        1 = also run the cold pass         [1]
#   WRITE       1 = also run the write pass        [1]
#   KEEP        1 = keep the temp dir              [0]
#   OUT         report path without extension     [bench/results/nbd-YYYY-MM-DD]
#
# Outputs OUT.md and OUT.json. Every server started here is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CAIRN_BIN:-$ROOT/target/release/cairn}
REPS=${REPS:-3}
FIO_REPS=${FIO_REPS:-3}
FIO_RUNTIME=${FIO_RUNTIME:-10}
COLD=${COLD:-1}
WRITE=${WRITE:-1}
# The node's verified chunk cache (store.chunk_cache): large enough to hold
# the 1 GiB image, so the warm pass measures cairn fully cached.
export CHUNK_CACHE=${CHUNK_CACHE:-1536M}
KEEP=${KEEP:-0}
OUT=${OUT:-$ROOT/bench/results/nbd-$(date -u +%F)}
SIZE=$((1 << 30))
CMDLINE="$0${*:+ $*}"

for t in qemu-nbd nbdkit nbdcopy nbdinfo fio jq curl python3 tar; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "no cairn binary at $BIN" >&2; exit 1; }

mkdir -p "$ROOT/target" "$(dirname "$OUT")"
WORK=$(mktemp -d "$ROOT/target/nbd-bench.XXXXXX")
IMG=$WORK/img.raw
DATA=$WORK/cairn-data
RES=$WORK/results.tsv      # pass server metric rep value
: >"$RES"
NOTES=$WORK/notes.txt
: >"$NOTES"

QEMU_PID= NBDKIT_PID= CAIRN_PID= QEMU_W_PID= NBDKIT_W_PID=
stop_pid() {
    local p=$1
    [ -n "$p" ] || return 0
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
cleanup() {
    stop_pid "$CAIRN_PID"; stop_pid "$QEMU_PID"; stop_pid "$NBDKIT_PID"
    stop_pid "$QEMU_W_PID"; stop_pid "$NBDKIT_W_PID"
    if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(date -u +%T)] $*" >&2; }
note() { echo "$*" >>"$NOTES"; log "note: $*"; }

# --- machine facts ----------------------------------------------------------
NPROC=$(nproc)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
KERNEL=$(uname -r)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u +%FT%TZ)
BIN_MTIME=$(date -u -r "$BIN" +%FT%TZ)
NEWER_SRC=$(cd "$ROOT" && find . -path ./target -prune -o \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) \
    -newer "$BIN" -print 2>/dev/null | sort | tr '\n' ' ')
[ -z "$NEWER_SRC" ] || note "the cairn binary ($BIN_MTIME) is older than these sources: $NEWER_SRC"
VERSIONS="$(qemu-nbd --version | head -1); nbdkit $(nbdkit --version | awk '{print $2}'); $(nbdcopy --version | head -1); $(fio --version); $("$BIN" --version)"
log "work dir $WORK; load $LOAD_START"

# --- free loopback ports (tcp: qemu, nbdkit, cairn nbd, api, registry; udp: quic)
read -r P_QEMU P_NBDKIT P_CNBD P_API P_REG P_QUIC P_QEMU_W P_NBDKIT_W < <(python3 - <<'EOF'
import socket
ss = []
for kind in [socket.SOCK_STREAM] * 5 + [socket.SOCK_DGRAM] + [socket.SOCK_STREAM] * 2:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0)); ss.append(s)
print(*[s.getsockname()[1] for s in ss])
EOF
)

# --- 1. the image -------------------------------------------------------------
log "making 1 GiB image"
t0=$(date +%s.%N)
( tar cf - --sort=name /usr/lib /usr/share 2>/dev/null || true ) | head -c "$SIZE" >"$IMG" || true
truncate -s "$SIZE" "$IMG"
[ "$(stat -c %s "$IMG")" = "$SIZE" ]
IMG_SHA=$(sha256sum "$IMG" | cut -d' ' -f1)
ZERO_MIB=$(python3 - "$IMG" <<'EOF'
import sys
z = 0
with open(sys.argv[1], "rb") as f:
    while (b := f.read(1 << 20)):
        if b.count(0) == len(b): z += 1
print(z)
EOF
)
log "image sha256 $IMG_SHA ($ZERO_MIB all-zero MiB) in $(echo "$(date +%s.%N) - $t0" | bc) s"

# --- 2. servers -------------------------------------------------------------
wait_nbd() {  # uri pid
    for _ in $(seq 100); do
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || { echo "server for $1 died" >&2; return 1; }
        sleep 0.1
    done
    echo "server for $1 not up" >&2; return 1
}
start_qemu() {
    qemu-nbd --read-only --persistent --shared=8 -f raw -x img -b 127.0.0.1 -p "$P_QEMU" "$IMG" \
        >"$WORK/qemu-nbd.log" 2>&1 &
    QEMU_PID=$!
    wait_nbd "nbd://127.0.0.1:$P_QEMU/img" "$QEMU_PID"
}
start_nbdkit() {
    nbdkit --foreground --read-only -i 127.0.0.1 -p "$P_NBDKIT" file "$IMG" \
        >"$WORK/nbdkit.log" 2>&1 &
    NBDKIT_PID=$!
    wait_nbd "nbd://127.0.0.1:$P_NBDKIT/img" "$NBDKIT_PID"
}
start_cairn() {
    printf 'version = 1\n[store]\nchunk_cache = "%s"\n' "$CHUNK_CACHE" >"$WORK/cairn.toml"
    "$BIN" node --config "$WORK/cairn.toml" --data-dir "$DATA" --nbd-listen "127.0.0.1:$P_CNBD" --api-listen "127.0.0.1:$P_API" \
        --registry-listen "127.0.0.1:$P_REG" --quic-listen "127.0.0.1:$P_QUIC" \
        >>"$WORK/cairn.log" 2>&1 &
    CAIRN_PID=$!
    for _ in $(seq 300); do
        curl -fsS "http://127.0.0.1:$P_API/healthz" >/dev/null 2>&1 && return 0
        kill -0 "$CAIRN_PID" 2>/dev/null || { tail -20 "$WORK/cairn.log" >&2; return 1; }
        sleep 0.1
    done
    echo "cairn node not up" >&2; return 1
}

log "starting qemu-nbd :$P_QEMU, nbdkit :$P_NBDKIT, cairn nbd :$P_CNBD api :$P_API"
start_qemu
start_nbdkit
start_cairn
t0=$(date +%s.%N)
"$BIN" image import bench "$IMG" --api "http://127.0.0.1:$P_API" >"$WORK/import.out" 2>&1 \
    || { cat "$WORK/import.out" >&2; exit 1; }
IMPORT_S=$(echo "$(date +%s.%N) - $t0" | bc)
log "import took $IMPORT_S s: $(tr '\n' ' ' <"$WORK/import.out")"
wait_nbd "nbd://127.0.0.1:$P_CNBD/image/bench" "$CAIRN_PID"
STORE_BYTES=$(du -sb "$DATA" | cut -f1)

declare -A URI=(
    [qemu-nbd]="nbd://127.0.0.1:$P_QEMU/img"
    [nbdkit]="nbd://127.0.0.1:$P_NBDKIT/img"
    [cairn]="nbd://127.0.0.1:$P_CNBD/image/bench"
)
SERVERS=(qemu-nbd nbdkit cairn)
for s in "${SERVERS[@]}"; do
    sz=$(nbdinfo --size "${URI[$s]}")
    [ "$sz" = "$SIZE" ] || { echo "$s reports size $sz, want $SIZE" >&2; exit 1; }
done

# --- correctness, once -------------------------------------------------------
log "correctness: nbdcopy cairn export to a file, cmp with the source"
nbdcopy "${URI[cairn]}" "$WORK/copy.raw"
if cmp "$IMG" "$WORK/copy.raw"; then CMP=identical; else CMP=DIFFERENT; fi
rm -f "$WORK/copy.raw"
log "cmp: $CMP"

# --- measurement helpers ----------------------------------------------------
seq_read() {  # pass server rep
    local t0 t1 s
    t0=$(date +%s.%N)
    nbdcopy "${URI[$2]}" null:
    t1=$(date +%s.%N)
    s=$(echo "$t1 - $t0" | bc -l)
    printf '%s\t%s\tseq_s\t%s\t%s\n' "$1" "$2" "$3" "$s" >>"$RES"
    log "$1 $2 seq rep $3: ${s}s = $(echo "$SIZE / $s / 1000000" | bc -l | xargs printf '%.0f') MB/s"
}
rand_read() {  # pass server rep
    local j iops
    j=$WORK/fio-$1-$2-$3.json
    fio --name=r --ioengine=nbd --uri="${URI[$2]}" --rw=randread --bs=4k --iodepth=16 \
        --runtime="$FIO_RUNTIME" --time_based --output-format=json --output="$j" >/dev/null
    iops=$(jq '.jobs[0].read.iops' "$j")
    printf '%s\t%s\tiops\t%s\t%s\n' "$1" "$2" "$3" "$iops" >>"$RES"
    log "$1 $2 fio rep $3: $iops IOPS"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
make_cold() {  # server: empty the page cache; restart cairn (empty chunk cache)
    if [ "$1" = cairn ]; then
        stop_pid "$CAIRN_PID"; CAIRN_PID=
        drop_caches
        start_cairn
        wait_nbd "${URI[cairn]}" "$CAIRN_PID"
    else
        drop_caches
    fi
}

# --- 3. warm pass -------------------------------------------------------------
log "warm-up: one untimed nbdcopy per server"
for s in "${SERVERS[@]}"; do nbdcopy "${URI[$s]}" null:; done
for s in "${SERVERS[@]}"; do
    for r in $(seq "$REPS"); do seq_read warm "$s" "$r"; done
    for r in $(seq "$FIO_REPS"); do rand_read warm "$s" "$r"; done
done

CAIRN_METRICS_WARM=$(curl -fsS "http://127.0.0.1:$P_API/metrics" 2>/dev/null \
    | grep -E '^cairn_store_chunk_cache|^cairn_nbd_requests_total\{command="read"' || true)

# --- 4. cold pass (page cache dropped before every rep; cairn restarted) --------
COLD_DONE=0
if [ "$COLD" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        note "cold pass skipped: not root (cannot drop the page cache)"
    else
        for s in "${SERVERS[@]}"; do
            for r in $(seq "$REPS"); do make_cold "$s"; seq_read cold "$s" "$r"; done
            for r in $(seq "$FIO_REPS"); do make_cold "$s"; rand_read cold "$s" "$r"; done
        done
        COLD_DONE=1
    fi
fi

# --- 5. write pass: fio 4 KiB random writes on a fresh 1 GiB writable target --
# qemu-nbd and nbdkit serve a new sparse raw file each (writes go to the page
# cache, flushed at the end); cairn serves a new empty volume (dirty blocks in
# memory, stored as chunks at the flush). --end_fsync=1 makes every run end
# with a FLUSH, so what is timed includes making the writes durable.
WRITE_DONE=0
if [ "$WRITE" = 1 ]; then
    truncate -s "$SIZE" "$WORK/wq.raw" "$WORK/wk.raw"
    qemu-nbd --persistent --shared=8 -f raw -x w -b 127.0.0.1 -p "$P_QEMU_W" "$WORK/wq.raw" \
        >"$WORK/qemu-nbd-w.log" 2>&1 &
    QEMU_W_PID=$!
    nbdkit --foreground -i 127.0.0.1 -p "$P_NBDKIT_W" file "$WORK/wk.raw" \
        >"$WORK/nbdkit-w.log" 2>&1 &
    NBDKIT_W_PID=$!
    "$BIN" volume create wbench --size "$SIZE" --api "http://127.0.0.1:$P_API" >"$WORK/vol.out" 2>&1 \
        || { cat "$WORK/vol.out" >&2; exit 1; }
    "$BIN" volume create wbench4k --size "$SIZE" --block-size 4K --api "http://127.0.0.1:$P_API" \
        >>"$WORK/vol.out" 2>&1 || { cat "$WORK/vol.out" >&2; exit 1; }
    declare -A WURI=(
        [qemu-nbd]="nbd://127.0.0.1:$P_QEMU_W/w"
        [nbdkit]="nbd://127.0.0.1:$P_NBDKIT_W/w"
        [cairn]="nbd://127.0.0.1:$P_CNBD/volume/wbench"
        [cairn-4k]="nbd://127.0.0.1:$P_CNBD/volume/wbench4k"
    )
    wait_nbd "${WURI[qemu-nbd]}" "$QEMU_W_PID"
    wait_nbd "${WURI[nbdkit]}" "$NBDKIT_W_PID"
    for s in "${SERVERS[@]}" cairn-4k; do
        for r in $(seq "$FIO_REPS"); do
            j=$WORK/fio-write-$s-$r.json
            fio --name=w --ioengine=nbd --uri="${WURI[$s]}" --rw=randwrite --bs=4k --iodepth=16 \
                --runtime="$FIO_RUNTIME" --time_based --end_fsync=1 --output-format=json \
                --output="$j" >/dev/null
            iops=$(jq '.jobs[0].write.iops' "$j")
            printf 'write\t%s\tiops\t%s\t%s\n' "$s" "$r" "$iops" >>"$RES"
            log "write $s fio rep $r: $iops IOPS"
        done
    done
    stop_pid "$QEMU_W_PID"; stop_pid "$NBDKIT_W_PID"
    WRITE_DONE=1
fi

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
END=$(date -u +%FT%TZ)
cp "$WORK/cairn.log" "$WORK/cairn.log.keep" 2>/dev/null || true
CAIRN_METRICS=$(curl -fsS "http://127.0.0.1:$P_API/metrics" 2>/dev/null \
    | grep -E '^cairn_store_chunk_cache|^cairn_nbd_requests_total\{command="read"' || true)

# --- 5. report ------------------------------------------------------------------
export RES NOTES OUT SIZE NPROC CPU KERNEL LOAD_START LOAD_END START END VERSIONS CMDLINE \
    REPS FIO_REPS FIO_RUNTIME COLD_DONE IMG_SHA ZERO_MIB IMPORT_S STORE_BYTES CMP CAIRN_METRICS \
    CAIRN_METRICS_WARM BIN BIN_MTIME WRITE_DONE \
    WORK
python3 - <<'EOF'
import json, os, statistics as st
E = os.environ
size = int(E["SIZE"])
rows = [l.rstrip("\n").split("\t") for l in open(E["RES"]) if l.strip()]
data = {}
for p, s, m, r, v in rows:
    data.setdefault(p, {}).setdefault(s, {}).setdefault(m, []).append(float(v))
servers = ["qemu-nbd", "nbdkit", "cairn", "cairn-4k"]
summary = {}
for p, d in data.items():
    summary[p] = {}
    for s in servers:
        if s not in d: continue
        secs = d[s].get("seq_s", [])
        iops = d[s].get("iops", [])
        mbs = [size / x / 1e6 for x in secs]
        summary[p][s] = {
            "seq_seconds": secs, "seq_MBps": mbs,
            "seq_MBps_median": st.median(mbs) if mbs else None,
            "iops": iops, "iops_median": st.median(iops) if iops else None,
        }
def ratio(p, metric, other):
    a = summary.get(p, {}).get("cairn", {}).get(metric)
    b = summary.get(p, {}).get(other, {}).get(metric)
    return a / b if a and b else None
ratios = {p: {f"cairn/{o}": {"seq": ratio(p, "seq_MBps_median", o),
                             "iops": ratio(p, "iops_median", o)}
              for o in ("qemu-nbd", "nbdkit")} for p in summary}
if "write" in summary and "cairn-4k" in summary["write"]:
    a = summary["write"]["cairn-4k"]["iops_median"]
    for o in ("qemu-nbd", "nbdkit"):
        b = summary["write"].get(o, {}).get("iops_median")
        ratios["write"][f"cairn-4k/{o}"] = {"seq": None, "iops": a / b if a and b else None}
target = {}
if "warm" in ratios:
    rq = ratios["warm"]["cairn/qemu-nbd"]
    target = {m: ("PASS" if rq[m] is not None and rq[m] >= 1.0 else "FAIL") for m in ("seq", "iops")}
notes = [l.strip() for l in open(E["NOTES"]) if l.strip()]
out = {
    "benchmark": "nbd-read", "command": E["CMDLINE"], "start": E["START"], "end": E["END"],
    "machine": {"nproc": int(E["NPROC"]), "cpu": E["CPU"], "kernel": E["KERNEL"],
                "loadavg_start": E["LOAD_START"], "loadavg_end": E["LOAD_END"]},
    "versions": E["VERSIONS"], "cairn_binary": {"path": E["BIN"], "mtime": E["BIN_MTIME"]},
    "image": {"bytes": size, "sha256": E["IMG_SHA"], "all_zero_MiB": int(E["ZERO_MIB"]),
              "cairn_import_seconds": float(E["IMPORT_S"]),
              "cairn_data_dir_bytes": int(E["STORE_BYTES"])},
    "correctness_cmp": E["CMP"],
    "params": {"nbdcopy_reps": int(E["REPS"]), "fio_reps": int(E["FIO_REPS"]),
               "fio_runtime_s": int(E["FIO_RUNTIME"]), "cold_pass": E["COLD_DONE"] == "1"},
    "results": summary, "ratios": ratios,
    "target_warm_vs_qemu_nbd": target, "notes": notes,
}
json.dump(out, open(E["OUT"] + ".json", "w"), indent=2)

f = lambda x, n=0: "n/a" if x is None else f"{x:,.{n}f}"
L = []
L.append(f"# NBD read benchmark, {E['START'][:10]}\n")
L.append(f"Command (as root, from /work/main): `{E['CMDLINE']}`  ")
L.append(f"Run {E['START']} .. {E['END']}.\n")
L.append(f"Machine: {E['NPROC']} CPUs ({E['CPU']}), kernel {E['KERNEL']}; "
         f"load average {E['LOAD_START']} at the start, {E['LOAD_END']} at the end.  ")
L.append(f"Versions: {E['VERSIONS']}; cairn binary `{E['BIN']}` built {E['BIN_MTIME']}.\n")
L.append(f"Image: 1 GiB raw ({size} bytes), the first 1 GiB of `tar cf - --sort=name /usr/lib /usr/share` "
         f"padded with zeros; sha256 `{E['IMG_SHA']}`, {E['ZERO_MIB']} all-zero MiB. "
         f"Temp dir under target/ (disk, not tmpfs). `cairn image import` took {float(E['IMPORT_S']):.1f} s; "
         f"the node's data dir is {int(E['STORE_BYTES'])/2**20:.0f} MiB after import.\n")
L.append("Servers, all on 127.0.0.1 and serving the same file:")
L.append("- `qemu-nbd --read-only --persistent --shared=8 -f raw -x img -b 127.0.0.1 -p PORT FILE`")
L.append("- `nbdkit --foreground --read-only -i 127.0.0.1 -p PORT file FILE`")
L.append("- `cairn node --data-dir FRESH --nbd-listen ... --api-listen ... --registry-listen ... --quic-listen ...` "
         "(default config), then `cairn image import bench FILE --api URL`; export `image/bench`.\n")
L.append("Measurements:")
L.append("- sequential: `nbdcopy nbd://127.0.0.1:PORT/EXPORT null:` (whole image), wall time; "
         "MB/s = 2^30 bytes / s / 10^6.")
L.append(f"- random: `fio --name=r --ioengine=nbd --uri=URI --rw=randread --bs=4k --iodepth=16 "
         f"--runtime={E['FIO_RUNTIME']} --time_based --output-format=json`, `jobs[0].read.iops`.")
L.append(f"- {E['REPS']} nbdcopy reps and {E['FIO_REPS']} fio reps per server and pass; medians.")
L.append("- warm: one untimed nbdcopy of each export first (page cache, and cairn's in-memory chunk cache "
         "as far as it holds).")
L.append("- cold: before every rep `sync; echo 3 > /proc/sys/vm/drop_caches`; for cairn the node is also "
         "restarted (empty in-memory chunk cache).\n")
L.append(f"Correctness: `nbdcopy` of `image/bench` to a file, `cmp` with the source: **{E['CMP']}**.\n")
for p in ("warm", "cold"):
    if p not in summary: continue
    if p == "write": continue
    L.append(f"## {p.capitalize()}\n")
    L.append("| server | seq reps (MB/s) | seq median MB/s | fio reps (IOPS) | IOPS median |")
    L.append("|---|---|---|---|---|")
    for s in servers:
        d = summary[p].get(s)
        if not d: continue
        L.append(f"| {s} | {', '.join(f(x) for x in d['seq_MBps'])} | **{f(d['seq_MBps_median'])}** | "
                 f"{', '.join(f(x) for x in d['iops'])} | **{f(d['iops_median'])}** |")
    L.append("")
    L.append("| ratio | sequential | IOPS |")
    L.append("|---|---|---|")
    for o in ("qemu-nbd", "nbdkit"):
        r = ratios[p][f"cairn/{o}"]
        L.append(f"| cairn / {o} | {f(r['seq'], 2)}x | {f(r['iops'], 2)}x |")
    L.append("")
if "write" in summary:
    L.append("## Writes (context, no target)\n")
    L.append(f"`fio --name=w --ioengine=nbd --uri=URI --rw=randwrite --bs=4k --iodepth=16 --runtime={E['FIO_RUNTIME']} "
             "--time_based --end_fsync=1` on a fresh 1 GiB target each: qemu-nbd and nbdkit (writable) on a new "
             "sparse raw file, cairn on a new empty volume (`cairn volume create wbench --size 1G`, 64 KiB blocks), "
             "cairn-4k on one made with `--block-size 4K`.\n")
    L.append("| server | fio reps (IOPS) | IOPS median |")
    L.append("|---|---|---|")
    for s in servers:
        d = summary["write"].get(s)
        if not d: continue
        L.append(f"| {s} | {', '.join(f(x) for x in d['iops'])} | **{f(d['iops_median'])}** |")
    L.append("")
    for c in ("cairn", "cairn-4k"):
        for o in ("qemu-nbd", "nbdkit"):
            r = ratios["write"].get(f"{c}/{o}")
            if r:
                L.append(f"- {c} / {o}: {f(r['iops'], 2)}x")
    L.append("")
if target:
    L.append("## Target (issue 4/8): warm, cairn >= 1.0x qemu-nbd\n")
    rq = ratios["warm"]["cairn/qemu-nbd"]
    L.append(f"- sequential throughput: {f(rq['seq'], 2)}x -> **{target['seq']}**")
    L.append(f"- 4 KiB random-read IOPS: {f(rq['iops'], 2)}x -> **{target['iops']}**\n")
L.append("## Notes\n")
L.append(f"- cairn's in-memory verified-chunk cache (`[store] chunk_cache`, default 256 MiB) is set to "
         f"{os.environ.get('CHUNK_CACHE', '1536M')} here, enough to hold the 1 GiB image; the cold pass restarts "
         "the node, so it starts empty.")
L.append("- The machine is shared (other builds and benchmarks may run concurrently; see the load "
         "averages); the clients run on the same 2 CPUs as the servers.")
for n in notes: L.append(f"- {n}")
for key, title in (("CAIRN_METRICS_WARM", "after the warm pass (one node instance since import)"),
                   ("CAIRN_METRICS", "at the end (last node instance, after its last cold rep)")):
    if E.get(key):
        L.append(f"\ncairn metrics {title}:\n")
        L.append("```")
        L.append(E[key])
        L.append("```")
open(E["OUT"] + ".md", "w").write("\n".join(L) + "\n")
print("\n".join(L))
EOF
log "wrote $OUT.md and $OUT.json"
