"""Benchmark persist against diskcache, joblib.Memory, plain shelve and bare SQLite.

    pip install -r bench/requirements.txt    # the peers; persist itself needs nothing
    python bench/bench_persist.py            # the full run: a few minutes
    python bench/bench_persist.py --quick    # small sizes, seconds: .ci/run runs this

Every figure comes from one run: the contenders' rounds are interleaved and each cell is the
median over the rounds, so a noisy, shared machine moves them together and the ratios hold.
Rows of peers that are not installed are left out. The full run exits 1 if a target is missed.
"""

import argparse
import hashlib
import itertools
import os
import pickle
import platform
import shelve
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import persist  # noqa: E402

try:
    import diskcache
except ImportError:
    diskcache = None
try:
    import joblib
except ImportError:
    joblib = None
try:
    import numpy
except ImportError:
    numpy = None

ROWS = []          # (measure, persist, other, ratio, target, met)


SCALE = {"us": 1e6, "ms": 1e3, "MB": 1}     # how a row's figures print: times are seconds


def row(measure, mine, other, target=None, met=None, ratio=None, unit="us"):
    if ratio is None and mine and other:
        ratio = other / mine
    ROWS.append((measure, mine, other, ratio, target, met, unit))


def median_rounds(contenders, rounds):
    """{name: median seconds per call}, the contenders' rounds interleaved.

    The order rotates each round: whoever runs right after another's round inherits its
    cold caches, and in a fixed order that cost fell on the same contender every time
    (two copies of persist measured 4 to 8% apart).
    """
    times = {name: [] for name in contenders}
    order = list(contenders.items())
    for turn in range(rounds):
        for name, measure in order[turn % len(order):] + order[:turn % len(order)]:
            times[name].append(measure())
    return {name: statistics.median(values) for name, values in times.items()}


def per_call(func, keys):
    started = time.perf_counter()
    for key in keys:
        func(key)
    return (time.perf_counter() - started) / len(keys)


def small_result(x):
    return {"x": x, "label": "item-%d" % x}


# -- the contenders for one memoized function


def make_persist(directory):
    return persist.memoize(cache_dir=directory, name="bench")(small_result)


def make_files(directory):
    """persist's store of files (what a shared filesystem gets), here on the local disk."""
    return persist.memoize(cache_dir=directory, name="bench", store="files")(small_result)


def make_diskcache(directory):
    return diskcache.Cache(directory).memoize()(small_result)


def make_joblib(directory):
    return joblib.Memory(directory, verbose=0).cache(small_result)


def make_shelve(directory):
    """The naive pattern: open the shelf around every call."""
    path = os.path.join(directory, "shelf")

    def cached(x):
        with shelve.open(path) as shelf:
            key = repr(x)
            if key in shelf:
                return shelf[key]
            value = shelf[key] = small_result(x)
            return value
    return cached


def make_floor(directory):
    """The storage floor: persist's key derivation, one SQLite point lookup, one pickle."""
    conn = sqlite3.connect(os.path.join(directory, "floor.db"), isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID")
    key_of = persist._keyer(repr(None))    # memoize's, for version=None

    def cached(x):
        key = key_of((x,))
        rows = conn.execute("SELECT value FROM t WHERE key = ?", (key,)).fetchall()
        if rows:
            return pickle.loads(rows[0][0])
        value = small_result(x)
        conn.execute("INSERT INTO t VALUES (?, ?)", (key, pickle.dumps(value, 5)))
        return value
    return cached


SLOW = {"joblib": 50, "shelve": 20}     # calls a round for the slow peers, not 500 or 300
MAKERS = {"persist": make_persist, "floor": make_floor, "diskcache": make_diskcache,
          "joblib": make_joblib, "shelve": make_shelve, "files": make_files}


def available(names):
    return [n for n in names if not (n == "diskcache" and diskcache is None)
            and not (n == "joblib" and joblib is None)]


def bench_hit_miss(root, entries, rounds, names):
    """Per-call time of a hit in a cache of `entries`, and of a miss (beyond the function)."""
    funcs, sample = {}, {}
    for name in available(names):
        directory = os.path.join(root, "%s-%d" % (name, entries))
        os.makedirs(directory)
        funcs[name] = MAKERS[name](directory)
        fill = min(entries, 2000) if name in SLOW else entries    # slow peers: fewer
        for i in range(fill):
            funcs[name](i)
        sample[name] = [i * 7919 % fill for i in range(500)]
    hits = median_rounds({name: (lambda f=f, n=name: per_call(f, sample[n][:SLOW.get(n, 500)]))
                          for name, f in funcs.items()}, rounds)
    counter = [10 ** 9]

    def fresh(count):
        counter[0] += count
        return range(counter[0], counter[0] + count)

    misses = median_rounds({name: (lambda f=f, n=name: per_call(f, fresh(SLOW.get(n, 300))))
                            for name, f in funcs.items()}, rounds)
    bare = statistics.median(per_call(small_result, range(10000)) for _ in range(5))
    misses = {name: max(value - bare, 1e-9) for name, value in misses.items()}
    return hits, misses, funcs


def bench_processes(root, processes, calls):
    """Wall time for `processes` processes, each storing and then reading `calls` keys."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import bench_persist as b
        name, directory, me, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        f = b.MAKERS[name](directory)
        keys = range(me * calls // 2, me * calls // 2 + calls)
        for k in keys:
            assert f(k) == b.small_result(k)
        for k in keys:
            assert f(k) == b.small_result(k)
    """ % HERE)
    results = {}
    for name in available(["persist", "diskcache"]):
        directory = os.path.join(root, "procs-" + name)
        os.makedirs(directory)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
        started = time.perf_counter()
        children = [subprocess.Popen([sys.executable, "-c", code, name, directory, str(n),
                                      str(calls)], env=env, stderr=subprocess.PIPE)
                    for n in range(processes)]
        errors = sum(bool(child.communicate()[1]) or child.returncode != 0
                     for child in children)
        wall = time.perf_counter() - started
        results[name] = (processes * calls * 2 / wall, errors)
    return results


def bench_key(root, argument, rounds):
    """Keying a call on one large argument, against sha256 over its raw bytes; and the peak
    memory that keying takes, where a copy of the argument would show."""
    f = persist.memoize(cache_dir=os.path.join(root, "key"), name=type(argument).__name__)(len)
    f(b"")                     # the cache exists: cache_delete() keys its argument
    raw = memoryview(argument).cast("B")
    times = median_rounds({"persist": lambda: per_call(f.cache_delete, [argument]),
                           "sha256": lambda: per_call(lambda d: hashlib.sha256(d).digest(),
                                                      [raw])}, rounds)
    tracemalloc.start()
    f.cache_delete(argument)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return times, peak


def bench_big_result(root, size, rounds):
    """Store then load a result of `size` bytes, against plain file I/O of the same bytes.

    Each round runs in a fresh process, so that tracemalloc's peak, taken after the value
    exists, shows any copy persist makes. Six rounds: a fresh process's first touch of 2 GB
    made single rounds here differ by 2x.
    """
    code = textwrap.dedent("""
        import os, sys, time, tracemalloc
        sys.path.insert(0, %r)
        import persist
        size, directory, which = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        value = os.urandom(1 << 20) * (size >> 20)
        def phase():            # the traced peak since the last phase, which restarts it
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            tracemalloc.start()
            return peak
        path = os.path.join(directory, "plain")
        f = persist.memoize(cache_dir=directory, name="big")(lambda n: value)
        if hasattr(os, "sync"):
            os.sync()           # earlier rounds' writeback must not land in this one
        tracemalloc.start()     # after the value exists: the store phase adds its copies
        started = time.perf_counter()
        if which == "plain":
            with open(path, "wb") as file:
                file.write(value)
        else:
            f(size)
        stored = phase()
        del value               # the load phase holds only what it reads back
        if which == "plain":
            with open(path, "rb") as file:
                back = file.read()
        else:
            back = f(size)
            assert f.cache_info().hits == 1
        took = time.perf_counter() - started
        loaded = phase()
        assert len(back) == size
        if which == "plain":    # both remove their gigabyte after the timing, alike
            os.unlink(path)
        else:
            f.cache_clear()
        print(took, max(size + stored, loaded) / size)
    """ % os.path.dirname(HERE))

    def run(which):
        out = subprocess.run([sys.executable, "-c", code, str(size), root, which], check=True,
                             stdout=subprocess.PIPE, universal_newlines=True).stdout
        return [float(x) for x in out.split()]

    peaks = {"plain": [], "persist": []}

    def measure(which):
        took, peak = run(which)
        peaks[which].append(peak)
        return took

    times = median_rounds({which: (lambda w=which: measure(w)) for which in peaks}, rounds)
    return {which: (times[which], max(peaks[which])) for which in peaks}


def bench_footprint(root, count):
    """Bytes on disk after a process stores `count` small results and exits normally, and
    the payload: the pickles and 32-byte keys."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import bench_persist as b
        f = b.MAKERS[sys.argv[1]](sys.argv[2])
        for k in range(int(sys.argv[3])):
            f(k)
    """ % HERE)
    sizes = {}
    for name in available(["persist", "diskcache"]):
        directory = os.path.join(root, "footprint-" + name)
        os.makedirs(directory)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
        subprocess.run([sys.executable, "-c", code, name, directory, str(count)], env=env,
                       check=True)
        sizes[name] = sum(os.path.getsize(os.path.join(top, name))
                          for top, _, names in os.walk(directory) for name in names)
    payload = sum(32 + len(pickle.dumps(small_result(k), 5)) for k in range(count))
    return sizes, payload


COLD = {
    "persist": """
import persist
@persist.memoize(cache_dir=%r)
def f(x):
    return x
f(1)
""",
    "diskcache": """
import diskcache
@diskcache.Cache(%r).memoize()
def f(x):
    return x
f(1)
""",
    "sqlite3": "import sqlite3  # %r\n",
}


def bench_cold_start(root, rounds):
    """A whole process that imports, decorates a function and gets one hit."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    commands = {}
    for name in ["persist", "sqlite3"] + available(["diskcache"]):
        directory = os.path.join(root, "cold-" + name)
        os.makedirs(directory)
        script = os.path.join(directory, "job.py")
        with open(script, "w") as file:
            file.write(COLD[name] % os.path.join(directory, "cache"))
        commands[name] = [sys.executable, script]
        subprocess.run(commands[name], env=env, check=True)      # the hit, bytecode cached

    def run(command):
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        return time.perf_counter() - started
    return median_rounds({name: (lambda c=c: run(c)) for name, c in commands.items()},
                         rounds)


def import_time(module):
    """Cumulative import time in a fresh interpreter, with bytecode cached as users have it."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import " + module],
                         stderr=subprocess.PIPE, universal_newlines=True, env=env).stderr
    for line in reversed(out.splitlines()):
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6
    raise RuntimeError("no import time for %s" % module)


def bench_atomic(root, size, rounds):
    data = os.urandom(size)
    path = os.path.join(root, "atomic-%d" % size)

    def plain():
        started = time.perf_counter()
        with open(path, "wb") as file:
            file.write(data)
        return time.perf_counter() - started

    def atomic(sync):
        started = time.perf_counter()
        persist.atomic_write(path, data, sync=sync)
        return time.perf_counter() - started

    return median_rounds({"plain": plain, "sync": lambda: atomic(True),
                          "nosync": lambda: atomic(False)}, rounds)


def bench_done_dir(root, files, rounds):
    """A stage writing `files` small files, plainly and inside done_dir: the medians of both
    totals, and of done_dir's own time (entering, and leaving: fsyncing every file, then
    the marker), which is the price of durability without the noise of two fills.

    Every round fills a new directory and nothing is removed until the run ends: ext4
    without a journal skips inodes freed in the last minutes, and creating files right
    after removing 10,000 took 20 times longer.
    """
    payload = b"x" * 200
    own, made = [], itertools.count()

    def fill(folder):
        for i in range(files):
            with open(os.path.join(folder, "%d.json" % i), "wb") as file:
                file.write(payload)

    def plain():
        directory = os.path.join(root, "stage-%d" % next(made))
        started = time.perf_counter()
        os.makedirs(directory)
        fill(directory)
        return time.perf_counter() - started

    def marked():
        directory = os.path.join(root, "stage-%d" % next(made))
        started = time.perf_counter()
        with persist.done_dir(directory) as stage:
            filling = time.perf_counter()
            fill(stage)
            filled = time.perf_counter()
        took = time.perf_counter() - started
        own.append(took - (filled - filling))
        return took

    times = median_rounds({"plain": plain, "done_dir": marked}, rounds)
    times["own"] = statistics.median(own)
    return times


def bench_map_overhead(root, count, rounds):
    """persist.map over `count` hits of a memoized function, against a plain for loop."""
    directory = os.path.join(root, "map")
    os.makedirs(directory)
    f = make_persist(directory)
    items = list(range(count))
    for i in items:
        f(i)

    def loop():
        started = time.perf_counter()
        for i in items:
            f(i)
        return time.perf_counter() - started

    def mapped():
        started = time.perf_counter()
        persist.map(f, items, progress=False)
        return time.perf_counter() - started

    return median_rounds({"loop": loop, "map": mapped}, rounds)


WORKERS_JOB = """
import os, sys, time
sys.path.insert(0, %r)
import persist

def burn(i):
    total = 0
    for k in range(int(os.environ["BURN"])):
        total += (i * k) %% 7
    return total

@persist.memoize(cache_dir=os.environ["CACHE"])
def burned(i):
    return burn(i)

if __name__ == "__main__":
    mode, items = sys.argv[1], range(int(sys.argv[2]))
    started = time.perf_counter()
    if mode == "serial":
        persist.map(burned, items, progress=False)
    elif mode == "workers":
        persist.map(burned, items, workers=2, progress=False)
    elif mode == "chunked":      # by hand: a pool's own chunks, each worker storing its own
        import concurrent.futures
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            list(pool.map(burned, items, chunksize=max(1, len(items) // 16)))
    elif mode.startswith("dask"):
        from distributed import Client, LocalCluster
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.submit(burn, 0).result()             # the cluster is up: time the map
            started = time.perf_counter()
            if mode == "dask-persist":
                persist.map(burned, items, executor=client.get_executor(), progress=False)
            else:                # by hand: a task an item, the plain function, no cache
                client.gather(client.map(burn, items))
            print(time.perf_counter() - started)
            sys.exit(0)
    else:
        import joblib
        cached = joblib.Memory(os.environ["CACHE"], verbose=0).cache(burn)
        joblib.Parallel(n_jobs=2)(joblib.delayed(cached)(i) for i in items)
    print(time.perf_counter() - started)
"""


def bench_workers(root, count, rounds):
    """Seconds for `count` CPU-bound items of about 10 ms, each run in a fresh cache: serial
    persist.map, persist.map(workers=2), and joblib.Parallel(n_jobs=2) over joblib.Memory.
    Each run is a process of its own, the pools' start-up included."""
    script = os.path.join(root, "workers_job.py")
    with open(script, "w") as file:
        file.write(WORKERS_JOB % os.path.dirname(HERE))
    probe = 200000                  # calibrate: the loop count that takes about 10 ms here
    started = time.perf_counter()
    total = 0
    for k in range(probe):
        total += (3 * k) % 7
    burn = int(probe * 0.010 / (time.perf_counter() - started))
    runs = [0]

    def measure(mode):
        runs[0] += 1
        env = dict(os.environ, BURN=str(burn), CACHE=os.path.join(root, "w%d" % runs[0]))
        out = subprocess.run([sys.executable, script, mode, str(count)], env=env,
                             stdout=subprocess.PIPE, check=True).stdout
        return float(out)

    modes = ["serial", "workers"] + (["joblib"] if joblib is not None else [])
    return median_rounds({mode: (lambda m=mode: measure(m)) for mode in modes}, rounds)


def bench_engines(root, counts, rounds, milliseconds):
    """Seconds for persist.map(workers=2) against a ProcessPoolExecutor's own chunks, and,
    where Dask is installed, persist.map over a LocalCluster of 2 workers against
    client.map + client.gather: for each count of items of about milliseconds ms (0: quick
    ones), each run in a fresh cache. Dask's cluster start is not timed."""
    script = os.path.join(root, "engines_job.py")
    with open(script, "w") as file:
        file.write(WORKERS_JOB % os.path.dirname(HERE))
    probe = 200000
    started = time.perf_counter()
    total = 0
    for k in range(probe):
        total += (3 * k) % 7
    burn = int(probe * milliseconds / 1000 / (time.perf_counter() - started))
    runs = [0]

    def measure(mode, count):
        runs[0] += 1
        env = dict(os.environ, BURN=str(burn),
                   CACHE=os.path.join(root, "e%d-%d" % (milliseconds, runs[0])))
        done = subprocess.run([sys.executable, script, mode, str(count)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode:      # Dask's log goes to stderr: kept for this, not printed
            raise RuntimeError("the %s run of %d items failed:\n%s" % (
                mode, count, done.stderr.decode(errors="replace")[-3000:]))
        return float(done.stdout.split()[-1])

    modes = ["workers", "chunked"]
    try:
        import distributed  # noqa: F401
        modes += ["dask-persist", "dask-client"]
    except ImportError:
        pass
    return {count: median_rounds({mode: (lambda m=mode, c=count: measure(m, c))
                                  for mode in modes}, rounds) for count in counts}


def main():
    root = tempfile.mkdtemp(prefix="persist-bench-")
    try:
        return run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    quick = parser.parse_args().quick
    sizes = [1000, 10000] if quick else [10000, 100000, 1000000]
    rounds = 6 if quick else 12    # a multiple of the contenders (2 and 6): each leads equally often
    print("persist %s benchmark, %s, Python %s on %s, %d cores%s\n" % (
        persist.__version__, time.strftime("%Y-%m-%d"), platform.python_version(),
        platform.machine(), os.cpu_count(), " (quick)" if quick else ""))

    hits, misses, funcs = bench_hit_miss(root, sizes[0], rounds,
                                         ["persist", "floor", "diskcache", "joblib", "shelve",
                                          "files"])
    grown = {sizes[0]: funcs["persist"]}
    n = "%dk" % (sizes[0] // 1000)
    for name in available(["diskcache", "joblib", "shelve"]):
        target = ">= 3x" if name == "diskcache" else None
        met = hits[name] / hits["persist"] >= 3 if target else None
        row("hit, %s entries: vs %s" % (n, name), hits["persist"], hits[name], target, met)
    row("hit, %s entries: vs bare SQLite floor" % n, hits["persist"], hits["floor"],
        ">= 1/1.5", hits["persist"] <= 1.5 * hits["floor"])
    for name in available(["diskcache", "joblib", "shelve"]):
        target = ">= 3x" if name == "diskcache" else None
        met = misses[name] / misses["persist"] >= 3 if target else None
        row("miss overhead, %s: vs %s" % (n, name), misses["persist"], misses[name], target,
            met)
    row("miss overhead, %s: vs bare SQLite floor" % n, misses["persist"], misses["floor"])
    # The store of files (issue 23), on this local disk: against the SQLite store, and
    # against joblib.Memory's file store, the other cache that keeps a file a result.
    row("store of files, hit, %s: vs the SQLite store" % n, hits["files"], hits["persist"],
        ">= 1/3", hits["files"] <= 3 * hits["persist"])
    row("store of files, miss overhead, %s: vs the SQLite store" % n, misses["files"],
        misses["persist"], ">= 1/2", misses["files"] <= 2 * misses["persist"])
    if "joblib" in hits:
        row("store of files, hit, %s: vs joblib.Memory" % n, hits["files"], hits["joblib"],
            ">= 1x", hits["joblib"] >= hits["files"])
        row("store of files, miss overhead, %s: vs joblib.Memory" % n, misses["files"],
            misses["joblib"], ">= 1x", misses["joblib"] >= misses["files"])

    for entries in sizes[1:]:
        more, more_misses, funcs = bench_hit_miss(root, entries, rounds,
                                                  ["persist", "diskcache"])
        grown[entries] = funcs["persist"]
        label = "%dk" % (entries // 1000)
        if diskcache:
            row("hit, %s entries: vs diskcache" % label, more["persist"], more["diskcache"],
                ">= 3x", more["diskcache"] >= 3 * more["persist"])
            row("miss overhead, %s: vs diskcache" % label, more_misses["persist"],
                more_misses["diskcache"], ">= 3x",
                more_misses["diskcache"] >= 3 * more_misses["persist"])

    # Growth: the caches of every size, their hits measured in the same interleaved rounds.
    keys = {size: [i * 7919 % size for i in range(500)] for size in grown}
    by_size = median_rounds({size: (lambda f=f, k=keys[size]: per_call(f, k))
                             for size, f in grown.items()}, rounds)
    for size in sizes[1:]:
        growth = by_size[size] / by_size[sizes[0]]
        row("hit, %dk vs %s entries: persist's growth" % (size // 1000, n), by_size[size],
            by_size[sizes[0]], "<= 1.5x (this ratio)", growth <= 1.5, growth)

    procs = bench_processes(root, 8, 500 if quick else 5000)
    if "diskcache" in procs:
        mine, theirs = procs["persist"][0], procs["diskcache"][0]
        row("8 processes, time per call: vs diskcache (errors %d/%d)" % (procs["persist"][1],
            procs["diskcache"][1]), 1 / mine, 1 / theirs, ">= 2x, 0 errors",
            mine >= 2 * theirs and procs["persist"][1] == 0)
    else:
        row("8 processes: s per call (errors %d)" % procs["persist"][1],
            1 / procs["persist"][0], None, "0 errors", procs["persist"][1] == 0)

    size = (10 if quick else 100) << 20
    arguments = {"bytes": os.urandom(size)}
    if numpy is not None:
        arguments["numpy array"] = numpy.frombuffer(arguments["bytes"], numpy.float64).copy()
    for kind, argument in arguments.items():
        key_times, peak = bench_key(root, argument, rounds)
        row("key of a %d MB %s: vs sha256 (peak %.1f MB)" % (size >> 20, kind, peak / 1e6),
            key_times["persist"], key_times["sha256"], ">= 1/1.5, no copy",
            key_times["persist"] <= 1.5 * key_times["sha256"] and peak < size / 10)
    del arguments

    sizes, payload = bench_footprint(root, 5000)
    row("disk after 5,000 small results: bytes vs the payload (%d KB)" % (payload // 1024),
        sizes["persist"] / 1e6, payload / 1e6, "<= 3x (this ratio)",
        sizes["persist"] <= 3 * payload, sizes["persist"] / payload, unit="MB")
    if "diskcache" in sizes:
        row("disk after 5,000 small results: vs diskcache", sizes["persist"] / 1e6,
            sizes["diskcache"] / 1e6, ">= 1x", sizes["diskcache"] >= sizes["persist"],
            unit="MB")

    cold = bench_cold_start(root, 6 if quick else 20)
    row("cold start, import + decorate + one hit: vs python -c 'import sqlite3'",
        cold["persist"], cold["sqlite3"], "<= +12 ms (this delta)",
        cold["persist"] - cold["sqlite3"] <= 0.012,
        "+%.1fms" % ((cold["persist"] - cold["sqlite3"]) * 1e3), unit="ms")
    if "diskcache" in cold:
        row("cold start, import + decorate + one hit: vs diskcache", cold["persist"],
            cold["diskcache"], ">= 1x", cold["diskcache"] >= cold["persist"], unit="ms")

    for module in ("persist", "diskcache"):
        with __import__("contextlib").suppress(RuntimeError):
            import_time(module)               # writes __pycache__, as a first import does
    imports = median_rounds({"persist": lambda: import_time("persist")} if not diskcache else
                            {"persist": lambda: import_time("persist"),
                             "diskcache": lambda: import_time("diskcache")}, 5)
    row("import: vs diskcache", imports["persist"], imports.get("diskcache"), ">= 3x",
        imports.get("diskcache", 3 * imports["persist"]) >= 3 * imports["persist"])

    for size in (1024, 10 << 20):
        times = bench_atomic(root, size, rounds if size < 1 << 20 else 3)
        for mode in ("sync", "nosync"):
            row("atomic_write %s, sync=%s: vs plain open().write()" % (
                "1 KB" if size == 1024 else "10 MB", mode == "sync"), times[mode],
                times["plain"])

    count = 1000 if quick else 10000
    mapped = bench_map_overhead(root, count, rounds)
    row("persist.map, %d hits, serial: vs a for loop over the memoized function" % count,
        mapped["map"] / count, mapped["loop"] / count, ">= 1/2", mapped["map"] <= 2 *
        mapped["loop"])
    count = 40 if quick else 300
    parallel = bench_workers(root, count, 2 if quick else 5)
    row("persist.map, %d items of ~10 ms: workers=2 vs serial" % count, parallel["workers"],
        parallel["serial"], ">= 1.7x", parallel["serial"] >= 1.7 * parallel["workers"],
        unit="ms")
    if "joblib" in parallel:
        row("the same: vs joblib.Parallel(n_jobs=2) over joblib.Memory", parallel["workers"],
            parallel["joblib"], ">= 1x", parallel["joblib"] >= parallel["workers"], unit="ms")

    for milliseconds, count in ((0, 1000 if quick else 10000), (10, 40 if quick else 1000)):
        engines = bench_engines(root, [count], 1 if quick else 3, milliseconds)[count]
        what = "%d items of ~%d ms" % (count, milliseconds) if milliseconds else \
            "%d quick items" % count
        row("persist.map, %s: workers=2 vs a ProcessPoolExecutor's chunks" % what,
            engines["workers"], engines["chunked"], ">= 1/1.1",
            engines["workers"] <= 1.1 * engines["chunked"], unit="ms")
        if "dask-persist" in engines:
            row("the same over Dask, 2 workers: vs client.map + gather", engines["dask-persist"],
                engines["dask-client"], ">= 1/1.1",
                engines["dask-persist"] <= 1.1 * engines["dask-client"], unit="ms")

    files = 2000 if quick else 10000
    times = bench_done_dir(root, files, rounds)
    # done_dir's own time includes fsyncing every file before the marker (its durability
    # rule), which plain writes leave to the kernel's writeback: no target to meet here.
    row("done_dir, %d files (%.0f us each): own time, fsyncing them all, vs the writes" % (
        files, times["plain"] / files * 1e6), times["own"], times["plain"],
        ratio=times["own"] / times["plain"])
    row("done_dir, %d files: whole stage vs plain writes" % files, times["done_dir"],
        times["plain"])

    # Last: the disk's writeback of these gigabytes slows what runs after it.
    big = (64 if quick else 1024) << 20
    big_times = bench_big_result(root, big, 6)
    (mine, peak), (plain, plain_peak) = big_times["persist"], big_times["plain"]
    row("%d MB result store+load: vs plain files (peak %.2fx, plain %.2fx)" % (
        big >> 20, peak, plain_peak), mine, plain, ">= 1/1.5, peak <= 1.3x",
        mine <= 1.5 * plain and peak <= 1.3)

    print("%-62s %11s %11s %8s  %-22s %s" % ("measure", "persist", "other", "ratio",
                                             "target (other/persist)", ""))
    missed = 0
    for measure, mine, other, ratio, target, met, unit in ROWS:
        verdict = "" if met is None else ("ok" if met else "MISSED")
        missed += met is False
        scale = SCALE[unit]
        print("%-62s %9.2f%s %9s %8s  %-22s %s" % (
            measure, mine * scale, unit, "-" if other is None else "%.2f%s" % (other * scale,
                                                                              unit),
            "-" if ratio is None else ratio if isinstance(ratio, str) else "%.2fx" % ratio,
            target or "", verdict))
    print("\nratio = other / persist: above 1, persist is faster.")
    return 1 if missed and not quick else 0


if __name__ == "__main__":
    sys.exit(main())
