"""Run a script inside a real Linux kernel with two NUMA nodes (qemu TCG).

The guest sees the host's whole filesystem read-only (so this machine's Python,
the /work checkout with its editable `dsd` install and all libraries are at the
same paths), a per-run read-write directory at /tmp/dsdvm and a persistent
read-write numba cache.  See tests/numa_vm/README.md for the API and the recipe.

Prerequisites come from `.ci/setup-vm.sh` (qemu-system-x86, busybox-static and an
unpacked Debian kernel in DSD_VM_CACHE, default /var/cache/dsd-vm).
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import lzma
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsd.errors import DsdError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("DSD_VM_CACHE", "/var/cache/dsd-vm"))
GUEST_RUN_DIR = "/tmp/dsdvm"          # the per-run read-write share inside the guest
NUMBA_CACHE = CACHE / "numba"         # same path on host and guest
# Load order matters: each module depends on the ones before it.
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p"]
# Carried from the host into the guest when set (they keep old OpenBLAS builds from
# crashing on this CPU family).
PASS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
SETUP_HINT = "run `bash .ci/setup-vm.sh` (as root) to install qemu, busybox and the kernel"


class VMError(DsdError):
    """The VM could not run the script (missing tools, boot failure, timeout)."""


class VMSetupError(VMError):
    pass


class VMTimeoutError(VMError):
    pass


class VMBootError(VMError):
    pass


@dataclasses.dataclass
class VMResult:
    returncode: int
    stdout: str
    stderr: str
    console: str                    # serial console: kernel log + init messages
    timings: dict[str, float]       # guest uptime (s) at init / start / end; host wall "total"
    files: dict[str, bytes]         # files the script left in /tmp/dsdvm/out/ (name -> bytes)

    def check(self) -> "VMResult":
        """Raise AssertionError with all output unless the script exited 0."""
        if self.returncode != 0:
            raise AssertionError(
                f"guest script exited {self.returncode}\n--- stdout\n{self.stdout}\n"
                f"--- stderr\n{self.stderr}\n--- console tail\n{self.console[-3000:]}")
        return self


def _kernel() -> tuple[Path, Path]:
    """(vmlinuz, /lib/modules/<version>) of the unpacked Debian kernel."""
    ready = CACHE / "kernel" / "READY"
    if not ready.is_file():
        raise VMSetupError(f"no unpacked kernel in {CACHE}/kernel: {SETUP_HINT}")
    vmlinuz = Path(ready.read_text().strip())
    mods = sorted((CACHE / "kernel" / "root" / "lib" / "modules").glob("*"))
    if not vmlinuz.is_file() or not mods:
        raise VMSetupError(f"kernel in {CACHE}/kernel is incomplete: {SETUP_HINT}")
    return vmlinuz, mods[-1]


def _pvh_kernel(vmlinuz: Path) -> Path:
    """The uncompressed ELF vmlinux inside an xz bzImage, cached next to the kernel.

    qemu boots an ELF vmlinux through its PVH entry point (Debian sets CONFIG_PVH), which
    skips the in-guest xz decompression: that took ~7 s per boot under TCG. Falls back
    to the bzImage when it holds no xz stream or the result is not an ELF file.
    """
    out = CACHE / "kernel" / f"vmlinux-pvh-{vmlinuz.name}"
    if out.is_file():
        return out
    data = vmlinuz.read_bytes()
    off = data.find(b"\xfd7zXZ\x00")
    if off < 0:
        return vmlinuz
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[off:])
    except lzma.LZMAError:
        return vmlinuz
    if elf[:4] != b"\x7fELF":
        return vmlinuz
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return out


def _tools() -> tuple[str, str]:
    qemu = shutil.which("qemu-system-x86_64")
    busybox = "/bin/busybox"
    if qemu is None:
        raise VMSetupError(f"qemu-system-x86_64 not found: {SETUP_HINT}")
    if not os.access(busybox, os.X_OK):
        raise VMSetupError(f"{busybox} (busybox-static) not found: {SETUP_HINT}")
    with open(busybox, "rb") as f:
        head = f.read(1 << 16)
    if b"ld-linux" in head:     # the initramfs has no libc: busybox must be static
        raise VMSetupError(f"{busybox} is dynamically linked (package busybox, not "
                           f"busybox-static): {SETUP_HINT}")
    return qemu, busybox


def _initramfs(busybox: str, moddir: Path) -> Path:
    """Build (once, cached by content) the initramfs: busybox, /init, the 10 modules."""
    init = (HERE / "init.sh").read_bytes()
    bb = Path(busybox).read_bytes()
    found = {}
    for m in MODULES:
        hits = list(moddir.rglob(f"{m}.ko*"))
        if not hits:
            raise VMSetupError(f"kernel module {m} missing under {moddir}: {SETUP_HINT}")
        found[m] = hits[0]
    h = hashlib.sha256(init + hashlib.sha256(bb).digest() + str(moddir).encode()).hexdigest()[:16]
    out = CACHE / f"initramfs-{h}.cpio"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="dsdvm-initrd-") as td:
        root = Path(td) / "root"
        (root / "bin").mkdir(parents=True)
        (root / "lib" / "modules").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "init").write_bytes(init)
        (root / "init").chmod(0o755)
        for m, src in found.items():
            data = src.read_bytes()
            if src.name.endswith(".xz"):      # busybox insmod cannot decompress
                data = lzma.decompress(data)
            elif src.name.endswith(".zst"):
                data = subprocess.run(["zstd", "-dc", str(src)], check=True,
                                      capture_output=True).stdout
            (root / "lib" / "modules" / f"{m}.ko").write_bytes(data)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        tmp = Path(td) / "initrd.cpio"
        with open(tmp, "wb") as f:
            subprocess.run([busybox, "cpio", "-o", "-H", "newc"], cwd=root, check=True,
                           input=("\n".join(names) + "\n").encode(), stdout=f,
                           stderr=subprocess.DEVNULL)
        tmp_out = out.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(tmp, tmp_out)
        os.replace(tmp_out, out)
    return out


def _python_root() -> Path:
    """Directory holding this Python install, shared on its own with cache=loose."""
    base = Path(sys.base_prefix).resolve()
    for parent in [base, *base.parents]:
        if parent.name == ".pyenv":
            return parent
    return base


def _guest_env(env: dict | None) -> dict[str, str]:
    py_bin = str(Path(sys.executable).parent)
    e = {
        "PATH": f"{py_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
        # The guest CPU is not the host's: a host-native numba cache would miss.
        "NUMBA_CACHE_DIR": str(NUMBA_CACHE), "NUMBA_CPU_NAME": "generic",
        "XDG_CACHE_HOME": "/tmp/.cache", "MPLCONFIGDIR": "/tmp/.mpl",
    }
    for k in PASS_ENV:
        if k in os.environ:
            e[k] = os.environ[k]
    e.update({str(k): str(v) for k, v in (env or {}).items()})
    return e


def _pdeathsig() -> None:
    # qemu must not outlive the Python process that started it, even on SIGKILL.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)     # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def qemu_command(run_dir: Path, console: Path, *, memory_mb: int = 2048,
                 cmdline_extra: str = "", cpu: str = "max") -> list[str]:
    """The qemu argv: 2 CPUs, 2 NUMA nodes of memory_mb/2 each, four 9p shares."""
    qemu, busybox = _tools()
    vmlinuz, moddir = _kernel()
    initrd = _initramfs(busybox, moddir)
    pyroot = _python_root()
    half = memory_mb // 2
    cmdline = (f"console=ttyS0 loglevel=4 panic=-1 numa_balancing=disable mitigations=off "
               f"rdinit=/init numarun={GUEST_RUN_DIR}/run.sh "
               f"dsdvm_pyroot={pyroot} dsdvm_ncache={NUMBA_CACHE} dsdvm_repo={REPO} "
               f"{cmdline_extra}").strip()

    def share(tag: str, path: Path | str, ro: bool) -> list[str]:
        opts = f"local,id={tag},path={path},security_model=none,multidevs=remap"
        return ["-fsdev", opts + (",readonly=on" if ro else ""),
                "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]

    return [
        qemu, "-accel", "tcg,thread=multi", "-cpu", cpu, "-smp", "2",
        "-m", f"{memory_mb}M", "-nodefaults", "-no-reboot", "-display", "none",
        "-monitor", "none", "-serial", f"file:{console}",
        "-object", f"memory-backend-ram,id=m0,size={half}M",
        "-object", f"memory-backend-ram,id=m1,size={memory_mb - half}M",
        "-numa", "node,nodeid=0,cpus=0,memdev=m0",
        "-numa", "node,nodeid=1,cpus=1,memdev=m1",
        "-kernel", str(_pvh_kernel(vmlinuz)), "-initrd", str(initrd), "-append", cmdline,
        *share("hostroot", "/", True), *share("run", run_dir, False),
        *share("pyroot", pyroot, True), *share("ncache", NUMBA_CACHE, False),
        # the checkout gets its own share: it may live under /tmp (a CI clone), which the
        # guest covers with a fresh tmpfs
        *share("repo", REPO, True),
    ]


def run_in_vm(script_text: str, timeout: float = 600, env: dict | None = None, *,
              lang: str = "python", cwd: str | None = None,
              files: dict[str, bytes | str] | None = None,
              memory_mb: int = 2048, cmdline_extra: str = "", cpu: str = "max") -> VMResult:
    """Boot the 2-node VM, run script_text as root, return its exit code and output.

    lang: "python" (run by this interpreter's path, sys.executable) or "sh" (/bin/sh).
    cwd: guest working directory (default: this repository's root, same path as host).
    files: extra files put in the guest's /tmp/dsdvm/ before boot (name -> content).
    cpu: qemu -cpu model; numpy 2 needs at least SSE4.2 ("max" also gives AVX2/FMA).
    The script may leave result files in /tmp/dsdvm/out/; they come back in .files.
    On timeout qemu is killed and VMTimeoutError raised; if the guest never ran the
    script to the end (boot failure, kernel panic) VMBootError carries the console.
    """
    if lang not in ("python", "sh"):
        raise ValueError(f"lang must be 'python' or 'sh', not {lang!r}")
    NUMBA_CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dsdvm-") as td:
        run_dir = Path(td) / "run"
        (run_dir / "out").mkdir(parents=True)
        console = Path(td) / "console.log"
        script = run_dir / ("script.py" if lang == "python" else "script.sh")
        script.write_text(script_text)
        for name, content in (files or {}).items():
            p = run_dir / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in _guest_env(env).items())
        runner = shlex.quote(sys.executable) if lang == "python" else "/bin/sh"
        (run_dir / "run.sh").write_text(
            "#!/bin/sh\n" + exports +
            f"cd {shlex.quote(cwd or str(REPO))} || exit 97\n"
            f"exec {runner} {GUEST_RUN_DIR}/{script.name}\n")
        argv = qemu_command(run_dir, console, memory_mb=memory_mb,
                            cmdline_extra=cmdline_extra, cpu=cpu)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_pdeathsig)
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise VMTimeoutError(
                f"VM did not finish within {timeout:.0f} s (qemu killed); console tail:\n"
                f"{_read(console)[-3000:]}") from None
        finally:
            _kill(proc)
        total = time.monotonic() - t0
        con = _read(console)
        rc_file = run_dir / "rc"
        if not rc_file.is_file():
            why = _read(run_dir / "init-error")
            raise VMBootError(
                f"guest did not run the script to the end (qemu exit {proc.returncode}"
                f"{'; ' + why.strip() if why else ''}); qemu said: "
                f"{qemu_out.decode(errors='replace')[-1000:]}\nconsole tail:\n{con[-4000:]}")
        timings = {"total": total}
        for line in _read(run_dir / "timings").splitlines():
            k, _, v = line.partition(" ")
            timings[k] = float(v)
        out_files = {str(p.relative_to(run_dir / "out")): p.read_bytes()
                     for p in (run_dir / "out").rglob("*") if p.is_file()}
        return VMResult(int(rc_file.read_text().strip()), _read(run_dir / "stdout"),
                        _read(run_dir / "stderr"), con, timings, out_files)


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""

