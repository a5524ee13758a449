"""The C yardsticks (shard/yardstick.py, `dsd bench --against`) against a fake llama-bench: a small
Python script that prints llama.cpp's or ik_llama.cpp's --help, emits llama-bench JSON for
`-o json` and records each command line it was given.  CI never compiles llama.cpp."""
import json
import os
import stat
import sys

import pytest

from dsd.errors import DsdError
from dsd.shard import yardstick
from tests.tiny_llama import write_tiny_llama
from tests.tiny_moe import write_tiny_deepseek2

PREFILL_TS, DECODE_TS = 200.0, 40.0

LLAMA_CPP_HELP = """usage: llama-bench [options]
  -p, --n-prompt <n>                                (default: 512)
  -n, --n-gen <n>                                   (default: 128)
  -pg <pp,tg>                                       (default: )
{depth}  -t, --threads <n>                                 (default: 2)
  -fa, --flash-attn <on|off|auto>                   (default: auto)
  -r, --repetitions <n>                             (default: 5)
  -o, --output <csv|json|jsonl|md|sql>              (default: md)
"""
IK_HELP = """usage: llama-bench [options]
  -p, --n-prompt <n>                  (default: 512)
  -n, --n-gen <n>                     (default: 128)
  -gp <pp,tg>                         (default: )
  -t, --threads <n>                   (default: 2)
  -defer, --defer-experts             (default: 0)
  -fa, --flash-attn <0|1>             (default: 1)
  -mla, --mla-use <0|1|2>             (default: 3)
  -rtr, --run-time-repack <0|1>       (default: 0)
  -fmoe, --fused-moe <0|1>            (default: 1)
"""

FAKE = r'''#!{python}
import json, sys
argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(argv) + "\n")
if "--help" in argv:
    print({help!r}); sys.exit(0)
if {fail!r}:
    print("llama_model_load: error loading model: tensor 'blk.0' has wrong shape", file=sys.stderr); sys.exit(1)
if {garbage!r}:
    print("| model | size | test | t/s |"); sys.exit(0)
def opt(flag, default):
    return argv[argv.index(flag) + 1] if flag in argv else default
p, n = int(opt("-p", "512")), int(opt("-n", "128"))
base = {{"build_commit": {commit!r}, "model_type": "fake", "n_threads": int(opt("-t", "2")),
        "stddev_ts": 1.5, "samples_ts": [1.0, 2.0]}}
tests = []
if p:
    tests.append(dict(base, n_prompt=p, n_gen=0, avg_ts={prefill}))
if n:
    tests.append(dict(base, n_prompt=0, n_gen=n, n_depth=int(opt("-d", "0")), avg_ts={decode}))
if "-gp" in argv:
    pp, tg = map(int, opt("-gp", "").split(","))
    tests.append(dict(base, n_prompt=pp, n_gen=tg, test="tg%d@pp%d" % (tg, pp), avg_ts={decode}))
print("build: fake (stderr noise)", file=sys.stderr)
print(json.dumps(tests, indent=2))
'''


def fake_llama_bench(tmp_path, *, ik=False, depth=True, fail=False, garbage=False, commit="abc1234",
                     name="llama-bench"):
    """Write the fake binary; returns (path, calls()) where calls() lists the recorded argvs."""
    folder = tmp_path / ("ik" if ik else "lc") / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = str(tmp_path / f"argv-{'ik' if ik else 'lc'}.jsonl")
    help_text = IK_HELP if ik else LLAMA_CPP_HELP.format(
        depth="  -d, --n-depth <n>                                 (default: 0)\n" if depth else "")
    folder.write_text(FAKE.format(python=sys.executable, log=log, help=help_text, fail=fail, garbage=garbage,
                                  commit=commit, prefill=PREFILL_TS, decode=DECODE_TS))
    folder.chmod(folder.stat().st_mode | stat.S_IXUSR)

    def calls():
        with open(log) as f:
            return [c for c in map(json.loads, f) if "--help" not in c]
    return str(folder), calls


def opt(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.fixture
def llama_file(tmp_path):
    return write_tiny_llama(tmp_path / "tiny.gguf", n_layers=1)


@pytest.fixture
def deepseek_file(tmp_path):
    return write_tiny_deepseek2(tmp_path / "ds.gguf", n_layers=2)


def test_llama_cpp_prefill_and_decode_at_depth(tmp_path, llama_file):
    binary, calls = fake_llama_bench(tmp_path)
    res = yardstick.run_yardstick(binary, llama_file, threads=3, prompt_tokens=32, decode_tokens=8, repeat=4)
    prefill, decode = calls()
    for argv in (prefill, decode):
        assert opt(argv, "-m") == llama_file and opt(argv, "-t") == "3" and opt(argv, "-r") == "4"
        assert opt(argv, "-o") == "json" and "-fmoe" not in argv and "-mla" not in argv and "-rtr" not in argv
    assert (opt(prefill, "-p"), opt(prefill, "-n"), opt(prefill, "-d")) == ("32", "0", None)
    assert (opt(decode, "-p"), opt(decode, "-n"), opt(decode, "-d")) == ("0", "8", "32")
    assert res["kind"] == "llama.cpp" and res["name"] == "llama.cpp@abc1234"
    assert res["prefill_tok_s"] == PREFILL_TS and res["decode_tok_s"] == DECODE_TS
    assert res["prefill_stddev_tok_s"] == 1.5 and res["decode_samples_tok_s"] == [1.0, 2.0]
    assert res["depth_applied"] and res["depth"] == 32 and res["engine_flags"] == []
    assert res["argv"]["decode"][1:] == decode


def test_depth_flag_only_when_help_lists_it(tmp_path, llama_file):
    binary, calls = fake_llama_bench(tmp_path, depth=False)
    res = yardstick.run_yardstick(binary, llama_file, threads=2, prompt_tokens=16, decode_tokens=4)
    decode = calls()[1]
    assert "-d" not in decode and "-gp" not in decode and opt(decode, "-n") == "4"
    assert not res["depth_applied"] and res["depth"] == 0 and "NOT applied" in res["depth_note"]


def test_ik_flags_for_deepseek2_files_only(tmp_path, llama_file, deepseek_file):
    binary, calls = fake_llama_bench(tmp_path, ik=True)
    res = yardstick.run_yardstick(binary, deepseek_file, threads=2, prompt_tokens=24, decode_tokens=6)
    assert res["kind"] == "ik_llama.cpp" and res["architecture"] == "deepseek2"
    assert res["engine_flags"] == ["-fmoe", "1", "-rtr", "1", "-mla", "3", "-fa", "1"]
    prefill, decode = calls()
    for argv in (prefill, decode):
        assert (opt(argv, "-fmoe"), opt(argv, "-rtr"), opt(argv, "-mla"), opt(argv, "-fa")) == ("1", "1", "3", "1")
    # ik's llama-bench has no -d: the decode test is -gp (prompt untimed, then the timed tokens)
    assert opt(decode, "-gp") == "24,6" and opt(decode, "-n") == "0" and "-d" not in decode
    assert res["depth_applied"] and res["decode_tok_s"] == DECODE_TS and res["decode_tokens"] == 6

    res = yardstick.run_yardstick(binary, llama_file, threads=2, prompt_tokens=24, decode_tokens=6)
    assert res["engine_flags"] == ["-fmoe", "1", "-rtr", "1"]
    for argv in calls()[2:]:
        assert opt(argv, "-fmoe") == "1" and "-mla" not in argv and "-fa" not in argv


def test_llama_cpp_gets_no_ik_flags_on_deepseek2(tmp_path, deepseek_file):
    binary, calls = fake_llama_bench(tmp_path)
    res = yardstick.run_yardstick(binary, deepseek_file, threads=2, prompt_tokens=8, decode_tokens=2)
    assert res["engine_flags"] == [] and all("-mla" not in a and "-fmoe" not in a for a in calls())


def test_unknown_build_commit_read_from_sidecar(tmp_path, llama_file):
    binary, _ = fake_llama_bench(tmp_path, ik=True, commit="unknown")
    assert yardstick.run_yardstick(binary, llama_file, 2, 8, 2)["name"] == "ik_llama.cpp@unknown"
    with open(os.path.join(os.path.dirname(binary), "BUILD_COMMIT"), "w") as f:
        f.write("8337e4cd3861406fc04e0854b1409cd1b027fbc9\n")
    assert yardstick.run_yardstick(binary, llama_file, 2, 8, 2)["name"] == "ik_llama.cpp@8337e4c"


def test_missing_and_unexecutable_binaries_are_user_errors(tmp_path):
    missing = str(tmp_path / "nowhere" / "llama-bench")
    with pytest.raises(DsdError, match="does not exist") as e:
        yardstick.Yardstick(missing)
    assert missing in str(e.value) and "bench/build_yardsticks.sh" in str(e.value)
    plain = tmp_path / "llama-bench"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(DsdError, match=r"not executable; `chmod \+x"):
        yardstick.Yardstick(str(plain))
    with pytest.raises(DsdError, match="is a directory"):
        yardstick.Yardstick(str(tmp_path))


def test_failing_and_garbled_runs_are_user_errors(tmp_path, llama_file):
    binary, _ = fake_llama_bench(tmp_path, fail=True)
    with pytest.raises(DsdError) as e:
        yardstick.run_yardstick(binary, llama_file, 2, 8, 2)
    msg = str(e.value)
    assert binary in msg and "exit 1" in msg and "wrong shape" in msg and "build_yardsticks.sh" in msg
    binary, _ = fake_llama_bench(tmp_path, garbage=True, name="other-bench")
    with pytest.raises(DsdError, match="printed no llama-bench JSON") as e:
        yardstick.run_yardstick(binary, llama_file, 2, 8, 2)
    assert binary in str(e.value)
    not_bench = tmp_path / "true-ish"
    not_bench.write_text("#!/bin/sh\necho hello\n")
    not_bench.chmod(0o755)
    with pytest.raises(DsdError, match="does not look like llama-bench"):
        yardstick.Yardstick(str(not_bench))


# -- dsd bench --against: dsd's own run is replaced by fixed figures ------------------------------

DSD_FIGURES = {"prefill_tok_s": 300.0, "prefill_first_tok_s": 250.0, "decode_tok_s": 30.0,
               "decode_ms_per_token": 1000 / 30, "bytes_per_token": 1e8, "effective_gb_s": 3.0}
READ_GB_S = 50.0


@pytest.fixture
def fake_dsd_run(monkeypatch, llama_file):
    """Engine and bench_engine stubs: records the Engine construction, returns DSD_FIGURES."""
    from dsd.shard import bench, engine

    built = []

    class FakeEngine:
        weight_pages = "fake"

        def __init__(self, model_path=None, threads=None, **options):
            built.append((model_path, threads))
            self.path, self.threads = llama_file, threads or 2

    def fake_bench_engine(eng, prompt_tokens, decode_tokens):
        return dict(DSD_FIGURES, model=eng.path, threads=eng.threads, prompt_tokens=prompt_tokens,
                    decode_tokens=decode_tokens)

    monkeypatch.setattr(engine, "Engine", FakeEngine)
    monkeypatch.setattr(bench, "bench_engine", fake_bench_engine)
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda: READ_GB_S)
    return built


def dsd_bench(*argv):
    from dsd.cli import main
    return main(["bench", *argv])


def test_bench_against_reports_ratios(tmp_path, capsys, fake_dsd_run, llama_file):
    lc, lc_calls = fake_llama_bench(tmp_path)
    ik, ik_calls = fake_llama_bench(tmp_path, ik=True, commit="def5678")
    assert dsd_bench("--model", llama_file, "--threads", "3", "--prompt-tokens", "40", "--decode-tokens", "10",
                     "--against", lc, "--against", ik, "--repeat", "2", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    ys = res["yardsticks"]
    assert [y["name"] for y in ys] == ["llama.cpp@abc1234", "ik_llama.cpp@def5678"]
    for y in ys:
        assert y["prefill_ratio"] == pytest.approx(300.0 / PREFILL_TS)
        assert y["decode_ratio"] == pytest.approx(30.0 / DECODE_TS)
        # the yardstick's roofline uses dsd's bytes per token: 40 tok/s / (50 GB/s / 100 MB)
        assert y["roofline_fraction"] == pytest.approx(DECODE_TS / (READ_GB_S * 1e9 / 1e8))
    # same threads, token counts and depth as dsd's run
    pp, tg = lc_calls()
    assert (opt(pp, "-t"), opt(pp, "-p"), opt(pp, "-r")) == ("3", "40", "2")
    assert (opt(tg, "-n"), opt(tg, "-d")) == ("10", "40")
    assert opt(ik_calls()[1], "-gp") == "40,10"

    assert dsd_bench("--model", llama_file, "--prompt-tokens", "40", "--decode-tokens", "10", "--against", lc) == 0
    out = capsys.readouterr().out
    assert "llama.cpp@abc1234: prefill 200.0" in out and "prefill 1.50x, decode 0.75x" in out


def test_bench_against_checks_binaries_before_running_dsd(tmp_path, capsys, fake_dsd_run, llama_file):
    missing = str(tmp_path / "no-such-llama-bench")
    assert dsd_bench("--model", llama_file, "--against", missing) == 1
    err = capsys.readouterr().err
    assert missing in err and "does not exist" in err and "Traceback" not in err
    assert fake_dsd_run == []  # dsd's (minutes-long) run never started



def test_suite_runs_dsd_bench_against_and_tabulates_ratios(tmp_path, llama_file):
    """bench/suite.py end to end on a tiny model (real `dsd bench`, fake llama-bench): the table
    holds dsd's ratios to the yardstick and each yardstick's flags; the plot is a PNG."""
    import argparse
    from bench import suite

    binary, calls = fake_llama_bench(tmp_path, ik=True)
    model = suite.SuiteModel("tiny", "tiny llama: a test model", 8, 2)
    entry = suite.run_model(model, llama_file, argparse.Namespace(threads=2, repeat=1), [binary])
    pp, tg = calls()
    assert opt(pp, "-p") == "8" and opt(tg, "-gp") == "8,2" and opt(pp, "-r") == "1"
    run = {"date": "today", "threads": 2, "repeat": 1, "host": {"cpu": "test", "cpus": 2, "load_average": [0.0] * 3},
           "models": [entry]}
    table = suite.markdown(run)
    res = entry["result"]
    assert f"**{res['prefill_tok_s'] / PREFILL_TS:.2f}×**" in table
    assert f"**{res['decode_tok_s'] / DECODE_TS:.2f}×**" in table
    assert "ik_llama.cpp@abc1234" in table and "decode tg2 @ depth 8" in table and "flags -fmoe 1 -rtr 1" in table
    pytest.importorskip("matplotlib")
    png = tmp_path / "suite.png"
    suite.plot(run, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
