"""Benchmark persist against its floor (bare SQLite doing the same work) and its peers.

The peers: diskcache, joblib.Memory and plain shelve.

    pip install -r bench/requirements.txt    # the peers; persist itself needs nothing
    python bench/bench_persist.py            # the full run: 8 to 21 minutes here
    python bench/bench_persist.py --quick    # small sizes, under a minute: .ci/run runs this

Every figure comes from one run: the contenders' rounds are interleaved and each cell is the
median over the rounds, so a noisy, shared machine moves them together and the ratios hold.
Rows of peers that are not installed are left out. The full run exits 1 if a target is missed
(the quick one never does); for each target missed, the run ends by printing where the time
goes: the parts of a hit or a miss timed apart, statement by statement, beside the floor's;
what a key spends by function; each SQL statement of a command's process; the imports of a
cold start. Progress goes to stderr."""

import argparse
import collections
import contextlib
import cProfile
import functools
import hashlib
import inspect
import itertools
import json
import os
import pickle
import platform
import pstats
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
import types

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
try:
    import pandas
except ImportError:
    pandas = None

ROWS = []          # (measure, persist, other, ratio, target, met)


SCALE = {"us": 1e6, "ms": 1e3, "MB": 1}     # how a row's figures print: times are seconds


STARTED = time.perf_counter()


def step(what):
    """Progress, on stderr: the seconds since the run began, and what comes next."""
    print("[%4.0f s] %s" % (time.perf_counter() - STARTED, what), file=sys.stderr, flush=True)


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
    cache = diskcache.Cache(directory)
    memoized = cache.memoize()(small_result)
    memoized.bench_cache = cache       # for fill()
    return memoized


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


def floor_key(args):
    """The floor's key: SHA-256 over the pickled arguments (pickle's C code, one call)."""
    return hashlib.sha256(pickle.dumps(args, 5)).digest()


FLOOR_TABLE = "CREATE TABLE IF NOT EXISTS t (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID"
FLOOR_GET = "SELECT value FROM t WHERE key = ?"
FLOOR_PUT = "INSERT INTO t VALUES (?, ?)"


def make_floor(directory, factory=sqlite3.Connection):
    """The floor of issue 24: what a memoizer on a bare SQLite table costs at the least. A
    WAL table with SQLite's default (4 KB) pages, synchronous=NORMAL, a BLOB primary key of
    SHA-256 over the pickled arguments; a hit is one SELECT and a pickle.loads, a miss one
    autocommit INSERT. WITHOUT ROWID, as persist's table is (with a rowid, each INSERT
    writes a second B-tree, and the floor's miss took 1.7x as long here)."""
    conn = sqlite3.connect(os.path.join(directory, "floor.db"), isolation_level=None,
                           check_same_thread=False, factory=factory)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(FLOOR_TABLE)

    def cached(x):
        key = floor_key((x,))
        rows = conn.execute(FLOOR_GET, (key,)).fetchall()
        if rows:
            return pickle.loads(rows[0][0])
        value = small_result(x)
        conn.execute(FLOOR_PUT, (key, pickle.dumps(value, 5)))
        return value
    cached.conn = conn
    return cached


# issue 24's targets, persist's time over the floor's: "small" for its 4k entries, which the
# smallest size here (10k) is held to; "large" for 100k and 1M
FLOOR_TARGETS = {"small": {"hit": 1.3, "miss": 1.6}, "large": {"hit": 1.2, "miss": 1.45}}
SLOW = {"joblib": 50, "shelve": 20}     # calls a round for the slow peers, not 500 or 300
MAKERS = {"persist": make_persist, "floor": make_floor, "diskcache": make_diskcache,
          "joblib": make_joblib, "shelve": make_shelve, "files": make_files}


def available(names):
    return [n for n in names if not (n == "diskcache" and diskcache is None)
            and not (n == "joblib" and joblib is None)]


def fill(name, func, start, stop):
    """Store the results of func(start) ... func(stop - 1) as calls would, only faster: in
    batches of one transaction each. persist's go through the function's own cache, as
    persist.map stores a batch (the same rows a call makes: 'persist ls' and 'show' list
    them as the function's); the floor's by executemany; diskcache's under the keys its
    memoize makes, in its transactions. Others (the slow peers) by calls."""
    batch = 20000
    if name in ("persist", "files"):
        cache = persist._WRAPPERS[func]._cache
        func(start)                                   # opens the store
        for first in range(start + 1, stop, batch):
            items = range(first, min(stop, first + batch))
            cache.put_many([(cache.key((i,), {}), small_result(i), ((i,), {}), 0.0)
                            for i in items])
    elif name == "floor":
        for first in range(start, stop, batch):
            items = range(first, min(stop, first + batch))
            func.conn.execute("BEGIN")
            func.conn.executemany(FLOOR_PUT, [(floor_key((i,)), pickle.dumps(
                small_result(i), 5)) for i in items])
            func.conn.execute("COMMIT")
    elif name == "diskcache":
        for first in range(start, stop, batch):
            with func.bench_cache.transact():
                for i in range(first, min(stop, first + batch)):
                    func.bench_cache.set(func.__cache_key__(i), small_result(i))
    else:
        for i in range(start, stop):
            func(i)


def bench_hit_miss(root, entries, rounds, names, misses=1600, slow_entries=2000,
                   quick=False):
    """Per-call time of a hit in a cache of `entries`, and of a miss (beyond the function).

    A round of misses is long (misses calls): persist restarts its log every ~800 commits
    (a checkpoint of ~25 ms), and rounds of 300 misses left it out of most of them, and so
    out of the median. The slow peers (SLOW) fill slow_entries and make fewer calls; so
    does the store of files in the quick run (a file each, under a crowded /tmp)."""
    funcs, sample = {}, {}
    slow = dict(SLOW, files=300) if quick else SLOW
    for name in available(names):
        directory = os.path.join(root, "%s-%d" % (name, entries))
        os.makedirs(directory)
        funcs[name] = MAKERS[name](directory)
        size = min(entries, slow_entries) if name in slow else entries  # slow peers: fewer
        fill(name, funcs[name], 0, size)
        sample[name] = [i * 7919 % size for i in range(500)]
    hits = median_rounds({name: (lambda f=f, n=name: per_call(f, sample[n][:SLOW.get(n, 500)]))
                          for name, f in funcs.items()}, rounds)
    misses = median_rounds({name: (lambda f=f, n=name: per_call(f, fresh(slow.get(n, misses))))
                            for name, f in funcs.items()}, rounds)
    bare = statistics.median(per_call(small_result, range(10000)) for _ in range(5))
    misses = {name: max(value - bare, 1e-9) for name, value in misses.items()}
    return hits, misses, funcs, sample


FRESH = [10 ** 9]


def fresh(count):
    """count arguments never called before, by anyone in this run: misses."""
    FRESH[0] += count
    return range(FRESH[0] - count, FRESH[0])


# -- where the time goes: printed for a target missed

BREAKDOWNS = []      # the text of each, printed after the table


# TimedCursor and TimedConnection: the processes of the command line's breakdowns run their
# source too (TIMED_RUN), and import nothing of the bench's.
class TimedCursor(sqlite3.Cursor):
    """An sqlite3 cursor that adds up the time each statement takes, by its text: its
    execute(), and the fetching of its rows, which steps it further."""

    spent = collections.defaultdict(float)
    runs = collections.Counter()
    sql = None

    @classmethod
    def reset(cls):
        cls.spent.clear()
        cls.runs.clear()

    def _timed(self, method, sql, *rest):
        if sql is not None:
            self.sql = sql
            TimedCursor.runs[sql] += 1
        started = time.perf_counter()
        try:
            return method(*rest)
        finally:
            TimedCursor.spent[self.sql] += time.perf_counter() - started

    def execute(self, sql, *rest):
        return self._timed(super().execute, sql, sql, *rest)

    def executemany(self, sql, *rest):
        return self._timed(super().executemany, sql, sql, *rest)

    def executescript(self, sql):
        return self._timed(super().executescript, sql, sql)

    def fetchall(self):
        return self._timed(super().fetchall, None)

    def fetchmany(self, *rest):
        return self._timed(super().fetchmany, None, *rest)

    def fetchone(self):
        return self._timed(super().fetchone, None)

    def __next__(self):
        return self._timed(super().__next__, None)


class TimedConnection(sqlite3.Connection):
    """A connection whose statements all run through TimedCursors: its execute() is a
    cursor's, as sqlite3's own is."""

    def cursor(self, factory=TimedCursor):
        return super().cursor(factory)

    def execute(self, sql, *rest):
        return self.cursor().execute(sql, *rest)

    def executemany(self, sql, *rest):
        return self.cursor().executemany(sql, *rest)

    def executescript(self, sql):
        return self.cursor().executescript(sql)


@contextlib.contextmanager
def timed_statements():
    """persist's connections, opened meanwhile, are TimedConnections. (persist calls
    sqlite3.connect() through its module global; if that ever changes, no statement is
    seen, and the breakdown says so.)"""
    real = persist.sqlite3

    class Proxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(sqlite3, name)

    proxy = Proxy("sqlite3")
    proxy.connect = functools.partial(sqlite3.connect, factory=TimedConnection)
    persist.sqlite3 = proxy
    try:
        yield
    finally:
        persist.sqlite3 = real


def statement_cost():
    """What timing a statement adds to it (TimedCursor against a plain cursor, on a
    statement that does nothing), in seconds: taken off the rest of a breakdown."""
    plain = sqlite3.connect(":memory:")
    timed = sqlite3.connect(":memory:", factory=TimedConnection)
    times = median_rounds({"plain": lambda: per_call(plain.execute, ["SELECT 1"] * 2000),
                           "timed": lambda: per_call(timed.execute, ["SELECT 1"] * 2000)}, 6)
    plain.close()
    timed.close()
    return max(0.0, times["timed"] - times["plain"])


def breakdown_hit_miss(root, entries, which, rounds, calls):
    """The parts of persist's hit or miss (which), and of the floor's, timed apart: key
    derivation, pickling (or loading), each SQL statement, and the rest: Python around them,
    and for persist its own checks (the log's size, value files). On connections opened
    anew on the caches of that size, which time each statement; in us per call, the mean
    over interleaved rounds of calls each (a statement that runs once in a thousand calls,
    a checkpoint, is part of the cost)."""
    directory = {name: os.path.join(root, "%s-%d" % (name, entries))
                 for name in ("persist", "floor")}
    cost = statement_cost()
    with timed_statements():
        timed = {"persist": make_persist(directory["persist"]),
                 "floor": make_floor(directory["floor"], TimedConnection)}
        for func in timed.values():
            func(0)                     # opened, a hit
        cache = persist._WRAPPERS[timed["persist"]]._cache
        keyers = {"persist": lambda x: cache.key((x,), {}), "floor": lambda x: floor_key((x,))}
        parts = {name: collections.Counter() for name in timed}     # seconds, in all
        counts = {name: collections.Counter() for name in timed}    # statements run
        made = collections.Counter()
        hits = [i * 7919 % entries for i in range(calls)]

        def timing(work, args):
            started = time.perf_counter()
            for x in args:
                work(x)
            return time.perf_counter() - started

        for turn in range(rounds):
            order = list(timed)
            for name in order[turn % 2:] + order[:turn % 2]:
                args = hits if which == "hit" else fresh(calls)
                TimedCursor.reset()
                parts[name]["total"] += timing(timed[name], args)
                made[name] += len(args)
                for sql, seconds in TimedCursor.spent.items():
                    parts[name]["SQL " + sql] += seconds
                    counts[name][sql] += TimedCursor.runs[sql]
                # the same work, apart: key derivation; pickling or loading the result
                parts[name]["key derivation"] += timing(keyers[name], args)
                if which == "miss":
                    parts[name]["pickle.dumps of the result"] += timing(
                        lambda value: pickle.dumps(value, 5), [small_result(x) for x in args])
                    parts[name]["the function itself"] += timing(small_result, args)
                else:
                    parts[name]["pickle.loads of the result"] += timing(
                        pickle.loads, [pickle.dumps(small_result(x), 5) for x in args])
        # persist's own Python, by function (cProfile, whose overhead weighs on Python more
        # than on C: the order is what to read)
        profiler = cProfile.Profile()
        profiler.runcall(per_call, timed["persist"], hits if which == "hit" else fresh(calls))
    stats = pstats.Stats(profiler).stats
    own = sum(entry[2] for entry in stats.values())
    python = sorted(((entry[2], "%s:%d" % (function, line)) for (path, line, function), entry
                     in stats.items() if path == persist.__file__), reverse=True)[:6]
    lines = ["%-70s %8s %8s" % ("%s, %s entries: us per call, %d calls each" % (
        which, "{:,}".format(entries), made["persist"]), "persist", "floor")]
    names = []
    for name in timed:
        names += [part for part in parts[name] if part not in names and part != "total"]
    names.sort(key=lambda part: part.startswith("SQL"))
    if not counts["persist"]:
        lines.append("  (no statement of persist's seen: it no longer connects through "
                     "sqlite3.connect; they are in the rest)")
    for part in names:
        label = part
        if part.startswith("SQL "):
            sql = part[4:]
            per = max(counts[name][sql] / made[name] for name in timed)
            label = " ".join(sql.split())
            times = " (x%.2g)" % per if per != 1 else ""
            room = 64 - len(times)
            label = "SQL %s%s" % (label if len(label) <= room else label[:room - 3] + "...",
                                  times)
        lines.append("  %-68s %8s %8s" % ((label,) + tuple(
            "%.2f" % (parts[name][part] / made[name] * 1e6) if part in parts[name] else "-"
            for name in timed)))
    rest = {name: parts[name]["total"] - sum(seconds for part, seconds in parts[name].items()
                                             if part != "total")
            - cost * sum(counts[name].values()) for name in timed}
    lines.append("  %-68s %8.2f %8.2f" % (("the rest: Python around them, persist's checks",) +
                                          tuple(rest[name] / made[name] * 1e6
                                                for name in timed)))
    lines.append("  %-68s %8.2f %8.2f" % (("total (less %.2f us a statement for timing it)"
                                           % (cost * 1e6),) + tuple(
        (parts[name]["total"] - cost * sum(counts[name].values())) / made[name] * 1e6
        for name in timed)))
    lines.append("  persist's own Python (function:line), share of the profiled time: " +
                 ", ".join("%s %.0f%%" % (function, 100 * seconds / own)
                           for seconds, function in python))
    return "\n".join(lines)


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


def frame_floor(frame):
    """The floor of a DataFrame's key: SHA-256 over its columns' buffers, a column of
    objects (str) pickled."""
    hasher = hashlib.sha256()
    for name in frame.columns:
        column = frame[name].to_numpy()
        if column.dtype == object:
            hasher.update(pickle.dumps(column, 5))
        else:
            hasher.update(memoryview(numpy.ascontiguousarray(column)).cast("B"))
    return hasher.digest()


def list_floor(argument):
    """The floor of a list's key: SHA-256 over its pickle."""
    return hashlib.sha256(pickle.dumps(argument, 5)).digest()


def bench_key_floor(root, argument, floor, rounds):
    """Keying a call on one argument (memoize's key, through cache_delete(), which keys its
    argument and deletes nothing), against floor(argument); and the peak memory each takes
    (tracemalloc, apart from the timing)."""
    f = persist.memoize(cache_dir=os.path.join(root, "key"), name="key-floor")(len)
    f(b"")                     # the cache exists: cache_delete() keys its argument
    times = median_rounds({"persist": lambda: per_call(f.cache_delete, [argument]),
                           "floor": lambda: per_call(floor, [argument])}, rounds)
    peaks = {}
    for name, work in (("persist", f.cache_delete), ("floor", floor)):
        tracemalloc.start()
        work(argument)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return times, peaks, f.cache_delete


def breakdown_key(what, argument, floor, persist_key, times):
    """Where persist's key of argument spends its time, by function (cProfile's own time,
    share of the profiled whole), beside the floor's two steps timed apart."""
    profiler = cProfile.Profile()
    profiler.runcall(persist_key, argument)
    stats = pstats.Stats(profiler).stats
    own = sum(entry[2] for entry in stats.values()) or 1e-9
    top = sorted(((entry[2], entry[1], function if path == persist.__file__ else
                   "%s (%s)" % (function, os.path.basename(path))
                   if not path.startswith("~") else function)
                  for (path, _, function), entry in stats.items()), reverse=True)[:8]
    lines = ["%s: persist %.1f ms, floor %.1f ms; persist's time by function (cProfile, own "
             "time):" % (what, times["persist"] * 1e3, times["floor"] * 1e3)]
    lines += ["  %-60s %5.1f%%  %9d calls" % (function, 100 * seconds / own, calls)
              for seconds, calls, function in top]
    if floor is list_floor:
        started = time.perf_counter()
        data = pickle.dumps(argument, 5)
        pickled = time.perf_counter()
        hashlib.sha256(data).digest()
        lines.append("  the floor: pickle.dumps %.1f ms (%.1f MB), sha256 %.1f ms" % (
            (pickled - started) * 1e3, len(data) / 1e6, (time.perf_counter() - pickled) * 1e3))
    return "\n".join(lines)


# The command line on a big cache, each command a whole process, against a process that runs
# the bare SQL doing the same (sys.argv[1]: the cache file; [2]: the latest version, as
# Info holds it). 'show': the oldest 50 and the count; 'ls': one scan for what it prints;
# 'prune --stale': the entries and failure records of other versions; 'clear': all of them;
# both then giving the pages back and restarting the log, as persist promises.
BARE = {
    "show": """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
for row in conn.execute("SELECT key, args, stored, length(value), file, seconds, version"
                        " FROM Dict ORDER BY stored LIMIT 50").fetchall():
    print(row[1], row[2], row[3])
print(conn.execute("SELECT count(*) FROM Dict").fetchall()[0][0])
""",
    "ls": """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(conn.execute("SELECT count(*), min(stored), max(stored), sum(seconds),"
                   " sum(version IS NOT ?), sum(CASE WHEN version IS NOT ? THEN length(value)"
                   " END) FROM Dict", sys.argv[2:] * 2).fetchall(),
      conn.execute("SELECT count(*) FROM Failures").fetchall(), os.path.getsize(sys.argv[1]))
""",
    "prune": """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
count = conn.execute("DELETE FROM Dict WHERE version IS NOT ?", sys.argv[2:]).rowcount
conn.execute("DELETE FROM Failures WHERE version IS NOT ?", sys.argv[2:])
conn.execute("COMMIT")
conn.executescript("PRAGMA incremental_vacuum")
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
print(count)
""",
    "clear": """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
count = conn.execute("DELETE FROM Dict").rowcount
conn.execute("DELETE FROM Failures")
conn.execute("COMMIT")
conn.executescript("PRAGMA incremental_vacuum")
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
print(count)
""",
}
# issue 24's targets, persist's time over the bare SQL's; 'show' also within MEMORY_BOUND MB
# of the bare process's peak (it held every entry: 504 MB at a million)
COMMAND_TARGETS = {"show": 2.0, "ls": 1.5, "prune": 1.2, "clear": 1.2}
MEMORY_BOUND = 64
COMMANDS = {"show": ["show", "--limit", "50"], "ls": ["ls"], "prune": ["prune", "--stale"],
            "clear": ["clear"]}
CHANGES = ("prune", "clear")     # each run gets a fresh copy of the cache
# The one process, its statements timed (TimedCursor): sys.argv[1], where to write them;
# then "-m persist ARGS..." or "-c CODE ARGS...", run as python would.
TIMED_RUN = """
import collections, functools, json, runpy, sqlite3, sys, time
%s
%s
sqlite3.connect = functools.partial(sqlite3.connect, factory=TimedConnection)
out, how, what = sys.argv[1:4]
sys.argv = [what if how == "-m" else "-c"] + sys.argv[4:]
try:
    if how == "-m":
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:
        exec(compile(what, "<bare>", "exec"), {"__name__": "__main__"})
except SystemExit:
    pass
with open(out, "w") as file:
    json.dump([(sql, seconds, TimedCursor.runs[sql]) for sql, seconds
               in TimedCursor.spent.items()], file)
"""


def build_cli_cache(directory, entries):
    """A cache of entries results of one function, half stored by version 1 and half by
    version 2, the latest: 'prune --stale' removes half. Its log checkpointed, so that a
    copy of its file is whole."""
    os.makedirs(directory)
    for version, start, stop in ((1, 0, entries // 2), (2, entries // 2, entries)):
        func = persist.memoize(cache_dir=directory, name="bench", version=version)(
            small_result)
        fill("persist", func, start, stop)
    path = os.path.join(directory, "bench.db")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        version = conn.execute("SELECT value FROM Info WHERE name = 'version'").fetchall()
    return path, version[0][0]


# Runs the command in sys.argv[1:] and prints its peak resident memory (KB): from this small
# process, as a child forked from the bench's own (hundreds of MB) counts its pages as its
# peak until it execs.
PEAK = """
import os, sys
devnull = os.open(os.devnull, os.O_WRONLY)
pid = os.fork()
if pid == 0:
    os.dup2(devnull, 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss // (1024 if sys.platform == "darwin" else 1))
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
"""


def run_process(command, env, cwd, peak=False):
    """The seconds a whole process took, its output discarded; or with peak, its peak
    resident memory in KB (None where os.wait4 is missing: Windows)."""
    if peak and not hasattr(os, "wait4"):
        return None
    started = time.perf_counter()
    done = subprocess.run(([sys.executable, "-c", PEAK] if peak else []) + command, env=env,
                          cwd=cwd, stdout=subprocess.PIPE if peak else subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    took = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError("%s failed:\n%s" % (" ".join(command[:5]),
                                                done.stderr.decode(errors="replace")[-2000:]))
    return int(done.stdout) if peak else took


def bench_commands(root, entries, rounds):
    """Each command of COMMANDS as a whole process on a cache of entries, against BARE's
    process doing the same in SQL: {command: {"persist": (seconds, peak KB), "bare": ...}},
    medians over interleaved rounds, and what a timed run of each says (see TIMED_RUN)."""
    template, version = build_cli_cache(os.path.join(root, "cli"), entries)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    # bytecode cached, as users have it: without, each process compiles persist.py (~0.1 s)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    copies = itertools.count()

    def command_for(command, who, path):
        if who == "persist":
            return [sys.executable, "-m", "persist"] + COMMANDS[command] + (
                [os.path.dirname(path)] if command == "ls" else [path])
        return [sys.executable, "-c", BARE[command], path, version]

    def fresh_copy(command):
        if command not in CHANGES:
            return template
        directory = os.path.join(root, "cli-copy-%d" % next(copies))
        os.makedirs(directory)
        path = os.path.join(directory, "bench.db")
        shutil.copyfile(template, path)
        return path

    def measure(command, who, peak=False):
        path = fresh_copy(command)
        result = run_process(command_for(command, who, path), env, root, peak)
        if command in CHANGES:
            shutil.rmtree(os.path.dirname(path))
        return result

    results = {}
    for command in COMMANDS:
        times = median_rounds({who: (lambda w=who, c=command: measure(c, w))
                               for who in ("persist", "bare")}, rounds)
        results[command] = {who: (times[who], measure(command, who, peak=True))
                            for who in times}

    def timed_run(command, who):
        """The statements of one run, timed: [(sql, seconds, runs)], and its wall time."""
        path = fresh_copy(command)
        out = os.path.join(root, "timed.json")
        argv = command_for(command, who, path)
        script = os.path.join(root, "timed_run.py")
        with open(script, "w") as file:
            file.write(TIMED_RUN % (inspect.getsource(TimedCursor),
                                    inspect.getsource(TimedConnection)))
        how = argv[1:3]
        took = run_process([sys.executable, script, out] + how + argv[3:], env, root)
        with open(out) as file:
            statements = json.load(file)
        if command in CHANGES:
            shutil.rmtree(os.path.dirname(path))
        return statements, took

    return results, timed_run


STARTUP = {}     # seconds of a process that imports what the command's does, and nothing else


def breakdown_command(command, entries, results, timed_run):
    """Where a command's process spends its time: each SQL statement (a run of its own, the
    statements timed), and the rest (starting Python, imports, Python's own work)."""
    runs = {who: timed_run(command, who) for who in ("persist", "bare")}
    lines = ["%-70s %8s %8s" % ("persist %s, %s entries: seconds, one timed run each" % (
        " ".join(COMMANDS[command]), "{:,}".format(entries)), "persist", "bare SQL")]
    spent = {who: {sql: (seconds, count) for sql, seconds, count in runs[who][0]}
             for who in runs}
    order = []
    for who in runs:
        order += [sql for sql in sorted(spent[who], key=lambda q: -spent[who][q][0])
                  if sql not in order]
    for sql in order:
        if max(spent[who].get(sql, (0, 0))[0] for who in runs) < 0.001:
            continue                 # under a millisecond: in the rest
        count = max(spent[who].get(sql, (0, 0))[1] for who in runs)
        label = " ".join(sql.split())
        times = " (x%d)" % count if count != 1 else ""
        room = 64 - len(times)
        label = "SQL %s%s" % (label if len(label) <= room else label[:room - 3] + "...", times)
        lines.append("  %-68s %8s %8s" % ((label,) + tuple(
            "%.3f" % spent[who][sql][0] if sql in spent[who] else "-" for who in runs)))
    lines.append("  %-68s %8.3f %8.3f" % (("the rest: start, imports, Python, statements "
                                           "under 1 ms",) + tuple(
        runs[who][1] - sum(seconds for seconds, _ in spent[who].values()
                           if seconds >= 0.001) for who in runs)))
    if not STARTUP:                  # the same for every command: measured once
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
        env.pop("PYTHONDONTWRITEBYTECODE", None)        # as in bench_commands
        STARTUP.update(median_rounds({who: (lambda c=code: run_process(
            [sys.executable, "-c", c], env, os.path.dirname(HERE)))
            for who, code in (("persist", "import persist, argparse"),
                              ("bare", "import sqlite3"))}, 3))
    lines.append("  %-68s %8.3f %8.3f" % (("  of which a process that only imports them",) +
                                          tuple(STARTUP[who] for who in runs)))
    lines.append("  %-68s %8.3f %8.3f" % (("the whole process, timed apart",) +
                                          tuple(runs[who][1] for who in runs)))
    lines.append("  %-68s %8.3f %8.3f" % (("the whole process, median of the rounds",) +
                                          tuple(results[command][who][0] for who in runs)))
    return "\n".join(lines)


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
cache = diskcache.Cache(%r)
@cache.memoize()        # (Python 3.8 takes no call of a call after @)
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


def breakdown_cold_start(root):
    """Where the cold start goes: the modules the one-call script imports that python -c
    'import sqlite3' does not, by their own import time (-X importtime, bytecode cached)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)

    def own_times(command):
        out = subprocess.run([sys.executable, "-X", "importtime"] + command,
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             universal_newlines=True, env=env, cwd=root).stderr
        times = {}
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[0].split()[-1].isdigit():
                times[parts[2]] = int(parts[0].split()[-1]) / 1e3       # ms
        return times

    script = os.path.join(root, "cold-persist", "job.py")
    runs = [own_times([script]) for _ in range(5)]
    bare = own_times(["-c", "import sqlite3"])
    extra = {name: statistics.median(run.get(name, 0.0) for run in runs)
             for name in runs[0] if name not in bare}
    top = sorted(extra.items(), key=lambda item: -item[1])
    lines = ["cold start: what the one-call script imports beyond 'import sqlite3', %.1f ms "
             "of own import time in all (the median of 5 runs each):" % sum(extra.values())]
    lines += ["  %-40s %6.2f ms" % (name, ms) for name, ms in top[:10]]
    lines.append("  %-40s %6.2f ms" % ("%d others" % max(0, len(top) - 10),
                                       sum(ms for _, ms in top[10:])))
    return "\n".join(lines)


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

    Every round fills a new directory and nothing is removed until the rounds are over:
    ext4 without a journal skips inodes freed in the last minutes, and creating files right
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
    # Their files go now that the rounds are over, before the kernel's writeback: at the
    # run's end, removing them took 25 s and more here on a busy disk.
    for number in range(next(made)):
        shutil.rmtree(os.path.join(root, "stage-%d" % number), ignore_errors=True)
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
        step("removing the run's files")
        shutil.rmtree(root, ignore_errors=True)
        step("removed")


def run(root):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    quick = parser.parse_args().quick
    sizes = [10000, 100000] if quick else [10000, 100000, 1000000]
    rounds = 6 if quick else 12    # a multiple of the contenders (2, 3, 6): each leads as often
    print("persist %s benchmark, %s, Python %s on %s, %d cores%s\n" % (
        persist.__version__, time.strftime("%Y-%m-%d"), platform.python_version(),
        platform.machine(), os.cpu_count(), " (quick)" if quick else ""))

    # Hits and misses against the floor (issue 24's targets: persist's time over the
    # floor's; the smallest size gets those of 4k entries), and beside diskcache (no target:
    # the anchor is the floor). Where one is missed, its parts are timed apart.
    grown = {}
    for entries in sizes:
        names = ["persist", "floor"]
        if entries == sizes[0] or not quick:     # diskcache fills at ~50 us an entry
            names += ["diskcache"]
        if entries == sizes[0]:
            names += ["joblib", "shelve", "files"]
        step("hits and misses, %d entries" % entries)
        few = 300 if quick else 2000       # the slow peers' entries
        hits, misses, funcs, _ = bench_hit_miss(
            root, entries, 4 if quick and entries > sizes[0] else rounds, names,
            800 if quick else 1600, few, quick)
        grown[entries] = funcs["persist"]
        label = "{:,}".format(entries)
        limits = FLOOR_TARGETS["small" if entries == sizes[0] else "large"]
        for which, times in (("hit", hits), ("miss", misses)):
            ratio = times["persist"] / times["floor"]
            what = "%s, %s entries" % ("hit" if which == "hit" else "miss overhead", label)
            row("%s: persist / floor" % what, times["persist"], times["floor"],
                "<= %.3gx (this ratio)" % limits[which], ratio <= limits[which], ratio)
            if ratio > limits[which]:
                step("%s, %d entries: where the time goes" % (which, entries))
                BREAKDOWNS.append(breakdown_hit_miss(root, entries, which, 6 if quick else 10,
                                                     200 if quick else 400))
            for name in available(["diskcache", "joblib", "shelve"]):
                if name in times and (name == "diskcache" or entries == sizes[0]):
                    row("%s: vs %s" % (what, name), times["persist"], times[name])
        if entries == sizes[0]:
            # The store of files (issue 23), on this local disk: against the SQLite store,
            # and against joblib.Memory's file store, the other cache that keeps a file a
            # result.
            n = "{:,}".format(min(entries, few) if quick else entries)
            row("store of files, hit, %s: vs the SQLite store" % n, hits["files"],
                hits["persist"], ">= 1/3", hits["files"] <= 3 * hits["persist"])
            row("store of files, miss overhead, %s: vs the SQLite store" % n, misses["files"],
                misses["persist"], ">= 1/2", misses["files"] <= 2 * misses["persist"])
            if "joblib" in hits:
                row("store of files, hit, %s: vs joblib.Memory" % n, hits["files"],
                    hits["joblib"], ">= 1x", hits["joblib"] >= hits["files"])
                row("store of files, miss overhead, %s: vs joblib.Memory" % n,
                    misses["files"], misses["joblib"], ">= 1x",
                    misses["joblib"] >= misses["files"])
            # Their files go now: removed a minute later, once the kernel has written them
            # back, the store of files' 12,000 took 16 to 77 s here, at the run's end.
            for name in ("files", "joblib", "shelve"):
                shutil.rmtree(os.path.join(root, "%s-%d" % (name, entries)), ignore_errors=True)

    # Growth: the caches of every size, their hits measured in the same interleaved rounds.
    keys = {size: [i * 7919 % size for i in range(500)] for size in grown}
    by_size = median_rounds({size: (lambda f=f, k=keys[size]: per_call(f, k))
                             for size, f in grown.items()}, rounds)
    for size in sizes[1:]:
        growth = by_size[size] / by_size[sizes[0]]
        row("hit, %dk vs %dk entries: persist's growth" % (size // 1000, sizes[0] // 1000),
            by_size[size], by_size[sizes[0]], "<= 1.5x (this ratio)", growth <= 1.5, growth)

    step("8 processes")
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
    step("keys of large arguments")
    for kind, argument in arguments.items():
        key_times, peak = bench_key(root, argument, rounds)
        row("key of a %d MB %s: vs sha256 (peak %.1f MB)" % (size >> 20, kind, peak / 1e6),
            key_times["persist"], key_times["sha256"], ">= 1/1.5, no copy",
            key_times["persist"] <= 1.5 * key_times["sha256"] and peak < size / 10)
    del arguments

    # Keys of large structured arguments against their floors (issue 24's targets).
    rows = 200000 if quick else 1000000
    scale = "%dk" % (rows // 1000) if quick else "1M"
    arguments = {"a list of %s small ints" % scale: (list(range(rows)), list_floor, 3.0)}
    if pandas is not None:
        frame = pandas.DataFrame({"n": numpy.arange(rows), "x": numpy.linspace(0, 1, rows),
                                  "s": ["item-%d" % i for i in range(rows)]})
        arguments["a %s-row DataFrame (int, float, str)" % scale] = (frame, frame_floor, 1.3)
    for what, (argument, floor, limit) in arguments.items():
        step("key of " + what)
        times, peaks, persist_key = bench_key_floor(root, argument, floor,
                                                    4 if quick else 10)
        ratio = times["persist"] / times["floor"]
        row("key of %s: persist / floor (peak %.0f / %.0f MB)" % (
            what, peaks["persist"] / 1e6, peaks["floor"] / 1e6), times["persist"],
            times["floor"], "<= %.3gx (this ratio)" % limit, ratio <= limit, ratio, unit="ms")
        if ratio > limit:
            step("key of %s: where the time goes" % what)
            BREAKDOWNS.append(breakdown_key("key of " + what, argument, floor, persist_key,
                                            times))
    del arguments

    step("disk footprint")
    sizes, payload = bench_footprint(root, 5000)
    row("disk after 5,000 small results: bytes vs the payload (%d KB)" % (payload // 1024),
        sizes["persist"] / 1e6, payload / 1e6, "<= 3x (this ratio)",
        sizes["persist"] <= 3 * payload, sizes["persist"] / payload, unit="MB")
    if "diskcache" in sizes:
        row("disk after 5,000 small results: vs diskcache", sizes["persist"] / 1e6,
            sizes["diskcache"] / 1e6, ">= 1x", sizes["diskcache"] >= sizes["persist"],
            unit="MB")

    # The command line on a big cache, whole processes against the bare SQL's.
    entries = 50000 if quick else 1000000
    step("the command line, %d entries" % entries)
    commands, timed_run = bench_commands(root, entries, 3 if quick else 5)
    label = "{:,}".format(entries)
    for command, limit in COMMAND_TARGETS.items():
        (mine, peak), (bare, bare_peak) = commands[command]["persist"], commands[command]["bare"]
        ratio = mine / bare
        met = ratio <= limit
        target = "<= %.2gx (this ratio)" % limit
        memory = ""
        if peak is not None:
            memory = " (peak %.0f / %.0f MB)" % (peak / 1024, bare_peak / 1024)
            if command == "show":       # bounded: a screenful, whatever the entries
                met = met and peak <= bare_peak + MEMORY_BOUND * 1024
                target = "<= %.2gx, +%d MB" % (limit, MEMORY_BOUND)
        row("persist %s, %s entries: / bare SQL%s" % (" ".join(COMMANDS[command]), label,
                                                       memory), mine, bare, target, met, ratio,
            unit="ms")
        if not met:
            step("persist %s: where the time goes" % command)
            BREAKDOWNS.append(breakdown_command(command, entries, commands, timed_run))

    step("cold start")
    cold = bench_cold_start(root, 6 if quick else 20)
    row("cold start, import + decorate + one hit: vs python -c 'import sqlite3'",
        cold["persist"], cold["sqlite3"], "<= +12 ms (this delta)",
        cold["persist"] - cold["sqlite3"] <= 0.012,
        "+%.1fms" % ((cold["persist"] - cold["sqlite3"]) * 1e3), unit="ms")
    if cold["persist"] - cold["sqlite3"] > 0.012:
        step("cold start: where it goes")
        BREAKDOWNS.append(breakdown_cold_start(root))
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

    step("atomic_write")
    for size in (1024, 10 << 20):
        times = bench_atomic(root, size, rounds if size < 1 << 20 else 3)
        for mode in ("sync", "nosync"):
            row("atomic_write %s, sync=%s: vs plain open().write()" % (
                "1 KB" if size == 1024 else "10 MB", mode == "sync"), times[mode],
                times["plain"])

    count = 1000 if quick else 10000
    step("persist.map")
    mapped = bench_map_overhead(root, count, rounds)
    row("persist.map, %d hits, serial: vs a for loop over the memoized function" % count,
        mapped["map"] / count, mapped["loop"] / count, ">= 1/2", mapped["map"] <= 2 *
        mapped["loop"])
    count = 40 if quick else 300
    step("persist.map with workers")
    parallel = bench_workers(root, count, 2 if quick else 5)
    row("persist.map, %d items of ~10 ms: workers=2 vs serial" % count, parallel["workers"],
        parallel["serial"], ">= 1.7x", parallel["serial"] >= 1.7 * parallel["workers"],
        unit="ms")
    if "joblib" in parallel:
        row("the same: vs joblib.Parallel(n_jobs=2) over joblib.Memory", parallel["workers"],
            parallel["joblib"], ">= 1x", parallel["joblib"] >= parallel["workers"], unit="ms")

    for milliseconds, count in ((0, 1000 if quick else 10000), (10, 40 if quick else 1000)):
        step("persist.map on engines, %d items" % count)
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
    step("done_dir")
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
    step("a big result")
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
    print("\nratio = other / persist: above 1, persist is faster. Where the target says "
          "'this ratio', the ratio is the one the row names\n(persist / floor, persist / bare "
          "SQL: below 1, persist is faster) or a delta.")
    if BREAKDOWNS:
        print("\nWhere the time goes, for each target missed:\n")
        print("\n\n".join(BREAKDOWNS))
    step("done")
    return 1 if missed and not quick else 0


if __name__ == "__main__":
    sys.exit(main())
