"""The real SGLang server on a CPU machine: one command for users, a harness for tests.

    python -m tangram_sglang.cpu.server --model-path DIR [any launch_server flag ...]

runs `python -m sglang.launch_server` with the CPU stand-ins (`shims/`) on PYTHONPATH and
the CPU defaults (`CPU_ARGS`; a flag given on the command line wins), because SGLang 0.5.17
does not start on a machine without CUDA otherwise (it imports torchvision, which has no
CPU build for this torch, and vLLM ops on an unknown platform).

For tests and benchmarks, `running_servers(...)` starts such servers on 127.0.0.1 with free
ports, all at once (start-up is mostly imports, ~30-40 s, and overlaps well), waits
for `/health_generate`, and stops them (SIGTERM, then any leftover child by PID).
`failed_start(...)` starts one expecting a refusal and returns the exit code and the log.
The CPU stand-ins reach every process SGLang spawns through PYTHONPATH.
`Launch(device="cuda")` is the same harness on a GPU machine (no CPU defaults or stand-ins),
for benchmarks that compare the two, e.g. `bench/accuracy.py --device cuda`.
Our plugin is an installed entry point, so a stock server is started with SGLANG_PLUGINS
(SGLang's own whitelist) naming no plugin of ours.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import requests

SHIMS = Path(__file__).resolve().parent / "shims"
CPU_ARGS = (
    "--device", "cpu",
    "--mem-fraction-static", "0.3",
    "--max-total-tokens", "8192",
    "--random-seed", "0",
    "--dtype", "float32",  # "auto" serves an fp32 checkpoint in fp16
    "--sleep-on-idle",  # an idle scheduler otherwise spins a core polling its sockets
)  # fmt: skip
NO_PLUGINS = "none-stock-sglang"  # an SGLANG_PLUGINS whitelist that matches no plugin


@dataclass(frozen=True)
class Launch:
    """One server: flags on top of CPU_ARGS, whether plugins load, the attention backend,
    extra environment variables, the device.

    `attention` torch_native is SGLang's CPU backend (naming it also turns CUDA graphs
    off); None leaves the choice to the flags, e.g. to `--kv-compression`. On `device`
    "cuda" the server is SGLang's own: neither CPU_ARGS nor the CPU stand-ins, the flags
    (and a backend such as triton) are the caller's.
    """

    args: Sequence[str] = ()
    plugins: bool = True
    attention: str | None = "torch_native"
    env: Sequence[tuple[str, str]] = ()
    device: Literal["cpu", "cuda"] = "cpu"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def post(self, route: str, payload: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        response = requests.post(f"{self.url}{route}", json=payload, timeout=timeout)
        assert response.ok, f"POST {route} -> {response.status_code}: {response.text[:500]}"
        return response.json()

    def generate(self, input_ids: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
        """Greedy `/generate` on token ids; returns `output_ids` and `meta_info`."""
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        return self.post("/generate", {"input_ids": list(input_ids), "sampling_params": params})

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health_generate", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(
    plugins: bool, extra: Iterable[tuple[str, str]] = (), shims: bool = True
) -> dict[str, str]:
    env = dict(os.environ)
    if shims:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIMS), env.get("PYTHONPATH")) if p)
    env.pop("SGLANG_USE_CPU_ENGINE", None)  # set, SGLang imports sgl_kernel CPU ops
    env.pop("TRITON_INTERPRET", None)  # the kernel tests' interpreter, not the server's
    env.pop("SGLANG_PLUGINS", None)
    if not plugins:
        env["SGLANG_PLUGINS"] = NO_PLUGINS
    env.update(extra)
    return env


def start(model_dir: Path, log_path: Path, launch: Launch) -> Server:
    """Launch without waiting; stdout and stderr go to `log_path`."""
    port = free_port()
    cpu = launch.device == "cpu"
    attention = ("--attention-backend", launch.attention) if launch.attention else ()
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        *(CPU_ARGS if cpu else ()), *attention, *launch.args,
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            env=server_env(launch.plugins, launch.env, shims=cpu),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def stop(servers: Iterable[Server], grace: float = 30) -> None:
    """SIGTERM (each server drains and ends its process tree), then kill leftovers by PID."""
    servers = list(servers)
    children = []
    for server in servers:
        with suppress(psutil.NoSuchProcess):
            children += psutil.Process(server.proc.pid).children(recursive=True)
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.proc.wait(grace)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        with suppress(psutil.NoSuchProcess):
            child.kill()


@contextmanager
def running_servers(
    model_dir: Path, log_dir: Path, launches: Mapping[str, Launch], timeout: float = 240
) -> Iterator[dict[str, Server]]:
    """Healthy servers by name (logs at `log_dir/NAME.log`) for the `with` block.

    A server that exits or stays unhealthy past `timeout` raises with its log tail. One
    whose free port was taken before it bound it (by another server's internal ports) is
    started again on another port.
    """
    servers: dict[str, Server] = {}
    try:
        for name, launch in launches.items():
            servers[name] = start(model_dir, log_dir / f"{name}.log", launch)
        deadline = time.monotonic() + timeout
        waiting = dict(servers)
        restarts = 0
        while waiting:
            for name, server in list(waiting.items()):
                if restarts < 3 and "address already in use" in server.log():
                    stop([server])
                    restarts += 1
                    servers[name] = waiting[name] = start(
                        model_dir, log_dir / f"{name}.log", launches[name]
                    )
                    continue
                if server.proc.poll() is not None:
                    raise RuntimeError(
                        f"server {name} exited with {server.proc.returncode} during start-up "
                        f"(log {server.log_path}):\n{server.tail()}"
                    )
                if server.healthy():
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                name, server = next(iter(waiting.items()))
                raise TimeoutError(
                    f"server {name} not healthy after {timeout:.0f} s (log {server.log_path}):\n"
                    f"{server.tail()}"
                )
            time.sleep(1)
        yield servers
    finally:
        stop(servers.values())


@contextmanager
def running_server(
    model_dir: Path, log_dir: Path, launch: Launch = Launch(), timeout: float = 180
) -> Iterator[Server]:
    with running_servers(model_dir, log_dir, {"server": launch}, timeout) as servers:
        yield servers["server"]


def failed_start(
    model_dir: Path, log_path: Path, launch: Launch, timeout: float = 120
) -> tuple[int, str]:
    """Start a server that must refuse to start: (exit code, log text) once it exits.

    A server still running at `timeout`, or one that becomes healthy, is stopped and
    reported as an AssertionError: the refusal did not happen.
    """
    server = start(model_dir, log_path, launch)
    deadline = time.monotonic() + timeout
    try:
        while server.proc.poll() is None:
            if time.monotonic() > deadline or server.healthy():
                raise AssertionError(
                    f"server did not refuse to start within {timeout:.0f} s (log {log_path}):\n"
                    f"{server.tail()}"
                )
            time.sleep(0.5)
    finally:
        stop([server])
    return server.proc.returncode, server.log()


def launch_command(args: Sequence[str]) -> list[str]:
    """`sglang.launch_server` with the CPU defaults before `args` (argparse keeps the last
    of a repeated flag, so the user's win) and torch_native attention unless `args` pick a
    backend or `--kv-compression` (which picks ours)."""
    chosen = any(a.split("=")[0] in ("--attention-backend", "--kv-compression") for a in args)
    attention = () if chosen else ("--attention-backend", "torch_native")
    return [sys.executable, "-m", "sglang.launch_server", *CPU_ARGS, *attention, *args]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") and len(args) == 1:
        print(__doc__.strip())
        print(f"\nCPU defaults: {' '.join(CPU_ARGS)} --attention-backend torch_native")
        return
    cmd = launch_command(args)
    os.execvpe(cmd[0], cmd, server_env(plugins=True))


if __name__ == "__main__":
    main()
