"""The C yardsticks: llama.cpp's and ik_llama.cpp's own `llama-bench`, run on the same GGUF file
with the same threads and token counts as `dsd bench`, so speed claims are ratios measured in the
same run.

Prefill is a `-p P -n 0` test.  Decode is a `-p 0 -n N` test at context depth P (dsd decodes after
its P-token prompt): `-d P` on llama.cpp, `-gp P,N` on ik_llama.cpp (whose llama-bench has no
`-d`; a `-gp` test runs the P-token prompt untimed, then times the N generated tokens).  A binary
whose --help lists neither decodes from an empty context, and the result says so.

ik_llama.cpp (recognised by `-fmoe` / `--fused-moe` in its --help) runs with its best CPU flags:
`-fmoe 1 -rtr 1` (fused MoE, weights repacked at load), and for deepseek2 files also `-mla 3 -fa 1`
(MLA with flash attention).  The flags used are recorded in the result.  llama.cpp runs with its
defaults (it repacks weights at load by default).
"""
from __future__ import annotations

import json
import os
import re
import subprocess

from dsd.errors import DsdError

BUILD_HINT = "build it with `bash bench/build_yardsticks.sh [IK_LLAMA_GIT_DIR]`"
YARDSTICK_KINDS = ("llama.cpp", "ik_llama.cpp")


class YardstickError(DsdError):
    """A llama-bench binary is missing, unusable, failed, or printed something unparsable."""


def yardsticks_dir() -> str:
    """Where bench/build_yardsticks.sh puts the binaries (DSD_YARDSTICKS_DIR overrides)."""
    return os.environ.get("DSD_YARDSTICKS_DIR") or os.path.expanduser("~/.cache/dsd-yardsticks")


def default_yardsticks() -> list[str]:
    """The llama-bench binaries present at their default locations (llama.cpp first)."""
    found = []
    for kind in YARDSTICK_KINDS:
        path = os.path.join(yardsticks_dir(), kind, "llama-bench")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            found.append(path)
    return found


def _check_binary(binary: str) -> None:
    if not os.path.exists(binary):
        raise YardstickError(f"llama-bench binary {binary} does not exist; {BUILD_HINT}, "
                             "or pass --against PATH to a built llama-bench")
    if os.path.isdir(binary):
        raise YardstickError(f"{binary} is a directory; pass the llama-bench binary inside it "
                             f"(e.g. {os.path.join(binary, 'llama-bench')})")
    if not os.access(binary, os.X_OK):
        raise YardstickError(f"{binary} is not executable; `chmod +x {binary}` or rebuild it ({BUILD_HINT})")


def _run(argv: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    binary = argv[0]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except PermissionError as e:
        raise YardstickError(f"{binary} cannot be run ({e}); `chmod +x {binary}` or rebuild it ({BUILD_HINT})")
    except OSError as e:  # e.g. a file that is not an executable for this machine
        raise YardstickError(f"{binary} cannot be run ({e}); rebuild it for this machine ({BUILD_HINT})")
    except subprocess.TimeoutExpired:
        raise YardstickError(f"{binary} did not finish within {timeout:.0f} s ({' '.join(argv[1:])}); "
                             "pass fewer tokens or repetitions, or a larger timeout")


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


class Yardstick:
    """One llama-bench binary and what its --help says it supports."""

    def __init__(self, binary: str, timeout: float | None = None):
        binary = os.path.abspath(os.path.expanduser(binary))
        _check_binary(binary)
        self.binary = binary
        self.timeout = timeout
        r = _run([binary, "--help"], timeout=60)
        self.help_text = r.stdout + r.stderr
        if "-n-prompt" not in self.help_text and "-p," not in self.help_text:
            raise YardstickError(f"{binary} --help does not look like llama-bench's (exit {r.returncode}: "
                                 f"{_tail(self.help_text) or 'no output'}); pass the llama-bench binary")
        self.kind = "ik_llama.cpp" if self._lists("-fmoe", "--fused-moe") else "llama.cpp"
        if self._lists("-d", "--n-depth"):
            self.depth_method = "-d"
        elif self._lists("-gp"):
            self.depth_method = "-gp"
        else:
            self.depth_method = None

    def _lists(self, *flags: str) -> bool:
        """Whether --help lists one of these flags as an option (at a line start or after a comma)."""
        return any(re.search(rf"(^|\n|,)\s*{re.escape(f)}([\s,]|$)", self.help_text) for f in flags)

    def engine_flags(self, architecture: str) -> list[str]:
        """The engine-specific flags this yardstick runs with on a file of this architecture."""
        if self.kind != "ik_llama.cpp":
            return []
        flags = ["-fmoe", "1"]
        if self._lists("-rtr", "--run-time-repack"):
            # repack the weights at load into ik's interleaved CPU layouts, as llama.cpp does by
            # default (its JSON says "repack": true); without it ik decoded ds12 at half the speed
            flags += ["-rtr", "1"]
        if architecture == "deepseek2":
            flags += ["-mla", "3", "-fa", "1"]
        return flags

    def argvs(self, model: str, architecture: str, threads: int, prompt_tokens: int, decode_tokens: int,
              depth: int, repeat: int) -> dict[str, list[str]]:
        """The two llama-bench command lines: prefill and decode (at `depth` when supported)."""
        common = ["-m", model, "-t", str(threads), "-r", str(repeat), "-o", "json",
                  *self.engine_flags(architecture)]
        prefill = [self.binary, *common, "-p", str(prompt_tokens), "-n", "0"]
        if depth and self.depth_method == "-d":
            decode = [self.binary, *common, "-p", "0", "-n", str(decode_tokens), "-d", str(depth)]
        elif depth and self.depth_method == "-gp":
            decode = [self.binary, *common, "-p", "0", "-n", "0", "-gp", f"{depth},{decode_tokens}"]
        else:
            decode = [self.binary, *common, "-p", "0", "-n", str(decode_tokens)]
        return {"prefill": prefill, "decode": decode}

    def _bench(self, argv: list[str]) -> list[dict]:
        r = _run(argv, self.timeout)
        if r.returncode != 0:
            raise YardstickError(f"{self.binary} failed (exit {r.returncode}) on `{' '.join(argv[1:])}`: "
                                 f"{_tail(r.stderr or r.stdout) or 'no output'}; check the model file and "
                                 f"flags, or rebuild it ({BUILD_HINT})")
        start = r.stdout.find("[")
        try:
            tests = json.loads(r.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            tests = None
        if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
            raise YardstickError(f"{self.binary} printed no llama-bench JSON for `-o json` "
                                 f"(stdout began {r.stdout[:120]!r}); pass a llama-bench binary")
        return tests

    def _pick(self, tests: list[dict], n_gen: int, argv: list[str]) -> dict:
        """The test of this run (the prefill test has n_gen 0, the decode test n_gen N)."""
        for t in tests:
            if t.get("n_gen") == n_gen and isinstance(t.get("avg_ts"), (int, float)):
                return t
        raise YardstickError(f"{self.binary}'s JSON for `{' '.join(argv[1:])}` has no test with n_gen={n_gen} "
                             f"and a numeric avg_ts (got {[(t.get('n_prompt'), t.get('n_gen')) for t in tests]})")

    def run(self, model: str, threads: int, prompt_tokens: int, decode_tokens: int,
            depth: int | None = None, repeat: int = 3, architecture: str | None = None) -> dict:
        """Prefill and decode tok/s of this yardstick on `model` (depth defaults to prompt_tokens)."""
        if architecture is None:
            architecture = gguf_architecture(model)
        depth = prompt_tokens if depth is None else depth
        argvs = self.argvs(model, architecture, threads, prompt_tokens, decode_tokens, depth, repeat)
        pp = self._pick(self._bench(argvs["prefill"]), 0, argvs["prefill"])
        tg = self._pick(self._bench(argvs["decode"]), decode_tokens, argvs["decode"])
        commit = str(pp.get("build_commit") or tg.get("build_commit") or "unknown")
        if commit == "unknown":
            commit = sidecar_commit(self.binary) or commit
        depth_applied = bool(depth) and self.depth_method is not None
        if not depth:
            depth_note = "decode from an empty context (depth 0 asked)"
        elif depth_applied:
            depth_note = f"decode at depth {depth} ({self.depth_method})"
        else:
            depth_note = (f"depth NOT applied: {os.path.basename(self.binary)} --help lists neither -d nor -gp, "
                          f"so it decoded from an empty context while dsd decoded after {depth} tokens")
        return {
            "name": f"{self.kind}@{commit}",
            "kind": self.kind,
            "binary": self.binary,
            "build_commit": commit,
            "architecture": architecture,
            "engine_flags": self.engine_flags(architecture),
            "argv": argvs,
            "threads": threads,
            "prompt_tokens": int(pp.get("n_prompt", prompt_tokens)),
            "decode_tokens": int(tg.get("n_gen", decode_tokens)),
            "depth": depth if depth_applied else 0,
            "depth_applied": depth_applied,
            "depth_note": depth_note,
            "repeat": repeat,
            "prefill_tok_s": float(pp["avg_ts"]),
            "prefill_stddev_tok_s": float(pp.get("stddev_ts") or 0.0),
            "prefill_samples_tok_s": list(pp.get("samples_ts") or []),
            "decode_tok_s": float(tg["avg_ts"]),
            "decode_stddev_tok_s": float(tg.get("stddev_ts") or 0.0),
            "decode_samples_tok_s": list(tg.get("samples_ts") or []),
            "model_type": pp.get("model_type"),
            "cpu_info": pp.get("cpu_info"),
        }


def sidecar_commit(binary: str) -> str | None:
    """The commit in a BUILD_COMMIT file beside the binary.  bench/build_yardsticks.sh writes it:
    ik_llama.cpp built from an extracted tree (no .git) reports build_commit "unknown"."""
    try:
        with open(os.path.join(os.path.dirname(binary), "BUILD_COMMIT")) as f:
            commit = f.read().strip()
    except OSError:
        return None
    return commit[:7] or None  # git's short form, as llama.cpp reports its own


def gguf_architecture(path: str) -> str:
    """general.architecture of a GGUF file (the yardstick flags depend on it)."""
    from dsd.shard.gguf_file import open_gguf

    with open_gguf(path) as g:
        return g.architecture


def run_yardstick(binary: str, model: str, threads: int, prompt_tokens: int, decode_tokens: int,
                  depth: int | None = None, repeat: int = 3, timeout: float | None = None) -> dict:
    return Yardstick(binary, timeout=timeout).run(model, threads, prompt_tokens, decode_tokens, depth, repeat)


def compare(dsd_result: dict, yard: dict, read_gb_s: float | None = None) -> dict:
    """The yardstick's result with dsd/yardstick ratios, and its roofline fraction estimated with
    dsd's bytes per token (same file, same active weights; llama-bench does not count bytes)."""
    out = dict(yard,
               prefill_ratio=dsd_result["prefill_tok_s"] / yard["prefill_tok_s"],
               decode_ratio=dsd_result["decode_tok_s"] / yard["decode_tok_s"])
    if read_gb_s and dsd_result.get("bytes_per_token"):
        out["roofline_fraction"] = roofline_fraction(yard["decode_tok_s"], read_gb_s, dsd_result["bytes_per_token"])
    return out


def roofline_fraction(decode_tok_s: float, read_gb_s: float, bytes_per_token: float) -> float:
    """decode tok/s over the memory roofline (read bandwidth / bytes read per token)."""
    return decode_tok_s / (read_gb_s * 1e9 / bytes_per_token)


def describe(yard: dict) -> str:
    """One line: the yardstick's speeds, how it was run."""
    flags = " ".join(yard["engine_flags"]) or "defaults"
    return (f"prefill {yard['prefill_tok_s']:.1f} ± {yard['prefill_stddev_tok_s']:.1f} tok/s, "
            f"decode {yard['decode_tok_s']:.1f} ± {yard['decode_stddev_tok_s']:.1f} tok/s; "
            f"{yard['depth_note']}; llama-bench -r {yard['repeat']} -t {yard['threads']}, flags: {flags}")
