"""Guest side of tests/test_numa_vm_daemon.py: run `dsd start --nodes 2` scenarios on a real
two-node kernel and record raw observations (no assertions here; the host test asserts).

One boot runs every scenario in sequence, because each Python process that calls numba costs
~1 minute under TCG (README: scipy.linalg at numba's first call):

  doctor        `dsd doctor --model SMOL --nodes 2 --apply --json`: per-node 2 MiB pools
  smollm2_2m    SmolLM2 (dense: layer pipeline), `--pages 2m` on the pools doctor reserved
  tiny_2m       a tiny DeepSeek-V2-shaped MoE (experts split between workers), `--pages 2m`
  auto_node0    pools on node 0 only, `--pages auto`: worker 1 must fall back on node 1
  strict_node0  pools on node 0 only, `--pages 2m`: start must fail, naming node 1's shortfall

The single-process reference answers (dsd.shard.engine.Engine, what `dsd generate` runs) are
computed by `warm()` on the HOST with the guest's numba target (NUMBA_CPU_NAME=generic, same
cache, so the same machine code the guest runs): one SmolLM2 answer costs ~2 minutes under TCG,
and the 15-minute budget has room for the daemon's answers only.

For each worker the raw /proc views are kept (numa_maps, the smaps lines of big mappings,
every thread's Cpus_allowed_list), read by this script, not by dsd, so the check of placement
does not trust the daemon's own report.  Only stdlib + dsd.client (zmq, msgpack) are imported
here: this process must not pay numpy/numba import time in the guest.

Run (inside the guest):  python daemon_scenarios.py SPEC.json OUT.json
SPEC: {"smollm2": path, "tiny": path, "questions": {...}, "tiny_prompts": [[ids]], ...}
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback

NODE_SYS = "/sys/devices/system/node"
POOL = NODE_SYS + "/node{n}/hugepages/hugepages-2048kB/{f}"
OUT_DIR = "/tmp/dsdvm/out"      # comes back to the host (harness: VMResult.files)
SOCK_DIR = "/tmp/dsd-sock"       # unix sockets need a local fs (tmpfs), not the 9p share
T0 = time.monotonic()


def now() -> float:
    return round(time.monotonic() - T0, 2)


def log(msg: str) -> None:
    print(f"[scenarios {now():7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- system views (independent of dsd) ------------------------------------------------------------
def pools() -> dict:
    """{node: {"nr": reserved 2 MiB pages, "free": free ones}} from sysfs."""
    out = {}
    for n in (0, 1):
        if os.path.exists(POOL.format(n=n, f="nr_hugepages")):  # the host (warm-up) has one node
            out[str(n)] = {f: int(open(POOL.format(n=n, f=f + "_hugepages")).read())
                           for f in ("nr", "free")}
    return out


def set_pool(node: int, pages: int) -> int:
    with open(POOL.format(n=node, f="nr_hugepages"), "w") as f:
        f.write(str(pages))
    return int(open(POOL.format(n=node, f="nr_hugepages")).read())


def node_cpulists() -> dict:
    return {str(n): open(f"{NODE_SYS}/node{n}/cpulist").read().strip() for n in (0, 1)
            if os.path.exists(f"{NODE_SYS}/node{n}/cpulist")}


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError as e:
        return f"<{e}>"


def big_smaps(pid: int, min_kb: int = 1024) -> list[dict]:
    """Header + key fields of every mapping of >= min_kb in /proc/PID/smaps (for THP bytes)."""
    out, cur = [], None
    for line in _read(f"/proc/{pid}/smaps").splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+)\s", line)
        if m:
            cur = {"start": m.group(1), "kb": (int(m.group(2), 16) - int(m.group(1), 16)) // 1024,
                   "header": line}
            out.append(cur)
        elif cur is not None and ":" in line:
            k, _, v = line.partition(":")
            if k in ("Rss", "AnonHugePages", "KernelPageSize", "Private_Hugetlb", "THPeligible"):
                cur[k] = v.strip()
    return [v for v in out if v["kb"] >= min_kb]


def threads(pid: int) -> dict:
    """{tid: {"comm", "Cpus_allowed_list", "Mems_allowed_list"}} of every thread of pid."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        st = _read(f"/proc/{pid}/task/{tid}/status")
        d = {"comm": _read(f"/proc/{pid}/task/{tid}/comm").strip()}
        for line in st.splitlines():
            k, _, v = line.partition(":")
            if k in ("Cpus_allowed_list", "Mems_allowed_list", "State"):
                d[k] = v.strip()
        out[tid] = d
    return out


def observe(pid: int) -> dict:
    return {"pid": pid, "numa_maps": _read(f"/proc/{pid}/numa_maps"),
            "smaps": big_smaps(pid), "threads": threads(pid),
            "cmdline": _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()}


def dsd_processes() -> list[str]:
    """Command lines of every live dsd process in the guest (must be none after a stop)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        cmd = _read(f"/proc/{p}/cmdline").replace("\0", " ")
        if "dsd.cli" in cmd or "/dsd " in cmd:
            if _read(f"/proc/{p}/stat").split(")")[-1].split()[:1] != ["Z"]:
                out.append(f"{p}: {cmd.strip()}")
    return out


# -- running dsd ------------------------------------------------------------------------------------
def dsd(args: list[str], env: dict, timeout: float = 900) -> dict:
    t = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "dsd.cli", *args], env=env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -999, str(e.stdout or ""), f"TIMEOUT after {timeout}s\n{e.stderr or ''}"
    r = {"args": args, "rc": rc, "stdout": out, "stderr": err,
         "seconds": round(time.monotonic() - t, 2)}
    log(f"dsd {' '.join(args[:3])}... rc={rc} in {r['seconds']}s")
    return r


def daemon_env(instance: str) -> dict:
    env = dict(os.environ)
    env.update(DSD_SOCKET_DIR=f"{SOCK_DIR}/{instance}", DSD_INSTANCE=instance,
               DSD_LOG_FILE=f"{OUT_DIR}/{instance}.log",
               # "[cache] data saved" in the log = a numba function compiled in the guest
               NUMBA_DEBUG_CACHE="1")
    return env


def daemon_scenario(name: str, model: str, pages: str, spec: dict, ask: bool = True,
                    status_text: bool = False, extra: tuple = ()) -> dict:
    env = daemon_env(name)
    res: dict = {"model": model, "pages": pages, "pools_before": pools()}
    # The kernel's view of "did any worker take huge pages during start": a worker allocates
    # its whole buffer before reading a byte, so min free < nr on a node = a worker got that far.
    low = {n: p["free"] for n, p in res["pools_before"].items()}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            for n, p in pools().items():
                low[n] = min(low.get(n, p["free"]), p["free"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = dsd(["start", "--model", model, "--nodes", "2", "--pages", pages, *extra], env)
    done.set()
    sampler.join()
    res["start"] = start
    res["min_free_during_start"] = low
    try:
        if start["rc"] != 0:
            return res
        st = dsd(["status", "--json"], env, timeout=120)
        res["status_cli"] = st
        try:
            res["status"] = json.loads(st["stdout"])
        except ValueError:
            res["status"] = None
            return res
        res["pools_loaded"] = pools()
        res["after_ready"] = {str(w["index"]): observe(w["pid"]) for w in res["status"]["workers"]}
        res["coordinator"] = {"pid": res["status"]["pid"],
                              "threads": threads(res["status"]["pid"])}
        if status_text:
            res["status_text"] = dsd(["status"], env, timeout=120)
        if ask:
            res["answers"] = ask_daemon(name, model, spec, env)
            res["after_answer"] = {str(w["index"]): observe(w["pid"])
                                   for w in res["status"]["workers"]}
            from dsd.client import Client   # same dict as `dsd status --json`, no new process

            res["status_after"] = Client(socket_dir=env["DSD_SOCKET_DIR"], timeout=60).status()
    finally:
        res["stop"] = dsd(["stop", "--timeout", "30"], env, timeout=120)
        time.sleep(0.5)
        res["left_processes"] = dsd_processes()
        res["pools_after"] = pools()
        res["shm_left"] = [f for f in os.listdir("/dev/shm") if name in f]
    return res


def ask_daemon(name: str, model: str, spec: dict, env: dict) -> dict:
    """Greedy answers through the daemon: `dsd chat "..."` (CLI) and dsd.client.Client."""
    from dsd.client import Client

    c = Client(socket_dir=env["DSD_SOCKET_DIR"], timeout=600)
    out: dict = {}
    if model == spec["smollm2"]:
        q, n = spec["question"], spec["n_tokens"]
        out["chat_cli"] = dsd(["chat", q, "--temperature", "0", "--max-tokens", str(n)], env)
    else:
        out["client_ids"] = []
        for ids in spec["tiny_prompts"]:
            r = c.generate(ids, temperature=0, max_tokens=spec["n_tokens"], ignore_eos=True)
            out["client_ids"].append(r.token_ids)
    return out


REFERENCE = r"""
import json, sys
from dsd.shard.engine import Engine
from dsd.shard.sampling import SamplingParams
spec = json.loads(sys.argv[1])
out = {}
# SmolLM2: exactly what `dsd generate -c Q --temperature 0 -n N` runs
eng = Engine(spec["smollm2"])
ids = eng.encode_chat([{"role": "user", "content": spec["question"]}])
steps = list(eng.generate(ids, SamplingParams(temperature=0, max_tokens=spec["n_tokens"])))
out["smollm2"] = {"text": "".join(s.text for s in steps), "token_ids": [s.token for s in steps]}
del eng
eng = Engine(spec["tiny"])
p = SamplingParams(temperature=0, max_tokens=spec["n_tokens"], ignore_eos=True)
out["tiny"] = [[s.token for s in eng.generate(ids, p)] for ids in spec["tiny_prompts"]]
print(json.dumps(out))
"""


def reference(spec: dict) -> dict:
    t = time.monotonic()
    env = dict(os.environ, NUMBA_DEBUG_CACHE="1")
    p = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps(spec)], capture_output=True,
                       text=True, timeout=900, env=env)
    res = {"rc": p.returncode, "stderr": p.stderr[-20000:], "seconds": round(time.monotonic() - t, 2),
           "numba_compiled": p.stdout.count("data saved")}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    res["result"] = json.loads(lines[-1]) if lines else None
    log(f"reference rc={p.returncode} in {res['seconds']}s")
    return res


def doctor(spec: dict) -> dict:
    res = {"pools_before": pools()}
    res["run"] = dsd(["doctor", "--model", spec["smollm2"], "--nodes", "2", "--apply", "--json"],
                     dict(os.environ), timeout=600)
    try:
        res["report"] = json.loads(res["run"]["stdout"])
    except ValueError:
        res["report"] = None
    res["pools_after"] = pools()
    return res


def main(spec_path: str, out_path: str) -> int:
    spec = json.load(open(spec_path))
    results: dict = {"node_cpus": node_cpulists(), "timings": {}}

    def step(name: str, fn, *a, **kw) -> None:
        t = time.monotonic()
        log(f"--- {name}")
        try:
            results[name] = fn(*a, **kw)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            log(f"{name} raised:\n{results[name]['error']}")
        results["timings"][name] = round(time.monotonic() - t, 2)
        with open(out_path, "w") as f:  # after every step: a later hang keeps what we have
            json.dump(results, f, indent=1)

    step("doctor", doctor, spec)
    step("smollm2_2m", daemon_scenario, "smollm2_2m", spec["smollm2"], "2m", spec)
    step("tiny_2m", daemon_scenario, "tiny_2m", spec["tiny"], "2m", spec)
    # Node 1 loses its pool; node 0 keeps enough for both workers (so only node 1 is short)
    results["pool_node0_only"] = {"node1": set_pool(1, 0), "node0": pools()["0"]["nr"]}
    step("auto_node0", daemon_scenario, "auto_node0", spec["tiny"], "auto", spec, ask=False,
         status_text=True)
    step("strict_node0", daemon_scenario, "strict_node0", spec["tiny"], "2m", spec, ask=False)
    results["timings"]["total"] = now()
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return 0


def warm(spec_path: str, out_dir: str) -> int:
    """On the HOST, with NUMBA_CACHE_DIR/NUMBA_CPU_NAME=generic set as in the guest: run the
    same daemons and requests once so every numba function the guest needs is in the cache
    (same source paths, same signatures: rows-split experts are column-sliced arrays)."""
    global OUT_DIR, SOCK_DIR
    OUT_DIR = SOCK_DIR = out_dir
    spec = json.load(open(spec_path))
    tag = f"warm{os.getpid()}"
    res = {"reference": reference(spec)}
    for m in ("smollm2", "tiny"):
        res[m] = daemon_scenario(f"{tag}{m}", spec[m], "thp", spec)
    bad = {k: v.get("start", v).get("rc") for k, v in res.items()
           if v.get("start", v).get("rc") != 0}
    json.dump(res, open(os.path.join(out_dir, "warm.json"), "w"), indent=1)
    if bad:
        print(f"warm-up failed: {bad}; see {out_dir}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--warm":
        sys.exit(warm(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1], sys.argv[2]))
