"""Shared pieces of the benchmarks: timing and summaries, real collector processes, /proc readings,
Prometheus scraping, machine information and small markdown helpers.

Nothing here imports the collector's dependencies (numpy, numba) at import time, so processes that
fork many simulated ranks stay small.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Realistic names of one RL step's 16 scalars.
METRIC_NAMES_16 = ("loss/policy", "loss/value", "loss/total", "reward/mean", "reward/std", "kl",
                   "entropy", "clip_fraction", "grad_norm", "lr", "advantage/mean",
                   "advantage/std", "response_length", "value/mean", "ratio/mean", "approx_kl")
#: Libraries whose versions go in every results header.
LIBRARIES = ("pyzmq", "msgpack", "numpy", "numba", "prometheus-client", "wandb", "tensorboard",
             "tensorboardX", "mlflow", "torch", "matplotlib")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# -- timing ----------------------------------------------------------------------------------------

def summarize(samples_ns: Sequence[int]) -> dict[str, float]:
    """Median, p99, p99.9, max and mean of per-call nanoseconds, in microseconds; ``n`` calls."""
    ordered = sorted(samples_ns)
    n = len(ordered)
    if n == 0:
        return {"n": 0}
    def at(fraction: float) -> float:
        return ordered[min(n - 1, int(n * fraction))] / 1e3
    return {"n": n, "median": ordered[n // 2] / 1e3, "p99": at(0.99), "p99.9": at(0.999),
            "max": ordered[-1] / 1e3, "mean": sum(ordered) / n / 1e3}


def percentiles(values: Sequence[float], points: Iterable[float] = (50, 90, 99, 99.9)
                ) -> dict[str, float]:
    """``{"p50": ..., "p99": ...}`` of ``values`` (nearest rank), plus ``max`` and ``n``."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return {"n": 0}
    out = {f"p{p:g}": ordered[min(n - 1, int(n * p / 100))] for p in points}
    out.update(max=ordered[-1], n=n)
    return out


# -- processes -------------------------------------------------------------------------------------

def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def closed_endpoint() -> str:
    """A ZeroMQ address where no collector listens (for the "collector absent" case)."""
    return f"tcp://127.0.0.1:{free_port()}"


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout importable, no inherited rlmon settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLMON_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_collector(out_dir: Path, *flags: str, run_id: str = "bench"
                    ) -> tuple[subprocess.Popen, dict]:
    """A real collector started by rlmon's own launcher code (:func:`rlmon.launch.start_collector`,
    i.e. ``python -m collector``); returns (process, collector.json). Raises when it does not
    become ready."""
    from rlmon.launch import start_collector as launch_collector

    return launch_collector(Path(out_dir), run_id, ["--out", str(out_dir), *flags],
                            relay=_errors_only)


def _errors_only(text: str) -> None:
    """Relay of a benchmark collector's output: its alerts and stop decisions are expected and
    left out; errors are shown."""
    if "Error" in text or "Traceback" in text or "error" in text:
        sys.stderr.write(text)


def stop_process(process: subprocess.Popen, timeout: float = 120.0) -> float:
    """SIGCONT (in case it was frozen), SIGTERM, wait (kill past ``timeout``); seconds it took."""
    started = time.monotonic()
    if process.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                break
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return time.monotonic() - started


def wait_for(condition: Callable[[], Any], timeout: float, poll: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy or ``timeout`` passes (then None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll)  # the poll interval of a deadline-bounded wait


def run_json_command(command: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
                     ) -> dict:
    """Run ``command``; its last stdout line is JSON, returned. On failure ``{"error": ...}``."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                              env=dict(env) if env is not None else child_env(), cwd=REPO,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr or done.stdout)[-600:]
        return {"error": f"exit {done.returncode}: {tail.strip()}"}


def fork_call(function: Callable[..., int], *args: Any) -> int:
    """Fork; the child runs ``function(*args)`` and leaves with its return code through
    ``os._exit`` (no atexit handlers, no parent cleanup). Returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = function(*args)
    finally:
        os._exit(code)


def reap(pids: Sequence[int], timeout: float) -> tuple[float, int]:
    """Wait for the forked ``pids`` (SIGKILL what is left past ``timeout``); returns their total
    CPU seconds (``wait4``) and how many had to be killed."""
    deadline, cpu, left = time.monotonic() + timeout, 0.0, set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            done, _, usage = os.wait4(pid, os.WNOHANG)
            if done:
                left.discard(pid)
                cpu += usage.ru_utime + usage.ru_stime
        if left:
            time.sleep(0.05)  # the poll interval of a deadline-bounded wait
    for pid in left:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return cpu, len(left)


def sleep_until(when: float) -> None:
    """Sleep until wall-clock time ``when`` (returns at once when it has passed)."""
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


# -- /proc -----------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads) from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (/proc/PID/statm), None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


def status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (``VmRSS``, ``VmHWM``), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of ``pid`` (shared pages divided among sharers), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- Prometheus ------------------------------------------------------------------------------------

def scrape(url: str, timeout: float = 10.0) -> str:
    """GET a /metrics page as text."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def samples_of(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric ``name`` in Prometheus text: (labels, value)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        labels = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",")
                      if "=" in part)
        out.append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    return out


def sample_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(value for found, value in samples_of(text, name)
               if all(found.get(k) == v for k, v in labels.items()))


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """``{label value: sample value}`` for metric ``name`` (counters by reason, say)."""
    return {found.get(label, ""): value for found, value in samples_of(text, name)}


# -- machine and reporting -------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and library versions, and the date (UTC)."""
    import zmq

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = status_like("/proc/meminfo", "MemTotal")
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["libzmq"] = zmq.zmq_version()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round((mem_kib or 0) / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "load_average": os.getloadavg(), "versions": versions}


def status_like(path: str, field: str) -> int | None:
    """An integer field of a ``Key: value kB`` file such as /proc/meminfo."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_markdown(info: Mapping[str, Any]) -> str:
    """The machine header of results.md."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    load = " ".join(f"{x:.2f}" for x in info["load_average"])
    return (f"**Machine:** {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; "
            f"{info['os']}; CPython {info['python']}. **Date:** {info['date_utc']} UTC "
            f"(load average at start: {load}).\n\n**Versions:** {versions}.\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: Any) -> str:
    """A table cell: numbers with sensible precision, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if magnitude >= 0.1 or value == 0 else f"{value:.3f}"


def resolve(args: argparse.Namespace, defaults: Mapping[str, Any], quick: Mapping[str, Any]
            ) -> None:
    """Fill every flag left at None from ``quick`` (with ``--quick``) or ``defaults``."""
    use_quick = getattr(args, "quick", False)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick.get(name, value) if use_quick else value)


def int_list(text: str) -> list[int]:
    """``"64,256,1024"`` → ``[64, 256, 1024]``."""
    return [int(part) for part in str(text).split(",") if part.strip()]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (temp file, then rename)."""
    temp = path.with_suffix(path.suffix + ".tmp")
    temp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    temp.replace(path)


def standalone(name: str, module_doc: str, add_arguments: Callable, defaults: Mapping[str, Any],
               quick: Mapping[str, Any], run: Callable, markdown: Callable,
               argv: Sequence[str] | None = None) -> dict:
    """The ``main`` of a part run on its own: parse its flags, run it, print its markdown, and
    with ``--out`` also write ``<name>.json`` there."""
    parser = argparse.ArgumentParser(description=module_doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny parameters (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    resolve(args, defaults, quick)
    out_dir = args.out or Path(os.environ.get("TMPDIR", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run(args, out_dir)
    print(markdown(results))
    if args.out:
        write_json(args.out / f"{name}.json", results)
    return results
