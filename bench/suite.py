"""The benchmark suite behind BENCHMARKS.md's main table: `python -m bench` (from the repo root).

For each model it runs `dsd bench --json --against Y...` in a subprocess: dsd's prefill and
decode (decode after the prompt), its bytes per token and the read bandwidth, then each C
yardstick (llama.cpp's / ik_llama.cpp's llama-bench) with the same threads, token counts and
depth, all in one run.  It writes a markdown table (also printed), the JSON of every run and a
PNG of the comparison.

Models: the default SmolLM2-135M-Instruct Q4_1 (pp512 / tg128) and a DeepSeek-shaped synthetic
file, `dsd synth OUT --layers 12 --q-lora 1536` (pp256 / tg64), written once under
~/.cache/dsd-bench/ and reused (`--ds12 PATH` takes an existing one).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass

CACHE_DIR = os.path.expanduser("~/.cache/dsd-bench")
DS12_SYNTH_FLAGS = ["--layers", "12", "--q-lora", "1536"]


@dataclass(frozen=True)
class SuiteModel:
    key: str            # --only name
    label: str          # table / plot label
    prompt_tokens: int
    decode_tokens: int


MODELS = (
    SuiteModel("smollm2", "SmolLM2-135M-Instruct Q4_1", 512, 128),
    SuiteModel("ds12", "ds12: DeepSeek-shaped synthetic, 12 layers, q-lora 1536 (Q4_K / Q8_0)", 256, 64),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", "-t", type=int, default=2, help="threads for dsd and the yardsticks (default 2)")
    p.add_argument("--repeat", "-r", type=int, default=3, help="llama-bench repetitions per test (default 3)")
    p.add_argument("--against", action="append", default=None, metavar="LLAMA_BENCH",
                   help="a llama-bench binary (repeatable; default: those built by bench/build_yardsticks.sh "
                        "under ~/.cache/dsd-yardsticks)")
    p.add_argument("--ds12", default=None, metavar="PATH",
                   help=f"the DeepSeek-shaped file (default: {CACHE_DIR}/ds12.gguf, written by "
                        f"`dsd synth ... {' '.join(DS12_SYNTH_FLAGS)}` if missing)")
    p.add_argument("--smollm2", default=None, metavar="PATH", help="the SmolLM2 file (default: dsd's default model)")
    p.add_argument("--only", action="append", choices=[m.key for m in MODELS], help="run only these models")
    p.add_argument("--out", default=os.path.join(CACHE_DIR, "suite"),
                   help="folder for suite.md, suite.json and suite.png (default ~/.cache/dsd-bench/suite)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--from-json", metavar="FILE", help="redraw the table and plot of an earlier suite.json; run nothing")
    return p.parse_args(argv)


def dsd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsd.cli", *args]


def ensure_ds12(path: str | None) -> str:
    """The DeepSeek-shaped benchmark file: the given one, or the cached synthetic file (written
    once, through a temporary name so an interrupted write is never reused)."""
    from dsd.errors import DsdError

    if path:
        if not os.path.isfile(path):
            raise DsdError(f"--ds12 {path} does not exist; write it with "
                           f"`dsd synth {path} {' '.join(DS12_SYNTH_FLAGS)}` or drop --ds12")
        return path
    path = os.path.join(CACHE_DIR, "ds12.gguf")
    if not os.path.isfile(path):
        os.makedirs(CACHE_DIR, exist_ok=True)
        partial = path + ".partial"
        print(f"writing {path} (4.5 GiB, ~30 s): dsd synth {' '.join(DS12_SYNTH_FLAGS)}", file=sys.stderr)
        r = subprocess.run(dsd_command("synth", partial, *DS12_SYNTH_FLAGS, "--force"))
        if r.returncode != 0:
            raise DsdError(f"dsd synth failed writing {partial} (exit {r.returncode}); see its message above")
        os.replace(partial, path)
    return path


def shape_note(path: str) -> str | None:
    """A warning when a --ds12 file is not shaped as the suite's (other layer count / q-lora)."""
    from dsd.shard.gguf_file import open_gguf

    with open_gguf(path) as g:
        layers, q_lora = g.get("deepseek2.block_count"), g.get("deepseek2.attention.q_lora_rank")
    if (layers, q_lora) != (12, 1536):
        return f"{path} has {layers} layers and q-lora {q_lora}, not the suite's 12 and 1536"
    return None


def run_model(model: SuiteModel, path: str, args, yardsticks: list[str]) -> dict:
    argv = ["bench", "--model", path, "--threads", str(args.threads), "--prompt-tokens", str(model.prompt_tokens),
            "--decode-tokens", str(model.decode_tokens), "--repeat", str(args.repeat), "--json"]
    for y in yardsticks:
        argv += ["--against", y]
    print(f"[{model.key}] dsd {' '.join(argv)}", file=sys.stderr, flush=True)
    r = subprocess.run(dsd_command(*argv), capture_output=True, text=True)
    if r.returncode != 0:
        from dsd.errors import DsdError
        raise DsdError(f"`dsd {' '.join(argv)}` failed (exit {r.returncode}): {r.stderr.strip()[-600:]}")
    return {"key": model.key, "label": model.label, "path": path, "command": "dsd " + " ".join(argv),
            "result": json.loads(r.stdout)}


def host_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "load_average": list(os.getloadavg())}


# -- output -----------------------------------------------------------------------------------------

def _kind(name: str) -> str:
    return name.split("@", 1)[0]


def yardstick_names(suite: dict) -> list[str]:
    names: list[str] = []
    for m in suite["models"]:
        for y in m["result"].get("yardsticks", ()):
            if y["name"] not in names:
                names.append(y["name"])
    return names


NOISY = 0.15  # relative standard deviation of a yardstick's repetitions that marks its cell


def _noisy_mark(y: dict, phase: str) -> str:
    return " †" if y[phase + "_stddev_tok_s"] > NOISY * y[phase + "_tok_s"] else ""


def markdown(suite: dict) -> str:
    names = yardstick_names(suite)
    lines = [f"Suite run {suite['date']}, {suite['threads']} threads, llama-bench -r {suite['repeat']}; "
             f"{suite['host']['cpu']}, {suite['host']['cpus']} CPUs, load average at start "
             f"{suite['host']['load_average'][0]:.2f}"
             + (f", at the end {suite['host']['load_average_end'][0]:.2f}" if "load_average_end" in suite["host"] else "")
             + ".", ""]
    head = ["model", "test", "dsd"] + names + [f"dsd / {_kind(n)}" for n in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in suite["models"]:
        res = m["result"]
        ys = {y["name"]: y for y in res.get("yardsticks", ())}
        p, n = res["prompt_tokens"], res["decode_tokens"]
        for phase, test in (("prefill", f"prefill pp{p}"), ("decode", f"decode tg{n} @ depth {p}")):
            row = [m["label"].split(":")[0], test, f"**{res[phase + '_tok_s']:.1f}**"]
            for name in names:
                y = ys.get(name)
                row.append(f"{y[phase + '_tok_s']:.1f} ± {y[phase + '_stddev_tok_s']:.1f}{_noisy_mark(y, phase)}"
                           if y else "—")
            for name in names:
                y = ys.get(name)
                row.append(f"**{y[phase + '_ratio']:.2f}×**" if y else "—")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "tok/s; yardsticks: mean ± standard deviation over the repetitions; dsd: one timed run "
              "(prefill: the second prompt; decode: the tokens after the prompt)."]
    noisy = [(m, y, phase) for m in suite["models"] for y in m["result"].get("yardsticks", ())
             for phase in ("prefill", "decode") if _noisy_mark(y, phase)]
    if noisy:
        lines.append(f"† repetitions differed by more than {100 * NOISY:.0f}% (the host was busy; re-run): " + "; ".join(
            f"{m['label'].split(':')[0]} {y['name']} {phase} samples "
            + ", ".join(f"{v:.1f}" for v in y[phase + "_samples_tok_s"]) for m, y, phase in noisy) + ".")
    lines.append("")
    head = ["model", "weights read / token (dsd)", "read bandwidth", "roofline", "dsd decode"] + \
        [f"{_kind(n)} decode" for n in names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in suite["models"]:
        res = m["result"]
        ys = {y["name"]: y for y in res.get("yardsticks", ())}
        row = [m["label"].split(":")[0], f"{res['bytes_per_token'] / 1e6:.1f} MB", f"{res['read_gb_s']:.1f} GB/s",
               f"{res['roofline_tok_s']:.0f} tok/s", f"{100 * res['roofline_fraction']:.0f}%"]
        row += [f"{100 * ys[n]['roofline_fraction']:.0f}%" if n in ys else "—" for n in names]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Roofline = read bandwidth / weight bytes read per decoded token (dsd counts them; the "
              "yardsticks' fractions use dsd's count for the same file).", ""]
    for m in suite["models"]:
        lines.append(f"- {m['label']}: `{m['command']}`")
        for y in m["result"].get("yardsticks", ()):
            flags = " ".join(y["engine_flags"]) or "its defaults"
            lines.append(f"  - {y['name']} ({y['binary']}): flags {flags}; {y['depth_note']}")
        if m.get("note"):
            lines.append(f"  - note: {m['note']}")
    return "\n".join(lines) + "\n"


ENGINE_COLOURS = {"dsd": "#1f77b4", "llama.cpp": "#ff7f0e", "ik_llama.cpp": "#2ca02c"}


def plot(suite: dict, png: str) -> None:
    """Grouped bars: one panel per (model, prefill / decode), one bar per engine, labelled with
    tok/s and dsd's ratio to it."""
    try:
        import matplotlib
    except ImportError:
        from dsd.errors import DsdError
        raise DsdError("the suite's plot needs matplotlib: `pip install matplotlib` (or pip install -e '.[bench]'), "
                       "or pass --no-plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = suite["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for row, m in zip(axes, models):
        res = m["result"]
        ys = res.get("yardsticks", [])
        for ax, phase in zip(row, ("prefill", "decode")):
            names = ["dsd"] + [y["name"] for y in ys]
            values = [res[phase + "_tok_s"]] + [y[phase + "_tok_s"] for y in ys]
            errors = [0.0] + [y[phase + "_stddev_tok_s"] for y in ys]
            colours = [ENGINE_COLOURS.get(_kind(n), "#7f7f7f") for n in names]
            bars = ax.bar(range(len(names)), values, yerr=errors, color=colours, capsize=3)
            top = max(values) * 1.25
            for i, (bar, v, err) in enumerate(zip(bars, values, errors)):
                text = f"{v:.0f}" if v >= 100 else f"{v:.1f}"
                if i:
                    text += f"\ndsd/it {ys[i - 1][phase + '_ratio']:.2f}×"
                ax.text(bar.get_x() + bar.get_width() / 2, v + err + top * 0.02, text,
                        ha="center", va="bottom", fontsize=9)
            ax.set_ylim(0, top * 1.1)
            ax.set_xticks(range(len(names)), [n.replace("@", "\n@") for n in names], fontsize=9)
            p, n = res["prompt_tokens"], res["decode_tokens"]
            title = f"{m['label'].split(':')[0]}: prefill pp{p}"
            if phase == "decode":  # the memory roofline is far above the bars on these models: say it
                title = (f"{m['label'].split(':')[0]}: decode tg{n} at depth {p}\nroofline "
                         f"{res['roofline_tok_s']:.0f} tok/s ({res['bytes_per_token'] / 1e6:.0f} MB/token "
                         f"at {res['read_gb_s']:.0f} GB/s)")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("tok/s")
    fig.suptitle(f"dsd vs the C yardsticks (llama-bench), {suite['threads']} threads, {suite['date']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_outputs(suite: dict, out: str, want_plot: bool) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"md": os.path.join(out, "suite.md"), "json": os.path.join(out, "suite.json")}
    table = markdown(suite)
    with open(paths["md"], "w") as f:
        f.write(table)
    with open(paths["json"], "w") as f:
        json.dump(suite, f, indent=2)
    if want_plot:
        paths["png"] = os.path.join(out, "suite.png")
        plot(suite, paths["png"])
    print(table)
    return paths


def main(argv: list[str] | None = None) -> int:
    import dsd  # noqa: F401  (before numpy: OpenBLAS thread setting)
    from dsd.errors import DsdError
    from dsd.shard.yardstick import Yardstick, default_yardsticks

    args = parse_args(argv)
    try:
        if args.from_json:
            with open(args.from_json) as f:
                suite = json.load(f)
        else:
            if not args.no_plot:  # fail now, not after half an hour of benchmarks
                try:
                    import matplotlib  # noqa: F401
                except ImportError:
                    raise DsdError("the suite's plot needs matplotlib: `pip install matplotlib` (or "
                                   "pip install -e '.[bench]'), or pass --no-plot")
            yardsticks = args.against if args.against is not None else default_yardsticks()
            if not yardsticks:
                print("no yardsticks found under ~/.cache/dsd-yardsticks: build them with "
                      "`bash bench/build_yardsticks.sh [IK_LLAMA_GIT_DIR]` or pass --against; "
                      "running dsd alone", file=sys.stderr)
            for y in yardsticks:
                Yardstick(y)  # exists, runs, is llama-bench
            suite = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "threads": args.threads, "repeat": args.repeat, "host": host_info(), "models": []}
            from dsd.shard.model_path import resolve_model
            for model in MODELS:
                if args.only and model.key not in args.only:
                    continue
                path = resolve_model(args.smollm2) if model.key == "smollm2" else ensure_ds12(args.ds12)
                entry = run_model(model, path, args, yardsticks)
                if model.key == "ds12":
                    entry["note"] = shape_note(path)
                suite["models"].append(entry)
            suite["host"]["load_average_end"] = list(os.getloadavg())
        paths = write_outputs(suite, args.out, not args.no_plot)
    except DsdError as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0
