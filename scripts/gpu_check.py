"""The GPU check of issue 13, run by ``scripts/gpu_check.sh``: on a machine with a CUDA GPU,
PyTorch, grpcio and protobuf but no Ray and no network, within 8 minutes:

  a. wheels   install the carried wheels (``.gpu_wheels``, made by scripts/gpu_wheels.sh) into
              a target directory put on the children's PYTHONPATH
  b. env      torch, CUDA device, capability, memory
  c. tests    every test marked ``gpu`` (pytest -m gpu over the files that hold them)
  d. shards   two ``engram-ray shard`` processes on loopback, with a token file
     train    20 training steps on CUDA through them (Trainer + RemoteMemory + EngramClient)
  e. bench    ``engram-ray bench offload --memory-at ...`` on CUDA against the same shards
  f.          the shards are stopped, whatever happened (here, and by the shell script's trap)

Each step runs in a child process under a time limit carved from the 8-minute budget; a
failed step is recorded with its error in ``<out>/summary.json`` and the check goes on. With
``--cpu-dry-run`` every step runs on CPU with tiny sizes, in children that cannot import Ray
nor anything the GPU machine lacks (scripts/gpu_dryrun/sitecustomize.py), so the Ray-free
path and the wheel list are proven here. This orchestrator itself uses the standard library
only; ``--step env|train`` are the children's entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Seconds kept back from the budget for stopping the shards and writing the summary.
RESERVE_S = 15
#: Each step's own limit (seconds); a step gets the smaller of this and what the budget has left.
LIMITS = {"wheels": 60, "env": 60, "tests": 150, "shards": 60, "train": 120, "bench": 340}
#: What a check runs at, by mode: table preset, model, steps, bench model and dtype, bench sizes.
SIZES = {
    # the serving workload scaled so that four modes x repeats of a ~1B bf16 model fit the budget
    # The bench serves the CPU default's table (table_100b: Engram at layers 2 and 15, 8 heads of
    # 640) capped to 1 GiB resident, as `bench offload` deploys it; the demo table (layers 1 and
    # 3) would leave the first Engram layer one block of compute to hide its rows behind.
    "gpu": dict(preset="demo", model="demo", steps=20, device="cuda", bench_model="dense_1b",
                bench_dtype="bfloat16", bench_preset="table_100b", bench_resident_gib=1.0,
                bench_args=["--sequences", "32", "--min-len", "100", "--max-len", "1024", "--decode-batch", "32",
                            "--decode-tokens", "32", "--requests", "64", "--prompt-len", "100", "1024",
                            "--output-len", "16", "64", "--max-batch", "32", "--token-budget", "8192",
                            "--repeats", "3", "--profile", "--trace"]),
    "cpu-dry-run": dict(preset="tiny", model="tiny", steps=5, device="cpu", bench_model="tiny",
                        bench_dtype="float32", bench_preset="tiny", bench_resident_gib=None,
                        bench_args=["--sequences", "4", "--min-len", "8", "--max-len", "24", "--decode-batch", "2",
                                    "--decode-tokens", "4", "--requests", "4", "--prompt-len", "8", "16",
                                    "--output-len", "2", "4", "--max-batch", "2", "--token-budget", "64",
                                    "--repeats", "1", "--profile", "--trace"]),
}


class StepFailed(Exception):
    """A step's child failed; the message says how (and ends with its output's tail).
    ``details`` go into the step's summary beside the error (what the step did find)."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


class Check:
    """Runs the steps in order, each time-boxed; keeps the summary and the shard processes."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.monotonic()
        self.mode = "cpu-dry-run" if args.cpu_dry_run else "gpu"
        self.size = dict(SIZES[self.mode], **({"bench_model": args.bench_model} if args.bench_model else {}))
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.target = Path(args.target or self.work / "site")
        self.log = self.out / "gpu_check.log"
        self.log.write_text("")
        self.token_file = self.work / "token"
        self.token_file.write_text(secrets.token_urlsafe(32) + "\n")
        self.token_file.chmod(0o600)
        self.shards: list[subprocess.Popen] = []
        self.addresses: list[str] = []        # the training run's shards
        self.bench_addresses: list[str] = []  # the bench's (its table preset, capped)
        self.summary: dict = {"mode": self.mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "budget_s": args.budget, "sizes": self.size, "steps": {}}

    # Children -------------------------------------------------------------------------------
    def env(self, site: bool = True) -> dict[str, str]:
        """The children's environment: the repo and the wheels' target first on the path (and,
        in a dry run, the sitecustomize that hides what the GPU machine lacks)."""
        path = [str(REPO), str(self.target)]
        if site and self.args.cpu_dry_run:
            path.append(str(REPO / "scripts" / "gpu_dryrun"))
        return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1",
                    ENGRAM_RAY_CACHE=str(self.work / "cache"))

    def run(self, name: str, cmd: list[str], limit: float, site: bool = True) -> str:
        """Run ``cmd`` (in the repo, within ``limit`` s); its output goes to the log and is
        returned. Raises :class:`StepFailed` on a non-zero exit or the time running out."""
        with self.log.open("a") as f:
            f.write(f"\n===== {name}: {' '.join(cmd)}\n")
        try:
            r = subprocess.run(cmd, cwd=REPO, env=self.env(site), capture_output=True, text=True, timeout=limit)
            out, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = _text(e.stdout) + _text(e.stderr), None
        with self.log.open("a") as f:
            f.write(out)
        if rc is None:
            raise StepFailed(f"timed out after {limit:.0f} s; output tail: {out[-1500:]}")
        if rc != 0:
            raise StepFailed(f"exit {rc}; output tail: {out[-1500:]}")
        return out

    def python(self, *argv: str) -> list[str]:
        return [self.args.python, *argv]

    # Steps ----------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.args.budget - RESERVE_S - (time.monotonic() - self.t0)

    def step(self, name: str, fn) -> None:
        """Run one step within its limit; record its result or its error, then the summary."""
        t, entry = time.monotonic(), {}
        limit = min(LIMITS[name], self.remaining())
        try:
            if limit < 5:
                raise StepFailed(f"skipped: {self.remaining():.0f} s left of the {self.args.budget} s budget")
            entry.update(fn(limit) or {})
            entry["ok"] = True
        except Exception as e:  # noqa: BLE001 - recorded; the check goes on
            entry.update(getattr(e, "details", {}), ok=False, error=f"{type(e).__name__}: {e}")
        entry["seconds"] = round(time.monotonic() - t, 2)
        self.summary["steps"][name] = entry
        print(f"[{time.monotonic() - self.t0:6.1f} s] {name}: {'ok' if entry['ok'] else 'FAILED'}"
              + ("" if entry["ok"] else f" ({entry['error'][:300]})"), flush=True)
        self.write()

    def write(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.t0, 2)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")

    def wheels(self, limit: float) -> dict:
        """Install the pure-Python wheels; the binary ones (grpcio, protobuf) only if the
        machine's own cannot load the generated code."""
        folder = Path(self.args.wheels)
        wheels = sorted(folder.glob("*.whl"))
        if not wheels:
            raise StepFailed(f"no wheels in {folder}: run scripts/gpu_wheels.sh here and carry {folder}")
        pure = [w for w in wheels if w.name.endswith("-none-any.whl")]
        pip = self.python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                          "--disable-pip-version-check", "--target", str(self.target))
        self.run("wheels", pip + [str(w) for w in pure], limit, site=False)
        probe = self.python("-c", "import engram_ray.rpc.generated.engram_pb2_grpc, grpc_health.v1.health_pb2, "
                                  "grpc, google.protobuf as p; print(grpc.__version__, p.__version__)")
        binary: list[str] = []
        try:
            versions = self.run("wheels: probe", probe, limit).split()
        except StepFailed:  # too old a grpcio or protobuf: the carried ones go first on the path
            binary = [str(w) for w in wheels if w not in pure]
            self.run("wheels: binary", pip + binary, limit, site=False)
            versions = self.run("wheels: probe again", probe, limit).split()
        return {"installed": [w.name for w in pure] + [Path(b).name for b in binary],
                "target": str(self.target), "grpcio": versions[-2], "protobuf": versions[-1]}

    def environment(self, limit: float) -> dict:
        out = self.run("env", self.python(__file__, "--step", "env"), limit)
        return json.loads(out.strip().splitlines()[-1])

    def tests(self, limit: float) -> dict:
        """pytest -m gpu over the test files that hold gpu tests (so collection never reaches a
        file that needs Ray); a file that fails to collect is reported, the others still run."""
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                       if "pytest.mark.gpu" in p.read_text())
        cmd = self.python("-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider", "-p", "no:asyncio",
                          "-p", "no:platformdirs", "--continue-on-collection-errors", *files)
        try:
            out = self.run("tests", cmd, limit)
        except StepFailed as e:
            counts, broken = _pytest_counts(str(e)), re.findall(r"ERROR collecting (\S+)", str(e))
            raise StepFailed(f"{counts} in {files}: {e}", files=files, counts=counts,
                             collection_errors=broken) from None
        counts = _pytest_counts(out)
        if not counts:
            raise StepFailed(f"no pytest summary line in the output: {out[-500:]}", files=files)
        return {"files": files, "counts": counts}

    def start_shards(self, limit: float) -> dict:
        """Two pairs of ``engram-ray shard`` processes on 127.0.0.1 (free ports), with the token
        file, on the cores bench offload gives its memory side (unpinned, they ran wherever the
        scheduler put them, compute cores included): the training run's (``preset``, Adam) and
        the bench's (``bench_preset``, capped, no optimiser). Returns once all four serve."""
        sys.path.insert(0, str(REPO))  # the package, not installed on the GPU machine
        from engram_ray.bench.isolation import Isolation  # stdlib only: safe before the wheels

        cores = Isolation.split().memory
        train = ["--preset", self.size["preset"], "--init-std", "0.02", "--optimizer", "adam", "--lr", "1e-3"]
        bench = ["--preset", self.size["bench_preset"], "--optimizer", "none"]
        if self.size["bench_resident_gib"]:
            bench += ["--max-resident-gib", str(self.size["bench_resident_gib"])]
        pairs = {"train": train, "bench": bench}
        ready = {f"{tag}-{i}": self.work / f"ready-{tag}-{i}" for tag in pairs for i in range(2)}
        for name, path in ready.items():
            tag, i = name.rsplit("-", 1)
            cmd = self.python("-m", "engram_ray.cli", "shard", *pairs[tag], "--shards", "2", "--index", i,
                              "--token-file", str(self.token_file), "--ready-file", str(path))
            log = (self.work / f"shard-{name}.log").open("w")
            self.shards.append(subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log, stderr=log,
                                                preexec_fn=lambda: os.sched_setaffinity(0, cores)))
            with open(self.args.pidfile, "a") as f:  # the shell script's trap stops them too
                f.write(f"{self.shards[-1].pid}\n")
        deadline = time.monotonic() + limit
        while not all(r.exists() for r in ready.values()):
            if any(p.poll() is not None for p in self.shards) or time.monotonic() > deadline:
                tails = {n: (self.work / f"shard-{n}.log").read_text()[-800:] for n in ready}
                raise StepFailed(f"shards did not come up (exit codes {[p.poll() for p in self.shards]}): {tails}")
            time.sleep(0.2)
        self.addresses = [ready[f"train-{i}"].read_text().strip() for i in range(2)]
        self.bench_addresses = [ready[f"bench-{i}"].read_text().strip() for i in range(2)]
        return {"addresses": self.addresses, "bench_addresses": self.bench_addresses, "preset": self.size["preset"],
                "bench_preset": self.size["bench_preset"], "bench_resident_gib": self.size["bench_resident_gib"],
                "cores": cores}

    def train(self, limit: float) -> dict:
        if not self.addresses:
            raise StepFailed("no shards serving")
        result = self.work / "train.json"
        self.run("train", self.python(__file__, "--step", "train", "--addresses", ",".join(self.addresses),
                                      "--token-file", str(self.token_file), "--device", self.size["device"],
                                      "--preset", self.size["preset"], "--model", self.size["model"],
                                      "--steps", str(self.size["steps"]), "--result", str(result)), limit)
        return json.loads(result.read_text())

    def bench(self, limit: float) -> dict:
        if not self.bench_addresses:
            raise StepFailed("no shards serving")
        report = self.out / "offload.json"
        resident = self.size["bench_resident_gib"]
        cmd = self.python("-m", "engram_ray.cli", "bench", "offload", "--memory-at", ",".join(self.bench_addresses),
                          "--token-file", str(self.token_file), "--device", self.size["device"],
                          "--model", self.size["bench_model"], "--dtype", self.size["bench_dtype"],
                          "--preset", self.size["bench_preset"],
                          *(["--max-resident-gib", str(resident)] if resident else []),
                          *[a for a in self.size["bench_args"] if a not in self.args.bench_drop], *self.args.bench_arg,
                          "--out", str(report))
        self.run("bench", cmd, limit)
        data = json.loads(report.read_text())
        return {"report": str(report), "overhead": data.get("overhead")}

    def stop_shards(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: each shard's exit code goes into the summary."""
        for p in self.shards:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.shards:
            try:
                codes.append(p.wait(timeout=10))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        for log in sorted(self.work.glob("shard-*.log")):
            with self.log.open("a") as f:
                f.write(f"\n===== {log.stem}\n{log.read_text()[-4000:]}")
        self.summary["shards_stopped"] = {"exit_codes": codes, "clean": all(c == 0 for c in codes)}


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _pytest_counts(out: str) -> dict[str, int]:
    """``{"passed": n, "skipped": n, ...}`` from pytest's closing line."""
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", ln)]
    return {k.rstrip("s") if k.startswith("error") else k: int(n)
            for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                   lines[-1])} if lines else {}


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def orchestrate(args: argparse.Namespace) -> int:
    check = Check(args)
    # `timeout` (the shell script's) sends SIGTERM: stop the shards and write what we have.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        check.step("wheels", check.wheels)
        check.step("env", check.environment)
        check.step("tests", check.tests)
        check.step("shards", check.start_shards)
        check.step("train", check.train)
        check.step("bench", check.bench)
    except KeyboardInterrupt:
        check.summary["interrupted"] = True
    finally:
        check.stop_shards()
        check.summary["ok"] = all(s["ok"] for s in check.summary["steps"].values()) and len(
            check.summary["steps"]) == len(LIMITS) and check.summary["shards_stopped"]["clean"]
        check.write()
    print(f"summary: {check.out / 'summary.json'} ({'all steps ok' if check.summary['ok'] else 'see errors'})")
    return 0 if check.summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--cpu-dry-run", action="store_true", help="every step on CPU, tiny sizes, Ray and what the "
                                                              "GPU machine lacks hidden")
    p.add_argument("--out", help="where the JSON goes (default: results/gpu, or results/tmp/gpu-dry-run)")
    p.add_argument("--work", help="scratch directory (token, ready files, logs, wheels' target)")
    p.add_argument("--pidfile", help="append each shard's pid here (for the shell script's trap)")
    p.add_argument("--wheels", default=str(REPO / ".gpu_wheels"), help="folder of carried wheels")
    p.add_argument("--target", help="install the wheels here (default: WORK/site)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the children")
    p.add_argument("--budget", type=int, default=480, help="seconds for the whole check (default: 480)")
    p.add_argument("--bench-model", help="backbone preset of the bench (default: dense_1b; dry run: tiny)")
    p.add_argument("--bench-arg", action="append", default=[], help="extra argument for bench offload")
    p.add_argument("--bench-drop", action="append", default=[], help="drop this flag (one without a value) from "
                   "the bench's default arguments; write it with '=': --bench-drop=--trace")
    p.add_argument("--step", choices=["env", "train"], help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.step:
        from gpu_check_steps import run_step  # the children's side: imports engram_ray and torch

        return run_step(args.step, rest)
    args.out = args.out or str(REPO / ("results/tmp/gpu-dry-run" if args.cpu_dry_run else "results/gpu"))
    if not args.work:
        import tempfile
        args.work = tempfile.mkdtemp(prefix="engram-gpu-check.")
    args.pidfile = args.pidfile or str(Path(args.work) / "shard.pids")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
