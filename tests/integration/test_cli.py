"""The command line as a user meets it: rlmon collector, and what a training node imports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.helpers import child_env, read_json, rlmon_command, stop_process, wait_for
from tests.components import require_binary


def test_rank_side_imports_only_stdlib_pyzmq_and_msgpack():
    """`import rlmon` and init() with RLMON_DISABLE pull in no numpy, numba, torch or Prometheus."""
    script = ("import sys, rlmon\n"
              "mon = rlmon.init(endpoint='tcp://127.0.0.1:1')\n"
              "mon.log(0, {'a': 1.0}); mon.close()\n"
              "heavy = {'numpy', 'numba', 'torch', 'prometheus_client', 'matplotlib'}\n"
              "print(sorted(heavy & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_standalone_collector_prints_and_writes_its_endpoints(tmp_path):
    """`rlmon collector --out DIR` prints its endpoints and writes collector.json with them."""
    process = subprocess.Popen([*rlmon_command(), "collector", "--out", str(tmp_path)],
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        first_line = json.loads(process.stdout.readline())
        info = wait_for(lambda: read_json(tmp_path / "collector.json"), 60, "collector.json")
        assert info["endpoint"] == first_line["endpoint"]
        assert info["metrics_url"] == first_line["metrics_url"]
        assert info["pid"] == process.pid
        assert info["endpoint"].startswith("tcp://127.0.0.1:")
        assert info["metrics_url"].startswith("http://127.0.0.1:")
        assert (tmp_path / "control.key").stat().st_mode & 0o077 == 0
    finally:
        assert stop_process(process) == 0
    assert (tmp_path / "training_report.json").exists()


def test_second_collector_on_the_same_directory_is_refused(tmp_path):
    """Two collectors cannot share a run directory: the second exits with a clear error."""
    first = subprocess.Popen([*rlmon_command(), "collector", "--out", str(tmp_path), "--quiet"],
                             env=child_env())
    try:
        wait_for(lambda: read_json(tmp_path / "collector.json").get("pid") == first.pid, 60,
                 "the first collector")
        second = subprocess.run([*rlmon_command(), "collector", "--out", str(tmp_path)],
                                env=child_env(), capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "another collector is using" in second.stderr
    finally:
        stop_process(first)


def test_launch_without_a_command_is_a_usage_error(tmp_path):
    """`rlmon launch --out DIR` with no command explains what is missing."""
    result = subprocess.run([*rlmon_command(), "launch", "--out", str(tmp_path)], env=child_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_launch_returns_the_command_exit_code(tmp_path):
    """`rlmon launch` exits with the command's own exit code and still writes the reports."""
    result = subprocess.run([*rlmon_command(), "launch", "--out", str(tmp_path), "--",
                             sys.executable, "-c", "raise SystemExit(7)"],
                            env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 7, result.stderr
    assert (tmp_path / "training_report.md").exists()


def _self_signed(tmp_path, name):
    """A self-signed certificate for 127.0.0.1 made with openssl; returns (cert, key)."""
    require_binary("openssl", "scripts/setup.sh installs it")
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return cert, key


def test_metrics_over_tls_with_client_certificates(tmp_path):
    """--metrics-certfile/--metrics-keyfile serve HTTPS; --metrics-client-cafile requires a
    client certificate: a scrape without one is refused, one with it succeeds."""
    import ssl
    import urllib.request

    cert, key = _self_signed(tmp_path, "server")
    client_cert, client_key = _self_signed(tmp_path, "client")
    out = tmp_path / "run"
    process = subprocess.Popen([*rlmon_command(), "collector", "--out", str(out), "--quiet",
                                "--metrics-certfile", str(cert), "--metrics-keyfile", str(key),
                                "--metrics-client-cafile", str(client_cert)], env=child_env())
    try:
        info = wait_for(lambda: read_json(out / "collector.json"), 60, "collector.json")
        assert info["metrics_url"].startswith("https://127.0.0.1:")
        anonymous = ssl.create_default_context(cafile=str(cert))
        try:
            urllib.request.urlopen(info["metrics_url"], context=anonymous, timeout=10)
            raise AssertionError("a scrape without a client certificate was served")
        except (ssl.SSLError, OSError):
            pass
        with_client = ssl.create_default_context(cafile=str(cert))
        with_client.load_cert_chain(str(client_cert), str(client_key))
        with urllib.request.urlopen(info["metrics_url"], context=with_client, timeout=10) as reply:
            assert "rlmon_build_info" in reply.read().decode()
    finally:
        stop_process(process)


def test_launch_with_tensorboard_writes_event_files(tmp_path):
    """`rlmon launch --tensorboard` runs the sink beside the collector: TensorBoard's own loader
    reads every step of the ranks' metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.integration.helpers import TOY_TRAINER, torchrun_command

    out = tmp_path / "run"
    result = subprocess.run([*rlmon_command(), "launch", "--out", str(out), "--tensorboard", "--",
                             *torchrun_command(2), str(TOY_TRAINER), "--out", str(tmp_path / "r"),
                             "--steps", "30", "--step-seconds", "0.001"],
                            env=child_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("reward/mean")]
    assert steps == list(range(30))
    assert len(accumulator.Scalars("reward/rank1")) == 30


def test_missing_sink_package_is_refused_at_start(tmp_path):
    """A sink whose package is not installed is refused at start, naming the extra."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import importlib.util as u\n_orig = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name == 'wandb' else _orig(name, *a)\n")
    env = child_env()
    env["PYTHONPATH"] = f"{fake}:{env['PYTHONPATH']}"
    result = subprocess.run([*rlmon_command(), "collector", "--out", str(tmp_path / "run"),
                             "--wandb"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "rlmon[wandb]" in result.stderr
