#!/usr/bin/env python
"""hwr-batch benchmark suite (run on demand; never part of CI's pass/fail).

    python benchmarks/run.py all        [--pages 200] [--model M.onnx] [--out benchmarks/results]
    python benchmarks/run.py classify   # (a) ONNX Runtime vs Keras predict, batch-size / thread sweep
    python benchmarks/run.py segment    # (b) layout + segment + normalise per 300 dpi page
    python benchmarks/run.py e2e        # (c) real CLI, -j 1 vs -j N: pages/s, peak memory, stage times
    python benchmarks/run.py startup    # (d) `hwr-batch --help` and one page end to end
    python benchmarks/run.py tesseract  # (e) Tesseract beside hwr-batch: pages/s and accuracy on the same pages
    python benchmarks/run.py dask       # (f) process --dask local:N beside -j N: pages/s, equal tables, sizing

Every benchmark writes OUT/<name>.json (machine, versions, load, exact command line, figures, and whether
each bar is met) and prints a table. Generated pages are cached in benchmarks/.cache (reproducible from the
seed: page k of seed s is ``np.random.default_rng([s, k])``), so reruns do not regenerate them.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = HERE / ".cache"
DEFAULT_OUT = HERE / "results"
SHIPPED_MODEL = REPO / "models" / "hwr-digits.onnx"
PAGE_DPI = 300

BARS = {
    "classify_digits_per_s": 30_000,
    "classify_speedup_vs_keras": 6.0,
    "e2e_pages_per_s": 8.0,
    "e2e_speedup_vs_j1": 1.7,
    "e2e_peak_rss_bytes": 1 << 30,
    "help_seconds": 0.5,
    "one_page_seconds": 2.0,
}


# ----------------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Machine, versions, load and the exact command line: stamped on every result."""
    versions = {d: _version(d) for d in (
        "hwr-batch", "onnxruntime", "numpy", "opencv-python-headless", "tensorflow", "keras", "pillow", "pandas")}
    tess = shutil.which("tesseract")
    if tess:
        try:
            out = subprocess.run([tess, "--version"], capture_output=True, text=True, timeout=20, check=False)
            versions["tesseract"] = (out.stdout or out.stderr).splitlines()[0].split()[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            versions["tesseract"] = "?"
    git = {}
    try:  # read-only
        git["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10, check=False).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "hwr_batch"], capture_output=True,
                                text=True, timeout=10, check=False).stdout
        git["hwr_batch_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    git["hwr_batch_source_sha256"] = source_hash()  # the code measured, even when uncommitted
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (runs on 3.10)
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "versions": versions,
        "git": git,
        "loadavg_start": list(os.getloadavg()),
    }


def source_hash() -> str:
    """Hash of hwr_batch/*.py: which code was measured (and whether it changed during a benchmark)."""
    import hashlib

    source = hashlib.sha256()
    for f in sorted((REPO / "hwr_batch").glob("*.py")):
        source.update(f.name.encode() + b"\0" + f.read_bytes())
    return source.hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(out_dir: Path, name: str, env: dict[str, Any], result: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**env, "loadavg_end": list(os.getloadavg())}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": env, **result}, indent=1, default=_json_default))
    log(f"wrote {path}")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    text = "\n".join([f"\n== {title}", line(header), line(["-" * w for w in widths]), *map(line, cells)])
    print(text, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if values else float("nan")


def hwr_batch_exe() -> str:
    exe = Path(sys.executable).parent / "hwr-batch"
    return str(exe) if exe.exists() else (shutil.which("hwr-batch") or "hwr-batch")


def resolve_model(arg: Path | None) -> Path:
    model = arg or (SHIPPED_MODEL if SHIPPED_MODEL.exists() else None)
    if model is None:
        sys.exit(f"no model: {SHIPPED_MODEL} does not exist; give --model PATH.onnx")
    model = Path(model).resolve()
    if model.suffix == ".keras":
        model = model.with_suffix(".onnx")
    if not model.exists():
        sys.exit(f"model {model} does not exist")
    return model


def mnist_dir(arg: Path | None) -> Path | None:
    """--data-dir, else $HWR_BATCH_MNIST_DIR, else ../shared/data/mnist beside the repo, else the package default."""
    if arg:
        return arg
    if os.environ.get("HWR_BATCH_MNIST_DIR"):
        return Path(os.environ["HWR_BATCH_MNIST_DIR"])
    for candidate in (REPO.parent / "shared" / "data" / "mnist", Path("/work/shared/data/mnist")):
        if (candidate / "t10k-images-idx3-ubyte.gz").exists():
            return candidate
    return None


# ----------------------------------------------------------------------------------------- page cache

_DIGITS = None


def _gen_init(data_dir: str | None) -> None:
    global _DIGITS
    import cv2

    cv2.setNumThreads(1)
    from hwr_batch.mnist import load_mnist

    _DIGITS = load_mnist("test", Path(data_dir) if data_dir else None)


def _gen_page(args: tuple[str, int, int]) -> int:
    from hwr_batch.synth import write_forms

    folder, seed, k = args
    # write_forms writes page_k.png then page_k.json: the JSON marks a complete page.
    write_forms(folder, 1, seed=seed, digits=_DIGITS, formats=("png",), dpi=PAGE_DPI, start=k)
    return k


def ensure_pages(cache: Path, n: int, seed: int, data_dir: Path | None, jobs: int) -> Path:
    """A folder holding exactly pages 1..n of ``seed`` (PNG + truth JSON), generated once and cached.

    All pages of a seed live in ``cache/pages-s{seed}-300dpi``; the folder for ``n`` pages is
    ``cache/sets/s{seed}-n{n}``, of hard links to them, so a benchmark over n pages sees exactly n files.
    """
    import multiprocessing

    store = cache / f"pages-s{seed}-{PAGE_DPI}dpi"
    store.mkdir(parents=True, exist_ok=True)
    missing = [k for k in range(1, n + 1) if not (store / f"page_{k:04d}.json").exists()]
    if missing:
        log(f"generating {len(missing)} pages into {store} ({jobs} processes; cached for reruns)")
        started = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs, initializer=_gen_init, initargs=(str(data_dir) if data_dir else None,)) as pool:
            for i, _ in enumerate(pool.imap_unordered(_gen_page, [(str(store), seed, k) for k in missing]), 1):
                if i % 20 == 0 or i == len(missing):
                    log(f"  {i}/{len(missing)} pages ({time.perf_counter() - started:.0f}s)")
    sets = cache / "sets" / f"s{seed}-n{n}"
    if not sets.exists():
        tmp = sets.with_name(sets.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k in range(1, n + 1):
            for suffix in (".png", ".json"):
                src = store / f"page_{k:04d}{suffix}"
                try:
                    os.link(src, tmp / src.name)
                except OSError:
                    shutil.copy2(src, tmp / src.name)
        tmp.rename(sets)
    return sets


def page_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("page_*.png"))


# ------------------------------------------------------------------------------------ process-tree memory


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _direct_children(pid: int) -> list[int] | None:
    """A process's children from /proc/PID/task/*/children (None if the kernel does not offer it)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for task in tasks:
        try:
            kids.extend(int(k) for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except FileNotFoundError:
            if Path(f"/proc/{pid}/task/{task}").exists():
                return None  # the thread is there but its children file is not: no CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return kids


def _tree(pid: int) -> list[int]:
    """A process and all its descendants. Walks /proc/PID/task/*/children (a few files for the CLI's
    tree) rather than every process's stat: the full scan cost the sampler ~2 ms a poll, and the sampler
    shares the 2 cores with the run it measures."""
    out, todo = [], [pid]
    kids_map: dict[int, list[int]] | None = None
    while todo:
        p = todo.pop()
        out.append(p)
        kids = _direct_children(p) if kids_map is None else kids_map.get(p, [])
        if kids is None:  # no /proc/PID/task/*/children here: fall back to scanning every process
            kids_map = _children_map()
            kids = kids_map.get(p, [])
        todo.extend(kids)
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (not its children), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def _hwm(pid: int) -> int:
    """VmHWM: a process's own peak RSS since its last exec (bytes)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rss_pss(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for p in pids:
        try:
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, poll: float = 0.1) -> dict[str, Any]:
    """Run ``cmd``; wall time, exit code, output, and peak memory of its whole process tree.

    Peak memory three ways: the largest sum of RSS over the tree (polled from /proc every ``poll`` s;
    counts shared pages once per process, so it over-counts), the largest sum of PSS (shared pages split
    between the processes sharing them: the fairest "memory used"), and ru_maxrss from wait4 (the
    largest single process, including reaped descendants).
    """
    peak = {"rss": 0, "pss": 0}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out_chunks: dict[str, str] = {}

    def drain(name: str, stream: Any) -> None:
        out_chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True) for n, s in (("stdout", proc.stdout),
                                                                                       ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    done = threading.Event()

    cpu: dict[int, float] = {}

    def sampler() -> None:
        while not done.is_set():
            pids = _tree(proc.pid)
            rss, pss = _rss_pss(pids)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            for pid in pids:
                peak["hwm"] = max(peak.get("hwm", 0), _hwm(pid))
                seconds = _cpu_seconds(pid)
                if seconds is not None:
                    cpu[pid] = seconds
            done.wait(poll)

    sampling = threading.Thread(target=sampler, daemon=True)
    sampling.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    sampling.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    return {
        "cmd": shlex.join(cmd), "wall_s": wall, "returncode": proc.returncode,
        "peak_tree_rss_bytes": peak["rss"], "peak_tree_pss_bytes": peak["pss"],
        # VmHWM polled per process. Not ru_maxrss from wait4/RUSAGE_CHILDREN: Linux carries the forking
        # parent's RSS into the child's maxrss (this script may hold TensorFlow), and it misses the workers.
        "max_single_process_rss_bytes": peak.get("hwm", 0),
        "user_cpu_s": usage.ru_utime, "sys_cpu_s": usage.ru_stime,
        # ru_*time misses descendants that were never reaped by the root (e.g. forkserver workers); the
        # polled sum over every process seen in the tree does not (it may miss each one's last `poll` s).
        "tree_cpu_s": sum(cpu.values()),
        "root_cpu_s": cpu.get(proc.pid),  # the main process alone (with --dask: the client)
        "stdout": out_chunks.get("stdout", ""), "stderr": out_chunks.get("stderr", ""),
    }


_SUMMARY = re.compile(r"(\d+) files found: .*?; (\d+) pages, (\d+) fields, (\d+) digits.*?; ([\d.]+)s \(([\d.]+) pages/s; (.*)\)\s*$")


def parse_summary(stderr: str) -> dict[str, Any] | None:
    """The CLI's closing summary line (logged at INFO with -v): counts, seconds and per-stage seconds."""
    for line in reversed(stderr.splitlines()):
        m = _SUMMARY.search(line)
        if m:
            stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", m.group(7))}
            return {"files": int(m.group(1)), "pages": int(m.group(2)), "fields": int(m.group(3)),
                    "digits": int(m.group(4)), "seconds": float(m.group(5)), "pages_per_s": float(m.group(6)),
                    "stage_seconds": stages, "line": line.strip()}
    return None


def cli_process(inputs: list[Path], out: Path, model: Path, jobs: int | None, *, verbose: bool = True) -> dict[str, Any]:
    cmd = [hwr_batch_exe(), *(["-v"] if verbose else []), "process", *map(str, inputs), "-o", str(out),
           "-m", str(model)]
    if jobs is not None:
        cmd += ["-j", str(jobs)]
    before = source_hash()
    r = run_measured(cmd)
    r["source_sha256_before_after"] = [before, source_hash()]
    r["summary"] = parse_summary(r["stderr"])
    if r["returncode"] != 0:
        log(f"warning: `{r['cmd']}` exited {r['returncode']}: {r['stderr'][-2000:]}")
    return r


# ------------------------------------------------------------------------------------- (a) classification


def bench_classify(args: argparse.Namespace) -> dict[str, Any]:
    from hwr_batch.classify import load_classifier, predict_proba
    from hwr_batch.mnist import load_mnist

    model = resolve_model(args.model)
    data = load_mnist("test", mnist_dir(args.data_dir))
    reps = max(1, -(-args.digits // len(data)))
    x = np.concatenate([data.images] * reps)[: args.digits].astype(np.float32) / 255.0  # like to_mnist's output
    n = len(x)
    log(f"classify: {n} MNIST test digits, model {model}")

    cpu_of: dict[float, float] = {}

    def best_of(fn: Any, repeats: int) -> tuple[float, list[float]]:
        """Best wall time of ``repeats`` runs; the CPU time of this process in that run goes to ``cpu_of``."""
        times = []
        for _ in range(repeats):
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall = time.perf_counter() - t
            cpu_of[wall] = time.process_time() - c
            times.append(wall)
        return min(times), times

    # Product path: default session (threads=0: all cores) and predict_proba's default batch size.
    clf = load_classifier(model)
    predict_proba(clf, x[:1024])  # warm up
    ort_best, ort_times = best_of(lambda: predict_proba(clf, x), args.repeats)
    p_ort = predict_proba(clf, x)

    sweep = []
    for threads in (1, 2):
        c = load_classifier(model, threads=threads)
        predict_proba(c, x[:1024])
        for bs in (64, 256, 1024, 4096, n):
            best, times = best_of(lambda c=c, bs=bs: predict_proba(c, x, batch_size=bs), args.sweep_repeats)
            sweep.append({"threads": threads, "batch_size": bs if bs != n else "all", "best_s": best,
                          "digits_per_s": n / best, "cpu_s": cpu_of[best], "digits_per_cpu_s": n / cpu_of[best],
                          "times_s": times})

    keras_result: dict[str, Any] = {"available": False}
    keras_path = model.with_suffix(".keras")
    if keras_path.exists() and not args.no_keras:
        log("classify: loading TensorFlow/Keras for the baseline")
        t = time.perf_counter()
        import keras

        kmodel = keras.models.load_model(keras_path)
        load_s = time.perf_counter() - t
        xk = x[..., None]
        kmodel.predict(xk[:1024], verbose=0)  # warm up (graph tracing)
        k_best, k_times = best_of(lambda: kmodel.predict(xk, verbose=0), args.repeats)  # default batch_size=32
        p_keras = kmodel.predict(xk, verbose=0)
        kmodel.predict(xk[:4096], batch_size=1024, verbose=0)
        k_big_best, k_big_times = best_of(lambda: kmodel.predict(xk, batch_size=1024, verbose=0), args.sweep_repeats)
        p_keras = p_keras[:, : p_ort.shape[1]]  # predict_proba leaves out a reject class ("not a digit")
        diff = float(np.abs(p_keras - p_ort).max())
        agree = float((p_keras.argmax(1) == p_ort.argmax(1)).mean())
        keras_result = {
            "available": True, "path": str(keras_path), "import_and_load_s": load_s,
            "predict_default_batch32": {"best_s": k_best, "digits_per_s": n / k_best, "cpu_s": cpu_of[k_best],
                                        "times_s": k_times},
            "predict_batch1024": {"best_s": k_big_best, "digits_per_s": n / k_big_best, "cpu_s": cpu_of[k_big_best],
                                  "times_s": k_big_times},
            "max_abs_prob_diff": diff, "argmax_agreement": agree, "agree_within_1e-5": diff <= 1e-5,
        }
    ort_rate = n / ort_best
    result = {
        "model": str(model), "digits": n, "repeats": args.repeats, "sweep_repeats": args.sweep_repeats,
        "timing": "best wall time of repeats (after one warm-up call)",
        "onnxruntime": {"threads": "default (0 = all cores)", "batch_size": "predict_proba default",
                        "best_s": ort_best, "digits_per_s": ort_rate, "cpu_s": cpu_of[ort_best], "times_s": ort_times},
        "keras": keras_result, "ort_sweep": sweep,
    }
    bars = {"digits_per_s >= 30000": ort_rate >= BARS["classify_digits_per_s"]}
    rows = [["ONNX Runtime predict_proba (product defaults)", n, ort_best, ort_rate, cpu_of[ort_best], ""]]
    if keras_result["available"]:
        kr = keras_result["predict_default_batch32"]["digits_per_s"]
        kb = keras_result["predict_batch1024"]["digits_per_s"]
        result["speedup_vs_keras_predict"] = ort_rate / kr
        result["speedup_vs_keras_predict_batch1024"] = ort_rate / kb
        bars["speedup >= 6x keras predict"] = ort_rate / kr >= BARS["classify_speedup_vs_keras"]
        bars["max abs prob diff <= 1e-5"] = keras_result["agree_within_1e-5"]
        rows += [["Keras Model.predict (default batch 32)", n, keras_result["predict_default_batch32"]["best_s"], kr,
                  keras_result["predict_default_batch32"]["cpu_s"], f"ORT {ort_rate / kr:.1f}x"],
                 ["Keras Model.predict (batch 1024)", n, keras_result["predict_batch1024"]["best_s"], kb,
                  keras_result["predict_batch1024"]["cpu_s"], f"ORT {ort_rate / kb:.1f}x"]]
    result["bars"] = bars
    table("(a) classification throughput (best wall time of repeats; CPU s = this process, all threads)",
          ["engine", "digits", "best s", "digits/s", "CPU s", "ratio"], rows)
    table("(a) ONNX Runtime sweep", ["intra-op threads", "batch size", "best s", "digits/s", "CPU s", "digits/CPU-s"],
          [[s["threads"], s["batch_size"], s["best_s"], s["digits_per_s"], s["cpu_s"], s["digits_per_cpu_s"]] for s in sweep])
    if keras_result["available"]:
        table("(a) agreement", ["max |p_ort - p_keras|", "argmax agreement", "<= 1e-5"],
              [[keras_result["max_abs_prob_diff"], keras_result["argmax_agreement"], keras_result["agree_within_1e-5"]]])
    _print_bars(bars)
    return result


def _print_bars(bars: dict[str, bool]) -> None:
    table("bars", ["bar", "met"], [[k, v] for k, v in bars.items()])


# --------------------------------------------------------------------------- (b) segmentation per page


def bench_segment(args: argparse.Namespace) -> dict[str, Any]:
    import cv2

    from hwr_batch.pipeline import ReadSettings, read_file

    cv2.setNumThreads(args.cv_threads)  # workers run OpenCV single-threaded (hwr_batch.read._init_worker)
    n = min(args.segment_pages, args.pages)
    folder = ensure_pages(args.cache, n, args.seed, mnist_dir(args.data_dir), args.gen_jobs)
    files = page_files(folder)[:n]
    log(f"segment: {len(files)} pages, OpenCV threads {args.cv_threads}")
    read_file(files[0], ReadSettings())  # warm up imports and caches
    per_page = []
    for path in files:
        c, t = time.process_time(), time.perf_counter()
        r = read_file(path, ReadSettings())
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if r.error:
            log(f"warning: {path}: {r.error}")
        s = r.seconds
        per_page.append({"file": path.name, "wall_s": wall, "cpu_s": cpu, **{k: s.get(k, 0.0) for k in ("load", "layout", "segment", "normalise")},
                         "layout_segment_normalise_s": s.get("layout", 0) + s.get("segment", 0) + s.get("normalise", 0),
                         "fields": sum(len(p.fields) for p in r.pages), "candidates": len(r.images)})
    stats = {}
    for key in ("load", "layout", "segment", "normalise", "layout_segment_normalise_s", "wall_s", "cpu_s"):
        vals = [p[key] for p in per_page]
        stats[key] = {"median_s": statistics.median(vals), "p90_s": percentile(vals, 90), "mean_s": statistics.fmean(vals),
                      "total_s": sum(vals)}
    total = stats["layout_segment_normalise_s"]["total_s"]
    result = {"pages": len(files), "dpi": PAGE_DPI, "opencv_threads": args.cv_threads, "stats": stats, "per_page": per_page,
              "share_of_lsn": {k: stats[k]["total_s"] / total for k in ("layout", "segment", "normalise")} if total else {},
              "fields_per_page_median": statistics.median(p["fields"] for p in per_page),
              "candidates_per_page_median": statistics.median(p["candidates"] for p in per_page)}
    if args.profile:
        result["profile_top"] = _profile_pages(files[: args.profile], read_file, ReadSettings())
    table(f"(b) per 300 dpi A4 page ({len(files)} pages, OpenCV threads {args.cv_threads})",
          ["stage", "median s", "p90 s", "mean s", "share of l+s+n"],
          [[k, stats[k]["median_s"], stats[k]["p90_s"], stats[k]["mean_s"],
            f"{100 * result['share_of_lsn'][k]:.0f}%" if k in result["share_of_lsn"] else ""]
           for k in ("load", "layout", "segment", "normalise", "layout_segment_normalise_s", "wall_s", "cpu_s")])
    if args.profile:
        table(f"(b) profile over {args.profile} pages (top by own time)", ["function", "calls", "own s", "cum s"],
              [[f["function"], f["calls"], f["tottime_s"], f["cumtime_s"]] for f in result["profile_top"]])
    return result


def _profile_pages(files: list[Path], read_file: Any, settings: Any) -> list[dict[str, Any]]:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for f in files:
        read_file(f, settings)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(filename).name}:{line}({func})" if line else func, "calls": nc,
                     "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:15]


# ----------------------------------------------------------------------------------------- (c) end to end


def bench_e2e(args: argparse.Namespace) -> dict[str, Any]:
    model = resolve_model(args.model)
    folder = ensure_pages(args.cache, args.pages, args.seed, mnist_dir(args.data_dir), args.gen_jobs)
    n = len(page_files(folder))
    jobs = args.jobs or os.cpu_count() or 1
    runs = {}
    with tempfile.TemporaryDirectory(prefix="hwr-bench-e2e-") as tmp:
        for j in (1, jobs) if jobs > 1 else (1,):
            log(f"e2e: {n} pages, -j {j}")
            r = cli_process([folder], Path(tmp) / f"out-j{j}", model, j)
            r["pages_per_s"] = n / r["wall_s"]
            if args.keep_outputs:
                dest = args.out / f"e2e-output-j{j}"
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(Path(tmp) / f"out-j{j}", dest, ignore=shutil.ignore_patterns(".hwr-batch"))
            r.pop("stdout")
            r["stderr_tail"] = r.pop("stderr")[-3000:]
            runs[f"j{j}"] = r
        consistency = _compare_outputs(Path(tmp) / "out-j1", Path(tmp) / f"out-j{jobs}") if jobs > 1 else None
    hashes = {h for r in runs.values() for h in r["source_sha256_before_after"]}
    if consistency is not None:
        consistency["same_source"] = len(hashes) == 1
        if len(hashes) > 1:
            log("warning: hwr_batch/*.py changed while the e2e runs ran: -j 1 and -j N did not run the same code, "
                "so their outputs and speeds are not comparable; rerun")
    base, best = runs["j1"], runs[f"j{jobs}"]
    speedup = best["pages_per_s"] / base["pages_per_s"]
    peak = max(r["peak_tree_rss_bytes"] for r in runs.values())
    result = {"model": str(model), "pages": n, "folder": str(folder), "jobs": jobs, "runs": runs,
              "speedup_vs_j1": speedup, "pages_per_s": best["pages_per_s"], "j1_vs_jN_fields": consistency,
              "bars": {f"pages/s >= 8 (-j {jobs})": best["pages_per_s"] >= BARS["e2e_pages_per_s"],
                       f"-j {jobs} >= 1.7x -j 1": speedup >= BARS["e2e_speedup_vs_j1"],
                       "peak tree RSS < 1 GB": peak < BARS["e2e_peak_rss_bytes"]}}
    mb = 1 / 2**20
    table(f"(c) end to end: `hwr-batch process` over {n} pages (wall includes start-up and model load)",
          ["run", "exit", "wall s", "pages/s", "CLI s", "CPU s/page", "peak tree RSS MB", "peak tree PSS MB", "max 1-proc RSS MB",
           "vs -j 1"],
          [[k, r["returncode"], r["wall_s"], r["pages_per_s"], (r["summary"] or {}).get("seconds", float("nan")),
            r["tree_cpu_s"] / n,
            r["peak_tree_rss_bytes"] * mb, r["peak_tree_pss_bytes"] * mb, r["max_single_process_rss_bytes"] * mb,
            f"{r['pages_per_s'] / base['pages_per_s']:.2f}x"] for k, r in runs.items()])
    stages = [k for k in ("load", "layout", "segment", "normalise", "classify", "write")]
    table("(c) per-stage seconds reported by the CLI (load..normalise summed over workers; classify, write in the main process)",
          ["run", *stages, "per page (l+s+n)"],
          [[k, *[(r["summary"] or {}).get("stage_seconds", {}).get(s, float("nan")) for s in stages],
            sum((r["summary"] or {}).get("stage_seconds", {}).get(s, 0) for s in ("layout", "segment", "normalise")) / n]
           for k, r in runs.items()])
    if consistency:
        table(f"(c) same result with -j 1 and -j {jobs}? (fields.csv compared by file, page, field)",
              ["fields -j 1", f"fields -j {jobs}", "same digits", "differ", "only in one", "same source code"],
              [[consistency["fields_a"], consistency["fields_b"], consistency["same"], consistency["differ"],
                consistency["only_in_one"], consistency["same_source"]]])
    _print_bars(result["bars"])
    return result


def _compare_outputs(a: Path, b: Path) -> dict[str, Any] | None:
    """Compare two runs' fields.csv: the reading must not depend on -j."""
    import pandas as pd

    try:
        fa, fb = (pd.read_csv(d / "fields.csv", dtype={"digits": str}, keep_default_na=False) for d in (a, b))
    except OSError:
        return None
    key = ["file", "page", "field"]
    m = fa.merge(fb, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
    both = m[m["_merge"] == "both"]
    differ = both[both["digits_a"] != both["digits_b"]]
    return {"fields_a": len(fa), "fields_b": len(fb), "same": int(len(both) - len(differ)), "differ": len(differ),
            "only_in_one": int((m["_merge"] != "both").sum()),
            "examples": differ[[*key, "digits_a", "digits_b"]].head(10).to_dict("records")}


# ------------------------------------------------------------------------------------------- (d) start-up


def bench_startup(args: argparse.Namespace) -> dict[str, Any]:
    model = resolve_model(args.model)
    folder = ensure_pages(args.cache, 1, args.seed, mnist_dir(args.data_dir), 1)
    page = page_files(folder)[0]
    exe = hwr_batch_exe()
    run_measured([exe, "--help"])  # warm the page cache
    help_times = [run_measured([exe, "--help"])["wall_s"] for _ in range(args.startup_runs)]
    one = []
    with tempfile.TemporaryDirectory(prefix="hwr-bench-startup-") as tmp:
        cli_process([page], Path(tmp) / "warm", model, None, verbose=False)
        for i in range(args.startup_runs):
            r = cli_process([page], Path(tmp) / f"out{i}", model, None, verbose=False)
            one.append(r["wall_s"])
    # Import cost of the modules `process` needs, from a cold interpreter (where start-up time goes).
    imports = {}
    for mod in ("hwr_batch.cli", "cv2", "onnxruntime", "pandas", "hwr_batch.pipeline"):
        ts = [run_measured([sys.executable, "-c", f"import {mod}"])["wall_s"] for _ in range(3)]
        imports[mod] = statistics.median(ts)
    bare = statistics.median(run_measured([sys.executable, "-c", "pass"])["wall_s"] for _ in range(3))
    result = {"model": str(model), "page": str(page), "runs": args.startup_runs,
              "help_s": {"median": statistics.median(help_times), "all": help_times},
              "one_page_s": {"median": statistics.median(one), "all": one},
              "python_bare_s": bare, "cold_import_s": imports,
              "bars": {"--help < 0.5 s": statistics.median(help_times) < BARS["help_seconds"],
                       "one page < 2 s": statistics.median(one) < BARS["one_page_seconds"]}}
    table("(d) start-up (median of runs)", ["what", "median s", "min s", "max s"],
          [["hwr-batch --help", statistics.median(help_times), min(help_times), max(help_times)],
           ["hwr-batch process one_page.png (incl. model load)", statistics.median(one), min(one), max(one)]])
    table("(d) cold import, median of 3 (python -c 'import X')", ["module", "s"],
          [["(bare interpreter)", bare], *[[k, v] for k, v in imports.items()]])
    _print_bars(result["bars"])
    return result


# ------------------------------------------------------------------------------------- (e) Tesseract


def score(truth_texts: list[str], read_texts: list[str | None]) -> dict[str, Any]:
    """Field exact match, and digit accuracy = 1 - (edit distance) / (truth digits), summed over fields.

    A truth field that was not found reads as "" (all its digits count as deletions).
    """
    from hwr_batch.evaluate import edit_distance

    exact = sum(1 for t, r in zip(truth_texts, read_texts) if r is not None and r == t)
    edits = sum(edit_distance(r or "", t) for t, r in zip(truth_texts, read_texts))
    digits = sum(len(t) for t in truth_texts)
    found = sum(1 for r in read_texts if r is not None)
    return {"fields": len(truth_texts), "fields_found": found, "field_exact_match": exact / len(truth_texts) if truth_texts else 0,
            "truth_digits": digits, "edit_distance": edits, "digit_accuracy": max(0.0, 1 - edits / digits) if digits else 0}


def match_fields(truth_fields: list[dict], read: list[tuple[tuple[int, int, int, int], str]], min_iou: float) -> tuple[list[str | None], int]:
    """Greedy one-to-one matching of read fields to truth fields by box IoU (>= ``min_iou``).

    Returns the text read for each truth field (None: no match) and the number of unmatched read fields.
    """
    from hwr_batch.layout import box_iou

    pairs = sorted(((box_iou(t["bbox"], box), ti, ri) for ti, t in enumerate(truth_fields) for ri, (box, _) in enumerate(read)),
                   reverse=True)
    out: list[str | None] = [None] * len(truth_fields)
    used = set()
    for v, ti, ri in pairs:
        if v < min_iou:
            break
        if out[ti] is None and ri not in used:
            out[ti] = read[ri][1]
            used.add(ri)
    return out, len(read) - len(used)


def _tesseract_page_tsv(args: tuple[str, str, str]) -> tuple[str, float, str]:
    tess, image, psm = args
    t = time.perf_counter()
    r = subprocess.run([tess, image, "stdout", "--psm", psm, "-c", "tessedit_char_whitelist=0123456789", "tsv"],
                       capture_output=True, text=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"}, check=False)
    return image, time.perf_counter() - t, r.stdout


def _tesseract_crops(args: tuple[str, list[str]]) -> list[str]:
    """psm 7 (one text line) on each crop; one tesseract process per page, its crops given as a list file."""
    tess, crops = args
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(crops) + "\n")
        listing = f.name
    try:
        r = subprocess.run([tess, listing, "stdout", "--psm", "7", "-c", "tessedit_char_whitelist=0123456789"],
                           capture_output=True, text=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"}, check=False)
    finally:
        os.unlink(listing)
    texts = r.stdout.split("\f")
    if len(texts) < len(crops):  # should not happen; fall back to one process per crop
        texts = [subprocess.run([tess, c, "stdout", "--psm", "7", "-c", "tessedit_char_whitelist=0123456789"],
                                capture_output=True, text=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"}, check=False).stdout
                 for c in crops]
    return [re.sub(r"\D", "", t) for t in texts[: len(crops)]]


def _words_in_fields(tsv: str, truth_fields: list[dict]) -> list[str | None]:
    """Full-page Tesseract: each truth field reads as the words whose box centre lies in it, left to right."""
    words = []
    for line in tsv.splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 12 or parts[0] != "5":
            continue
        text = re.sub(r"\D", "", parts[11])
        if text:
            x, y, w, h = map(int, parts[6:10])
            words.append((x + w / 2, y + h / 2, x, text))
    out: list[str | None] = []
    for f in truth_fields:
        fx, fy, fw, fh = f["bbox"]
        inside = sorted((x0, t) for cx, cy, x0, t in words if fx <= cx <= fx + fw and fy <= cy <= fy + fh)
        out.append("".join(t for _, t in inside) if inside else None)
    return out


def bench_tesseract(args: argparse.Namespace) -> dict[str, Any]:
    import cv2
    import pandas as pd

    tess = shutil.which("tesseract")
    if not tess:
        sys.exit("tesseract not found: apt-get update && apt-get install -y tesseract-ocr (benchmarks only)")
    model = resolve_model(args.model)
    n = min(args.tess_pages, args.pages)
    folder = ensure_pages(args.cache, n, args.seed, mnist_dir(args.data_dir), args.gen_jobs)
    files = page_files(folder)
    truths = {p.name: json.loads(p.with_suffix(".json").read_text()) for p in files}
    jobs = args.jobs or os.cpu_count() or 1
    log(f"tesseract: {n} pages, {jobs} processes")

    # Throughput (and full-page accuracy): one tesseract per page, `jobs` at a time, digits whitelist, psm 3.
    started = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        page_runs = list(pool.map(_tesseract_page_tsv, [(tess, str(p), "3") for p in files]))
    tess_wall = time.perf_counter() - started
    tess_full = []
    for image, _, tsv in page_runs:
        tess_full += _words_in_fields(tsv, truths[Path(image).name]["fields"])

    # Accuracy given the fields (an oracle layout): each truth field's handwriting cropped, read as one line (psm 7).
    truth_texts: list[str] = []
    crop_jobs = []
    with tempfile.TemporaryDirectory(prefix="hwr-bench-tess-") as tmp:
        for p in files:
            gray = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            crops = []
            for i, f in enumerate(truths[p.name]["fields"]):
                # The handwriting only: the union of the truth digit boxes + 6 px (box lines mostly left out,
                # which Tesseract would read as 1s), on a 12 px margin of the crop's paper grey.
                boxes = np.array([d["bbox"] for d in f["digits"]] or [f["bbox"]])
                x0, y0 = boxes[:, 0].min() - 6, boxes[:, 1].min() - 6
                x1, y1 = (boxes[:, 0] + boxes[:, 2]).max() + 6, (boxes[:, 1] + boxes[:, 3]).max() + 6
                crop = gray[max(0, y0): y1, max(0, x0): x1]
                crop = cv2.copyMakeBorder(crop, 12, 12, 12, 12, cv2.BORDER_CONSTANT, value=int(np.percentile(crop, 90)))
                path = Path(tmp) / f"{p.stem}_f{i:02d}.png"
                cv2.imwrite(str(path), crop)
                crops.append(str(path))
                truth_texts.append(f["text"])
            crop_jobs.append((tess, crops))
        started = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            tess_crop = [t for page in pool.map(_tesseract_crops, crop_jobs) for t in page]
        crop_wall = time.perf_counter() - started

        # hwr-batch on the same pages, same number of processes.
        log(f"tesseract: hwr-batch on the same {n} pages, -j {jobs}")
        ours = cli_process([folder], Path(tmp) / "hwr-out", model, jobs)
        fields_csv = Path(tmp) / "hwr-out" / "fields.csv"
        frame = pd.read_csv(fields_csv, dtype={"digits": str}, keep_default_na=False) if fields_csv.exists() else None
    hwr_read: list[str | None] = []
    spurious = 0
    for p in files:
        rows = frame[frame["file"].map(lambda s: Path(s).name) == p.name] if frame is not None else []
        read = [((int(r.x), int(r.y), int(r.width), int(r.height)), str(r.digits)) for r in rows.itertuples()] if len(rows) else []
        texts, extra = match_fields(truths[p.name]["fields"], read, args.min_iou)
        hwr_read += texts
        spurious += extra
    hwr_pps = n / ours["wall_s"]
    result = {
        "pages": n, "jobs": jobs, "model": str(model), "tesseract": shutil.which("tesseract"),
        "accuracy_definition": ("field exact match: read string == truth string, over all truth fields (a field not "
                                "found counts wrong); digit accuracy: 1 - sum(Levenshtein(read, truth)) / sum(len(truth))"),
        "hwr_batch": {"pages_per_s": hwr_pps, "wall_s": ours["wall_s"], "cmd": ours["cmd"],
                      "field_matching": f"box IoU >= {args.min_iou}, greedy one-to-one",
                      "unmatched_read_fields": spurious, **score(truth_texts, hwr_read)},
        "tesseract_full_page": {"pages_per_s": n / tess_wall, "wall_s": tess_wall,
                                "cmd": f"tesseract PAGE stdout --psm 3 -c tessedit_char_whitelist=0123456789 tsv  ({jobs} at a time)",
                                "field_matching": "words whose box centre lies in the truth field box",
                                **score(truth_texts, tess_full)},
                                # Full-page words lying in no field are not counted against it.
        "tesseract_truth_crops": {"wall_s": crop_wall, "fields_per_s": len(truth_texts) / crop_wall,
                                  "cmd": f"tesseract LIST.txt stdout --psm 7 -c tessedit_char_whitelist=0123456789  (one per page, {jobs} at a time)",
                                  "note": "given the true digit boxes (oracle layout and segmentation into a line): recognition only",
                                  **score(truth_texts, tess_crop)},
    }
    sc = lambda k: result[k]
    table(f"(e) peer comparison over {n} generated 300 dpi pages, {jobs} processes",
          ["reader", "pages/s", "fields found", "field exact", "digit acc"],
          [["hwr-batch process (real CLI)", hwr_pps, f"{sc('hwr_batch')['fields_found']}/{len(truth_texts)}",
            sc("hwr_batch")["field_exact_match"], sc("hwr_batch")["digit_accuracy"]],
           ["tesseract full page (psm 3, digits)", n / tess_wall, f"{sc('tesseract_full_page')['fields_found']}/{len(truth_texts)}",
            sc("tesseract_full_page")["field_exact_match"], sc("tesseract_full_page")["digit_accuracy"]],
           ["tesseract on true handwriting crops (psm 7)", "", f"{len(truth_texts)}/{len(truth_texts)} (given)",
            sc("tesseract_truth_crops")["field_exact_match"], sc("tesseract_truth_crops")["digit_accuracy"]]])
    return result


# ------------------------------------------------------------------------------------------------ main

# ------------------------------------------------------------------------------------ (f) Dask cluster

NIGHT_PAGES, NIGHT_HOURS = 1_000_000, 8


def bench_dask(args: argparse.Namespace) -> dict[str, Any]:
    """`process -j N` and `process --dask local:N` (N single-threaded worker processes), alternately, on the
    same pages in the same session; the tables of every run compared byte for byte."""
    model = resolve_model(args.model)
    folder = ensure_pages(args.cache, args.pages, args.seed, mnist_dir(args.data_dir), args.gen_jobs)
    n = len(page_files(folder))
    jobs = args.jobs or os.cpu_count() or 1
    variants = {f"-j {jobs}": ["-j", str(jobs)], f"--dask local:{jobs}": ["--dask", f"local:{jobs}"]}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    tables: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="hwr-bench-dask-") as tmp:
        for repeat in range(args.repeats):
            for name, extra in variants.items():  # alternating, so that a change in the machine's load hits both
                out = Path(tmp) / f"out-{len(tables)}"
                cmd = [hwr_batch_exe(), "-v", "process", str(folder), "-o", str(out), "-m", str(model), *extra]
                log(f"dask: {n} pages, {name} (repeat {repeat + 1}/{args.repeats})")
                r = run_measured(cmd)
                r["pages_per_s"] = n / r["wall_s"]
                r["summary"] = parse_summary(r["stderr"])
                r.pop("stdout")
                r["stderr_tail"] = r.pop("stderr")[-2000:]
                if r["returncode"] != 0:
                    log(f"warning: `{r['cmd']}` exited {r['returncode']}: {r['stderr_tail']}")
                runs[name].append(r)
                tables[f"{name} #{repeat + 1}"] = {t: (out / f"{t}.csv").read_bytes() for t in
                                                  ("digits", "fields", "errors", "pages") if (out / f"{t}.csv").exists()}
    reference = next(iter(tables.values()))
    equal = all(t == reference and len(t) == 4 for t in tables.values())
    best = {name: max(r["pages_per_s"] for r in rs) for name, rs in runs.items()}
    local, dask = best[f"-j {jobs}"], best[f"--dask local:{jobs}"]
    ratio = dask / local
    per_core = dask / jobs  # pages/s per worker core (the client ran on the same cores)
    needed = NIGHT_PAGES / (NIGHT_HOURS * 3600)
    machines = math.ceil(needed / (2 * per_core))
    client_cpu = [r["root_cpu_s"] / r["tree_cpu_s"] for r in runs[f"--dask local:{jobs}"] if r["root_cpu_s"] and r["tree_cpu_s"]]
    result = {
        "model": str(model), "pages": n, "folder": str(folder), "jobs": jobs, "runs": runs,
        "digits": reference["digits"].count(b"\n") - 1 if "digits" in reference else None,
        "tables_equal": equal, "best_pages_per_s": best, "dask_vs_local": ratio,
        "pages_per_s_per_worker_core": per_core, "client_share_of_cpu": max(client_cpu, default=None),
        "night": {"pages": NIGHT_PAGES, "hours": NIGHT_HOURS, "pages_per_s_needed": needed,
                  "two_core_worker_machines": machines},
        "bars": {f"tables of --dask equal those of -j {jobs} ({n} pages)": equal,
                 f"--dask local:{jobs} within 15% of -j {jobs}": ratio >= 0.85},
    }
    table(f"(f) `hwr-batch process` over {n} pages: -j {jobs} beside --dask local:{jobs} (wall of the whole command)",
          ["run", "exit", "wall s", "pages/s", "CPU s/page", "client CPU share", "peak tree PSS MB"],
          [[f"{name} #{i + 1}", r["returncode"], r["wall_s"], r["pages_per_s"], r["tree_cpu_s"] / n,
            (r["root_cpu_s"] or 0) / r["tree_cpu_s"] if r["tree_cpu_s"] else float("nan"), r["peak_tree_pss_bytes"] / 2**20]
           for name, rs in runs.items() for i, r in enumerate(rs)])
    table("(f) ratio and sizing (best run of each)",
          ["-j pages/s", "--dask pages/s", "dask / local", "pages/s per worker core", f"2-core machines for {NIGHT_PAGES:,} pages in {NIGHT_HOURS} h"],
          [[local, dask, f"{ratio:.2f}", per_core, machines]])
    _print_bars(result["bars"])
    return result


BENCHES = {"classify": bench_classify, "segment": bench_segment, "e2e": bench_e2e, "startup": bench_startup,
           "tesseract": bench_tesseract, "dask": bench_dask}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=[*BENCHES, "all"], nargs="+", help="which to run (several allowed)")
    p.add_argument("--model", type=Path, help=f"ONNX model (its .keras twin beside it for the Keras baseline). "
                   f"Default: {SHIPPED_MODEL.relative_to(REPO)} if it exists")
    p.add_argument("--pages", type=int, default=200, help="pages for the end-to-end run (default 200)")
    p.add_argument("--segment-pages", type=int, default=20, help="pages timed one by one in (b) (default 20)")
    p.add_argument("--tess-pages", type=int, default=40, help="pages for the Tesseract comparison (default 40)")
    p.add_argument("--digits", type=int, default=20_000, help="digits classified in (a) (default 20000)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats in (a), and runs of each variant in (f); the best is reported")
    p.add_argument("--sweep-repeats", type=int, default=2, help="timed repeats per configuration of the (a) sweep")
    p.add_argument("--startup-runs", type=int, default=5, help="runs of each start-up command (median reported)")
    p.add_argument("--jobs", "-j", type=int, default=0, help="processes for the parallel runs; 0 = os.cpu_count()")
    p.add_argument("--gen-jobs", type=int, default=os.cpu_count() or 1, help="processes generating pages")
    p.add_argument("--seed", type=int, default=2024, help="seed of the generated pages")
    p.add_argument("--cv-threads", type=int, default=1, help="OpenCV threads in (b) (workers use 1)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="in (b), also cProfile N pages and list hot spots")
    p.add_argument("--min-iou", type=float, default=0.5, help="IoU for matching read fields to truth fields in (e)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras baseline in (a) (no TensorFlow import)")
    p.add_argument("--keep-outputs", action="store_true", help="copy the e2e CSVs into OUT")
    p.add_argument("--data-dir", type=Path, help="MNIST folder (default $HWR_BATCH_MNIST_DIR or ../shared/data/mnist)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="generated pages (default benchmarks/.cache)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON results (default benchmarks/results)")
    args = p.parse_args(argv)
    names = list(BENCHES) if "all" in args.benchmark else list(dict.fromkeys(args.benchmark))
    if "e2e" in names or "tesseract" in names or "dask" in names:
        # Generate the largest page set once, up front, so no benchmark's timing includes generation.
        ensure_pages(args.cache, max(args.pages, args.tess_pages if "tesseract" in names else 0), args.seed,
                     mnist_dir(args.data_dir), args.gen_jobs)
    started = time.perf_counter()
    for name in names:
        env = environment()
        t = time.perf_counter()
        result = BENCHES[name](args)
        result["benchmark_seconds"] = time.perf_counter() - t
        write_result(args.out, name, env, result)
    log(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
