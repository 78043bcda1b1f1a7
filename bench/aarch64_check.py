"""The device side of a real artifact on an emulated aarch64 (Raspberry Pi-class) device.

    .venv/bin/python bench/aarch64_check.py                      # demo model: fp32 and int8 QDQ, Cortex-A72
    .venv/bin/python bench/aarch64_check.py --cpu cortex-a72,cortex-a76 --json
    .venv/bin/python bench/aarch64_check.py --artifact .edgefleet/artifacts/mnist-cnn-rpi4-v123
    .venv/bin/python bench/aarch64_check.py --onnx build/model.onnx   # bundled here with the demo's golden inputs
    .venv/bin/python bench/aarch64_check.py --prepare-only       # just build the arm64 root (cached)

Three steps (docs/aarch64.md says more):
1. prepare, once, an arm64 root OUTSIDE the repo (default /var/tmp/edgefleet-arm64, --cache or
   $EDGEFLEET_ARM64_CACHE): Debian bookworm's python3.11 and the libraries it links, downloaded with a
   private apt configuration (the host's apt state is not touched) and unpacked with dpkg-deb (no
   maintainer scripts, no debootstrap second stage), plus the device agent's aarch64 wheels (onnxruntime,
   numpy, paho-mqtt, cryptography, pyyaml, psutil; by default the versions this host's venv has) fetched
   with `pip download --platform` and installed with `pip install --target` into ROOT/opt/site;
2. take artifacts the host built: by default the demo's model (deploy.yaml: trained, compressed,
   exported fp32 and int8-static QDQ by the project's own export stage, bundled and signed by the project's
   own build_artifact), or bundles / .onnx files named on the command line;
3. run, inside the emulated aarch64 python (qemu-user, -cpu cortex-a72 by default: a Raspberry Pi 4's
   core, no dot-product instructions), the device agent's own code path: verify the signed manifest,
   decode the payload, load it with device_agent.runtimes and call device_agent.health.health_check (the
   golden vectors and whatever tolerance the manifest carries, as the tree stands) - the same probe also
   runs on this host for comparison. The table shows per artifact: the arch the process saw
   (platform.machine()), onnxruntime's version, the max abs diff per golden case, predicted classes host
   vs device, the agent's verdict, wall time.

Two ways to run the arm64 python (--mode): `qemu` (default; no root, no mounts, no binfmt:
`qemu-aarch64-static -cpu CPU -L ROOT ROOT/usr/bin/python3.11`, qemu serves ROOT/proc/cpuinfo, an ARM
one, in place of the host's x86 one on which onnxruntime crashes) or `chroot` (root: a private mount
namespace with /proc mounted, the ARM cpuinfo bind-mounted over /proc/cpuinfo, then chroot; the
namespace and its mounts vanish with the process).

Exit status: 0 every agent check passed, 1 some agent check failed (the table says which), 2 the check
could not run (preparation, build or emulation failed). Not part of `make test`: preparing the root
downloads ~200 MB and float kernels run ~300x slower under qemu.

Only the standard library is imported at module level: the same file runs inside the emulated device
as the probe (`--device-probe`), where only the agent's dependencies exist.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # --repo replaces it: where device_agent/ and pipeline/ come from
DEFAULT_CACHE = Path(os.environ.get("EDGEFLEET_ARM64_CACHE", "/var/tmp/edgefleet-arm64"))
SUITE = "bookworm"
MIRRORS = ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")
#: Debian arm64 packages unpacked into the root (their dependency closure comes with them)
DEBS = ("python3.11", "libstdc++6", "libgomp1")
#: the device agent's runtime dependencies (pyproject's [project] dependencies)
AGENT_WHEELS = ("onnxruntime", "numpy", "paho-mqtt", "cryptography", "pyyaml", "psutil")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64", "linux_aarch64")
DEFAULT_CONFIG = REPO / "deploy.yaml"
RESULT_MARK = "EDGEFLEET-PROBE-RESULT "
RUN_DIR = "edgefleet-run"  # under ROOT: the agent's code, this file and the bundles, per run

# /proc/cpuinfo per qemu CPU model: (part, Features). onnxruntime's cpuinfo reads the part from here; the
# instruction set its kernels use comes from HWCAP, which qemu derives from -cpu.
_A72_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
_A76_FEATURES = _A72_FEATURES + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp ssbs"
CPUS = {
    "cortex-a53": ("0xd03", _A72_FEATURES, "Raspberry Pi 3 / Zero 2"),
    "cortex-a57": ("0xd07", _A72_FEATURES, "Jetson Nano"),
    "cortex-a72": ("0xd08", _A72_FEATURES, "Raspberry Pi 4"),
    "cortex-a76": ("0xd0b", _A76_FEATURES, "Raspberry Pi 5"),
    "neoverse-n1": ("0xd0c", _A76_FEATURES, "Ampere Altra / Graviton2"),
    "max": ("0xd0c", _A76_FEATURES + " sve i8mm bf16", "every feature qemu emulates (SVE, i8mm)"),
}
HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
               "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2_NAMES = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
                "svebf16 i8mm bf16 dgh rng bti mte").split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CheckError(Exception):
    """The check could not run (exit 2)."""


# ====================================================================================== device probe
# Runs inside the emulated device (and on the host, for comparison). Imports only the agent and its deps.

def _hwcaps() -> list[str]:
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        h1, h2 = libc.getauxval(16), libc.getauxval(26)  # AT_HWCAP, AT_HWCAP2
    except Exception:
        return []
    return ([n for i, n in enumerate(HWCAP_NAMES) if h1 >> i & 1]
            + [n for i, n in enumerate(HWCAP2_NAMES) if h2 >> i & 1])


def _cpu_part() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("CPU part"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def device_probe(bundle: str, threads: int | None, runs: int) -> dict:
    """The agent's own path for a delivered artifact: verify the envelope with the bundle's signing key,
    check length and hash, decode the payload, load it with the agent's runtime, health_check it."""
    t0 = time.perf_counter()
    out: dict = {"machine": platform.machine(), "python": platform.python_version(), "cpu_part": _cpu_part()}
    if out["machine"] in ("aarch64", "arm64"):
        out["hwcaps"] = _hwcaps()
    import numpy as np
    import onnxruntime

    out["onnxruntime"], out["numpy"] = onnxruntime.__version__, np.__version__
    from device_agent.errors import AgentError, HealthCheckError, RuntimeBackendError
    from device_agent.health import health_check
    from device_agent.manifest import Manifest, decode_payload, file_sha256, keyid, load_public_key, verify_envelope
    from device_agent.runtimes import get_runtime

    src = Path(bundle)  # relative paths only: under qemu -L an absolute path that does not exist yet
    # would resolve outside the root
    envelope = json.loads((src / "manifest.json").read_text())
    key = load_public_key(src / "signing.pub")
    try:
        m = Manifest.from_signed(verify_envelope(envelope, {keyid(key): key}))
        m.check_expiry()
    except AgentError as exc:
        out.update(check="refused", error=f"{type(exc).__name__}: {exc}", wall_s=round(time.perf_counter() - t0, 2))
        return out
    payload = src / (m.filename + (".z" if m.encoding == "zlib" else ""))
    if payload.stat().st_size != m.length or file_sha256(payload) != m.sha256:
        out.update(check="refused", error="payload length or sha256 does not match the manifest")
        return out
    work = Path("work-" + src.name + f"-{os.getpid()}")
    work.mkdir()
    shutil.copyfile(payload, work / "payload")
    model = work / m.filename
    decode_payload(work / "payload", model, m)
    raw = model.read_bytes()
    out["model"] = {"filename": m.filename, "bytes": len(raw), "runtime": m.runtime,
                    "quantized": b"QuantizeLinear" in raw or b"QLinearConv" in raw}
    out["golden"] = {k: v for k, v in m.golden.items() if k != "cases"}
    t_load = time.perf_counter()
    session = get_runtime(m.runtime).load(model, threads)
    out["load_s"] = round(time.perf_counter() - t_load, 3)
    semantics = getattr(session, "int8_semantics", None)  # how the agent's backend chose to run int8, if it says
    out["int8_semantics"] = getattr(semantics, "value", semantics)

    # the measurement, next to the check: every case's max abs diff and top class, host vs here
    cases = []
    for inputs, expected in m.golden_pairs():
        got = session.run(inputs)
        diffs = [float(np.max(np.abs(np.asarray(g, np.float64) - e))) if np.shape(g) == np.shape(e) else None
                 for g, e in zip(got, expected)]
        case = {"max_abs_diff": max((d for d in diffs if d is not None), default=None),
                "host_class": int(np.argmax(expected[0])), "device_class": int(np.argmax(got[0]))}
        cases.append(case)
    out["cases"] = cases

    # the verdict: the agent's own health check, exactly as agent.py calls it before activation
    t_check = time.perf_counter()
    try:
        bench = health_check(session, m, runs)
        out["check"] = "pass"
        out["bench"] = {k: getattr(bench, k) for k in ("latency_ms_p50", "latency_ms_p95", "rss_mb", "runs")}
    except (HealthCheckError, RuntimeBackendError) as exc:
        out["check"] = "fail"
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["check_s"] = round(time.perf_counter() - t_check, 2)
    shutil.rmtree(work, ignore_errors=True)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


# ====================================================================================== the arm64 root

def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise CheckError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                         f"{(proc.stderr or proc.stdout)[-3000:]}")
    return proc


class Rootfs:
    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.root = cache / "root"
        self.apt = cache / "apt"
        self.wheels = cache / "wheels"
        self.state_path = cache / "state.json"
        self.qemu: Path | None = None

    @property
    def python(self) -> Path:
        return self.root / "usr/bin/python3.11"

    def state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    # ---------------------------------------------------------------- qemu
    def find_qemu(self) -> Path:
        for name in ("qemu-aarch64-static", "qemu-aarch64"):
            found = shutil.which(name)
            if found:
                return Path(found)
        local = self.cache / "qemu/usr/bin/qemu-aarch64-static"
        if local.exists():
            return local
        # not installed: unpack the host's qemu-user-static .deb here (no root, no apt state touched)
        log("  qemu-aarch64-static not installed; fetching Debian's qemu-user-static package into the cache")
        dl = self.cache / "qemu-deb"
        dl.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", "qemu-user-static"], "apt-get download qemu-user-static", cwd=dl)
        deb = next(dl.glob("qemu-user-static_*.deb"), None)
        if deb is None:
            raise CheckError("no qemu-user-static package; install it: apt-get install -y qemu-user-static")
        _run(["dpkg-deb", "-x", str(deb), str(self.cache / "qemu")], "unpacking qemu-user-static")
        return local

    # ---------------------------------------------------------------- Debian userland
    def _apt_env(self) -> dict:
        a = self.apt
        for d in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d", "state/lists/partial",
                  "cache/archives/partial", "dpkg"):
            (a / d).mkdir(parents=True, exist_ok=True)
        (a / "dpkg/status").touch()
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        signed = f" signed-by={keyring}" if Path(keyring).exists() else ""
        (a / "etc/sources.list").write_text(
            f"deb [arch=arm64{signed}] {MIRRORS[0]} {SUITE} main\n"
            f"deb [arch=arm64{signed}] {MIRRORS[1]} {SUITE}-security main\n")
        (a / "apt.conf").write_text("\n".join([
            'APT::Architecture "arm64";', 'APT::Architectures { "arm64"; };',
            f'Dir::State "{a}/state";', f'Dir::State::status "{a}/dpkg/status";', f'Dir::Cache "{a}/cache";',
            f'Dir::Etc "{a}/etc";', f'Dir::Etc::sourcelist "{a}/etc/sources.list";',
            f'Dir::Etc::sourceparts "{a}/etc/sources.list.d";', f'Dir::Etc::parts "{a}/etc/apt.conf.d";',
            f'Dir::Etc::preferencesparts "{a}/etc/preferences.d";', 'Dir::Etc::trustedparts "/etc/apt/trusted.gpg.d";',
            'APT::Install-Recommends "false";', 'Acquire::Languages "none";', ""]))
        return {**os.environ, "APT_CONFIG": str(a / "apt.conf"), "DEBIAN_FRONTEND": "noninteractive"}

    def install_debs(self) -> list[str]:
        env = self._apt_env()
        _run(["apt-get", "-q", "update"], "apt-get update (arm64, private state)", env=env)
        _run(["apt-get", "-q", "-y", "--download-only", "install", *DEBS], "apt-get download (arm64)", env=env)
        debs = sorted((self.apt / "cache/archives").glob("*.deb"))
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "usr").mkdir(parents=True)
        for d in ("bin", "lib", "sbin"):  # merged /usr, as bookworm is
            (self.root / "usr" / d).mkdir()
            (self.root / d).symlink_to(f"usr/{d}")
        for deb in debs:
            tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
            _run(["tar", "-C", str(self.root), "--keep-directory-symlink", "-xf", "-"], f"unpacking {deb.name}",
                 stdin=tar.stdout)
            if tar.wait() != 0:
                raise CheckError(f"dpkg-deb could not read {deb}")
        for d in ("proc", "sys", "dev", "tmp", RUN_DIR):
            (self.root / d).mkdir(exist_ok=True)
        (self.root / "tmp").chmod(0o1777)
        py3 = self.root / "usr/bin/python3"
        if not py3.exists():
            py3.symlink_to("python3.11")
        return [d.name for d in debs]

    # ---------------------------------------------------------------- wheels
    @staticmethod
    def wheel_spec(pins: list[str]) -> list[str]:
        """The agent's deps, pinned to what this host's python has (so host and device differ by arch
        only), unless --wheel overrides one."""
        from importlib import metadata

        spec = {}
        for name in AGENT_WHEELS:
            try:
                spec[name] = f"{name}=={metadata.version(name)}"
            except metadata.PackageNotFoundError:
                spec[name] = name
        for pin in pins:
            name = pin.split("=")[0].split("<")[0].split(">")[0].strip().lower()
            spec[name] = pin
        return [spec[k] for k in sorted(spec)]

    def install_wheels(self, spec: list[str]) -> list[str]:
        if self.wheels.exists():
            shutil.rmtree(self.wheels)
        plat = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
        tags = [*plat, "--python-version", "3.11", "--implementation", "cp",
                "--abi", "cp311", "--abi", "abi3", "--abi", "none", "--only-binary=:all:"]
        _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", *tags,
              "-d", str(self.wheels), *spec], "pip download (aarch64 wheels)")
        site = self.root / "opt/site"
        if site.exists():
            shutil.rmtree(site)
        files = sorted(str(w) for w in self.wheels.glob("*.whl"))
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
              "--no-index", *tags, "--target", str(site), *files], "pip install --target (aarch64 wheels)")
        return [Path(f).name for f in files]

    def write_cpuinfo(self, cpu: str) -> Path:
        part, features, _ = CPUS[cpu]
        n = os.cpu_count() or 4
        blocks = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                  f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n" for i in range(n)]
        path = self.cache / f"cpuinfo.{cpu}"
        path.write_text("\n".join(blocks) + "\n")
        return path

    # ---------------------------------------------------------------- all of it, cached
    def prepare(self, pins: list[str], rebuild: bool = False) -> dict:
        self.cache.mkdir(parents=True, exist_ok=True)
        if str(self.cache.resolve()).startswith(str(REPO) + os.sep):
            raise CheckError(f"--cache {self.cache} is inside the repository; keep the arm64 root outside it")
        import fcntl

        with open(self.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two runs never build the same root at once
            t0 = time.perf_counter()
            self.qemu = self.find_qemu()
            state = {} if rebuild else self.state()
            spec = self.wheel_spec(pins)
            timings, cached = {}, True
            if not state.get("debs") or not self.python.exists():
                cached = False
                log(f"  preparing the arm64 root in {self.root}: Debian {SUITE} {', '.join(DEBS)} (+ dependencies)")
                t = time.perf_counter()
                state = {"debs": self.install_debs()}
                timings["debs_s"] = round(time.perf_counter() - t, 1)
                self._save(state)
            if state.get("wheel_spec") != spec or not (self.root / "opt/site").exists():
                cached = False
                log(f"  aarch64 wheels into {self.root / 'opt/site'}: {' '.join(spec)}")
                t = time.perf_counter()
                state["wheels"] = self.install_wheels(spec)
                state["wheel_spec"] = spec
                timings["wheels_s"] = round(time.perf_counter() - t, 1)
                self._save(state)
            if not cached:
                state["prepared_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                state["prepare_s"] = round(time.perf_counter() - t0, 1)
                state["prepare_timings"] = timings
                self._save(state)
            return {"root": str(self.root), "cached": cached, "qemu": str(self.qemu),
                    "qemu_version": _run([str(self.qemu), "--version"], "qemu --version").stdout.splitlines()[0],
                    "prepare_s_this_run": round(time.perf_counter() - t0, 1), **state}


# ====================================================================================== running the probe

class Emulator:
    def __init__(self, rootfs: Rootfs, mode: str, timeout: float) -> None:
        self.fs, self.mode, self.timeout = rootfs, mode, timeout
        if mode == "chroot":
            if os.geteuid() != 0:
                raise CheckError("--mode chroot needs root (mount namespace, chroot); use --mode qemu")
            inside = rootfs.root / "usr/bin/qemu-aarch64-static"
            if not inside.exists() or inside.stat().st_size != rootfs.qemu.stat().st_size:
                shutil.copy2(rootfs.qemu, inside)  # chroot runs it directly: no binfmt registration needed

    def command(self, cpu: str, rundir_in_root: str, argv: list[str]) -> tuple[list[str], dict, str | None]:
        fs = self.fs
        cpuinfo = fs.write_cpuinfo(cpu)
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": f"/opt/site:/{rundir_in_root}"}
        if self.mode == "qemu":
            # qemu -L serves ROOT/<path> for an absolute <path> that exists there: ROOT/proc/cpuinfo (a plain
            # file) replaces the host's x86 one; /proc/self/* falls through to the real /proc (psutil)
            shutil.copyfile(cpuinfo, fs.root / "proc/cpuinfo")
            cmd = [str(fs.qemu), "-cpu", cpu, "-L", str(fs.root), str(fs.python), *argv]
            return cmd, env, str(fs.root / rundir_in_root)
        # chroot(8) starts in /, so the probe changes into its run directory itself (--cwd)
        if argv and argv[0].endswith(".py"):
            argv = [f"/{rundir_in_root}/{argv[0]}", *argv[1:], "--cwd", f"/{rundir_in_root}"]
        inner = [shutil.which("chroot") or "/usr/sbin/chroot", str(fs.root), "/usr/bin/qemu-aarch64-static",
                 "-cpu", cpu, "/usr/bin/python3.11", *argv]
        script = (f"set -e; R={shlex.quote(str(fs.root))}; mount -t proc proc $R/proc; "
                  f"mount --bind {shlex.quote(str(cpuinfo))} $R/proc/cpuinfo; mount --bind /dev $R/dev; "
                  f"mount --rbind /sys $R/sys; exec env -i "
                  + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "
                  + " ".join(shlex.quote(a) for a in inner))
        # the namespace is private: the mounts never reach the host and vanish with the process
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], dict(os.environ), None

    def probe(self, cpu: str, rundir_in_root: str, bundle: str, threads: int | None, runs: int) -> dict:
        argv = ["aarch64_check.py", "--device-probe", bundle, "--runs", str(runs)]
        if threads:
            argv += ["--threads", str(threads)]
        cmd, env, cwd = self.command(cpu, rundir_in_root, argv)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return {"check": "error", "error": f"no answer in {self.timeout:g} s", "wall_s": self.timeout}
        return _parse_probe(proc, time.perf_counter() - t0)


def _parse_probe(proc: subprocess.CompletedProcess, wall: float) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
            res["process_wall_s"] = round(wall, 2)
            return res
    tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
    return {"check": "error", "error": f"probe exited {proc.returncode} without a result: {tail}",
            "process_wall_s": round(wall, 2)}


def host_probe(rundir: Path, bundle: str, threads: int | None, runs: int, timeout: float) -> dict:
    """The same probe with this host's python and onnxruntime, on the same copy of the agent."""
    argv = [sys.executable, "aarch64_check.py", "--device-probe", bundle, "--runs", str(runs)]
    if threads:
        argv += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(rundir), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=rundir, env=env, capture_output=True, text=True, timeout=timeout)
    return _parse_probe(proc, time.perf_counter() - t0)


# ====================================================================================== artifacts

def host_cpu() -> dict:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"machine": platform.machine(), "model": model, "avx2": "avx2" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def _bundles_in(path: Path) -> list[Path]:
    if (path / "manifest.json").exists():
        return [path]
    found = sorted(p.parent for p in path.glob("*/manifest.json"))
    if not found:
        raise CheckError(f"{path}: neither a bundle (manifest.json, payload, signing.pub) nor a directory of bundles")
    return found


def build_artifacts(args, work: Path) -> tuple[list[Path], dict]:
    """Artifacts the host builds with the project's own code: the demo model (deploy.yaml) exported by
    pipeline.export.stage.export_stage (fp32, int8-static), or --onnx files, bundled by pipeline.bundle."""
    here = str(Path(__file__).resolve().parent)  # bench/profile.py would shadow the stdlib's profile
    sys.path[:] = [str(REPO)] + [p for p in sys.path if p not in (here, str(REPO))]
    from device_agent.runtimes import runtime_for
    from pipeline.bundle import build_artifact, next_version
    from pipeline.compress.stage import compress, load_data, prepare
    from pipeline.config import load_deploy
    from pipeline.bundle.stage import GOLDEN_CASES
    from pipeline.export.stage import export_stage
    from pipeline.errors import ExportError
    from pipeline.ui import UI

    ui = UI()
    cfg = load_deploy(args.config)
    # everything the host writes goes to the cache, not the checkout's .edgefleet
    cfg = cfg.model_copy(update={"workdir": work, "signing": cfg.signing.model_copy(update={"key_dir": work / "keys"})})
    cases = args.cases or GOLDEN_CASES
    info: dict = {"config": str(args.config), "golden_cases": cases}
    models: list[tuple[str, Path]] = []
    t0 = time.perf_counter()
    if args.onnx:
        data = load_data(cfg.view_compress())
        models = [(Path(p).stem, Path(p).resolve()) for p in args.onnx]
    else:
        with ui.stage("Host: the demo model (deploy.yaml)" + (", dense" if args.dense else ", compressed as the demo")):
            if args.dense:
                prepared = prepare(cfg.view_compress(), ui)
                model, data = prepared.model, prepared.data
            else:
                result = compress(cfg.view_compress(), ui)
                model, data = result.model, result.data
        for quantize in args.quantize.split(","):
            out = work / "build" / f"{cfg.name}-{quantize}"
            with ui.stage(f"Host: export_stage (onnx, quantize: {quantize})"):
                try:
                    exported = export_stage(cfg.export, model, data, out, ui, quantize)
                    final = exported.path
                    info[quantize] = {"quantization": exported.quantization_report or None}
                except ExportError as exc:  # the host's accuracy gate; the file it judged is still there
                    if not (out / "model.onnx").exists():
                        raise
                    ui.warn(f"the export gate refused it ({exc}); checking the quantized file anyway")
                    final, info[quantize] = out / "model.onnx", {"gate_error": str(exc)}
            models.append((quantize, final))
    info["build_s"] = round(time.perf_counter() - t0, 1)
    bundles = []
    for label, path in models:
        art = build_artifact(path, work / "artifacts", name=f"{cfg.name}-{label}", version=next_version(work),
                             target=args.target, runtime=runtime_for(path),
                             golden_inputs=data.x_test[:cases], budgets={}, predicted={},
                             health={"max_rss_mb": None, "max_latency_ms": None, "runs": args.runs},
                             key_dir=cfg.resolve(cfg.signing.key_dir))
        bundles.append(art.dir)
    return bundles, info


# ====================================================================================== report

def _fmt_diffs(res: dict) -> str:
    d = [c["max_abs_diff"] for c in res.get("cases", [])]
    return " ".join("-" if x is None else f"{x:.3g}" for x in d) or "-"


def _fmt_classes(res: dict) -> str:
    c = res.get("cases", [])
    if not c:
        return "-"
    agree = sum(x["host_class"] == x["device_class"] for x in c)
    return (f"{''.join(str(x['host_class']) for x in c)} / {''.join(str(x['device_class']) for x in c)} "
            f"({agree}/{len(c)})")


def _fmt_tolerance(golden: dict) -> str:
    """What the manifest's golden section asks for (whatever keys the tree's bundle writes)."""
    parts = []
    if isinstance(golden.get("atol"), (int, float)):
        parts.append(f"atol {golden['atol']:.3g}")
    q = golden.get("quantized")
    if isinstance(q, dict) and isinstance(q.get("atol"), list):
        parts.append("quant atol " + ",".join(f"{a:.3g}" for a in q["atol"] if isinstance(a, (int, float))))
    for k in ("agreement", "semantics"):
        if isinstance(golden.get(k), str):
            parts.append(f"{k} {golden[k]}")
    return "; ".join(parts) or "-"


def table(report: dict) -> str:
    cols = ["artifact", "where", "arch", "onnxruntime", "int8 run as", "golden max|diff| per case", "tolerance",
            "classes host / here", "agent check", "wall s"]
    rows = []
    for art in report["artifacts"]:
        for res in art["runs"]:
            rows.append([art["label"], res["where"], res.get("machine", "?"), res.get("onnxruntime", "?"),
                         (res.get("int8_semantics") or "-") if (res.get("model") or {}).get("quantized") else "-",
                         _fmt_diffs(res), _fmt_tolerance(res.get("golden") or {}), _fmt_classes(res),
                         res.get("check", "?"), f"{res.get('process_wall_s', res.get('wall_s', 0)):.1f}"])
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
    out = [line(cols), line(["-" * w for w in widths]), *map(line, rows)]
    for art in report["artifacts"]:
        for res in art["runs"]:
            if res.get("error"):
                out.append(f"{art['label']} on {res['where']}: {res['error']}")
    return "\n".join(out)


# ====================================================================================== main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-probe", metavar="BUNDLE", help=argparse.SUPPRESS)
    ap.add_argument("--cwd", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"arm64 root, wheels and host build outputs (default {DEFAULT_CACHE}; $EDGEFLEET_ARM64_CACHE)")
    ap.add_argument("--prepare-only", action="store_true", help="prepare the arm64 root and stop")
    ap.add_argument("--rebuild", action="store_true", help="prepare the root again from scratch")
    ap.add_argument("--wheel", action="append", default=[], metavar="REQ",
                    help="override an agent wheel for the device, e.g. --wheel onnxruntime==1.20.1 (repeatable)")
    ap.add_argument("--mode", choices=("qemu", "chroot"), default="qemu",
                    help="qemu: qemu-aarch64 -L ROOT, no privileges (default); chroot: root, private mount namespace")
    ap.add_argument("--cpu", default="cortex-a72", help=f"qemu CPU model(s), comma-separated: {', '.join(CPUS)}")
    ap.add_argument("--artifact", action="append", default=[], type=Path, metavar="DIR",
                    help="a bundle dir (manifest.json, payload, signing.pub) or a dir of them, "
                    "e.g. .edgefleet/artifacts")
    ap.add_argument("--onnx", action="append", default=[], metavar="FILE",
                    help="an .onnx the host built: bundled here with the demo data's golden inputs")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="deploy.yaml for the demo model")
    ap.add_argument("--repo", type=Path, help="take device_agent/, pipeline/ and deploy.yaml from this tree instead "
                    "(e.g. `git archive HEAD | tar -x -C /tmp/edgefleet-head` to compare with the last commit)")
    ap.add_argument("--host-env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in this host process for the build and the host probe, e.g. "
                    "--host-env 'EDGEFLEET_CPU_FLAGS=avx2 fma' (an x86 without VNNI)")
    ap.add_argument("--quantize", default="none,int8-static", help="export.quantize values to build (default both)")
    ap.add_argument("--dense", action="store_true", help="skip the demo's compression (the trained dense model)")
    ap.add_argument("--target", default="rpi4", help="device class written into the manifests (default rpi4)")
    ap.add_argument("--cases", type=int, default=0, help="golden cases per artifact (default: what deploy uses)")
    ap.add_argument("--runs", type=int, default=5, help="benchmark runs in health_check (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="inference threads (default: the agent's, unset)")
    ap.add_argument("--no-host", action="store_true", help="do not run the probe on this host too")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per emulated probe (default 1200)")
    ap.add_argument("--nice", type=int, default=10, help="niceness for this run and its children (default 10)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory inside the root")
    ap.add_argument("--json", action="store_true", help="print the report as JSON on stdout (the table goes to stderr)")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args(argv)
    global REPO
    if args.repo:
        REPO = args.repo.resolve()
        if args.config == DEFAULT_CONFIG:
            args.config = REPO / "deploy.yaml"

    if args.device_probe:
        if args.cwd:
            os.chdir(args.cwd)
        print(RESULT_MARK + json.dumps(device_probe(args.device_probe, args.threads, args.runs)), flush=True)
        return 0

    with contextlib.suppress(OSError):
        os.nice(args.nice)
    for kv in args.host_env:
        key, sep, value = kv.partition("=")
        if not sep:
            log(f"--host-env {kv!r}: expected KEY=VALUE")
            return 2
        os.environ[key] = value
    cpus = [c.strip() for c in args.cpu.split(",") if c.strip()]
    unknown = [c for c in cpus if c not in CPUS]
    if unknown:
        log(f"--cpu: unknown {unknown}; known: {', '.join(CPUS)}")
        return 2
    fs = Rootfs(args.cache.resolve())
    report: dict = {"host": host_cpu(), "mode": args.mode, "cpus": cpus, "artifacts": []}
    t_all = time.perf_counter()
    try:
        log(f"▶ arm64 root ({fs.root})")
        report["rootfs"] = fs.prepare(args.wheel, rebuild=args.rebuild)
        r = report["rootfs"]
        log(f"  {'cached' if r['cached'] else 'prepared'}: {len(r.get('debs', []))} debs, "
            f"{len(r.get('wheels', []))} wheels; first preparation took {r.get('prepare_s', '?')} s "
            f"{r.get('prepare_timings', '')}; {r['qemu_version']}")
        if args.prepare_only:
            emu = Emulator(fs, args.mode, args.timeout)
            rundir = fs.root / RUN_DIR / f"smoke-{os.getpid()}"
            rundir.mkdir(parents=True)
            try:
                smoke = ("import platform, onnxruntime, numpy, psutil, yaml, cryptography, paho.mqtt; "
                         "print(platform.machine(), 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)")
                cmd, env, cwd = emu.command(cpus[0], f"{RUN_DIR}/{rundir.name}", ["-c", smoke])
                log("  smoke test: " + _run(cmd, "smoke test", env=env, cwd=cwd, timeout=args.timeout).stdout.strip())
            finally:
                shutil.rmtree(rundir, ignore_errors=True)
            if args.json:
                print(json.dumps(report, indent=1))
            return 0

        work = fs.cache / "host"
        bundles = [b for p in args.artifact for b in _bundles_in(p.resolve())]
        if not bundles or args.onnx:
            built, report["build"] = build_artifacts(args, work)
            bundles += built

        emu = Emulator(fs, args.mode, args.timeout)
        rundir = fs.root / RUN_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        rundir.mkdir(parents=True)
        try:
            # the agent as the tree stands now, this file, the bundles: all inside the root
            shutil.copytree(REPO / "device_agent", rundir / "device_agent",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            shutil.copy(Path(__file__).resolve(), rundir / "aarch64_check.py")
            for b in bundles:
                shutil.copytree(b, rundir / b.name)
            for b in bundles:
                manifest = json.loads((b / "manifest.json").read_text())["signed"]
                art = {"label": f"{manifest['name']} ({manifest['artifact']['filename']})", "bundle": str(b),
                       "version": manifest["version"], "runs": []}
                report["artifacts"].append(art)
                if not args.no_host:
                    log(f"▶ {b.name} on this host ({platform.machine()})")
                    res = host_probe(rundir, b.name, args.threads, args.runs, args.timeout)
                    res["where"] = "host"
                    art["runs"].append(res)
                    log(f"  {res.get('check')}: diffs {_fmt_diffs(res)}, classes {_fmt_classes(res)}")
                for cpu in cpus:
                    log(f"▶ {b.name} on emulated aarch64 ({cpu}, {CPUS[cpu][2]}; {args.mode})")
                    res = emu.probe(cpu, f"{RUN_DIR}/{rundir.name}", b.name, args.threads, args.runs)
                    res["where"] = f"qemu {cpu}"
                    art["runs"].append(res)
                    log(f"  {res.get('check')}: diffs {_fmt_diffs(res)}, classes {_fmt_classes(res)}, "
                        f"{res.get('process_wall_s', '?')} s")
        finally:
            if not args.keep:
                shutil.rmtree(rundir, ignore_errors=True)
    except CheckError as exc:
        log(f"error: {exc}")
        report["error"] = str(exc)
        if args.json:
            print(json.dumps(report, indent=1))
        return 2
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    log("")
    log(table(report)) if args.json else print(table(report))
    if args.json:
        print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    runs = [r for a in report["artifacts"] for r in a["runs"]]
    if any(r.get("check") == "error" for r in runs):
        return 2
    return 0 if all(r.get("check") == "pass" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
