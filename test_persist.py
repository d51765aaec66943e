"""Tests for persist: python -m unittest (nothing to install).

PERSIST_TEST_QUICK=1 python -m unittest runs the quick tier, for development (about 15 s on one
interpreter): the tests marked @slow (torture, kill -9 loops, big data, many processes, pip)
skip, saying "PERSIST_TEST_QUICK: slow"; each feature keeps tests of its own in the tier.
python -m unittest and .ci/run run everything.
PERSIST_TEST_LARGE=1 also runs the tests that write more than a gigabyte.
PERSIST_TEST_MOUNTS and PERSIST_TEST_S3 point the tests of caches on shared filesystems and
object stores at real ones: eval "$(.ci/net up DIR)" starts them and sets both (.ci/run does);
without them those tests skip, saying so.

Every child process a test starts has a timeout and a kill on cleanup (spawn(), run_python(),
CHILD_TIMEOUT), so that a broken build fails instead of hanging.
"""

import ast
import asyncio
import atexit
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import datetime
import enum
import errno
import faulthandler
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import linecache
import multiprocessing
import os
import pathlib
import pickle
import random
import re
import shelve
import shlex
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import unittest
import warnings
from unittest import mock

import persist

HERE = os.path.dirname(os.path.abspath(__file__))
POSIX = os.name == "posix"
PLAIN_FSYNC = mock.patch.object(persist, "_FULLFSYNC", None)   # as where there is no F_FULLFSYNC
LARGE = os.environ.get("PERSIST_TEST_LARGE") == "1"
QUICK = os.environ.get("PERSIST_TEST_QUICK") == "1"
# A shared filesystem and an object store, real ones (MountsTest, ObjectStoreTest): two mounts
# of one directory, as two machines see one NFS export, and an S3 endpoint (PERSIST_TEST_S3_PYTHON
# is the python that has the S3 clients installed). .ci/net up starts them and prints these.
MOUNTS = [path for path in os.environ.get("PERSIST_TEST_MOUNTS", "").split(os.pathsep) if path]
S3 = os.environ.get("PERSIST_TEST_S3", "")
CHILD_TIMEOUT = 300     # seconds: far past what any child needs on a loaded machine
# A suite started in the background by a shell without job control (`cmd &` in a script,
# nohup) has Ctrl-C ignored, and so would every child it starts: the tests of Ctrl-C then
# failed (no KeyboardInterrupt). Python's own handler, as in a terminal; children exec'd from
# here start with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# seconds, for one test (TempDirTest's backstop): past two children's CHILD_TIMEOUT, and within
# the 15 minutes a CI job or a `timeout 900` gives a run (at 1800 a hang in this process outlived
# them: the run was killed from outside, with no traceback saying where it hung)
TEST_TIMEOUT = 2 * CHILD_TIMEOUT
CI_JOB_LIMIT = 15 * 60


def setUpModule():
    """Children compile persist.py once in a run, into a directory of the run's own: hundreds
    start, and where PYTHONDONTWRITEBYTECODE is set (some CI images set it) each would
    compile its thousands of lines again, a third of the suite's time."""
    global BYTECODE, SAVED_ENVIRON
    BYTECODE = __import__("tempfile").mkdtemp(prefix="persist-test-bytecode-")
    SAVED_ENVIRON = dict(os.environ)
    os.environ["PYTHONPYCACHEPREFIX"] = BYTECODE
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def tearDownModule():
    os.environ.clear()
    os.environ.update(SAVED_ENVIRON)
    __import__("shutil").rmtree(BYTECODE, ignore_errors=True)


def slow(test):
    """Mark a test method or class that costs seconds (many processes, kill -9 loops, big data,
    a pip install): the quick tier (PERSIST_TEST_QUICK=1) skips it. Chosen by measured cost;
    leave each feature a quick test of its own."""
    return unittest.skipIf(QUICK, "PERSIST_TEST_QUICK: slow")(test)


def child_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# The start of a child script: hook_import(name, at_create) makes at_create() run in the middle
# of the import of module name, as the module is made (the tests of what persist imports late,
# and of a signal or a fork that comes meanwhile).
HOOK_IMPORT = textwrap.dedent("""
    import importlib.abc, sys
    def hook_import(name, at_create):
        class Loader(importlib.abc.Loader):
            def __init__(self, real):
                self.real = real
            def create_module(self, spec):
                at_create()
                return self.real.create_module(spec)
            def exec_module(self, module):
                return self.real.exec_module(module)
        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path, target=None):
                if fullname != name:
                    return None
                for finder in sys.meta_path[1:]:
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        spec.loader = Loader(spec.loader)
                        return spec
                return None
        sys.meta_path.insert(0, Finder())
""")


def run_python(code, cwd=None, check=True, timeout=CHILD_TIMEOUT, **env):
    """Run code in a fresh interpreter that can import persist; return its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=child_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError("child failed (%d):\n%s" % (done.returncode, done.stderr))
    return done.stdout


def spawn(test, args, timeout=CHILD_TIMEOUT, **options):
    """subprocess.Popen(args, **options) that cannot hang the suite or outlive test: a watchdog
    kills the child once it has run timeout seconds, so a read, wait or communicate on it
    returns and the test fails instead of hanging (a broken build must fail, never hang), and
    a cleanup kills it at the end of the test, closes its pipes and says if the watchdog had
    to step in."""
    options.setdefault("env", child_env())
    child = subprocess.Popen(args, **options)
    killed = []

    def expire():
        if child.poll() is None:
            killed.append(True)
            child.kill()

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()

    def end():
        watchdog.cancel()
        stop(child)
        if killed:
            raise AssertionError("child still running after %d s, killed: %s"
                                 % (timeout, " ".join(map(str, args))[:300]))

    test.addCleanup(end)
    return child


def start_python(test, code, cwd=None, **env):
    """Start code in a fresh interpreter for the length of test (see spawn); stdout is a pipe,
    one line per event; stdin waits."""
    return spawn(test, [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                 env=child_env(**env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 universal_newlines=True)


def stop(child):
    """Kill child (if it still runs), reap it and close its pipes."""
    child.kill()                 # a no-op once it has been reaped
    child.wait(CHILD_TIMEOUT)
    for pipe in (child.stdin, child.stdout, child.stderr):
        if pipe is not None:
            pipe.close()


@contextlib.contextmanager
def workers_killed_on_error():
    """Around the use of a process pool of this process, inside its with: on an error (a
    timeout included) its workers are killed first, so that the pool's exit, which waits
    for them, does not wait for ever on one that hangs."""
    try:
        yield
    except BaseException:
        for process in multiprocessing.active_children():
            process.kill()
        raise


def joined(thread, timeout=CHILD_TIMEOUT):
    """thread.join() that fails instead of waiting for ever on a thread that hangs (start it
    as a daemon, so that the run can still end)."""
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError("thread %s still running after %d s" % (thread.name, timeout))


@contextlib.contextmanager
def ended_as_persist_waits(other, line):
    """persist's time.sleep() patched: the first time persist waits, the child process
    other, which holds what persist waits for, is sent line and ends. Yields the waits."""
    waits = []

    def sleep(seconds):
        if not waits:
            other.communicate(line)
        waits.append(seconds)

    with mock.patch.object(persist.time, "sleep", sleep):
        yield waits


def descendants(pid):
    """The processes pid started, and those they started, where /proc lists them (Linux);
    elsewhere none."""
    parent_of = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as file:
                    parent_of[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue                 # ended meanwhile
    tree, found = {pid}, []
    while True:
        more = [child for child, parent in parent_of.items()
                if parent in tree and child not in tree]
        if not more:
            return found
        tree.update(more)
        found += more


HUNG = []      # the test that hung, once hung() runs


@atexit.register
def failed_if_hung():
    if HUNG:
        os._exit(1)


def hung(test):
    """TempDirTest's backstop: test ran past TEST_TIMEOUT. Print every thread's traceback,
    kill every process this one started (those still running, and theirs: a worker that
    loops, left alone, would outlive the run), and end the run, failed: the test, let go by a
    child's end, may finish first, and the run too (see failed_if_hung)."""
    HUNG.append(test)
    faulthandler.dump_traceback(all_threads=True)
    print("%s still running after %d s: the run ends here, with the processes it started"
          % (test, TEST_TIMEOUT), file=sys.stderr, flush=True)
    ended = descendants(os.getpid())
    for pid in ended:
        with contextlib.suppress(OSError):
            os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    for pid in ended:                    # ours reaped: gone before the run's end is seen
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
    os._exit(1)


def temp_files(directory):
    return sorted(name for _, _, names in os.walk(directory) for name in names
                  if name.endswith(".tmp"))


class TempDirTest(unittest.TestCase):
    """Each test gets its own directory, and leaves no temporary file in it."""

    def setUp(self):
        # The backstop for a hang no child's watchdog (spawn) can end, one in this process (a
        # deadlocked thread, a pool's exit): the run stops with every thread's traceback, and
        # no process it started outlives it (see hung). faulthandler's own timer, a minute
        # later, ends it where no thread of Python can run any more (a C call holding the GIL).
        # (--torture SECONDS may ask for hours.)
        backstop = threading.Timer(TEST_TIMEOUT + TORTURE_SECONDS, hung, (self.id(),))
        backstop.daemon = True
        backstop.start()
        self.addCleanup(backstop.cancel)
        if hasattr(faulthandler, "dump_traceback_later"):
            faulthandler.dump_traceback_later(TEST_TIMEOUT + TORTURE_SECONDS + 60, exit=True)
            self.addCleanup(faulthandler.cancel_dump_traceback_later)
        holder = __import__("tempfile").TemporaryDirectory()
        self.addCleanup(holder.cleanup)
        self.dir = os.path.realpath(holder.name)
        self.path = pathlib.Path(self.dir)

    def assertNoTemp(self, directory=None):
        self.assertEqual(temp_files(directory or self.dir), [])

    def assertAllHits(self, name, keys, expected):
        """Each key is a hit in the cache `name` here, with the value expected(key)."""
        runs = []

        @persist.memoize(cache_dir=self.dir, name=name)
        def f(x):
            runs.append(x)

        for key in sorted(keys):
            self.assertEqual(f(key), expected(key))
        self.assertEqual(runs, [])


NO_MOUNTS = ("SKIPPED, LOUDLY: needs two sshfs mounts of one directory: set PERSIST_TEST_MOUNTS "
             "to MOUNT1%sMOUNT2 (eval \"$(.ci/net up DIR)\" sets it)" % os.pathsep)


@unittest.skipUnless(MOUNTS, NO_MOUNTS)
class MountsTest(TempDirTest):
    """A test on a shared filesystem: a new directory of its own on the share, self.m1 as one
    machine sees it (through the first mount) and self.m2 as another does (the second), removed
    at the end. The mounts are PERSIST_TEST_MOUNTS's; skipped without it."""

    def setUp(self):
        super().setUp()
        if len(MOUNTS) != 2 or not all(os.path.isdir(path) for path in MOUNTS):
            self.fail("PERSIST_TEST_MOUNTS=%r: two mounts of one directory, %r-separated, "
                      "are needed" % (os.environ["PERSIST_TEST_MOUNTS"], os.pathsep))
        self.m1 = __import__("tempfile").mkdtemp(prefix="persist-test-",
                                                 dir=os.path.realpath(MOUNTS[0]))
        self.addCleanup(__import__("shutil").rmtree, self.m1)
        self.m2 = os.path.join(os.path.realpath(MOUNTS[1]), os.path.basename(self.m1))
        if not os.path.isdir(self.m2) or os.stat(self.m1).st_dev == os.stat(self.m2).st_dev:
            self.fail("PERSIST_TEST_MOUNTS=%r: %s, made through the first mount, is not seen "
                      "through the second, another mount" % (os.environ["PERSIST_TEST_MOUNTS"],
                                                              self.m1))


NO_S3 = ("SKIPPED, LOUDLY: needs an S3 server: set PERSIST_TEST_S3 to its URL and run with "
         "PERSIST_TEST_S3_PYTHON (eval \"$(.ci/net up DIR)\" sets both: moto's server, a venv "
         "with .ci/requirements-s3.txt)")
NO_S3FS = ("SKIPPED, LOUDLY: s3fs is not installed in this interpreter: run these tests with "
           "PERSIST_TEST_S3_PYTHON, the venv .ci/net up makes with .ci/requirements-s3.txt "
           "(.ci/run does)")


@unittest.skipUnless(S3, NO_S3)
@unittest.skipIf(S3 and importlib.util.find_spec("s3fs") is None, NO_S3FS)
class ObjectStoreTest(TempDirTest):
    """A test on an object store: self.fs, an s3fs.S3FileSystem on PERSIST_TEST_S3's server,
    and self.bucket, a new bucket of its own, deleted at the end with all it holds. Skipped
    without PERSIST_TEST_S3, or where s3fs is not installed. Name such classes TestObjectStore...:
    .ci/run runs those (-k TestObjectStore) with the python that has s3fs."""

    def setUp(self):
        super().setUp()
        import s3fs
        # (skip_instance_cache: s3fs hands out one instance per arguments, and its listings)
        self.fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": S3}, key="persist-test",
                                    secret="persist-test", skip_instance_cache=True)
        self.bucket = "persist-test-" + __import__("uuid").uuid4().hex
        self.fs.mkdir(self.bucket)
        self.addCleanup(self.fs.rm, self.bucket, recursive=True)


class Boom(Exception):
    pass


ROOT = POSIX and hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534                 # the uid and gid tests act as when they drop root


def drop_privileges():
    """Code for a child: become nobody if root, so permission bits apply."""
    return """
        import os, pathlib, persist
        import hashlib, inspect, json, logging, pickle, reprlib, shelve, sqlite3  # before losing /root
        pathlib.Path("/").as_uri()
        if os.getuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
    """


def functools_wraps(func, wrapper):
    import functools
    functools.update_wrapper(wrapper, func)


class MemoTest(TempDirTest):
    """A memoized function whose cache lives in this test's directory."""

    def memo(self, func=None, **options):
        options.setdefault("cache_dir", self.dir)
        calls = []

        def recorded(*args, **kwargs):
            calls.append((args, kwargs))
            return func(*args, **kwargs)

        if func is None:
            return lambda f: self.memo(f, **options)
        functools_wraps(func, recorded)
        wrapper = persist.memoize(**options)(recorded)
        wrapper.calls = calls
        return wrapper


class Renamed:
    pass


def nested(depth):
    """A list nested depth levels deep, as a parse tree or a linked list may be."""
    value = []
    for _ in range(depth):
        value = [value]
    return value


def depth_of(value):
    depth = 0
    while value:
        value, depth = value[0], depth + 1
    return depth


def value_files(cache):
    """(names of the files in cache's .values directory, names its rows record)."""
    directory = str(cache) + ".values"
    on_disk = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    conn = sqlite3.connect(str(cache))
    try:
        named = {name for name, in conn.execute("SELECT file FROM Dict WHERE file IS NOT NULL")}
    finally:
        conn.close()
    return on_disk, named


# The command line, as `python -m persist`: run as a module, its bytecode is compiled once in a
# run; as a script (`python persist.py`, which TestCommandLine's help test runs too), each time.
CLI = ["-m", "persist"]


def run_or_dump(test, args, timeout, **env):
    """run_command(args) in test's directory; one that outlives timeout fails the test with
    what it printed and the stack of each of its threads (faulthandler, on SIGABRT), so that
    a hang seen once in CI says where it was."""
    child = spawn(test, [sys.executable] + args, timeout=timeout + 60, cwd=test.dir,
                  env=child_env(PYTHONFAULTHANDLER="1", **env), stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, universal_newlines=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.send_signal(getattr(signal, "SIGABRT", signal.SIGTERM))
        out, err = child.communicate()
        test.fail("%s hung for %d s; it printed:\n%s\n%s" % (args[0], timeout, out, err[-20000:]))
    return subprocess.CompletedProcess(args, child.returncode, out, err)


def run_command(args, cwd=None, timeout=600, **env):
    return subprocess.run([sys.executable] + args, cwd=cwd, env=child_env(**env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


# -- memoize: keys


class TestMemoizeKeys(MemoTest):
    def test_defaults_and_keywords_are_one_entry(self):
        f = self.memo(lambda x=5, y=1: x * y)
        self.assertEqual([f(5), f(x=5), f(), f(5, 1), f(y=1)], [5] * 5)
        self.assertEqual(len(f.calls), 1)

    def test_every_kind_of_parameter(self):
        def g(a, /, b, *args, c, d=4, **kw):
            return (a, b, args, c, d, sorted(kw.items()))

        f = self.memo(g)
        self.assertEqual(f(1, 2, c=3), (1, 2, (), 3, 4, []))
        self.assertEqual(f(1, b=2, c=3, d=4), (1, 2, (), 3, 4, []))
        f(1, 2, 9, c=3, z=1, y=2)
        f(1, 2, 9, c=3, y=2, z=1)
        self.assertEqual(len(f.calls), 2)
        with self.assertRaises(TypeError):
            f(1)

    def test_dict_and_set_order_do_not_matter(self):
        f = self.memo(lambda d: len(d))
        f({"a": 1, "b": {"x", "y", "z"}})
        f({"b": {"z", "y", "x"}, "a": 1})
        f(frozenset(["p", "q"]))
        f(frozenset(["q", "p"]))
        self.assertEqual(len(f.calls), 2)

    def test_types_matter(self):
        f = self.memo(lambda x: x)
        for value in (1, 1.0, True, "1", b"1", (1,), [1]):
            f(value)
        self.assertEqual(len(f.calls), 7)
        self.assertIs(f(True), True)
        self.assertEqual(type(f(1.0)), float)

    def test_equal_values_not_identity(self):
        f = self.memo(lambda a, b: a + b)
        word = "ab"
        f(word, word)
        f("".join(["a", "b"]), "ab")
        self.assertEqual(len(f.calls), 1)

    def test_same_key_in_every_process_and_hash_seed(self):
        code = """
            import persist, sys
            @persist.memoize(cache_dir=sys.argv[1], name="seeded")
            def f(s, d):
                print("computed", flush=True)
                return len(s)
            f({"alpha", "beta", "gamma", "delta"}, {"k1": {"x", "y"}, "k2": 2.5})
        """
        outs = [subprocess.run([sys.executable, "-c", textwrap.dedent(code), self.dir],
                               env=child_env(PYTHONHASHSEED=seed), stdout=subprocess.PIPE,
                               universal_newlines=True, check=True, timeout=CHILD_TIMEOUT).stdout
                for seed in (1, 2, 3, 4)]
        self.assertEqual(outs, ["computed\n", "", "", ""])

    def test_large_arguments(self):
        f = self.memo(lambda data, arr: len(data))
        data = os.urandom(8 << 20)
        self.assertEqual(f(data, OutOfBand(b"x" * 100)), 8 << 20)
        self.assertEqual(f(bytes(data), OutOfBand(b"x" * 100)), 8 << 20)
        f(data, OutOfBand(b"y" * 100))
        self.assertEqual(len(f.calls), 2)

    @unittest.skipUnless(importlib.util.find_spec("_tracemalloc"), "needs tracemalloc")
    def test_large_argument_is_hashed_in_place(self):
        import tracemalloc
        f = self.memo(lambda data: 1)
        data = os.urandom(32 << 20)
        f(b"")
        tracemalloc.start()
        try:
            self.assertFalse(f.cache_delete(data))      # derives the key, nothing else
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1 << 20)

    @unittest.skipUnless(importlib.util.find_spec("numpy"), "numpy not installed")
    def test_numpy_arrays(self):
        import numpy
        f = self.memo(lambda a: float(a.sum()))
        f(numpy.arange(1000))
        f(numpy.arange(1000))
        f(numpy.arange(1000.0))
        self.assertEqual(len(f.calls), 2)

    def test_unkeyable_argument_names_the_parameter(self):
        f = self.memo(lambda data, lock: 1)
        with self.assertRaisesRegex(TypeError, r"argument 'lock'.*ignore"):
            f([1, 2], threading.Lock())
        self.assertEqual(f.calls, [])

    def test_recursive_argument(self):
        f = self.memo(lambda x: 1)
        loop = []
        loop.append(loop)
        with self.assertRaisesRegex(TypeError, "argument 'x'"):
            f(loop)
        cycle = {}
        cycle["self"] = cycle
        with self.assertRaisesRegex(TypeError, "argument 'x'"):
            f(cycle)
        self.assertEqual(f.calls, [])

    @slow
    def test_settings_object_filled_in_after_import_is_keyed_by_content(self):
        # a default with no __eq__, changed in place by main(): each run is served results
        # of its own settings, passed explicitly or left at the default
        (self.path / "job.py").write_text(textwrap.dedent("""
            import persist, sys

            class Config:
                scale = 1

            CONFIG = Config()
            LOADED = Config()                  # settings loaded at import, in each run anew
            LOADED.scale = int(sys.argv[1]) * 100

            @persist.memoize
            def featurize(x, cfg=CONFIG):
                print("computed", cfg.scale, file=sys.stderr)
                return x * cfg.scale

            @persist.memoize
            def loaded(x, cfg=LOADED):
                return x * cfg.scale

            def main():
                CONFIG.scale = int(sys.argv[1])
                print(featurize(10), featurize(10, cfg=CONFIG), featurize(10, CONFIG),
                      loaded(1, cfg=LOADED))

            main()
        """))
        outs = []
        for scale in ("2", "3", "2", "1"):
            done = run_command(["job.py", scale], cwd=self.dir)
            self.assertEqual(done.returncode, 0, done.stderr)
            outs.append((done.stdout.split(), done.stderr.count("computed")))
        self.assertEqual(outs, [(["20"] * 3 + ["200"], 1), (["30"] * 3 + ["300"], 1),
                                (["20"] * 3 + ["200"], 0), (["10"] * 3 + ["100"], 1)])

    def test_default_object_changed_in_place_then_passed_explicitly(self):
        config = Settings()
        f = self.memo(lambda x, cfg=config: x * cfg.scale)
        self.assertEqual(f(10), 10)
        config.scale = 3
        self.assertEqual((f(10), f(10, cfg=config), f(10, config)), (30, 30, 30))
        other = Settings()
        self.assertEqual((f(10, other), f(10, cfg=other)), (10, 10))    # passed: keyed
        self.assertEqual(len(f.calls), 3)
        config.scale = 1
        self.assertEqual((f(10), f(10, config)), (10, 10))
        self.assertEqual(len(f.calls), 4)          # the settings it held at first, passed

    def test_ignore(self):
        f = self.memo(lambda x, verbose=False, log=None: x, ignore=("verbose", "log"))
        f(1)
        f(1, verbose=True, log=threading.Lock())
        f(1, True)
        self.assertEqual(len(f.calls), 1)
        with self.assertRaisesRegex(TypeError, "'nope'.*not a parameter"):
            self.memo(lambda x: x, ignore=["nope"])

    def test_ignore_a_keyword_that_kwargs_collects(self):
        def fetch(url, **kwargs):
            return url, sorted(kwargs)

        f = self.memo(fetch, ignore={"timeout"})
        self.assertEqual(f("u", timeout=1), ("u", ["timeout"]))
        self.assertEqual(f("u", timeout=threading.Lock()), ("u", ["timeout"]))
        self.assertEqual(f("u"), ("u", ["timeout"]))        # the key left timeout out
        self.assertEqual(f("u", retries=2), ("u", ["retries"]))
        self.assertEqual(len(f.calls), 2)
        shown = run_command(["-m", "persist", "show", f.cache_info().path])
        self.assertEqual((shown.returncode, shown.stdout.count("'u'")), (0, 2), shown.stderr)
        self.assertNotIn("timeout", shown.stdout)
        with self.assertRaisesRegex(TypeError, r"'timeout'.*not a parameter of .*\(url\)"):
            self.memo(lambda url: url, ignore={"timeout"})      # no **kwargs: misspelt
        with self.assertRaisesRegex(TypeError, "parameter names, not 3"):
            self.memo(fetch, ignore={3})

    def test_ignore_self_on_method(self):
        directory = self.dir
        runs = []

        class Model:
            @persist.memoize(cache_dir=directory, ignore="self")
            def predict(self, x):
                runs.append(x)
                return x * 2

        self.assertEqual(Model().predict(2), 4)
        self.assertEqual(Model().predict(2), 4)
        self.assertEqual(runs, [2])

    def test_key_callable(self):
        f = self.memo(lambda path, mtime: path, key=lambda path, mtime: path)
        f("a", 1)
        f("a", 2)
        self.assertEqual(len(f.calls), 1)

    def test_slots_of_a_subclass_are_keyed(self):
        f = self.memo(lambda x: x.tag)
        self.assertEqual((f(SlottedDict("a")), f(SlottedDict("b"))), ("a", "b"))

    def test_a_keyword_named_like_star_args_is_not_star_args(self):
        def g(*args, **kwargs):
            return args, kwargs
        f = self.memo(g)
        self.assertEqual((f(1), f(**{"*args": (1,)})), (((1,), {}), ((), {"*args": (1,)})))

    def test_none_type_as_an_argument(self):
        # (str, type(None)) as allowed types: builtins.NoneType exists only from 3.10 on.
        f = self.memo(lambda kinds: len(kinds))
        self.assertEqual(f((str, type(None))), 2)
        self.assertEqual(f((str, type(None))), 2)
        self.assertEqual(f((str, type(...))), 2)
        self.assertEqual(len(f.calls), 2)

    @unittest.skipUnless(importlib.util.find_spec("_tracemalloc"), "needs tracemalloc")
    def test_bounded_and_on_one_line(self):
        import tracemalloc
        f = self.memo(lambda x: 1, name="short")
        f(0)
        arguments = [bytes(8 << 20), bytearray(4 << 20), 10 ** 5000, Multiline(), "s" * (4 << 20)]
        for argument in arguments:
            tracemalloc.start()
            try:
                f(argument)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertLess(peak, 2 << 20, type(argument))
        large = [{i: i for i in range(20000)}, set(range(20000))]    # not sorted to be shown
        for argument in large:
            f(argument)
        arguments += large
        conn = sqlite3.connect(f.cache_info().path)
        shown = [args for args, in conn.execute("SELECT args FROM Dict")]
        conn.close()
        self.assertEqual(len(shown), len(arguments) + 1)
        for text in shown:
            self.assertLessEqual(len(text), 200)
            self.assertNotIn("\n", text)
        self.assertIn("(<int of about 5001 digits>)", shown)


class TestShortArguments(unittest.TestCase):
    def test_plain_values_are_shown_as_reprlib_shows_them(self):
        # A call's arguments, as 'persist show' and failures() show them: numbers, None and
        # short strs skip reprlib (a miss stores them), and must come out as it makes them.
        values = [0, -1, True, None, 2.5, -0.0, float("nan"), float("inf"), 1e300, 5e-324,
                  "", "a", 'it\'s "quoted"', "\u00e9\U0001f600", "\udce9"]
        for bits in (118, 119, 120, 121, 130, 133, 4096, 4097):
            values += [2 ** bits - 1, 2 ** bits, -(2 ** bits)]
        values += [10 ** digits for digits in range(35, 45)]
        for size in range(36, 46):
            values += ["x" * size, "\n" * (size // 2), "'" * size]
        for value in values:
            with self.subTest(value=value):
                self.assertEqual(persist._short_repr(((value,), {"k": value})),
                                 "(%s, k=%s)" % ((persist._SHORT.repr(value),) * 2))


class Settings:
    """Settings filled in after import, with no __eq__ of their own."""

    scale = 1


class OutOfBand:
    """Pickles its data as a PickleBuffer, as numpy arrays do."""

    def __init__(self, data):
        self.data = bytearray(data)

    def __reduce_ex__(self, protocol):
        return OutOfBand, (pickle.PickleBuffer(self.data),)


class SlottedDict(dict):
    __slots__ = ("tag",)

    def __init__(self, tag):
        super().__init__()
        self.tag = tag


class Multiline:
    def __repr__(self):
        return "first line\nsecond line\n" * 1000


class MyInt(int):
    pass


class TestKeysOfEqualValues(MemoTest):
    """Equal arguments are one entry whatever their order or layout; other types are not."""

    def assertEntries(self, groups):
        """Each group holds equal arguments: one call computes per group, the rest hit."""
        f = self.memo(lambda x: 1)
        for group in groups:
            for value in group:
                f(value)
        self.assertEqual(len(f.calls), len(groups), [args for args, _ in f.calls])
        self.assertEqual(f.cache_info().hits, sum(len(group) for group in groups) - len(groups))

    def test_order_and_layout_do_not_matter(self):
        first = collections.defaultdict(list)
        first["a"].append(1)
        first["b"].append(2)
        second = collections.defaultdict(list, [("b", [2]), ("a", [1])])
        self.assertEntries([
            [{"a": 1, "b": 2}, {"b": 2, "a": 1}],
            [first, second],
            [collections.Counter("abc"), collections.Counter("cba")],
            [{3, 1, 2}, set([2, 3, 1])],
            [Config("c", {"x": 1, "y": {2, 3}}), Config("c", {"y": {3, 2}, "x": 1})],
            [pathlib.PurePosixPath("a/b"), pathlib.PurePosixPath("a", "b")],
            [datetime.timezone.utc, datetime.timezone(datetime.timedelta(0))],
            [10 ** 5000, (10 ** 2500) ** 2],
            [memoryview(b"abc"), memoryview(bytearray(b"abc"))],
            [float("nan"), float("inf") - float("inf")],
            [__import__("decimal").Decimal("1.0"), __import__("decimal").Decimal("1.0")],
            [Slotted(1, {"p", "q"}), Slotted(1, {"q", "p"})],
        ])

    def test_types_and_what_results_can_tell_apart_are_kept(self):
        decimal = __import__("decimal")
        self.assertEntries([[value] for value in [
            0.0, -0.0, 1, 1.0, True, MyInt(1), Colour.RED, [1, 2], (1, 2), Point(1, 2),
            decimal.Decimal("1.0"), decimal.Decimal("1.00"),
            __import__("fractions").Fraction(1, 2),
            0.5, b"ab", bytearray(b"ab"), "ab",
            collections.OrderedDict([("a", 1), ("b", 2)]),
            collections.OrderedDict([("b", 2), ("a", 1)]),
            {"a": 1, "b": 2}, collections.defaultdict(int, {"a": 1, "b": 2}),
            pathlib.PurePosixPath("a"), pathlib.PureWindowsPath("a"),
            datetime.datetime(2024, 1, 1),
            datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
            datetime.date(2024, 1, 1), frozenset({1}), {1},
        ]])

    def test_huge_int_is_keyed(self):
        f = self.memo(lambda x: x % 7)
        self.assertEqual(f(10 ** 5000), 10 ** 5000 % 7)
        self.assertEqual(f(10 ** 5000 + 0), 10 ** 5000 % 7)
        self.assertEqual(len(f.calls), 1)

    def test_unnamed_function_or_cycle_names_the_parameter(self):
        f = self.memo(lambda data, fn: 1)
        with self.assertRaisesRegex(TypeError, r"argument 'fn'.*lambda"):
            f([1], lambda: 0)
        with self.assertRaisesRegex(TypeError, r"argument 'fn'"):
            f([1], collections.defaultdict(lambda: 0))
        self.assertEqual(f([1], len), 1)
        self.assertEqual(f.calls, [(([1], len), {})])

    @unittest.skipUnless(importlib.util.find_spec("numpy"), "numpy not installed")
    def test_numpy_layouts_and_byte_orders_are_one_entry(self):
        import numpy
        wide = numpy.arange(24.0).reshape(4, 6)
        strided = numpy.arange(48.0).reshape(4, 12)[:, ::2]
        self.assertEntries([
            [wide, numpy.asfortranarray(wide), wide.astype(">f8"), wide.copy()],
            [strided, strided.copy(), numpy.ascontiguousarray(strided)],
            [wide.astype(numpy.int64)],
            [numpy.float64(1.5), numpy.float64(1.5)],
            [numpy.array(1.5)],
            [1.5],
        ])

    @unittest.skipUnless(importlib.util.find_spec("numpy") and
                         importlib.util.find_spec("_tracemalloc"), "needs numpy, tracemalloc")
    def test_large_array_is_hashed_without_a_copy(self):
        import numpy
        import tracemalloc
        f = self.memo(lambda data: 1)
        f(b"")
        data = numpy.arange(4 << 20, dtype=numpy.float64).reshape(-1, 512)
        for array, limit in ((data, 1 << 20), (data[:, ::2], 9 << 20),
                             (numpy.asfortranarray(data), 9 << 20)):
            tracemalloc.start()
            try:
                self.assertFalse(f.cache_delete(array))
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertLess(peak, limit)

    @unittest.skipUnless(importlib.util.find_spec("pandas"), "pandas not installed")
    def test_pandas_frames_by_content(self):
        import pandas
        built = pandas.DataFrame({"x": [1, 2, 3]})
        built["y"] = [1.5, 2.5, 3.5]
        whole = pandas.DataFrame({"x": [1, 2, 3], "y": [1.5, 2.5, 3.5]})
        self.assertEntries([
            [whole, built, whole.copy()],
            [whole[["y", "x"]]],
            [whole["x"], built["x"]],
            [whole["x"].rename("z")],
            [whole.set_index("x")],
        ])


class Count(enum.IntEnum):
    ONE = 1


class MyFloat(float):
    pass


class MyStr(str):
    pass


class LongList(list):
    pass


class ChangesTheList:
    """Changes the list that holds it when its key is written, as code in a __reduce_ex__ or
    a property may."""

    def __init__(self, target, change):
        self.target, self.change = target, change

    def __reduce_ex__(self, protocol):
        self.change(self.target)
        return int, (0,)


def long_values():
    """Long lists and tuples (of several runs of persist._KEY_RUN items) of values that a key
    of items one by one must tell apart: each label, a function that makes the value anew."""
    run = persist._KEY_RUN
    negative_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000001))[0]
    edges = [0, -1, 1, 10 ** 5000, -10 ** 5000]
    for bits in (7, 8, 15, 16, 30, 31, 32, 60, 62, 63, 64, 65, 128):
        edges += [2 ** bits - 1, 2 ** bits, 2 ** bits + 1, -2 ** bits, -2 ** bits - 1]
    floats = [float("nan"), negative_nan, float("inf"), float("-inf"), 0.0, -0.0, 5e-324,
              2.225073858507201e-308, 2.2250738585072014e-308, 1.7976931348623157e308, 1.5,
              -1 / 3, 1e-310, 1e16, 2.0 ** -1074 * 3]
    strs = ["", "\x00", "a\x00b", "\U0001F600", "\u00e9", "x" * 255, "x" * 256, "y" * 1000,
            "plain", "s1:", "i1;"]

    def filled(values, count=2 * run + 3):
        items = (values * (count // len(values) + 1))[:count]
        random.Random(count).shuffle(items)
        return items

    def replaced(items, position, value):
        items = list(items)
        items[position] = value
        return items

    ints = filled(edges)
    short = list(range(2 * run + 3))
    words = filled(strs)
    # a few surrogates only: PyPy encodes a str that holds many in quadratic time
    for position, surrogates in ((3, "\ud800"), (run + 9, "\udfff"), (2 * run, "\ud83d\ude00")):
        words[position] = surrogates
    makers = {
        "ints": lambda: list(range(3 * run + 7)),
        "ints at the edges of every width": lambda: list(ints),
        "negative ints": lambda: [-n for n in range(2 * run)],
        "one run and one item": lambda: list(range(run + 1)),
        "exactly two runs": lambda: list(range(2 * run)),
        "floats": lambda: filled(floats),
        "strs": lambda: list(words),
        "strs whose surrogate pair spans two runs":
            lambda: replaced(replaced(words, run - 1, "\ud83d"), run, "\ude00"),
        "a str of _LONG code points": lambda: replaced(words, run + 5, "z" * persist._LONG),
        "a str longer than _LONG": lambda: replaced(words, run + 5, "w" * (persist._LONG + 1)),
        "bools": lambda: filled([True, False]),
        "Nones": lambda: [None] * (run + 1),
        "bools and Nones": lambda: filled([True, False, None]),
        "ints and floats": lambda: replaced(short, run + 2, 1.0),
        "an int subclass": lambda: replaced(short, run + 2, MyInt(run + 2)),
        "an IntEnum": lambda: replaced(short, 2 * run, Count.ONE),
        "a float subclass": lambda: replaced(filled(floats), run, MyFloat(1.5)),
        "a str subclass": lambda: replaced(words, 0, MyStr("plain")),
        "nested": lambda: [list(range(run + 1)), [1.5] * (run + 1), (("a",) * (run + 1))],
        "pairs": lambda: [(n, str(n)) for n in range(run + 1)],
        "a list subclass": lambda: LongList(range(run + 1)),
    }
    for bool_at in (0, run - 1, run, run + 1, 2 * run + 2):
        makers["a bool at %d" % bool_at] = lambda at=bool_at: replaced(short, at, True)
    for label, maker in list(makers.items()):
        if label != "a list subclass":
            makers[label + ", a tuple"] = lambda maker=maker: tuple(maker())
    return makers


class TestKeysOfLongLists(MemoTest):
    """Long lists and tuples are keyed a run of items at a time: the same bytes as item by
    item (persist._digest(value, runs=False)), the reference."""

    def assertSameAsItemByItem(self, make):
        self.assertEqual(persist._digest(make()), persist._digest(make(), runs=False))

    def test_runs_make_the_bytes_items_one_by_one_make(self):
        for label, make in long_values().items():
            if not label.endswith(", a tuple"):
                with self.subTest(label):
                    self.assertSameAsItemByItem(make)

    @slow
    def test_runs_of_tuples_make_the_bytes_items_one_by_one_make(self):
        for label, make in long_values().items():
            if label.endswith(", a tuple"):
                with self.subTest(label):
                    self.assertSameAsItemByItem(make)

    @slow
    def test_very_long_lists(self):
        for make in (lambda: list(range(-10 ** 5, 10 ** 6)), lambda: [0.5] * 10 ** 6,
                     lambda: tuple(str(n) for n in range(10 ** 6))):
            self.assertSameAsItemByItem(make)

    @slow
    def test_each_value_has_a_key_of_its_own(self):
        digests = {label: persist._digest(make()) for label, make in long_values().items()}
        self.assertEqual(len(set(digests.values())), len(digests))

    def test_list_changed_while_keyed(self):
        # An item whose key runs code that changes the list: the items after it are keyed as
        # the list is then, by both ways (the runs before it were keyed as they were).
        run = persist._KEY_RUN
        changes = {
            "grows": lambda target: target.extend(range(run)),
            "shrinks": lambda target: target.__delitem__(slice(-run, None)),
            "cleared": lambda target: target.clear(),
            "its first run replaced": lambda target: target.__setitem__(slice(0, run),
                                                                        [None] * run),
        }
        for label, change in changes.items():
            for position in (2, run + 3):
                def make():
                    items = list(range(3 * run))
                    items[position] = ChangesTheList(items, change)
                    return items
                with self.subTest(label, position=position):
                    self.assertSameAsItemByItem(make)
                    unchanged = make()
                    unchanged[position] = 0
                    self.assertNotEqual(persist._digest(make()), persist._digest(unchanged))

    def test_classes_a_metaclass_says_are_int_float_str_or_none(self):
        # A run's items were taken to be of one type by a set of their types, which keeps one
        # of two types a metaclass says are equal: a float subclass's items then keyed by
        # float.hex, not by its own hex() (a silent other key), a None-like one raised
        # KeyError, a str-like one keyed where item by item refuses it, and an int-like
        # one's __index__ changed an item of its own run after the run was copied.
        run = persist._KEY_RUN

        def claims(base):
            return type("Claims" + base.__name__, (type,), {
                "__eq__": lambda cls, other: other is base or cls is other,
                "__hash__": lambda cls: hash(base)})

        class Float(float, metaclass=claims(float)):
            def hex(self):
                return "its own"

        class NoneLike(metaclass=claims(type(None))):
            def __reduce_ex__(self, protocol):
                return NoneLike, ()

        class StrLike(metaclass=claims(str)):
            def __len__(self):
                return 3

            def __radd__(self, other):
                return other + "abc"

        class IntLike(metaclass=claims(int)):
            def __init__(self, target):
                self.target = target

            def __index__(self):
                self.target[5] = -1
                return 1

        def outcome(value, runs):
            try:
                return persist._digest(value, runs)
            except Exception as exc:
                return type(exc)

        makers = {
            "float": lambda: [0.5] * 7 + [Float(2.0)] + [0.5] * (2 * run),
            "None": lambda: [None] * 7 + [NoneLike()] + [None] * (2 * run),
            "str": lambda: ["a"] * 7 + [StrLike()] + ["a"] * (2 * run),
        }
        for label, make in makers.items():
            for kind in (list, tuple):
                with self.subTest(label, kind=kind.__name__):
                    self.assertEqual(outcome(kind(make()), True), outcome(kind(make()), False))

        def int_like():
            items = list(range(2 * run))
            items[3] = IntLike(items)
            return items
        self.assertEqual(outcome(int_like(), True), outcome(int_like(), False))
        self.assertNotEqual(outcome(int_like(), True), outcome(list(range(2 * run)), True))

    @unittest.skipUnless(importlib.util.find_spec("numpy"), "numpy not installed")
    def test_object_arrays_by_runs(self):
        # A str column's array of objects was keyed through a list of all its items (tolist)
        import numpy
        run = persist._KEY_RUN
        words = ["w%d\u00e9" % n for n in range(3 * run)]

        def changing(position):
            items = numpy.array(words, dtype=object)
            items[position] = ChangesTheList(items, lambda target: target.fill("changed"))
            return items

        makers = {
            "strs": lambda: numpy.array(words, dtype=object),
            "strs and a None": lambda: numpy.array(words[:run + 5] + [None] + words, dtype=object),
            "2-d, transposed": lambda: numpy.array(words, dtype=object).reshape(-1, 3).T,
            "ints": lambda: numpy.array(list(range(3 * run)), dtype=object),
            "nested lists": lambda: numpy.array([list(range(run + 1))] * 3 + [None], dtype=object),
            "changed by an item, first run": lambda: changing(2),
            "changed by an item, second run": lambda: changing(run + 3),
        }
        for label, make in makers.items():
            with self.subTest(label):
                # the reference: as an array of objects was keyed before issue 24
                value = make()
                w = persist._KeyWriter(b"", set(), runs=False)
                w.text.append("A")
                persist._write((value.dtype.kind, value.shape, value.ravel().tolist()), w)
                self.assertEqual(persist._digest(make()), w.digest())

    @slow
    @unittest.skipUnless(importlib.util.find_spec("pandas"), "pandas not installed")
    def test_frames_with_str_columns_by_runs(self):
        import pandas
        count = 3 * persist._KEY_RUN
        words = ["item-%d" % n for n in range(count)]
        frame = pandas.DataFrame({"n": range(count), "s": words,
                                  "o": pandas.Series(words, dtype=object)})
        holes = frame.copy()
        holes.loc[count - 5, "s"] = None
        for value in (frame, holes, frame["s"], holes["s"], frame.set_index("s")):
            self.assertSameAsItemByItem(lambda: value)

    @unittest.skipUnless(importlib.util.find_spec("_tracemalloc"), "needs tracemalloc")
    def test_long_list_is_keyed_in_bounded_memory(self):
        # Every token was held to the end: 70 MB for a million ints (in one list, or in rows)
        import tracemalloc
        f = self.memo(lambda data: 1)
        f(b"")
        count = 5 * persist._KEY_RUN
        for label, items in (("ints", list(range(count))),
                             ("ints and Nones", [n if n % 2 else None for n in range(count)]),
                             ("strs", tuple(str(n) for n in range(count))),
                             ("rows", [list(range(n, n + 1000)) for n in range(0, count, 1000)]),
                             ("rows of tuples", [tuple(range(n, n + 1000))
                                                 for n in range(0, count, 1000)])):
            tracemalloc.start()
            try:
                self.assertFalse(f.cache_delete(items))      # derives the key, nothing else
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertLess(peak, 1 << 20, label)

    def test_long_lists_are_entries_by_value(self):
        f = self.memo(lambda data: len(data))
        run = persist._KEY_RUN
        values = list(range(2 * run))
        self.assertEqual([f(values), f(list(values)), f(tuple(values))], [2 * run] * 3)
        for position in (0, run, 2 * run - 1):
            changed = list(values)
            changed[position] = bool(values[position])
            f(changed)
        self.assertEqual(len(f.calls), 5)


class RaisesRecursion:
    """An argument that cannot say what it is made of without recursing too deep."""

    def __reduce_ex__(self, protocol):
        raise RecursionError("raised inside")


class KeyWithSet:
    """An argument whose pickle holds a set: its order differs with PYTHONHASHSEED."""

    def __init__(self, tags):
        self.tags = set(tags)
        self.meta = {"b": 1, "a": 2}


class TestHostileArguments(MemoTest):
    def test_deeply_nested_argument_is_named_and_nothing_runs(self):
        # It raised the bare RecursionError of the key's encoding, naming nothing.
        f = self.memo(lambda x: 1)
        deep = {}
        for _ in range(10000):
            deep = {"k": deep}
        for argument in (nested(100000), deep):
            with self.assertRaisesRegex(RecursionError, r"argument 'x' is nested too deep to "
                                        r"be part of a cache key .*ignore=\['x'\]"):
                f(argument)
        self.assertEqual(f.calls, [])
        self.assertEqual(f([[[1]]]), 1)
        with self.assertRaises(persist.Failures) as caught:
            persist.map(f, [nested(100000)], progress=False)
        self.assertRegex(str(caught.exception.failures[0][1]), "argument 'x' is nested too deep")
        self.assertEqual((f.cache_info().entries, len(f.calls)), (1, 1))
        self.assertNoTemp()

    @slow
    def test_argument_nested_too_deep_is_named_so_at_every_depth_of_the_callers_stack(self):
        # Where the stack runs out moves with the caller's depth: on PyPy, once in about 400
        # such keyings, the interpreter raised a TypeError in place of the RecursionError
        # (it ran out again recording the error's context), and the argument was called
        # "cannot be part of a cache key" with PyPy's text. Each depth gives one place.
        f = self.memo(lambda x: 1)
        argument, errors = nested(100000), collections.Counter()

        def call_at(depth):
            if depth:
                return call_at(depth - 1)
            try:
                f(argument)
            except RecursionError as exc:
                errors[re.sub(r"\(now \d+\)", "", str(exc))] += 1
            except Exception as exc:
                errors["%s: %s" % (type(exc).__name__, exc)] += 1
        for depth in range(0, 600, 2):
            call_at(depth)
        self.assertEqual(len(errors), 1, errors)
        self.assertRegex(next(iter(errors)), r"argument 'x' is nested too deep to be part of "
                                             r"a cache key \(RecursionError: maximum recursion")
        self.assertEqual(f.calls, [])

    def test_recursion_error_raised_while_keying_names_the_argument(self):
        f = self.memo(lambda x: 1)
        with self.assertRaisesRegex(RecursionError, r"argument 'x' is nested too deep .*"
                                                    r"\(RecursionError: raised inside\)"):
            f(RaisesRecursion())
        self.assertEqual(f.calls, [])

    @slow
    def test_object_holding_a_set_has_one_key_in_every_process(self):
        # The argument's class lives in a small module of its own: importing test_persist in
        # each child took longer than the rest of the test.
        (self.path / "lib").mkdir()
        (self.path / "lib" / "tagged.py").write_text(textwrap.dedent("""
            class KeyWithSet:
                # An argument whose pickle holds a set: its order differs with PYTHONHASHSEED.
                def __init__(self, tags):
                    self.tags = set(tags)
                    self.meta = {"b": 1, "a": 2}
        """))
        code = """
            import sys, persist
            sys.path.insert(0, sys.argv[2])
            from tagged import KeyWithSet
            @persist.memoize(cache_dir=sys.argv[1], name="sets")
            def f(obj):
                print("computed", flush=True)
            f(KeyWithSet(["alpha", "beta", "gamma", "delta", "epsilon"]))
        """
        outs = [subprocess.run([sys.executable, "-c", textwrap.dedent(code), self.dir,
                                str(self.path / "lib")],
                               env=child_env(PYTHONHASHSEED=seed), stdout=subprocess.PIPE,
                               universal_newlines=True, check=True, timeout=CHILD_TIMEOUT).stdout
                for seed in (1, 2, 3, 4, 5)]
        self.assertEqual(outs, ["computed\n", "", "", "", ""])


class TestKeysInAFreshProcess(TempDirTest):
    """What decoration imports lazily is there, in a process whose first call has an argument
    that cannot be keyed: the error names the parameter."""

    def test_the_error_names_the_parameter(self):
        out = run_python("""
            import sys, threading, persist
            @persist.memoize(cache_dir=sys.argv[1] if len(sys.argv) > 1 else ".")
            def f(x, lock):
                return x
            try:
                f(1, threading.Lock())
            except TypeError as exc:
                print(exc)
        """, cwd=self.dir)
        self.assertIn("argument 'lock' cannot be part of a cache key", out)

    # What decoration imports lazily (inspect) is there when an error message needs it.
    def test_unkeyable_argument_is_named(self):
        out = run_python("""
            import threading, persist
            f = persist.memoize(cache_dir=%r)(lambda x, lock: 1)
            try:
                f(1, threading.Lock())
            except TypeError as exc:
                print(exc)
        """ % self.dir)
        self.assertIn("argument 'lock' cannot be part of a cache key", out)

    @slow
    @unittest.skipUnless(hasattr(signal, "SIGUSR1"), "SIGUSR1")
    def test_a_signal_handler_keys_a_call_while_its_thread_imports_hashlib(self):
        # persist imports hashlib at a key's first long input: a signal handler that keys
        # one while its thread is in the middle of that import found the module without
        # sha256 yet, and both calls failed as unkeyable (AttributeError: partially
        # initialized module 'hashlib'). The handler's key is hashed by CPython's own.
        script = self.path / "job.py"     # a file: a function of python -c keys its code
        script.write_text(HOOK_IMPORT + textwrap.dedent("""
            import importlib.abc, importlib.util, os, signal, sys, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def f(x):
                return len(x)
            if "hashlib" in sys.modules or importlib.util.find_spec("_hashlib") is None:
                print("imported already")    # PyPy imports hashlib with persist
                sys.exit(0)
            got = []
            signal.signal(signal.SIGUSR1, lambda *a: got.append(f("z" * 300)))
            hook_import("_hashlib",           # OpenSSL's: hashlib imports it first
                        lambda: os.kill(os.getpid(), signal.SIGUSR1))   # handled at once
            print(f("y" * 200), got, f("z" * 300), f.cache_info().hits)
        """))
        done = run_command([str(script), self.dir], timeout=CHILD_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        if done.stdout != "imported already\n":
            self.assertEqual(done.stdout, "200 [300] 300 1\n")


class Colour(enum.Enum):
    RED = 1
    GREEN = "green"


class Perm(enum.Flag):
    R = 4
    W = 2


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Config:
    name: str
    weights: dict


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b


def key_corpus():
    """label -> value: one or more of each kind of argument that keys must keep stable."""
    import decimal
    import fractions
    import functools
    import uuid
    utc = datetime.timezone.utc
    india = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    corpus = {
        "None": None, "True": True, "False": False,
        "int 0": 0, "int -1": -1, "int 2**64": 2 ** 64, "int -10**5000": -10 ** 5000,
        "float 1.5": 1.5, "float 0.0": 0.0, "float -0.0": -0.0, "float nan": float("nan"),
        "float -inf": float("-inf"), "float 1e-310": 1e-310, "complex": complex(1, -2.5),
        "str empty": "", "str": "h\u00e9llo w\u00f6rld", "str astral": "\U0001F600",
        "str Unicode 15": "\U0001FAE8\u0CF3",      # unassigned in 3.8's Unicode 12.1
        "str surrogate": "a\ud800b", "str long": "x\u00e9" * 70000,
        "bytes": b"\x00\xff\n", "bytes empty": b"", "bytearray": bytearray(b"\x00\xff\n"),
        "memoryview 2-d": memoryview(b"abcdef").cast("B", (2, 3)),
        "tuple": (1, "a", None), "tuple empty": (), "list": [1, [2, [3]]], "list empty": [],
        "dict": {"b": 2, "a": [1, {"x": None}]}, "dict empty": {},
        "set": {"alpha", "beta", "gamma"}, "frozenset": frozenset({3, 1, 2}),
        "OrderedDict": collections.OrderedDict([("b", 1), ("a", 2)]),
        "defaultdict": collections.defaultdict(list, {"k": [1]}),
        "Counter": collections.Counter("abracadabra"),
        "deque": collections.deque([1, 2, 3], maxlen=5),
        "PurePosixPath": pathlib.PurePosixPath("/data/in.csv"),
        "PureWindowsPath": pathlib.PureWindowsPath("C:\\data\\in.csv"),
        "datetime": datetime.datetime(2024, 2, 29, 13, 14, 15, 161718),
        "datetime utc": datetime.datetime(2024, 2, 29, 13, 14, tzinfo=utc),
        "datetime +05:30 fold": datetime.datetime(2024, 1, 1, tzinfo=india, fold=1),
        "date": datetime.date(1999, 12, 31), "time": datetime.time(23, 59, 1, tzinfo=utc),
        "timedelta": datetime.timedelta(days=-1, seconds=5, microseconds=7),
        "Decimal 1.0": decimal.Decimal("1.0"), "Decimal 1.00": decimal.Decimal("1.00"),
        "Decimal -NaN": decimal.Decimal("-NaN"), "Decimal -Infinity": decimal.Decimal("-Infinity"),
        "Fraction": fractions.Fraction(-22, 7),
        "UUID": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "Enum": Colour.GREEN, "Flag combination": Perm.R | Perm.W,
        "namedtuple": Point(1, 2.5), "dataclass": Config("c", {"b": 1, "a": {2, 3}}),
        "object holding a set": KeyWithSet(["x", "y", "z"]), "object with slots": Slotted(1, [2]),
        "function": os.path.join, "builtin": len, "class": pathlib.PurePosixPath,
        "partial": functools.partial(int, base=2), "range": range(1, 10, 3),
        "slice": slice(1, None, 2), "Ellipsis": Ellipsis,
        # keyed by the wrapper's type name, which issue 21 renamed (_Memoized to _Wrapper)
        "bound memoized method": Model(3).predict, "memoized classmethod": Model.create,
        # long enough to be keyed a run of items at a time (issue 24), pinned by item-by-item
        "list long ints": [(-7) ** (n % 40) + n for n in range(20000)],
        "tuple long floats": tuple([n / 7 for n in range(-10000, 10000)] +
                                   [float("nan"), -0.0, float("inf"), 5e-324] * 100),
        "list long strs": ["w%d\u00e9" % n for n in range(20000)] + ["\U0001F600" * 300],
        "list long bools and Nones": [True, False, None] * 7000,
        "list long mixed": [n if n % 3 else str(n) for n in range(20000)],
    }
    if os.name == "posix":
        corpus["PosixPath"] = pathlib.PosixPath("data/in.csv")
    try:
        import numpy
    except ImportError:
        return corpus
    matrix = numpy.arange(12, dtype=numpy.int64).reshape(3, 4)
    corpus.update({
        "numpy int64 matrix": matrix,
        "numpy float64": numpy.linspace(0, 1, 5),
        "numpy float32 big-endian": numpy.array([1.5, -0.0], dtype=">f4"),
        "numpy bool": numpy.array([True, False]),
        "numpy str": numpy.array(["ab", "c\u00e9"]),
        "numpy datetime64": numpy.array(["2024-02-29T01:02"], dtype="datetime64[ns]"),
        "numpy structured": numpy.array([(1, 2.5)], dtype=[("a", "<i2"), ("b", "<f8")]),
        "numpy object": numpy.array([{"k": 1}, None], dtype=object),
        "numpy 0-d": numpy.array(3.5),
        "numpy float64 scalar": numpy.float64(2.5), "numpy int32 scalar": numpy.int32(7),
        "numpy bool scalar": numpy.bool_(True), "numpy dtype": numpy.dtype("<u2"),
        "numpy ufunc": numpy.add,
    })
    return corpus


def corpus_digests():
    """label -> hex key of a call f(value), as memoize with version=None makes it."""
    key = persist._keyer(repr(None))
    return {label: key((value,)).hex() for label, value in key_corpus().items()}


# The keys of key_corpus(): a change here is a change of key format (see _KEY_FORMAT).
PINNED_KEYS = {
    "None":
        "8555aced751619ebea01c6461132afb931a1db865b892f86e331078c1de94de1",
    "True":
        "868e1dd43e813cd4adddadcc1cc16801a67f3a3ade45f1686a5057d147612390",
    "False":
        "9844141045331f4bdb4881a87161ce8c92976da2378b1e1502a34406049fa963",
    "int 0":
        "dea391ce294692aec7aa9efc1c024c6ab446587411bc2a75821d318987c20ed0",
    "int -1":
        "8cdbf2d8bf3d1fcbbfc873360390306d53817e1aa6e61d19f193e82a931ad67f",
    "int 2**64":
        "2fa723cacf7ed755759486ec48f021e1b1d441090fa0e08b305ea475fe909853",
    "int -10**5000":
        "3ec518cec42b2b34530841b780f19c1a6d76727d22b7e2d0568cd7009aff6e6c",
    "float 1.5":
        "319eb64e54d0291ec30745f6eda24cb652e3920c704b6ed25c96736e6c9183a6",
    "float 0.0":
        "ba41cc12fb372e0edd5197ed88eb5953f6acc3430264a0561aed0e55112e9b72",
    "float -0.0":
        "ccf233cacac6704d5a9533c1455ecd671eaa72f2b662d5e91e7d6c4b416bef30",
    "float nan":
        "73eb9798870c20308214b89cf76c14e5b18965b69cb4695ecddf4c2c19c8f779",
    "float -inf":
        "a23783db80f4c2a0cf8df1abccdc46b1cc4a3c0680ae7b57f2eb737af75a7ca0",
    "float 1e-310":
        "ec0e7c089790e21d9e3c8a30943c7eb17a0f7fac2176c14e0fc5fa14153d6e96",
    "complex":
        "5adc3040529df8adaec3d91068644c634a1b8496f0080c4d0faf2c3370d7e367",
    "str empty":
        "441ca2ae9c1e5ea29afef1e5914828dc3ce68ebd16c32d2af9de36cec06b2275",
    "str":
        "01aea5d5a9047e2c2708b7defa2b497e9a296a5d7d194a889f9a97148e5f40ee",
    "str astral":
        "52d98d466387af05dc6c3247d5cd99901e7b9f3b8a015e8f1687b82f0d4797a3",
    "str Unicode 15":
        "1ca0ad2add40a16e756e019a31c291de06d5575a5b1f7f5af12309033c239fba",
    "str surrogate":
        "a23d6709d2085e17e6ca635df5ef6da6a4246236ce6f2d640120ffce395ee3c1",
    "str long":
        "1bc7824aef300e0a572dfee720627f6470dcc11f1246bb77cede58e5227a70bb",
    "bytes":
        "e45a353dffbc48d06393b8bf371af3969c56bef74aa5ba07df492854bf509d4c",
    "bytes empty":
        "74ff08b9351faa4a10ee1edc37d2df68a4c62253019ee11ae426e5d3c324857a",
    "bytearray":
        "5cdc75622a0851057da527448d5d4439a33e3b0ba31a4e8576662339f9371db6",
    "memoryview 2-d":
        "c026298d65af910d1a3e8aa9b567a8a8a68adbbf35715b097969c0933dd0949e",
    "tuple":
        "9b8c61c81669ac63a6b89ec30625e3ee767921cfcb72264f50475e3b48fe32e0",
    "tuple empty":
        "306294b3268f89adb0da3205782315d09e71101101ac276a0fca8733b7ed1d72",
    "list":
        "cc60d41c2753f036f5b6ce0d61b4ab69819f35ee44fc9aa7c19166e948ae31e5",
    "list empty":
        "b89b775bef19120f25fc5ed9dc64f9b3c7a10203503a06fe42790cdccdecca56",
    "dict":
        "597c1516b5618a9dd89be4df631feb9a0dbb4ef39033e1c3402a3ea72e34b5f5",
    "dict empty":
        "85acffda58a4f06c81c0cdeb1d174a91dac27b70631185c87f6d4a3125aefd4d",
    "set":
        "937be8be868e7debd829243215f597be870236f7ce10015f4c7cd3593944a3e1",
    "frozenset":
        "4e43e2d2438e8cf9451cfda8b5bab0b78331e472de3525be2e5c09f8e3e1401d",
    "OrderedDict":
        "6e2bb4071ce380194aa1c13efa99a8dc4ffd3ad20320df1a0cca192248a63c89",
    "defaultdict":
        "805d990116c7bff498cd794e15931f7fc737c39c7598e4474906e180a9f42159",
    "Counter":
        "029c876f001e23ee4da12ce14a254bb3005d9993d954d22c7e31600ab85a5b13",
    "deque":
        "e5c20a864b24f0e739dc95f0feef70a2cfcb4a539e39e663598ec1b7c6a97cd2",
    "PurePosixPath":
        "22a06b0e0d71d79be8e504617e5505bfb754453a1aea4ca1f2618305cca0eb0e",
    "PureWindowsPath":
        "3a4326e96d08eacd3b8c1b9ce9e8d0d9a5a93d7d621460aad0b948ea1dde462e",
    "datetime":
        "f1ecaeb645381726aff4dde97458479713a50cff7bef8124a2b58103135ac47b",
    "datetime utc":
        "a5ce145f3dcc13397080a108967dc846798e83787589cbafd57c45f42755b6df",
    "datetime +05:30 fold":
        "111fa6a83ea515dd27c71dc2cc9b52136f6b5af88d12be9532df09e4f99bd92d",
    "date":
        "578d7d8f62e881b749ff42865d5dff3843212f4aaecf8173823ced51ddf28f1b",
    "time":
        "031a7a53463897731a1e9fca4d036abafdd7f0160052e54e27200dac051d2f0a",
    "timedelta":
        "fc7c10abe8c01dab46c2416ee2072b6b100847b5ea636cb9ad83f948c287072d",
    "Decimal 1.0":
        "71a1b22a8748288df68e5334965f8c77c46c25ca06a9101ecac897e7596665c4",
    "Decimal 1.00":
        "8f670310b202dd10d1129c639cbcdd254daf8f8cc838d74e1277711edc5ac21c",
    "Decimal -NaN":
        "d11414114d9d0ac622f0a025257957cdc0d0bf8922f9c19e2585c9757b2bab6e",
    "Decimal -Infinity":
        "5322fd20f15d560118541a62e9b3c686c1b15602688cb3144c4d7f9002647de0",
    "Fraction":
        "40173632d490d9505534f9a6abf9451c6617a3daa34a3c7478a6740249d0dbf3",
    "UUID":
        "628d0c76f1d0534dee0c61339c6ac3abfb0b2d9ad9b693e0a8fe3d1d93f3a2fb",
    "Enum":
        "fbe528283f3e16481738d6c4d088e80b47965a8390183017f13fd7fe9aaffa40",
    "Flag combination":
        "62e791cf2ee53a65070dd93fecc67631ab49e7070f42fe35bdbbd31b376e6fdd",
    "namedtuple":
        "2b959418a78fdcedf3da0f6f3a4f1793ea977f6c56ec011c8328567f29dc4984",
    "dataclass":
        "b74937587e73706d4a4365ad13c3d2c4ce94a1eb3007e8c2cffc216fdb60515c",
    "object holding a set":
        "77411b357579d3ef4a3a1fdb3b87febd9a380e2ff5b978020a3e1150cb7169a4",
    "object with slots":
        "bfb1d565fc67c6844e9705ff54c207231bb7fae4ade97946248da919207c4811",
    "function":
        "c39789479e452cf2b2252a952f2a4f1faf1191303e2b6b274e65f012d082477b",
    "builtin":
        "923fa7a5023bc814efe441b0ea93bf56d284723118b8ad2187b136cef890d1a3",
    "class":
        "0a45f23d5e45b114d830822de8b3c2898e294963584677a3b511a0fd879619a7",
    "partial":
        "c92902cbcdbb48f8cb56b4b455e4bd2cb2a0d20a891a7cc59699144e827d984b",
    "range":
        "60acc28df6c4418df34d069dc7589a0a52c8bd1c22bbe24036073a9038946f12",
    "slice":
        "2912220da76c8ceae32db6f75da1791184c4c22138d532b12b9e49919e08926e",
    "Ellipsis":
        "489be14e297c7d5b879e68836884a4a966d12040d41c0ba7b25a6ca6100865cd",
    "bound memoized method":
        "68d849f7d0f18e7f18bd33a3ba84aa1adc7b345d497c5c46a44670d7555d517a",
    "memoized classmethod":
        "f175691753699540da9cf43db89218182448007b536831fb43b2fecaeefa023c",
    "PosixPath":
        "7589578baceb10399227f6d85a1fe2d82eb1abbd74d7ec39e28ae874c6d50009",
    "list long ints":
        "9efce749e12c1ca4a4277f64fca77373330afe5d65581b18e95a044cb8ed9f55",
    "tuple long floats":
        "49408cc51b5ea7ce7e3835099718817493b2e749b489a8b53c0a2b3a0ffc75ef",
    "list long strs":
        "f6d3fb72341ba0eac02d63a49523339c7529842db119ccb3868ff935c4377fc8",
    "list long bools and Nones":
        "803b0f71d9cc32a809faaaec38acfda162471bc185fd9694f8d5578575dd0944",
    "list long mixed":
        "d949853f0a37d7f80a7533331d339fdacae502bea7dba3806b384607089c00b6",
    "numpy int64 matrix":
        "c57fd17b9f1ffedec5e9ef1eabad1a926b631a595be27e84181706f07bb516dd",
    "numpy float64":
        "afa5e6da37eebae430c0f27bae8659b062484bfa31b22d99e4b97b968593f7bb",
    "numpy float32 big-endian":
        "8403e1083e89afc14bf151fbeb82145461ca859cdcfc2b6fb41af112e2d005b6",
    "numpy bool":
        "1ba54b64d9170b085f1d664cd1f6a044fba48849cabe674d0eb10b51f9ea9013",
    "numpy str":
        "2381c94229e7f263ad32afb0d692904e87ec730b1419c1b6a5056de5cb757b9a",
    "numpy datetime64":
        "5a89b0a3307ca4d9cf86eb01f6cd659adb447a4b3dfd545eefda1358e287b244",
    "numpy structured":
        "ecdd87fd04d57cef2d1376d8e306516d5f53efa08e2c33ac2c410d59eaf881ad",
    "numpy object":
        "d18173cc5a9667a93d55b07728d48e285d461dcd16e894f14a4feadbecbfd992",
    "numpy 0-d":
        "68ae7354ad6f708a48b681cea9ea8af54983f5b307e2ba8fef48bef6ce7982a5",
    "numpy float64 scalar":
        "d9daf621ea3b742335c6d697b47370036c67b94fef1a5e4e642a38f9ca52df17",
    "numpy int32 scalar":
        "6fb2af3ad738d38bd63109f115fc33fd6e57d78199a1b8ea09cd2fbc97685147",
    "numpy bool scalar":
        "71176021a544f4c03eebe4f74a013e3918fd933391f948989db019a044791d4a",
    "numpy dtype":
        "c232bc7e94e40ae83789695cd5c22680452825ec45cfe9af07c8267194c73ea2",
    "numpy ufunc":
        "76a90b8e23a5c4b78ccd0b72337e064b307a1cf307adb2b0d607615b9d118bc4",
}


class TestKeyFormat(MemoTest):
    def test_corpus_keys_are_the_pinned_ones(self):
        digests = corpus_digests()
        for label, digest in digests.items():
            self.assertEqual(digest, PINNED_KEYS.get(label), label)
        missing = set(PINNED_KEYS) - set(digests)
        self.assertTrue(all(label.startswith("numpy") or label == "PosixPath"
                            for label in missing), missing)

    def test_memoize_stores_the_pinned_keys(self):
        f = self.memo(lambda x: 1, name="pinned")
        labels = ["int 0", "str Unicode 15", "dict", "datetime utc", "class"]
        corpus = key_corpus()
        for label in labels:
            f(corpus[label])
        conn = sqlite3.connect(f.cache_info().path)
        keys = {key for key, in conn.execute("SELECT key FROM Dict")}
        conn.close()
        self.assertEqual(keys, {bytes.fromhex(PINNED_KEYS[label]) for label in labels})


def other_pythons():
    """Up to two other interpreters here (the oldest and newest pyenv CPython), and PyPy."""
    import glob
    found = {}
    for python in glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python")):
        version = os.path.basename(os.path.dirname(os.path.dirname(python)))
        parts = version.split(".")
        if all(part.isdigit() for part in parts) and tuple(map(int, parts)) >= (3, 8):
            found[tuple(map(int, parts))] = python
    mine = os.path.realpath(sys.executable)
    others = [python for _, python in sorted(found.items())
              if os.path.realpath(python) != mine]
    chosen = others[:1] + others[-1:] if len(others) > 1 else others
    pypy = __import__("shutil").which("pypy3")
    if pypy and os.path.realpath(pypy) != mine:
        chosen.append(pypy)
    return chosen


@slow
@unittest.skipUnless(other_pythons(), "no other interpreter here")
class TestKeysAcrossInterpreters(TempDirTest):
    """The same keys in every Python version (and numpy version), in a real other process."""

    def run_in(self, python, code, *args):
        done = subprocess.run([python, "-c", textwrap.dedent(code)] + list(args),
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_other_interpreters_make_the_pinned_keys(self):
        for python in other_pythons():
            out = self.run_in(python, """
                import json, test_persist
                print(json.dumps(test_persist.corpus_digests()))
            """)
            for label, digest in json.loads(out).items():
                self.assertEqual(digest, PINNED_KEYS.get(label), (python, label))

    def test_cache_written_by_another_interpreter_is_all_hits_here(self):
        corpus = key_corpus()
        for number, python in enumerate(other_pythons()):
            directory = os.path.join(self.dir, str(number))
            written = json.loads(self.run_in(python, """
                import json, sys, persist, test_persist
                f = persist.memoize(cache_dir=sys.argv[1], name="corpus")(lambda x: 1)
                corpus = test_persist.key_corpus()
                for value in corpus.values():
                    f(value)
                print(json.dumps(sorted(corpus)))
            """, directory))
            runs = []
            f = persist.memoize(cache_dir=directory, name="corpus")(runs.append)
            shared = [label for label in written if label in corpus]
            self.assertGreater(len(shared), 60)
            for label in shared:
                self.assertEqual(f(corpus[label]), 1, (python, label))
            self.assertEqual(runs, [])
            self.assertEqual(f.cache_info().hits, len(shared))


# -- memoize: binding


class TestMemoizeBinding(MemoTest):
    """How a call binds to the function's parameters: a parameter added later, a partial of a
    memoized function, memoize above or below classmethod."""

    def test_a_new_parameter_with_a_default_keeps_old_results(self):
        old = self.memo(lambda x: x * 2, name="job")
        self.assertEqual((old(5), old(6)), (10, 12))

        def new(x, strict=False, *, scale=1):
            return x * 2 * scale

        f = self.memo(new, name="job")
        self.assertEqual([f(5), f(x=5), f(5, False), f(5, strict=False), f(6, scale=1)],
                         [10, 10, 10, 10, 12])
        self.assertEqual(f.calls, [])
        self.assertEqual(f(5, scale=3), 30)
        self.assertEqual(f(5, True), 10)
        self.assertEqual(len(f.calls), 2)

    def test_default_call_and_passed_default_are_one_entry(self):
        f = self.memo(lambda x=5, y=0.0: x + y)
        self.assertEqual([f(5), f(x=5), f(), f(5, 0.0), f(y=0.0)], [5.0] * 5)
        self.assertEqual(len(f.calls), 1)
        f(5, -0.0)          # -0.0 is not the default 0.0
        f(5, 0)             # nor is 0: types matter
        f(5.0)
        self.assertEqual(len(f.calls), 4)

    def test_each_partial_keys_its_own_arguments(self):
        inner = self.memo(lambda a, b: a - b)
        first = persist.memoize(functools.partial(inner, 10), cache_dir=self.dir)
        second = persist.memoize(functools.partial(inner, 20), cache_dir=self.dir)
        self.assertEqual((first(1), second(1)), (9, 19))

    def test_the_class_is_passed_to_calls_and_to_cache_delete(self):
        out = run_python("""
            import inspect, persist
            calls = []

            class Shape:
                @persist.memoize(cache_dir=".")
                @classmethod
                def area(cls, side):
                    calls.append((cls.__name__, side))
                    return cls.__name__, side * side

            class Square(Shape):
                pass

            print([Shape.area(2), Shape().area(2), Square.area(2), Square().area(2)])
            print(calls)
            print(list(inspect.signature(Shape.area).parameters), Shape.area.__name__,
                  Shape.area.explain(2).reason)
            print(Square.area.cache_delete(2), Square().area.cache_delete(2))  # Square's
            print(Shape.area.cache_info().entries, Shape().area.cache_delete(2),
                  Shape.area.cache_info().entries)
        """, cwd=self.dir)
        self.assertEqual(out.splitlines(), [
            "[('Shape', 4), ('Shape', 4), ('Square', 4), ('Square', 4)]",
            "[('Shape', 2), ('Square', 2)]",
            "['side'] area hit",
            "True False",
            "1 True 0"])

    def test_cache_delete_passes_the_class_or_says_how(self):
        # Python 3.9 to 3.12 (and PyPy) pass the class through memoize's binding; 3.8 and
        # 3.13 call memoize's function with it, which cache_delete() then never sees
        out = run_python("""
            import persist

            class Shape:
                @classmethod
                @persist.memoize(cache_dir=".")
                def area(cls, side):
                    return side * side

            Shape.area(2)
            try:
                print(Shape.area.cache_delete(2))
            except TypeError as exc:
                print(exc)
                print(Shape.area.cache_delete(Shape, 2))
            print(Shape.area.cache_info().entries)
        """, cwd=self.dir)
        lines = out.splitlines()
        if len(lines) == 3:
            self.assertRegex(lines[0], r"Shape.area is a classmethod.*Shape.area.cache_delete"
                                       r"\(Shape, \.\.\.\).*@memoize above @classmethod")
        self.assertEqual(lines[-2:], ["True", "0"])


class HookedSettings:
    """Settings that hold a function made at run time: they cannot be keyed."""

    def __init__(self):
        self.k, self.hook = 1, lambda v: v


HOOKED = HookedSettings()


def scale_hooked(x, cfg=HOOKED):
    return cfg.hook(x * cfg.k)


class TestDefaultChangedInPlace(MemoTest):
    def test_a_mutable_default_is_keyed_by_what_it_holds_at_the_call(self):
        def count_and_append(seen=[]):
            count = len(seen)
            seen.append(None)
            return count

        f = self.memo(count_and_append)
        self.assertEqual([f(), f(), f()], [0, 1, 2])      # as without memoize
        self.assertEqual(len(f.calls), 3)
        self.assertEqual(f([None]), 1)                    # the key of f() when it held one
        self.assertEqual(len(f.calls), 3)

    def test_unchanged_it_is_left_out_as_every_default_but_passed_it_is_keyed(self):
        # passed, it is keyed even when it holds what the default held at decoration: that
        # may differ from run to run (a default loaded at import)
        def total(xs, weights={}):
            return sum(weights.get(x, 1) for x in xs)

        f = self.memo(total)
        self.assertEqual([f([1, 2]), f([1, 2]), f([1, 2], {}), f([1, 2], weights={})],
                         [2, 2, 2, 2])
        self.assertEqual(len(f.calls), 2)
        self.assertEqual(f([1, 2], {1: 5}), 6)
        self.assertEqual(len(f.calls), 3)

    def test_one_that_cannot_be_keyed_passed_is_refused_not_left_out(self):
        # settings holding a lambda: its k cannot be keyed, so passing it must not be served
        # the result of other settings
        self.addCleanup(setattr, HOOKED, "k", 1)
        f = self.memo(scale_hooked)
        self.assertEqual(f(2), 2)                 # left at its default: left out, as itself
        HOOKED.k = 5
        for call in (lambda: f(2, HOOKED), lambda: f(2, cfg=HOOKED)):
            with self.assertRaisesRegex(TypeError, "argument 'cfg' cannot be part of a "
                                                   "cache key.*ignore="):
                call()
        self.assertEqual(len(f.calls), 1)


# -- memoize: naming and salt (where a cache lives, what else its keys hold)


class TestMemoizeLocation(TempDirTest):
    SCRIPT = """
        import persist, sys
        calls = 0
        @persist.memoize
        def work(x):
            global calls
            calls += 1
            return x + 1
        if __name__ == "__main__":
            print(sum(work(i) for i in range(20)), calls)
    """

    def write_script(self, name="job.py"):
        project = self.path / "project"
        project.mkdir(exist_ok=True)
        (project / name).write_text(textwrap.dedent(self.SCRIPT))
        return project / name

    def test_beside_the_source_file_from_any_directory(self):
        script = self.write_script()
        elsewhere = self.path / "elsewhere"
        elsewhere.mkdir()
        first = subprocess.run([sys.executable, str(script)], cwd=str(elsewhere),
                               env=child_env(PYTHONHASHSEED=1), stdout=subprocess.PIPE,
                               universal_newlines=True, check=True, timeout=CHILD_TIMEOUT).stdout
        self.assertEqual(first, "210 20\n")
        self.assertEqual(os.listdir(elsewhere), [])
        cache = script.parent / ".persist"
        self.assertEqual((cache / ".gitignore").read_text(), "*\n")
        self.assertTrue((cache / "job.work.db").exists())
        second = subprocess.run([sys.executable, "job.py"], cwd=str(script.parent),
                                env=child_env(PYTHONHASHSEED=2), stdout=subprocess.PIPE,
                                universal_newlines=True, check=True, timeout=CHILD_TIMEOUT).stdout
        self.assertEqual(second, "210 0\n")

    def test_script_run_or_imported_shares_its_cache(self):
        script = self.write_script()
        subprocess.run([sys.executable, str(script)], env=child_env(), check=True,
                       stdout=subprocess.PIPE, timeout=CHILD_TIMEOUT)
        out = run_python("import job; print(sum(job.work(i) for i in range(20)), job.calls)",
                         cwd=str(script.parent))
        self.assertEqual(out, "210 0\n")

    def test_persist_dir_and_cache_dir(self):
        script = self.write_script()
        chosen = self.path / "chosen"
        subprocess.run([sys.executable, str(script)], env=child_env(PERSIST_DIR=chosen),
                       check=True, stdout=subprocess.PIPE, timeout=CHILD_TIMEOUT)
        self.assertTrue((chosen / "job.work.db").exists())
        self.assertFalse((script.parent / ".persist").exists())

        @persist.memoize(cache_dir=self.path / "explicit", name="my-cache")
        def f(x):
            return x

        with mock.patch.dict(os.environ, {"PERSIST_DIR": str(chosen)}):
            f(1)
            self.assertEqual(f.cache_info().path, str(self.path / "explicit" / "my-cache.db"))

    @slow
    def test_persist_dir_set_where_no_shell_expands_it(self):
        """PERSIST_DIR=~/cache from a Dockerfile's ENV or a systemd unit made a directory
        named ~ wherever the script ran."""
        script = self.write_script()
        home = self.path / "home"
        home.mkdir()
        for value in ("~/cache", "~"):
            out = subprocess.run([sys.executable, str(script)], cwd=str(self.path), check=True,
                                 env=child_env(PERSIST_DIR=value, HOME=home),
                                 stdout=subprocess.PIPE, universal_newlines=True,
                                 timeout=CHILD_TIMEOUT).stdout
            self.assertEqual(out, "210 20\n")
        self.assertTrue((home / "cache" / "job.work.db").exists())
        self.assertTrue((home / "job.work.db").exists())
        out = subprocess.run([sys.executable, "-m", "persist", "ls"], cwd=str(self.path),
                             env=child_env(PERSIST_DIR="~/cache", HOME=home),
                             stdout=subprocess.PIPE, universal_newlines=True, check=True,
                             timeout=CHILD_TIMEOUT).stdout
        self.assertIn("job.work", out)
        nobody = "~no-such-user-%s/cache" % os.urandom(4).hex()
        done = subprocess.run([sys.executable, str(script)], cwd=str(self.path),
                              env=child_env(PERSIST_DIR=nobody), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("PersistError: %s: $PERSIST_DIR starts with ~" % nobody, done.stderr)
        self.assertEqual(done.stdout, "")                   # refused before the first call ran
        out = run_python("""
            import persist
            @persist.memoize
            def g(x):
                print("ran")
            try:
                persist.map(g, [1, 2])
            except persist.PersistError as exc:
                print("refused", exc.filename, exc.reason)
        """, cwd=str(self.path), PERSIST_DIR=nobody)
        self.assertEqual(out, "refused %s no-home\n" % nobody)
        # HOME set but empty (some containers, su without -l): not at the top, /NAME
        top = "persist-test-%s" % os.urandom(4).hex()
        import shutil
        self.addCleanup(shutil.rmtree, "/" + top, True)      # where a broken build puts it
        done = subprocess.run([sys.executable, str(script)], cwd=str(self.path),
                              env=child_env(PERSIST_DIR="~/" + top, HOME=""),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("PersistError: ~/%s: $PERSIST_DIR starts with ~, and there is no such "
                      "home directory (HOME unset or empty" % top, done.stderr)
        self.assertEqual(done.stdout, "")
        self.assertFalse(os.path.exists("/" + top))
        self.assertEqual(sorted(os.listdir(self.path)), ["home", "project"])

    def test_no_source_file_uses_current_directory(self):
        out = run_python("""
            import persist
            ns = {}
            exec(compile("def f(x):\\n    return x * 2\\n", "<cell 1>", "exec"), ns)
            f = persist.memoize(ns["f"])
            print(f(2), f.cache_info().path)
        """, cwd=self.dir)
        self.assertEqual(out.split()[0], "4")
        self.assertEqual(os.path.dirname(out.split()[1]), os.path.join(self.dir, ".persist"))

    def test_nothing_written_before_first_call(self):
        @persist.memoize(cache_dir=self.path / "c")
        def f(x):
            return x

        self.assertEqual(f.cache_info().entries, 0)
        self.assertFalse((self.path / "c").exists())

    JOB = "import persist\n@persist.memoize\ndef load():\n    return %r\nprint(load())\n"

    def project(self, name, value):
        folder = self.path / name
        folder.mkdir()
        (folder / "job.py").write_text(self.JOB % value)
        return folder / "job.py"

    def run_job(self, script):
        return subprocess.run([sys.executable, str(script)], env=child_env(
            PERSIST_DIR=self.path / "shared"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=CHILD_TIMEOUT)

    def test_second_project_is_refused_and_a_moved_one_adopted(self):
        first = self.project("one", "first")
        second = self.project("two", "second")
        self.assertEqual(self.run_job(first).stdout, "first\n")
        refused = self.run_job(second)
        self.assertNotEqual(refused.returncode, 0)
        self.assertEqual(run_python("""
            import persist, runpy
            try:
                runpy.run_path(%r, run_name="__main__")
            except persist.PersistError as exc:
                print(exc.reason)
        """ % str(second), PERSIST_DIR=self.path / "shared"), "name-clash\n")
        self.assertIn("PersistError", refused.stderr)
        self.assertIn(str(first), refused.stderr)
        self.assertIn("name=", refused.stderr)
        self.assertNotIn("first", refused.stdout)
        os.rename(first.parent, self.path / "moved")
        moved = self.run_job(self.path / "moved" / "job.py")
        self.assertEqual(moved.stdout, "first\n")


class TestCacheFileNames(TempDirTest):
    def test_names_differing_only_in_case_get_two_files(self):
        names = []
        for name in ("job.Process", "job.process", "JOB.PROCESS"):
            f = persist.memoize(cache_dir=self.dir, name=name)(lambda x: x)
            f(1)
            names.append(os.path.basename(f.cache_info().path).lower())
        self.assertEqual(len(set(names)), 3)
        self.assertEqual(len([n for n in os.listdir(self.dir) if n.endswith(".db")]), 3)

    def test_very_long_name_is_shortened_and_cached(self):
        for length in (248, 300, 2000):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                f = persist.memoize(cache_dir=self.dir, name="n" * length)(lambda x: [x])
                self.assertEqual(f(1), [1])
                self.assertEqual(f(1), [1])
            info = f.cache_info()
            self.assertEqual((info.hits, info.entries), (1, 1))
            self.assertLess(len(os.path.basename(info.path)), 200)
        self.assertEqual(len([n for n in os.listdir(self.dir) if n.endswith(".db")]), 3)


class TestOneNameManyDefinitions(TempDirTest):
    """Functions that one name stands for several times over must not share results."""

    def test_loop_with_defaults_at_module_level_is_refused(self):
        (self.path / "job.py").write_text(textwrap.dedent("""
            import persist
            for k in (2, 3):
                @persist.memoize
                def scale(x, k=k):
                    return x * k
        """))
        done = run_command(["job.py"], cwd=self.dir)
        self.assertNotEqual(done.returncode, 0)
        self.assertRegex(done.stderr, "TypeError: .*scale.*other defaults.*name=")

    def test_inside_a_function_the_defaults_are_keyed(self):
        scales = []
        for k in (2, 3):
            @persist.memoize(cache_dir=self.dir)
            def scale(x, k=k):
                return x * k
            scales.append(scale)
        self.assertEqual([f(10) for f in scales], [20, 30])

    def test_helpers_of_one_name_chosen_inside_a_factory_keep_apart(self):
        def make_op(kind):
            if kind == "add":
                def helper(x):
                    return x + 1
            else:
                def helper(x):
                    return x - 1

            @persist.memoize(cache_dir=self.dir)
            def op(x):
                return helper(x) * 10
            return op

        self.assertEqual((make_op("add")(10), make_op("sub")(10)), (110, 90))

    def test_class_made_inside_a_factory_is_refused(self):
        def make(k):
            class Scaler:
                factor = k

            @persist.memoize(cache_dir=self.dir)
            def f(x):
                return x * Scaler.factor
            return f

        with self.assertRaisesRegex(TypeError, "Scaler.*defined inside a function"):
            make(2)


class Scale:
    """A callable object whose state decides its results."""

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x * self.k

    def apply(self, x):
        return x * self.k


def make_scale(k):
    @persist.memoize
    def scale(x):
        return x * k
    return scale


@dataclasses.dataclass
class Centre:
    """A dataclass whose fit() sets state that is no field, as estimators do."""
    scale: int = 1

    def fit(self, data):
        self.mean_ = sum(data) / len(data)
        return self

    def __call__(self, x):
        return (x - self.mean_) * self.scale


def make_pipeline(scale):
    fast = persist.memoize(scale.apply)

    @persist.memoize
    def pipeline(x):
        return fast(x) + 1
    return pipeline


class FastModel:
    """Memoizes its own method in __init__: self then holds the memoized function."""

    def __init__(self, k):
        self.k = k
        self.fast = persist.memoize(self.predict)

    def predict(self, x):
        return x * self.k


@dataclasses.dataclass
class Node:
    name: str
    children: list = dataclasses.field(default_factory=list)


class TestWhatACallableCarries(TempDirTest):
    def setUp(self):
        super().setUp()
        patcher = mock.patch.dict(os.environ, {"PERSIST_DIR": self.dir})
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_closures_over_values_keep_apart(self):
        two, three = make_scale(2), make_scale(3)
        self.assertEqual((two(10), three(10)), (20, 30))
        self.assertEqual(make_scale(2)(10), 20)
        self.assertEqual(two.cache_info().hits, 0)
        self.assertEqual(two.cache_info().entries, 1)     # one cache, each its own entries

    def test_each_closure_counts_clears_and_prunes_its_own(self):
        # make(2) and make(3) share one file: each counts, clears and prunes what it stored
        two, three = make_scale(2), make_scale(3)
        self.assertEqual((two(10), two(11), three(10)), (20, 22, 30))
        with self.assertRaises(TypeError):
            three("x" * 0, None)                        # a wrong call: not a failure
        failing = make_scale(None)
        with self.assertRaises(TypeError):
            failing(1)
        self.assertEqual(len({f.cache_info().path for f in (two, three, failing)}), 1)
        self.assertEqual([f.cache_info().entries for f in (two, three, failing)], [2, 1, 0])
        self.assertEqual([f.cache_info().failures for f in (two, three, failing)], [0, 0, 1])
        self.assertEqual([len(f.failures()) for f in (two, three, failing)], [0, 0, 1])
        self.assertEqual(two.cache_prune(), 0)        # another closure value is not stale
        two.cache_clear()
        self.assertEqual([f.cache_info().entries for f in (two, three)], [0, 1])
        self.assertEqual(failing.cache_info().failures, 1)
        self.assertEqual(make_scale(3)(10), 30)
        self.assertEqual(make_scale(3).cache_info().hits, 0)
        again = make_scale(3)
        again(10)
        self.assertEqual(again.cache_info().hits, 1)
        failing.cache_clear()
        self.assertEqual((failing.cache_info().failures, three.cache_info().entries), (0, 1))

    def test_closure_over_a_helper_that_closes_over_a_value(self):
        def make(k):
            def helper(x):
                return x + k

            @persist.memoize
            def shifted(x):
                return helper(x) * 10
            return shifted

        self.assertEqual((make(1)(1), make(2)(1)), (20, 30))

    def test_closure_over_a_module_or_a_function_by_name(self):
        def make():
            @persist.memoize
            def joined(parts):
                return os.path.join(*parts) + textwrap.dedent(" x")
            return joined

        self.assertEqual(make()(("a", "b")), os.path.join("a", "b") + "x")
        self.assertEqual(make().cache_info().entries, 1)

    def test_default_evaluated_in_an_outer_function_keeps_apart(self):
        def make(k):
            @persist.memoize
            def scale(x, k=k):
                return x * k
            return scale

        self.assertEqual((make(2)(10), make(3)(10)), (20, 30))

    def test_unkeyable_closure_is_refused_with_advice(self):
        lock = threading.Lock()

        def locked(x):
            with lock:
                return x

        with self.assertRaisesRegex(TypeError, r"locked\(\).*'lock'.*name=.*key="):
            persist.memoize(locked)
        self.assertEqual(persist.memoize(name="locked")(locked)(1), 1)
        self.assertEqual(persist.memoize(key=lambda x: x)(locked)(2), 2)

    def test_partials_keep_apart(self):
        square = persist.memoize(functools.partial(pow, exp=2))
        cube_ = persist.memoize(functools.partial(pow, exp=3))
        self.assertEqual((square(5), cube_(5)), (25, 125))
        self.assertEqual(persist.memoize(functools.partial(pow, 2))(5), 32)
        self.assertEqual(persist.memoize(functools.partial(pow, 3))(5), 243)

    def test_callable_instances_and_bound_methods_keep_apart(self):
        self.assertEqual((persist.memoize(Scale(2))(10), persist.memoize(Scale(3))(10)),
                         (20, 30))
        self.assertEqual((persist.memoize(Scale(2).apply)(10),
                          persist.memoize(Scale(3).apply)(10)), (20, 30))

    @slow
    def test_state_of_a_bound_method_or_callable_is_keyed_at_each_call(self):
        # memoize(model.predict) before model.fit(): the fitted model's results, in this run
        # and the next, whatever the model held when memoize ran
        (self.path / "job.py").write_text(textwrap.dedent("""
            import functools, persist, sys

            class Model:
                def __init__(self):
                    self.weights = {"w": 0}

                def fit(self, w):
                    self.weights["w"] = w

                def predict(self, x):
                    print("computed", file=sys.stderr)
                    return x * self.weights["w"]

                __call__ = predict

            model = Model()
            predict = persist.memoize(model.predict)
            call = persist.memoize(model)
            shifted = persist.memoize(functools.partial(lambda m, x: m.predict(x) + 1, model))
            if sys.argv[1] == "late":
                model.fit(2)
            print(predict(10), call(10), shifted(10))
            model.fit(int(sys.argv[2]))
            print(predict(10), call(10), shifted(10))
        """))
        outs = []
        for when, weight in (("early", "2"), ("early", "3"), ("late", "3"), ("late", "2")):
            done = run_command(["job.py", when, weight], cwd=self.dir)
            self.assertEqual(done.returncode, 0, done.stderr)
            outs.append((done.stdout.split(), done.stderr.count("computed")))
        self.assertEqual(outs, [
            ("0 0 1 20 20 21".split(), 6), ("0 0 1 30 30 31".split(), 3),
            ("20 20 21 30 30 31".split(), 0), ("20 20 21 20 20 21".split(), 0)])

    def test_a_dataclass_is_keyed_by_what_it_holds_besides_its_fields(self):
        # self.mean_ set by fit() is no field: it decides the result all the same, passed
        # as an argument or memoized as the callable itself
        centre = Centre().fit([1, 2, 3])
        f = persist.memoize(centre)
        self.assertEqual(f(10), 8.0)
        centre.fit([100, 200, 300])
        self.assertEqual(f(10), -190.0)
        g = persist.memoize(name="apply")(lambda x, c: c(x))
        self.assertEqual((g(10, Centre().fit([1])), g(10, Centre().fit([5]))), (9.0, 5.0))
        self.assertEqual(g.cache_info().entries, 2)

    def test_a_dataclass_that_holds_itself_is_refused_as_a_list_is(self):
        root = Node("root")
        root.children.append(root)
        f = persist.memoize(name="count")(lambda node: len(node.children))
        with self.assertRaisesRegex(TypeError, "'node'.*Node that contains itself"):
            f(root)

    def test_a_bound_method_a_partial_passes_on_is_keyed_at_each_call(self):
        # partial(apply, scale.apply): scale is held by the method the partial holds
        import functools

        def apply(fn, x):
            return fn(x)

        scale = Scale(2)
        f = persist.memoize(functools.partial(apply, scale.apply))
        g = persist.memoize(functools.partial(apply, functools.partial(scale.apply)))
        self.assertEqual((f(10), g(10)), (20, 20))
        scale.k = 5
        self.assertEqual((f(10), g(10)), (50, 50))
        scale.k = 2
        self.assertEqual((f(10), g(10)), (20, 20))
        self.assertEqual((f.cache_info().hits, g.cache_info().hits), (1, 1))

    def test_a_memoized_method_in_a_closure_keys_its_instance_too(self):
        # fast = persist.memoize(scale.apply) keys scale at each call: a function that
        # closes over fast must too, or make_pipeline(Scale(5)) gets Scale(2)'s results
        scale = Scale(2)
        two, five = make_pipeline(scale), make_pipeline(Scale(5))
        self.assertEqual((two(10), five(10)), (21, 51))
        scale.k = 3
        self.assertEqual(two(10), 31)
        self.assertEqual(two.cache_info().hits, 0)

    def test_a_method_memoized_into_its_own_instance(self):
        # self.fast = persist.memoize(self.predict): keying self meets the memoized function,
        # which no name imports; it keys as its cache and what it holds, self as it is now
        two, five = FastModel(2), FastModel(5)
        self.assertEqual((two.fast(10), five.fast(10)), (20, 50))
        two.k = 7
        self.assertEqual(two.fast(10), 70)

        @persist.memoize
        def apply(fn, x):
            return fn(x) + 1

        self.assertEqual((apply(two.fast, 10), apply(five.fast, 10)), (71, 51))
        five.k = 1
        self.assertEqual(apply(five.fast, 10), 11)
        self.assertEqual(apply.cache_info().misses, 3)

    def test_state_that_can_no_longer_be_keyed_is_named(self):
        scale = Scale(2)
        f = persist.memoize(scale)
        self.assertEqual(f(5), 10)
        scale.k = threading.Lock()
        with self.assertRaisesRegex(TypeError, r"Scale\(\) now.*callable object.*key="):
            f(5)

    def test_lambdas_of_two_cells_or_evals_on_line_one_keep_apart(self):
        double = persist.memoize(eval("lambda x: x * 2"))
        triple = persist.memoize(eval("lambda x: x * 3"))
        self.assertEqual((double(5), triple(5)), (10, 15))
        for cell, source in (("<cell 1>", "f = lambda x: x * 2\n"),
                             ("<cell 2>", "f = lambda x: x * 3\n")):
            linecache.cache[cell] = (len(source), None, [source], cell)
            self.addCleanup(linecache.cache.pop, cell, None)
        ns1, ns2 = {}, {}
        exec(compile(linecache.cache["<cell 1>"][2][0], "<cell 1>", "exec"), ns1)
        exec(compile(linecache.cache["<cell 2>"][2][0], "<cell 2>", "exec"), ns2)
        self.assertEqual((persist.memoize(ns1["f"])(5), persist.memoize(ns2["f"])(5)), (10, 15))


class TestClosureCellAssignedAfterDecoration(TempDirTest):
    def test_refused_when_decorated(self):
        # helper's cell was skipped as empty: make(2) and make(3) shared one cache.
        def make(k):
            @persist.memoize(cache_dir=self.dir)
            def scale(x):
                return helper(x)

            def helper(x):
                return x * k
            return scale

        with self.assertRaisesRegex(TypeError, "'helper', not assigned yet"):
            make(2)

    def test_its_own_name_is_no_trouble(self):
        def make(k):
            @persist.memoize(cache_dir=self.dir)
            def count(n):
                return 0 if n == 0 else count(n - 1) + k
            return count

        self.assertEqual((make(2)(3), make(3)(3)), (6, 9))


@slow
class TestLambdasAndCodeWithoutSource(TempDirTest):
    """Lambdas and code without a source file (exec, python -c) keep one cache each, whatever
    came before them and under any hash seed."""

    def test_lines_added_above_keep_the_cache(self):
        module = self.path / "lambdas.py"
        code = "import persist\nscale = persist.memoize(lambda x: print('computed') or x * 2)\n"
        module.write_text(code)
        run = "import lambdas; print(lambdas.scale(4))"
        self.assertEqual(run_python(run, cwd=self.dir), "computed\n8\n")
        module.write_text("# a comment\n\n" + code)
        self.assertEqual(run_python(run, cwd=self.dir), "8\n")
        module.write_text(code.replace("x * 2", "x * 3"))
        self.assertEqual(run_python(run, cwd=self.dir), "computed\n12\n")

    def test_a_set_literal_in_exec_code_keeps_one_cache(self):
        # python -c, exec and the REPL tag a function by its compiled code, whose frozenset
        # constants list their items in hash order.
        code = """
            import sys, persist
            exec("def member(x):\\n    return x in {'alpha', 'beta', 'gamma', 'delta'}\\n")
            print(persist.memoize(member, cache_dir=sys.argv[1]).cache_info().path)
        """
        paths = {subprocess.run([sys.executable, "-c", textwrap.dedent(code), self.dir],
                                env=child_env(PYTHONHASHSEED=seed), stdout=subprocess.PIPE,
                                check=True, universal_newlines=True, timeout=CHILD_TIMEOUT).stdout
                 for seed in range(1, 5)}
        self.assertEqual(len(paths), 1, paths)


class TestLambdaTagWhateverCameBefore(TempDirTest):
    def test_a_lambdas_cache_does_not_depend_on_an_earlier_memoize(self):
        # The tag of a lambda is of its source line; it must not fall back to the compiled
        # code (another name) in a process where nothing had needed inspect yet.
        (self.path / "lambdas.py").write_text(
            "import functools, sys, persist\n"
            "if sys.argv[1:] == ['partial']:\n"
            "    persist.memoize(functools.partial(pow, 2), cache_dir=sys.argv[0] + '.d')\n"
            "scale = persist.memoize(lambda x: x * 2)\n"
            "print(scale.cache_info().path)\n")
        names = {subprocess.run([sys.executable, "lambdas.py"] + extra, cwd=self.dir,
                                env=child_env(), stdout=subprocess.PIPE, check=True,
                                universal_newlines=True, timeout=CHILD_TIMEOUT).stdout
                 for extra in ([], ["partial"])}
        self.assertEqual(len(names), 1, names)


class TestNotebookFunctions(TempDirTest):
    CELL = "import persist\n@persist.memoize\ndef f(x):\n    return x * %d\n"

    def run_cell(self, cell, factor):
        """Run a cell as IPython does: its source in linecache, no file on disk."""
        source = self.CELL % factor
        linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
        self.addCleanup(linecache.cache.pop, cell, None)
        namespace = {"__name__": "__main__"}
        exec(compile(source, cell, "exec"), namespace)
        return namespace["f"]

    def test_two_notebooks_in_one_directory_keep_apart(self):
        with mock.patch.dict(os.environ, {"PERSIST_DIR": self.dir}):
            first = self.run_cell("/tmp/ipykernel_1/11.py", 2)
            second = self.run_cell("/tmp/ipykernel_2/11.py", 3)
            self.assertEqual((first(5), second(5)), (10, 15))
            again = self.run_cell("/tmp/ipykernel_3/12.py", 2)    # the same code, rerun
            self.assertEqual(again(5), 10)
            self.assertEqual(again.cache_info().hits, 1)

    @slow
    def test_python_c_functions_of_one_name_keep_apart(self):
        code = "import persist\n@persist.memoize\ndef f(x):\n    return x * %d\nprint(f(5))"
        self.assertEqual(run_python(code % 2, cwd=self.dir), "10\n")
        self.assertEqual(run_python(code % 3, cwd=self.dir), "15\n")


class TestScripts(TempDirTest):
    """A script's functions keep their own cache however the script is named, run or decorated."""

    def test_two_such_scripts_in_one_directory_keep_apart(self):
        # 01-prepare.py and 02-train.py were both __main__.load: one cache, one's results.
        for name, word in (("01-prepare.py", "prepare"), ("02-train.py", "train")):
            (self.path / name).write_text("import persist\n@persist.memoize\ndef load(x):\n"
                                          "    return %r\nprint(load(1))\n" % word)
        outs = [subprocess.run([sys.executable, name], cwd=self.dir, env=child_env(),
                               stdout=subprocess.PIPE, check=True,
                               universal_newlines=True, timeout=CHILD_TIMEOUT).stdout
                for name in ("01-prepare.py", "02-train.py")]
        self.assertEqual(outs, ["prepare\n", "train\n"])

    def test_two_projects_using_one_decorator_library_keep_apart(self):
        # functools.wraps' wrapper has the decorator's file: both caches lived beside it.
        lib = self.path / "lib"
        lib.mkdir()
        (lib / "timing.py").write_text(
            "import functools\ndef timed(func):\n    @functools.wraps(func)\n"
            "    def wrapper(*args, **kwargs):\n        return func(*args, **kwargs)\n"
            "    return wrapper\n")
        outs = []
        for project in ("a", "b"):
            (self.path / project).mkdir()
            (self.path / project / "job.py").write_text(
                "import persist, timing\n@persist.memoize\n@timing.timed\ndef load(x):\n"
                "    return %r\nprint(load(1))\n" % project)
            outs.append(run_python("import job", cwd=str(self.path / project),
                                   PYTHONPATH=os.pathsep.join([HERE, str(lib)])))
        self.assertEqual(outs, ["a\n", "b\n"])
        self.assertFalse((lib / ".persist").exists())

    # README: results of a class defined in the script itself load only in the mode that
    # stored them; the fix it gives, a module for the class, loads in both.
    SCRIPT = """
        import persist, sys
        from features import Features
        runs = 0

        @persist.memoize
        def featurize(x):
            global runs
            runs += 1
            return Features(x)

        if __name__ == "__main__":
            print(isinstance(featurize(1), Features), runs)
    """

    def test_class_in_a_module_loads_run_or_imported(self):
        (self.path / "features.py").write_text(textwrap.dedent("""
            class Features:
                def __init__(self, x):
                    self.x = x
        """))
        (self.path / "job.py").write_text(textwrap.dedent(self.SCRIPT))
        run = subprocess.run([sys.executable, "job.py"], cwd=self.dir, env=child_env(),
                             stdout=subprocess.PIPE, universal_newlines=True, check=True,
                             timeout=CHILD_TIMEOUT)
        self.assertEqual(run.stdout, "True 1\n")
        out = run_python("import job, features; f = job.featurize(1); "
                         "print(isinstance(f, features.Features), f.x, job.runs)", cwd=self.dir)
        self.assertEqual(out, "True 1 0\n")
        run = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path('job.py', "
                              "run_name='__main__')"], cwd=self.dir, env=child_env(),
                             stdout=subprocess.PIPE, universal_newlines=True, check=True,
                             timeout=CHILD_TIMEOUT)
        self.assertEqual(run.stdout, "True 0\n")


@slow
class TestScriptsRunUnderAProfiler(TempDirTest):
    def test_python_m_cprofile_keeps_the_scripts_own_cache(self):
        # Under python -m cProfile, __main__'s spec is cProfile's: two scripts shared it.
        for word in ("prep", "train"):
            (self.path / (word + ".py")).write_text(
                "import persist\n@persist.memoize\ndef load(x):\n    return %r\n"
                "print(load(1), load.cache_info().path)\n" % word)
        outs = [subprocess.run([sys.executable] + tool + [word + ".py"], cwd=self.dir,
                               env=child_env(), stdout=subprocess.PIPE, check=True,
                               universal_newlines=True, timeout=CHILD_TIMEOUT).stdout.split()
                for tool in ([], ["-m", "cProfile", "-o", os.devnull])
                for word in ("prep", "train")]
        self.assertEqual([out[0] for out in outs], ["prep", "train"] * 2)
        self.assertEqual(outs[0][1], outs[2][1])      # profiled or not: one cache
        self.assertEqual(outs[1][1], outs[3][1])


class TestSpawnedWorkersShareTheScriptsCache(TempDirTest):
    SCRIPT = """
        import multiprocessing, os, sys
        import persist

        @persist.memoize
        def square(x):
            return x * x

        if __name__ == "__main__":
            if sys.argv[1] != "serial":
                with multiprocessing.get_context(sys.argv[1]).Pool(2) as pool:
                    assert pool.map(square, range(6)) == [x * x for x in range(6)]
            print([square(x) for x in range(6)] == [x * x for x in range(6)],
                  square.cache_info().hits, sorted(os.listdir(os.path.dirname(
                      square.cache_info().path))))
    """

    def check(self, method):
        if method not in multiprocessing.get_all_start_methods():
            self.skipTest("no %s start method here" % method)
        (self.path / "job.py").write_text(textwrap.dedent(self.SCRIPT))
        out = subprocess.run([sys.executable, "job.py", method], cwd=self.dir,
                             env=child_env(), stdout=subprocess.PIPE, check=True,
                             universal_newlines=True, timeout=CHILD_TIMEOUT).stdout
        self.assertEqual(out.split(" ", 2)[:2], ["True", "6"])     # the workers' results
        self.assertEqual([n for n in os.listdir(self.path / ".persist") if n.endswith(".db")],
                         ["job.square.db"])
        out = run_python("import job; print([job.square(x) for x in range(6)], "
                         "job.square.cache_info().hits)", cwd=self.dir)
        self.assertEqual(out, "[0, 1, 4, 9, 16, 25] 6\n")

    @slow
    def test_spawn(self):
        self.check("spawn")

    def test_forkserver(self):
        self.check("forkserver")


@slow
class TestScriptClassesAsArgumentsInSpawnedWorkers(TempDirTest):
    SCRIPT = """
        import dataclasses, enum, multiprocessing, sys
        import persist

        @dataclasses.dataclass(frozen=True)
        class Config:
            n: int

        class Mode(enum.Enum):
            FAST = 1

        @persist.memoize
        def work(config, mode, kind):
            return config.n

        def run(_):
            work(Config(1), Mode.FAST, Config)
            return work.cache_info().hits

        if __name__ == "__main__":
            if sys.argv[1] == "serial":
                print(run(0))
            else:
                with multiprocessing.get_context(sys.argv[1]).Pool(1) as pool:
                    print(pool.map(run, [0])[0])
    """

    def test_serial_spawned_and_imported_share_keys(self):
        if "spawn" not in multiprocessing.get_all_start_methods():
            self.skipTest("no spawn start method here")
        (self.path / "job.py").write_text(textwrap.dedent(self.SCRIPT))
        hits = [subprocess.run([sys.executable, "job.py", how], cwd=self.dir, env=child_env(),
                               stdout=subprocess.PIPE, check=True,
                               universal_newlines=True, timeout=CHILD_TIMEOUT).stdout
                for how in ("serial", "spawn")]
        hits.append(run_python("import job; print(job.run(0))", cwd=self.dir))
        self.assertEqual(hits, ["0\n", "1\n", "1\n"])


class TestVersionSwitch(MemoTest):
    """Opening a cache with another version= never deletes results: they are misses, reported
    as stale, and removed only on request."""

    def test_v1_v2_v1_reuses_v1(self):
        v1 = self.memo(lambda x: ("v1", x), name="job", version=1)
        for i in range(20):
            v1(i)
        v2 = self.memo(lambda x: ("v2", x), name="job", version=2)
        self.assertEqual(v2.cache_info().entries, 20)      # just looking deletes nothing
        self.assertEqual(v2(3), ("v2", 3))
        again = self.memo(lambda x: ("recomputed", x), name="job", version=1)
        self.assertEqual([again(i) for i in range(20)], [("v1", i) for i in range(20)])
        self.assertEqual(again.calls, [])

    def test_stale_results_are_listed_and_pruned_on_request(self):
        v1 = self.memo(lambda x: x, name="job", version=1)
        for i in range(30):
            v1(i)
        v2 = self.memo(lambda x: -x, name="job", version=2)
        v2(1)
        path = v2.cache_info().path
        done = run_command(CLI + ["ls", self.dir])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, r"job .* 30 stale \(")
        done = run_command(CLI + ["prune", path, "--stale"])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("removed 30 entries", done.stdout)
        self.assertEqual(v2.cache_info().entries, 1)
        self.assertEqual(v2(1), -1)
        self.assertEqual(len(v2.calls), 1)

    @slow
    def test_earlier_code_of_a_nested_helper_is_stale_other_closures_are_not(self):
        self.check_earlier_code_is_stale(cli=False)

    @slow
    def test_prune_stale_removes_earlier_code_of_a_nested_helper(self):
        self.check_earlier_code_is_stale(cli=True)

    def check_earlier_code_is_stale(self, cli):
        # editing a helper defined inside main() computes featurize's results again; the
        # entries of its earlier code are listed as stale and pruned on request, while those
        # of another value it closes over (k=3 beside k=2) are another function's, and stay
        job = self.path / "job.py"
        source = textwrap.dedent("""
            import persist, sys

            def main():
                k = int(sys.argv[1])

                def helper(x):
                    return x + 1

                @persist.memoize
                def featurize(x):
                    print("computed", file=sys.stderr)
                    return helper(x) * k

                print([featurize(x) for x in range(3)])
                if sys.argv[2:] == ["prune"]:
                    print(featurize.cache_prune())

            main()
        """)
        edited = source.replace("x + 1", "x + 100")

        def run(text, *args):
            job.write_text(text)
            done = run_command([str(job)] + list(args), cwd=self.dir)
            self.assertEqual(done.returncode, 0, done.stderr)
            return done.stdout.strip(), done.stderr.count("computed")

        self.assertEqual([run(source, "2"), run(source, "3"), run(edited, "2"),
                          run(edited, "3"), run(edited, "2")],
                         [("[2, 4, 6]", 3), ("[3, 6, 9]", 3), ("[200, 202, 204]", 3),
                          ("[300, 303, 306]", 3), ("[200, 202, 204]", 0)])
        cache = self.path / ".persist"
        done = run_command(CLI + ["ls", str(cache)])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, r"job\.main\.<locals>\.featurize +12 .* 6 stale \(.*\), "
                                      r"2 closures ")
        path = next(cache.glob("*.db"))
        done = run_command(CLI + ["prune", str(path), "--stale", "--dry-run"])
        self.assertIn("would remove 6 entries", done.stdout)
        if cli:
            done = run_command(CLI + ["prune", str(path), "--stale"])
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("removed 6 entries", done.stdout)
        else:
            self.assertEqual(run(edited, "3", "prune"), ("[300, 303, 306]\n6", 0))
        self.assertEqual([run(edited, "3"), run(edited, "2")],
                         [("[300, 303, 306]", 0), ("[200, 202, 204]", 0)])
        done = run_command(CLI + ["ls", str(cache)])
        self.assertRegex(done.stdout, r"featurize +6 .* 2 closures ")
        self.assertNotIn("stale", done.stdout)

    @slow
    def test_prune_stale_removes_failure_records_of_earlier_code(self):
        # The failure records of a nested helper's earlier code stayed after its entries
        # were pruned: 'persist failures' listed calls that no code could make again, 'ls'
        # counted them, and nothing but clear removed them. Other closures' (k=3) stay.
        job = self.path / "job.py"
        source = textwrap.dedent("""
            import persist, sys

            def main():
                k = int(sys.argv[1])

                def helper(x):
                    return x + 1

                @persist.memoize
                def featurize(x):
                    if x < 0:
                        raise ValueError(x)
                    return helper(x) * k

                for x in (1, -1):
                    try:
                        featurize(x)
                    except ValueError:
                        pass
                if sys.argv[2:] == ["prune"]:
                    print(featurize.cache_prune(), len(featurize.failures()))

            main()
        """)
        edited = source.replace("x + 1", "x + 100")
        for text, k in ((source, "2"), (source, "3"), (edited, "2"), (edited, "3")):
            job.write_text(text)
            done = run_command([str(job), k], cwd=self.dir)
            self.assertEqual(done.returncode, 0, done.stderr)
        path = str(next((self.path / ".persist").glob("*.db")))
        done = run_command(CLI + ["prune", path, "--stale", "--dry-run"])
        self.assertIn("would remove 2 entries (", done.stdout)
        self.assertIn(" and 2 failure records from ", done.stdout)
        done = run_command([str(job), "2", "prune"], cwd=self.dir)      # the API, then the CLI
        self.assertEqual(done.stdout, "2 1\n", done.stderr)
        done = run_command(CLI + ["failures", path])
        self.assertIn("featurize: 2 failed calls", done.stdout)
        with sqlite3.connect(path) as conn:
            self.assertEqual(conn.execute("SELECT count(*) FROM Dict").fetchone(), (2,))
        done = run_command(CLI + ["ls", str(self.path / ".persist")])
        self.assertNotIn("stale", done.stdout)
        self.assertRegex(done.stdout, r"featurize +2 +\S+ \S+ +2 ")

    def test_crafted_owners_and_code_record_are_listed_not_fatal(self):
        def make(k):
            @persist.memoize(cache_dir=self.dir)
            def scaled(x):
                return x * k
            return scaled

        two, three = make(2), make(3)
        two(1), three(1), three(2)
        path = two.cache_info().path
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE Dict SET owner = '' WHERE key = (SELECT min(key) FROM Dict)")
        conn.execute("REPLACE INTO Info (name, value) VALUES ('code', 'run \u00e9')")
        conn.close()
        done = run_command(CLI + ["ls", self.dir])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, r"scaled +3 ")
        done = run_command(CLI + ["prune", path, "--stale", "--dry-run"])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, "would remove ([023] entries|1 entry) ")

    def test_record_of_the_runs_code_that_cannot_be_written_costs_no_hit(self):
        # the code record is written by the first open of each run: a cache whose Info
        # cannot take it (a trigger refuses it here: any failed write) still serves its results
        (self.path / "job.py").write_text(textwrap.dedent("""
            import persist, sys

            def make(k):
                @persist.memoize(cache_dir=sys.argv[1])
                def scaled(x):
                    print("computed", file=sys.stderr)
                    return x * k
                return scaled

            print(make(2)(21))
        """))
        first = run_command(["job.py", self.dir], cwd=self.dir)
        self.assertEqual((first.stdout, first.stderr), ("42\n", "computed\n"))
        path, = self.path.glob("*.db")
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.execute("CREATE TRIGGER frozen BEFORE INSERT ON Info BEGIN "
                     "SELECT RAISE(ABORT, 'frozen'); END")
        conn.close()
        again = run_command(["job.py", self.dir], cwd=self.dir)
        self.assertEqual((again.returncode, again.stdout, again.stderr), (0, "42\n", ""))

    def test_each_closure_prunes_its_own_versions_and_expired_entries(self):
        def make(k):
            @persist.memoize(cache_dir=self.dir, version=k, expire=50 if k == 2 else 1000)
            def scaled(x):
                return x * k
            return scaled

        two, three = make(2), make(3)
        self.assertEqual((two(1), two(2), three(1)), (2, 4, 3))
        conn = sqlite3.connect(two.cache_info().path, isolation_level=None)
        conn.execute("UPDATE Dict SET stored = stored - 100")     # older than 50 s, not 1000
        conn.close()
        self.assertEqual((two.cache_prune(), three.cache_info().entries), (2, 1))
        self.assertEqual(three(1), 3)
        self.assertEqual(three.cache_info().hits, 1)

    def test_cache_prune_keeps_the_code_of_each_helper_this_run_uses(self):
        def make(step):
            def helper(x):
                return x + step

            def other_helper(x):
                return x - step

            chosen = helper if step > 0 else other_helper   # one name each: code differs

            @persist.memoize(cache_dir=self.dir)
            def shifted(x):
                return chosen(x)
            return shifted

        up, down = make(1), make(-1)
        self.assertEqual((up(1), up(2), down(1)), (2, 3, 2))
        self.assertEqual(up.cache_prune(), 0)       # both codes in use in this run
        self.assertEqual((up.cache_info().entries, down.cache_info().entries), (2, 1))

    def test_cache_prune_removes_other_versions(self):
        v1 = self.memo(lambda x: x, name="job", version="a")
        v1(1), v1(2)
        v2 = self.memo(lambda x: x, name="job", version="b")
        v2(1)
        self.assertEqual(v2.cache_prune(), 2)
        self.assertEqual(v2.cache_info().entries, 1)


# -- memoize: the cache of one function


class TestMemoizeResults(MemoTest):
    def test_none_is_a_result(self):
        f = self.memo(lambda x: None)
        self.assertIsNone(f(1))
        self.assertIsNone(f(1))
        self.assertEqual(len(f.calls), 1)

    def test_exceptions_are_not_cached(self):
        f = self.memo(lambda x: 1 / x)
        for _ in range(2):
            with self.assertRaises(ZeroDivisionError):
                f(0)
        self.assertEqual(len(f.calls), 2)
        self.assertEqual(f.cache_info().entries, 0)

    def test_unpicklable_result_is_returned_with_warning(self):
        lock = threading.Lock()
        f = self.memo(lambda x: lock, name="lock")     # name=: it closes over a lock
        with self.assertWarnsRegex(persist.PersistWarning, "cannot be pickled"):
            self.assertIs(f(1), lock)
        self.assertEqual(f.cache_info().entries, 0)
        self.assertNoTemp()

    @slow
    def test_result_too_deep_to_pickle_is_returned_with_warning(self):
        # A parse tree or linked list deeper than pickle recurses: its RecursionError threw
        # the computed result away.
        f = self.memo(lambda n: nested(n), name="deep")
        with self.assertWarnsRegex(persist.PersistWarning, r"deep\(\) cannot be pickled "
                                   r"\(RecursionError.*flatter"):
            self.assertEqual(depth_of(f(100000)), 100000)
        self.assertEqual(f(3), [[[[]]]])
        self.assertEqual((f.cache_info().entries, f.cache_info().unstored), (1, 1))

        class Tree:
            @persist.memoize(cache_dir=self.dir, ignore="self")
            def parse(self, n):
                return nested(n)

        with self.assertWarnsRegex(persist.PersistWarning, "cannot be pickled"):
            self.assertEqual(depth_of(Tree().parse(100000)), 100000)

        @persist.memoize(cache_dir=self.dir)
        async def fetch(n):
            return nested(n)

        with self.assertWarnsRegex(persist.PersistWarning, "cannot be pickled"):
            self.assertEqual(depth_of(asyncio.run(fetch(100000))), 100000)
        self.assertNoTemp()

    def test_value_file_removed_or_cut_short_warns_and_is_stored_again(self):
        # One removed by hand was computed again without a word; one cut short warned.
        big = os.urandom(1 << 19)                # past the inline limit: a value file
        f = self.memo(lambda x: [big, x], name="big")
        values = self.path / "big.db.values"
        for harm in ("remove", "truncate"):
            f.calls.clear()
            self.assertEqual(f(1), [big, 1])
            (name,) = os.listdir(values)
            if harm == "remove":
                os.remove(values / name)
            else:
                os.truncate(values / name, 1000)
            with self.assertWarnsRegex(persist.PersistWarning, r"big\(\) cannot be loaded "
                                       r"from %s " % re.escape(str(values / name))):
                self.assertEqual(f(1), [big, 1])
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                self.assertEqual(f(1), [big, 1])    # stored anew: a hit, quietly
            self.assertEqual(len(f.calls), 2)
            self.assertEqual(len(os.listdir(values)), 1)
            f.cache_clear()

    def test_result_too_deep_to_pickle_raises_under_strict(self):
        f = self.memo(lambda n: nested(n), name="deep", strict=True)
        with self.assertRaisesRegex(TypeError, r"cannot be pickled \(RecursionError.*strict"):
            f(100000)
        self.assertEqual(f.cache_info().entries, 0)
        self.assertNoTemp()

    def test_large_result(self):
        big = os.urandom(5 << 20)
        f = self.memo(lambda x: [big, x])
        self.assertEqual(f(1), [big, 1])
        self.assertEqual(f(1), [big, 1])
        self.assertEqual(len(f.calls), 1)
        self.assertNoTemp()

    @unittest.skipUnless(LARGE, "set PERSIST_TEST_LARGE=1 to store a 1.1 GB result "
                                "(.ci/run does, on the newest CPython)")
    def test_result_over_a_gigabyte(self):
        size = 1_100_000_000
        f = self.memo(lambda n: b"\x07" * n)
        first = f(size)
        del first
        second = f(size)
        self.assertEqual(len(second), size)
        self.assertEqual(second[-1:], b"\x07")
        self.assertEqual(len(f.calls), 1)

    def test_version_bump_makes_old_results_misses(self):
        f1 = self.memo(lambda x: x, name="job", version=1)
        for i in range(50):
            f1(i)
        f2 = self.memo(lambda x: -x, name="job", version=2)
        self.assertEqual(f2(3), -3)
        self.assertEqual(f2.cache_info().entries, 51)      # version 1's are kept
        f2b = self.memo(lambda x: -x, name="job", version=2)
        self.assertEqual(f2b(3), -3)
        self.assertEqual(len(f2b.calls), 0)

    def test_two_lambdas_in_one_scope_keep_apart(self):
        double = persist.memoize(cache_dir=self.dir)(lambda x: 2 * x)
        triple = persist.memoize(cache_dir=self.dir)(lambda x: 3 * x)
        self.assertEqual((double(5), triple(5)), (10, 15))
        self.assertNotEqual(double.cache_info().path, triple.cache_info().path)

    def test_editing_the_code_keeps_results(self):
        f = self.memo(lambda x: x + 1, name="job")
        f(1)
        edited = self.memo(lambda x: x + 100, name="job")
        self.assertEqual(edited(1), 2)
        self.assertEqual(edited.calls, [])

    def test_expire(self):
        f = self.memo(lambda x: x, expire=datetime.timedelta(hours=1))
        now = 1_000_000_000.0
        with mock.patch("time.time", return_value=now):
            f(1)
        with mock.patch("time.time", return_value=now + 3599):
            f(1)
        self.assertEqual(len(f.calls), 1)
        with mock.patch("time.time", return_value=now + 3601):
            f(1)
        self.assertEqual(len(f.calls), 2)

    def test_cache_info_clear_delete(self):
        f = self.memo(lambda x: x)
        f(1), f(1), f(2)
        info = f.cache_info()
        self.assertEqual((info.hits, info.misses, info.entries), (1, 2, 2))
        self.assertEqual(os.path.dirname(info.path), self.dir)
        self.assertTrue(f.cache_delete(1))
        self.assertFalse(f.cache_delete(1))
        self.assertEqual(f.cache_info().entries, 1)
        f.cache_clear()
        self.assertEqual(f.cache_info().entries, 0)
        f(2)
        self.assertEqual(len(f.calls), 3)

    def test_unloadable_entry_is_recomputed(self):
        global Renamed
        original = Renamed
        f = self.memo(lambda x: Renamed(), name="renamed")
        f(1)
        del Renamed
        try:
            g = self.memo(lambda x: "fresh", name="renamed")
            with self.assertWarnsRegex(persist.PersistWarning, "cannot be loaded"):
                self.assertEqual(g(1), "fresh")
            self.assertEqual(g(1), "fresh")
            self.assertEqual(len(g.calls), 1)
        finally:
            Renamed = original

    def test_garbage_cache_file_is_an_error_and_kept(self):
        path = self.path / "job.db"
        path.write_bytes(b"garbage" * 1000)
        f = self.memo(lambda x: x, name="job")
        with self.assertRaisesRegex(persist.PersistError, "job.db.*another file name"):
            f(1)
        self.assertEqual(f.calls, [])
        self.assertEqual(path.read_bytes(), b"garbage" * 1000)


class TestCacheParameters(MemoTest):
    def test_the_options_given_as_lru_cache_gives_maxsize_and_typed(self):
        @persist.memoize(cache_dir=self.path, version=2, expire=60, ignore=["verbose"])
        def f(x, verbose=False):
            return x

        expected = {"cache_dir": self.path, "name": None, "version": 2, "expire": 60,
                    "ignore": frozenset(["verbose"]), "key": None, "strict": False,
                    "store": None}
        self.assertEqual(f.cache_parameters(), expected)
        f.cache_parameters()["version"] = 3          # a new dict each time, as lru_cache's
        self.assertEqual(f.cache_parameters(), expected)

        @persist.memoize(**f.cache_parameters())
        def g(x, verbose=False):
            return -x

        self.assertEqual(g.cache_parameters(), expected)

    def test_a_method_has_them_too(self):
        class Model:
            @persist.memoize(cache_dir=self.dir, name="predict")
            def predict(self, x):
                return x

        self.assertEqual(Model.predict.cache_parameters()["name"], "predict")
        self.assertEqual(Model().predict.cache_parameters(), Model.predict.cache_parameters())

    def test_currsize_and_maxsize_as_lru_cache_has_them(self):
        f = self.memo(lambda x: x * 2)
        self.assertEqual([f(1), f(2), f(1)], [2, 4, 2])
        info = f.cache_info()
        self.assertEqual((info.hits, info.misses, info.currsize, info.maxsize), (1, 2, 2, None))
        self.assertEqual(info.currsize, info.entries)
        self.assertEqual(len(info), 8)           # the fields are persist's own, as before
        self.assertTrue(repr(info).startswith("CacheInfo(hits=1, misses=2, entries=2,"))
        f.cache_clear()
        self.assertEqual(f.cache_info().currsize, 0)

    def test_bytes_cache_dir_as_for_every_other_path(self):
        f = self.memo(lambda x: x * 2, cache_dir=os.fsencode(self.dir))
        self.assertEqual((f(2), f(2)), (4, 4))
        self.assertEqual(len(f.calls), 1)
        self.assertEqual(os.path.dirname(f.cache_info().path), self.dir)


class TestCacheOfAnEarlierFormat(MemoTest):
    """A cache of an earlier layout is refused, named, and kept: never emptied or rewritten."""

    def test_older_format_is_refused_and_kept(self):
        f = self.memo(lambda x: x * 2, name="job")
        f(1)
        path = f.cache_info().path
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA user_version=2")
        conn.close()
        before = pathlib.Path(path).read_bytes()
        g = self.memo(lambda x: x * 2, name="job")
        with self.assertRaisesRegex(persist.PersistError, re.escape(path) + ".*older persist "
                                    r"\(format 2.*move the file away"):
            g(1)
        with self.assertRaisesRegex(persist.PersistError, "older persist") as caught:
            persist.open(path)
        self.assertEqual(caught.exception.reason, persist.PersistError.OLDER_FORMAT)
        self.assertEqual(pathlib.Path(path).read_bytes(), before)

    @slow
    @unittest.skipUnless(sqlite3.sqlite_version_info >= (3, 35), "DROP COLUMN")
    def test_entries_stored_before_owners_were_recorded_are_each_closures(self):
        # a cache filled by a persist that did not record which closure stored an entry:
        # its entries are still served, and counted and cleared by each closure, never lost
        # to a cache_clear() that leaves them to hit
        (self.path / "job.py").write_text(textwrap.dedent("""
            import persist, sys

            def make(k):
                @persist.memoize
                def scale(x):
                    print("computed", file=sys.stderr)
                    return x * k
                return scale

            two, three = make(2), make(3)
            print(two(10), three(10), two.cache_info().entries, three.cache_info().entries)
            if sys.argv[1:] == ["clear"]:
                two.cache_clear()
                print(three.cache_info().entries)
        """))

        def run(*args):
            done = run_command(["job.py"] + list(args), cwd=self.dir)
            self.assertEqual(done.returncode, 0, done.stderr)
            return done.stdout.split(), done.stderr.count("computed")

        self.assertEqual(run(), ("20 30 1 1".split(), 2))
        path, = (self.path / ".persist").glob("*.db")
        conn = sqlite3.connect(str(path), isolation_level=None)
        for table in ("Dict", "Failures"):
            conn.execute("ALTER TABLE %s DROP COLUMN owner" % table)
        conn.close()
        self.assertEqual(run(), ("20 30 2 2".split(), 0))
        self.assertEqual(run("clear"), ("20 30 2 2 0".split(), 0))
        self.assertEqual(run(), ("20 30 1 1".split(), 2))


@unittest.skipUnless(POSIX and hasattr(os, "setuid"), "POSIX users")
class TestMemoizeReadOnlyCache(TempDirTest):
    def test_unwritable_directory_runs_uncached_with_warning(self):
        os.chmod(self.dir, 0o755)
        cache = self.path / "cache"
        cache.mkdir()
        os.chmod(cache, 0o555)
        code = """
            import os, pathlib, sys, warnings, persist
            import hashlib, inspect, logging, pickle, reprlib, shelve, sqlite3  # before /root goes
            pathlib.Path("/").as_uri()
            if os.getuid() == 0:
                os.setgid(65534); os.setuid(65534)
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x * 3
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                print(f(2), f(2))
            print(caught[0].category.__name__, "running without its cache" in str(caught[0].message))
        """ % str(cache)
        self.assertEqual(run_python(code), "6 6\nPersistWarning True\n")


@unittest.skipUnless(ROOT, "root, to give a directory to another user")
class TestRefusedCacheLeavesNothing(TempDirTest):
    """Root refused in a project another user owns (a mounted directory, in a container)
    creates nothing there, and runs without the cache, as where a cache cannot be opened."""

    def setUp(self):
        super().setUp()
        self.project = self.path / "app"
        self.project.mkdir()
        os.chown(self.project, NOBODY, NOBODY)
        self.runs = []

    def memoized(self, **options):
        @persist.memoize(cache_dir=self.project / ".persist", name="f", **options)
        def f(x):
            self.runs.append(x)
            return x * 2
        return f

    def test_warns_once_and_runs_uncached(self):
        """It killed the script, where every other cache that cannot be opened warns."""
        f = self.memoized()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual([f(1), f(1), f(2)], [2, 2, 4])
        self.assertEqual(self.runs, [1, 1, 2])
        self.assertEqual([w.category for w in caught], [persist.PersistWarning])
        message = str(caught[0].message)
        for part in ("running without its cache", str(self.project),
                     "owned by user %d" % NOBODY, "chown", "cache_dir="):
            self.assertIn(part, message)
        self.assertEqual(f.cache_info().unstored, 3)
        self.assertEqual(f.explain(1).reason, "cannot open")
        self.assertEqual(os.listdir(self.project), [])  # else its owner's own runs cannot cache

    def test_strict_raises(self):
        for f, env in ((self.memoized(strict=True), {}),
                       (self.memoized(), {"PERSIST_STRICT": "1"})):
            with mock.patch.dict(os.environ, env):
                for _ in range(2):                  # at every call, not only the first
                    with self.assertRaisesRegex(persist.PersistError,
                                                "owned by user %d" % NOBODY) as caught:
                        f(1)
                    self.assertEqual(caught.exception.filename, str(self.project))
                    self.assertEqual(caught.exception.reason, persist.PersistError.NOT_OURS)
        self.assertEqual(self.runs, [])
        self.assertEqual(os.listdir(self.project), [])


class TestCacheUnusable(TempDirTest):
    """When the cache cannot be used, results are still returned; it says so once, with
    what to do, counts what was not stored, and strict=True raises instead."""

    def setUp(self):
        super().setUp()
        self.blocker = self.path / "not-a-dir"
        self.blocker.write_text("a file where the cache directory should be")

    def test_warns_once_with_the_cause_and_counts(self):
        f = persist.memoize(cache_dir=self.blocker)(lambda x: x + 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual([f(i) for i in range(5)], [1, 2, 3, 4, 5])
        self.assertEqual(len(caught), 1)
        message = str(caught[0].message)
        self.assertIn(str(self.blocker), message)
        self.assertIn("a file is in the way", message)
        self.assertIn("strict=True", message)
        self.assertEqual(f.cache_info().unstored, 5)

    def test_strict_raises_before_computing(self):
        runs = []
        f = persist.memoize(cache_dir=self.blocker, strict=True)(lambda x: runs.append(x))
        for _ in range(3):         # each call: the second ran uncached, and said nothing
            with self.assertRaises(OSError):
                f(1)
        self.assertEqual(runs, [])

    def test_environment_variable_makes_every_function_strict(self):
        f = persist.memoize(cache_dir=self.blocker)(lambda x: x)
        with mock.patch.dict(os.environ, {"PERSIST_STRICT": "1"}):
            with self.assertRaises(OSError):
                f(1)

    def test_environment_variable_is_read_as_a_yes_or_a_no(self):
        """PERSIST_STRICT=false (or no, off, ...) made every function strict."""
        for value, strict in (("1", True), ("true", True), ("YES", True), (" On ", True),
                              ("0", False), ("false", False), ("No", False), ("OFF", False),
                              ("", False)):
            f = persist.memoize(cache_dir=self.blocker)(lambda x: x + 1)
            with mock.patch.dict(os.environ, {"PERSIST_STRICT": value}), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if strict:
                    with self.assertRaises(NotADirectoryError, msg=value):
                        f(1)
                else:
                    self.assertEqual(f(1), 2, value)
                    self.assertEqual(len(caught), 1, value)

    def test_environment_variable_neither_yes_nor_no_is_refused_before_the_call(self):
        for value in ("ture", "2", "strict", "y"):
            runs = []
            f = persist.memoize(cache_dir=self.path / "cache")(lambda x: runs.append(x))
            with mock.patch.dict(os.environ, {"PERSIST_STRICT": value}):
                for call in (lambda: f(1), lambda: persist.map(f, [1, 2])):
                    with self.assertRaisesRegex(ValueError, "PERSIST_STRICT=%r is neither a "
                                                "yes" % value):
                        call()
            self.assertEqual(runs, [])


class TestMemoizeManyProcesses(TempDirTest):
    @slow
    def test_eight_processes_overlapping_keys(self):
        code = """
            import sys, persist
            @persist.memoize(cache_dir=%r, name="shared")
            def f(x):
                return [x] * 10
            me = int(sys.argv[1])
            for i in range(me * 20, me * 20 + 100):
                assert f(i) == [i] * 10
        """ % self.dir
        children = [spawn(self, [sys.executable, "-c", textwrap.dedent(code), str(n)],
                          stderr=subprocess.PIPE) for n in range(8)]
        errors = [child.communicate()[1] for child in children]
        self.assertEqual([child.returncode for child in children], [0] * 8, errors)
        self.assertEqual([e for e in errors if e], [])
        with persist.open(os.path.join(self.dir, "shared.db"), "r") as db:
            self.assertEqual(len(db), 7 * 20 + 100)

    def test_sixteen_threads(self):
        runs = []

        @persist.memoize(cache_dir=self.dir)
        def f(x):
            runs.append(x)
            return x * 2

        barrier = threading.Barrier(16)
        failures = []

        def hammer():
            barrier.wait(CHILD_TIMEOUT)
            try:
                for i in range(200):
                    assert f(i % 50) == (i % 50) * 2
            except Exception as exc:      # reported below
                failures.append(exc)

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            joined(thread)
        self.assertEqual(failures, [])
        self.assertEqual(f.cache_info().entries, 50)

    @unittest.skipUnless("fork" in multiprocessing.get_all_start_methods(), "needs fork")
    def test_fork_after_use(self):
        out = run_python("""
            import multiprocessing, persist, sys
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x + 1
            f(0)
            with multiprocessing.get_context("fork").Pool(3) as pool:
                print(sum(pool.map(f, range(30))))
            print(f(5), f.cache_info().entries)
        """ % self.dir)
        self.assertEqual(out, "465\n6 30\n")


# -- memoize: explain


def refuse_to_load():
    raise ValueError("refused to load")


class LoadsNever:
    """Pickles fine; loading its pickle raises."""

    def __reduce__(self):
        return refuse_to_load, ()


class ExplainTest(MemoTest):
    def sql(self, func, statement, params=()):
        """Run statement on func's cache file, as another tool could."""
        conn = sqlite3.connect(func.cache_info().path)
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    def assertMiss(self, explanation, reason, pattern):
        self.assertFalse(explanation.hit, str(explanation))
        self.assertEqual(explanation.reason, reason, str(explanation))
        self.assertRegex(str(explanation), "^miss: " + pattern)


class TestExplainHit(ExplainTest):
    def test_hit_says_when_and_how_long_without_calling(self):
        f = self.memo(lambda x: x + 1)
        before = time.time()
        f(1)
        info = f.cache_info()
        explanation = f.explain(1)
        self.assertTrue(explanation.hit)
        self.assertEqual(explanation.reason, "hit")
        # how long the call took is measured: a busy machine can stretch even this one past
        # 1 ms (test_seconds_of_quick_and_slow_calls checks each form with fixed figures)
        self.assertRegex(str(explanation), r"^hit: stored \d{4}-\d\d-\d\d \d\d:\d\d \(\d+s ago\), "
                                           r"computed in (under 1 ms|\d+ ms|\d+\.\d s)$")
        self.assertGreaterEqual(explanation.stored, before - 1)
        self.assertGreaterEqual(explanation.seconds, 0)
        self.assertEqual(explanation.path, info.path)
        self.assertEqual(len(f.calls), 1)                       # explain() never calls f
        self.assertEqual(f.cache_info()[:2], info[:2])          # nor counts hits or misses

    def test_arguments_bind_as_for_the_call(self):
        f = self.memo(lambda x, y=2: x * y)
        f(3)
        self.assertTrue(f.explain(x=3).hit)
        self.assertTrue(f.explain(3, y=2).hit)
        self.assertFalse(f.explain(3, 4).hit)
        with self.assertRaisesRegex(TypeError, "<lambda>"):
            f.explain(1, 2, 3)
        with self.assertRaisesRegex(TypeError, "cannot"):
            f.explain(threading.Lock())

    def test_method_and_async_function(self):
        test = self

        class Model:
            @persist.memoize(cache_dir=test.dir, ignore=("self",))
            def predict(self, x):
                return x * 10

        @persist.memoize(cache_dir=self.dir)
        async def fetch(x):
            return x

        model = Model()
        self.assertFalse(model.predict.explain(1).hit)
        model.predict(1)
        self.assertTrue(model.predict.explain(1).hit)
        self.assertFalse(fetch.explain(1).hit)
        asyncio.run(fetch(1))
        self.assertTrue(fetch.explain(1).hit)

    def test_seconds_of_quick_and_slow_calls(self):
        f = self.memo(lambda x: x)
        f(1)
        for seconds, text in ((0.0004, "under 1 ms"), (0.0123, "12 ms"), (75.25, "75.2 s")):
            self.sql(f, "UPDATE Dict SET seconds = %r" % seconds)
            self.assertRegex(str(f.explain(1)), r", computed in %s$" % text)
            self.assertEqual(f.explain(1).seconds, seconds)


class TestExplainMiss(ExplainTest):
    """explain() of a call that would run: it says why (no entry, expired, another version, a
    value that cannot load, a failure before)."""

    def test_no_cache_yet(self):
        f = self.memo(lambda x: x)
        self.assertMiss(f.explain(1), "no entry", r"no entry; the cache .* does not exist yet$")
        self.assertFalse(os.path.exists(f.cache_info().path))   # looking creates nothing

    def test_other_arguments(self):
        f = self.memo(lambda x: x)
        f(1)
        self.assertMiss(f.explain(2), "no entry", "no entry in .*%s$"
                        % re.escape(os.path.basename(f.cache_info().path)))

    def test_expired_says_when_and_expire(self):
        f = self.memo(lambda x: x, expire=60)
        f(1)
        self.assertTrue(f.explain(1).hit)
        self.sql(f, "UPDATE Dict SET stored = stored - 7200")
        explanation = f.explain(1)
        self.assertMiss(explanation, "expired", r"expired; stored .* \(2h ago\), .* expire=60 s$")
        self.assertLess(explanation.stored, time.time() - 7000)

    def test_names_the_version_that_stored_it(self):
        v1 = self.memo(lambda x: x, name="job", version=1)
        v1(5)
        v2 = self.memo(lambda x: x, name="job", version="two")
        explanation = v2.explain(5)
        self.assertMiss(explanation, "another version", r"no entry for version='two', and the "
                        r"version is part of the key; version=1 has one, stored ")
        self.assertEqual(explanation.version, "1")
        self.assertMiss(v2.explain(6), "no entry", "no entry in ")
        v2(5)
        self.assertTrue(v2.explain(5).hit)

    def test_function_that_carries_values(self):
        # Its keys are salted with its version and what its closure holds.
        def make(k, version):
            @persist.memoize(cache_dir=self.dir, version=version)
            def scale(x):
                return x * k
            return scale

        make(3, version=1)(2)
        self.assertEqual(make(3, version=2).explain(2).reason, "another version")
        self.assertEqual(make(4, version=2).explain(2).reason, "no entry")

    def test_names_the_error(self):
        f = self.memo(lambda x: LoadsNever())
        f(1)
        explanation = f.explain(1)
        self.assertMiss(explanation, "cannot load", r"the entry \(stored .*\) cannot be loaded "
                        r"\(ValueError: refused to load\); a call computes it again$")
        self.assertEqual(explanation.error, "ValueError: refused to load")

    def test_a_value_file_removed_by_hand(self):
        # explain() said "no entry" while the call warned that the entry cannot be loaded.
        f = self.memo(lambda x: "v" * (1 << 19))
        f(1)
        f(2)
        files = sorted((pathlib.Path(f.cache_info().path + ".values")).iterdir())
        self.assertEqual(len(files), 2)
        files[0].unlink()
        with open(files[1], "r+b") as file:
            file.truncate(10)
        for x in (1, 2):
            explanation = f.explain(x)
            self.assertEqual(explanation.reason, "cannot load", explanation)
        errors = sorted(f.explain(x).error for x in (1, 2))   # cut short: PyPy's EOFError
        self.assertEqual(sum(error.startswith("FileNotFoundError: ") for error in errors), 1,
                         errors)
        self.assertRegex("".join(errors), "(UnpicklingError|EOFError): ")
        with self.assertWarnsRegex(persist.PersistWarning, "cannot be loaded"):
            f(1)
        self.assertEqual(f.explain(1).reason, "hit")

    def test_count_and_last_error(self):
        # The Failures table as the failure ledger fills it, for the key of f(1).
        f = self.memo(lambda x: x)
        f(1)
        (key,), = self.sql(f, "SELECT key FROM Dict")
        now = time.time()
        self.sql(f, "DELETE FROM Dict")
        self.sql(f, "INSERT INTO Failures (key, args, type, message, traceback, count, first,"
                    " last, seconds, version) VALUES (?, '(1)', 'KeyError', ?, 'Trace', 3, ?, ?,"
                    " 0.5, 'None')", (key, "'id'", now - 600, now - 120))
        explanation = f.explain(1)
        self.assertMiss(explanation, "failed before", r"no entry; the call failed 3 times, "
                        r"last 2m ago \(KeyError: 'id'\)$")
        self.assertEqual((explanation.failures, explanation.error), (3, "KeyError: 'id'"))
        self.assertEqual(f.explain(2).reason, "no entry")

    def test_cache_without_a_failures_table(self):
        f = self.memo(lambda x: x)
        f(1)
        self.sql(f, "DROP TABLE Failures")
        self.assertEqual(f.explain(2).reason, "no entry")


class TestExplainEditedInANotebook(ExplainTest):
    def cell(self, source):
        """Run source as a notebook or REPL cell whose function has no source file."""
        namespace = {"__name__": "notebook", "persist": persist, "cache": self.dir}
        exec(textwrap.dedent(source), namespace)
        return namespace["f"]

    def test_names_the_caches_of_earlier_code(self):
        first = self.cell("""
            @persist.memoize(cache_dir=cache)
            def f(x):
                return x + 1
            """)
        first(1)
        edited = self.cell("""
            @persist.memoize(cache_dir=cache)
            def f(x):
                return x + 2
            """)
        explanation = edited.explain(1)
        self.assertMiss(explanation, "no entry", r"no entry; the cache .* does not exist yet; "
                        r"beside it, %s is one of this function with other code: .*name=" %
                        re.escape(os.path.basename(first.cache_info().path)))
        self.assertFalse(os.path.exists(edited.cache_info().path))

    def test_same_code_again_finds_its_cache(self):
        source = """
            @persist.memoize(cache_dir=cache)
            def f(x):
                return x + 1
            """
        self.cell(source)(1)
        self.assertTrue(self.cell(source).explain(1).hit)


class TestExpireWhenTheClockJumps(ExplainTest):
    """expire= with clocks that disagree: an entry stored while a clock was ahead (a resumed
    VM, a skewed container writing a shared cache) must not live until this clock catches
    up. The other processes' clocks are faked by patching time.time in them."""

    def at(self, offset, *calls):
        """Call skewed(x) for each x in a process whose clock is offset seconds off; each call
        prints 'computed X' if it ran, then its explain() before it."""
        return run_python("""
            import sys, time, persist
            real, offset = time.time, float(sys.argv[2])
            time.time = lambda: real() + offset
            @persist.memoize(cache_dir=sys.argv[1], name="skewed", expire=3600)
            def skewed(x):
                print("computed", x)
                return x
            for x in sys.argv[3:]:
                print(skewed.explain(int(x)))
                skewed(int(x))
        """.replace("sys.argv[1]", repr(self.dir)).replace("sys.argv[2]", repr(str(offset)))
           .replace("sys.argv[3:]", repr([str(x) for x in calls])))

    @slow
    def test_an_entry_stored_ahead_of_the_clock_expires(self):
        self.at(7200, 1, 2, 3)                  # stored by a clock two hours ahead
        self.at(10, 4)                          # and by one ten seconds ahead
        runs = []
        f = self.memo(lambda x: runs.append(x) or x, name="skewed", expire=3600)
        explanation = f.explain(1)
        self.assertMiss(explanation, "expired", r"expired; stored .* \(1h ahead of this clock: "
                        r"the clock that stored it was ahead, or this one is behind\), and "
                        r"expire=3600 s; an entry stored further in the future than expire= "
                        r"has expired too, as its age cannot be known$")
        self.assertGreater(explanation.stored, time.time() + 7000)
        near = f.explain(4)                     # within expire=: a hit, and said so
        self.assertTrue(near.hit, str(near))
        self.assertRegex(str(near), r"^hit: stored .* \([0-9]s ahead of this clock")
        self.assertEqual([f(1), f(4)], [1, 4])
        self.assertEqual(runs, [1])             # computed again, and now stamped by this clock
        self.assertTrue(f.explain(1).hit)
        show = run_command(CLI + ["show", f.cache_info().path]).stdout
        self.assertEqual(len(re.findall(r"(?m)^ +-1h ", show)), 2, show)   # 2 and 3
        self.assertEqual(f.cache_prune(), 2)    # takes 2 and 3
        self.assertEqual(f.cache_info().entries, 2)
        self.at(7200, 5)                        # and so does the command line
        for how in (["--expired"], ["--older-than", "1h"]):
            done = run_command(CLI + ["prune", f.cache_info().path] + how)
            self.assertEqual(done.stdout.split()[:2], ["removed", "1"], done.stderr)
            self.at(7200, 5)
        self.assertEqual(f.cache_info().entries, 3)

    @slow
    def test_the_readers_clock_jumping_either_way(self):
        self.at(0, 1)                           # stored by the right clock
        # a reader whose clock jumped forwards sees it two hours old; one whose clock jumped
        # back, two hours ahead: both compute it again
        for offset in (7200, -7200):
            out = self.at(offset, 1)
            self.assertRegex(out, r"^miss: expired; stored .*\ncomputed 1\n$")
            self.assertEqual(("ahead of this clock" in out), offset < 0, out)
            self.at(0, 1)                       # and the right clock stores it again
        out = self.at(0, 1)
        self.assertRegex(out, r"^hit: stored .* \(0s ago\)")
        # a writer whose clock was behind: two hours old to the others
        self.at(-7200, 5)
        self.assertRegex(self.at(0, 5), r"^miss: expired; stored .* \(2h ago\)")

    def test_a_failure_after_an_entry_stamped_ahead_is_recorded(self):
        # the entry stored while a clock was ahead has expired; the call made again fails:
        # that is a failure on record, not "another process succeeded meanwhile"
        self.at(7200, 1)
        broken = []

        def skewed(x):
            broken.append(x)
            raise ValueError(x)

        f = self.memo(skewed, name="skewed", expire=3600)
        with self.assertRaises(ValueError):
            f(1)
        self.assertEqual((broken, [r.call.args for r in f.failures()]), ([1], [(1,)]))

    @slow
    def test_a_stamp_past_any_date_is_said_not_raised(self):
        # a crafted or corrupt stamp, years past 9999 or before year 1: explain(), show and
        # ls say so, and the call computes it again
        f = self.memo(lambda x: x, name="crafted", expire=3600)
        f(1), f(2), f(3)
        self.sql(f, "UPDATE Dict SET stored = CASE args WHEN '(1)' THEN 1e308 "
                    "WHEN '(2)' THEN -1e308 ELSE 9e999 END")
        for x in (1, 2, 3):
            self.assertMiss(f.explain(x), "expired", r"expired; stored \(not a date\) ")
        show = run_command(CLI + ["show", f.cache_info().path])
        self.assertEqual(show.returncode, 0, show.stderr)
        self.assertEqual(sorted(line.split()[0] for line in show.stdout.splitlines()[1:]),
                         ["?", "?", "?"])
        ls = run_command(CLI + ["ls", self.dir])
        self.assertEqual(ls.returncode, 0, ls.stderr)
        self.assertIn("(not a date)", ls.stdout)
        self.assertEqual([f(1), f(2), f(3)], [1, 2, 3])
        self.assertEqual(len(f.calls), 6)


class TestExplainCannotOpen(ExplainTest):
    def test_says_why(self):
        f = self.memo(lambda x: x)
        os.makedirs(f.cache_info().path)                    # a directory where the file goes
        with self.assertWarns(persist.PersistWarning):      # as the call would
            explanation = f.explain(1)
        self.assertMiss(explanation, "cannot open", r"the cache .* cannot be opened \(")
        self.assertTrue(explanation.error)
        self.assertEqual(f(1), 1)                           # the call still works, uncached
        self.assertEqual(f.cache_info().unstored, 1)

    def test_strict_explains_instead_of_raising(self):
        f = self.memo(lambda x: x, cache_dir=self.path / "cache", strict=True)
        os.mkdir(self.path / "cache")
        (self.path / "cache" / os.path.basename(f.cache_info().path)).write_bytes(b"x" * 4096)
        explanation = f.explain(1)
        self.assertMiss(explanation, "cannot open", "the cache .* cannot be opened "
                        r"\(.*not a persist cache")
        with self.assertRaisesRegex(persist.PersistError, "not a persist cache"):
            f(1)                                            # explain() changed nothing

    def test_file_that_is_not_a_cache(self):
        f = self.memo(lambda x: x)
        os.makedirs(os.path.dirname(f.cache_info().path), exist_ok=True)
        with open(f.cache_info().path, "wb") as file:
            file.write(b"garbage" * 1000)
        self.assertEqual(f.explain(1).reason, "cannot open")
        with self.assertRaisesRegex(persist.PersistError, "not a persist cache"):
            f(1)


# -- memoize: the wrapper


@persist.memoize
def cube(x):
    return x ** 3


class TestMemoizeForms(MemoTest):
    def test_bare_and_called(self):
        env = {"PERSIST_DIR": self.dir}
        with mock.patch.dict(os.environ, env):
            @persist.memoize
            def bare(x):
                """Doc."""
                return [x]

            @persist.memoize()
            def called(x):
                return (x,)

            self.assertEqual(bare(1), [1])
            self.assertEqual(bare(1), [1])
            self.assertEqual(called(2), (2,))
        self.assertEqual(bare.__name__, "bare")
        self.assertEqual(bare.__doc__, "Doc.")
        self.assertTrue(callable(bare.__wrapped__))
        self.assertEqual(bare.cache_info().hits, 1)

    def test_wrong_use(self):
        for wrong in (5, "dir", None.__class__):
            if callable(wrong):
                continue
            with self.assertRaisesRegex(TypeError, "^Expected"):
                persist.memoize(wrong)
        with self.assertRaisesRegex(TypeError, "^Expected"):
            persist.memoize(expire="soon")(lambda: 1)
        with self.assertRaisesRegex(TypeError, "^Expected"):
            persist.memoize(key=3)(lambda: 1)

    def test_generator_refused(self):
        def gen():
            yield 1

        async def agen():
            yield 1

        for func in (gen, agen):
            with self.assertRaisesRegex(TypeError, "generator"):
                persist.memoize(cache_dir=self.dir)(func)

    def test_async(self):
        runs = []

        @persist.memoize(cache_dir=self.dir)
        async def fetch(x):
            runs.append(x)
            await asyncio.sleep(0)
            return {"x": x}

        self.assertEqual(asyncio.run(fetch(1)), {"x": 1})
        self.assertEqual(asyncio.run(fetch(1)), {"x": 1})
        self.assertEqual(runs, [1])

    def test_async_failure_is_recorded_and_result_stored(self):
        # The async wrapper awaits the function inside the one miss path (_Miss), as the
        # others call it: the ledger has its failure, the cache its result.
        @persist.memoize(cache_dir=self.dir)
        async def fetch(x):
            await asyncio.sleep(0)
            if x < 0:
                raise ValueError("negative: %d" % x)
            return x * 2

        with self.assertRaisesRegex(ValueError, "negative: -1"):
            asyncio.run(fetch(-1))
        (failure,) = fetch.failures()
        self.assertEqual((failure.args, failure.type, failure.message, failure.count),
                         ("(-1)", "ValueError", "negative: -1", 1))
        self.assertEqual(asyncio.run(fetch(2)), 4)
        info = fetch.cache_info()
        self.assertEqual((info.entries, info.misses, info.failures), (1, 2, 1))

    def test_pickles_by_reference(self):
        self.assertIs(pickle.loads(pickle.dumps(cube)), cube)

    @slow
    def test_process_pool_workers(self):
        with mock.patch.dict(os.environ, {"PERSIST_DIR": self.dir}):
            with concurrent.futures.ProcessPoolExecutor(2) as pool, workers_killed_on_error():
                self.assertEqual(list(pool.map(cube, range(10), timeout=CHILD_TIMEOUT)),
                                 [x ** 3 for x in range(10)])
            with multiprocessing.get_context("spawn").Pool(2) as pool:   # its exit kills them
                self.assertEqual(pool.map_async(cube, range(5, 15)).get(CHILD_TIMEOUT),
                                 [x ** 3 for x in range(5, 15)])
            with persist.open(os.path.join(self.dir, "test_persist.cube.db"), "r") as db:
                self.assertEqual(len(db), 15)


class Model:
    def __init__(self, k):
        self.k = k

    def __eq__(self, other):
        return type(other) is Model and other.k == self.k

    @persist.memoize
    def predict(self, x):
        return x * self.k

    @persist.memoize
    @classmethod
    def create(cls, k):
        return cls(k)


class TestSmallerDefects(MemoTest):
    def test_recursion_error_passes_unchanged(self):
        @persist.memoize(cache_dir=self.dir)
        def down(n, options):
            return 0 if n == 0 else down(n - 1, options) + 1

        self.assertEqual(down(50, {"deep": True}), 50)
        limit = sys.getrecursionlimit()
        self.addCleanup(sys.setrecursionlimit, limit)
        for extra in range(0, 40, 3):     # the limit falls inside the key's derivation, or not
            sys.setrecursionlimit(limit + extra)
            with self.assertRaises(RecursionError) as caught:
                down(10 ** 6, {"deep": True})
            self.assertNotIn("nested too deep", str(caught.exception))   # its own recursion

    def test_result_of_a_call_deep_in_a_recursion_is_returned(self):
        # Returned at a depth where storing it ran out of stack, the result was lost to the
        # RecursionError of the store (1 of 120 depths on 3.8, 3 on 3.13).
        ran = []

        @persist.memoize(cache_dir=self.dir)
        def f(x):
            ran.append(x)
            return x

        def at_depth(n, x):
            return f(x) if n == 0 else at_depth(n - 1, x)

        limit = sys.getrecursionlimit()
        lost = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in range(limit - 120, limit):
                del ran[:]
                try:
                    self.assertEqual(at_depth(n, n), n)
                except RecursionError:
                    if ran:                         # computed, then thrown away
                        lost.append(n)
        self.assertEqual(lost, [])

    def test_a_memoized_recursion_takes_two_frames_a_level(self):
        # The wrapper calls the function in its own frame (with _Miss), not through a helper
        # that would take a third frame a level: a recursion that fit in the limit would not.
        def depth():
            frame, count = sys._getframe(1), 0
            while frame is not None:
                frame, count = frame.f_back, count + 1
            return count

        seen = {}

        @persist.memoize(cache_dir=self.dir)
        def down(n, run):
            if n == 0:
                seen[run] = depth()
                return 0
            return down(n - 1, run) + 1

        class Counter:
            @persist.memoize(cache_dir=self.dir, ignore="self")
            def down(self, n, run):
                if n == 0:
                    seen[run] = depth()
                    return 0
                return self.down(n - 1, run) + 1

        counter = Counter()
        for name, f in (("function", down), ("method", counter.down)):
            with self.subTest(name):
                self.assertEqual((f(0, name + " 0"), f(10, name + " 10")), (0, 10))
                self.assertEqual(seen[name + " 10"] - seen[name + " 0"], 20)

    def test_cache_delete_from_an_instance(self):
        runs = []

        class Counter:
            def __init__(self, k):
                self.k = k

            @persist.memoize(cache_dir=self.dir, ignore="self")
            def method(self, x):
                runs.append(x)
                return x

        c = Counter(1)
        self.assertEqual(c.method(10), 10)
        self.assertTrue(c.method.cache_delete(10))
        self.assertFalse(c.method.cache_delete(10))
        self.assertEqual(c.method(10), 10)
        self.assertEqual(runs, [10, 10])
        self.assertEqual(c.method.cache_info().entries, 1)
        self.assertTrue(Counter.method.cache_delete(c, 10))
        self.assertEqual(c.method.__name__, "method")
        self.assertEqual(list(inspect.signature(c.method).parameters), ["x"])

    def test_methods_pickle_by_reference(self):
        self.assertIs(pickle.loads(pickle.dumps(Model.predict)), Model.predict)
        bound = pickle.loads(pickle.dumps(Model(3).predict))
        self.assertEqual(bound.__wrapped__.__self__, Model(3))

    @slow
    def test_methods_of_a_script_pickle_by_name_and_copy_as_themselves(self):
        # Since memoized functions travel by value with cloudpickle, pickle sent a method of
        # a class in __main__ by value too (Can't pickle <function Model.predict>: it's not
        # the same object as __main__.Model.predict), and copy.copy() and deepcopy() made
        # a wrapper with no cache, which stored nothing.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import copy, multiprocessing, pickle, sys, persist
            class Model:
                k = 3
                def __init__(self, k):
                    self.k = k
                @persist.memoize
                def predict(self, x):
                    return self.k * x
                @staticmethod
                @persist.memoize
                def helper(x):
                    return x + 1
            def make():
                @persist.memoize
                def nested(x):
                    return x - 1
                return nested
            if __name__ == "__main__":
                nested = make()
                for form in (Model.predict, Model.helper):
                    print(pickle.loads(pickle.dumps(form)) is form)
                for form in (Model.predict, Model.helper, nested):
                    print(copy.copy(form) is form, copy.deepcopy(form) is form)
                bound = copy.deepcopy(Model(4).predict)
                print(bound(2), bound.cache_info().entries)
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    print(pool.apply(Model.predict, (Model(5), 2)),
                          pool.apply(Model.helper, (2,)))
                print(Model.predict.cache_info().entries, Model.helper.cache_info().entries)
        """))
        done = run_command([str(script)], cwd=self.dir, timeout=120,
                           PERSIST_DIR=self.path / "cache")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertEqual(done.stdout.splitlines(), [
            "True", "True", "True True", "True True", "True True", "8 1", "10 3", "2 1"])

    def test_a_python_pickler_with_reducer_override_sends_a_method_of_a_script_by_value(self):
        # As cloudpickle is on PyPy: a subclass of pickle.py's Python pickler. persist itself
        # imports only the C pickler (_pickle), and must still know this one when it runs.
        out = run_python("""
            import io, pickle, persist
            class Model:
                @persist.memoize(cache_dir=%r)
                def predict(self, x):
                    return x
            class ByValue(pickle._Pickler):
                def reducer_override(self, obj):
                    return NotImplemented
            for pickler in (ByValue, pickle._Pickler):
                try:
                    pickler(io.BytesIO()).dump(Model.predict)
                    print("by name")
                except pickle.PicklingError as exc:     # by value, its function with it
                    print("by value" if "function Model.predict" in str(exc) else exc)
        """ % self.dir)
        self.assertEqual(out.splitlines(), ["by value", "by name"])

    def test_above_staticmethod_says_how_to_order(self):
        with self.assertRaisesRegex(TypeError, r"staticmethod.*helper.*@staticmethod above "
                                    r"@memoize"):
            class Holder:
                @persist.memoize
                @staticmethod
                def helper(x):
                    return x

        class Right:
            @staticmethod
            @persist.memoize(cache_dir=self.dir)
            def helper(x):
                return x + 1

        self.assertEqual((Right.helper(1), Right().helper(1)), (2, 2))

    def test_wrong_arguments_name_the_function(self):
        f = persist.memoize(cache_dir=self.dir)(cube.__wrapped__)
        for args, kwargs in (((), {}), ((1, 2), {}), ((1,), {"y": 2})):
            with self.assertRaisesRegex(TypeError, r"^cube\(\): "):
                f(*args, **kwargs)

    def test_ignore_checked_where_no_kwargs_collects_it(self):
        with self.assertRaisesRegex(TypeError, "'verbos'.*not a parameter"):
            self.memo(lambda x, *args: x, ignore=["verbos"])
        with self.assertRaisesRegex(TypeError, "parameter names, not 3"):
            self.memo(lambda x: x, ignore=["x", 3])


class TestLogging(MemoTest):
    def test_debug_lines_for_hits_misses_and_stores(self):
        f = self.memo(lambda x: x)
        with self.assertLogs("persist", "DEBUG") as logs:
            f(1)
            f(1)
        kinds = [line.split(": ")[-1].split()[0] for line in logs.output]
        self.assertEqual(kinds, ["miss", "stored", "hit"])

    def test_silent_at_default_levels(self):
        import logging
        self.assertFalse(logging.getLogger("persist").isEnabledFor(logging.INFO - 1))

    def check_calls_while_logging_is_half_imported(self, importer):
        # logging's first lines put it in sys.modules, and then import string: an import
        # hook holds it there, half imported, while another thread makes memoized calls.
        # They failed ("partially initialized module 'logging' has no attribute
        # 'getLogger'"), and a hit warned first that its result "cannot be loaded".
        out = run_python("""
            import sys, threading, warnings, persist
            half, done = threading.Event(), threading.Event()
            main = threading.current_thread()
            class HoldLogging:
                def find_spec(self, name, path, target=None):
                    if name == "string" and threading.current_thread() is main:
                        half.set()
                        done.wait(120)
                    return None
            assert "logging" not in sys.modules
            sys.modules.pop("string", None)
            sys.meta_path.insert(0, HoldLogging())
            @persist.memoize(cache_dir=%r, name="f")
            def f(x):
                return x * 2
            f(1)                              # stored: f(1) below is a hit
            seen = []
            def calls():
                half.wait(120)
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        seen.append([f(1), f(2), f(2)])
                    seen.append([str(w.message) for w in caught])
                    seen.append(f.cache_info()[:2])
                except BaseException as exc:
                    seen.append(repr(exc))
                done.set()
            thread = threading.Thread(target=calls)
            thread.start()
            %s
            thread.join()
            print(seen)
        """ % (self.dir, importer), timeout=300)
        self.assertEqual(out.splitlines()[-1], "[[2, 4, 4], [], (2, 2)]")

    def test_calls_while_another_thread_imports_logging(self):
        self.check_calls_while_logging_is_half_imported("import logging")

    def test_calls_while_map_imports_logging(self):
        # persist.map() imports concurrent.futures, which imports logging
        self.check_calls_while_logging_is_half_imported(
            "print(persist.map(str, [1, 2], workers=2))")


# -- persist.map and the failure ledger


class Malformed(ValueError):
    pass


class NeedsTwo(Exception):
    """An exception that pickles but cannot be unpickled: its __init__ wants two arguments."""

    def __init__(self, a, b):
        super().__init__("%s/%s" % (a, b))


def parse(text):
    if text.startswith("?"):
        raise Malformed("malformed: %r" % text)
    return int(text)


class TestFailureLedger(MemoTest):
    def test_a_failed_call_is_recorded_and_raised_unchanged(self):
        f = self.memo(parse)
        raised = []
        for attempt in range(2):
            try:
                f("?x")
            except Malformed as exc:
                raised.append(exc)
        self.assertEqual(len(f.calls), 2)               # a failure is never a cached result
        self.assertIsInstance(raised[0], Malformed)
        self.assertIsNot(raised[0], raised[1])
        self.assertEqual(f("12"), 12)
        record, = f.failures()
        self.assertEqual(record.args, "('?x')")
        self.assertEqual(record.type, "test_persist.Malformed")
        self.assertEqual(record.message, "malformed: '?x'")
        self.assertEqual(record.count, 2)
        self.assertLessEqual(record.first, record.last)
        self.assertGreaterEqual(record.seconds, 0)
        self.assertIn("in parse", record.traceback)
        self.assertTrue(record.traceback.rstrip().endswith("Malformed: malformed: '?x'"))
        info = f.cache_info()
        self.assertEqual(info[:4], (0, 3, 1, info.path))
        self.assertEqual((info.failures, info.unstored), (1, 0))

    def test_newest_last_and_a_success_removes_the_record(self):
        broken = {"?a", "?b"}

        def g(text):
            if text in broken:
                raise KeyError(text)
            return text

        f = self.memo(g)
        for text in ("?a", "?b", "?a"):
            with self.assertRaises(KeyError):
                f(text)
        self.assertEqual([(r.args, r.count) for r in f.failures()], [("('?b')", 1),
                                                                     ("('?a')", 2)])
        broken.discard("?a")
        self.assertEqual(f("?a"), "?a")
        self.assertEqual([r.args for r in f.failures()], ["('?b')"])
        f.cache_clear()
        self.assertEqual((f.failures(), f.cache_info().failures), ([], 0))

    def test_a_failure_after_another_process_stored_the_result_is_not_recorded(self):
        # While this call runs, another process stores its result; then this call fails: a
        # record would shadow the stored result, so none is made. (The other one's clock is a
        # minute ahead: persist takes the call's start as now less its duration once it has
        # built the record, a few milliseconds late, and the test must not depend on that.)
        def g(x):
            run_python("""
                import time, persist
                real = time.time
                time.time = lambda: real() + 60
                f = persist.memoize(cache_dir=%r, name="shared", key=lambda x: x)(lambda x: 10 * x)
                assert f(%d) == %d
            """ % (self.dir, x, x * 10))
            raise KeyError(x)

        f = persist.memoize(cache_dir=self.dir, name="shared", key=lambda x: x)(g)
        with self.assertRaises(KeyError):
            f(1)
        self.assertEqual((f.failures(), f.cache_info().failures), ([], 0))
        self.assertEqual(f(1), 10)                  # a hit on what the other one stored

    def test_a_result_stored_while_the_failure_is_recorded_is_not_shadowed(self):
        # The other process stores the result while persist makes the failure's record (it
        # reads the exception's message then), with no clock ahead: the call started before
        # that store, so the store wins, and the guard must take the start before the record.
        directory = self.dir

        class Late(Exception):
            told = False

            def __str__(self):
                if not Late.told:
                    Late.told = True
                    run_python("""
                        import persist
                        f = persist.memoize(cache_dir=%r, name="shared", key=lambda x: x)(
                            lambda x: 10 * x)
                        assert f(%d) == %d
                    """ % (directory, 2, 20))
                return "late"

        def g(x):
            raise Late(x)

        f = persist.memoize(cache_dir=self.dir, name="shared", key=lambda x: x)(g)
        with self.assertRaises(Late):
            f(2)
        self.assertTrue(Late.told)
        self.assertEqual((f.failures(), f.cache_info().failures), ([], 0))
        self.assertEqual(f(2), 20)                  # a hit on what the other one stored

    @slow
    def test_a_version_bump_that_fixes_a_call_ends_its_failure(self):
        def broken(text):
            raise KeyError(text)

        def fixed(text):
            return text

        for how in ("cache_prune", "prune --stale"):
            name = how.split()[0]
            v1 = self.memo(broken, name=name, version=1)
            for text in ("?a", "?b"):
                with self.assertRaises(KeyError):
                    v1(text)
            v2 = self.memo(fixed, name=name, version=2)
            self.assertEqual(v2("?a"), "?a")         # fixed by the new version: no failure
            self.assertEqual([(r.args, r.version) for r in v2.failures()], [("('?b')", "1")])
            done = run_command(CLI + ["ls", self.dir])
            row, = [line for line in done.stdout.splitlines() if line.startswith(name + " ")]
            self.assertEqual(row.split()[1:2] + row.split()[4:5], ["1", "1"], done.stdout)
            # '?b' has not run under version 2: its record of version 1 is stale, as a
            # result of version 1 would be
            if how == "cache_prune":
                self.assertEqual(v2.cache_prune(), 0)
            else:
                path = v2.cache_info().path
                done = run_command(CLI + ["prune", "--stale", "--dry-run", path])
                self.assertRegex(done.stdout, r"^would remove 0 entries \(0 B\) and 1 failure "
                                              r"record from ")
                self.assertEqual(len(v2.failures()), 1)
                done = run_command(CLI + ["prune", "--stale", path])
                self.assertRegex(done.stdout, r"^removed 0 entries \(0 B\) and 1 failure "
                                              r"record from ", done.stderr)
            self.assertEqual((v2.failures(), v2.cache_info().failures), ([], 0))
            self.assertEqual(v2("?a"), "?a")
            self.assertEqual(len(v2.calls), 1)

    def test_failed_calls_can_be_made_again(self):
        broken = {"?a", "?b", "?c", "?d"}

        def g(text, base=10, note=None):
            if text in broken:
                raise KeyError(text)
            return text, base

        f = self.memo(g, ignore=["note"])
        for args, kwargs in ((("?a",), {"base": 16}), (("?b",), {"note": threading.Lock()}),
                             (("?c",), {}), (("?d",), {"note": b"x" * (2 << 20)})):
            with self.assertRaises(KeyError):
                f(*args, **kwargs)
        records = f.failures()
        self.assertEqual([r.call for r in records], [(("?a",), {"base": 16}), None,
                                                     (("?c",), {}), None])
        self.assertEqual((records[0].call.args, records[0].call.kwargs), (("?a",), {"base": 16}))
        self.assertEqual(records[0].args, "('?a', base=16)")         # the text stays too
        self.assertEqual([r.call_error for r in records[::2]], [None, None])
        self.assertRegex(records[1].call_error, r"^its arguments do not pickle "   # PyPy:
                                                r"\((Type|Pickling)Error: .*lock")   # Pickling
        self.assertEqual(records[3].call_error, "its arguments pickle to more than 1.0 MB")
        done = run_command(CLI + ["failures", "--traceback", f.cache_info().path])
        self.assertIn("\n  (the call itself is not kept: its arguments do not pickle (",
                      done.stdout)
        self.assertEqual(done.stdout.count("(the call itself is not kept"), 2, done.stdout)
        broken.clear()                          # fixed: run the failed calls again
        again = [f(*r.call.args, **r.call.kwargs) for r in f.failures() if r.call]
        self.assertEqual(again, [("?a", 16), ("?c", 10)])
        self.assertEqual([r.args[:6] for r in f.failures()], ["('?b',", "('?d',"])

    def test_a_message_with_a_lone_surrogate_is_recorded(self):
        # a file name that os.listdir() decoded with surrogateescape, in the message
        def load(name):
            raise ValueError("bad row in %s" % name)

        f = self.memo(load)
        with warnings.catch_warnings():
            warnings.simplefilter("error")             # no "could not record" warning
            with self.assertRaises(ValueError):
                f("caf\udce9.csv")
        record, = f.failures()
        self.assertEqual(record.message, "bad row in caf\\udce9.csv")
        self.assertTrue(record.traceback.rstrip().endswith("bad row in caf\\udce9.csv"))
        self.assertEqual(record.call.args, ("caf\udce9.csv",))

    @unittest.skipUnless(sys.platform.startswith("linux"), "file names of any bytes")
    def test_a_script_in_a_folder_whose_name_is_not_utf_8(self):
        # its traceback names the script's path, which Python holds with a lone surrogate
        folder = os.path.join(os.fsencode(self.dir), b"caf\xe9")
        os.mkdir(folder)
        with io.open(os.path.join(folder, b"job.py"), "w") as file:
            file.write(textwrap.dedent("""
                import warnings, persist
                warnings.simplefilter("error")        # no "could not record" warning
                @persist.memoize
                def f(x):
                    raise ValueError(x)
                try:
                    f(1)
                except ValueError:
                    pass
                record, = f.failures()
                print(record.call.args, "job.py" in record.traceback)
            """))
        done = subprocess.run([sys.executable, "job.py"], cwd=folder, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)
        self.assertEqual((done.stdout, done.returncode), ("(1,) True\n", 0), done.stderr)

    def test_records_travel_to_workers(self):
        # A record, its call and cache_info() could not be pickled ("attribute lookup Call on
        # persist failed"): the failed calls could not be sent to a process pool to make again.
        f = self.memo(parse, name="travel")
        with self.assertRaises(persist.Failures):
            persist.map(f, ["1", "?2"], progress=False)
        record, = f.failures()
        for value in (record, record.call, f.cache_info()):
            with self.subTest(value=type(value).__name__):
                for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
                    copy = pickle.loads(pickle.dumps(value, protocol))
                    self.assertEqual((copy, type(copy)), (value, type(value)))
                self.assertEqual(repr(copy), repr(value))
        self.assertEqual(repr(record.call), "Call(args=('?2',), kwargs={})")
        self.assertEqual(type(f.cache_info()).__name__, "CacheInfo")
        self.assertEqual(f.cache_info().currsize, 1)

    def test_records_that_someone_crafted(self):
        f = self.memo(parse, name="crafted")
        for text in ("?a", "?b", "?c"):
            with self.assertRaises(Malformed):
                f(text)
        with contextlib.closing(sqlite3.connect(f.cache_info().path)) as conn, conn:
            conn.execute("UPDATE Failures SET call = ?, type = ?, message = ?, args = ? WHERE "
                         "args = \"('?a')\"", (pickle.dumps(5), b"\x1b[2J", b"bytes", b"x"))
            conn.execute("UPDATE Failures SET call = 7 WHERE args = \"('?b')\"")
        a, b, c = f.failures()
        self.assertEqual((a.call, a.call_error), (None, "it does not load (TypeError: cannot "
                                                       "unpack non-iterable int object)"))
        self.assertEqual(b.call, None)
        self.assertRegex(b.call_error, r"^it does not load \(TypeError: ")
        self.assertEqual(c.call, (("?c",), {}))
        done = run_command(CLI + ["failures", "--traceback", f.cache_info().path])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("\x1b", done.stdout)
        self.assertIn("(the call itself is not kept: it does not load (", done.stdout)

    def test_a_cache_of_before_calls_were_kept(self):
        f = self.memo(parse, name="early")
        with self.assertRaises(Malformed):
            f("?old")
        # the Failures table as persist made it before it kept calls: no column call
        path = f.cache_info().path
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("CREATE TABLE Early (key BLOB PRIMARY KEY NOT NULL, args TEXT, type "
                         "TEXT NOT NULL, message TEXT NOT NULL, traceback TEXT NOT NULL, count "
                         "INTEGER NOT NULL, first REAL NOT NULL, last REAL NOT NULL, seconds "
                         "REAL, version TEXT) WITHOUT ROWID")
            conn.execute("INSERT INTO Early SELECT key, args, type, message, traceback, count,"
                         " first, last, seconds, version FROM Failures")
            conn.execute("DROP TABLE Failures")
            conn.execute("ALTER TABLE Early RENAME TO Failures")
        done = run_command(CLI + ["failures", "--traceback", path])    # read as it is
        self.assertIn("(the call itself is not kept: recorded by a persist that kept no "
                      "calls)", done.stdout, done.stderr)
        g = self.memo(parse, name="early")     # a writer gives the table the column
        with self.assertRaises(Malformed):
            g("?new")
        old, new = g.failures()
        self.assertEqual((old.args, old.call, old.call_error),
                         ("('?old')", None, "recorded by a persist that kept no calls"))
        self.assertEqual((new.args, new.call, new.call_error), ("('?new')", (("?new",), {}), None))

    def test_interrupts_are_not_failures(self):
        def g(x):
            raise KeyboardInterrupt if x else SystemExit(3)

        f = self.memo(g)
        with self.assertRaises(KeyboardInterrupt):
            f(1)
        with self.assertRaises(SystemExit):
            f(0)
        self.assertEqual(f.failures(), [])

    def test_methods_and_coroutines_record_failures_too(self):
        class Parser:
            @persist.memoize(cache_dir=self.dir, ignore=["self"])
            def parse(self, text):
                return parse(text)

        @persist.memoize(cache_dir=self.dir)
        async def parse_later(text):
            return parse(text)

        with self.assertRaises(Malformed):
            Parser().parse("?m")
        with self.assertRaises(Malformed):
            asyncio.run(parse_later("?c"))
        self.assertEqual(Parser.parse.failures()[0].args[-5:], "'?m')")
        self.assertEqual(len(Parser().parse.failures()), 1)
        self.assertEqual(parse_later.failures()[0].args, "('?c')")

    def test_compute_time_held_and_saved(self):
        f = self.memo(lambda x: sum(range(20000)) + x)
        for x in range(5):
            f(x)
        info = f.cache_info()
        self.assertGreater(info.seconds, 0)
        self.assertEqual(info.saved, 0)
        for x in range(5):
            f(x)
        again = f.cache_info()
        self.assertAlmostEqual(again.saved, info.seconds, places=6)
        self.assertEqual(again._fields[:5], ("hits", "misses", "entries", "path", "unstored"))


class TestFailureLedgerUnderFaults(TempDirTest):
    """The ledger when the cache fails under it: read-only, or the process killed mid-call."""

    def test_the_users_exception_still_propagates(self):
        os.chmod(self.dir, 0o755)
        cache = self.path / "cache"
        code = """
            import os, sys, warnings, persist
            import hashlib, logging, pickle, reprlib, shelve, sqlite3, traceback
            cache, strict = sys.argv[1], sys.argv[2] == "strict"
            @persist.memoize(cache_dir=cache, name="ro", strict=strict)
            def f(x):
                if x < 0:
                    raise ValueError("negative")
                return x
            if sys.argv[3] == "fill":
                f(1)
                sys.exit()
            os.chmod(cache, 0o555)
            if os.getuid() == 0:
                os.setgid(65534); os.setuid(65534)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                print(f(1))
                for x in (-1, -2):
                    try:
                        f(x)
                    except ValueError as exc:
                        print(exc)
            print(len(caught), [str(w.message)[:25] for w in caught])
        """
        script = self.path / "ro.py"
        script.write_text(textwrap.dedent(code))
        self.assertEqual(run_command([str(script), str(cache), "lenient", "fill"]).returncode, 0)
        done = run_command([str(script), str(cache), "lenient", "use"])
        self.assertEqual(done.stdout, "1\nnegative\nnegative\n1 ['ro() could not record a f']\n",
                         done.stderr)
        done = run_command([str(script), str(cache), "strict", "use"])
        self.assertEqual(done.stdout, "1\nnegative\nnegative\n0 []\n", done.stderr)

    def test_sigkill_mid_call_leaves_no_failure_record(self):
        child = start_python(self, """
            import sys, persist
            @persist.memoize(cache_dir=%r, name="killed")
            def f(x):
                if x == 2:
                    print("inside", flush=True)
                    sys.stdin.readline()
                    raise ValueError("never reached")
                return x
            f(1)
            f(2)
        """ % self.dir)
        self.assertEqual(child.stdout.readline(), "inside\n")
        stop(child)

        @persist.memoize(cache_dir=self.dir, name="killed")
        def f(x):
            return x

        self.assertEqual(f.failures(), [])
        self.assertEqual(f.cache_info().entries, 1)


class TestMap(MemoTest):
    def test_every_item_tried_and_failures_raised_together(self):
        f = self.memo(parse)
        items = ["1", "?2", "3", "?4", "5", "?6", "?7"]
        with self.assertRaises(persist.Failures) as caught:
            persist.map(f, items, progress=False)
        error = caught.exception
        self.assertIsInstance(error, Exception)
        self.assertEqual([item for item, exc in error.failures], ["?2", "?4", "?6", "?7"])
        self.assertTrue(all(isinstance(exc, Malformed) for _, exc in error.failures))
        self.assertEqual(error.results[::2], [1, 3, 5, error.failures[3][1]])
        self.assertIs(error.results[1], error.failures[0][1])
        message = str(error)
        self.assertIn("4 of 7 items failed: test_persist.Malformed x4 ('?2', '?4', '?6', ...)",
                      message)
        self.assertIn("parse.failures()", message)
        self.assertIn("python -m persist failures ", message)
        self.assertEqual(len(f.failures()), 4)

    @unittest.skipUnless(POSIX, "the command given is for a POSIX shell")
    def test_failures_command_given_works_when_pasted(self):
        # It said 'python persist.py failures PATH': no such file where persist is installed
        # with pip or the shell is elsewhere, and the path unquoted ("it's my data").
        where = self.path / "it's my  data"
        f = self.memo(parse, cache_dir=where)
        with self.assertRaises(persist.Failures) as caught:
            persist.map(f, ["1", "?2"], progress=False)
        command = str(caught.exception).rpartition("or run: ")[2]
        self.assertTrue(command.startswith("python "), command)
        elsewhere = self.path / "elsewhere"
        elsewhere.mkdir()
        done = subprocess.run(["sh", "-c", shlex.quote(sys.executable) + command[6:]],
                              cwd=str(elsewhere), env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("1 failed call", done.stdout)
        self.assertIn("'?2'", done.stdout)

    def test_result_too_deep_to_store_is_returned_not_failed(self):
        # The RecursionError of pickling made the item fail, its result lost.
        f = self.memo(lambda n: nested(n), name="deep")
        with self.assertWarnsRegex(persist.PersistWarning, "cannot be pickled"):
            results = persist.map(f, [100000, 2], progress=False)
        self.assertEqual([depth_of(result) for result in results], [100000, 2])
        self.assertEqual((f.failures(), f.cache_info().entries), ([], 1))

    def test_a_rerun_computes_only_what_failed(self):
        broken = {"?2", "?4"}

        def g(text):
            if text in broken:
                raise ValueError(text)
            return text.lstrip("?")

        f = self.memo(g)
        items = ["1", "?2", "3", "?4"]
        with self.assertRaises(persist.Failures):
            persist.map(f, items, progress=False)
        broken.clear()
        f.calls.clear()
        with self.assertLogs("persist", "INFO") as logs:
            self.assertEqual(persist.map(f, items, progress=False), ["1", "2", "3", "4"])
        self.assertEqual(f.calls, [(("?2",), {}), (("?4",), {})])
        self.assertEqual(f.failures(), [])
        self.assertRegex(logs.output[-1], r"^INFO:persist:g: 4 items: 2 reused, 2 computed, "
                                          r"0 failed in \d+\.\ds$")

    def test_summary_line(self):
        def g(x):
            if x % 4 == 1:
                raise ValueError(x)
            if x == 2:
                raise KeyError(x)
            return x

        f = self.memo(g)
        f(0)
        with self.assertLogs("persist", "INFO") as logs, self.assertRaises(persist.Failures):
            persist.map(f, range(10), progress=False)
        self.assertRegex(logs.output[-1], r"^INFO:persist:g: 10 items: 1 reused, 5 computed, "
                                          r"4 failed \(ValueError x3, KeyError x1\) in "
                                          r"\d+\.\ds; see g.failures\(\)$")
        with self.assertLogs("persist", "INFO") as logs, self.assertRaises(persist.Failures):
            persist.map(g, range(3), progress=False)             # not memoized
        self.assertRegex(logs.output[-1], r"g: 3 items: 1 computed, 2 failed \(ValueError x1, "
                                          r"KeyError x1\) in \d+\.\ds; see the .failures")

    def test_keep_going_false_stops_at_the_first_failure(self):
        f = self.memo(parse)
        with self.assertRaises(Malformed) as caught:
            persist.map(f, ["1", "?2", "3"], keep_going=False, progress=False)
        self.assertEqual(str(caught.exception), "malformed: '?2'")
        self.assertEqual(f.calls, [(("1",), {}), (("?2",), {})])

    def test_a_plain_function_a_partial_and_a_thread_pool(self):
        self.assertEqual(persist.map(int, ["1", "2"], progress=False), [1, 2])
        self.assertEqual(persist.map(str.upper, [], progress=False), [])
        f = self.memo(lambda text, base=10: int(text, base))
        self.assertEqual(f("10", base=2), 2)
        with self.assertLogs("persist", "INFO") as logs:
            self.assertEqual(persist.map(functools.partial(f, base=2), ["10", "11"],
                                         progress=False), [2, 3])
        self.assertIn("1 reused, 1 computed", logs.output[-1])
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            with self.assertRaises(persist.Failures) as caught:
                persist.map(f, ["7", "x", "9"] * 5, executor=pool, progress=False)
        self.assertEqual(caught.exception.results[:3], [7, caught.exception.failures[0][1], 9])
        self.assertEqual([item for item, _ in caught.exception.failures], ["x"] * 5)

    def test_failures_in_input_order_when_workers_finish_out_of_order(self):
        # "?a" fails only once map has counted the failure of "?b", which was given after it
        counted = threading.Event()

        class Bar:
            def __init__(self, **_):
                self.n = 0

            def update(self, n):
                self.n += n
                if self.n:
                    counted.set()

            def close(self):
                pass

        def g(text):
            if text == "?a" and not counted.wait(CHILD_TIMEOUT):
                return "never counted"
            return parse(text)

        f = self.memo(g, name="g")   # the Event is not part of its key
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with self.assertRaises(persist.Failures) as caught:
                persist.map(f, ["?a", "?b", "3"], executor=pool, progress=Bar)
        error = caught.exception
        self.assertEqual([item for item, _ in error.failures], ["?a", "?b"])
        self.assertEqual([str(exc) for _, exc in error.failures],
                         ["malformed: '?a'", "malformed: '?b'"])
        self.assertIs(error.results[0], error.failures[0][1])
        self.assertIn("Malformed x2 ('?a', '?b')", str(error))
        # the ledger, though, lists them as they happened: the latest failure last
        self.assertEqual([failure.args for failure in f.failures()], ["('?b')", "('?a')"])

    def test_a_thread_pool_whose_initializer_failed_is_not_said_to_have_lost_a_process(self):
        def initializer():
            raise OSError("no GPU here")

        # (the pool logs the initializer's traceback: caught here, not printed)
        with self.assertLogs("concurrent.futures", "CRITICAL"), \
                concurrent.futures.ThreadPoolExecutor(2, initializer=initializer) as pool:
            with self.assertRaises(RuntimeError) as caught:
                persist.map(parse, ["1", "2"], executor=pool, progress=False)
        message = str(caught.exception)
        self.assertNotIn("process died", message)
        self.assertIn("the executor broke (BrokenThreadPool: A thread initializer failed",
                      message)
        self.assertIn("run again", message)

    def test_bad_arguments(self):
        for kwargs in ({"workers": 0}, {"workers": 1.5}, {"workers": True},
                       {"workers": 2, "executor": object()}):
            with self.assertRaises(ValueError):
                persist.map(int, [], **kwargs)
        with self.assertRaises(TypeError):
            persist.map(None, [])
        with self.assertRaises(TypeError):
            persist.map(int, [], progress="yes")
        with self.assertRaisesRegex(TypeError, "cannot be pickled .*define it at the top"):
            persist.map(lambda x: x, [1], workers=2)

        @persist.memoize(cache_dir=self.dir)
        async def later(x):
            return x

        with self.assertRaisesRegex(TypeError, "async def"):
            persist.map(later, [1])

    def test_interrupts_stop_the_run(self):
        seen = []

        def g(x):
            seen.append(x)
            if x == 1:
                raise SystemExit(2)
            return x

        with self.assertRaises(SystemExit):
            persist.map(self.memo(g), [0, 1, 2], progress=False)
        self.assertEqual(seen, [0, 1])

    def test_progress_line_and_factory(self):
        class Bar:
            made = []

            def __init__(self, total, desc, unit):
                self.made.append(self)
                self.args, self.count, self.postfix, self.closed = (total, desc, unit), 0, [], 0

            def update(self, n):
                self.count += n

            def set_postfix_str(self, text):
                self.postfix.append(text)

            def close(self):
                self.closed += 1

        f = self.memo(parse)
        with self.assertRaises(persist.Failures):
            persist.map(f, ["1", "?2", "3"], progress=Bar)
        bar, = Bar.made
        self.assertEqual((bar.args, bar.count, bar.closed), ((3, "parse", "item"), 3, 1))
        self.assertEqual(bar.postfix[0], "0 reused, 1 computed, 0 failed")
        # the bar ends on the run's final counts, however long ago it was last updated
        self.assertEqual(bar.postfix[-1], "0 reused, 2 computed, 1 failed")
        with mock.patch.object(persist, "_PROGRESS_EVERY", 3600.0):
            with self.assertRaises(persist.Failures):
                persist.map(f, ["1", "?2", "3", "4"], progress=Bar)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                persist.map(f, ["1", "3", "4"], executor=pool, progress=Bar)
        self.assertEqual([(b.count, b.postfix[-1], b.closed) for b in Bar.made[1:]],
                         [(4, "2 reused, 1 computed, 1 failed", 1),
                          (3, "3 reused, 0 computed, 0 failed", 1)])
        for progress, shown in ((True, True), (None, False), (False, False)):
            err = io.StringIO()                     # not a terminal
            with contextlib.redirect_stderr(err):
                persist.map(f, ["1", "3"], progress=progress)
            text = err.getvalue()
            self.assertEqual("\rparse: 1/2 items: 1 reused, 0 computed, 0 failed, " in text,
                             shown, text)
            self.assertEqual(text.endswith("parse: 2 items: 2 reused, 0 computed, 0 failed in "
                                           "0.0s\n"), shown, text)


def echo(item):
    return item


# Items of several types, two of them given twice; frozenset's iteration order, and so its
# repr, changes with the hash seed, where its key does not.
SHARD_ITEMS = (["a", "b", "a", 7, (1, "x"), frozenset({"p", "q", "r"}), None, 2.5, b"raw"]
               + ["r%d" % i for i in range(40)] + ["b"])


def assert_partition(test, items, shares):
    """Each item (with its duplicates) in exactly one share, each share the items it holds in
    input order: together, every position of items exactly once. Returns {item: its share}."""
    owner = {}
    for index, share in enumerate(shares):
        for item in share:
            test.assertEqual(owner.setdefault(item, index), index, item)
    test.assertEqual(set(owner), set(items))
    for index, share in enumerate(shares):
        test.assertEqual(share, [item for item in items if owner[item] == index])
    return owner


class TestMapShards(MemoTest):
    """persist.map(shard=(index, count)): one task's share of a job array's items."""

    def shares(self, func, items, count, **options):
        return [persist.map(func, items, shard=(index, count), progress=False, **options)
                for index in range(count)]

    def assertPartition(self, items, shares):
        return assert_partition(self, items, shares)

    def test_shares_are_disjoint_and_cover_every_item_once(self):
        for count in (1, 2, 3, 7):
            with self.subTest(count=count):
                shares = self.shares(echo, SHARD_ITEMS, count)
                owner = self.assertPartition(SHARD_ITEMS, shares)
                self.assertEqual(len(set(owner.values())), count)    # none left empty
                # by key, not by position: the items in another order, the same owners
                again = self.shares(echo, SHARD_ITEMS[::-1], count)
                self.assertEqual(again, [[item for item in SHARD_ITEMS[::-1]
                                          if owner[item] == index] for index in range(count)])
        self.assertEqual(self.shares(echo, SHARD_ITEMS, 1), [SHARD_ITEMS])
        self.assertEqual(self.shares(echo, [], 3), [[], [], []])

    def test_a_memoized_share_computes_and_looks_up_its_own_items_alone(self):
        f = self.memo(echo)
        for count in (2, 5):
            f.cache_clear()
            looked_up = 0
            shares = []
            for index in range(count):
                f.calls.clear()
                shares.append(persist.map(f, SHARD_ITEMS, shard=(index, count),
                                          progress=False))
                computed = [args[0] for args, _ in f.calls]
                # each item of the share once (its duplicate a hit), no other
                self.assertEqual(computed, list(collections.OrderedDict.fromkeys(shares[-1])))
                info = f.cache_info()
                looked_up += len(shares[-1])
                self.assertEqual(info.hits + info.misses, looked_up)
            self.assertPartition(SHARD_ITEMS, shares)

    def test_a_memoized_func_shards_by_its_cache_key(self):
        # The same call, the same task: "A" and "a" are one call to a cache keyed by
        # lower(), and each item is keyed once, to find its task, and not again to run it.
        keyed = []

        def key(text):
            keyed.append(text)
            return text.lower()

        f = self.memo(lambda text: text.upper(), key=key, name="upper")
        items = list("AaBbCcDdEeFfGgHhIiJj")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for options in ({}, {"executor": pool}):
                with self.subTest(options=options):
                    f.cache_clear()
                    f.calls.clear()
                    shares = []
                    for index in range(4):
                        del keyed[:]
                        shares.append(persist.map(f, items, shard=(index, 4), progress=False,
                                                  **options))
                        self.assertEqual(len(keyed), len(items))
                    owners = [{text.lower() for text in share} for share in shares]
                    self.assertEqual(sum(map(len, owners)), 10)        # none in two shares
                    self.assertEqual(sorted(len(share) for share in shares),
                                     sorted(2 * len(owned) for owned in owners))
                    self.assertEqual(len(f.calls), 10)           # "A" computes, "a" reuses

    def test_failures_summary_and_progress_count_the_share(self):
        f = self.memo(parse)
        items = ["1", "?2", "3", "?4", "5", "?6", "7", "8", "?9", "10"]
        shares = []
        for index in range(3):
            with self.subTest(index=index), self.assertLogs("persist", "INFO") as logs:
                try:
                    results = persist.map(f, items, shard=(index, 3), progress=False)
                    failures = []
                except persist.Failures as caught:
                    results, failures, message = caught.results, caught.failures, str(caught)
                item_of = {id(exc): item for item, exc in failures}
                share = [str(result) if isinstance(result, int) else item_of[id(result)]
                         for result in results]
                shares.append(share)
                failed = [item for item in share if item.startswith("?")]
                self.assertEqual([item for item, _ in failures], failed)
                if failed:
                    self.assertIn("%d of %d items (this shard's, of 10) failed" % (
                        len(failed), len(share)), message)
                    self.assertIn("every other item of the shard was tried", message)
            self.assertRegex(logs.output[-1], r"^INFO:persist:parse, shard=\(%d, 3\): %d items? "
                                              r"\(this shard's, of 10\): 0 reused, %d computed, "
                                              r"%d failed" % (index, len(share),
                                                              len(share) - len(failed),
                                                              len(failed)))
        self.assertPartition(items, shares)
        self.assertTrue(all(shares))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(persist.map(f, ["1", "3"] * 3, shard=(0, 1), progress=True),
                             [1, 3] * 3)
        self.assertIn("\rparse, shard=(0, 1): 1/6 items: 1 reused, 0 computed, 0 failed, ",
                      err.getvalue())
        self.assertIn("parse, shard=(0, 1): 6 items (this shard's, of 6): 6 reused, 0 computed, "
                      "0 failed in ", err.getvalue())

        class Bar:
            made = []

            def __init__(self, **options):
                self.made.append(options)

            def update(self, n):
                pass

            def close(self):
                pass

        persist.map(f, ["1"] * 4, shard=(0, 1), progress=Bar)
        self.assertEqual(Bar.made, [{"total": 4, "desc": "parse, shard=(0, 1)", "unit": "item"}])

    def test_a_full_map_reuses_every_share_and_raises_what_failed_in_any(self):
        broken = {"?2", "?6", "?9"}

        def g(text):
            if text in broken:
                raise ValueError(text)
            return text.lstrip("?")

        f = self.memo(g)
        items = ["1", "?2", "3", "?4", "5", "?6", "7", "8", "?9", "10", "1"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for index, options in enumerate(({}, {"executor": pool}, {})):
                try:
                    persist.map(f, items, shard=(index, 3), progress=False, **options)
                except persist.Failures:
                    pass
        self.assertEqual(sorted(args[0] for args, _ in f.calls), sorted(set(items)))
        f.calls.clear()
        with self.assertLogs("persist", "INFO") as logs, \
                self.assertRaises(persist.Failures) as caught:
            persist.map(f, items, progress=False)
        # what failed is tried again (and fails again); nothing else runs
        self.assertEqual([args[0] for args, _ in f.calls], ["?2", "?6", "?9"])
        self.assertEqual([item for item, _ in caught.exception.failures], ["?2", "?6", "?9"])
        self.assertRegex(logs.output[-1], r"^INFO:persist:g: 11 items: 8 reused, 0 computed, "
                                          r"3 failed \(ValueError x3\)")

    def test_a_share_of_one_item_says_one_item(self):
        # the summary said "1 items (this shard's, of 5)"
        shares = self.shares(echo, ["a", "b", "c", "d", "e"], 5)
        index = [len(share) for share in shares].index(1)
        with self.assertLogs("persist", "INFO") as logs:
            persist.map(echo, ["a", "b", "c", "d", "e"], shard=(index, 5), progress=False)
        self.assertRegex(logs.output[-1], r": 1 item \(this shard's, of 5\): ")

    def test_keep_going_false_stops_at_the_shares_first_failure(self):
        items = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"]
        bad = []

        def g(text):
            if text in bad:
                raise Malformed(text)
            return int(text)

        f = self.memo(g, name="g")        # its keys, and so its shares, whatever bad holds
        share = [str(result) for result in persist.map(f, items, shard=(0, 2),
                                                       progress=False)]
        self.assertGreaterEqual(len(share), 3)
        bad.append(share[1])              # the share's second item fails: its third never runs
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for options in ({}, {"executor": pool}):
                with self.subTest(options=options):
                    f.cache_clear()
                    f.calls.clear()
                    with self.assertRaises(Malformed):
                        persist.map(f, items, shard=(0, 2), keep_going=False, progress=False,
                                    **options)
                    self.assertEqual([args[0] for args, _ in f.calls], share[:2])

    def test_bad_shards_are_refused_before_anything_runs(self):
        f = self.memo(parse)
        taken = []

        def items():
            taken.append(True)
            yield "1"

        cases = [
            ((0,), TypeError, r"takes \(index, count\).*SLURM_ARRAY_TASK_ID.*; not \(0,\)$"),
            (3, TypeError, r"; not 3$"),
            ((0, 1, 2), TypeError, r"; not \(0, 1, 2\)$"),
            (("1", 4), TypeError, r"its index is '1', not an int \(an environment variable is "
                                  r"a str: int\(\) it\)"),
            ((True, 4), TypeError, r"its index is True, not an int"),
            ((0, 2.0), TypeError, r"its count is 2.0, not an int"),
            ((0, 0), ValueError, r"its count is 0: a job array has 1 task or more"),
            ((4, 4), ValueError, r"its index is 4, outside 0 to 3\. A job array's task ids may "
                                 r"start at 1 .*subtract the first id "
                                 r"\(SLURM_ARRAY_TASK_MIN, SGE_TASK_FIRST\)"),
            ((-1, 4), ValueError, r"its index is -1, outside 0 to 3"),
        ]
        for shard, error, message in cases:
            with self.subTest(shard=shard):
                with self.assertRaisesRegex(error, message):
                    persist.map(f, items(), shard=shard)
        self.assertEqual((taken, f.calls), ([], []))
        self.assertEqual(persist.map(f, ["1"], shard=[0, 1], progress=False), [1])

    def test_any_integer_type_is_an_index(self):
        # for i in np.arange(count): numpy's integers are no int, but integers all the same
        # (__index__, as range() and a list's [] take them); one that is out of range, still
        # refused as an int would be
        class Integer:          # as numpy.int64 is: not an int subclass
            def __init__(self, value):
                self.value = value

            def __index__(self):
                return self.value

            def __repr__(self):
                return "Integer(%d)" % self.value

        shares = [persist.map(echo, SHARD_ITEMS, shard=(Integer(index), Integer(3)),
                              progress=False) for index in range(3)]
        self.assertEqual(shares, self.shares(echo, SHARD_ITEMS, 3))
        with self.assertRaisesRegex(ValueError, r"its index is 3, outside 0 to 2"):
            persist.map(echo, SHARD_ITEMS, shard=(Integer(3), 3))

    def test_an_item_that_cannot_be_keyed_is_refused_before_anything_runs(self):
        ran = []

        def g(item):
            ran.append(item)
            return item

        lock = threading.Lock()
        with self.assertRaisesRegex(TypeError, r"gives each item to a task by its key, and "
                                               r"item 2, <unlocked _thread.lock object>, cannot "
                                               r"be keyed \(TypeError: .*\): map over items "):
            persist.map(g, ["a", "b", lock, "c"], shard=(0, 2), progress=False)
        self.assertEqual(ran, [])
        f = self.memo(g)
        with self.assertRaisesRegex(TypeError, r"by the cache key of its call, and item 1, "
                                               r"<unlocked _thread.lock object>, makes a call "
                                               r"that has none \(TypeError: .*argument 'item' "
                                               r"cannot be part of a cache key"):
            persist.map(f, ["a", lock], shard=(1, 2), progress=False)
        # a call that does not bind: parse("1", "2")
        with self.assertRaisesRegex(TypeError, r"item 0, '2', makes a call that has none "
                                               r"\(TypeError: .*"):
            persist.map(functools.partial(self.memo(parse), "1"), ["2"], shard=(0, 1),
                        progress=False)
        self.assertEqual((ran, f.calls), ([], []))
        self.assertEqual(persist.map(g, ["a", lock], progress=False), ["a", lock])  # unsharded


SHARDS_IN_A_CHILD = """
    import json, os, sys, persist

    @persist.memoize(cache_dir=os.environ["CACHE"])
    def same(item):
        return item

    items = %r
    print(json.dumps([[items.index(item) for item in persist.map(func, items, shard=(index, 3),
                                                                 progress=False)]
                      for func in (lambda item: item, same) for index in range(3)]))
"""


class TestMapShardsAcrossProcesses(TempDirTest):
    def test_two_hash_seeds_give_the_same_shares(self):
        items = ["s%d" % i for i in range(30)] + [frozenset({"x", "y", "z"}), ("t", 1), 3]
        code = SHARDS_IN_A_CHILD % (items,)
        seen = [json.loads(run_python(code, PYTHONHASHSEED=seed, CACHE=self.path / "cache"))
                for seed in (1, 2)]
        self.assertEqual(seen[0], seen[1])
        self.assertEqual(sorted(len(share) > 0 for share in seen[0]), [True] * 6)
        # and this process, whose seed is a third, gives a plain func the same shares
        self.assertEqual(seen[0][:3], [[items.index(item) for item in share] for share in
                                       [persist.map(echo, items, shard=(index, 3),
                                                    progress=False) for index in range(3)]])


JOB_ARRAY_SCRIPT = """
import concurrent.futures, json, os, sys
import persist

@persist.memoize(cache_dir=os.environ["CACHE"])
def work(x):
    # one file per process (the workers' too): each call, to count them
    with open(os.path.join(os.environ["CALLS"], str(os.getpid())), "a") as calls:
        calls.write("%d\\n" % x)
    if x % 9 == 4:
        raise ValueError(x)
    return x * 10

if __name__ == "__main__":
    items = list(range(60)) + [5, 17, 5]
    mode = sys.argv[1]
    options = {"progress": mode == "all"}
    if mode != "all":
        options["shard"] = (int(sys.argv[2]), int(sys.argv[3]))
    if mode in ("workers", "stop"):
        options["workers"] = 2
    if mode == "stop":
        options["keep_going"] = False
    try:
        if mode == "threads":
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                results = persist.map(work, items, executor=pool, **options)
        else:
            results = persist.map(work, items, **options)
        failed = []
    except persist.Failures as exc:
        results, failed = exc.results, [item for item, _ in exc.failures]
    except ValueError as exc:            # keep_going=False
        print(json.dumps(["stopped", exc.args[0]]))
        sys.exit()
    # the share's items, in order: from each result, or from the failure's ValueError(x)
    print(json.dumps([[r // 10 if isinstance(r, int) else r.args[0] for r in results],
                      failed]))
"""


@slow
class TestMapJobArray(TempDirTest):
    def test_tasks_share_a_cache_and_a_full_map_reuses_them(self):
        # Three tasks at once, as a job array runs them (serially, on workers=2, on threads),
        # one cache; then the whole map, in another process, as after the array.
        script = self.path / "job.py"
        script.write_text(JOB_ARRAY_SCRIPT)
        calls = self.path / "calls"
        calls.mkdir()
        env = child_env(CACHE=self.path / "cache", CALLS=calls)
        tasks = [spawn(self, [sys.executable, str(script), mode, str(index), "3"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=env)
                 for index, mode in enumerate(["serial", "workers", "threads"])]
        shares, failed = [], []
        for task in tasks:
            out, err = task.communicate(timeout=CHILD_TIMEOUT)
            self.assertEqual(task.returncode, 0, err)
            share, share_failed = json.loads(out)
            shares.append(share)
            failed += share_failed
        items = list(range(60)) + [5, 17, 5]
        owner = assert_partition(self, items, shares)
        self.assertEqual(len(set(owner.values())), 3)
        self.assertEqual(sorted(failed), [4, 13, 22, 31, 40, 49, 58])

        def called():
            found = collections.Counter()
            for name in os.listdir(str(calls)):
                found.update(int(x) for x in (calls / name).read_text().split())
                os.remove(str(calls / name))
            return found

        # each item computed once, by the task it belongs to (5 and 17 once, given twice)
        self.assertEqual(called(), collections.Counter(range(60)))
        done = run_command([str(script), "all"], CACHE=self.path / "cache", CALLS=calls)
        self.assertEqual(done.returncode, 0, done.stderr)
        results, failed_again = json.loads(done.stdout)
        self.assertEqual(results, items)
        self.assertEqual(failed_again, [4, 13, 22, 31, 40, 49, 58])
        # only what failed runs again
        self.assertEqual(called(), collections.Counter(failed_again))
        self.assertIn("work: 63 items: 56 reused, 0 computed, 7 failed (ValueError x7)",
                      done.stderr)
        # keep_going=False, on workers, in a new cache: the first failure of the share stops
        # it, and only items of the share ran
        done = run_command([str(script), "stop", "1", "3"], CACHE=self.path / "other",
                           CALLS=calls)
        self.assertEqual(done.returncode, 0, done.stderr)
        stopped, item = json.loads(done.stdout)
        self.assertEqual((stopped, owner[item], item % 9), ("stopped", 1, 4))
        ran = called()
        self.assertTrue(ran and all(owner[x] == 1 for x in ran), ran)


WORKERS_SCRIPT = """
import multiprocessing, os, sys, time
import persist

@persist.memoize(cache_dir=os.environ["CACHE"])
def parse(text):
    if text.startswith("?"):
        raise ValueError("malformed %r" % text)
    if text == "lock":
        import threading
        raise Unpicklable(threading.Lock())
    if text == "two":
        raise NeedsTwo(1, 2)
    if int(text) >= 100:
        # The second run's items wait for '?x' to have failed, which another worker runs
        # meanwhile, and whose record comes after it stops the others: one started before
        # may finish, no other may start. Else a loaded machine let the worker with these
        # items store a few of them before '?x' even ran.
        deadline = time.monotonic() + 120
        while not any("'?x'" in failure.args for failure in parse.failures()):
            if time.monotonic() > deadline:
                raise RuntimeError("'?x' did not fail within 120 s")
            time.sleep(0.01)
    return int(text), os.getpid()

class Unpicklable(Exception):
    pass

class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__("%s/%s" % (a, b))

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    items = [str(i) for i in range(40)] + ["?1", "?2", "lock", "two"]
    try:
        persist.map(parse, items, workers=2, progress=False)
    except persist.Failures as exc:
        pids = {result[1] for result in exc.results if isinstance(result, tuple)}
        print(os.getpid() in pids, 1 <= len(pids) <= 2)
        print(sorted("%s %s" % (item, type(error).__name__) for item, error in exc.failures))
        print(parse.cache_info().entries, len(parse.failures()))
        print("_WorkerError" not in str(exc), "Unpicklable x1" in str(exc))
    print(sum(parse(str(i))[0] for i in range(40)), parse.cache_info()[:2])
    try:
        persist.map(parse, ["1", "?x"] + [str(i) for i in range(100, 200)], workers=2,
                    keep_going=False, progress=False)
    except ValueError as exc:
        print(exc, parse.cache_info().entries <= 41)   # none starts after the failure
"""


# PyPy 7.3.11's ProcessPoolExecutor calls a method it renamed, whenever it may start workers
# on demand (every start method but fork): it cannot run a single call there.
SPAWN_POOL_BROKEN = not hasattr(concurrent.futures.ProcessPoolExecutor, "_adjust_process_count")


@slow
class TestMapWorkers(TempDirTest):
    @unittest.skipIf(SPAWN_POOL_BROKEN, "this Python's ProcessPoolExecutor fails under spawn")
    def test_workers_store_results_and_send_back_failures(self):
        script = self.path / "job.py"
        script.write_text(WORKERS_SCRIPT)
        # spawn: the method that re-imports the script; the Ctrl-C test runs the default
        for method in ["spawn"]:
            cache = self.path / method
            done = run_command([str(script), method], CACHE=cache)
            self.assertEqual(done.returncode, 0, done.stderr)
            lines = done.stdout.splitlines()
            self.assertEqual(lines[0], "False True")          # workers, not this process
            self.assertEqual(lines[1], "['?1 ValueError', '?2 ValueError', 'lock _WorkerError', "
                                       "'two _WorkerError']")
            self.assertEqual(lines[2], "40 4")                # the workers stored them all
            self.assertEqual(lines[3], "True True")   # named by the type they stand for
            # the workers' 44 misses count here too, then 40 hits here
            self.assertEqual(lines[4], "780 (40, 44)")
            self.assertEqual(lines[5], "malformed '?x' True")

    # After a failure with keep_going=False, what waits in persist.map's own pool is stopped by
    # the workers' shared Event, never cancel()ed: before 3.10 a ProcessPoolExecutor shut down
    # while its thread had not yet dropped a cancelled future hung for ever (CPython gh-94440),
    # 1 map in 150 or so on 3.8, 3.9 and PyPy 3.9. A thread switch every microsecond brings
    # the race on within a few dozen maps there (before the fix, six children of 300 maps each
    # all hung, after 6 to 179); each map still raises its failure and leaves no worker behind.
    @slow
    def test_stop_after_a_failure_never_hangs_the_pool(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import faulthandler, multiprocessing, sys
            import persist

            def work(x):
                if x == 3:
                    raise ValueError(x)
                return x

            if __name__ == "__main__":
                sys.setswitchinterval(1e-6)
                raised = 0
                for _ in range(300):
                    faulthandler.dump_traceback_later(60, exit=True)   # where a hang waits
                    try:
                        persist.map(work, range(12), workers=2, keep_going=False,
                                    progress=False)
                    except ValueError as exc:
                        raised += exc.args == (3,)
                    assert not multiprocessing.active_children(), "a worker left behind"
                print(raised)
        """))
        done = run_command([str(script)], timeout=CHILD_TIMEOUT)
        self.assertEqual((done.returncode, done.stdout), (0, "300\n"), done.stderr)

    # A script that calls persist.map(workers=) at its top level, not under
    # if __name__ == "__main__": under spawn each worker imports it again and dies as it starts.
    # No item is to blame: the run stops with an error that says what to change.
    @unittest.skipIf(SPAWN_POOL_BROKEN, "this Python's ProcessPoolExecutor fails under spawn")
    def test_clear_error_and_no_item_blamed(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import multiprocessing, persist
            multiprocessing.set_start_method("spawn", force=True)
            def work(x):
                return x * 2
            print(persist.map(work, range(10), workers=2, progress=False))
        """))
        done = run_command([str(script)], timeout=120)
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        # the workers' own tracebacks (and multiprocessing's warnings) come around it
        self.assertRegex(done.stderr, r"\nRuntimeError: persist.map: its worker processes died "
                                      r"as they started.*if __name__ == '__main__'")


class TestMapInterrupted(TempDirTest):
    @unittest.skipUnless(POSIX, "SIGINT to a child")
    def test_ctrl_c_stops_workers_and_keeps_what_finished(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, signal, sys, time
            import persist

            # Ctrl-C as in a terminal, even when the test runs where SIGINT is ignored (started
            # in the background by a shell): Python installs no handler then, and this child
            # would inherit the SIG_IGN.
            signal.signal(signal.SIGINT, signal.default_int_handler)

            @persist.memoize(cache_dir=os.environ["CACHE"], name="slow")
            def slow(x):
                if x >= 4:
                    os.write(1, b"started %d\\n" % os.getpid())   # one write: no interleaving
                    time.sleep(600)
                return x

            if __name__ == "__main__":
                try:
                    persist.map(slow, range(10), workers=2, progress=False)
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
                    raise
        """))
        child = spawn(self, [sys.executable, str(script)], env=child_env(CACHE=self.dir),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        workers = [int(child.stdout.readline().split()[1]) for _ in range(2)]
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=120)        # a bound on a hang, not a time to meet: a loaded
                                           # machine took over 10 s
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            for pid in workers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.fail("persist.map did not stop on Ctrl-C")
        self.assertEqual(child.stdout.read(), "interrupted\n")
        self.assertIn("KeyboardInterrupt", child.stderr.read())
        for pid in workers:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)
        self.assertAllHits("slow", range(4), lambda x: x)

        @persist.memoize(cache_dir=self.dir, name="slow")
        def slow(x):
            return x

        self.assertEqual((slow.failures(), slow.cache_info().entries), ([], 4))

    def test_ctrl_c_stores_the_results_that_came_back_before_it(self):
        # A batch had come back (its future done) but was not taken yet when Ctrl-C came:
        # its results were dropped. Here the engine runs each batch as it is submitted, and
        # item 1's is the Ctrl-C, while item 0's waits to be taken.
        @persist.memoize(cache_dir=self.dir)
        def work(x):
            if x == 1:
                raise KeyboardInterrupt
            return x
        with self.assertRaises(KeyboardInterrupt):
            persist.map(work, [0, 1], executor=InlineEngine(), progress=False)
        self.assertEqual(work.explain(0).reason, "hit")

    def test_ctrl_c_while_a_batch_is_loaded_or_stored_stores_the_rest_of_it(self):
        # The caller loads a batch's results one by one (each its own pickle), then stores
        # them: a Ctrl-C as one loads, or as one is pickled by the store, lost every result
        # of the batch after it, though they had arrived. Here it comes at item 10's.
        # (When the store is interrupted, item 10 may be stored too: the batch's
        # transaction is made again one result at a time.)
        for interrupts, may_miss in ((InterruptsItsLoad, set()), (InterruptsItsStore, {10})):
            engine = InlineEngine()

            @persist.memoize(cache_dir=self.path / interrupts.__name__)
            def work(x):
                return interrupts() if x == 10 else x
            interrupts.count = 0
            with self.assertRaises(KeyboardInterrupt):
                persist.map(work, range(200), executor=engine, progress=False)
            batch, = [batch for batch in engine.batches if 10 in batch]
            self.assertGreater(batch[-1], 10)     # (the batches are sized for 50 ms: ~50)
            self.assertLessEqual({x for x in batch if work.explain(x).reason != "hit"},
                                 may_miss)

    def test_ctrl_c_while_the_one_result_of_a_batch_is_stored_stores_it(self):
        # A batch of one is stored by put() alone, not in put_many()'s transaction: a
        # Ctrl-C as its result was pickled lost it, though it had arrived.
        @persist.memoize(cache_dir=self.dir)
        def work(x):
            return InterruptsItsStore()
        InterruptsItsStore.count = 0
        with self.assertRaises(KeyboardInterrupt):
            persist.map(work, [0], executor=InlineEngine(), progress=False)
        self.assertEqual((InterruptsItsStore.count, work.explain(0).reason), (3, "hit"))

    @unittest.skipUnless(POSIX, "SIGINT to a child")
    @unittest.skipUnless(hasattr(concurrent.futures.process, "_ExecutorManagerThread"),
                         "the pool's reader thread, to hold up (Python 3.9 and later)")
    def test_ctrl_c_stores_a_result_still_in_the_pool_pipe(self):
        # A worker had sent a result, but the pool's reader thread had not read it yet when
        # Ctrl-C came (a loaded machine): the run stopped the workers and dropped it. Here
        # the reader thread is held up at the third result, until the workers are gone.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, signal
            import concurrent.futures.process as process
            from multiprocessing.connection import wait
            import persist

            signal.signal(signal.SIGINT, signal.default_int_handler)   # (see above)
            reader = process._ExecutorManagerThread
            plain, seen = reader.process_result_item, []

            def held_up(self, item):
                seen.append(item)
                if len(seen) == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                    # until a worker has ended (a bound on a hang, not a time to meet)
                    wait([p.sentinel for p in list(self.processes.values())], timeout=60)
                return plain(self, item)
            reader.process_result_item = held_up

            @persist.memoize(cache_dir=os.environ["CACHE"], name="quick")
            def quick(x):
                return x

            if __name__ == "__main__":
                try:
                    persist.map(quick, range(4), workers=2, progress=False)
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
        """))
        done = run_command([str(script)], timeout=120, CACHE=self.dir)
        self.assertEqual(done.stdout, "interrupted\n", done.stderr)

        @persist.memoize(cache_dir=self.dir, name="quick")
        def quick(x):
            return x
        self.assertGreaterEqual(quick.cache_info().entries, 3)

    def test_ctrl_c_as_a_batch_is_submitted_stores_its_result(self):
        # A Ctrl-C inside the engine's submit(), once it had the batch but before it
        # returned the batch's future, left persist.map without that future: the result,
        # which a worker sent meanwhile (a loaded machine), was lost. Here the engine runs
        # the second batch, and the Ctrl-C comes (as a signal would) as submit() returns.
        import _thread

        class InterruptedAsItSubmits(InlineEngine):
            def submit(self, fn, *args):
                future = super().submit(fn, *args)
                if len(self.batches) == 2:
                    _thread.interrupt_main()
                return future

        @persist.memoize(cache_dir=self.dir)
        def work(x):
            return x
        engine = InterruptedAsItSubmits()
        with self.assertRaises(KeyboardInterrupt):
            persist.map(work, range(4), executor=engine, progress=False)
        self.assertEqual(engine.batches[:2], [[0], [1]])
        self.assertEqual([work.explain(x).reason for x in (0, 1)], ["hit", "hit"])

    @unittest.skipUnless(POSIX, "SIGINT to a child")
    def test_ctrl_c_while_a_worker_sends_a_result_stops(self):
        # A worker stopped halfway through sending a result (a large one, Ctrl-C meanwhile)
        # left the pool's reader thread waiting for the rest of the message for ever, and
        # persist.map waited for that thread: it never returned. Here the worker writes
        # the start of a message into its result pipe (the multiprocessing.SimpleQueue it
        # was given), says so, and waits.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import gc, multiprocessing.queues, os, signal, struct, time
            import persist

            signal.signal(signal.SIGINT, signal.default_int_handler)   # (see above)

            def half_sent(x):
                queue, = [obj for obj in gc.get_objects()
                          if type(obj) is multiprocessing.queues.SimpleQueue]
                os.write(queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"x" * 1000)
                os.write(1, b"sending %d\\n" % os.getpid())
                time.sleep(600)

            if __name__ == "__main__":
                try:
                    persist.map(half_sent, [1], workers=1, progress=False)
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
        """))
        child = spawn(self, [sys.executable, str(script)], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, universal_newlines=True)
        worker = int(child.stdout.readline().split()[1])
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=120)        # a bound on a hang, not a time to meet
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            with contextlib.suppress(OSError):
                os.kill(worker, signal.SIGKILL)
            self.fail("persist.map did not stop on Ctrl-C")
        self.assertEqual((child.stdout.read(), child.returncode), ("interrupted\n", 0),
                         child.stderr.read())

    def test_ctrl_c_with_an_executor_cancels_what_waits_and_keeps_what_arrived(self):
        # Ctrl-C comes once the first four results have arrived (the caller stored them).
        # Items of 10 ms go in batches of about 50 ms, four in flight on two threads: those
        # queued are cancelled, those running finish, and nothing more starts.
        import _thread
        started = []

        @persist.memoize(cache_dir=self.dir, name="slow")
        def slow(x):
            started.append(x)
            if x == 4:
                while slow.cache_info().entries < 4:
                    time.sleep(0.01)
                _thread.interrupt_main()
            time.sleep(0.01)
            return x
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with self.assertRaises(KeyboardInterrupt):
                persist.map(slow, range(200), executor=pool, progress=False)
        self.assertLess(len(started), 60)
        self.assertGreaterEqual(slow.cache_info().entries, 4)
        self.assertEqual([slow(x) for x in range(4)], [0, 1, 2, 3])
        self.assertEqual(slow.cache_info().hits, 4)

    @unittest.skipUnless(hasattr(os, "fork"), "the fork start method")
    def test_ctrl_c_while_the_pool_starts_its_workers_leaves_no_zombie(self):
        # Ctrl-C lands between the first worker's start and the second's: the pool has no
        # manager thread yet (it starts after its workers), so its shutdown() joins nothing,
        # and the worker already started must be reaped by persist.map itself
        out = run_python("""
            import multiprocessing, os, persist
            from unittest import mock
            multiprocessing.set_start_method("fork")   # no helper process of its own
            forks = []
            real_fork = os.fork
            def fork():
                forks.append(1)
                if len(forks) == 2:
                    raise KeyboardInterrupt           # as a Ctrl-C there would
                return real_fork()
            def work(x):
                return x
            if __name__ == "__main__":
                with mock.patch("os.fork", fork):
                    try:
                        persist.map(work, range(4), workers=2, progress=False)
                    except KeyboardInterrupt:
                        print("interrupted")
                try:
                    print("child left:", os.waitpid(-1, os.WNOHANG))  # a zombie, or running
                except ChildProcessError:
                    print("no child left")
        """, timeout=60)
        self.assertEqual(out, "interrupted\nno child left\n")


class TestMapResultFailsToLoad(TempDirTest):
    """A result that pickles in the worker but fails to load in the caller broke the pool as
    a dead worker does: every item then in flight ran again, and the item failed with
    BrokenProcessPool though it had computed. Now it is one that cannot travel: it runs
    again in the caller, its result is returned, and no other item runs twice."""

    def test_returned_from_this_process(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, sys, warnings, persist
            def refuse():
                raise ValueError("loads only in a worker")
            class Odd:
                def __reduce__(self):    # pickled in a worker: fails to load in the caller
                    return (refuse, ())
            def work(x):
                fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, b"%d\\n" % x)
                os.close(fd)
                return (os.getpid(), Odd() if x == 7 else x)
            if __name__ == "__main__":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    results = persist.map(work, range(20), workers=2, progress=False)
                here = [x for x, (pid, _) in enumerate(results) if pid == os.getpid()]
                print(here, type(results[7][1]).__name__,
                      [value for _, value in results[:7] + results[8:]] == [
                          x for x in range(20) if x != 7],
                      sum("could not travel" in str(w.message) for w in caught))
                with open(sys.argv[1]) as log:
                    calls = [int(line) for line in log]
                print(sorted(x for x in set(calls) if calls.count(x) > 1), sorted(set(calls)) ==
                      list(range(20)))
        """))
        done = run_command([str(script), str(self.path / "calls")], timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "[7] Odd True 1\n[7] True\n")


class TestMapWorkersSendBackPersistErrors(TempDirTest):
    def test_the_reason_crosses_from_the_worker(self):
        # a worker's exception comes back pickled: a PersistError with its reason, as raised
        script = self.path / "job.py"
        empty = self.path / "empty.db"
        empty.write_bytes(b"")
        script.write_text(textwrap.dedent("""
            import os, sys, persist
            def work(x):
                if x:
                    persist.open(sys.argv[1], "r")
                return os.getpid()
            if __name__ == "__main__":
                try:
                    persist.map(work, [0, 1], workers=2, progress=False)
                except persist.Failures as exc:
                    (item, error), = exc.failures
                    print(exc.results[0] != os.getpid(), item, type(error).__name__)
                    print(error.reason, error.errno, error.filename)
                    print(error)
        """))
        done = run_command([str(script), str(empty)], timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.splitlines(), [
            "True 1 PersistError", "empty %d %s" % (errno.EINVAL, empty),
            "%s: not a persist cache (an empty file); persist leaves it as it is: give persist "
            "another file name (cache_dir=, name= or the path you open)" % empty])


class TestMapSchedule(unittest.TestCase):
    """persist.map's scheduling on its own, without processes (persist._Schedule): which
    items go out in which batches, and what runs again after a worker died. Strings stand
    for the futures of the batches in flight; a fake clock for the time."""

    def schedule(self, count, width=2, keep_going=True):
        return persist._Schedule(count, width, keep_going, clock=lambda: 7.5)

    def send_all(self, schedule, prefix="t"):
        """Send every batch the schedule gives now, as _Run.send() does: {token: batch}."""
        sent = {}
        for _ in range(10000):               # a broken schedule fails here, never hangs
            batch = schedule.next()
            if batch is None:
                return sent
            token = "%s%d" % (prefix, len(sent))
            schedule.sent(token, batch)
            sent[token] = batch
        self.fail("next() gave batch after batch: %r" % (sent,))

    def test_batches_start_at_one_item_and_grow_when_items_are_quick(self):
        schedule = self.schedule(10000)
        sent = self.send_all(schedule)
        self.assertEqual(list(sent.values()), [[0], [1], [2], [3]])  # two a worker, at most
        self.assertIsNone(schedule.next())
        self.assertEqual(schedule.returned("t0"), [0])
        schedule.timed(1, 0.0001)            # 0.1 ms an item: 500 make _BATCH_SECONDS
        self.assertEqual(self.send_all(schedule, "u"), {"u0": list(range(4, 504))})
        schedule.returned("u0")
        schedule.timed(500, 0.00001)         # quicker still: the limit
        self.assertEqual(len(self.send_all(schedule, "v")["v0"]), persist._BATCH_LIMIT)

    def test_slow_items_go_one_to_a_batch(self):
        schedule = self.schedule(100)
        self.send_all(schedule)
        schedule.returned("t0")
        schedule.timed(1, 2.0)
        self.assertEqual(self.send_all(schedule, "u"), {"u0": [4]})

    def test_the_last_items_are_shared_among_the_workers(self):
        schedule = self.schedule(24, width=3)
        self.send_all(schedule)
        schedule.returned("t0")
        schedule.timed(1, 0.0001)       # 18 left, 2 batches a worker: 3 items each
        self.assertEqual(self.send_all(schedule, "u"), {"u0": [6, 7, 8]})

    def test_keep_going_false_keeps_one_batch_a_worker_in_flight(self):
        schedule = self.schedule(100, width=3, keep_going=False)
        self.assertEqual(len(self.send_all(schedule)), 3)

    def test_nothing_is_sent_past_the_last_item(self):
        schedule = self.schedule(3)
        self.assertEqual(list(self.send_all(schedule).values()), [[0], [1], [2]])
        for token in ("t0", "t1", "t2"):
            schedule.returned(token)
        self.assertIsNone(schedule.next())
        self.assertEqual((schedule.left, schedule.in_flight), (0, {}))

    def test_items_lost_with_a_worker_run_again_alone_one_at_a_time(self):
        schedule = self.schedule(100)
        self.send_all(schedule)
        schedule.returned("t1")               # [1] came back; then a worker died
        self.assertIsNone(schedule.worker_died(["t0"]))   # [2] and [3] were lost with it
        self.assertEqual(schedule.in_flight, {})
        for index in (0, 2, 3):
            self.assertEqual(self.send_all(schedule, "s%d-" % index),
                             {"s%d-0" % index: [index]})    # alone: nothing joins it
            schedule.returned("s%d-0" % index)
        self.assertEqual(len(self.send_all(schedule, "u")), 4)   # then new items again

    def test_a_suspect_waits_for_the_batches_in_flight(self):
        schedule = self.schedule(100)
        self.send_all(schedule)
        schedule.suspects.append([99])       # as worker_died() leaves one, here beside others
        for token in ("t0", "t1", "t2"):
            schedule.returned(token)
            self.assertIsNone(schedule.next())
        schedule.returned("t3")
        self.assertEqual(self.send_all(schedule, "s"), {"s0": [99]})

    def test_the_suspect_that_dies_alone_is_named_and_not_sent_again(self):
        schedule = self.schedule(4)
        self.send_all(schedule)
        schedule.worker_died(["t2"])
        suspects = [self.send_all(schedule, "s%d-" % i) for i in range(2)]
        self.assertEqual(suspects[0], {"s0-0": [0]})
        schedule.returned("s0-0")
        self.assertEqual(suspects[1], {})                # [1] is sent once [0] is back
        self.assertEqual(self.send_all(schedule, "s1-"), {"s1-0": [1]})
        self.assertEqual(schedule.worker_died(["s1-0"]), (1, 7.5))    # sent at 7.5
        self.assertEqual(list(self.send_all(schedule, "u").values()), [[2]])
        schedule.returned("u0")
        self.assertEqual(list(self.send_all(schedule, "v").values()), [[3]])
        schedule.returned("v0")
        self.assertIsNone(schedule.next())
        self.assertEqual(schedule.left, 0)

    def test_an_item_lost_on_its_first_try_is_only_a_suspect(self):
        # alone in flight, but not yet run again alone: another worker may have died
        schedule = self.schedule(1)
        self.assertEqual(self.send_all(schedule), {"t0": [0]})
        self.assertIsNone(schedule.worker_died(["t0"]))
        self.assertEqual(self.send_all(schedule, "s"), {"s0": [0]})
        self.assertEqual(schedule.worker_died(["s0"]), (0, 7.5))

    def test_many_lost_items_run_again_in_halves_then_one_at_a_time(self):
        limit = persist._SUSPECTS_HALVED
        schedule = self.schedule(4 * limit)
        schedule.size = 4 * limit
        self.assertEqual(self.send_all(schedule), {"t0": list(range(4 * limit))})
        self.assertIsNone(schedule.worker_died(["t0"]))
        self.assertEqual(self.send_all(schedule, "h"), {"h0": list(range(2 * limit))})
        self.assertIsNone(schedule.worker_died(["h0"]))       # 512 lost: halves again
        self.assertEqual(self.send_all(schedule, "q"), {"q0": list(range(limit))})
        self.assertIsNone(schedule.worker_died(["q0"]))       # 256: one at a time
        self.assertEqual(self.send_all(schedule, "s"), {"s0": [0]})
        schedule.returned("s0")
        self.assertEqual(self.send_all(schedule, "s"), {"s0": [1]})
        self.assertEqual(list(schedule.suspects)[-3:],         # then the other halves
                         [[limit - 1], list(range(limit, 2 * limit)),
                          list(range(2 * limit, 4 * limit))])
        self.assertEqual(len(schedule.suspects), limit)

    def test_a_batch_the_pool_refused_goes_first_into_the_next(self):
        schedule = self.schedule(100)
        self.send_all(schedule)
        schedule.returned("t0")
        schedule.timed(1, 0.001)                     # 50 an item
        batch = schedule.next()
        schedule.unsent(batch)
        self.assertEqual(schedule.left, 96)          # not sent: still to send
        self.assertEqual(self.send_all(schedule, "u"), {"u0": [4]})     # one at a time,
        schedule.returned("u0")
        self.assertEqual(self.send_all(schedule, "v"), {"v0": [5]})     # in their order

    def test_a_suspect_the_pool_refused_stays_the_next_suspect(self):
        schedule = self.schedule(100)
        self.send_all(schedule)
        schedule.worker_died(["t0"])
        batch = schedule.next()
        schedule.unsent(batch)
        self.assertIsNone(schedule.suspect)
        self.assertEqual(self.send_all(schedule, "s"), {"s0": [0]})
        self.assertEqual((schedule.suspect, schedule.suspect_sent), ([0], 7.5))

    def test_results_that_could_not_travel_go_again_one_to_a_batch(self):
        schedule = self.schedule(100)
        self.send_all(schedule)
        schedule.returned("t0")
        schedule.timed(1, 0.001)
        self.assertEqual(schedule.left, 96)
        schedule.one_by_one([0])
        self.assertEqual(schedule.left, 97)
        self.assertEqual(self.send_all(schedule, "u"), {"u0": [0]})

    def test_every_item_is_done_once_and_each_killer_found(self):
        """A whole run against a fake pool in which some items kill their worker, and with
        it every batch in flight: each other item comes back once, each killer is named
        once, and a suspect is never in flight beside anything else."""
        for seed, count, width, killers in [(1, 3000, 2, {1500, 1501, 2999}),
                                            (2, 40, 2, {3, 30}), (3, 600, 4, {0, 1, 2}),
                                            (4, 1, 1, {0}), (5, 2000, 3, set()),
                                            (6, 700, 1, set(range(100, 700, 7)))]:
            with self.subTest(seed=seed, count=count):
                self.check_run(random.Random(seed), count, width, killers)

    def check_run(self, rng, count, width, killers):
        schedule = self.schedule(count, width)
        tokens = iter(range(10 ** 9))
        done, named = [], []
        for _ in range(100000):          # a broken schedule fails here, never hangs
            for _ in range(count + 1):
                batch = schedule.next()
                if batch is None:
                    break
                schedule.sent(next(tokens), batch)
                if schedule.suspect is not None:
                    self.assertEqual(list(schedule.in_flight.values()), [batch])
            else:
                self.fail("next() gave more batches than there are items")
            if not schedule.in_flight:
                break
            flight = list(schedule.in_flight)
            finished = rng.sample(flight, rng.randint(1, len(flight)))
            lost = []
            for token in finished:
                batch = schedule.in_flight[token]
                if killers.intersection(batch):
                    lost.append(token)       # the pool broke: what is still out is lost
                    continue
                schedule.returned(token)
                done.extend(batch)
                schedule.timed(len(batch), len(batch) * rng.choice([1e-5, 1e-3, 0.1]))
            if lost:
                killer = schedule.worker_died(lost)
                if killer is not None:
                    named.append(killer[0])
        else:
            self.fail("the run did not end")
        self.assertEqual(sorted(done), sorted(set(range(count)) - killers))
        self.assertEqual(sorted(named), sorted(killers))
        self.assertEqual((schedule.left, schedule.in_flight), (0, {}))


@slow
class TestMapFuncModuleFailsInWorker(TempDirTest):
    """func's module imports in the caller but raises in a new process (a script that
    imports it only under if __name__ == "__main__":, under spawn): every worker dies as
    it loads func, so the run stops with an error that says so, rather than blaming each
    item in turn, a new pool for each."""

    @unittest.skipIf(SPAWN_POOL_BROKEN, "this Python's ProcessPoolExecutor fails under spawn")
    def test_clear_error_and_no_item_blamed(self):
        (self.path / "tasks.py").write_text(textwrap.dedent("""
            import os
            if os.environ.get("IN_WORKER"):
                raise ImportError("tasks needs the parent's setup")
            def work(x):
                return x * 2
        """))
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import multiprocessing, os, persist
            if __name__ == "__main__":
                import tasks
                os.environ["IN_WORKER"] = "1"        # the workers inherit it
                multiprocessing.set_start_method("spawn", force=True)
                try:
                    persist.map(tasks.work, range(6), workers=2, progress=False)
                except Exception as exc:
                    print(type(exc).__name__, "imports in a new process" in str(exc))
        """))
        done = run_command([str(script)], cwd=self.dir, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "RuntimeError True\n")


class TestMapWorkersCountTimeSaved(TempDirTest):
    """The hits of workers in other processes count in the caller's cache_info().saved, as
    its own hits do, and the results they could not store in its unstored."""

    @slow
    @unittest.skipIf(SPAWN_POOL_BROKEN, "this Python's ProcessPoolExecutor fails under spawn")
    def test_saved_with_workers_and_a_process_executor(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import concurrent.futures, sys, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                return sum(range(20000 + x))
            if __name__ == "__main__":
                for how in ("workers", "executor"):
                    work.cache_clear()
                    for run in range(2):
                        if how == "workers":
                            persist.map(work, range(12), workers=2, progress=False)
                        else:
                            with concurrent.futures.ProcessPoolExecutor(2) as pool:
                                persist.map(work, range(12), executor=pool, progress=False)
                    info = work.cache_info()
                    print(how, info.hits, info.misses, info.seconds > 0,
                          abs(info.saved - info.seconds) < 1e-6)
        """))
        done = run_command([str(script), self.dir], timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "workers 12 12 True True\nexecutor 12 12 True True\n")

    @unittest.skipIf(SPAWN_POOL_BROKEN, "this Python's ProcessPoolExecutor fails under spawn")
    def test_unstored_with_workers_and_a_process_executor(self):
        # The workers' results that their cache could not take (here it cannot be opened:
        # cache_dir is a file) counted as misses in the caller, but unstored stayed 0.
        script = self.path / "job.py"
        (self.path / "file").write_text("not a directory")
        script.write_text(textwrap.dedent("""
            import concurrent.futures, sys, warnings, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                return x * 2
            if __name__ == "__main__":
                warnings.simplefilter("ignore")
                results = persist.map(work, range(12), workers=2, progress=False)
                with concurrent.futures.ProcessPoolExecutor(2) as pool:
                    results += persist.map(work, range(3), executor=pool, progress=False)
                info = work.cache_info()
                print(sum(results), info.hits, info.misses, info.unstored)
        """))
        done = run_command([str(script), str(self.path / "file" / "cache")], timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "138 0 15 15\n")

    def test_an_executor_that_runs_here_counts_each_call_once(self):
        # An executor, not a ThreadPoolExecutor, whose calls run in this process (Dask's with
        # processes=False, a test double): its calls count in cache_info() where they run,
        # and they were counted again as a worker's: each hit and miss twice.
        out = run_python("""
            import concurrent.futures, sys, persist
            class Here(concurrent.futures.Executor):
                def submit(self, fn, *args, **kwargs):
                    future = concurrent.futures.Future()
                    future.set_result(fn(*args, **kwargs))
                    return future
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                if x == 3:
                    raise ValueError(x)
                return x * 2
            for run in range(2):
                try:
                    persist.map(work, range(6), executor=Here(), progress=False)
                except persist.Failures as exc:
                    print(len(exc.failures), end=" ")
            info = work.cache_info()
            print(info.hits, info.misses)
        """.replace("sys.argv[1]", repr(self.dir)))
        self.assertEqual(out, "1 1 5 7\n")

    @unittest.skipUnless(POSIX, "workers started by fork")
    def test_one_warning_for_a_cache_that_cannot_be_opened_not_one_per_worker(self):
        # Each worker warned that the cache cannot be opened (root over a project owned by
        # uid 1000: the Docker setup), once per worker: the one warning, N times.
        script = self.path / "job.py"
        (self.path / "file").write_text("not a directory")
        script.write_text(textwrap.dedent("""
            import multiprocessing, sys, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                return x * 2
            if __name__ == "__main__":
                multiprocessing.set_start_method("fork")
                print(sum(persist.map(work, range(12), workers=3, progress=False)),
                      work.cache_info().unstored)
        """))
        done = run_command([str(script), str(self.path / "file" / "cache")], timeout=300)
        self.assertEqual((done.returncode, done.stdout), (0, "132 12\n"), done.stderr)
        self.assertEqual(done.stderr.count("PersistWarning"), 1, done.stderr)
        self.assertIn("is running without its cache: cannot open", done.stderr)


class TestMapResultThatCannotTravel(TempDirTest):
    """A worker's result that pickle cannot send back (nested deeper than pickle goes, or of
    a type it refuses) failed its item, its result lost: the item runs again in the caller,
    where its result need not travel, and is returned, with one warning."""

    def test_an_item_an_engine_cannot_send_at_submit_runs_here(self):
        # An engine that pickles a batch when it is submitted (Dask, submitit) raised the
        # pickling error of one item out of persist.map, ending the run: now the item runs
        # here, as one whose result cannot travel, and the others go.
        calls = []

        def kind(x):
            calls.append(x)
            return type(x).__name__
        lock = threading.Lock()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = persist.map(kind, [1, lock, "2"], executor=InlineEngine(),
                                  progress=False)
        self.assertEqual(results, ["int", "lock", "str"])
        self.assertEqual(sorted(map(str, calls)), sorted(map(str, [1, lock, "2"])))
        self.assertEqual(len(caught), 1)
        self.assertIn("could not travel", str(caught[0].message))

    def test_an_engine_that_cannot_take_a_batch_says_so(self):
        # A func that cannot be pickled is named as such; any other error of submit() is
        # the engine's, raised as it was.
        class Closed:
            def submit(self, fn, *args):
                pickle.dumps(args)
                raise RuntimeError("cannot schedule new futures after shutdown")
        with self.assertRaisesRegex(RuntimeError, "after shutdown"):
            persist.map(str, [1, 2], executor=Closed(), progress=False)
        func = functools.partial(isinstance, threading.Lock())
        with self.assertRaisesRegex(TypeError, "sends func to other processes, and "
                                    "functools.partial"):
            persist.map(func, [int], executor=Closed(), progress=False)

    @slow
    def test_returned_from_this_process(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, sys, threading, warnings, persist
            def deep(n):
                value = []
                for _ in range(n):
                    value = [value]
                return (os.getpid(), value)
            def lock(n):
                return (os.getpid(), threading.Lock()) if n == 7 else (os.getpid(), n)
            @persist.memoize(cache_dir=sys.argv[1])
            def stored(n):
                return deep(n)
            def depth(value):
                n = 0
                while value:
                    value, n = value[0], n + 1
                return n
            if __name__ == "__main__":
                for func, items in ((deep, [3, 100000, 4]), (lock, [6, 7, 8]),
                                    (stored, [3, 100000, 4])):
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        results = persist.map(func, items, workers=2, progress=False)
                    here = [pid == os.getpid() for pid, _ in results]
                    print(func.__name__, here, [depth(value) if isinstance(value, list)
                                                else type(value).__name__
                                                for _, value in results],
                          sum("could not travel" in str(w.message) for w in caught))
                print(stored.cache_info().entries)
        """))
        done = run_command([str(script), str(self.path / "cache")], timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.splitlines(), [
            "deep [False, True, False] [3, 100000, 4] 1",
            "lock [False, True, False] ['int', 'lock', 'int'] 1",
            "stored [False, True, False] [3, 100000, 4] 1",
            "2"])

    def test_only_that_item_runs_again(self):
        # Quick items travel many to a batch: one result that could not travel failed the
        # whole batch, whose every item then ran again, one at a time
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, sys, threading, warnings, persist
            def work(x):
                fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, b"%d\\n" % x)
                os.close(fd)
                return threading.Lock() if x == 300 else x
            if __name__ == "__main__":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results = persist.map(work, range(400), workers=2, progress=False)
                print(type(results[300]).__name__, results[:300] + results[301:] == [
                    x for x in range(400) if x != 300])
                with open(sys.argv[1]) as log:
                    calls = [int(line) for line in log]
                print(sorted(x for x in set(calls) if calls.count(x) > 1), len(set(calls)))
        """))
        done = run_command([str(script), str(self.path / "calls")], timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0].split()[1], "True")     # (the lock's type name varies)
        self.assertEqual(lines[1], "[300] 400")


@unittest.skipUnless(POSIX, "SIGKILL")
class TestMapWorkerKilled(TempDirTest):
    """An item that kills its worker (a crash in C code, the out-of-memory killer): with
    workers=, persist.map replaces the pool, finds the item by running what was in flight
    again one at a time, records it as failed, and goes on past it."""

    def run_job(self, body):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import concurrent.futures, os, signal, sys, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                if x in (5, 77):
                    os.kill(os.getpid(), signal.SIGKILL)     # a crash in C, say
                if x == 9:
                    raise ValueError("bad record %d" % x)
                return x * 2
            if __name__ == "__main__":
        """) + textwrap.indent(textwrap.dedent(body), "    "))
        done = run_command([str(script), self.dir], timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    @slow
    def test_keeps_going_past_items_that_kill_their_worker(self):
        out = self.run_job("""
            for run in range(2):
                try:
                    persist.map(work, range(300), workers=2, progress=False)
                except persist.Failures as exc:
                    print([(item, type(error).__name__) for item, error in exc.failures])
                    print(sum(not isinstance(r, Exception) for r in exc.results))
                print(sorted(failure.args for failure in work.failures()),
                      work.cache_info().entries)
        """)
        first = ["[(5, 'BrokenProcessPool'), (9, 'ValueError'), (77, 'BrokenProcessPool')]",
                 "297", "['(5)', '(77)', '(9)'] 297"]
        self.assertEqual(out.splitlines(), first * 2)      # the rerun: only those three again

    @slow
    @unittest.skipUnless(os.path.isdir("/proc/self/task"), "Linux's /proc")
    def test_no_worker_outlives_the_run_not_even_as_a_zombie(self):
        # the pools whose worker died, and the last one: every worker ended and reaped
        out = self.run_job("""
            import multiprocessing
            multiprocessing.set_start_method("fork")   # no helper process of its own
            def children():                # this process's, running or zombies, from /proc
                found = []
                for pid in filter(str.isdigit, os.listdir("/proc")):
                    try:
                        with open("/proc/%s/stat" % pid) as file:
                            fields = file.read().rsplit(")", 1)[1].split()
                    except OSError:               # ended meanwhile
                        continue
                    if int(fields[1]) == os.getpid():
                        found.append((int(pid), fields[0]))
                return found
            for keep_going in (True, False):
                try:
                    persist.map(work, [1, 2, 5, 6], workers=2, keep_going=keep_going,
                                progress=False)
                except Exception as exc:
                    print(type(exc).__name__, children())
        """)
        self.assertEqual(out, "Failures []\nBrokenProcessPool []\n")

    def test_keep_going_false_raises_it(self):
        out = self.run_job("""
            try:
                persist.map(work, [1, 2, 3, 4, 5], workers=2, keep_going=False,
                            progress=False)
            except Exception as exc:
                print(type(exc).__name__, "died" in str(exc))
        """)
        self.assertEqual(out, "BrokenProcessPool True\n")

    def test_an_executor_not_persists_gets_a_clear_error(self):
        out = self.run_job("""
            with concurrent.futures.ProcessPoolExecutor(2) as pool:
                try:
                    persist.map(work, range(12), executor=pool, progress=False)
                except RuntimeError as exc:
                    print(exc)
            print(work.cache_info().entries > 0)
        """)
        self.assertIn("a worker process died", out)
        self.assertIn("run again", out)
        self.assertTrue(out.endswith("True\n"))

    # Quick items travel hundreds to a batch, so a dead worker takes thousands along: they
    # run again in halves while many (one at a time, each costs a round trip), and still
    # each killer, adjacent ones and the last item too, is found and nothing else fails.
    def test_each_killer_found_among_thousands(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, signal, persist
            def work(x):
                if x in (1500, 1501, 2999):
                    os.kill(os.getpid(), signal.SIGKILL)
                return x * 2
            if __name__ == "__main__":
                try:
                    persist.map(work, range(3000), workers=2, progress=False)
                except persist.Failures as exc:
                    print([(item, type(error).__name__) for item, error in exc.failures])
                    print(all(result == index * 2 for index, result in enumerate(exc.results)
                              if index not in (1500, 1501, 2999)))
        """))
        done = run_command([str(script)], timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.splitlines(), [
            "[(1500, 'BrokenProcessPool'), (1501, 'BrokenProcessPool'), "
            "(2999, 'BrokenProcessPool')]", "True"])


class TestMapCallerKilled(TempDirTest):
    @slow
    @unittest.skipUnless(os.path.isdir("/proc/self"), "a process's state in /proc")
    def test_workers_end_when_the_caller_is_killed(self):
        # kill -9 of the caller told its pool nothing: the workers waited for work on their
        # queue for ever (each holding the queue's other end open for the others), idle.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, sys, time, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                if x == 0:
                    os.write(1, b"%d\\n" % os.getpid())
                    time.sleep(600)
                return x
            if __name__ == "__main__":
                os.write(1, b"%d\\n" % os.getpid())
                persist.map(work, range(4), workers=2, progress=False)
        """))
        child = spawn(self, [sys.executable, str(script), self.dir], stdout=subprocess.PIPE)
        caller = int(child.stdout.readline())
        worker = int(child.stdout.readline())
        workers = [pid for pid in children_of(caller) if pid != caller]
        self.assertIn(worker, workers)
        os.kill(caller, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 120     # a bound on a hang, not a time to meet
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in workers if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        self.assertEqual(left, [])


def children_of(pid):
    """The processes whose parent is pid (Linux: /proc)."""
    found = []
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/%s/stat" % name) as stat:
                fields = stat.read().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


def alive(pid):
    """Whether pid runs (a zombie, which nobody reaped yet, does not)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@slow
@unittest.skipUnless(POSIX, "SIGKILL")
class TestMapWorkerKilledCacheInfo(TempDirTest):
    """An item that kills its worker is a call that ran and stored nothing: a miss in the
    caller's cache_info(), like an item that raises, so that hits and misses add up to the
    items."""

    def test_hits_and_misses_count_every_item(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, signal, sys, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                if x in (3, 30):
                    os.kill(os.getpid(), signal.SIGKILL)
                if x == 7:
                    raise ValueError(x)
                return x
            if __name__ == "__main__":
                for run in range(2):
                    try:
                        persist.map(work, range(40), workers=2, progress=False)
                    except persist.Failures as exc:
                        print(len(exc.failures), end=" ")
                    info = work.cache_info()
                    print(info.hits + info.misses)
        """))
        done = run_command([str(script), self.dir], timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "3 40\n3 80\n")


class TracedCommits(list):
    """TestMapOneCache.traced()'s: the results each COMMIT stored, and the calls of the one
    interrupted."""
    interrupted = None


class TestMapOneCache(TempDirTest):
    """persist.map over other processes (executor=, workers=) keeps one cache, the caller's:
    it looks each item up there first, sends only the misses, and stores each result and
    records each failure there as it arrives. The workers compute the function behind the
    wrapper: they need no access to the cache, and write nothing on their side."""

    @unittest.skipUnless(ROOT, "a worker of another user: root drops to nobody")
    @unittest.skipIf(SPAWN_POOL_BROKEN, "this Python's ProcessPoolExecutor fails under spawn")
    def test_workers_that_cannot_see_the_cache_leave_every_result_and_failure_in_it(self):
        # The workers are another user, in another directory, with PERSIST_DIR naming a
        # cache of their own: the caller's cache directory (0700, root's) is closed to them.
        # Before, each worker opened the cache itself: here each failed to, warned, and
        # nothing was stored.
        os.chmod(self.dir, 0o755)
        elsewhere = self.path / "elsewhere"
        elsewhere.mkdir(mode=0o777)
        os.chmod(str(elsewhere), 0o777)
        cache = self.path / "cache"
        cache.mkdir(mode=0o700)
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import concurrent.futures, multiprocessing, os, sys, persist
            @persist.memoize
            def work(x):
                if x % 5 == 4:
                    raise ValueError("bad %d in %s" % (x, os.getcwd()))
                return x * x, os.getuid()
            def become_another_user(where):
                # (what formats a traceback, imported while it can be: 3.13's linecache
                # imports tokenize when first used, and a Python under root's home, 0700,
                # cannot be read by nobody)
                import traceback, tokenize
                os.chdir(where)
                os.environ["PERSIST_DIR"] = os.path.join(where, "worker-cache")
                if os.getuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
            if __name__ == "__main__":
                spawn = multiprocessing.get_context("spawn")
                for run in range(2):
                    with concurrent.futures.ProcessPoolExecutor(
                            2, spawn, initializer=become_another_user,
                            initargs=(sys.argv[1],)) as pool:
                        try:
                            persist.map(work, range(20), executor=pool, progress=False)
                        except persist.Failures as exc:
                            results = exc.results
                    info = work.cache_info()
                    print(info.hits, info.misses, info.entries, info.failures)
                print(sorted({uid for result in results if isinstance(result, tuple)
                              for uid in result[1:]}))
                print(all("in " + sys.argv[1] in str(e) for e in results[4::5]))
                # the latest failure last: workers finish in any order
                failure = min(work.failures(), key=lambda failure: failure.call.args)
                # the worker's frame; its source line too where the worker can read the
                # standard library (3.13's linecache imports tokenize when first used)
                print(failure.type, 'job.py", line 6, in work' in failure.traceback,
                      failure.call.args if failure.call else None)
        """))
        done = run_command([str(script), str(elsewhere)], timeout=300, PERSIST_DIR=cache)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("Warning", done.stderr)
        # the rerun reuses every result, whichever worker computed it: 16 hits, 4 misses again
        self.assertEqual(done.stdout.splitlines(), [
            "0 20 16 4", "16 24 16 4", "[%d]" % NOBODY, "True",
            "ValueError True (4,)"])
        self.assertEqual(sorted(os.listdir(str(elsewhere))), [])

    @unittest.skipUnless(hasattr(os, "fork"), "the fork start method")
    def test_a_worker_that_cannot_format_a_traceback_still_sends_the_batch_back(self):
        # A worker whose traceback module fails (here made to; a worker that became a user
        # who cannot read the standard library met it) lost its whole batch: each item of
        # it was sent again, then computed a second time in the caller.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import concurrent.futures, multiprocessing, os, sys, persist
            @persist.memoize(cache_dir=sys.argv[1])
            def work(x):
                with open(os.path.join(sys.argv[1], "calls"), "a") as calls:
                    calls.write("%d\\n" % x)
                if x == 2:
                    raise ValueError("bad")
                return x
            def broken_traceback():
                import traceback
                def fail(*args, **kwargs):
                    raise ImportError("no tokenize")
                traceback.format_exception = fail
            if __name__ == "__main__":
                fork = multiprocessing.get_context("fork")
                with concurrent.futures.ProcessPoolExecutor(
                        1, fork, initializer=broken_traceback) as pool:
                    try:
                        persist.map(work, range(6), executor=pool, progress=False)
                    except persist.Failures as exc:
                        print(exc.results)
                print(sorted(open(os.path.join(sys.argv[1], "calls")).read().split()))
                print('job.py", line 8, in work' in work.failures()[0].traceback)
        """))
        done = run_command([str(script), self.dir], timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.splitlines(), [
            "[0, 1, ValueError('bad'), 3, 4, 5]", str([str(x) for x in range(6)]), "True"])

    def test_an_engine_of_its_own_futures_is_polled(self):
        # Any object with submit(fn, *args) whose futures have result() (submitit's jobs,
        # Dask's own futures): concurrent.futures.wait() takes only its own futures, so
        # these are polled with done(), or taken as done where they have none.
        for has_done in (True, False):
            engine = OwnFutures(has_done)
            self.addCleanup(engine.pool.shutdown)
            calls = []

            @persist.memoize(cache_dir=self.path / str(has_done))
            def work(x):
                calls.append(x)
                if x == 3:
                    raise ValueError(x)
                return -x
            for run in range(2):
                with self.assertRaises(persist.Failures) as caught:
                    persist.map(work, range(8), executor=engine, progress=False)
                self.assertEqual(caught.exception.results[:3], [0, -1, -2])
            self.assertEqual(sorted(calls), [0, 1, 2, 3, 3, 4, 5, 6, 7])
            info = work.cache_info()
            self.assertEqual((info.hits, info.misses, info.entries, info.failures),
                             (7, 9, 7, 1))
            self.assertGreater(engine.submitted, 0)

    def test_keep_going_false_raises_the_failure_a_loop_would(self):
        # Items 0 and 1 run at once; 1 fails first, then 0: a loop would have raised 0's
        # failure, and never run 1. The first failure to arrive was raised.
        @persist.memoize(cache_dir=self.dir)
        def work(x):
            if x == 0:
                deadline = time.monotonic() + 60      # a bound on a hang, not a time to meet
                while not work.failures() and time.monotonic() < deadline:
                    time.sleep(0.01)
            raise ValueError(x)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with self.assertRaises(ValueError) as caught:
                persist.map(work, [0, 1], executor=pool, keep_going=False, progress=False)
        self.assertEqual(caught.exception.args, (0,))

    def test_keep_going_false_stops_a_batch_at_its_failure_on_any_engine(self):
        # An engine that shares no Event with this process (its own processes, a cluster)
        # ran every item of a batch after the one that failed: 48 items after the first
        # failure, on one worker. Now a batch stops at its own first failure, as a loop.
        calls = []
        for memoized in (False, True):
            del calls[:]

            def work(x):
                calls.append(x)
                if x == 1:
                    raise ValueError(x)
                return x
            func = persist.memoize(cache_dir=self.path / "c")(work) if memoized else work
            engine = InlineEngine()
            with self.assertRaises(ValueError):
                persist.map(func, range(100), executor=engine, keep_going=False,
                            progress=False)
            self.assertEqual(calls, [0, 1])
            if memoized:                  # the items not started are not counted as misses
                info = func.cache_info()
                self.assertEqual((info.hits, info.misses, info.entries, info.failures),
                                 (0, 2, 1, 1))

    def test_the_ledger_keeps_a_workers_failure_as_the_worker_raised_it(self):
        # Recorded at the caller, a worker's failure had the type persist._WorkerError and
        # its "could not send back" message where its own exception could not travel, and a
        # traceback of persist._WorkerTraceback chained to it; 8684ca3's workers recorded
        # each as it was raised.
        @persist.memoize(cache_dir=self.dir)
        def work(x):
            if x:
                raise NeedsTwo(x, "two")
            raise ValueError("zero")
        with self.assertRaises(persist.Failures):
            persist.map(work, [0, 1], executor=InlineEngine(), progress=False)
        failures = sorted(work.failures(), key=lambda failure: failure.call.args)
        self.assertEqual([(failure.type, failure.message) for failure in failures],
                         [("ValueError", "zero"), (__name__ + ".NeedsTwo", "1/two")])
        for failure, line in zip(failures, ['raise ValueError("zero")',
                                            'raise NeedsTwo(x, "two")']):
            self.assertTrue(failure.traceback.startswith("Traceback (most recent call last)"),
                            failure.traceback)
            self.assertIn(line, failure.traceback)
            self.assertNotIn("_WorkerTraceback", failure.traceback)
            self.assertNotIn("direct cause", failure.traceback)

    @unittest.skipUnless(importlib.util.find_spec("_tracemalloc"), "needs tracemalloc")
    @unittest.skipIf(SPAWN_POOL_BROKEN, "this Python's ProcessPoolExecutor fails under spawn")
    def test_a_large_result_is_held_twice_at_most_as_it_arrives(self):
        # A result came in its message, was loaded from it as its own pickle, and loaded
        # from that, all at once: three times its size. Now the message is freed before
        # the pickle is loaded.
        import tracemalloc
        size = 32 << 20
        tracemalloc.start()
        try:
            results = persist.map(large_result, [size], workers=1, progress=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(len(results[0]), size)
        self.assertLess(peak, 2.5 * size)

    def test_the_same_call_twice_in_flight_runs_once(self):
        # Two items with one key sent at once were computed twice, and stored twice.
        calls = []
        gate = threading.Event()

        @persist.memoize(cache_dir=self.dir, name="work")
        def work(x):
            calls.append(x)
            gate.wait(10)
            return x * 10
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            threading.Timer(0.2, gate.set).start()
            results = persist.map(work, [1, 1, 2, 1, 2], executor=pool, progress=False)
        self.assertEqual(results, [10, 10, 20, 10, 20])
        self.assertEqual(sorted(calls), [1, 2])
        info = work.cache_info()
        self.assertEqual((info.hits, info.misses, info.entries), (3, 2, 2))

    def test_a_result_not_stored_is_not_reused_by_its_twins(self):
        # A result that could not be stored (a lock) was handed to the items of the same
        # call as hits: one object for all, counted as reused. A loop computes it again.
        calls = []
        counts = []
        for executor in (None, concurrent.futures.ThreadPoolExecutor(1)):
            del calls[:]

            @persist.memoize(cache_dir=self.path / str(len(counts)))
            def work(x):
                calls.append(x)
                return threading.Lock()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", persist.PersistWarning)
                results = persist.map(work, [5, 5, 5], executor=executor, progress=False)
            if executor is not None:
                executor.shutdown()
            self.assertEqual(len({id(result) for result in results}), 3)
            self.assertEqual(calls, [5, 5, 5])
            info = work.cache_info()
            counts.append((info.hits, info.misses, info.entries, info.unstored))
        self.assertEqual(counts, [(0, 3, 0, 3)] * 2)

    def test_a_failed_call_is_not_reused_by_its_twins(self):
        # A failure is not stored: the next item of the same call runs again, as in a loop,
        # and the one after it reuses that result.
        calls = []

        @persist.memoize(cache_dir=self.dir)
        def work(x):
            calls.append(x)
            if len(calls) == 1:
                raise ValueError("first")
            return x
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with self.assertRaises(persist.Failures) as caught:
                persist.map(work, [5, 5, 5], executor=pool, progress=False)
        self.assertEqual(caught.exception.results[1:], [5, 5])
        self.assertEqual(len(calls), 2)
        info = work.cache_info()
        self.assertEqual((info.hits, info.misses, info.entries, info.failures), (1, 2, 1, 0))

    def traced(self, interrupt=None):
        """sqlite3.connect, patched for the test's length: its connections count each COMMIT
        in commits, and raise KeyboardInterrupt in the first COMMIT of a transaction that
        stored at least interrupt results (None: never), whose calls' arguments (as the
        cache records them) go in commits.interrupted."""
        commits, stored = TracedCommits(), []

        class Connection(sqlite3.Connection):
            def execute(self, sql, *args):
                if sql.startswith("BEGIN"):
                    stored.clear()
                elif sql.startswith("REPLACE INTO Dict"):
                    stored.append(args[0][6])
                elif sql.startswith("INSERT INTO Put"):     # one result, one statement
                    if interrupt == 1 and commits.interrupted is None:
                        commits.interrupted = [args[0][5]]
                        raise KeyboardInterrupt
                    done = super().execute(sql, *args)
                    commits.append(1)
                    return done
                elif sql == "COMMIT":
                    commits.append(len(stored))
                    if interrupt is not None and len(stored) >= interrupt and \
                            commits.interrupted is None:
                        commits.interrupted = list(stored)
                        raise KeyboardInterrupt
                return super().execute(sql, *args)
        connect = sqlite3.connect
        patch = mock.patch.object(persist.sqlite3, "connect",
                                  lambda *args, **kwargs: connect(*args, factory=Connection,
                                                                  **kwargs))
        patch.start()
        self.addCleanup(patch.stop)
        return commits

    def test_the_results_of_a_batch_are_stored_in_one_transaction(self):
        # Each result that came back was stored in a transaction of its own: over quick
        # items the caller's commits took longer than the workers' computing (workers=2
        # on 10,000 quick items: 1.28x a hand-chunked ProcessPoolExecutor).
        commits = self.traced()
        calls = []

        @persist.memoize(cache_dir=self.dir)
        def work(x):
            calls.append(x)
            return -x
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            self.assertEqual(persist.map(work, range(400), executor=pool, progress=False),
                             [-x for x in range(400)])
        self.assertEqual(sum(commits), 400)
        self.assertLess(len(commits), 100, commits)
        self.assertEqual(persist.map(work, range(400), progress=False),
                         [-x for x in range(400)])
        self.assertEqual(len(calls), 400)
        info = work.cache_info()
        self.assertEqual((info.hits, info.misses, info.entries), (400, 400, 400))
        self.assertNoTemp()

    @slow
    def test_a_batch_of_large_results_is_committed_in_parts(self):
        # The pickles of a batch's results wait in memory for its commit: a batch of 150
        # results of 250 KB (under the size that goes to a value file) held 37 MB of them
        # beside the results. Past 16 MB, what is ready is committed first.
        commits = self.traced()

        @persist.memoize(cache_dir=self.dir)
        def work(x):
            return bytes([x % 256]) * (250 << 10)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            results = persist.map(work, range(300), executor=pool, progress=False)
        self.assertEqual([result[:1] for result in results],
                         [bytes([x % 256]) for x in range(300)])
        self.assertEqual(sum(commits), 300)
        self.assertLessEqual(max(commits), 66, commits)
        self.assertEqual(work.cache_info().entries, 300)
        self.assertEqual(list(self.path.glob("*.values/*")), [])

    def test_a_result_that_cannot_be_pickled_leaves_the_rest_of_its_batch_stored(self):
        # One result of a batch pickle refuses, one of them large (a value file begun):
        # returned (strict: failed), the others stored with it, no value file left behind.
        for strict in (False, True):
            @persist.memoize(cache_dir=self.path / str(strict), strict=strict)
            def work(x):
                if x == 150:
                    return [b"x" * (1 << 20), lambda: x]      # a value file, then a lambda
                return x
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                with contextlib.ExitStack() as stack:
                    if strict:
                        caught = stack.enter_context(self.assertRaises(persist.Failures))
                    else:
                        stack.enter_context(self.assertWarnsRegex(persist.PersistWarning,
                                                                  "cannot be pickled"))
                    results = persist.map(work, range(300), executor=pool, progress=False)
            if strict:
                results = caught.exception.results
                self.assertIsInstance(results[150], TypeError)
            else:
                self.assertEqual(results[150][0], b"x" * (1 << 20))
            self.assertEqual(results[:150] + results[151:], list(range(150)) +
                             list(range(151, 300)))
            info = work.cache_info()
            self.assertEqual((info.entries, info.unstored), (299, 1))
            self.assertEqual(list((self.path / str(strict)).glob("*.values/*")), [])
            self.assertNoTemp()

    def test_ctrl_c_while_a_batch_commits_leaves_its_results_stored(self):
        # Ctrl-C in the COMMIT of a batch of results: that transaction is rolled back, and
        # each of its results is stored alone before the interrupt goes on (every result
        # that arrived stays stored).
        commits = self.traced(interrupt=2)
        calls = []

        @persist.memoize(cache_dir=self.dir)
        def work(x):
            calls.append(x)
            return -x
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with self.assertRaises(KeyboardInterrupt):
                persist.map(work, range(400), executor=pool, progress=False)
        interrupted = [ast.literal_eval(args) for args in commits.interrupted]   # "5": work(5)
        self.assertGreater(len(interrupted), 1)
        ran = len(calls)
        self.assertEqual(persist.map(work, interrupted, progress=False),
                         [-x for x in interrupted])
        self.assertEqual(len(calls), ran)                   # each a hit
        self.assertNoTemp()


def _missing_engines():
    import importlib.util
    return [name for name in ("cloudpickle", "dask", "distributed", "joblib")
            if importlib.util.find_spec(name) is None]


ENGINES_MISSING = _missing_engines()
ENGINES_SKIP = ("SKIPPED, LOUDLY: %s not installed here; .ci/run installs "
                ".ci/requirements-engines.txt into a virtual environment of its own and runs "
                "TestEngines there" % ", ".join(ENGINES_MISSING))


@unittest.skipIf(ENGINES_MISSING, ENGINES_SKIP)
class TestEngines(TempDirTest):
    """Real engines, as a user's script meets them: a memoized function defined in the
    script itself, sent by cloudpickle (Dask, joblib's loky), one cache at the driver."""

    def test_each_form_of_a_script_function_travels_by_value_and_runs_plain(self):
        # cloudpickle.dumps(work) failed: '_Memoized' object has no attribute '__qualname__'
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import functools, pickle, sys, cloudpickle, persist
            @persist.memoize
            def work(x, y=1):
                return ("work", x * y)
            def make():
                @persist.memoize
                def nested(x):
                    return ("nested", x + 1)
                return nested
            class Model:
                def __init__(self, k):
                    self.k = k
                @persist.memoize
                def predict(self, x):
                    return ("predict", self.k * x)
            forms = [work, make(), functools.partial(work, y=3), Model(5).predict]
            with open(sys.argv[1], "wb") as out:
                pickle.dump([cloudpickle.dumps(form) for form in forms], out)
            print([form(2) for form in forms])
        """))
        sent = self.path / "sent.pickle"
        done = run_command([str(script), str(sent)], cwd=self.dir, timeout=120,
                           PERSIST_DIR=self.path / "driver")
        self.assertEqual(done.returncode, 0, done.stderr)
        here = done.stdout
        worker = self.path / "worker"
        worker.mkdir()
        out = run_python("""
            import pickle, sys
            forms = [pickle.loads(form) for form in pickle.load(open(sys.argv[1], "rb"))]
            print([form(2) for form in forms])
            print([(info.hits, info.misses, info.entries) for info in (
                getattr(form, "func", form).cache_info() for form in forms)])
        """.replace("sys.argv[1]", repr(str(sent))), cwd=str(worker),
            PERSIST_DIR=worker / "cache")
        self.assertEqual(out.splitlines()[0], here.strip())
        self.assertEqual(out.splitlines()[1], str([(0, 1, 0)] * 4))
        self.assertEqual(os.listdir(str(worker)), [])      # nothing stored on that side
        self.assertEqual(len(os.listdir(str(self.path / "driver"))), 4 * 1)

    def test_a_pickle_by_value_loaded_where_it_was_made_is_the_function_itself(self):
        # Dask's tokenize (client.submit, dask.delayed) loads each pickle it makes, and
        # cloudpickle, loading a class of __main__ where it was defined, sets its attributes
        # to what it loaded: Model.predict became a copy with no cache, which stored nothing,
        # and under persist.map keyed every item alike: [0, 0, 0, 0]. On the other side, such
        # a copy in a persist.map of its own is a plain callable.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import concurrent.futures, pickle, sys, cloudpickle, persist
            class Model:
                def __init__(self, k):
                    self.k = k
                @persist.memoize
                def predict(self, x):
                    return self.k * x
            @persist.memoize
            def work(x):
                return x + 1
            if __name__ == "__main__":
                pickle.loads(cloudpickle.dumps(Model(5).predict))
                again = pickle.loads(cloudpickle.dumps(work))
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    print(persist.map(Model(5).predict, range(4), executor=pool,
                                      progress=False))
                print(Model.predict.cache_info().entries, again(1), again(1),
                      work.cache_info().hits)
                with open(sys.argv[1], "wb") as out:
                    out.write(cloudpickle.dumps(Model(3).predict))
        """))
        sent = self.path / "sent.pickle"
        done = run_command([str(script), str(sent)], cwd=self.dir, timeout=120,
                           PERSIST_DIR=self.path / "driver")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertEqual(done.stdout.splitlines(), ["[0, 5, 10, 15]", "4 2 2 1"])
        worker = self.path / "worker"
        worker.mkdir()
        out = run_python("""
            import concurrent.futures, pickle, sys, persist
            predict = pickle.loads(open(sys.argv[1], "rb").read())
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                print(persist.map(predict, range(4), executor=pool, progress=False))
        """.replace("sys.argv[1]", repr(str(sent))), cwd=str(worker),
            PERSIST_DIR=worker / "cache")
        self.assertEqual(out, "[0, 3, 6, 9]\n")
        self.assertEqual(os.listdir(str(worker)), [])

    def test_explain_on_the_other_side_says_there_is_no_cache_there(self):
        # It said "miss: no entry; the cache <the driver's path> does not exist yet", of a
        # cache that exists, on the driver, and holds the call.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import sys, cloudpickle, persist
            @persist.memoize
            def work(x):
                return x + 1
            work(2)
            print(work.explain(2).hit)
            with open(sys.argv[1], "wb") as out:
                out.write(cloudpickle.dumps(work))
        """))
        sent = self.path / "sent.pickle"
        done = run_command([str(script), str(sent)], cwd=self.dir, timeout=120,
                           PERSIST_DIR=self.path / "driver")
        self.assertEqual((done.returncode, done.stdout), (0, "True\n"), done.stderr)
        worker = self.path / "worker"
        worker.mkdir()
        out = run_python("""
            import pickle, sys
            work = pickle.loads(open(sys.argv[1], "rb").read())
            print(work(2), work.explain(2).hit, work.failures(), work.cache_delete(2))
            print(work.explain(2))
            work.cache_clear()
            print(work.cache_info().misses)
        """.replace("sys.argv[1]", repr(str(sent))), cwd=str(worker),
            PERSIST_DIR=worker / "cache")
        lines = out.splitlines()
        self.assertEqual(lines[0], "3 False [] False")
        self.assertRegex(lines[1], "^miss: no cache in this process: .* came by value .* its "
                         "cache .*job.work.db is in the process that sent it$")
        self.assertEqual(lines[2], "0")
        self.assertEqual(os.listdir(str(worker)), [])

    @slow
    def test_dask_cluster_one_cache_at_the_driver(self):
        # Two worker processes, which see another PERSIST_DIR and work in another
        # directory: the driver's cache ends with every result and failure. One item kills
        # its worker once (Dask runs it again), one each time it runs while a marker is
        # there (it fails with BrokenProcessPool, and no other item with it).
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import functools, os, sys, dask, persist
            from distributed import Client, LocalCluster
            MARKS = sys.argv[1]
            @persist.memoize
            def work(x):
                if x == 5 and not os.path.exists(os.path.join(MARKS, "killed-once")):
                    open(os.path.join(MARKS, "killed-once"), "w").close()
                    os._exit(9)
                if x == 11 and os.path.exists(os.path.join(MARKS, "kill-11")):
                    os._exit(9)
                if x %% 7 == 3:
                    raise ValueError("bad %%d" %% x)
                return x * x
            if __name__ == "__main__":
                dask.config.set({"distributed.scheduler.allowed-failures": 0})   # fewer deaths
                open(os.path.join(MARKS, "kill-11"), "w").close()
                with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, local_directory=MARKS,
                                  env={"PERSIST_DIR": os.path.join(MARKS, "worker-cache")}
                                  ) as cluster, Client(cluster) as client:
                    executor = client.get_executor()
                    for run in range(2):
                        try:
                            persist.map(work, range(20), executor=executor, progress=False)
                        except persist.Failures as exc:
                            print(sorted((i, type(e).__name__) for i, e in
                                         zip(range(20), exc.results) if isinstance(e, Exception)))
                        info = work.cache_info()
                        print(info.hits, info.misses, info.entries, info.failures)
                        if run == 0:
                            os.remove(os.path.join(MARKS, "kill-11"))
                    print(client.submit(work, 4).result(), client.submit(work, 2).result())
                    print(persist.map(functools.partial(work), [2, 4], executor=executor,
                                      progress=False))
                print(sorted(set(f.type for f in work.failures())))
                print(os.path.exists(os.path.join(MARKS, "worker-cache")))
        """ % ()))
        marks = self.path / "marks"
        marks.mkdir()
        done = run_or_dump(self, [str(script), str(marks)], 300, PERSIST_DIR=self.path / "driver")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertEqual(done.stdout.splitlines(), [
            "[(3, 'ValueError'), (10, 'ValueError'), (11, 'BrokenProcessPool'), "
            "(17, 'ValueError')]",
            "0 20 16 4",
            "[(3, 'ValueError'), (10, 'ValueError'), (17, 'ValueError')]",
            "16 24 17 3",
            "16 4",
            "[4, 16]",
            "['ValueError']",
            "False"])

    @slow
    def test_dask_cluster_wider_than_this_machine_gets_work_on_every_worker(self):
        # The width came from this machine's cores (os.cpu_count(), 1 here): two batches in
        # flight, on a cluster of three workers, one idle. Each item waits until all three
        # run at once (a barrier, whose timeout is the failure).
        # (The barrier is in a module of its own: Dask pickles a task, even for workers in
        # this process, and a function of the script goes by value, with its globals.)
        (self.path / "meeting.py").write_text("import threading\n"
                                              "together = threading.Barrier(3, timeout=30)\n")
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import os, persist
            from unittest import mock
            from distributed import Client, LocalCluster
            @persist.memoize
            def work(x):
                import meeting
                meeting.together.wait()
                return x * 2
            if __name__ == "__main__":
                with LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, Client(cluster) as client:
                    with mock.patch.object(os, "cpu_count", return_value=1):
                        print(persist.map(work, range(3), executor=client.get_executor(),
                                          progress=False))
                        print(persist.map(work.__wrapped__, range(3, 6), executor=client,
                                          progress=False))
        """))
        done = run_command([str(script)], cwd=self.dir, timeout=300,
                           PERSIST_DIR=self.path / "driver")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertEqual(done.stdout.splitlines(), ["[0, 2, 4]", "[6, 8, 10]"])

    @slow
    def test_joblib_parallel_and_loky_executor_over_a_script_function(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import persist
            from joblib import Parallel, delayed
            from joblib.externals.loky import get_reusable_executor
            @persist.memoize
            def work(x):
                return x * 3
            if __name__ == "__main__":
                print(Parallel(n_jobs=2)(delayed(work)(i) for i in range(6)))
                print(work.cache_info().entries)   # computed on loky's side: nothing here
                executor = get_reusable_executor(max_workers=2)
                for run in range(2):
                    print(persist.map(work, range(6), executor=executor, progress=False))
                    info = work.cache_info()
                    print(info.hits, info.misses, info.entries)
        """))
        done = run_command([str(script)], cwd=self.dir, timeout=300,
                           PERSIST_DIR=self.path / "driver")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertEqual(done.stdout.splitlines(), [
            "[0, 3, 6, 9, 12, 15]", "0",
            "[0, 3, 6, 9, 12, 15]", "0 6 6",
            "[0, 3, 6, 9, 12, 15]", "6 6 6"])

    @slow
    def test_a_classmethod_above_memoize_is_stored_at_the_driver(self):
        # On Python 3.8 and 3.13, Model.triple is a bound method of the wrapper, which
        # persist.map took for a plain callable: sent by value, its calls ran with no cache,
        # and nothing was stored anywhere, nor looked up on a rerun.
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import persist
            from joblib.externals.loky import get_reusable_executor
            class Model:
                k = 3
                @classmethod
                @persist.memoize
                def triple(cls, x):
                    return cls.k * x
            if __name__ == "__main__":
                executor = get_reusable_executor(max_workers=2)
                for run in range(2):
                    print(persist.map(Model.triple, range(4), executor=executor,
                                      progress=False))
                    info = Model.triple.cache_info()
                    print(info.hits, info.misses, info.entries)
        """))
        done = run_command([str(script)], cwd=self.dir, timeout=300,
                           PERSIST_DIR=self.path / "driver")
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertEqual(done.stdout.splitlines(), [
            "[0, 3, 6, 9]", "0 4 4", "[0, 3, 6, 9]", "4 4 4"])

class OwnFutures:
    """An engine whose futures are not concurrent.futures': each runs on a thread pool, and
    is seen only through done() (where has_done) and result(), as submitit's jobs are."""

    def __init__(self, has_done):
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.has_done = has_done
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        inner = self.pool.submit(fn, *args)
        return OwnFuture(inner) if self.has_done else OwnJob(inner)


class InterruptsItsStore:
    """A result whose second pickling (the first is its worker's, to send it back) is a
    Ctrl-C."""

    count = 0      # its picklings

    def __reduce__(self):
        type(self).count += 1
        if self.count == 2:
            raise KeyboardInterrupt
        return InterruptsItsStore, ()


class InterruptsItsLoad:
    """A result whose first loading is a Ctrl-C."""

    count = 0      # its loadings

    def __reduce__(self):
        return _load_interrupting, ()


def _load_interrupting():
    InterruptsItsLoad.count += 1
    if InterruptsItsLoad.count == 1:
        raise KeyboardInterrupt
    return InterruptsItsLoad()


def large_result(size):
    return b"\x01" * size


class InlineEngine:
    """An engine of one worker that runs each batch as it is submitted (a future done at
    once), whose batches share nothing with the caller: what a cluster does, in order."""

    _max_workers = 1

    def __init__(self):
        self.batches = []

    def submit(self, fn, *args):
        self.batches.append(list(args[1]))
        future = concurrent.futures.Future()
        func, rest = args[0], pickle.loads(pickle.dumps(args[1:]))  # func as it is: a test's
        future.set_result(pickle.loads(pickle.dumps(fn(func, *rest))))
        return OwnFuture(future)


class OwnJob:
    def __init__(self, inner):
        self._inner = inner

    def result(self):
        return self._inner.result()


class OwnFuture(OwnJob):
    def done(self):
        return self._inner.done()


# -- persist.open


class TestOpenAsMapping(TempDirTest):
    def test_dict_operations(self):
        path = self.path / "data.db"
        with persist.open(path) as db:
            db["a"] = [1, 2]
            db["none"] = None
            db["a"] = {"replaced": True}
            self.assertEqual(db["a"], {"replaced": True})
            self.assertIsNone(db["none"])
            self.assertEqual(sorted(db), ["a", "none"])
            self.assertEqual(len(db), 2)
            self.assertIn("a", db)
            self.assertNotIn("b", db)
            self.assertEqual(db.get("b", 7), 7)
            del db["none"]
            with self.assertRaises(KeyError):
                db["none"]
            with self.assertRaises(KeyError):
                del db["none"]
        with persist.open(str(path), "r") as db:
            self.assertEqual(dict(db), {"a": {"replaced": True}})
        with persist.open(os.fsencode(path), "n") as db:
            self.assertEqual(len(db), 0)

    def test_closed_shelf(self):
        db = persist.open(self.path / "data.db")
        db["a"] = 1
        db.close()
        with self.assertRaises(ValueError):
            db["a"]
        with self.assertRaises(ValueError):
            db["a"] = 2

    def test_value_too_deep_to_pickle_raises_and_changes_nothing(self):
        # As shelve raises; the old value stays, and no row or value file is left half made.
        with persist.open(self.path / "data.db") as db:
            db["tree"] = "old"
            big = [os.urandom(1 << 19)]          # past the inline limit: into a value file
            for value in (nested(100000), big + [nested(100000)]):
                with self.assertRaises(RecursionError):
                    db["tree"] = value
                with self.assertRaises(RecursionError):
                    db["new"] = value
            self.assertEqual(dict(db), {"tree": "old"})
            db["tree"] = big
            self.assertEqual(db["tree"], big)
        self.assertEqual(len(os.listdir(self.path / "data.db.values")), 1)
        self.assertNoTemp()

    def test_each_assignment_is_committed(self):
        path = self.path / "data.db"
        db = persist.open(path)
        db["a"] = 1
        out = run_python("import persist; print(persist.open(%r, 'r')['a'])" % str(path))
        self.assertEqual(out, "1\n")
        db.close()

    def test_flags(self):
        path = self.path / "data.db"
        with self.assertRaises(FileNotFoundError):
            persist.open(path, "r")
        with self.assertRaises(FileNotFoundError):
            persist.open(path, "w")
        self.assertFalse(path.exists())
        with self.assertRaisesRegex(ValueError, "flag"):
            persist.open(path, "q")
        with persist.open(path) as db:
            db["k"] = "v"
        with persist.open(path, "w") as db:
            db["k2"] = "v2"
        with persist.open(path, "r") as db:
            self.assertEqual(db["k2"], "v2")
            with self.assertRaises(OSError) as caught:
                db["k3"] = 1
            self.assertIn(str(path), str(caught.exception))

    def test_writeback_is_not_offered(self):
        with self.assertRaisesRegex(ValueError, "assign it back"):
            persist.open(self.path / "x.db", writeback=True)
        with persist.open(self.path / "x.db", writeback=False) as db:   # as shelve.open takes
            db["k"] = 1
        with self.assertRaises(ValueError):
            db.path

    def test_protocol(self):
        with persist.open(self.path / "x.db", protocol=2) as db:
            db["a"] = ("tuple", 1)
            self.assertEqual(db["a"], ("tuple", 1))

    def test_large_values(self):
        path = self.path / "data.db"
        big = os.urandom(3 << 20)
        with persist.open(path) as db:
            db["big"] = big
            db["small"] = b"s"
        with persist.open(path) as db:
            self.assertEqual(db["big"], big)
            db["big"] = b"now small"
            self.assertEqual(db["big"], b"now small")
            self.assertEqual(os.listdir(str(path) + ".values"), [])
            db["big"] = big
            del db["big"]
            self.assertEqual(os.listdir(str(path) + ".values"), [])
        self.assertNoTemp()

    def test_schema_is_plain_sqlite(self):
        path = self.path / "data.db"
        with persist.open(path) as db:
            db["a"] = 1
        conn = sqlite3.connect(str(path))
        rows = conn.execute("SELECT key, value, stored FROM Dict").fetchall()
        conn.close()
        self.assertEqual(rows[0][0], b"a")
        self.assertEqual(pickle.loads(rows[0][1]), 1)

    def test_clear_does_not_load_values(self):
        cache = self.path / "c.db"
        run_python("""
            import persist
            class Gone:
                pass
            with persist.open(%r) as db:
                for i in range(50):
                    db[str(i)] = Gone()
                db["big"] = b"b" * 400000
        """ % str(cache))
        with persist.open(cache) as db:
            with mock.patch("pickle.loads", side_effect=AssertionError("loaded")):
                db.clear()
            self.assertEqual(len(db), 0)
        self.assertEqual(value_files(cache), (set(), set()))

    def test_flag_r_closes_as_a_writer_would(self):
        path = self.path / "c.db"
        with persist.open(path) as db:
            db["k"] = 1
        with persist.open(path, "r") as db:
            self.assertEqual(db["k"], 1)
            with self.assertRaises(PermissionError):
                db["k"] = 2
        self.assertEqual(sorted(os.listdir(self.dir)), ["c.db"])


class TestOpenMisuse(TempDirTest):
    """Wrong keys and file names are refused as shelve and open() refuse them."""

    def test_each_method_names_the_wrong_type(self):
        with persist.open(self.path / "s.db") as db:
            db["1"] = "one"
            for key in (1, None, b"1", 1.5):
                for method in (lambda: db[key], lambda: db.__setitem__(key, 1),
                               lambda: db.__delitem__(key), lambda: key in db,
                               lambda: db.get(key), lambda: db.pop(key),
                               lambda: db.setdefault(key, 1)):
                    with self.assertRaisesRegex(TypeError, "str key, not %s.*str\\(\\)"
                                                % type(key).__name__):
                        method()
            self.assertEqual(dict(db), {"1": "one"})

    def test_empty_name_fails_as_open_does(self):
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.dir)
        for flag in "rwcn":
            with self.assertRaises(FileNotFoundError) as caught:
                persist.open("", flag)
            self.assertEqual(caught.exception.filename, "")
        self.assertEqual(os.listdir(self.dir), [])

    def test_a_directory_is_named_as_one(self):
        (self.path / "d").mkdir()
        for flag in "rwcn":
            with self.assertRaises(IsADirectoryError) as caught:
                persist.open(self.path / "d", flag)
            self.assertEqual(caught.exception.filename, str(self.path / "d"))
        self.assertEqual(os.listdir(self.dir), ["d"])
        self.assertEqual(os.listdir(self.path / "d"), [])

    @slow
    @unittest.skipUnless(hasattr(signal, "SIGUSR1"), "SIGUSR1")
    def test_a_signal_handler_opening_a_shelf_as_its_thread_imports_shelve_is_told_why(self):
        # The first persist.open() imports shelve: a signal handler that opens a shelf while
        # its thread is in the middle of that import (here, of pickle.py, which shelve
        # imports first) cannot make one; it was told of a circular import, and is told
        # what happened and what to do. Nothing is made.
        script = self.path / "job.py"
        script.write_text(HOOK_IMPORT + textwrap.dedent("""
            import importlib.abc, os, signal, sys, persist
            if "shelve" in sys.modules or "pickle" in sys.modules:
                print("imported already")
                sys.exit(0)
            def handler(*args):
                try:
                    persist.open(os.path.join(sys.argv[1], "h.db"))
                except RuntimeError as exc:
                    print(exc)
            signal.signal(signal.SIGUSR1, handler)
            hook_import("pickle", lambda: os.kill(os.getpid(), signal.SIGUSR1))   # handled at once
            with persist.open(os.path.join(sys.argv[1], "m.db")) as db:
                db["k"] = 1
                print(db["k"])
        """))
        done = run_command([str(script), self.dir], timeout=CHILD_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        if done.stdout != "imported already\n":
            self.assertIn("persist.open() was called by a signal handler while the code it "
                          "interrupted was in the middle of importing shelve", done.stdout)
            self.assertTrue(done.stdout.endswith("\n1\n"), done.stdout)
            self.assertEqual(sorted(os.listdir(self.dir)), ["job.py", "m.db"])


@slow
class TestOpenConcurrentProcesses(TempDirTest):
    def test_four_processes_keep_every_key(self):
        path = str(self.path / "shared.db")
        code = """
            import sys, persist
            me = sys.argv[1]
            for i in range(200):
                with persist.open(%r) as s:
                    s["%%s-%%d" %% (me, i)] = i
        """ % path
        children = [spawn(self, [sys.executable, "-c", textwrap.dedent(code), str(n)],
                          stderr=subprocess.PIPE) for n in range(4)]
        errors = [child.communicate()[1] for child in children]
        self.assertEqual([child.returncode for child in children], [0] * 4, errors)
        with persist.open(path, "r") as db:
            self.assertEqual(len(db), 800)
            self.assertEqual(db["3-199"], 199)

    @slow
    def test_a_second_open_leaves_the_first_its_locks(self):
        # persist.open() read the file's first bytes (is it a shelve file?) with a descriptor
        # of its own, and closing it dropped the locks SQLite held on the file for the store
        # this process had open already (POSIX locks are the process's): another process
        # that closed the store then took itself for its last user, and removed the -wal and
        # -shm files from under the first store (sqlite.org/howtocorrupt.html, 2.2)
        path = str(self.path / "shared.db")
        child = spawn(self, [sys.executable, "-c", textwrap.dedent("""
            import sys, persist
            first = persist.open(sys.argv[1])
            first["a"] = 1
            second = persist.open(sys.argv[1])
            print("open", flush=True)
            sys.stdin.readline()
            first["b"] = 2
            print(sorted(first), flush=True)
        """), path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(child.stdout.readline(), "open\n")
        with persist.open(path) as other:
            other["c"] = 3
        self.assertTrue(os.path.exists(path + "-wal"))     # still in use: left where it is
        self.assertEqual(child.communicate("go\n")[0], "['a', 'b', 'c']\n")
        self.assertEqual(child.returncode, 0)
        with persist.open(path, "r") as db:
            self.assertEqual(dict(db), {"a": 1, "b": 2, "c": 3})


class TestShelfThreads(TempDirTest):
    def test_sixteen_threads_one_shelf(self):
        barrier = threading.Barrier(16)
        failures = []
        with persist.open(self.path / "s.db") as db:
            def hammer(me):
                barrier.wait(CHILD_TIMEOUT)
                try:
                    for i in range(100):
                        db["%d-%d" % (me, i)] = i
                        db["shared"] = me
                        assert db["%d-%d" % (me, i)] == i
                        assert db["shared"] in range(16)
                except Exception as exc:      # reported below
                    failures.append(exc)

            threads = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                joined(thread)
            self.assertEqual(failures, [])
            self.assertEqual(len(db), 1601)

    @slow
    def test_threads_opening_and_closing_shelves_among_many_open_ones(self):
        # Each open walked this process's connections (a WeakSet) before it took the fork
        # gate: another thread opening or closing one meanwhile made the walk raise
        # RuntimeError (set changed size during iteration), and the open failed; 4 to 16 of
        # 800 opens here, with threads switching as often as they can.
        out = run_python("""
            import os, sys, threading, traceback, persist
            sys.setswitchinterval(1e-6)
            keep = [persist.open(os.path.join(%r, "k%%d" %% (i %% 5))) for i in range(300)]
            errors = []
            def work():
                for i in range(100):
                    try:
                        db = persist.open(os.path.join(%r, "t%%d" %% (i %% 3)))
                        db["a"] = i
                        keep.append(db) if i %% 7 == 0 else db.close()
                    except Exception:
                        errors.append(traceback.format_exc())
            threads = [threading.Thread(target=work) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(len(errors), errors[:1])
        """ % (self.dir, self.dir), timeout=300)
        self.assertEqual(out, "0 []\n")


class TestNotACache(TempDirTest):
    def check_refused(self, path, pattern, reason):
        before = path.read_bytes()
        with self.assertRaises(persist.PersistError) as caught:
            persist.open(path)
        self.assertIn(str(path), str(caught.exception))
        self.assertRegex(str(caught.exception), pattern)
        self.assertEqual(caught.exception.reason, reason)
        self.assertEqual(path.read_bytes(), before)

    def test_garbage_file(self):
        path = self.path / "cache.db"
        path.write_bytes(b"this is not sqlite at all, just some text\n" * 100)
        self.check_refused(path, "not a persist cache.*another file name",
                           persist.PersistError.NOT_A_CACHE)

    def test_other_sqlite_database(self):
        path = self.path / "cache.db"
        conn = sqlite3.connect(str(path))
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
        conn.close()
        self.check_refused(path, "another program.*another file name",
                           persist.PersistError.FOREIGN_SQLITE)

    def test_newer_format(self):
        path = self.path / "cache.db"
        persist.open(path).close()
        conn = sqlite3.connect(str(path))
        conn.execute("PRAGMA user_version=99")
        conn.close()
        self.check_refused(path, "newer persist.*format 99", persist.PersistError.NEWER_FORMAT)


class TestEmptyFileBecomesAStore(TempDirTest):
    def test_mkstemp_then_open_as_shelve_would(self):
        for flag in "cn":
            name = str(self.path / ("made-by-mkstemp-" + flag))
            pathlib.Path(name).write_bytes(b"")
            with persist.open(name, flag) as db:
                db["k"] = [1, 2]
            with persist.open(name, "r") as db:
                self.assertEqual(dict(db), {"k": [1, 2]})
            info = sqlite3.connect(name)
            self.addCleanup(info.close)
            # made as persist makes a new store: clear() can give space back
            self.assertEqual(info.execute("PRAGMA auto_vacuum").fetchall(), [(2,)])
        self.assertNoTemp()

    def test_flags_r_and_w_still_refuse_it(self):
        path = self.path / "empty.db"
        path.write_bytes(b"")
        for flag in "rw":
            with self.assertRaisesRegex(persist.PersistError, "an empty file") as caught:
                persist.open(path, flag)
            self.assertEqual(caught.exception.reason, persist.PersistError.EMPTY)
        self.assertEqual(path.read_bytes(), b"")

    def test_a_memoized_function_whose_cache_file_is_empty(self):
        @persist.memoize(cache_dir=self.dir, name="job")
        def f(x):
            return x + 1

        (self.path / "job.db").write_bytes(b"")
        self.assertEqual(f(1), 2)
        self.assertEqual(f.cache_info().entries, 1)

    def test_a_file_another_filler_has_begun_is_filled(self):
        # Another process filling the empty file has begun: the PRAGMA auto_vacuum it runs
        # before taking the lock writes SQLite's first page, with no table yet. Opened
        # then, with 'c', it was refused as "an empty file" (seen under load, one run in
        # hundreds): it is one still, and becomes the store.
        path = self.path / "shared.db"
        path.write_bytes(b"")
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL").fetchall()
        conn.close()
        self.assertGreater(path.stat().st_size, 0)
        with persist.open(path, "c") as db:
            db["x"] = 1
        with persist.open(path, "r") as db:
            self.assertEqual(dict(db), {"x": 1})

    def test_an_empty_database_another_program_marked_is_refused(self):
        path = self.path / "theirs.db"
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.execute("PRAGMA user_version=7")
        conn.close()
        before = path.read_bytes()
        for flag in "cw":
            with self.assertRaises(persist.PersistError) as caught:
                persist.open(path, flag)
            self.assertEqual(caught.exception.reason, persist.PersistError.EMPTY)
        self.assertEqual(path.read_bytes(), before)

    def test_two_processes_fill_it_at_once(self):
        path = self.path / "shared.db"
        path.write_bytes(b"")
        children = [start_python(self, """
            import sys, persist
            sys.stdin.readline()
            with persist.open(%r, "c") as db:
                db["%d"] = %d
            print("done", flush=True)
        """ % (str(path), n, n)) for n in range(2)]
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate()[0] for child in children]
        self.assertEqual(outputs, ["done\n", "done\n"])
        with persist.open(path, "r") as db:
            self.assertEqual(sorted(db.values()), [0, 1])


def dbm_module(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def shelve_file(path, module, items):
    """A file as shelve.open(path) makes it with the dbm module given."""
    with shelve.Shelf(module.open(str(path), "c")) as shelf:
        shelf.update(items)


def handmade_dbm_sqlite3(path, items):
    """A dbm.sqlite3 file (Python 3.13's default for shelve), made here for any Python."""
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE IF NOT EXISTS Dict (key BLOB UNIQUE NOT NULL, "
                 "value BLOB NOT NULL)")
    conn.execute("PRAGMA journal_mode = wal").fetchall()   # PyPy: a statement left open
    with conn:
        conn.executemany("REPLACE INTO Dict (key, value) VALUES (CAST(? AS BLOB), "
                         "CAST(? AS BLOB))", [(key.encode(), pickle.dumps(value, 3))
                                              for key, value in items.items()])
    conn.close()


ITEMS = {"a": [1, 2], "caf\u00e9": {"big": "x" * 300000}, "n": None}


def content(path):
    """What a file holds: its bytes; a dbm.sqlite3 file's rows (opening it may change its
    header, and persist sets its journal mode back to DELETE before reading it whole)."""
    with open(str(path), "rb") as file:
        data = file.read()
    if not data.startswith(b"SQLite format 3\0"):
        return data
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return conn.execute("SELECT key, value FROM Dict ORDER BY key").fetchall()
    finally:
        conn.close()


class ShelveFileTest(TempDirTest):
    def originals(self):
        return {name: content(self.path / name) for name in os.listdir(self.dir)}

    def check_copied(self, name, kind, kept):
        before = self.originals()
        with self.assertWarns(persist.PersistWarning) as caught:
            shelf = persist.open(self.path / name)
        message = str(caught.warning)
        self.assertIn("was a %s shelve file; its 3 entries are now in a persist store" % kind,
                      message)
        self.assertNotIn("delete", message)
        with shelf:
            self.assertEqual(dict(shelf), ITEMS)
            shelf["new"] = 1
        for original, held in before.items():       # kept, every entry
            self.assertEqual(content(self.path / (kept or original)), held)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with persist.open(self.path / name, "r") as shelf:     # a store now
                self.assertEqual(len(shelf), 4)
        self.assertNoTemp()
        return message


class TestOpenOverDbmDumb(ShelveFileTest):
    def test_its_entries_are_copied_and_the_files_kept(self):
        shelve_file(self.path / "plain_shelf", dbm_module("dbm.dumb"), ITEMS)
        message = self.check_copied("plain_shelf", "dbm.dumb", None)
        self.assertIn("original files are kept, unchanged, beside it", message)
        with shelve.Shelf(dbm_module("dbm.dumb").open(str(self.path / "plain_shelf"),
                                                      "r")) as old:
            self.assertEqual(dict(old), ITEMS)

    def test_read_only_says_how(self):
        shelve_file(self.path / "plain_shelf", dbm_module("dbm.dumb"), ITEMS)
        before = self.originals()
        with self.assertRaises(persist.PersistError) as caught:
            persist.open(self.path / "plain_shelf", "r")
        self.assertIn("dbm.dumb shelve file, not yet a persist store; open it once with "
                      "persist.open(", str(caught.exception))
        self.assertEqual(caught.exception.reason, persist.PersistError.SHELVE)
        self.assertNotIn("delete", str(caught.exception))
        self.assertEqual(self.originals(), before)

    def test_inside_a_done_dir_of_this_process(self):
        with persist.done_dir(self.path / "stage") as stage:
            shelve_file(stage / "plain_shelf", dbm_module("dbm.dumb"), ITEMS)
            with self.assertWarns(persist.PersistWarning):
                with persist.open(stage / "plain_shelf") as shelf:
                    self.assertEqual(dict(shelf), ITEMS)

    def test_a_failed_copy_leaves_the_original_and_no_store(self):
        shelve_file(self.path / "plain_shelf", dbm_module("dbm.dumb"), ITEMS)
        before = self.originals()
        with mock.patch.object(persist, "_rename_no_clobber",
                               side_effect=OSError(errno.EIO, "injected")):
            with self.assertRaises(OSError):
                persist.open(self.path / "plain_shelf")
        self.assertEqual(self.originals(), before)
        self.check_copied("plain_shelf", "dbm.dumb", None)


@unittest.skipUnless(dbm_module("dbm.gnu") or dbm_module("dbm.ndbm"),
                     "this Python has neither dbm.gnu nor dbm.ndbm")
class TestOpenOverGnuOrNdbm(ShelveFileTest):
    def test_its_entries_are_copied_and_the_original_kept(self):
        for kind in ("dbm.gnu", "dbm.ndbm"):
            module = dbm_module(kind)
            if module is None:
                continue
            with self.subTest(kind):
                shelve_file(self.path / kind, module, ITEMS)
                same_name = os.path.exists(str(self.path / kind))
                self.check_copied(kind, kind, kind + ".before-persist" if same_name else None)


class TestOpenOverDbmSqlite3(ShelveFileTest):
    def test_its_entries_are_copied_and_the_original_kept(self):
        handmade_dbm_sqlite3(self.path / "plain_shelf", ITEMS)
        message = self.check_copied("plain_shelf", "dbm.sqlite3",
                                    "plain_shelf.before-persist")
        self.assertIn("the original is kept as %s" % (self.path / "plain_shelf.before-persist"),
                      message)
        self.assertEqual(sorted(name for name in os.listdir(self.dir)
                                if not name.endswith(("-wal", "-shm"))),
                         ["plain_shelf", "plain_shelf.before-persist"])

    @unittest.skipUnless(dbm_module("dbm.sqlite3"), "Python 3.13's dbm.sqlite3")
    def test_a_real_one(self):
        with shelve.Shelf(dbm_module("dbm.sqlite3").open(str(self.path / "plain_shelf"),
                                                         "c")) as shelf:
            shelf.update(ITEMS)
        self.check_copied("plain_shelf", "dbm.sqlite3", "plain_shelf.before-persist")
        with shelve.Shelf(dbm_module("dbm.sqlite3").open(
                str(self.path / "plain_shelf.before-persist"), "r")) as old:
            self.assertEqual(dict(old), ITEMS)

    @slow
    def test_one_open_elsewhere_is_left_alone(self):
        handmade_dbm_sqlite3(self.path / "plain_shelf", ITEMS)
        other = sqlite3.connect(str(self.path / "plain_shelf"))
        other.execute("BEGIN IMMEDIATE")        # a writer, mid-transaction
        try:
            with self.assertRaises(persist.PersistError) as caught:
                persist.open(self.path / "plain_shelf")
        finally:
            other.rollback()
            other.close()
        self.assertIn("another program has open", str(caught.exception))
        self.assertEqual(caught.exception.reason, persist.PersistError.BUSY)
        self.assertNotIn("delete", str(caught.exception))
        self.assertNoTemp()
        self.check_copied("plain_shelf", "dbm.sqlite3", "plain_shelf.before-persist")

    def test_a_crash_after_the_original_was_kept_aside(self):
        handmade_dbm_sqlite3(self.path / "plain_shelf", ITEMS)
        with mock.patch.object(os, "replace", side_effect=OSError(errno.EIO, "injected")):
            with self.assertRaises(OSError):
                persist.open(self.path / "plain_shelf")
        self.assertTrue(os.path.samefile(str(self.path / "plain_shelf"),
                                         str(self.path / "plain_shelf.before-persist")))
        os.unlink(str(self.path / "plain_shelf.before-persist"))
        self.check_copied("plain_shelf", "dbm.sqlite3", "plain_shelf.before-persist")

    def test_flag_n_starts_empty_and_keeps_the_original(self):
        handmade_dbm_sqlite3(self.path / "plain_shelf", ITEMS)
        before = content(self.path / "plain_shelf")
        with self.assertWarns(persist.PersistWarning) as caught:
            with persist.open(self.path / "plain_shelf", "n") as shelf:
                self.assertEqual(len(shelf), 0)
        self.assertIn("a new, empty persist store has its name", str(caught.warning))
        self.assertEqual(content(self.path / "plain_shelf.before-persist"), before)

    def test_one_open_elsewhere_for_a_moment_is_waited_for(self):
        # Another process looking at what the file is (as persist.open does) holds it open
        # for a moment: SQLite then keeps it in WAL mode, or fails at once. That is waited for.
        handmade_dbm_sqlite3(self.path / "plain_shelf", ITEMS)
        code = textwrap.dedent("""
            import sqlite3, sys
            conn = sqlite3.connect(sys.argv[1])
            conn.execute("SELECT count(*) FROM Dict").fetchall()
            print("open", flush=True)
            sys.stdin.readline()
            conn.close()
        """)
        other = spawn(self, [sys.executable, "-c", code, str(self.path / "plain_shelf")],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(other.stdout.readline(), "open\n")
        with ended_as_persist_waits(other, "close\n") as waited:   # it closes the file
            with self.assertWarns(persist.PersistWarning):
                persist.open(self.path / "plain_shelf").close()
        self.assertTrue(waited)
        self.assertEqual(other.returncode, 0)
        self.assertNoTemp()
        with persist.open(self.path / "plain_shelf", "r") as shelf:
            self.assertEqual(dict(shelf), ITEMS)

    def test_two_processes_at_once(self):
        handmade_dbm_sqlite3(self.path / "plain_shelf", ITEMS)
        code = textwrap.dedent("""
            import sys, warnings, persist
            sys.stdin.readline()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with persist.open(sys.argv[1]) as shelf:
                    shelf[sys.argv[2]] = 1
            print(len(caught))
        """)
        children = [spawn(self, [sys.executable, "-c", code, str(self.path / "plain_shelf"), name],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
                    for name in ("x", "y")]
        for child in children:            # both go at once
            child.stdin.write("go\n")
            child.stdin.flush()
        outs = [child.communicate()[0] for child in children]
        self.assertEqual(sorted(int(out) for out in outs), [0, 1])
        with persist.open(self.path / "plain_shelf", "r") as shelf:
            self.assertEqual(sorted(shelf), sorted(list(ITEMS) + ["x", "y"]))
        self.assertNoTemp()

    def test_ls_marks_it(self):
        handmade_dbm_sqlite3(self.path / "old.db", ITEMS)
        done = run_command(CLI + ["ls", self.dir])
        self.assertEqual(done.stdout.splitlines()[1].split()[:2], ["(shelve", "file)"])
        done = run_command(CLI + ["show", self.path / "old.db"])
        self.assertEqual(done.returncode, 1)
        self.assertIn("old.db: a dbm.sqlite3 shelve file, not a persist cache; persist.open(",
                      done.stderr)
        self.assertNotIn("delete", done.stderr)


# -- atomic_write and atomic_open


class TestAtomicWrite(TempDirTest):
    def test_text_and_bytes(self):
        target = self.path / "out.txt"
        persist.atomic_write(target, "héllo\n")
        self.assertEqual(target.read_bytes(), "héllo\n".encode("utf-8"))
        for data in (b"\x00\xff", bytearray(b"ab"), memoryview(b"cd")):
            persist.atomic_write(target, data)
            self.assertEqual(target.read_bytes(), bytes(data))
        self.assertNoTemp()

    def test_text_options(self):
        target = self.path / "out.txt"
        persist.atomic_write(target, "é\n", encoding="latin-1", newline="\r\n")
        self.assertEqual(target.read_bytes(), b"\xe9\r\n")
        with self.assertRaises(UnicodeEncodeError):
            persist.atomic_write(target, "€", encoding="latin-1")
        persist.atomic_write(target, "€", encoding="latin-1", errors="replace")
        self.assertEqual(target.read_bytes(), b"?")
        with self.assertRaises(LookupError):
            persist.atomic_write(target, "x", encoding="no-such-codec")
        self.assertNoTemp()

    def test_path_types(self):
        for path in (os.path.join(self.dir, "a"), os.fsencode(os.path.join(self.dir, "b")),
                     self.path / "c"):
            persist.atomic_write(path, "x")
            self.assertEqual(pathlib.Path(os.fsdecode(path)).read_bytes(), b"x")

    def test_wrong_data(self):
        with self.assertRaisesRegex(TypeError, "Expected str or a bytes-like.*int"):
            persist.atomic_write(self.path / "x", 5)
        self.assertEqual(os.listdir(self.dir), [])

    def test_atomic_open_modes(self):
        target = self.path / "out.json"
        with persist.atomic_open(target) as file:
            json.dump({"a": 1}, file)
        self.assertEqual(json.loads(target.read_text()), {"a": 1})
        with persist.atomic_open(target, "wb") as file:
            file.write(b"raw")
        self.assertEqual(target.read_bytes(), b"raw")
        with persist.atomic_open(self.path / "new", "xb") as file:
            file.write(b"x")
        self.assertEqual((self.path / "new").read_bytes(), b"x")
        self.assertNoTemp()

    def test_name_is_the_path_given_as_open_would_name_it(self):
        # code that picks a format by the extension reads file.name
        for path, mode in ((self.path / "plot.png", "wb"), (os.path.join(self.dir, "a.csv"), "w"),
                           (os.fsencode(os.path.join(self.dir, "b.bin")), "xb")):
            with persist.atomic_open(path, mode) as file:
                self.assertEqual(file.name, os.fspath(path))
                self.assertIn(repr(os.fspath(path)), repr(file))
        self.assertNoTemp()


class TestAtomicTemporaryFile(TempDirTest):
    def test_lives_beside_target_with_a_telling_name(self):
        target = self.path / "report.json"
        with persist.atomic_open(target) as file:
            file.write("x")
            names = os.listdir(self.dir)
            self.assertFalse(target.exists())
        self.assertEqual(len(names), 1)
        self.assertRegex(names[0], r"^\.report\.json\.[0-9a-f]+\.tmp$")
        self.assertEqual(os.listdir(self.dir), ["report.json"])

    @unittest.skipUnless(hasattr(os, "symlink") and POSIX, "needs symbolic links")
    def test_planted_symlink_at_temporary_name_is_not_followed(self):
        victim = self.path / "victim"
        victim.write_text("precious")
        names = iter([b"\x00" * 4, b"\x01" * 4])
        os.symlink(victim, self.path / ".out.00000000.tmp")
        with mock.patch("os.urandom", lambda n: next(names)):
            persist.atomic_write(self.path / "out", "new")
        self.assertEqual(victim.read_text(), "precious")
        self.assertEqual((self.path / "out").read_text(), "new")

    @PLAIN_FSYNC
    def test_sync_false_skips_fsync_and_default_fsyncs(self):
        with mock.patch("os.fsync") as fsync:
            persist.atomic_write(self.path / "a", "x", sync=False)
        self.assertEqual(fsync.call_count, 0)
        with mock.patch("os.fsync") as fsync:
            persist.atomic_write(self.path / "a", "y")
        self.assertGreaterEqual(fsync.call_count, 1)
        self.assertEqual((self.path / "a").read_text(), "y")

    @unittest.skipUnless(POSIX, "directory fsync is POSIX")
    @PLAIN_FSYNC
    def test_directory_fsync_refused_is_not_an_error(self):
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "Invalid argument")
            real_fsync(fd)

        with mock.patch("os.fsync", fsync):
            persist.atomic_write(self.path / "a", "x")
        self.assertEqual((self.path / "a").read_text(), "x")
        self.assertNoTemp()


class TestAtomicMisuse(TempDirTest):
    """Bad paths and modes fail before anything is written, as open() fails."""

    def test_missing_parent(self):
        target = self.path / "no" / "such" / "file"
        with self.assertRaises(FileNotFoundError) as caught:
            persist.atomic_write(target, "x")
        self.assertEqual(caught.exception.filename, target)
        self.assertIn("create it first", str(caught.exception))

    def test_directory_target(self):
        with self.assertRaises(IsADirectoryError) as caught:
            persist.atomic_write(self.path, "x")
        self.assertEqual(caught.exception.filename, self.path)
        self.assertNoTemp()

    def test_unknown_mode(self):
        for mode in ("a", "r", "w+", "rb"):
            accepted = re.escape("'w', 'wb', 'x' or 'xb', not %r" % mode)
            with self.assertRaisesRegex(ValueError, accepted):
                with persist.atomic_open(self.path / "x", mode):
                    pass
        with self.assertRaisesRegex(ValueError, "binary"):
            with persist.atomic_open(self.path / "x", "wb", encoding="utf-8"):
                pass
        with self.assertRaises(ValueError):        # at the call, as open() fails
            persist.atomic_open(self.path / "x", "a")
        self.assertEqual(os.listdir(self.dir), [])

    def test_empty_path_fails_as_open_does(self):
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.dir)
        for call in (lambda: persist.atomic_write("", "x"),
                     lambda: persist.atomic_open("", "w").__enter__()):
            with self.assertRaises(FileNotFoundError) as caught:
                call()
            self.assertEqual(caught.exception.filename, "")
        self.assertEqual(os.listdir(self.dir), [])


class TestAtomicExclusive(TempDirTest):
    def test_existing_target_fails_before_block(self):
        target = self.path / "out"
        target.write_text("old")
        ran = []
        with self.assertRaises(FileExistsError) as caught:
            with persist.atomic_open(target, "x"):
                ran.append(1)
        self.assertEqual(ran, [])
        self.assertEqual(caught.exception.filename, target)
        self.assertEqual(target.read_text(), "old")

    def test_file_that_appears_meanwhile_is_not_clobbered(self):
        target = self.path / "out"
        with self.assertRaises(FileExistsError):
            with persist.atomic_open(target, "xb") as file:
                file.write(b"mine")
                target.write_bytes(b"theirs")
        self.assertEqual(target.read_bytes(), b"theirs")
        self.assertNoTemp()


@slow
class TestAtomicConcurrentWriters(TempDirTest):
    def test_four_processes_one_target(self):
        target = self.path / "target"
        code = """
            import sys, persist
            me = int(sys.argv[1]) if len(sys.argv) > 1 else 0
            for i in range(60):
                persist.atomic_write(%r, (str(me) * 100000), sync=False)
        """ % str(target)
        children = [spawn(self, [sys.executable, "-c", textwrap.dedent(code), str(n)])
                    for n in range(4)]
        seen = set()
        while any(child.poll() is None for child in children):
            with contextlib.suppress(FileNotFoundError):
                data = target.read_text()
                self.assertEqual(len(data), 100000)
                self.assertEqual(len(set(data)), 1)
                seen.add(data[0])
        self.assertEqual([child.wait() for child in children], [0, 0, 0, 0])
        self.assertEqual(len(target.read_text()), 100000)
        self.assertNoTemp()


class TestAtomicFailureInBlock(TempDirTest):
    def check(self, error):
        target = self.path / "out"
        target.write_text("old")
        with self.assertRaises(error) as caught:
            with persist.atomic_open(target) as file:
                file.write("half")
                raise error("inside")
        self.assertEqual(str(caught.exception), "inside")
        self.assertEqual(target.read_text(), "old")
        self.assertNoTemp()
        self.assertEqual(os.listdir(self.dir), ["out"])

    def test_exception(self):
        self.check(Boom)

    def test_keyboard_interrupt(self):
        self.check(KeyboardInterrupt)

    def test_new_target_never_appears(self):
        with self.assertRaises(Boom):
            with persist.atomic_open(self.path / "new", "wb") as file:
                file.write(b"x")
                raise Boom
        self.assertEqual(os.listdir(self.dir), [])

    def test_failure_while_committing_leaves_old_content(self):
        target = self.path / "out"
        target.write_text("old")
        with mock.patch("os.replace", side_effect=OSError(errno.EIO, "I/O error")):
            with self.assertRaises(OSError):
                persist.atomic_write(target, "new")
        self.assertEqual(target.read_text(), "old")
        self.assertNoTemp()


class TestAtomicFileClosedInTheBlock(TempDirTest):
    def test_a_library_that_closes_what_it_wrote_still_commits(self):
        target = self.path / "out.txt"
        target.write_text("old")
        for mode, data in (("w", "new"), ("wb", b"newer"), ("x", "x")):
            if mode == "x":
                target = self.path / "fresh.txt"
            with persist.atomic_open(target, mode) as file:
                file.write(data)
                file.close()
            self.assertEqual(target.read_bytes(),
                             data.encode() if isinstance(data, str) else data)
        self.assertNoTemp()

    def test_closed_then_failed_leaves_the_old_file(self):
        target = self.path / "out.txt"
        target.write_text("old")
        with self.assertRaises(Boom):
            with persist.atomic_open(target) as file:
                file.write("new")
                file.close()
                raise Boom()
        self.assertEqual(target.read_text(), "old")
        self.assertNoTemp()


class TestAtomicRelativePathAndChdir(TempDirTest):
    def setUp(self):
        super().setUp()
        self.addCleanup(os.chdir, os.getcwd())
        (self.path / "a").mkdir()
        (self.path / "b").mkdir()

    def check(self, mode):
        os.chdir(self.path / "a")
        with persist.atomic_open("out.txt", mode) as file:
            os.chdir(self.path / "b")
            file.write("new")
        self.assertEqual((self.path / "a" / "out.txt").read_text(), "new")
        self.assertEqual(os.listdir(self.path / "b"), [])
        self.assertNoTemp()

    def test_commit_goes_to_the_path_given_at_entry(self):
        self.check("w")
        self.check("w")                       # replacing, too

    def test_exclusive_mode(self):
        self.check("x")


@unittest.skipUnless(hasattr(os, "symlink") and POSIX, "needs symbolic links")
class TestAtomicSymlinkTarget(TempDirTest):
    def test_link_target_gets_content_and_link_stays(self):
        real = self.path / "real.txt"
        real.write_text("old")
        link = self.path / "link.txt"
        os.symlink("real.txt", link)
        persist.atomic_write(link, "new")
        self.assertTrue(link.is_symlink())
        self.assertEqual(real.read_text(), "new")
        self.assertNoTemp()

    def test_dangling_link_creates_its_target(self):
        link = self.path / "link.txt"
        os.symlink("missing.txt", link)
        persist.atomic_write(link, "new")
        self.assertTrue(link.is_symlink())
        self.assertEqual((self.path / "missing.txt").read_text(), "new")


@unittest.skipUnless(POSIX, "FIFOs, sockets and device nodes")
class TestAtomicRefusesWhatIsNotAFile(TempDirTest):
    def check_refused(self, target, kind):
        with self.assertRaisesRegex(persist.PersistError, kind) as caught:
            persist.atomic_write(target, "x")
        self.assertEqual(caught.exception.filename, target)
        self.assertEqual(caught.exception.errno, errno.EINVAL)
        self.assertEqual(caught.exception.reason, persist.PersistError.NOT_A_FILE)
        with self.assertRaisesRegex(persist.PersistError, kind):
            with persist.atomic_open(target, "wb"):
                self.fail("the block ran")
        self.assertNoTemp()

    def test_fifo(self):
        fifo = self.path / "fifo"
        os.mkfifo(fifo)
        self.check_refused(fifo, "a FIFO, not a regular file")
        self.assertTrue(stat.S_ISFIFO(os.lstat(fifo).st_mode))

    def test_link_to_a_fifo(self):
        os.mkfifo(self.path / "fifo")
        os.symlink("fifo", self.path / "link")
        self.check_refused(self.path / "link", "a FIFO")
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.path / "fifo").st_mode))
        self.assertTrue(os.path.islink(self.path / "link"))

    def test_socket(self):
        import socket
        path = os.path.join(self.dir, "sock")
        if len(path) > 100:
            self.skipTest("path too long for a Unix socket")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            self.check_refused(path, "a socket")
            self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))

    def test_device_node(self):
        node = self.path / "null"
        try:
            os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))   # as /dev/null
        except (OSError, AttributeError) as exc:
            self.skipTest("cannot make a device node here: %s" % exc)
        self.check_refused(node, "a character device")
        self.assertTrue(stat.S_ISCHR(os.lstat(node).st_mode))

    def test_fifo_put_in_place_during_the_block(self):
        target = self.path / "out"
        target.write_text("old")
        with self.assertRaisesRegex(persist.PersistError, "a FIFO"):
            with persist.atomic_open(target) as file:
                file.write("new")
                os.unlink(target)
                os.mkfifo(target)
        self.assertTrue(stat.S_ISFIFO(os.lstat(target).st_mode))
        self.assertNoTemp()


@unittest.skipUnless(POSIX, "POSIX permission bits")
class TestAtomicPermissions(TempDirTest):
    def setUp(self):
        super().setUp()
        old = os.umask(0o027)
        self.addCleanup(os.umask, old)

    def test_new_file_gets_open_permissions(self):
        persist.atomic_write(self.path / "new", "x")
        with open(self.path / "plain", "w"):
            pass
        self.assertEqual(stat.S_IMODE(os.stat(self.path / "new").st_mode), 0o640)
        self.assertEqual(stat.S_IMODE(os.stat(self.path / "new").st_mode),
                         stat.S_IMODE(os.stat(self.path / "plain").st_mode))

    def test_replaced_file_keeps_its_bits(self):
        target = self.path / "old"
        target.write_text("old")
        os.chmod(target, 0o604)
        persist.atomic_write(target, "new")
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o604)
        self.assertEqual(target.read_text(), "new")


@unittest.skipUnless(ROOT, "root, to give files to another user")
class TestAtomicKeepsOwnerAsRoot(TempDirTest):
    def test_replaced_file_keeps_owner_group_and_mode(self):
        target = self.path / "theirs.txt"
        target.write_text("old")
        os.chown(target, NOBODY, NOBODY)
        os.chmod(target, 0o600)               # its owner alone may read it
        persist.atomic_write(target, "new")
        with persist.atomic_open(target, "wb") as file:
            file.write(b"newer")
        info = os.stat(target)
        self.assertEqual((info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)),
                         (NOBODY, NOBODY, 0o600))
        self.assertEqual(target.read_bytes(), b"newer")

    def test_setgid_bit_survives_the_chown(self):
        target = self.path / "tool"
        target.write_text("old")
        os.chown(target, NOBODY, NOBODY)
        os.chmod(target, 0o2755)              # chown clears it: it must be set again after
        persist.atomic_write(target, "new")
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o2755)

    # In a directory others may write, the temporary file's name may become a link.
    def test_mode_is_not_set_through_the_link(self):
        victim = self.path / "shadow"
        victim.write_text("secret")
        os.chmod(victim, 0o600)
        team = self.path / "team"
        team.mkdir()
        target = team / "theirs"
        target.write_text("old")
        os.chown(target, NOBODY, NOBODY)
        os.chmod(target, 0o666)
        real_fchown = os.fchown

        def swap_then_fchown(fd, uid, gid):     # what a member of the team could do meanwhile
            temp, = [name for name in os.listdir(team) if name.endswith(".tmp")]
            os.unlink(team / temp)
            os.symlink(victim, team / temp)
            return real_fchown(fd, uid, gid)

        with mock.patch("os.fchown", swap_then_fchown):
            persist.atomic_write(target, "new")
        self.assertEqual(stat.S_IMODE(os.stat(victim).st_mode), 0o600)


@unittest.skipUnless(ROOT and hasattr(os, "setgroups"), "root, to act as a group member")
class TestAtomicKeepsGroupAsMember(TempDirTest):
    TEAM = 54321                              # a group nobody is made a member of

    def test_group_member_keeps_the_group(self):
        os.chmod(self.dir, 0o755)
        team = self.path / "team"
        team.mkdir()
        os.chmod(team, 0o777)                 # not setgid: new files get the writer's group
        target = team / "plan.txt"
        target.write_text("old")
        os.chown(target, 0, self.TEAM)
        os.chmod(target, 0o664)
        run_python("""
            import os, persist
            os.setgroups([%d])
            os.setgid(%d)
            os.setuid(%d)
            persist.atomic_write(%r, "new")
        """ % (self.TEAM, NOBODY, NOBODY, str(target)))
        info = os.stat(target)
        # root's ownership cannot be kept by nobody (documented); the group can
        self.assertEqual((info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)),
                         (NOBODY, self.TEAM, 0o664))
        self.assertEqual(target.read_text(), "new")
        self.assertNoTemp()


@unittest.skipUnless(ROOT, "root, to plant a link as another user")
class TestAtomicLinkPlantedInSharedDirectory(TempDirTest):
    """A link another user planted in a sticky world-writable directory is not followed."""

    def setUp(self):
        super().setUp()
        os.chmod(self.dir, 0o755)                 # nobody may reach the shared directory
        self.shared = self.path / "tmp"
        self.shared.mkdir()
        os.chmod(self.shared, 0o1777)             # as /tmp
        self.victim = self.path / "passwd"
        self.victim.write_text("root:x:0:0\n")

    def test_link_of_another_user_is_refused(self):
        report = self.shared / "report.txt"
        run_python("""
            import os
            os.setgid(%d)
            os.setuid(%d)
            os.symlink(%r, %r)
        """ % (NOBODY, NOBODY, str(self.victim), str(report)))
        with self.assertRaises(PermissionError) as caught:
            persist.atomic_write(report, "the nightly report\n")
        self.assertEqual(caught.exception.filename, report)
        self.assertIn("user %d" % NOBODY, caught.exception.strerror)
        self.assertEqual(self.victim.read_text(), "root:x:0:0\n")
        self.assertNoTemp()

    def test_own_link_is_followed(self):
        link = self.shared / "mine.txt"
        os.symlink(self.victim, link)
        persist.atomic_write(link, "new")
        self.assertTrue(link.is_symlink())
        self.assertEqual(self.victim.read_text(), "new")


@slow
class TestAtomicInterruptedAtEachStep(TempDirTest):
    """Ctrl-C raised at each step of atomic_write() and atomic_open() in turn, some where no
    try can cover them (as the temporary file's name is returned, as a with statement
    enters): the target is whole at every step, and no temporary file outlives the process."""

    def test_no_temporary_file_outlives_the_process(self):
        out = run_python("""
            import contextlib, os, sys, persist
            target = os.path.join(%r, "out")
            persist.atomic_write(target, "0000")
            watched = (persist.__file__, contextlib.__file__)
            calls = [0, 0]
            def tracer(frame, event, arg):
                if frame.f_code.co_filename not in watched:
                    return None
                calls[0] += 1
                if calls[0] == calls[1]:
                    raise KeyboardInterrupt
                return tracer
            def write_with_atomic_open(data):
                with persist.atomic_open(target) as file:
                    file.write(data)
            whole = True
            for write in (persist.atomic_write, write_with_atomic_open):
                for n in range(1, 1000):
                    calls[:] = [0, n]
                    sys.settrace(tracer)
                    try:
                        write(target, "%%04d" %% n) if write is persist.atomic_write \
                            else write("%%04d" %% n)
                    except KeyboardInterrupt:
                        pass
                    finally:
                        sys.settrace(None)
                    with open(target) as file:
                        whole = whole and len(file.read()) == 4
                    if calls[0] < n:          # nothing left to interrupt
                        break
            print(whole, n > 50)
        """ % self.dir)
        self.assertEqual(out, "True True\n")
        self.assertNoTemp()


class TestInterruptAfterTheCommit(TempDirTest):
    """Ctrl-C raised just after atomic_write() renamed its temporary file onto the target;
    then another program links the target under that temporary name. The exit removes
    nothing: the name is not a file of ours any more, though its inode is the same."""

    def test_exit_removes_no_file_made_later_under_the_name(self):
        out = run_python("""
            import linecache, os, sys, persist
            target = os.path.join(%r, "out")
            temps = []
            def tracer(frame, event, arg):
                if frame.f_code.co_filename != persist.__file__:
                    return None
                if event == "line" and "temp" in frame.f_locals and not temps:
                    temp = frame.f_locals["temp"]
                    if isinstance(temp, str) and os.path.exists(temp) is False \\
                            and os.path.exists(target):
                        temps.append(temp)        # renamed already: interrupt here
                        raise KeyboardInterrupt
                return tracer
            sys.settrace(tracer)
            try:
                persist.atomic_write(target, "new")
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            os.link(target, temps[0])             # another program's name for the file
            print(len(temps), open(target).read())
        """ % self.dir)
        self.assertEqual(out, "1 new\n")
        self.assertEqual(len(os.listdir(self.dir)), 2)


@slow
@unittest.skipUnless(hasattr(signal, "setitimer") and sys.version_info >= (3, 11),
                     "interval timers; before 3.11 the interpreter also takes signals on "
                     "instructions between the creation and the try, a window too narrow to "
                     "close there")
class TestAtomicCtrlCWhileCreatingTemp(TempDirTest):
    """A Ctrl-C that lands during the open() of the temporary file leaves nothing behind."""

    def test_no_stray_file_nor_descriptor(self):
        out = run_python("""
            import os, random, signal, persist
            target = os.path.join(%r, "out")
            signal.signal(signal.SIGALRM, signal.default_int_handler)
            before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
            interrupted = 0
            for i in range(400):
                try:
                    signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-6, 2e-4))
                    try:
                        persist.atomic_write(target, "x" * 100, sync=False)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except KeyboardInterrupt:
                    interrupted += 1
            after = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
            print(interrupted, after - before)
        """ % self.dir)
        interrupted, leaked = map(int, out.split())
        self.assertGreater(interrupted, 0)       # else the test tested nothing
        self.assertEqual(leaked, 0)
        self.assertNoTemp()


@unittest.skipUnless(hasattr(os, "fork"), "fork")
class TestForkedInsideABlock(TempDirTest):
    """A child forked inside an atomic_open() block, its copy of the parent's unflushed
    buffer with it: whether it leaves the block by an exception or normally, the parent's
    file gets nothing from it, and only the parent commits. Inside done_dir(): only the
    parent finishes the stage."""

    def test_child_leaves_the_parents_file_alone(self):
        out = run_python("""
            import os, persist
            target = os.path.join(%r, "out")
            for how in ("exception", "normally"):
                child = False
                try:
                    with persist.atomic_open(target) as file:
                        file.write("parent's, " + how)       # in the buffer at fork
                        pid = os.fork()
                        child = pid == 0
                        if child and how == "exception":
                            raise ValueError("the child's error")
                        if not child:
                            _, status = os.waitpid(pid, 0)
                except BaseException as exc:
                    if child:
                        forked = isinstance(exc, RuntimeError) and "forked" in str(exc)
                        os._exit(1 if isinstance(exc, ValueError) else 2 if forked else 3)
                    raise
                if child:
                    os._exit(4)
                with open(target) as file:
                    print(file.read(), status >> 8)
        """ % self.dir)
        self.assertEqual(out, "parent's, exception 1\nparent's, normally 2\n")
        self.assertNoTemp()

    def test_child_leaving_a_done_dir_writes_no_marker(self):
        out = run_python("""
            import os, persist
            stage = os.path.join(%r, "stage")
            child = False
            try:
                with persist.done_dir(stage):
                    pid = os.fork()
                    child = pid == 0
                    if not child:
                        _, status = os.waitpid(pid, 0)
                        print(persist.is_done(stage), status >> 8)
            except RuntimeError as exc:
                os._exit(2 if child and "forked" in str(exc) else 3)
            if child:
                os._exit(4)
            print(persist.is_done(stage))
        """ % self.dir)
        self.assertEqual(out, "False 2\nTrue\n")

    # One thread is in an atomic_open() block, its text still in the buffer, when another
    # forks; the child exits normally. The writing thread is not in the child and never leaves
    # the block there, but PyPy flushes every open file at exit: the parent's file must not get
    # the child's copy of the buffer too.
    def test_child_exit_adds_nothing_to_the_parents_file(self):
        out = run_python("""
            import os, sys, threading, persist
            target = os.path.join(%r, "out")
            inside, finish = threading.Event(), threading.Event()
            def write():
                with persist.atomic_open(target) as file:
                    file.write("parent's")
                    inside.set()
                    finish.wait()
            writer = threading.Thread(target=write)
            writer.start()
            inside.wait()
            pid = os.fork()
            if pid == 0:
                sys.exit(0)                  # a normal exit: files are flushed
            _, status = os.waitpid(pid, 0)
            finish.set()
            writer.join()
            with open(target) as file:
                print(file.read(), status >> 8)
        """ % self.dir)
        self.assertEqual(out, "parent's 0\n")
        self.assertNoTemp()


@slow
@unittest.skipUnless(POSIX, "SIGKILL")
class TestAtomicKilled(TempDirTest):
    def test_target_is_whole_after_every_kill(self):
        target = self.path / "target"
        contents = [bytes([65 + i]) * (256 * 1024 + i) for i in range(4)]
        target.write_bytes(contents[0])
        # One interpreter imports persist once and forks a writer per line it reads: 25 fresh
        # interpreters took 1.5 s to start. It answers each line with the writer's pid, and
        # reaps the writer when asked, so the test reads the target only once the kill landed.
        code = """
            import os, sys, persist
            contents = [bytes([65 + i]) * (256 * 1024 + i) for i in range(4)]
            for line in sys.stdin:
                if line == "fork\\n":
                    writer = os.fork()
                    if writer == 0:
                        i = 0
                        while True:
                            i += 1
                            persist.atomic_write(%r, contents[i %% 4], sync=i %% 2 == 0)
                    print(writer, flush=True)
                else:
                    os.waitpid(writer, 0)
                    print("reaped", flush=True)
        """ % str(target)
        forker = start_python(self, code)
        rng = random.Random(7)
        for _ in range(25):
            forker.stdin.write("fork\n")
            forker.stdin.flush()
            writer = int(forker.stdout.readline())
            threading.Event().wait(rng.uniform(0, 0.05))
            os.kill(writer, signal.SIGKILL)
            forker.stdin.write("reap\n")
            forker.stdin.flush()
            self.assertEqual(forker.stdout.readline(), "reaped\n")
            self.assertIn(target.read_bytes(), contents)
        for name in temp_files(self.dir):      # what a SIGKILL can leave: telling names only
            self.assertRegex(name, r"^\.target\.[0-9a-f]+\.tmp$")


# -- done_dir and is_done


class TestDoneDir(TempDirTest):
    def test_marker_written_last(self):
        out = self.path / "work" / "features"
        self.assertFalse(persist.is_done(out))
        with persist.done_dir(out) as d:
            self.assertIsInstance(d, pathlib.Path)
            self.assertTrue(d.is_dir())
            (d / "a.json").write_text("12345")
            persist.atomic_write(d / "b.json", "67")
            self.assertFalse(persist.is_done(out))
        self.assertTrue(persist.is_done(out))
        record = json.loads((out / "DONE").read_text())
        self.assertEqual((record["files"], record["bytes"]), (2, 7))
        self.assertTrue(record["finished"].endswith("Z"))
        self.assertNoTemp()

    def test_record_counts_subdirectories_and_not_through_links(self):
        outside = self.path / "outside"
        outside.mkdir()
        (outside / "big").write_bytes(b"x" * 1000)
        out = self.path / "out"
        with persist.done_dir(out) as d:
            (d / "a").write_text("12345")
            (d / "sub" / "deeper").mkdir(parents=True)
            (d / "sub" / "b").write_text("678")
            (d / "sub" / "DONE").write_text("9")          # only the top marker is left out
            (d / "sub" / "deeper" / "c").write_text("10")
            if POSIX:
                os.symlink(str(outside), str(d / "link"))  # counted as a link, not followed
        record = json.loads((out / "DONE").read_text())
        links = [os.lstat(str(out / "link")).st_size] if POSIX else []
        self.assertEqual((record["files"], record["bytes"]), (4 + len(links), 11 + sum(links)))

    def test_exception_leaves_no_marker_and_keeps_files(self):
        out = self.path / "out"
        for error in (Boom, KeyboardInterrupt):
            with self.assertRaises(error):
                with persist.done_dir(out) as d:
                    (d / "partial").write_text("x")
                    raise error()
            self.assertFalse(persist.is_done(out))
            self.assertEqual(os.listdir(out), ["partial"])

    @slow
    @unittest.skipUnless(POSIX, "SIGKILL, and the file locks that tell a dead writer's file")
    def test_temporary_file_of_a_killed_writer_is_neither_counted_nor_kept(self):
        out = self.path / "out"
        # a stage killed with SIGKILL in the middle of an atomic_write(), in a subdirectory
        # too: its temporary files stay; a rerun finishes the stage around them
        stage = start_python(self, """
            import sys, persist
            with persist.done_dir(%r) as d:
                (d / "sub").mkdir()
                for i in range(40):
                    persist.atomic_write(d / ("%%02d" %% i), "done")
                blocks = [persist.atomic_open(d / "big"), persist.atomic_open(d / "sub" / "x")]
                for block in blocks:
                    block.__enter__().write("half")
                print("writing", flush=True)
                sys.stdin.readline()
        """ % str(out))
        self.assertEqual(stage.stdout.readline(), "writing\n")
        stage.kill()
        stage.wait()
        left = temp_files(out)
        self.assertEqual(len(left), 2)
        (out / ".notes.tmp").write_text("mine")       # not of persist's shape: a result
        # another process's atomic_open() under way in the stage as it finishes: not a
        # result yet, never counted, and it commits afterwards
        writer = start_python(self, """
            import sys, persist
            with persist.atomic_open(%r) as file:
                file.write("late")
                print("writing", flush=True)
                sys.stdin.readline()
            print("committed", flush=True)
        """ % str(out / "late"))
        self.assertEqual(writer.stdout.readline(), "writing\n")
        removed = sorted("done_dir() removed %s" % (where / name) for where in (out, out / "sub")
                         for name in left if (where / name).exists())
        with self.assertWarns(persist.PersistWarning) as warned:
            with persist.done_dir(out):
                pass
        self.assertEqual(sorted(str(w.message).split(":")[0] for w in warned.warnings), removed)
        record = json.loads((out / "DONE").read_text())
        self.assertEqual((record["files"], record["bytes"]), (41, 40 * 4 + 4))
        live, = set(temp_files(out)) - {".notes.tmp"}   # the live writer's, and only it
        self.assertTrue(live.startswith(".late."), live)
        self.assertEqual(writer.communicate("go\n", timeout=300)[0], "committed\n")
        self.assertEqual((out / "late").read_text(), "late")
        self.assertEqual((out / ".notes.tmp").read_text(), "mine")
        self.assertNoTemp(out / "sub")

    @unittest.skipUnless(POSIX, "the file locks that tell a dead writer's file")
    def test_a_file_named_as_a_temporary_one_is_never_removed_silently(self):
        # persist cannot tell a user's file of that shape from a killed writer's: it says so
        out = self.path / "out"
        (out / "sub").mkdir(parents=True)
        (out / "sub" / ".notes.1234abcd.tmp").write_text("mine")
        with self.assertWarns(persist.PersistWarning) as warned:
            with persist.done_dir(out):
                pass
        self.assertIn("done_dir() removed %s: " % (out / "sub" / ".notes.1234abcd.tmp"),
                      str(warned.warning))
        self.assertIn("name your own files otherwise", str(warned.warning))
        self.assertEqual(warned.filename, __file__)
        self.assertNoTemp(out)

    @unittest.skipUnless(POSIX, "flock")
    def test_a_filesystem_without_locks_still_finishes_the_stage(self):
        # some NFS and FUSE mounts refuse flock(): the stage runs unlocked, as on Windows,
        # and an atomic_write() temporary file nobody can prove dead is kept, uncounted
        out = self.path / "out"
        out.mkdir()
        (out / ".x.0123abcd.tmp").write_text("whose?")

        def flock(fd, operation):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

        with mock.patch.object(persist._fcntl, "flock", flock):
            with persist.done_dir(out) as d:
                persist.atomic_write(d / "a", "done")
        self.assertTrue(persist.is_done(out))
        record = json.loads((out / "DONE").read_text())
        self.assertEqual((record["files"], record["bytes"]), (1, 4))
        self.assertEqual((out / ".x.0123abcd.tmp").read_text(), "whose?")

    def test_redo_removes_old_marker_first(self):
        out = self.path / "out"
        with persist.done_dir(out) as d:
            (d / "a").write_text("old")
        with self.assertRaises(Boom):
            with persist.done_dir(out) as d:
                self.assertFalse(persist.is_done(out))
                self.assertEqual(os.listdir(d), ["a"])
                raise Boom
        self.assertFalse(persist.is_done(out))

    @unittest.skipUnless(POSIX, "directory fsync is POSIX")
    @PLAIN_FSYNC
    def test_old_marker_removal_is_durable_before_the_block(self):
        out = self.path / "out"
        with persist.done_dir(out):
            pass
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), persist.is_done(out)))
            real_fsync(fd)

        with mock.patch("os.fsync", fsync):
            with persist.done_dir(out):
                self.assertEqual(synced, [(True, False)])
        self.assertTrue(persist.is_done(out))
        self.assertIn((True, False), synced[1:])     # the directory, before the marker

    def test_clean(self):
        out = self.path / "out"
        (out / "sub").mkdir(parents=True)
        (out / "sub" / "x").write_text("x")
        (out / "y").write_text("y")
        with persist.done_dir(out, clean=True) as d:
            self.assertEqual(os.listdir(d), [])

    def test_hadoop_marker(self):
        out = self.path / "out"
        with persist.done_dir(out, marker="_SUCCESS"):
            pass
        self.assertTrue((out / "_SUCCESS").is_file())
        self.assertTrue(persist.is_done(out, marker="_SUCCESS"))
        self.assertFalse(persist.is_done(out))

    def test_path_is_a_file(self):
        path = self.path / "file"
        path.write_text("x")
        with self.assertRaises(NotADirectoryError) as caught:
            with persist.done_dir(path):
                pass
        self.assertEqual(caught.exception.filename, path)
        with self.assertRaises(NotADirectoryError):     # at the call already
            persist.done_dir(path)

    def test_bad_marker(self):
        for marker in ("", "a/b", "..", 5):
            with self.assertRaisesRegex(ValueError, "marker"):
                with persist.done_dir(self.path / "x", marker=marker):
                    pass

    @unittest.skipUnless(hasattr(os, "symlink") and POSIX, "needs symbolic links")
    def test_planted_symlink_at_marker(self):
        victim = self.path / "victim"
        victim.write_text("precious")
        out = self.path / "out"
        out.mkdir()
        os.symlink(victim, out / "DONE")
        with persist.done_dir(out) as d:
            self.assertFalse((d / "DONE").exists())
            os.symlink(victim, d / "DONE")
        self.assertEqual(victim.read_text(), "precious")
        self.assertFalse((out / "DONE").is_symlink())
        self.assertTrue(persist.is_done(out))

    # Ctrl-C raised as the with statement calls done_dir()'s __exit__, before it runs: the
    # stage is abandoned, and doing it again in this process works at once. On PyPy the
    # abandoned generator, and the lock it holds, waited for the next garbage collection.
    def test_the_stage_can_be_done_again(self):
        out = run_python("""
            import contextlib, os, sys, persist
            stage = os.path.join(%r, "stage")
            def tracer(frame, event, arg):
                if event == "call" and frame.f_code.co_filename == contextlib.__file__ \\
                        and frame.f_code.co_name == "__exit__":
                    raise KeyboardInterrupt
                return None
            try:
                with persist.done_dir(stage):
                    sys.settrace(tracer)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            print(persist.is_done(stage))
            with persist.done_dir(stage):
                pass
            print(persist.is_done(stage))
        """ % self.dir)
        self.assertEqual(out, "False\nTrue\n")


@unittest.skipUnless(POSIX, "locks and SIGKILL")
class Listed(list):
    """What os.scandir returns, as a list read before anything else happens."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


class TestDoneDirWhileFilesComeAndGo(TempDirTest):
    """Another tool's temporary file vanishes between listing and counting it."""

    def finish_while_removing(self, victim, remove):
        real_scandir = os.scandir

        def scandir_then_remove(path="."):
            with real_scandir(path) as entries:
                listed = Listed(entries)
            if os.path.lexists(victim) and any(e.name == victim.name for e in listed):
                remove(victim)
            return listed

        out = self.path / "out"
        with mock.patch("os.scandir", scandir_then_remove):
            with persist.done_dir(out) as d:
                (d / "kept").write_text("12345")
                self.assertEqual(victim.parent, d)
                if remove is os.unlink:
                    victim.write_text("temporary")
                else:
                    victim.mkdir()
                    (victim / "inner").write_text("x")
        self.assertTrue(persist.is_done(out))
        self.assertFalse(os.path.lexists(victim))
        record = json.loads((out / "DONE").read_text())
        self.assertEqual((record["files"], record["bytes"]), (1, 5))

    def test_file_that_vanishes(self):
        self.finish_while_removing(self.path / "out" / "x.tmp", os.unlink)

    def test_directory_that_vanishes(self):
        import shutil
        self.finish_while_removing(self.path / "out" / "scratch", shutil.rmtree)


class TestDoneDirRelativePathAndChdir(TempDirTest):
    def test_marker_goes_to_the_directory_given_at_entry(self):
        self.addCleanup(os.chdir, os.getcwd())
        (self.path / "elsewhere").mkdir()
        os.chdir(self.dir)
        with persist.done_dir("stage") as d:
            (d / "a").write_text("1")
            os.chdir(self.path / "elsewhere")
        self.assertTrue(persist.is_done(self.path / "stage"))
        self.assertEqual(os.listdir(self.path / "elsewhere"), [])

    def test_files_written_through_d_after_chdir_land_with_the_marker(self):
        self.addCleanup(os.chdir, os.getcwd())
        (self.path / "elsewhere").mkdir()
        os.chdir(self.dir)
        with persist.done_dir("stage") as d:
            os.chdir(self.path / "elsewhere")
            (d / "a").write_text("1")          # d was relative: this went to elsewhere/stage
        self.assertEqual(sorted(os.listdir(self.path / "stage")), ["DONE", "a"])
        self.assertEqual(os.listdir(self.path / "elsewhere"), [])


class TestDoneDirDurability(TempDirTest):
    """Every file in the directory is fsynced before the marker is written."""

    def record_fsyncs(self):
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append(os.fstat(fd).st_ino)
            return real_fsync(fd)

        return synced, mock.patch("os.fsync", fsync)

    def test_files_and_subdirectories_are_synced_before_the_marker(self):
        synced, patch = self.record_fsyncs()
        out = self.path / "out"
        with PLAIN_FSYNC, patch:
            with persist.done_dir(out) as d:
                (d / "a.json").write_text("1")
                (d / "sub").mkdir()
                (d / "sub" / "b.json").write_text("2")
                persist.atomic_write(d / "c.json", "3", sync=False)
                for i in range(40):              # enough for several threads to share
                    (d / "sub" / ("%d.json" % i)).write_text("4")
                if POSIX:
                    os.mkfifo(d / "fifo")        # counted, never opened: no hang
        marker = os.stat(out / "DONE").st_ino
        names = ["a.json", "sub/b.json", "c.json", "sub"] + ["sub/%d.json" % i for i in range(40)]
        for name in names:
            inode = os.stat(out / name).st_ino
            self.assertIn(inode, synced, name)
            self.assertLess(synced.index(inode), synced.index(marker), name)
        self.assertEqual(json.loads((out / "DONE").read_text())["files"], 43 + POSIX)

    def test_failed_fsync_means_no_marker(self):
        out = self.path / "out"
        out.mkdir()
        (out / "a.json").write_text("1")
        bad = os.stat(out / "a.json").st_ino
        real_fsync = os.fsync

        def fsync(fd):
            if os.fstat(fd).st_ino == bad:
                raise OSError(errno.EIO, "Input/output error")
            return real_fsync(fd)

        with PLAIN_FSYNC, mock.patch("os.fsync", fsync):
            with self.assertRaises(OSError) as caught:
                with persist.done_dir(out):
                    pass
        self.assertEqual(caught.exception.errno, errno.EIO)
        self.assertEqual(caught.exception.filename, os.path.join(str(out), "a.json"))
        self.assertFalse(persist.is_done(out))
        self.assertNoTemp()


class TestDoneDirProcesses(TempDirTest):
    def test_second_entrant_gets_a_clear_error(self):
        out = self.path / "out"
        child = start_python(self, """
            import sys, persist
            with persist.done_dir(%r):
                print("inside", flush=True)
                sys.stdin.readline()
        """ % str(out))
        self.assertEqual(child.stdout.readline(), "inside\n")
        with self.assertRaisesRegex(persist.PersistError, "another done_dir"):
            with persist.done_dir(out):
                pass
        stop(child)
        with persist.done_dir(out):      # a killed holder leaves no stale lock
            pass
        self.assertTrue(persist.is_done(out))

    def test_killed_inside_block_leaves_no_marker(self):
        out = self.path / "out"
        with persist.done_dir(out):
            pass
        child = start_python(self, """
            import persist, sys
            with persist.done_dir(%r) as d:
                (d / "part").write_text("x")
                print("inside", flush=True)
                sys.stdin.readline()
        """ % str(out))
        self.assertEqual(child.stdout.readline(), "inside\n")
        child.send_signal(signal.SIGKILL)
        stop(child)
        self.assertFalse(persist.is_done(out))
        self.assertEqual(os.listdir(out), ["part"])


@unittest.skipUnless(POSIX, "done_dir() detects a second one on POSIX")
class TestDoneDirBusyMessage(TempDirTest):
    def test_message_names_the_directory_once(self):
        with persist.done_dir(self.path / "stage") as d:
            with self.assertRaises(persist.PersistError) as caught:
                with persist.done_dir(d):
                    pass
        message = str(caught.exception)
        self.assertEqual(message.count(str(d)), 1, message)
        self.assertIn("another done_dir()", message)
        self.assertEqual(caught.exception.reason, persist.PersistError.BUSY)


@slow
@unittest.skipUnless(hasattr(signal, "setitimer"), "setitimer")
class TestDoneDirInterrupted(TempDirTest):
    def test_ctrl_c_while_syncing_never_hangs_the_exit(self):
        done = run_command(["-c", textwrap.dedent("""
            import os, random, signal, sys, persist
            def interrupt(signum, frame):
                raise KeyboardInterrupt
            signal.signal(signal.SIGALRM, interrupt)
            interrupted = 0
            for n in range(60):
                stage = os.path.join(sys.argv[1], "s%d" % n)
                try:
                    try:
                        with persist.done_dir(stage) as d:
                            for i in range(40):        # past the count where threads sync
                                with open(os.path.join(d, "f%d" % i), "w") as f:
                                    f.write("x")
                            signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0001, 0.003))
                    finally:
                        # disarmed inside the try: an alarm due after the stage ended (its
                        # sync took less than the delay) interrupts nothing of persist's
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except KeyboardInterrupt:
                    interrupted += 1
            print(interrupted > 0)
        """), self.dir], timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)     # it exited: no thread hangs
        self.assertEqual(done.stdout, "True\n")


class TestIsDone(TempDirTest):
    def test_foreign_marker_counts(self):
        (self.path / "DONE").touch()
        self.assertTrue(persist.is_done(self.dir))
        self.assertTrue(persist.is_done(os.fsencode(self.dir)))

    def test_missing_or_file(self):
        self.assertFalse(persist.is_done(self.path / "missing"))
        (self.path / "file").write_text("x")
        self.assertFalse(persist.is_done(self.path / "file"))
        (self.path / "DONE").mkdir()
        self.assertFalse(persist.is_done(self.path))


# -- the store: connections and the write-ahead log


class TestWriteAheadLog(MemoTest):
    """The write-ahead log stays bounded and goes at exit: no reader holds it back, Ctrl-C in
    its restart reaches the user, a run leaves little more than its data."""

    def test_checkpoint_is_not_held_back_by_an_idle_reader(self):
        f = self.memo(lambda x: x, name="idle")
        f(1)
        self.assertEqual(f(1), 1)          # a hit: it must leave no read transaction open
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="idle")
            def f(x):
                return x
            for i in range(300):
                f(i)
        """ % self.dir)
        # The checkpoint is tried every 20 ms and must succeed within 0.5 s (an idle process
        # that held a read transaction would keep it from ever restarting the log).
        deadline = __import__("time").monotonic() + 0.5
        while True:
            conn = sqlite3.connect(os.path.join(self.dir, "idle.db"), timeout=0)
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            conn.close()
            if busy == 0 or __import__("time").monotonic() > deadline:
                break
            threading.Event().wait(0.02)
        self.assertEqual(busy, 0)
        self.assertEqual(f(299), 299)      # and the other process's results are hits
        self.assertEqual(len(f.calls), 1)

    def test_one_writer_keeps_the_log_small(self):
        # SQLite's own checkpoint starts the log over once it holds a few MB, as a bare table
        # does; it grew to 16 MB, which persist's restart (a TRUNCATE, 28 ms) waited for
        cache = self.path / "shelf"
        largest = 0
        with persist.open(cache) as shelf:
            for i in range(3000):
                shelf["k%d" % i] = b"x" * 2000
                largest = max(largest, os.path.getsize(str(cache) + "-wal"))
        self.assertLess(largest, 8 << 20)

    def test_a_cache_with_16_kb_pages_keeps_them_and_works(self):
        # caches made before 4 KB pages: served, stored to, never rewritten, and their log
        # too stays small (SQLite's checkpoint counts pages, of either size)
        cache = self.path / "shelf"
        with persist.open(cache) as shelf:
            shelf["old"] = 1
        conn = sqlite3.connect(str(cache), isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE").fetchall()
        conn.execute("PRAGMA page_size=16384")
        conn.execute("VACUUM")
        conn.execute("PRAGMA journal_mode=WAL").fetchall()
        self.assertEqual(conn.execute("PRAGMA page_size").fetchall(), [(16384,)])
        conn.close()
        largest = 0
        with persist.open(cache) as shelf:
            self.assertEqual(shelf["old"], 1)
            for i in range(1000):
                shelf["k%d" % i] = b"x" * 6000
                largest = max(largest, os.path.getsize(str(cache) + "-wal"))
            self.assertEqual((len(shelf), shelf["k999"]), (1001, b"x" * 6000))
        self.assertLess(largest, 8 << 20)
        conn = sqlite3.connect(str(cache), isolation_level=None)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA page_size").fetchall(), [(16384,)])

    # Ctrl-C while a store restarts the log (waiting for an old reader) reaches the user,
    # and the shelf stays usable in that process.
    @unittest.skipUnless(POSIX, "SIGINT to a child")
    def test_store_after_ctrl_c_in_the_restart(self):
        path = str(self.path / "shelf")
        child = start_python(self, """
            import signal, sqlite3, sys
            signal.signal(signal.SIGINT, signal.default_int_handler)
            connect = sqlite3.connect

            def trace(sql, said=[]):           # says when persist first starts the restart
                if "wal_checkpoint(TRUNCATE)" in sql and not said:
                    said.append(print("restarting", flush=True))

            def traced(*args, **kwargs):
                conn = connect(*args, **kwargs)
                conn.set_trace_callback(trace)
                return conn

            sqlite3.connect = traced
            import persist
            persist._LOG_LIMIT = 1 << 20     # a restart after 32 stores, not after 110
            shelf = persist.open(%r)
            shelf["first"] = 0
            print("open", flush=True)
            sys.stdin.readline()
            try:
                for i in range(32):
                    shelf[str(i)] = b"x" * 150000
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            shelf["after"] = 1
            print("stored", shelf["after"], flush=True)
            shelf.close()
        """ % path)
        self.assertEqual(child.stdout.readline(), "open\n")
        # An old read transaction: the restart waits for it, inside SQLite
        reader = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM Dict").fetchall()
        child.stdin.write("go\n")
        child.stdin.flush()
        self.assertEqual(child.stdout.readline(), "restarting\n")
        # Past the trace callback (an interrupt there is lost): the child holds the
        # checkpoint's lock, and ours is refused at once, while it waits for the reader
        probe = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(probe.close)
        while not probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][0]:
            pass
        child.send_signal(signal.SIGINT)
        reader.execute("COMMIT")
        # PyPy: the checkpoint's statement, left unfinished by the interrupt, failed every
        # later commit of the process ("SQL statements in progress")
        self.assertEqual(child.stdout.read(), "interrupted\nstored 1\n")
        self.assertEqual(child.wait(), 0)


@slow
class TestLogStaysBounded(TempDirTest):
    """Processes calling a slow memoized function do not make the write-ahead log grow
    without bound, and a normal exit leaves no log behind."""

    WORKER = """
        import sys, time, persist
        @persist.memoize(cache_dir=sys.argv[1], name="slow")
        def f(x):
            return {"x": x, "pad": "p" * 2000}
        start, deadline = int(sys.argv[2]), time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            f(start + i)
            f(i % 50)
            i += 1
    """

    def test_log_bounded_while_running_and_gone_after(self):
        workers = [spawn(self, [sys.executable, "-c", textwrap.dedent(self.WORKER), self.dir,
                                str(n * 1000000)]) for n in range(4)]
        wal = self.path / "slow.db-wal"
        largest = size = restarts = 0
        while any(worker.poll() is None for worker in workers):
            with contextlib.suppress(FileNotFoundError):
                now = wal.stat().st_size
                restarts += now < size        # a failure says whether restarts were seen
                size, largest = now, max(largest, now)
            threading.Event().wait(0.01)
        self.assertEqual([worker.wait() for worker in workers], [0, 0, 0, 0])
        # without restarts: 240 MB in this time, quiet
        self.assertLess(largest, 64 << 20, "the log was seen restarted %d times" % restarts)
        # The workers end together (equal deadlines), the case where each can see another
        # still open as it closes, and none removes the log but for persist's second look.
        self.assertFalse(wal.exists())
        self.assertFalse((self.path / "slow.db-shm").exists())


@slow
class TestDiskFootprint(TempDirTest):
    def test_a_normal_run_leaves_little_more_than_its_data(self):
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="small")
            def f(x):
                return {"id": x, "value": x * 1.5}
            for i in range(5000):
                f(i)
        """ % self.dir)
        names = sorted(os.listdir(self.dir))
        self.assertEqual(names, ["small.db"])
        size = (self.path / "small.db").stat().st_size
        payload = 5000 * (32 + len(pickle.dumps({"id": 4999, "value": 4999 * 1.5}, 5)))
        self.assertLess(size, 3 * payload)


@unittest.skipUnless(POSIX, "SQLite's shared-memory locks as fcntl() byte locks")
class TestLogRestartedPastAnotherCheckpoint(TempDirTest):
    """While another connection checkpoints (SQLite's automatic checkpoint in another
    process, say), SQLite answers persist's restart of the log with busy at once, without
    waiting: persist tries again, and the log does not stay past its limit."""

    # Another process checkpointing holds the checkpoint lock: byte 121 of the -shm file
    # (SQLite's walformat.html, "the WAL-index lock bytes"), which this one takes by hand.
    OTHER = """
        import fcntl, sys
        with open(sys.argv[1] + "-shm", "r+b") as shm:
            fcntl.lockf(shm, fcntl.LOCK_EX, 1, 121)
            print("checkpointing", flush=True)
            sys.stdin.readline()
    """

    def test_log_restarted(self):
        cache = self.path / "shelf"
        shelf = persist.open(cache)
        self.addCleanup(shelf.close)
        shelf["first"] = 1
        other = spawn(self, [sys.executable, "-c", textwrap.dedent(self.OTHER), str(cache)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(other.stdout.readline(), "checkpointing\n")
        # persist tries again: the other one is done
        with ended_as_persist_waits(other, "done\n") as tries:
            i = 0
            while not tries and i < 1000:       # past the limit, a restart every 32 stores
                shelf["k%d" % (i % 50)] = b"x" * 150000
                i += 1
        self.assertTrue(tries, "no restart was found busy")
        self.assertEqual(other.returncode, 0)
        self.assertLess(os.path.getsize(str(cache) + "-wal"), 1 << 20)   # not left at 16 MB


class TestCreationLeftHalfMade(TempDirTest):
    def test_temporary_files_of_a_killed_creator_go_at_the_next_open(self):
        path = self.path / "c.db"
        persist.open(path).close()
        stale = [self.path / (".c.db.0123abcd.new-cache.tmp" + suffix)
                 for suffix in ("", "-journal", "-wal", "-shm")]
        young = self.path / ".c.db.89abcdef.new-cache.tmp"
        for name in stale + [young]:
            name.write_bytes(b"x")
        for name in stale:
            os.utime(name, (0, 0))              # made long ago
        persist.open(path).close()
        self.assertEqual(sorted(os.listdir(self.dir)), [".c.db.89abcdef.new-cache.tmp", "c.db"])
        young.unlink()

    def test_an_atomic_open_beside_a_cache_of_its_stem_is_not_swept(self):
        # atomic_open("results.csv") writes .results.csv.RANDOM.tmp, which opening the cache
        # "results" swept once a minute old: the block then failed at its end, its content lost
        long = "r" * 70                         # cache names are cut to 60 in temporary names
        targets = [self.path / "results.csv", self.path / (long + "-other.csv")]
        writer = start_python(self, """
            import sys, persist
            blocks = [persist.atomic_open(path) for path in %r]
            files = [block.__enter__() for block in blocks]
            for file in files:
                file.write("the content")
            print("writing", flush=True)
            sys.stdin.readline()
            for block in blocks:
                block.__exit__(None, None, None)
            print("committed", flush=True)
        """ % [str(target) for target in targets])
        self.assertEqual(writer.stdout.readline(), "writing\n")
        temps = temp_files(self.dir)
        self.assertEqual(len(temps), 2)
        for name in temps:
            os.utime(self.path / name, (0, 0))  # as if the block had run for hours
        persist.open(self.path / "results").close()
        persist.open(self.path / long).close()
        self.assertEqual(temp_files(self.dir), temps)
        out, _ = writer.communicate("go\n", timeout=300)
        self.assertEqual(out, "committed\n")
        for target in targets:
            self.assertEqual(target.read_text(), "the content")


class TestDeletedCacheStaysDeleted(TempDirTest):
    def test_a_log_left_beside_a_deleted_cache_is_not_replayed(self):
        cache = self.path / "c.db"
        child = start_python(self, """
            import sys, persist
            db = persist.open(%r)
            db["old"] = "deleted result"
            print("stored", flush=True)
            sys.stdin.readline()
        """ % str(cache))
        self.assertEqual(child.stdout.readline(), "stored\n")
        self.assertTrue(pathlib.Path(str(cache) + "-wal").exists())
        shutil_copy = (cache.read_bytes(), pathlib.Path(str(cache) + "-wal").read_bytes())
        stop(child)
        # the user deletes NAME.db only; its -wal stays
        cache.unlink()
        pathlib.Path(str(cache) + "-wal").write_bytes(shutil_copy[1])
        with persist.open(cache) as db:
            self.assertEqual(list(db), [])

    def test_a_journal_left_beside_a_deleted_cache_is_not_replayed(self):
        # a transaction killed in the middle leaves a hot journal, which holds the pages as
        # they were; the user deletes NAME.db only, and a new cache takes its name
        cache = self.path / "c.db"
        with persist.open(cache) as db:
            db["old"] = "deleted result"
        conn = sqlite3.connect(str(cache), isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE").fetchall()
        conn.execute("PRAGMA synchronous=OFF")     # the journal's length says how many pages
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE Dict SET value = x'00'")
        conn.execute("PRAGMA user_version=0")
        journal = pathlib.Path(str(cache) + "-journal").read_bytes()
        conn.execute("ROLLBACK")
        conn.close()
        cache.unlink()
        pathlib.Path(str(cache) + "-journal").write_bytes(journal)
        with persist.open(cache) as db:
            self.assertEqual(list(db), [])


@unittest.skipUnless(POSIX and hasattr(os, "setuid"), "POSIX users")
class TestReadOnlyCache(TempDirTest):
    def setUp(self):
        super().setUp()
        os.chmod(self.dir, 0o755)
        self.cache = self.path / "cache"
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="f")
            def f(x):
                return x * 3
            for i in range(5):
                f(i)
            with persist.open(%r) as db:
                db["a"] = 1
        """ % (str(self.cache), str(self.cache / "shelf.db")))

    CHILD = """
        import warnings, persist
        calls = []
        @persist.memoize(cache_dir=%r, name="f")
        def f(x):
            calls.append(x)
            return x * 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print([f(i) for i in range(7)], calls)
        print(sorted({w.category.__name__ for w in caught}))
        with persist.open(%r, "r") as db:
            print(dict(db))
    """

    def check(self):
        code = textwrap.dedent(drop_privileges()) + textwrap.dedent(
            self.CHILD % (str(self.cache), str(self.cache / "shelf.db")))
        out = run_python(code).splitlines()
        self.assertEqual(out, ["[0, 3, 6, 9, 12, 15, 18] [5, 6]", "['PersistWarning']",
                               "{'a': 1}"])

    def test_read_only_directory(self):
        os.chmod(self.cache, 0o555)
        self.check()

    @slow
    def test_read_only_files_in_a_writable_directory(self):
        os.chown(self.cache, 65534, 65534)
        for name in os.listdir(self.cache):
            os.chmod(self.cache / name, 0o444)
        self.check()


@unittest.skipUnless(POSIX and hasattr(os, "setuid") and os.getuid() == 0, "root drops to nobody")
class TestUserWhoCannotWrite(TempDirTest):
    """A user who may not write the directory reads the cache as it is, and is told why nothing
    can be made there."""

    # A reader in a directory it may not write reads the file as immutable: never a value of
    # another key, never 'not a persist cache', while the owner writes, deletes, shrinks.
    @slow
    def test_values_are_right_or_missing(self):
        os.chmod(self.dir, 0o755)
        path = str(self.path / "c.db")
        with persist.open(path) as db:
            for i in range(50):
                db["k%d" % i] = ("k%d" % i, 0, b"v" * (i % 3 * 150000))
        # The reader opens first, while there is no -wal: SQLite can then only read the file
        # as immutable. Then the owner writes.
        reader = start_python(self, """
            import os, sys, time, persist
            import hashlib, inspect, reprlib, shelve, tempfile, shutil
            os.setgid(65534); os.setuid(65534)
            wrong = reads = errors = 0
            with persist.open(%r, "r") as db:
                db.get("k0")
                print("reading", flush=True)
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    for i in range(50):
                        key = "k%%d" %% i
                        try:
                            value = db.get(key)
                        except OSError as exc:      # the owner kept writing: honest, counted
                            if "kept changing" not in str(exc):
                                raise
                            errors += 1
                            continue
                        reads += 1
                        if value is not None and value[0] != key:
                            wrong += 1
            print(wrong, reads > 0, errors < reads / 100, flush=True)
        """ % path)
        self.assertEqual(reader.stdout.readline(), "reading\n")
        run_python("""
            import persist
            with persist.open(%r) as db:
                for n in range(1, 30):
                    for i in range(50):
                        key = "k%%d" %% i
                        if (i + n) %% 7 == 0:
                            db.pop(key, None)
                        else:
                            db[key] = (key, n, b"v" * ((i + n) %% 3 * 150000))
                    db.dict._give_back()
        """ % path)
        out = reader.stdout.readline()
        reader.stdin.close()
        reader.wait()
        reader.stdout.close()
        self.assertEqual(out, "0 True True\n")

    def test_reader_goes_on_after_the_writer_restarted_the_log_and_left(self):
        os.chmod(self.dir, 0o755)
        path = str(self.path / "c.db")
        owner = start_python(self, """
            import sys, persist
            db = persist.open(%r)
            db["k"] = "v"
            print("open", flush=True)
            sys.stdin.readline()
            for i in range(200):
                db["k%%d" %% i] = b"x" * 20000
            db.dict._give_back()        # the log restarted under the reader
            db.close()
            print("closed", flush=True)
            sys.stdin.readline()
        """ % path)
        self.assertEqual(owner.stdout.readline(), "open\n")
        reader = start_python(self, """
            import os, sys, persist
            import hashlib, inspect, reprlib, shelve, tempfile, shutil
            os.setgid(65534); os.setuid(65534)
            db = persist.open(%r, "r")
            print(db["k"], flush=True)      # through the owner's -shm
            sys.stdin.readline()
            print(db["k"], flush=True)      # they are gone now
        """ % path)
        self.assertEqual(reader.stdout.readline(), "v\n")
        owner.stdin.write("\n")
        owner.stdin.flush()
        self.assertEqual(owner.stdout.readline(), "closed\n")
        reader.stdin.write("\n")
        reader.stdin.flush()
        self.assertEqual(reader.stdout.readline(), "v\n")
        for child in (owner, reader):
            stop(child)

    def test_results_in_a_surviving_log_are_served(self):
        os.chmod(self.dir, 0o755)
        cache = self.path / "cache"
        cache.mkdir()
        child = start_python(self, """
            import sys, persist
            @persist.memoize(cache_dir=%r, name="job")
            def f(x):
                return x * 10
            print(f(1), f(2), flush=True)
            sys.stdin.readline()
        """ % str(cache))
        self.assertEqual(child.stdout.readline(), "10 20\n")
        stop(child)                           # killed: its -wal holds the results
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(cache / "job.db-shm"))
        self.assertTrue((cache / "job.db-wal").exists())
        os.chmod(cache, 0o555)
        self.addCleanup(os.chmod, cache, 0o755)
        out = run_python("""
            import os, warnings, persist
            import hashlib, inspect, reprlib, shelve, tempfile, shutil    # before /root goes
            os.setgid(65534); os.setuid(65534)
            @persist.memoize(cache_dir=%r, name="job")
            def f(x):
                raise AssertionError("computed, not served")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                print(f(1), f(2))
            with persist.open(%r, "r") as db:
                print(len(db))
        """ % (str(cache), str(cache / "job.db")))
        self.assertEqual(out, "10 20\n2\n")

    def test_the_message_names_the_directory(self):
        os.chmod(self.dir, 0o755)
        out = run_python("""
            import os, persist
            import hashlib, inspect, reprlib, shelve, tempfile, shutil
            os.setgid(65534); os.setuid(65534)
            try:
                persist.open(%r)
            except PermissionError as exc:
                print(exc.filename, "not writable" in str(exc))
        """ % str(self.path / "c.db"))
        self.assertEqual(out, "%s True\n" % self.dir)


# -- the store: value files


class TestWriteBetweenLookupAndStore(MemoTest):
    """Another writer commits while the function runs: both results are kept."""

    def test_result_stored_after_another_write(self):
        def work(x):
            if x == 1:     # a second connection writes between this call's lookup and store
                with persist.open(path, "w") as other:
                    other["from another writer"] = "kept"
            return x * 10

        f = self.memo(work, name="job")
        path = f.cache_info().path
        f(0)
        self.assertEqual(f(1), 10)
        self.assertAllHits("job", [0, 1], lambda x: x * 10)
        with persist.open(path, "r") as db:
            self.assertEqual(db["from another writer"], "kept")
            self.assertEqual(len(db), 3)


@slow
class TestOneKeyTwoWriters(TempDirTest):
    """Two processes rewrite one key, one with a large value and one with a small one, while a
    third reads it: every read succeeds, and no value file is left without its row."""

    WRITER = """
        import sys, persist
        with persist.open(sys.argv[1]) as db:
            value = b"L" * 300000 if sys.argv[2] == "large" else b"s"
            for i in range(300):
                db["k"] = (sys.argv[2], i, value)
    """
    READER = """
        import sys, persist
        with persist.open(sys.argv[1]) as db:
            seen = set()
            while len(seen) < 2 or sys.stdin.readable() and False:
                kind, i, value = db["k"]
                assert value == (b"L" * 300000 if kind == "large" else b"s"), kind
                seen.add(kind)
                if db.get("stop"):
                    break
            print(sorted(seen))
    """

    def test_no_read_fails_and_no_file_is_orphaned(self):
        cache = self.path / "shelf.db"
        with persist.open(cache) as db:
            db["k"] = ("small", -1, b"s")
        writers = [spawn(self, [sys.executable, "-c", textwrap.dedent(self.WRITER), str(cache),
                                kind]) for kind in ("large", "small")]
        reader = spawn(self, [sys.executable, "-c", textwrap.dedent(self.READER), str(cache)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        for writer in writers:
            self.assertEqual(writer.wait(timeout=120), 0)
        with persist.open(cache) as db:
            db["stop"] = True
        out, err = reader.communicate(timeout=120)
        self.assertEqual(reader.returncode, 0, err)
        with persist.open(cache) as db:
            self.assertIn(db["k"][0], ("large", "small"))
        on_disk, named = value_files(cache)
        self.assertEqual(on_disk, named)
        self.assertLessEqual(len(on_disk), 1)


@slow
class TestReadersRaceDeleters(TempDirTest):
    """get(), items(), values(), pop() and `in` while another process deletes and re-adds."""

    CHURN = """
        import sys, persist
        with persist.open(sys.argv[1]) as db:
            print("ready", flush=True)
            for i in range(400):
                for k in ("a", "b", "c"):
                    db[k] = b"x" * (300000 if i % 2 else 10)
                for k in ("a", "b", "c"):
                    db.pop(k, None)
    """

    def test_no_key_error_from_a_vanishing_key(self):
        cache = self.path / "shelf.db"
        persist.open(cache).close()
        child = spawn(self, [sys.executable, "-c", textwrap.dedent(self.CHURN), str(cache)],
                      stdout=subprocess.PIPE, universal_newlines=True)
        child.stdout.readline()
        with persist.open(cache) as db:
            while child.poll() is None:
                for k in ("a", "b", "c"):
                    self.assertIn(db.get(k, None), (None, b"x" * 10, b"x" * 300000))
                    self.assertIn(db.pop(k, None), (None, b"x" * 10, b"x" * 300000))
                for k, v in db.items():
                    self.assertIn(v, (b"x" * 10, b"x" * 300000))
                for v in db.values():
                    self.assertIn(v, (b"x" * 10, b"x" * 300000))
        self.assertEqual(child.wait(), 0)
        on_disk, named = value_files(cache)
        self.assertEqual(on_disk, named)


@unittest.skipUnless(POSIX, "flock()")
class TestValueFileSweptBeforeItIsLocked(TempDirTest):
    """A value file is created, then locked against sweep(): another process that opens the
    cache in between sweeps it (no row names it, nobody holds it). The store makes another."""

    SWEEPER = """
        import os, sys, persist
        values = sys.argv[1] + ".values"
        before = len(os.listdir(values))
        persist.open(sys.argv[1]).close()             # sweeps what no row names
        print(before, len(os.listdir(values)))
    """

    def test_the_store_makes_a_new_one(self):
        import fcntl
        path = self.path / "s.db"
        swept = []
        test = self

        class Fcntl:                   # fcntl, but another process sweeps before the first lock
            def __getattr__(self, name):
                return getattr(fcntl, name)

            def flock(self, fd, operation):
                if operation == fcntl.LOCK_EX and not swept:
                    swept.append(subprocess.run(
                        [sys.executable, "-c", textwrap.dedent(test.SWEEPER), str(path)],
                        env=child_env(), stdout=subprocess.PIPE, universal_newlines=True,
                        check=True, timeout=CHILD_TIMEOUT).stdout)
                return fcntl.flock(fd, operation)

        with persist.open(path) as db:
            db["small"] = 1
            with mock.patch.object(persist, "_fcntl", Fcntl()):
                db["big"] = b"x" * 1000000
            self.assertEqual(swept, ["1 0\n"])        # the first file went
            self.assertEqual(db["big"], b"x" * 1000000)
        on_disk, named = value_files(path)
        self.assertEqual((len(on_disk), on_disk), (1, named))
        with persist.open(path, "r") as db:
            self.assertEqual(db["big"], b"x" * 1000000)
        self.assertNoTemp()


class Planted:
    """Loading its pickle runs os.mkdir(path): the proof that a planted pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


class TestValueFileNamedOutsideTheCache(TempDirTest):
    """A crafted or hand-edited row whose file column names a path (absolute, or with '..')
    instead of a value file: nothing outside the cache is ever read or removed."""

    BIG = "v" * (1 << 19)                 # over 256 KiB: a value file of its own

    def setUp(self):
        super().setUp()
        self.precious = self.path / "precious.txt"
        self.precious.write_text("mine")
        self.ran = self.path / "ran"
        (self.path / "planted.pkl").write_bytes(pickle.dumps(Planted(str(self.ran))))

    def craft(self, db_path, name):
        """Every row with a value file names name instead."""
        conn = sqlite3.connect(str(db_path), isolation_level=None)
        try:
            self.assertGreater(conn.execute("UPDATE Dict SET file = ? WHERE file IS NOT NULL",
                                            (name,)).rowcount, 0)
            conn.execute("UPDATE Dict SET stored = stored - 86400")   # a day old
        finally:
            conn.close()

    def shelf(self, name):
        path = self.path / ("s%d.db" % len(list(self.path.glob("s*.db"))))
        with persist.open(path) as db:
            db["k"] = self.BIG
            db["small"] = 1
        self.craft(path, name)
        return path

    def assertCorrupt(self, caught, path, name):
        self.assertEqual(caught.exception.filename, str(path))
        self.assertEqual(caught.exception.reason, persist.PersistError.CORRUPT_ROW)
        self.assertIn("corrupt entry", str(caught.exception))
        self.assertIn(repr(name), str(caught.exception))
        self.assertEqual(self.precious.read_text(), "mine")
        self.assertFalse(self.ran.exists())

    def names(self):
        return ("../precious.txt", str(self.precious), "../planted.pkl",
                str(self.path / "planted.pkl"))

    @slow
    def test_a_shelf_neither_reads_nor_removes_it(self):
        for name in self.names():
            for attempt in (lambda db: db["k"], lambda db: db.pop("k"),
                            lambda db: db.__delitem__("k"), lambda db: db.clear(),
                            lambda db: db.__setitem__("k", "new"),
                            lambda db: db.__setitem__("k", self.BIG)):
                with self.subTest(name=name, attempt=attempt.__code__.co_firstlineno):
                    path = self.shelf(name)
                    with persist.open(path) as db:
                        with self.assertRaises(persist.PersistError) as caught:
                            attempt(db)
                        self.assertCorrupt(caught, path, name)
                        self.assertEqual(len(db), 2)      # nothing changed
                        self.assertEqual(db["small"], 1)

    @slow
    def test_memoize_neither_reads_nor_removes_it(self):
        calls = []

        def make(cache, version=None):
            @persist.memoize(cache_dir=cache, name="f", version=version)
            def f(x):
                calls.append(x)
                return TestValueFileNamedOutsideTheCache.BIG if x == 1 else x

            return f

        for i, name in enumerate(self.names()):
            for j, attempt in enumerate((
                    lambda f, cache: f(1), lambda f, cache: f.cache_delete(1),
                    lambda f, cache: f.cache_clear(),
                    lambda f, cache: make(cache, version=2).cache_prune())):
                with self.subTest(name=name, attempt=j):
                    cache = self.path / ("m%d-%d" % (i, j))
                    path = cache / "f.db"
                    f = make(cache)
                    f(1)
                    f(2)
                    self.craft(path, name)
                    del calls[:]
                    with self.assertRaises(persist.PersistError) as caught:
                        attempt(make(cache), cache)
                    self.assertCorrupt(caught, path, name)
                    self.assertEqual(calls, [])
                    with persist.open(path, "r") as db:
                        self.assertEqual(len(db), 2)
        explained = make(self.path / "m0-0").explain(1)        # it says why, and loads nothing
        self.assertIn("corrupt entry", str(explained))
        self.assertFalse(self.ran.exists())

    def test_an_expired_entry_is_refused_before_the_call_runs(self):
        # its result would be computed, then fail to be stored, and be lost
        calls = []

        @persist.memoize(cache_dir=self.path / "m", name="f", expire=3600)
        def f(x):
            calls.append(x)
            return TestValueFileNamedOutsideTheCache.BIG

        f(1)
        path = self.path / "m" / "f.db"
        self.craft(path, "../../precious.txt")
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.execute("UPDATE Dict SET stored = 0")        # long expired
        conn.close()

        @persist.memoize(cache_dir=self.path / "m", name="f", expire=3600)
        def f(x):
            calls.append(x)
            return TestValueFileNamedOutsideTheCache.BIG

        with self.assertRaises(persist.PersistError) as caught:
            f(1)
        self.assertCorrupt(caught, path, "../../precious.txt")
        self.assertEqual(calls, [1])

    def test_a_hit_takes_no_column_of_another_type_for_the_other(self):
        # A hit read coalesce(file, value) and told the two apart by type: a TEXT value
        # naming another entry's value file returned that entry's result for this call,
        # and a BLOB file was loaded as the pickle; both are refused as get()'s row is.
        calls = []

        def make():
            @persist.memoize(cache_dir=self.path / "m", name="f")
            def f(x):
                calls.append(x)
                return TestValueFileNamedOutsideTheCache.BIG if x == 1 else x

            return f

        f = make()
        for x in (1, 2, 3):
            f(x)
        path = self.path / "m" / "f.db"
        planted = pickle.dumps("from the file column")
        conn = sqlite3.connect(str(path), isolation_level=None)
        try:
            (name,), = conn.execute("SELECT file FROM Dict WHERE file IS NOT NULL")
            keys = [key for key, in conn.execute("SELECT key FROM Dict ORDER BY args")]
            conn.execute("UPDATE Dict SET value = ? WHERE key = ?", (name, keys[1]))
            conn.execute("UPDATE Dict SET file = ? WHERE key = ?", (planted, keys[2]))
        finally:
            conn.close()
        del calls[:]
        f = make()
        with self.assertWarnsRegex(persist.PersistWarning, r"f\(\) cannot be loaded"):
            self.assertEqual(f(2), 2)             # computed again, not f(1)'s result
        with self.assertRaises(persist.PersistError) as caught:
            f(3)
        self.assertCorrupt(caught, path, planted)
        self.assertEqual(calls, [2])
        self.assertEqual(f(1), self.BIG)

    @slow
    def test_the_command_line_neither_removes_nor_lists_through_it(self):
        for name in self.names():
            for command in (["clear"], ["prune", "--older-than", "1h"], ["show"]):
                with self.subTest(name=name, command=command):
                    path = self.shelf(name)
                    done = run_command(CLI + command + [str(path)], cwd=self.dir)
                    self.assertNotEqual(done.returncode, 0, done.stdout)
                    self.assertIn("corrupt entry", done.stderr)
                    self.assertNotIn("Traceback", done.stderr)
                    self.assertEqual(self.precious.read_text(), "mine")
                    with persist.open(path, "r") as db:
                        self.assertEqual(len(db), 2)

    def test_pop_of_a_value_file_removed_by_hand_fails_instead_of_looping(self):
        path = self.path / "s.db"
        with persist.open(path) as db:
            db["k"] = self.BIG
        for name in os.listdir(str(path) + ".values"):
            os.unlink(os.path.join(str(path) + ".values", name))
        out = run_python("""
            import persist
            with persist.open(%r) as db:
                for attempt in (lambda: db["k"], lambda: db.pop("k")):
                    try:
                        attempt()
                    except persist.PersistError as exc:
                        print(exc.strerror, exc.reason)
                print(len(db))
        """ % str(path), timeout=120)             # a loop that never ends fails here
        self.assertEqual(out, "the value file of key 'k' is missing missing-value\n" * 2 +
                         "1\n")

    def test_a_value_file_cut_short_names_its_key_and_file(self):
        # Value files are not fsynced: after a power cut one may be cut short. Reading its
        # key raised pickle's "pickle data was truncated", naming neither the key nor the file.
        path = self.path / "s.db"
        with persist.open(path) as db:
            db["k"] = self.BIG
            db["other"] = 1
        name, = os.listdir(str(path) + ".values")
        with open(os.path.join(str(path) + ".values", name), "r+b") as file:
            file.truncate(1000)
        with persist.open(path) as db:
            for attempt in (lambda: db["k"], lambda: db.get("k"), lambda: db.pop("k")):
                with self.assertRaisesRegex(persist.PersistError, "the value file of key 'k' "
                                            "is cut short or damaged") as caught:
                    attempt()
                self.assertEqual(caught.exception.reason, persist.PersistError.DAMAGED_VALUE)
                self.assertEqual(caught.exception.filename,
                                 os.path.join(str(path) + ".values", name))
            self.assertEqual(db["other"], 1)
            db["k"] = "again"                     # what to do: store it again, or delete it
            self.assertEqual(db["k"], "again")

    @unittest.skipUnless(hasattr(os, "mkfifo"), "FIFOs")
    def test_a_fifo_of_a_value_files_shape_neither_blocks_the_sweep_nor_is_removed(self):
        path = self.path / "s.db"
        with persist.open(path) as db:
            db["k"] = self.BIG
        fifo = pathlib.Path(str(path) + ".values") / ("0" * 32)   # no row names it
        os.mkfifo(str(fifo))
        child = start_python(self, """
            import persist
            with persist.open(%r) as db:             # sweeps what no row names
                print(len(db["k"]), flush=True)
        """ % str(path))
        out, _ = child.communicate(timeout=120)      # a sweep that waits on it fails here
        self.assertEqual(out, "%d\n" % len(self.BIG))
        self.assertTrue(stat.S_ISFIFO(os.lstat(str(fifo)).st_mode))

    def test_files_in_the_values_directory_of_another_shape_are_never_swept(self):
        path = self.shelf("0" * 32)
        stray = pathlib.Path(str(path) + ".values") / "notes.txt"
        stray.write_text("mine too")
        persist.open(path).close()                   # sweeps what no row names
        self.assertEqual(stray.read_text(), "mine too")
        self.assertEqual(len(os.listdir(str(path) + ".values")), 1)


class TestDamagedCacheFile(TempDirTest):
    def make(self):
        path = self.path / "cache.db"
        with persist.open(path) as db:
            for i in range(2000):
                db[str(i)] = "value %d" % i * 20
        return path

    def check_refused(self, path, expected=".*another file name"):
        before = path.read_bytes()
        with self.assertRaisesRegex(persist.PersistError, re.escape(str(path)) +
                                    expected) as caught:
            with persist.open(path) as db:
                dict(db)
        self.assertEqual(path.read_bytes(), before)
        self.reason = caught.exception.reason
        return str(caught.exception)

    def start_over(self, message):
        """Run the command that message gives to start over, as a user would paste it."""
        command = message.rpartition("its files")[2].lstrip(": (").rstrip(")")
        subprocess.run(["sh", "-c", command], check=True, timeout=60)

    def test_truncated_to_half(self):
        # The error said only to give persist another file name, not what to remove.
        path = self.make()
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size // 2)
        message = self.check_refused(path, ": a damaged persist cache .*remove its files: "
                                           "rm -f %s %s-wal %s-shm; rm -rf %s.values$"
                                     % ((re.escape(str(path)),) * 4))
        self.assertEqual(self.reason, persist.PersistError.CORRUPT)
        if POSIX:
            (self.path / "cache.db.values").mkdir()
            (self.path / "cache.db.values" / "f").write_bytes(b"x")
            self.start_over(message)
            self.assertEqual(os.listdir(self.dir), [])
            with persist.open(path) as db:
                self.assertEqual(len(db), 0)

    def test_truncated_header(self):
        # Not recognizably a cache: no file is called persist's, but what to remove if it was.
        path = self.make()
        with open(path, "r+b") as file:
            file.truncate(50)
        message = self.check_refused(path, ": not a persist cache .*another file name.*if it is "
                                           "a persist cache that was damaged, start over by "
                                           "removing its files \\(rm -f ")
        self.assertEqual(self.reason, persist.PersistError.NOT_A_CACHE)
        if POSIX:
            self.start_over(message)
            with persist.open(path) as db:
                self.assertEqual(len(db), 0)

    @slow
    def test_a_file_of_the_user_is_never_offered_for_removal(self):
        # 'persist show job.py' (a slip for 'persist show job.f'), or persist.open("notes.txt")
        # on a file of the user's, said to start over with 'rm -f .../job.py'.
        for name, content in (("job.py", b"import persist\n"), ("plot.png", b"\x89PNG\r\n\x1a\n"),
                              ("data.csv", b"")):
            with self.subTest(name=name):
                path = self.path / name
                path.write_bytes(content + b"x" * 200)
                with self.assertRaisesRegex(persist.PersistError, "not a persist cache") as \
                        caught:
                    with persist.open(path) as db:
                        dict(db)
                self.assertNotIn("rm ", str(caught.exception))
                self.assertNotIn("remov", str(caught.exception))
                self.assertNotIn("delete", str(caught.exception))
                done = run_command(CLI + ["show", path], cwd=self.dir, timeout=120)
                self.assertEqual(done.returncode, 1, done.stdout)
                self.assertIn("not a persist cache", done.stderr)
                self.assertNotIn("rm ", done.stderr)
                self.assertEqual(path.read_bytes(), content + b"x" * 200)

    @unittest.skipUnless(POSIX, "the command given is for a POSIX shell")
    def test_memoized_function_over_a_damaged_cache_starts_over_as_told(self):
        cache = self.path / "cache"
        code = """
            import sys, persist
            @persist.memoize(cache_dir=sys.argv[1], name="big")
            def big(x):
                print("computed", x)
                return str(x) * 300000          # a value file beside the cache
            for x in range(50):
                big(x)
        """
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(cache)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)
        self.assertEqual(done.stdout.count("computed"), 50, done.stderr)
        db = cache / "big.db"
        with open(db, "r+b") as file:
            file.seek(0)
            file.write(b"SQLite format 3\0" + b"\xff" * 50)      # header overwritten
        with self.assertRaisesRegex(persist.PersistError, "damaged persist cache") as caught:
            persist.memoize(cache_dir=cache, name="big")(lambda x: x)(1)
        self.assertEqual(caught.exception.reason, persist.PersistError.CORRUPT)
        self.start_over(str(caught.exception))
        self.assertEqual(os.listdir(cache), [".gitignore"])
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(cache)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)
        self.assertEqual(done.stdout.count("computed"), 50, done.stderr)

    @slow
    @unittest.skipUnless(POSIX, "the command given is for a POSIX shell")
    def test_command_line_gives_a_command_that_works_on_any_path(self):
        # The command line's error put runs of spaces on one: the command it gave for
        # "it's a  \"dir\"" named another directory, and removed nothing.
        where = self.path / "it's a  \"dir\""
        where.mkdir()
        path = where / "cache.db"
        with persist.open(path) as db:
            db["k"] = "v" * (1 << 19)         # a value file beside it
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size // 2)
        for command in ("show", "clear", "failures"):
            with self.subTest(command=command):
                done = run_command(CLI + [command, str(path)], cwd=self.dir, timeout=120)
                self.assertEqual(done.returncode, 1, done.stdout)
                self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
                self.assertIn("damaged persist cache", done.stderr)
        self.start_over(done.stderr.strip())
        self.assertEqual(os.listdir(where), [])


# -- the store: what it refuses (links, modes, other users) and full disks


@unittest.skipUnless(POSIX and hasattr(os, "symlink"), "POSIX links and modes")
class TestHostileDirectory(TempDirTest):
    def test_planted_links_at_cache_names_are_refused(self):
        victim = self.path / "victim"
        victim.write_bytes(b"")
        for suffix in ("", "-wal", "-shm", ".values"):
            cache = self.path / ("c" + suffix)
            cache.mkdir()
            os.symlink(victim, cache / ("f.db" + suffix))

            @persist.memoize(cache_dir=cache, name="f")
            def f(x):
                return x

            with self.assertRaisesRegex(persist.PersistError, "symbolic link"):
                f(1)
            with self.assertRaisesRegex(persist.PersistError, "symbolic link") as caught:
                persist.open(cache / "f.db")
            self.assertEqual(caught.exception.reason, persist.PersistError.SYMLINK)
        self.assertEqual(victim.read_bytes(), b"")

    def test_link_planted_at_the_value_directory_meanwhile_costs_no_result(self):
        victim = self.path / "victim"
        victim.mkdir()
        for strict in (False, True):
            name = "f%d" % strict
            runs = []

            @persist.memoize(cache_dir=self.path, name=name, strict=strict)
            def f(x):
                runs.append(x)
                return b"v" * x

            self.assertEqual(f(1), b"v")                         # opened, no .values yet
            os.symlink(victim, self.path / (name + ".db.values"))
            if strict:
                with self.assertRaisesRegex(persist.PersistError, "symbolic link") as caught:
                    f(1 << 20)
                self.assertEqual(caught.exception.reason, persist.PersistError.SYMLINK)
            else:
                with self.assertWarnsRegex(persist.PersistWarning, "symbolic link"):
                    self.assertEqual(f(1 << 20), b"v" * (1 << 20))
                self.assertEqual(f.cache_info().unstored, 1)
            self.assertEqual(runs, [1, 1 << 20])
        self.assertEqual(os.listdir(victim), [])

    def test_a_file_where_the_value_directory_goes_is_named_for_what_it_is(self):
        @persist.memoize(cache_dir=self.path, name="f")
        def f(x):
            return b"v" * x

        self.assertEqual(f(1), b"v")                             # opened, no .values yet
        (self.path / "f.db.values").write_text("my notes")      # a file of the user's
        with self.assertWarns(persist.PersistWarning) as warned:
            self.assertEqual(f(1 << 20), b"v" * (1 << 20))
        self.assertIn("not a directory", str(warned.warning))
        self.assertNotIn("symbolic link", str(warned.warning))
        self.assertEqual((self.path / "f.db.values").read_text(), "my notes")

    def test_world_writable_directory_or_file_is_refused(self):
        shared = self.path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        with self.assertRaisesRegex(persist.PersistError, "every user may write") as caught:
            persist.open(shared / "x.db")
        self.assertEqual(caught.exception.reason, persist.PersistError.SWAPPABLE)
        os.chmod(shared, 0o755)
        persist.open(shared / "x.db").close()
        os.chmod(shared / "x.db", 0o666)
        with self.assertRaisesRegex(persist.PersistError, "every user may write") as caught:
            persist.open(shared / "x.db")
        self.assertEqual(caught.exception.reason, persist.PersistError.UNSAFE)

    def test_sticky_shared_directory_takes_only_our_own_files(self):
        shared = self.path / "tmp"
        shared.mkdir()
        os.chmod(shared, 0o1777)           # as /tmp: anyone may add files, none replace ours
        with persist.open(shared / "mine.db") as db:
            db["k"] = 1
        with persist.open(shared / "mine.db", "r") as db:
            self.assertEqual(db["k"], 1)
        if os.getuid() == 0:                               # chown needs root
            persist.open(shared / "theirs.db").close()
            os.chown(shared / "theirs.db", 65534, 65534)   # as if planted by another user
            with self.assertRaisesRegex(persist.PersistError, "another user owns it") as caught:
                persist.open(shared / "theirs.db")
            self.assertEqual(caught.exception.reason, persist.PersistError.UNSAFE)

    @unittest.skipUnless(ROOT, "root, to plant as another user")
    def test_value_directory_planted_meanwhile_costs_no_result(self):
        """Another user who makes the .values directory in /tmp after the cache was opened
        is refused at the first large result: that result was lost to a PersistError."""
        shared = self.path / "tmp"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        for strict in (False, True):
            name = "f%d" % strict
            runs = []

            @persist.memoize(cache_dir=shared, name=name, strict=strict)
            def f(x):
                runs.append(x)
                return b"v" * x

            self.assertEqual(f(1), b"v")                         # opened, no .values yet
            planted = shared / (name + ".db.values")
            planted.mkdir()
            os.chown(planted, NOBODY, NOBODY)
            if strict:
                with self.assertRaisesRegex(persist.PersistError, "another user owns it"):
                    f(1 << 20)
            else:
                with self.assertWarnsRegex(persist.PersistWarning, "another user owns it"):
                    self.assertEqual(f(1 << 20), b"v" * (1 << 20))
                self.assertEqual(f.cache_info().unstored, 1)
            self.assertEqual(runs, [1, 1 << 20])

    @slow
    def test_created_files_follow_the_umask(self):
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)

        @persist.memoize(cache_dir=self.path / "cache")
        def f(x):
            return os.urandom(x)

        f(10)
        f(1 << 20)
        with persist.open(self.path / "cache" / "s.db") as db:
            db["k"] = 1
            for root, dirs, files in os.walk(self.path / "cache"):
                for name in dirs + files:
                    mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
                    self.assertEqual(mode & 0o077, 0, name)

    @slow
    def test_caches_made_under_any_umask_pass_their_own_check(self):
        """Under umask 000 persist made its files writable by every user, then refused them:
        a large result raised after it was computed, and every later run refused the cache."""
        for umask, never in ((0o000, 0o002), (0o077, 0o077)):
            top = self.path / ("umask-%03o" % umask)
            cache = top / "made" / "cache"                   # each level made by persist
            old = os.umask(umask)
            try:
                @persist.memoize(cache_dir=cache, name="f", strict=True)
                def f(x):
                    return b"r" * x

                self.assertEqual(len(f(10)), 10)
                self.assertEqual(len(f(1 << 20)), 1 << 20)      # a value file
                with persist.open(cache / "s.db") as db:
                    db["small"], db["large"] = b"s", b"l" * (1 << 20)
                    made = sorted([os.path.relpath(top, self.dir)] + [
                        os.path.relpath(os.path.join(root, name), self.dir)
                        for root, dirs, files in os.walk(top) for name in dirs + files])
                    self.assertIn(os.path.join(os.path.relpath(cache, self.dir), "s.db-shm"),
                                  made)
                    for name in made:
                        mode = stat.S_IMODE(os.lstat(self.path / name).st_mode)
                        self.assertEqual(mode & never, 0, "%s is %o" % (name, mode))
            finally:
                os.umask(old)
            out = run_python("""
                import persist
                @persist.memoize(cache_dir=%r, name="f", strict=True)
                def f(x):
                    raise AssertionError("computed again")
                print(len(f(10)), len(f(1 << 20)))
                with persist.open(%r) as db:
                    print(db["small"], len(db["large"]))
                    db["more"] = b"m" * (1 << 20)
            """ % (str(cache), str(cache / "s.db")))
            self.assertEqual(out, "10 1048576\nb's' 1048576\n")


@unittest.skipUnless(POSIX, "POSIX owners and modes")
class TestCacheUnderASwappableDirectory(TempDirTest):
    def test_world_writable_parent_without_sticky_bit_is_refused(self):
        shared = self.path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)             # anyone may rename cache/ away and put theirs
        cache = shared / "cache"
        cache.mkdir()
        os.chmod(cache, 0o755)

        @persist.memoize(cache_dir=cache, name="f", strict=True)
        def f(x):
            return x

        for attempt in (lambda: f(1), lambda: persist.open(cache / "s.db")):
            with self.assertRaisesRegex(persist.PersistError, "chmod o-w") as caught:
                attempt()
            self.assertEqual(caught.exception.filename, str(shared))
            self.assertEqual(caught.exception.errno, errno.EPERM)
            self.assertEqual(caught.exception.reason, persist.PersistError.SWAPPABLE)
        self.assertEqual(os.listdir(cache), [])

    @slow
    def test_sticky_parent_and_group_writable_parent_we_own_work(self):
        for mode in (0o1777, 0o775, 0o2775):
            shared = self.path / ("shared-%o" % mode)
            shared.mkdir()
            os.chmod(shared, mode)
            for where in (shared, shared / "cache"):
                where.mkdir(exist_ok=True)
                with persist.open(where / "s.db") as db:
                    db["k"] = 1
                with persist.open(where / "s.db", "r") as db:
                    self.assertEqual(db["k"], 1)


@unittest.skipUnless(ROOT and hasattr(os, "setgroups"), "root, to act as two group members")
class TestTeamDirectory(TempDirTest):
    """Two users of one group share a cache in their team's directory (root's, setgid)."""

    TEAM = 54321                              # the team's group
    ALICE, BOB = 54322, 54323

    CHILD = """
        import os, sys, warnings, persist
        import hashlib, inspect, logging, pickle, reprlib, shelve, sqlite3  # before losing /root
        os.setgroups([%d])
        os.setgid(%d)
        os.setuid(%d)
        os.umask(int(os.environ.get("TEAM_UMASK", "002"), 8))   # 002: the group may write
        warnings.simplefilter("error")
        team, me, calls = sys.argv[1], sys.argv[2], sys.argv[2:]
        @persist.memoize(cache_dir=team, name="f", strict=True)
        def f(who):
            print("computed", who)
            return who.encode() * (1 << 18)   # over 256 KiB: a value file
        for who in calls:
            print(who, len(f(who)))
        with persist.open(os.path.join(team, "s.db")) as db:
            db[me] = me * (1 << 18)
            print(sorted((k, len(v)) for k, v in db.items()))
    """

    def setUp(self):
        super().setUp()
        os.chmod(self.dir, 0o755)
        self.team = self.path / "team"
        self.team.mkdir()
        os.chown(self.team, 0, self.TEAM)
        os.chmod(self.team, 0o2770)

    def run_as(self, uid, *calls, umask="002"):
        code = textwrap.dedent(self.CHILD % (self.TEAM, uid, uid))
        return subprocess.run([sys.executable, "-c", code, str(self.team)] + list(calls),
                              env=dict(child_env(), TEAM_UMASK=umask), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=300)

    def test_a_teammates_cache_made_under_umask_077_says_why_it_cannot_be_read(self):
        alice = self.run_as(self.ALICE, "alice", umask="077")
        self.assertEqual(alice.stdout.splitlines()[:2], ["computed alice", "alice 1310720"],
                         alice.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(self.team / "f.db").st_mode), 0o600)
        bob = self.run_as(self.BOB, "bob")
        self.assertNotIn("computed", bob.stdout)
        self.assertIn("PermissionError: [Errno 13] Permission denied: you may not read it "
                      "(mode 0o600, user %d, group %d); its owner can let you ('chmod g+rw' "
                      "it" % (self.ALICE, self.TEAM), bob.stderr)
        self.assertIn(str(self.team / "f.db"), bob.stderr)

    @slow
    def test_teammates_share_large_results(self):
        """A teammate's result over 256 KiB raised PersistError after it was computed: the
        value directory the other member made was refused as writable by every user."""
        alice = self.run_as(self.ALICE, "alice")
        self.assertEqual(alice.stdout.splitlines(), [
            "computed alice", "alice 1310720", "[('alice', 1310720)]"], alice.stderr)
        self.assertEqual(os.stat(self.team / "f.db.values").st_uid, self.ALICE)
        self.assertEqual(os.stat(self.team / "s.db.values").st_uid, self.ALICE)
        bob = self.run_as(self.BOB, "bob", "alice")
        self.assertEqual(bob.stdout.splitlines(), [
            "computed bob", "bob 786432", "alice 1310720",
            "[('alice', 1310720), ('bob', 786432)]"], bob.stderr)
        for values in ("f.db.values", "s.db.values"):
            self.assertIn(self.BOB, {os.stat(self.team / values / name).st_uid
                                     for name in os.listdir(self.team / values)})
        alice = self.run_as(self.ALICE, "alice", "bob")
        self.assertEqual(alice.stdout.splitlines(), [
            "alice 1310720", "bob 786432", "[('alice', 1310720), ('bob', 786432)]"],
            alice.stderr)

    @slow
    def test_what_every_user_may_write_is_still_refused(self):
        self.run_as(self.ALICE, "alice")
        os.chmod(self.team / "f.db.values", 0o2777)
        bob = self.run_as(self.BOB, "bob")
        self.assertNotIn("computed", bob.stdout)
        self.assertIn("PersistError: %s: every user may write" % (self.team / "f.db.values"),
                      bob.stderr)


@unittest.skipUnless(ROOT and hasattr(os, "setuid"), "root, to act as another user")
class TestCacheAnotherUserMade(TempDirTest):
    """nobody made the cache directory in /tmp first, and planted pickles in it."""

    PLANT = """
        class Planted:
            def __reduce__(self):           # loading this pickle runs os.mkdir(ran)
                return os.mkdir, (%r,)

        os.mkdir(%r, 0o755)
        @persist.memoize(cache_dir=%r, name="f")
        def f(x):
            return Planted()
        f(1)
        with persist.open(%r) as db:
            db["k"] = Planted()
    """

    def setUp(self):
        super().setUp()
        shared = os.path.dirname(self.dir)
        if stat.S_IMODE(os.stat(shared).st_mode) != 0o1777:
            self.skipTest("%s is not a sticky shared directory" % shared)
        self.ran = self.path / "ran"
        self.cache = os.path.join(shared, "persist-test-%s" % os.urandom(6).hex())
        self.shelf = os.path.join(self.cache, "shelf.db")
        import shutil
        self.addCleanup(shutil.rmtree, self.cache, True)
        run_python(textwrap.dedent(drop_privileges()) + textwrap.dedent(
            self.PLANT % (str(self.ran), self.cache, self.cache, self.shelf)))
        self.assertEqual(os.stat(self.shelf).st_uid, NOBODY)

    def test_memoize_refuses_it(self):
        @persist.memoize(cache_dir=self.cache, name="f", strict=True)
        def f(x):
            return "computed"

        with self.assertRaisesRegex(persist.PersistError, "owned by user %d" % NOBODY) as caught:
            f(1)
        self.assertEqual(caught.exception.filename, self.cache)
        self.assertIn(self.cache, str(caught.exception))
        self.assertFalse(self.ran.exists())

    def test_memoize_without_strict_computes_instead(self):
        @persist.memoize(cache_dir=self.cache, name="f")
        def f(x):
            return "computed"

        with self.assertWarnsRegex(persist.PersistWarning, "owned by user %d" % NOBODY):
            self.assertEqual(f(1), "computed")
        self.assertFalse(self.ran.exists())

    def test_open_refuses_it(self):
        with self.assertRaisesRegex(persist.PersistError, "chown") as caught:
            persist.open(self.shelf, "r")
        self.assertEqual(caught.exception.filename, self.cache)
        self.assertFalse(self.ran.exists())

    @slow
    def test_a_parent_they_own_is_refused_too(self):
        mine = os.path.join(self.cache, "mine")
        os.mkdir(mine, 0o700)                 # ours, inside theirs: they can swap it
        with self.assertRaises(persist.PersistError) as caught:
            persist.open(os.path.join(mine, "s.db"))
        self.assertEqual(caught.exception.filename, self.cache)


@unittest.skipUnless(ROOT and hasattr(os, "setuid"), "root, to act as another user")
class TestCompanionPlantedByAnotherUser(TempDirTest):
    """In a sticky directory every user may write (as /tmp), nobody plants beside our cache a
    file SQLite reads with it: a hot rollback journal, which SQLite replays into the cache, or
    a log, whose pages it reads as the cache's. Either would put their pickle under our key."""

    PLANT = """
        class Planted:
            def __reduce__(self):           # loading this pickle runs os.mkdir(ran)
                return os.mkdir, (%r,)

        os.umask(0o022)
        shared, victim, suffix = %r, %r, %r
        own = os.path.join(shared, "theirs-" + os.urandom(4).hex())
        os.mkdir(own)
        theirs = os.path.join(own, "c.db")     # a cache of their own, laid out as ours
        with persist.open(theirs) as db:
            db["k"] = Planted()
        conn = sqlite3.connect(theirs, isolation_level=None)
        if suffix == "-journal":
            # a transaction left in the middle: its journal holds the pages as they were
            # (synchronous=OFF: its length says how many, with no sync to wait for)
            conn.execute("PRAGMA journal_mode=DELETE").fetchall()
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE Dict SET value = x'00'")
            conn.execute("PRAGMA user_version=0")
        else:                                   # a commit that is still in the log
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("UPDATE Dict SET stored = stored + 1")
        try:
            shutil.copyfile(theirs + suffix, victim + suffix)
        except PermissionError:                 # the name is taken, by a file of the victim's
            print("taken")
        else:
            print(os.stat(victim + suffix).st_uid)
        conn.close()
    """

    def setUp(self):
        super().setUp()
        os.chmod(self.dir, 0o711)             # nobody may pass, to the shared directory
        self.shared = self.path / "tmp"
        self.shared.mkdir()
        os.chmod(self.shared, 0o1777)         # anyone may add files, none replace ours
        self.ran = self.path / "ran"
        self.cache = str(self.shared / "c.db")

    def plant(self, suffix, taken=False):
        out = run_python("import shutil, sqlite3\n" + textwrap.dedent(drop_privileges()) +
                         textwrap.dedent(self.PLANT % (str(self.ran), str(self.shared),
                                                       self.cache, suffix)))
        self.assertEqual(out, "taken\n" if taken else "%d\n" % NOBODY)

    def assertRefused(self, text, suffix):
        self.assertIn("refused %s: " % (self.cache + suffix), text)
        self.assertIn("not yours (user %d made it" % NOBODY, text)
        self.assertFalse(self.ran.exists())

    @slow
    def test_planted_before_the_first_open(self):
        for suffix in ("-journal", "-wal"):
            with self.subTest(suffix):
                self.plant(suffix)
                for attempt in (lambda: persist.open(self.cache),
                                lambda: persist.memoize(cache_dir=self.shared, name="c",
                                                        strict=True)(lambda x: x)(1)):
                    with self.assertRaises(persist.PersistError) as caught:
                        attempt()
                    self.assertRefused("refused %s: %s" % (caught.exception.filename,
                                                           caught.exception), suffix)
                    self.assertEqual(caught.exception.reason, persist.PersistError.PLANTED)
                self.assertFalse(os.path.exists(self.cache))
                os.unlink(self.cache + suffix)   # as its owner or root can: then all is well
                with persist.open(self.cache) as db:
                    db["k"] = "mine"
                os.unlink(self.cache)
                # without strict, memoize warns as for any refused cache, and runs uncached
                self.plant(suffix)
                ran = []
                with self.assertWarns(persist.PersistWarning) as warned:
                    self.assertEqual(persist.memoize(cache_dir=self.shared, name="c")(
                        lambda x: ran.append(x) or x)(2), 2)
                self.assertEqual(ran, [2])
                self.assertIn("(%s: a " % (self.cache + suffix), str(warned.warning))
                self.assertIn("not yours (user %d made it" % NOBODY, str(warned.warning))
                self.assertFalse(self.ran.exists())
                self.assertFalse(os.path.exists(self.cache))
                os.unlink(self.cache + suffix)

    @slow
    def test_planted_as_sqlite_opens_the_cache(self):
        # the worst moment: after persist looked, before SQLite reads the file. The names are
        # taken by empty files of ours by then, which nobody else may replace
        for suffix in ("-journal", "-wal"):
            with self.subTest(suffix):
                with persist.open(self.cache) as db:
                    db["k"] = "mine"
                connect, tried = sqlite3.connect, []

                def plant_then_connect(*args, **kwargs):
                    if not tried:
                        tried.append(suffix)
                        self.plant(suffix, taken=True)     # it cannot
                    return connect(*args, **kwargs)

                with mock.patch.object(sqlite3, "connect", plant_then_connect):
                    with persist.open(self.cache) as db:
                        self.assertEqual(db["k"], "mine")
                self.assertEqual(tried, [suffix])
                self.assertFalse(self.ran.exists())
                for name in os.listdir(str(self.shared)):
                    if name.startswith("c.db"):
                        self.assertEqual(os.lstat(str(self.shared / name)).st_uid, 0, name)
                        os.unlink(str(self.shared / name))

    def test_planted_beside_a_cache_being_made(self):
        # A new cache is made under a temporary name, one statement at a time, then linked
        # into place: a journal planted beside it between two statements would be replayed
        # into it. Its name is taken by an empty file of ours before SQLite opens it.
        connect, planted = sqlite3.connect, []

        class Connection:
            def __init__(self, conn, database):
                self.conn, self.database = conn, database

            def execute(self, sql, *args):
                if sql == "BEGIN EXCLUSIVE" and not planted:     # made, not yet linked
                    planted.append(run_python("import shutil, sqlite3\n" + textwrap.dedent(
                        drop_privileges()) + textwrap.dedent(ClassPlant.PLANT % (
                            str(ClassPlant.ran), str(ClassPlant.shared), self.database,
                            "-journal"))))
                return self.conn.execute(sql, *args)

            def __getattr__(self, name):
                return getattr(self.conn, name)

        ClassPlant = self

        def connect_with_a_plant(database, *args, **kwargs):
            conn = connect(database, *args, **kwargs)
            return Connection(conn, database) if ".new-cache.tmp" in database else conn

        with mock.patch.object(sqlite3, "connect", connect_with_a_plant):
            with persist.open(self.cache) as db:
                self.assertEqual(list(db.keys()), [])
                db["k"] = "mine"
        self.assertEqual(planted, ["taken\n"])
        with persist.open(self.cache) as db:
            self.assertEqual(db["k"], "mine")
        self.assertFalse(self.ran.exists())
        for name in os.listdir(str(self.shared)):
            if not name.startswith("theirs-"):
                self.assertEqual(os.lstat(str(self.shared / name)).st_uid, 0, name)

    @slow
    def test_cache_planted_while_ours_is_being_made(self):
        # The name was free when persist looked; another user, seeing the new cache's
        # temporary file appear, takes it with a cache of their own before ours is linked
        # there. Ours then cannot be linked: theirs is refused, not opened.
        connect, planted = sqlite3.connect, []

        def plant_then_connect(database, *args, **kwargs):
            if ".new-cache.tmp" in str(database) and not planted:
                planted.append(run_python(textwrap.dedent(drop_privileges()) + textwrap.dedent(
                    """
                    class Planted:
                        def __reduce__(self):           # loading it runs os.mkdir(ran)
                            return os.mkdir, (%r,)

                    os.umask(0o022)
                    with persist.open(%r) as db:
                        db["k"] = Planted()
                    print(os.stat(%r).st_uid)
                    """ % (str(self.ran), self.cache, self.cache))))
            return connect(database, *args, **kwargs)

        for attempt in (lambda: persist.open(self.cache),
                        lambda: persist.memoize(cache_dir=self.shared, name="c", strict=True)(
                            lambda x: x)(1)):
            with self.subTest():
                with mock.patch.object(sqlite3, "connect", plant_then_connect):
                    with self.assertRaises(persist.PersistError) as caught:
                        attempt()
                self.assertEqual(planted, ["%d\n" % NOBODY])
                self.assertEqual(caught.exception.filename, self.cache)
                self.assertIn("another user owns it", str(caught.exception))
                self.assertFalse(self.ran.exists())
                for name in os.listdir(str(self.shared)):
                    os.unlink(str(self.shared / name))
                del planted[:]

    def test_shelve_files_another_user_planted_are_not_taken_in(self):
        # persist.open(NAME) copies a shelve file's entries into a store of ours: not when
        # another user made those files, whose pickles would then load as ours
        imports = "import ast, dbm.dumb, encodings.latin_1, pickle, shelve\n"
        out = run_python(imports + textwrap.dedent(drop_privileges()) + textwrap.dedent("""
            class Planted:
                def __reduce__(self):           # loading it runs os.mkdir(ran)
                    return os.mkdir, (%r,)

            os.umask(0o022)
            with shelve.Shelf(dbm.dumb.open(%r, "c")) as db:
                db["k"] = Planted()
            print(sorted(os.listdir(%r)))
            """ % (str(self.ran), self.cache, str(self.shared))))
        self.assertEqual(out, "['c.db.bak', 'c.db.dat', 'c.db.dir']\n")
        for flag in ("c", "w", "r"):
            with self.subTest(flag):
                with self.assertRaises(persist.PersistError) as caught:
                    persist.open(self.cache, flag)
                self.assertEqual(caught.exception.filename, self.cache + ".dir")
                self.assertIn("another user owns it", str(caught.exception))
                self.assertEqual(sorted(os.listdir(str(self.shared))),
                                 ["c.db.bak", "c.db.dat", "c.db.dir"])
                self.assertFalse(self.ran.exists())

    @slow
    def test_hard_link_to_a_file_of_ours_planted_at_a_companion_name(self):
        # A hard link has its file's owner: another user who may write a file of ours (through
        # its group) links it beside our cache, and it passes for ours. Nothing of SQLite's
        # has a second name: refused, as a file they own is.
        for suffix in ("-journal", "-wal"):
            with self.subTest(suffix):
                with persist.open(self.cache) as db:  # a new cache's first session leaves
                    db["k"] = "mine"                  # neither name taken
                self.plant(suffix)                   # their content, in a file of theirs
                ours = self.path / ("ours" + suffix)  # copied into a file of ours they may
                ours.write_bytes(pathlib.Path(self.cache + suffix).read_bytes())  # write
                os.unlink(self.cache + suffix)
                os.chown(str(ours), 0, NOBODY)
                os.chmod(str(ours), 0o660)
                os.chmod(str(self.path), 0o755)
                out = run_python(textwrap.dedent(drop_privileges()) + textwrap.dedent("""
                    os.link(%r, %r)
                    print(os.stat(%r).st_uid)
                """ % (str(ours), self.cache + suffix, self.cache + suffix)))
                self.assertEqual(out, "0\n")        # ours, by its owner
                with self.assertRaises(persist.PersistError) as caught:
                    persist.open(self.cache)
                self.assertEqual(caught.exception.filename, self.cache + suffix)
                self.assertIn("a file with 2 names (hard links)", str(caught.exception))
                self.assertEqual(caught.exception.reason, persist.PersistError.HARD_LINKED)
                self.assertFalse(self.ran.exists())
                os.unlink(self.cache + suffix)
                os.unlink(str(ours))
                with persist.open(self.cache) as db:
                    self.assertEqual(db["k"], "mine")
                self.assertFalse(self.ran.exists())
                for name in os.listdir(str(self.shared)):
                    if name.startswith("c.db"):
                        os.unlink(str(self.shared / name))

    @slow
    def test_planted_between_connections_after_a_fork(self):
        # fork() closes the connection, and the last one out removes the log: the child
        # connects anew, after nobody planted their file
        for suffix in ("-journal", "-wal"):
            with self.subTest(suffix):
                victim = start_python(self, """
                    import os, sys, persist
                    db = persist.open(%r)
                    db["k"] = "mine"
                    child = os.fork()
                    if child == 0:
                        print("forked", flush=True)
                        sys.stdin.readline()
                        try:
                            print("loaded %%r" %% (db["k"],))
                        except persist.PersistError as exc:
                            print("refused %%s: %%s" %% (exc.filename, exc))
                        sys.stdout.flush()
                        os._exit(0)
                    os.waitpid(child, 0)
                """ % self.cache)
                self.assertEqual(victim.stdout.readline(), "forked\n")
                self.assertFalse(os.path.exists(self.cache + "-wal"))
                self.plant(suffix)
                out, _ = victim.communicate("go\n", timeout=300)
                self.assertRefused(out, suffix)
                os.unlink(self.cache + suffix)
                with persist.open(self.cache, "r") as db:
                    self.assertEqual(db["k"], "mine")
                os.unlink(self.cache)


@unittest.skipUnless(POSIX and hasattr(signal, "SIGXFSZ"), "RLIMIT_FSIZE")
class TestDiskFull(TempDirTest):
    def test_file_size_limit_then_space_returns(self):
        code = """
            import os, resource, signal, sys, warnings, persist
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            cache, out = sys.argv[1], sys.argv[2]
            @persist.memoize(cache_dir=cache, name="full")
            def f(x):
                return str(x) * (x * 5000)
            for i in range(1, 6):
                f(i)
            persist.atomic_write(os.path.join(out, "target"), "old")
            limit = max(os.path.getsize(os.path.join(cache, n)) for n in os.listdir(cache))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit + 4096, resource.RLIM_INFINITY))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for i in range(1, 60):
                    assert f(i) == str(i) * (i * 5000)
            print(len(caught) > 0, all(w.category is persist.PersistWarning for w in caught))
            try:
                persist.atomic_write(os.path.join(out, "target"), "x" * (1 << 20))
            except OSError as exc:
                print("atomic_write", exc.errno == __import__("errno").EFBIG)
            try:
                with persist.done_dir(os.path.join(out, "stage")) as d:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            except OSError as exc:
                print("done_dir", type(exc).__name__)
        """
        out_dir = self.path / "out"
        out_dir.mkdir()
        cache = self.path / "cache"
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(cache),
                               str(out_dir)], env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        self.assertEqual(done.stdout, "True True\natomic_write True\ndone_dir OSError\n",
                         done.stderr)
        self.assertEqual((out_dir / "target").read_text(), "old")
        self.assertFalse(persist.is_done(out_dir / "stage"))
        self.assertNoTemp()
        runs = []

        @persist.memoize(cache_dir=cache, name="full")
        def f(x):
            runs.append(x)
            return str(x) * (x * 5000)

        for i in range(1, 60):
            self.assertEqual(f(i), str(i) * (i * 5000))
        self.assertNotIn(1, runs)
        self.assertLess(len(runs), 59)
        for i in range(1, 60):
            f(i)
        self.assertEqual(f.cache_info().entries, 59)
        conn = sqlite3.connect(str(cache / "full.db"))
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        conn.close()

    def test_strict_names_the_cache_it_could_not_store_in(self):
        # strict=True raised a write's own error as it was, "[Errno 27] File too large" (or
        # "No space left on device"), naming neither the cache nor the function, where the
        # warning without strict names both and says what to do.
        code = """
            import os, resource, signal, sys, persist
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            @persist.memoize(cache_dir=sys.argv[1], name="full", strict=True)
            def f(x):
                return "x" * x
            f(1)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
            try:
                f(2 << 20)
            except OSError as exc:
                print(type(exc).__name__, exc.errno, exc.filename)
                print(exc.strerror)
        """
        cache = self.path / "cache"
        out = run_python(code.replace("sys.argv[1]", repr(str(cache))))
        lines = out.splitlines()
        self.assertEqual(lines[0], "OSError %d %s" % (errno.EFBIG, cache / "full.db"), out)
        self.assertIn("full() could not store a result in this cache; ", lines[1])
        self.assertIn("strict raises", lines[1])


def small_disk(test, size="1m"):
    """A tmpfs of size mounted in test's directory until its cleanup, filled up to the last
    byte by the file 'filler' in it (remove it to free the space); skips where root may not
    mount."""
    disk = test.path / "disk"
    disk.mkdir()
    if not ROOT or not os.path.exists("/bin/mount"):
        test.skipTest("NOT TESTED: mounting a small tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=755" % size, "tmpfs",
                              str(disk)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=60)
    if mounted.returncode != 0:
        test.skipTest("NOT TESTED: mount -t tmpfs was refused here: %s" % mounted.stdout.strip())
    test.addCleanup(subprocess.run, ["umount", "-l", str(disk)], timeout=60)
    with open(disk / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return disk


@unittest.skipUnless(POSIX, "mount")
class TestDiskFullAtTheFirstCall(TempDirTest):
    """A cache that could not be opened (no space) stayed off for the rest of the process."""

    CHILD = """
        import sys, time, warnings, persist
        persist._REOPEN_AFTER = 3600.0     # the hour passes when the test says so
        real, hours = time.monotonic, [0]
        time.monotonic = lambda: real() + 3600.0 * hours[0]
        @persist.memoize(cache_dir=sys.argv[1], name="f")
        def f(x):
            return str(x) * x
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert f(1) == "1"
            print("full", f.cache_info().unstored, flush=True)
            sys.stdin.readline()           # the test frees the space meanwhile
            assert f(2) == "22"            # tried again only after a while: not yet
            print("soon", f.cache_info().unstored, flush=True)
            hours[0] += 1
            assert f(3) == "333"
            assert f(50000) == "50000" * 50000        # over 256 KiB: a value file
            info = f.cache_info()
            print("later", info.unstored, info.entries, flush=True)
        print([str(w.message) for w in caught])
    """

    def test_the_cache_goes_on_once_there_is_space(self):
        disk = small_disk(self)
        child = spawn(self, [sys.executable, "-c", textwrap.dedent(self.CHILD),
                             str(disk / "cache")],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(child.stdout.readline(), "full 1\n")
        os.unlink(disk / "filler")
        out, _ = child.communicate("go on\n", timeout=300)
        lines = out.splitlines()
        self.assertEqual(lines[:2], ["soon 2", "later 2 2"], out)
        warned = eval(lines[2])
        self.assertEqual(len(warned), 1, warned)
        self.assertIn("free some disk space", warned[0])
        self.assertEqual(child.returncode, 0)
        self.assertEqual(sorted(os.listdir(disk / "cache"))[:2], [".gitignore", "f.db"])
        runs = []

        @persist.memoize(cache_dir=disk / "cache", name="f")
        def f(x):
            runs.append(x)

        self.assertEqual([f(3), len(f(50000))], ["333", 5 * 50000])
        self.assertEqual(runs, [])
        self.assertNoTemp()


# -- the store: fork and exit hooks


@unittest.skipUnless(hasattr(os, "fork"), "fork")
class TestFork(TempDirTest):
    def test_parent_closes_its_shelf_while_children_write(self):
        out = run_python("""
            import os, sys, persist
            path = %r
            db = persist.open(path)
            db["parent"] = 0
            children = []
            for n in range(6):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    with persist.open(path) as mine:
                        os.write(w, b"x")
                        for i in range(100):
                            mine["%%d-%%d" %% (n, i)] = i
                    os._exit(0)
                os.close(w)
                os.read(r, 1)
                os.close(r)
                children.append(pid)
            db.close()
            print(all(os.waitpid(pid, 0)[1] == 0 for pid in children))
        """ % str(self.path / "shelf.db"))
        self.assertEqual(out, "True\n")
        with persist.open(self.path / "shelf.db", "r") as db:
            self.assertEqual(len(db), 601)

    def test_fork_while_another_thread_stores(self):
        out = run_python("""
            import os, sys, threading, persist
            db = persist.open(%r)
            stop = threading.Event()
            def store():
                i = 0
                while not stop.is_set():
                    db["t%%d" %% (i %% 50)] = b"v" * (i %% 3 * 200000)
                    i += 1
            thread = threading.Thread(target=store)
            thread.start()
            pids = []
            for n in range(20):
                pid = os.fork()
                if pid == 0:
                    import signal
                    signal.alarm(20)          # a hang fails the test instead of blocking it
                    db["child%%d" %% n] = n
                    os._exit(0 if db["child%%d" %% n] == n else 1)
                pids.append(pid)
            codes = [os.waitpid(pid, 0)[1] for pid in pids]
            stop.set()
            thread.join()
            print(codes == [0] * 20, sum(key.startswith("child") for key in db))
        """ % str(self.path / "shelf.db"))
        self.assertEqual(out, "True 20\n")
        on_disk, named = value_files(self.path / "shelf.db")
        self.assertEqual(on_disk, named)

    @slow
    def test_fork_while_another_thread_imports_what_persist_imports_late(self):
        # persist imports hashlib at a key's first long input and shelve at the first open():
        # a child forked while another thread was in the middle of such an import found the
        # module half made and locked by a thread it does not have, and waited for ever at
        # its own first long key or open(). fork() waits for that import to end. A module
        # each import loads (OpenSSL's _hashlib, pickle.py) stays unloaded in that thread
        # until fork() has begun: a hook registered after persist's runs before them.
        script = self.path / "job.py"     # a file: a function of python -c keys its code
        script.write_text(HOOK_IMPORT + textwrap.dedent("""
            import importlib.abc, os, signal, sys, threading, persist
            d, blocked = sys.argv[1:]
            @persist.memoize(cache_dir=d)
            def f(x):
                return len(x)
            if "hashlib" in sys.modules or "shelve" in sys.modules:
                print("imported already")    # PyPy imports hashlib with persist
                sys.exit(0)
            entered, release = threading.Event(), threading.Event()
            def hold():
                if threading.current_thread() is not threading.main_thread():
                    entered.set()
                    release.wait()
            hook_import(blocked, hold)
            def first():
                try:
                    if blocked == "pickle":
                        with persist.open(os.path.join(d, "parent.db")) as shelf:
                            shelf["k"] = 1
                    else:
                        f("y" * 200)
                finally:
                    entered.set()             # (had it not imported it: fails below)
            thread = threading.Thread(target=first)
            thread.start()
            entered.wait()
            os.register_at_fork(before=release.set)
            pid = os.fork()
            if pid == 0:
                signal.alarm(20)              # a hang fails the test instead of blocking it
                if blocked == "pickle":
                    print(len(persist.open(os.path.join(d, "child.db"))), flush=True)
                else:
                    print(f("z" * 300), flush=True)
                os._exit(0)
            thread.join()
            print(os.waitpid(pid, 0)[1])
        """))
        for blocked, result in (("_hashlib", "300"), ("pickle", "0")):
            done = run_command([str(script), str(self.path), blocked], timeout=CHILD_TIMEOUT)
            self.assertEqual(done.returncode, 0, done.stderr)
            if done.stdout == "imported already\n":
                continue
            self.assertEqual(done.stdout.split(), [result, "0"], blocked)

    def test_threads_of_a_forked_child_open_and_use_caches(self):
        # The fork's hooks hold the gate that no cache opens past while another thread forks,
        # and give it back in the child too: the child's own threads (a thread pool in a
        # forked worker) open caches, memoized functions' and shelves, as its first one does
        out = run_python('''
            import os, sys, threading, persist
            db = persist.open(os.path.join(%r, "parent.db"))
            db["k"] = "parent"
            pid = os.fork()
            if pid == 0:
                seen = []
                def use():
                    @persist.memoize(cache_dir=%r, name="child")
                    def double(x):
                        return 2 * x
                    with persist.open(os.path.join(%r, "child.db")) as mine:
                        mine["k"] = double(21)
                        seen.extend([mine["k"], db["k"]])
                thread = threading.Thread(target=use, daemon=True)
                thread.start()
                thread.join(60)                   # a thread that hangs fails the test here
                print(seen, flush=True)
                os._exit(0)
            print(os.waitpid(pid, 0)[1], db["k"])
        ''' % (self.dir, self.dir, self.dir))
        self.assertEqual(out, "[42, 'parent']\n0 parent\n")

    @slow
    def test_fork_while_another_thread_opens_and_closes_shelves(self):
        # A child forked while that thread was inside SQLite (connecting, or closing, its
        # _Connection already out of the list that fork() closes) inherited SQLite's own
        # mutexes locked, and its first sqlite3.connect() waited for ever: 11 of 30 forks.
        out = run_python("""
            import os, signal, threading, persist
            path = %r
            stop = threading.Event()
            def store():
                i = 0
                while not stop.is_set():
                    with persist.open(path) as db:
                        db["t%%d" %% (i %% 50)] = i
                    i += 1
            thread = threading.Thread(target=store)
            thread.start()
            ended = []
            for n in range(100):
                pid = os.fork()
                if pid == 0:
                    signal.alarm(20)          # a hang ends the child, and fails the test
                    with persist.open(path) as db:
                        db["child%%d" %% n] = n
                        os._exit(0 if db["child%%d" %% n] == n else 1)
                ended.append(os.waitpid(pid, 0)[1])
                if ended[-1]:
                    break                     # one is enough: no more 20 s waits
            stop.set()
            thread.join()
            print(ended == [0] * 100)
        """ % str(self.path / "shelf.db"), timeout=600)
        self.assertEqual(out, "True\n")
        with persist.open(self.path / "shelf.db", "r") as db:
            self.assertEqual(sum(key.startswith("child") for key in db), 100)

    @slow
    def test_fork_while_another_thread_drops_memoized_functions(self):
        # Their connections are closed by the collector, in whichever thread: a child forked
        # during such a close (or while another thread opened a cache) hung at fork 25.
        out = run_python("""
            import gc, os, signal, threading, persist
            base = %r
            stop = threading.Event()
            def churn():
                i = 0
                while not stop.is_set():
                    @persist.memoize(cache_dir=base, name="g%%d" %% (i %% 4))
                    def g(x):
                        return x
                    g(i)
                    del g
                    if i %% 3 == 0:
                        gc.collect()
                    i += 1
            thread = threading.Thread(target=churn)
            thread.start()
            ended = []
            for n in range(100):
                pid = os.fork()
                if pid == 0:
                    signal.alarm(20)          # a hang ends the child, and fails the test
                    with persist.open(os.path.join(base, "c.db")) as db:
                        db[str(n)] = n
                    os._exit(0)
                ended.append(os.waitpid(pid, 0)[1])
                if ended[-1]:
                    break
            stop.set()
            thread.join()
            print(ended == [0] * 100)
        """ % self.dir, timeout=600)
        self.assertEqual(out, "True\n")
        with persist.open(self.path / "c.db", "r") as db:
            self.assertEqual(len(db), 100)
        self.assertEqual(sorted(name for name in os.listdir(self.dir) if "-" in name), [])

    @slow
    def test_fork_while_another_thread_makes_the_cache(self):
        # Forked while a thread made a new cache (its first memoized call), a child refused
        # that cache for good ("forked (from a signal handler)"): 9 of 100, and one hung.
        out = run_python("""
            import os, signal, threading, warnings, persist
            ended = []
            for n in range(100):
                @persist.memoize(cache_dir=os.path.join(%r, str(n)), name="f")
                def f(x):
                    return x * 2
                started = threading.Event()
                def first():
                    started.set()
                    f(1)
                thread = threading.Thread(target=first)
                thread.start()
                started.wait()
                pid = os.fork()
                if pid == 0:
                    signal.alarm(20)          # a hang ends the child, and fails the test
                    warnings.simplefilter("error")
                    try:
                        ok = f(2) == 4 and f.cache_info().unstored == 0
                    except BaseException as exc:
                        print(n, repr(exc), flush=True)
                        os._exit(3)
                    os._exit(0 if ok else 2)
                thread.join()
                ended.append(os.waitpid(pid, 0)[1])
                if ended[-1]:
                    break
            print(ended == [0] * 100)
        """ % self.dir, timeout=600)
        self.assertEqual(out, "True\n")
        for n in range(100):                  # the children's results are stored too
            with persist.open(self.path / str(n) / "f.db", "r") as db:
                self.assertEqual(len(db), 2)

    @slow
    @unittest.skipUnless("fork" in multiprocessing.get_all_start_methods(), "needs fork")
    def test_map_forks_while_another_thread_makes_the_cache(self):
        # The same through persist.map(workers=2): its workers were forked while another
        # thread made the cache of its function, and stored none of their results (26 of
        # 30 runs stored only the other thread's).
        out = run_python("""
            import multiprocessing, os, threading, persist
            multiprocessing.set_start_method("fork")
            ends = []
            for n in range(30):
                def f(x):
                    return x * 2
                f = persist.memoize(cache_dir=os.path.join(%r, str(n)), name="f")(f)
                started = threading.Event()
                def first():
                    started.set()
                    f(0)
                thread = threading.Thread(target=first)
                thread.start()
                started.wait()
                results = persist.map(f, range(1, 9), workers=2)
                thread.join()
                with persist.open(os.path.join(%r, str(n), "f.db"), "r") as db:
                    ends.append((results == [2 * i for i in range(1, 9)], len(db)))
                if ends[-1] != (True, 9):
                    break
            print(ends == [(True, 9)] * 30, ends[-1])
        """ % (self.dir, self.dir), timeout=600)
        self.assertEqual(out, "True (True, 9)\n")

    @slow
    def test_ctrl_c_while_fork_waits_for_another_thread(self):
        # Ctrl-C while fork() waited for another thread's store (its hook's error is ignored,
        # and the fork goes on) kept the locks of the caches it had already closed: any
        # other thread that used one of them then waited for ever.
        out = run_python("""
            import os, signal, sqlite3, sys, threading, persist
            base = %r
            shelves = [persist.open(os.path.join(base, "s%%d.db" %% i)) for i in range(10)]
            for db in shelves:
                db["x"] = 0               # each holds its connection open
            path = os.path.join(base, "blocked.db")
            blocked = persist.open(path)
            blocked["x"] = 0
            interrupted = threading.Event()
            def on_sigint(signum, frame):
                while frame is not None:   # Ctrl-C only while persist prepares the fork
                    if frame.f_code.co_name == "_before_fork":
                        interrupted.set()
                        raise KeyboardInterrupt
                    frame = frame.f_back
            signal.signal(signal.SIGINT, on_sigint)
            ended = []
            for n in range(3):            # in whatever order fork() takes the caches
                interrupted.clear()
                holder = sqlite3.connect(path, timeout=0)
                holder.execute("BEGIN IMMEDIATE")      # the writer below waits for it
                inside = threading.Event()
                def watch(frame, event, arg):
                    # the store's transaction, or the one statement of a small value
                    if event == "call" and frame.f_code.co_name in ("_transaction",
                                                                    "_put_row"):
                        inside.set()
                def write():
                    sys.setprofile(watch)
                    blocked["r%%d" %% n] = n
                    sys.setprofile(None)
                writer = threading.Thread(target=write)
                writer.start()
                if not inside.wait(60):    # the writer holds its cache: fork() waits
                    print("the writer never stored", flush=True)
                    os._exit(1)
                def press():
                    while not interrupted.wait(0.01):
                        os.kill(os.getpid(), signal.SIGINT)
                presser = threading.Thread(target=press)
                presser.start()
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                presser.join()
                holder.rollback()
                holder.close()
                writer.join()
                os.waitpid(pid, 0)
                def use():
                    for db in shelves + [blocked]:
                        db["y"] = n
                user = threading.Thread(target=use, daemon=True)
                user.start()
                user.join(120)            # a lock left held: it would wait for ever
                ended.append(not user.is_alive())
                if user.is_alive():
                    break
            print(ended, flush=True)
            os._exit(0)
        """ % self.dir, timeout=600)
        self.assertEqual(out, "[True, True, True]\n")

    def test_ctrl_c_as_the_parents_fork_hook_begins(self):
        # Ctrl-C as the parent's half of fork()'s hooks began (CPython ignores a hook's error:
        # the fork went on) kept the lock that keeps SQLite work from starting during a
        # fork, and the locks of the caches it had closed: any other thread that then used
        # a cache waited for ever. Seen within 100 forks under a SIGALRM handler raising
        # KeyboardInterrupt at random moments. A trace function raises it where a signal's
        # handler could: as the hook begins, and, in a second fork, as it returns.
        out = run_python("""
            import os, sys, threading, persist
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x
            shelf = persist.open(os.path.join(%r, "shelf"))
            ended = []
            for event in ("call", "return"):
                f(1)
                shelf["x"] = 1                # each holds its connection open
                def trace(frame, ev, arg):
                    if frame.f_code.co_name == "_after_fork_in_parent":
                        if ev == event:
                            raise KeyboardInterrupt
                        return trace
                sys.settrace(trace)
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                sys.settrace(None)
                os.waitpid(pid, 0)
                def use():
                    f(2)
                    shelf["y"] = 2
                user = threading.Thread(target=use, daemon=True)
                user.start()
                user.join(60)                 # a lock left held: it would wait for ever
                ended.append(not user.is_alive())
                if user.is_alive():
                    break
            print(ended, flush=True)
            os._exit(0)
        """ % (self.dir, self.dir), timeout=300)
        self.assertEqual(out, "[True, True]\n")

    def test_ctrl_c_as_the_fork_gate_is_taken_leaves_it_free(self):
        # Opening a connection and making a cache take the gate that keeps their SQLite work
        # apart from a fork (_FORK_GATE), and took it as "gated = _gate()" then "try:": a
        # Ctrl-C between the two left it held by the main thread, and every other thread's
        # next cache, and its fork, waited for ever. A trace function raises
        # KeyboardInterrupt in turn at each place of both where Python runs a signal's
        # handler (from 3.10: after a call, bpo-29988); the gate must be free after each.
        out = run_python("""
            import dis, os, sys, threading, persist
            codes = [persist._Connection.__init__.__code__,
                     persist._elsewhere.__wrapped__.__code__]
            leaks, raised, n = [], [], [0]
            def free():
                took = []
                def take():
                    took.append(persist._FORK_GATE.acquire(timeout=30))
                    if took[0]:
                        persist._FORK_GATE.release()
                other = threading.Thread(target=take, daemon=True)
                other.start()
                other.join(60)
                return took == [True]
            for code in codes:
                ops = list(dis.get_instructions(code))
                for op in [b for a, b in zip(ops, ops[1:]) if a.opname.startswith("CALL")]:
                    if leaks:
                        break
                    def trace(frame, event, arg):
                        if frame.f_code is code:
                            frame.f_trace_opcodes = True
                            if event == "opcode" and frame.f_lasti == op.offset and not armed:
                                armed.append(op.offset)
                                raise KeyboardInterrupt
                            return trace
                    armed = []
                    n[0] += 1
                    @persist.memoize(cache_dir=os.path.join(%r, str(n[0])))
                    def f(x):
                        return x
                    sys.settrace(trace)
                    try:
                        f(1)
                    except KeyboardInterrupt:
                        pass
                    finally:
                        sys.settrace(None)
                    raised += armed
                    if not free():
                        leaks.append((code.co_name, op.offset, op.opname))
            print(len(raised) > 5, leaks, flush=True)
            os._exit(0)
        """ % (self.dir,), timeout=300)
        self.assertEqual(out, "True []\n")

    def test_ctrl_c_as_forks_with_block_ends(self):
        # A Ctrl-C in fork()'s hook as it closed a connection under that connection's lock:
        # Python 3.8 and 3.9 run a signal's handler between a with's body and its __exit__,
        # and as an error (a first Ctrl-C) enters __exit__: the lock stayed held, and another
        # thread that used the cache waited for ever (TestFork's 120 s flake, [True, False]).
        # A profile hook and a trace function raise KeyboardInterrupt there.
        out = run_python("""
            import dis, os, sys, threading, persist
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x
            shelf = persist.open(os.path.join(%r, "shelf"))
            code = persist._before_fork.__code__
            ops = list(dis.get_instructions(code))
            ends = [b.offset for a, b in zip(ops, ops[1:]) if a.opname == "POP_BLOCK"]
            ended = []
            for case in ("twice", "as the body ends"):
                f(1)
                shelf["x"] = 1                # each holds its connection open
                raised = []
                def profile(frame, event, arg):
                    if frame.f_code.co_name == "_close_conn" and event == "call" and \\
                            frame.f_back.f_code is code:
                        raised.append(event)
                        raise KeyboardInterrupt   # inside the with, as a connection closes
                def trace(frame, event, arg):
                    if frame.f_code is code:
                        frame.f_trace_opcodes = True
                        if event == "opcode" and (
                                raised if case == "twice" else frame.f_lasti in ends):
                            raised.append(event)
                            raise KeyboardInterrupt   # as the with's __exit__ is due
                        return trace
                if case == "twice":
                    sys.setprofile(profile)
                sys.settrace(trace)
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                sys.settrace(None)
                sys.setprofile(None)
                os.waitpid(pid, 0)
                def use():
                    f(2)
                    shelf["y"] = 2
                user = threading.Thread(target=use, daemon=True)
                user.start()
                user.join(60)                 # a lock left held: it would wait for ever
                ended.append(not user.is_alive())
                if user.is_alive():
                    break
            print(ended, flush=True)
            os._exit(0)
        """ % (self.dir, self.dir), timeout=300)
        self.assertEqual(out, "[True, True]\n")

    def test_ctrl_c_as_fork_closes_a_connection(self):
        # Ctrl-C as fork() closed a cache's connection (its hook's error is ignored, and the
        # fork goes on) left the closed connection in place: every later use of the cache
        # in the parent failed ("Cannot operate on a closed database"), results unstored.
        # A trace function raises KeyboardInterrupt where a signal's handler could: as the
        # close ends.
        out = run_python("""
            import os, sys, warnings, persist
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x
            f(1)                          # its connection is open
            hit = []
            def trace(frame, event, arg):
                if event == "return" and frame.f_code.co_name == "_close" and \\
                        frame.f_back.f_code.co_name == "_close_conn" and \\
                        frame.f_back.f_back.f_code.co_name == "_before_fork":
                    hit.append(1)
                    raise KeyboardInterrupt
                return trace if frame.f_code.co_name == "_close" else None
            sys.settrace(trace)
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            sys.settrace(None)
            os.waitpid(pid, 0)
            with warnings.catch_warnings():
                warnings.simplefilter("error")          # no "cannot read/store" warning
                print(hit, f(2), f(1), f.cache_info()[:3], f.cache_info().unstored, flush=True)
            os._exit(0)
        """ % self.dir, timeout=120)
        self.assertEqual(out, "[1] 2 1 (1, 2, 2) 0\n")


@unittest.skipUnless(hasattr(os, "fork") and hasattr(signal, "setitimer"), "fork, setitimer")
class TestForkInASignalHandler(TempDirTest):
    def test_parent_goes_on_and_the_child_never_hangs(self):
        out = run_python("""
            import os, signal, persist
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x * 2
            children = []
            def fork(signum, frame):
                pid = os.fork()
                if pid == 0:
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)
                    signal.alarm(60)            # a hang fails the test instead of blocking it
                    try:
                        f(-1)
                    except OSError as exc:      # forked while the parent was writing
                        os._exit(0 if "forked" in str(exc) else 2)
                    os._exit(0)
                children.append(pid)
                signal.setitimer(signal.ITIMER_REAL, 0.005)   # the next, once this one is done
            signal.signal(signal.SIGALRM, fork)
            signal.setitimer(signal.ITIMER_REAL, 0.005)
            for i in range(2000):
                assert f(i %% 400) == i %% 400 * 2
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            codes = [os.waitpid(pid, 0)[1] for pid in children]
            print(len(children) > 5, sorted(set(codes)))
        """ % self.dir, timeout=120)
        self.assertEqual(out, "True [0]\n")

    def test_handler_opens_a_new_cache_while_another_thread_forks(self):
        # The main thread stores (held up by another connection), the fork of another
        # thread waits for it, and a signal handler in the main thread opens a new cache:
        # that handler waited for the fork to end, the fork for the main thread, for ever.
        out = run_python("""
            import faulthandler, os, signal, sqlite3, sys, threading, time, persist
            faulthandler.dump_traceback_later(120, exit=True)   # a deadlock fails the test
            base = %r
            path = os.path.join(base, "held.db")
            held = persist.open(path)
            held["x"] = 0
            holder = sqlite3.connect(path, timeout=0, check_same_thread=False)
            holder.execute("BEGIN IMMEDIATE")   # the store below waits for it
            def on_usr1(signum, frame):         # in the store's transaction, once it goes on
                with persist.open(os.path.join(base, "new.db")) as db:
                    db["h"] = 1
            signal.signal(signal.SIGUSR1, on_usr1)
            inside, waiting = threading.Event(), threading.Event()
            def watch_main(frame, event, arg):
                # the store's transaction, or the one statement of a small value
                if event == "call" and frame.f_code.co_name in ("_transaction", "_put_row"):
                    inside.set()
            def watch_fork(frame, event, arg):
                # The fork begins. (This once watched for a call of the connection's lock,
                # which the fork's hook now takes with "with", unseen by a profiler: its 60 s
                # ran out in every run.)
                if event == "c_call" and arg is os.fork:
                    waiting.set()
            def fork():
                if not inside.wait(60):         # the main thread is in its store
                    print("the main thread never stored", flush=True)
                    os._exit(1)
                sys.setprofile(watch_fork)
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                sys.setprofile(None)
                os.waitpid(pid, 0)
            def release():
                waiting.wait(60)
                while not persist._FORKING_NOW:  # the fork holds the gate, and so waits for
                    time.sleep(0)               # the main thread's store (its lock) next
                os.kill(os.getpid(), signal.SIGUSR1)
                holder.rollback()
            forker = threading.Thread(target=fork)
            releaser = threading.Thread(target=release)
            forker.start()
            releaser.start()
            sys.setprofile(watch_main)
            held["y"] = 1
            sys.setprofile(None)
            forker.join()
            releaser.join()
            with persist.open(os.path.join(base, "new.db"), "r") as db:
                print(dict(db), held["y"])
        """ % self.dir, timeout=300)
        self.assertEqual(out, "{'h': 1} 1\n")


class TestExitHooks(TempDirTest):
    """What a process leaves at exit, and a memoized function once it is garbage: no log, no
    connection left open, no ResourceWarning."""

    def test_no_log_is_left_by_a_process_that_never_closed(self):
        # PyPy frees nothing at exit: only persist's own exit handler closes its connections
        run_python("""
            import persist
            db = persist.open("shelf.db")
            db["k"] = 1

            @persist.memoize(cache_dir=".")
            def f(x):
                return x

            f(1)
        """, cwd=self.dir)
        self.assertEqual(sorted(name for name in os.listdir(self.dir)
                                if name.endswith(("-wal", "-shm"))), [])

    # A shelf closed by hand while another process has the cache open keeps the log, as it
    # must; when the other one is gone by this process's exit, the exit removes it.
    def test_exit_removes_the_log_an_earlier_close_had_to_leave(self):
        path = str(self.path / "shelf")
        writer = start_python(self, """
            import sys, persist
            shelf = persist.open(%r)
            shelf["a"] = 1
            print("wrote", flush=True)
            sys.stdin.readline()
            shelf.close()                 # the other is there: the log stays
            print("closed", flush=True)
            sys.stdin.readline()
        """ % path)
        self.assertEqual(writer.stdout.readline(), "wrote\n")
        other = start_python(self, """
            import os, sqlite3, sys
            conn = sqlite3.connect(%r)
            conn.execute("SELECT count(*) FROM Dict").fetchall()
            print("open", flush=True)
            sys.stdin.readline()
            os._exit(0)                   # gone without closing: it leaves the log too
        """ % path)
        self.assertEqual(other.stdout.readline(), "open\n")
        writer.stdin.write("close\n")
        writer.stdin.flush()
        self.assertEqual(writer.stdout.readline(), "closed\n")
        self.assertTrue(os.path.exists(path + "-wal"))
        other.communicate("exit\n")
        writer.communicate("exit\n")
        self.assertEqual(writer.returncode, 0)
        self.assertEqual(sorted(os.listdir(self.dir)), ["shelf"])
        with persist.open(path, "r") as shelf:
            self.assertEqual(dict(shelf), {"a": 1})

    # A daemon thread still running at exit, which uses a cache after persist closed its
    # connections, leaves no log behind: its connection is not left open for ever.
    def test_use_after_close_all_leaves_no_log(self):
        run_python("""
            import atexit, threading
            go, inside = threading.Event(), threading.Event()
            # registered before persist's own: runs after it has closed its connections
            atexit.register(lambda: (go.set(), inside.wait()))
            import persist
            @persist.memoize(cache_dir=%r, name="late")
            def f(x):
                if x == "stay":           # the thread is in here when the process ends
                    inside.set()
                    threading.Event().wait()
                return x
            f(0)
            def late():
                go.wait()
                f(1)                      # a write, on a connection opened at exit
                f("stay")
            threading.Thread(target=late, daemon=True).start()
        """ % self.dir)
        self.assertEqual(sorted(os.listdir(self.dir)), ["late.db"])
        with persist.open(self.path / "late.db", "r") as shelf:
            self.assertEqual(len(shelf), 2)

    # A memoized function defined anew in a loop (or in a notebook's cell run again), each
    # one then garbage: the process leaves no -wal or -shm file at exit. On PyPy the sqlite3
    # connection of a collected function was never closed, and both files stayed.
    def test_no_log_left_at_exit(self):
        run_python("""
            import gc, persist
            for n in range(5):
                @persist.memoize(cache_dir=%r, name="f")
                def f(x):
                    return x * 2
                f(n)
            del f
            for _ in range(3):
                gc.collect()
        """ % self.dir)
        self.assertEqual(sorted(os.listdir(self.dir)), ["f.db"])

    def test_its_cache_is_closed_without_a_resource_warning(self):
        def use_and_drop():
            @persist.memoize(cache_dir=self.dir)
            def f(x):
                return x

            self.assertEqual(f(1), 1)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            use_and_drop()
            import gc
            for _ in range(3):          # PyPy frees the function, then what it held
                gc.collect()
        self.assertEqual([str(w.message) for w in caught], [])
        self.assertEqual([name for name in os.listdir(self.dir)
                          if name.endswith(("-wal", "-shm"))], [])


# -- the store: interrupts, kill -9 and torture


@slow
@unittest.skipUnless(hasattr(signal, "alarm"), "signal.alarm")
class TestInterruptAtEachCall(TempDirTest):
    """Ctrl-C raised at each function call in turn inside persist (and, on PyPy, inside its
    pure-Python sqlite3, where an interrupted statement can never be finalized and close()
    failed) while a cache is made and used: the interrupt propagates, no lock stays held."""

    def test_interrupt_at_each_call(self):
        out = run_python("""
            import os, signal, sys, persist
            watched = (persist.__file__, getattr(sys.modules.get("_sqlite3"), "__file__", "?"))
            calls = [0, 0]
            def tracer(frame, event, arg):
                if event == "call" and frame.f_code.co_filename in watched:
                    calls[0] += 1
                    if calls[0] == calls[1]:
                        raise KeyboardInterrupt
                return None
            interrupted = 0
            for n in range(1, 150):
                @persist.memoize(cache_dir=os.path.join(%r, str(n)))
                def f(x):
                    return x * 2
                calls[:] = [0, n]
                sys.settrace(tracer)
                try:
                    f(1), f(1), f(2), f.cache_info()
                except KeyboardInterrupt:
                    interrupted += 1
                finally:
                    sys.settrace(None)
                signal.alarm(20)          # a lock left held would hang here
                if (f(1), f(3), f(1)) != (2, 6, 2) or f.cache_info().entries < 2:
                    print("wrong after an interrupt at call", n, f.cache_info())
                signal.alarm(0)
            print(interrupted > 40)
        """ % self.dir, timeout=120)
        self.assertEqual(out, "True\n")


@unittest.skipUnless(hasattr(signal, "setitimer"), "setitimer")
class TestInterrupts(TempDirTest):
    @slow
    def test_keyboard_interrupt_anywhere_leaves_no_lock_held(self):
        out = run_python("""
            import signal, sys, persist
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x * 2
            armed = [True]
            def interrupt(signum, frame):
                # only inside persist, so that the loop below always catches it (and not
                # late: PyPy may run a handler after the timer is off)
                while armed[0] and frame is not None:
                    if frame.f_code.co_filename == persist.__file__:
                        raise KeyboardInterrupt
                    frame = frame.f_back
            signal.signal(signal.SIGALRM, interrupt)
            interrupts = 0
            for i in range(3000):
                signal.setitimer(signal.ITIMER_REAL, 0.00001 * (i %% 37 + 1))
                try:
                    f(i %% 200)
                    f.cache_info()
                except KeyboardInterrupt:
                    interrupts += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
            armed[0] = False
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(20)              # a leaked lock would hang here
            print(interrupts > 100, f(7), f(1000), f.cache_info().entries <= 201)
        """ % self.dir)
        self.assertEqual(out, "True 14 2000 True\n")

    def test_signal_handler_may_use_the_cache(self):
        out = run_python("""
            import signal, persist
            @persist.memoize(cache_dir=%r)
            def f(x):
                return x * 2
            seen, busy = [], []
            def progress(signum, frame):
                if not busy:              # the handler itself is not interrupted by the next
                    busy.append(1)
                    seen.append((f.cache_info().entries, f(-1), f(-len(seen) - 2)))
                    busy.pop()
            signal.signal(signal.SIGALRM, progress)
            signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)   # PyPy: not all handlers
            for i in range(3000):
                f(i %% 300)
            signal.setitimer(signal.ITIMER_REAL, 0)
            print(len(seen) > 10, all(a == -2 and b == -2 * (n + 2)
                                      for n, (_, a, b) in enumerate(seen)))
        """ % self.dir, timeout=60)
        self.assertEqual(out, "True True\n")


class TestInterruptAroundATransaction(TempDirTest):
    """Ctrl-C as a transaction begins and as its COMMIT returns, and as the one statement
    that stores a small value (_PUT_ROW) returns."""

    # Ctrl-C raised as the line marker of persist.py returns (BEGIN IMMEDIATE, or the
    # statement that stores a small value), while persist.open() stores value; the shelf is
    # then left alone, as at a prompt after Ctrl-C. Every other writer (another process, or
    # this one through another shelf) can write at once: a write lock left held would make
    # each of them wait out its busy timeout, ten minutes. Prints whether value was stored.
    def interrupted_after(self, marker, value):
        return run_python("""
            import linecache, os, sqlite3, sys, persist
            path = os.path.join(%r, "shelf")
            began = []
            def tracer(frame, event, arg):
                if frame.f_code.co_filename != persist.__file__:
                    return None
                if event == "line" and began and not began[-1]:
                    began[-1] = True
                    raise KeyboardInterrupt       # the first line after the marker's
                if event == "line" and %r in linecache.getline(
                        frame.f_code.co_filename, frame.f_lineno):
                    began.append(False)
                return tracer
            with persist.open(path) as shelf:
                shelf["old"] = 1
                sys.settrace(tracer)
                try:
                    shelf["new"] = %s
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.settrace(None)
                other = sqlite3.connect(path, timeout=0, isolation_level=None)
                try:
                    other.execute("BEGIN IMMEDIATE")
                    other.execute("ROLLBACK")
                    print(began, "free", "new" in shelf)
                except sqlite3.OperationalError as exc:
                    print(began, exc)
                finally:
                    other.close()
        """ % (self.dir, marker, value))

    def test_no_write_lock_outlives_the_interrupt(self):
        # a large value goes to a value file, in a transaction: not stored
        out = self.interrupted_after("BEGIN IMMEDIATE", "b'x' * (persist._INLINE_LIMIT + 1)")
        self.assertEqual(out, "[True] free False\n")

    def test_no_write_lock_outlives_an_interrupt_after_the_one_statement(self):
        # a small value: stored, and committed, as the statement returned
        out = self.interrupted_after("_PUT_ROW", "2")
        self.assertEqual(out, "[True] free True\n")

    def test_a_transaction_left_open_is_rolled_back_at_the_next_use(self):
        # The step after BEGIN fails, and so does persist's rollback (an I/O error; a second
        # Ctrl-C would do the same): the transaction stays open, with the write lock. The
        # shelf's next use ends it, and goes on.
        fail = []

        class Connection(sqlite3.Connection):
            def execute(self, sql, *args):
                if fail and sql.startswith(fail[0]):
                    raise sqlite3.OperationalError("disk I/O error (%s)" % fail.pop(0))
                return super().execute(sql, *args)

        connect = sqlite3.connect
        with mock.patch.object(persist.sqlite3, "connect",
                               lambda *args, **kwargs: connect(*args, factory=Connection,
                                                               **kwargs)):
            with persist.open(self.path / "shelf") as shelf:
                shelf["old"] = 1
                fail[:] = ["REPLACE INTO Dict", "ROLLBACK"]
                with self.assertRaisesRegex(OSError, "disk I/O error"):
                    shelf["new"] = b"x" * (persist._INLINE_LIMIT + 1)   # a transaction
                self.assertEqual(fail, [])
                fail[:] = ["INSERT INTO PutRow"]     # a small value: one statement
                with self.assertRaisesRegex(OSError, "disk I/O error"):
                    shelf["new"] = 2
                self.assertEqual(fail, [])
                shelf["new"] = 3
                self.assertEqual(sorted(shelf.items()), [("new", 3), ("old", 1)])
        self.assertEqual(value_files(self.path / "shelf"), (set(), set()))
        other = sqlite3.connect(str(self.path / "shelf"), timeout=0, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")            # no write lock left held
        other.execute("ROLLBACK")

    # Ctrl-C that arrives while COMMIT runs is raised as COMMIT returns: the stored row
    # must keep its value file.
    def test_large_value_stays_readable(self):
        cache = self.path / "shelf.db"
        real = persist._transaction

        def commit_then_interrupt(conn, work, args):
            real(conn, work, args)
            raise KeyboardInterrupt           # as from a signal handler, after COMMIT
        big = b"x" * (persist._INLINE_LIMIT + 1)
        with persist.open(cache) as db:
            persist._transaction = commit_then_interrupt
            try:
                with self.assertRaises(KeyboardInterrupt):
                    db["k"] = big
            finally:
                persist._transaction = real
            self.assertEqual(db["k"], big)
        on_disk, named = value_files(cache)
        self.assertEqual((len(on_disk), on_disk), (1, named))

    def test_value_that_was_not_stored_leaves_no_file(self):
        cache = self.path / "shelf.db"
        real = persist._transaction

        def interrupt(conn, work, args):
            raise KeyboardInterrupt           # before BEGIN: nothing is stored
        with persist.open(cache) as db:
            persist._transaction = interrupt
            try:
                with self.assertRaises(KeyboardInterrupt):
                    db["k"] = b"x" * (persist._INLINE_LIMIT + 1)
            finally:
                persist._transaction = real
            self.assertNotIn("k", db)
        self.assertEqual(value_files(cache), (set(), set()))


@unittest.skipUnless(POSIX, "SIGKILL")
class TestKilledLeavesNothingForGood(TempDirTest):
    def test_killed_while_writing_a_large_value(self):
        cache = self.path / "big.db"
        child = start_python(self, """
            import sys, persist
            class Slow:
                def __reduce__(self):
                    print("writing", flush=True)
                    sys.stdin.readline()           # killed here, half written
                    return (bytes, (10,))
            with persist.open(%r) as db:
                db["k"] = [b"x" * 1000000, Slow()]
        """ % str(cache))
        self.assertEqual(child.stdout.readline(), "writing\n")
        on_disk, named = value_files(cache)
        self.assertEqual((len(on_disk), named), (1, set()))   # the partial file
        stop(child)
        with persist.open(cache) as db:                      # a normal use sweeps it
            db["other"] = 1
        self.assertEqual(value_files(cache), (set(), set()))

    def test_killed_during_prune_gives_space_back_later(self):
        cache = self.path / "c.db"
        with persist.open(cache) as db:
            for i in range(300):
                db[str(i)] = b"v" * 10000
        conn = sqlite3.connect(str(cache))
        conn.execute("DELETE FROM Dict")       # what a prune killed before vacuuming leaves
        conn.commit()
        conn.close()
        full = cache.stat().st_size
        persist.open(cache).close()
        self.assertLess(cache.stat().st_size, full / 4)


@slow
@unittest.skipUnless(POSIX, "SIGKILL")
class TestMemoizeKilled(TempDirTest):
    def test_every_reported_result_survives_kill_9(self):
        code = """
            import sys, persist
            @persist.memoize(cache_dir=%r, name="killed")
            def f(x):
                return {"x": x, "pad": "p" * (x %% 7) * 1000}
            start = int(sys.argv[1])
            for i in range(start, start + 100000):
                f(i)
                print(i, flush=True)
        """ % self.dir
        reported = set()
        rng = random.Random(3)
        for round_ in range(12):
            child = spawn(self, [sys.executable, "-c", textwrap.dedent(code), str(round_ * 1000)],
                          stdout=subprocess.PIPE, universal_newlines=True)
            for _ in range(rng.randint(1, 150)):
                reported.add(int(child.stdout.readline()))
            child.kill()
            child.wait()
            reported.update(int(line) for line in child.stdout.read().split())
            child.stdout.close()
        self.assertAllHits("killed", reported, lambda x: {"x": x, "pad": "p" * (x % 7) * 1000})


# Half a second in the suite, counted from the first result (a few kills, a few hundred
# results checked); .ci/run gives the newest interpreter a longer run, and
# python test_persist.py --torture [SECONDS] runs it for as long as you like.
TORTURE_SECONDS = float(os.environ.get("PERSIST_TORTURE_SECONDS", "0.5"))


@slow
@unittest.skipUnless(POSIX, "SIGKILL")
class TestTorture(TempDirTest):
    """8 processes share one cache while writers are killed at random moments.

    python test_persist.py --torture [SECONDS] runs it for minutes; the suite, for half a second.
    """

    WORKER = """
        import sys, persist
        @persist.memoize(cache_dir=sys.argv[1], name="torture")
        def f(x):
            return {"x": x, "blob": bytes([x % 251]) * ((x % 5) * 100000)}
        start = int(sys.argv[2])
        for i in range(start, start + 400):
            value = f(i % 3000)
            assert value["x"] == i % 3000
            print(i % 3000, flush=True)
    """

    def test_killed_writers_lose_nothing_reported(self):
        rng = random.Random()
        reported, lock = set(), threading.Lock()

        def start():
            child = spawn(self, [sys.executable, "-c", textwrap.dedent(self.WORKER), self.dir,
                                 str(rng.randrange(3000))],
                          stdout=subprocess.PIPE, universal_newlines=True)
            first = threading.Event()

            def collect():
                for line in child.stdout:
                    with lock:
                        reported.add(int(line))
                    first.set()

            reader = threading.Thread(target=collect, daemon=True)
            reader.start()
            return child, reader, first

        workers = [start() for _ in range(8)]
        kills = 0
        try:
            # The clock starts once each worker has reported a result, so that a slow start
            # (PyPy's workers took the whole second) does not eat the torture; at least one
            # kill. Not before: a worker still making the cache would leave its half-made
            # file, which persist keeps for a minute as it may be a live creator's (see
            # TestCreationLeftHalfMade); a loaded machine left one behind in 2 runs of 6.
            deadline = __import__("time").monotonic() + 120
            for _, _, first in workers:
                self.assertTrue(first.wait(max(0, deadline - __import__("time").monotonic())),
                                "a worker reported no result within 120 s")
            deadline = __import__("time").monotonic() + TORTURE_SECONDS
            while kills == 0 or __import__("time").monotonic() < deadline:
                threading.Event().wait(rng.uniform(0, 0.2))
                n = rng.randrange(8)
                child, reader, _ = workers[n]
                child.kill()
                child.wait()
                joined(reader)
                child.stdout.close()
                kills += 1
                workers[n] = start()
        finally:
            for child, reader, _ in workers:
                child.kill()
                child.wait()
                joined(reader)
                child.stdout.close()
        if "PERSIST_TORTURE_SECONDS" in os.environ:
            print("\ntorture: %g s, %d writers killed, %d results reported and checked"
                  % (TORTURE_SECONDS, kills, len(reported)), file=sys.stderr)
        self.assertAllHits("torture", reported,
                           lambda x: {"x": x, "blob": bytes([x % 251]) * ((x % 5) * 100000)})
        # assertAllHits opened the cache as a normal run would: what the killed writers left
        # half written is gone, and every value file belongs to a row
        on_disk, named = value_files(self.path / "torture.db")
        self.assertEqual(on_disk, named)
        self.assertNoTemp()


# -- file helpers: fsync, and no descriptor left open


class TestFullFsyncWhereThePlatformHasIt(TempDirTest):
    """macOS: fsync() leaves data in the drive's cache, so F_FULLFSYNC is used where it exists."""

    F_FULLFSYNC = 51

    def sync_with(self, fcntl_call, write):
        fake = mock.MagicMock(fcntl=mock.Mock(side_effect=fcntl_call))
        with mock.patch.object(persist, "_FULLFSYNC", self.F_FULLFSYNC), \
                mock.patch.object(persist, "_fcntl", fake), mock.patch("os.fsync") as fsync:
            write()
        return fake.fcntl.call_args_list, fsync.call_args_list

    def test_atomic_write_full_syncs_the_file_and_the_directory(self):
        synced = []

        def fcntl(fd, command):
            self.assertEqual(command, self.F_FULLFSYNC)
            synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))

        _, fsyncs = self.sync_with(fcntl, lambda: persist.atomic_write(self.path / "a", "x"))
        self.assertEqual(synced, [False, True] if POSIX else [False])   # data, then rename
        self.assertEqual(fsyncs, [])
        self.assertEqual((self.path / "a").read_text(), "x")

    def test_sync_false_full_syncs_nothing(self):
        calls, fsyncs = self.sync_with(
            None, lambda: persist.atomic_write(self.path / "a", "x", sync=False))
        self.assertEqual((calls, fsyncs), ([], []))

    def test_a_filesystem_without_it_gets_fsync(self):
        def fcntl(fd, command):
            raise OSError(errno.ENOTSUP, "Operation not supported")

        calls, fsyncs = self.sync_with(fcntl, lambda: persist.atomic_write(self.path / "a", "x"))
        self.assertEqual(len(calls), len(fsyncs))    # each refused full sync fell back
        self.assertGreaterEqual(len(fsyncs), 1)
        self.assertEqual((self.path / "a").read_text(), "x")
        self.assertNoTemp()

    def test_done_dir_marker_is_full_synced(self):
        def stage():
            with persist.done_dir(self.path / "out") as d:
                (d / "part").write_text("x")

        calls, fsyncs = self.sync_with(lambda fd, command: None, stage)
        self.assertGreaterEqual(len(calls), 3 if POSIX else 1)   # directory, marker, rename
        # the part gets a plain fsync: the full syncs after it empty the drive's cache of it
        self.assertEqual(len(fsyncs), 1)
        self.assertTrue(persist.is_done(self.path / "out"))

    def test_cache_checkpoints_full_sync(self):
        with persist.open(self.path / "db") as db:
            db["k"] = 1
            (on,), = db.dict.conn.run(lambda conn: conn.execute("PRAGMA checkpoint_fullfsync").fetchall())
        self.assertEqual(on, 1)


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "/proc/self/fd lists open descriptors")
class TestInterruptAsADescriptorOpens(TempDirTest):
    """Ctrl-C raised as each os.open() in turn returns, while done_dir() starts and finishes
    a stage (its lock, the fsync of each file and directory) and atomic_write() writes: the
    process has no more descriptors open than before. Each one lost so stayed open for good,
    where a signal lands now and then (some in a hundred stages, with SIGALRM)."""

    def test_no_descriptor_left_open(self):
        out = run_python("""
            import gc, linecache, os, sys, persist
            stage, target = os.path.join(%r, "stage"), os.path.join(%r, "out")
            opens = [0, 0]
            def tracer(frame, event, arg):
                if frame.f_code.co_filename != persist.__file__:
                    return None
                if event == "line" and "os.open" in linecache.getline(
                        persist.__file__, frame.f_lineno):
                    opens[0] += 1
                    if opens[0] == opens[1]:
                        return opening
                return tracer
            def opening(frame, event, arg):
                if event == "line":
                    raise KeyboardInterrupt       # the line after os.open() returned
                return opening
            def stage_done():
                with persist.done_dir(stage) as where:
                    with open(os.path.join(where, "part"), "w") as file:
                        file.write("data")
            def write():
                persist.atomic_write(target, "data")
            before = set(os.listdir("/proc/self/fd"))
            leaked, interrupted = [], 0
            for step in (stage_done, write):
                for n in range(1, 100):
                    opens[:] = [0, n]
                    sys.settrace(tracer)
                    try:
                        step()
                    except KeyboardInterrupt:
                        interrupted += 1
                    finally:
                        sys.settrace(None)
                    gc.collect()
                    now = set(os.listdir("/proc/self/fd"))
                    if now - before:
                        leaked.append((step.__name__, n))
                        before = now
                    if opens[0] < n:
                        break
            print(leaked, interrupted > 5)
        """ % (self.dir, self.dir))
        self.assertEqual(out, "[] True\n")
        self.assertNoTemp()


# -- file helpers: which filesystem holds a cache


MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
40 27 0:40 / /home rw,relatime shared:7 - nfs4 fileserver:/export/home rw,vers=4.2
41 40 0:41 / /home/ann/scratch rw,relatime - lustre 10.0.0.1@o2ib:/scratch rw,flock
42 27 0:42 / /mnt/remote\040box rw,nosuid - fuse.sshfs ann@box:/data\040set rw,user_id=0
43 27 254:0 /srv/data /mnt/bind rw,relatime - ext4 /dev/vda rw
44 27 0:44 / /mnt/over rw - tmpfs tmpfs rw
45 27 0:45 / /mnt/over rw - cifs //winbox/share rw,vers=3.0
46 27 0:46 / /gpfs rw - gpfs gpfs0 rw
47 27 0:47 / /mnt/tab\011and\134slash rw - 9p hostshare rw
48 27 0:48 / /media/usb rw - fuseblk /dev/sdb1 rw
a line that is not a mount
"""


class TestWhichFilesystem(TempDirTest):
    """_filesystem() and _shared_filesystem(): which filesystem holds a cache's directory,
    read from mountinfo (the longest mount point that holds it), and whether machines may
    share it (there SQLite's locks do not hold)."""

    def setUp(self):
        super().setUp()
        self.info = self.path / "mountinfo"
        self.info.write_text(MOUNTINFO)
        persist._FILESYSTEMS.clear()
        self.addCleanup(persist._FILESYSTEMS.clear)

    def kind(self, directory):
        with mock.patch("os.path.realpath", lambda path: path):    # the fixture's paths
            return (persist._filesystem(directory, str(self.info)),
                    persist._shared_filesystem(directory, str(self.info)))

    def test_the_longest_mount_point_that_holds_it(self):
        cases = {
            "/home/ann/project": (("nfs4", "fileserver:/export/home"), "nfs4"),
            "/home": (("nfs4", "fileserver:/export/home"), "nfs4"),
            "/home/ann/scratch/run1": (("lustre", "10.0.0.1@o2ib:/scratch"), "lustre"),
            "/home/ann/scratchpad": (("nfs4", "fileserver:/export/home"), "nfs4"),
            "/var/cache": (("ext4", "/dev/vda"), None),
            "/mnt/bind/x": (("ext4", "/dev/vda"), None),
            "/gpfs/project": (("gpfs", "gpfs0"), "gpfs"),
            "/media/usb/x": (("fuseblk", "/dev/sdb1"), None),
        }
        for directory, expected in cases.items():
            self.assertEqual(self.kind(directory), expected, directory)

    def test_escaped_mount_points_and_sources(self):
        self.assertEqual(self.kind("/mnt/remote box/cache"),
                         (("fuse.sshfs", "ann@box:/data set"), "fuse.sshfs"))
        self.assertEqual(self.kind("/mnt/remote\\040box/cache")[1], None)    # not unescaped
        self.assertEqual(self.kind("/mnt/tab\tand\\slash"), (("9p", "hostshare"), "9p"))

    def test_the_last_mount_on_a_point_covers_the_ones_before(self):
        self.assertEqual(self.kind("/mnt/over/x"), (("cifs", "//winbox/share"), "cifs"))

    def test_statfs_where_there_is_no_mountinfo(self):
        # (this machine's own filesystems: / and /proc are local, whichever way they are read)
        if not sys.platform.startswith("linux"):
            self.skipTest("statfs(2)'s f_type is Linux's")
        kind, source = persist._filesystem(self.dir, str(self.path / "no-such-file"))
        self.assertRegex(kind, r"^0x[0-9a-f]+$")
        self.assertIsNone(source)
        proc, _ = persist._filesystem("/proc", str(self.path / "no-such-file"))
        self.assertEqual(proc, "0x9fa0")                               # PROC_SUPER_MAGIC
        self.assertIsNone(persist._shared_filesystem("/proc", str(self.path / "nothing")))
        with mock.patch.object(persist, "_statfs_type", lambda directory: 0x6969):
            persist._FILESYSTEMS.clear()
            self.assertEqual(persist._shared_filesystem(self.dir, str(self.path / "none")),
                             "0x6969")                                # NFS_SUPER_MAGIC

    @unittest.skipUnless(os.path.exists("/proc/self/mountinfo"), "Linux's mountinfo")
    def test_this_machines_own_mounts(self):
        kind, source = persist._filesystem("/proc")
        self.assertEqual(kind, "proc")
        kind, _ = persist._filesystem(self.dir)
        self.assertTrue(kind)
        # the same directory again is not read again
        with mock.patch.object(persist, "_mounts", side_effect=AssertionError):
            self.assertEqual(persist._filesystem(self.dir)[0], kind)


class TestPublishedRecords(TempDirTest):
    """_publish() and _unframed(): a record written where no lock holds (a shared
    filesystem) is whole or not there; one cut short or torn at any byte is a miss."""

    def test_cut_short_or_torn_at_every_byte_is_a_miss(self):
        payload = pickle.dumps({"result": list(range(20))})
        path = str(self.path / "key")
        self.assertTrue(persist._publish(path, payload))
        with io.open(path, "rb") as file:
            record = file.read()
        self.assertEqual(persist._unframed(record), payload)
        for end in range(len(record)):
            self.assertIsNone(persist._unframed(record[:end]), end)
        for at in range(len(record)):
            torn = bytearray(record)
            torn[at] ^= 0x40
            self.assertIsNone(persist._unframed(bytes(torn)), at)
        self.assertIsNone(persist._unframed(record + b"\0"))
        self.assertIsNone(persist._unframed(payload))

    def test_the_first_writer_wins_and_no_temporary_file_is_left(self):
        path = str(self.path / "key")
        self.assertTrue(persist._publish(path, b"first"))
        self.assertFalse(persist._publish(path, b"second"))
        with io.open(path, "rb") as file:
            self.assertEqual(persist._unframed(file.read()), b"first")
        self.assertEqual(os.listdir(self.dir), ["key"])

    def test_without_hard_links_it_replaces_unless_the_record_appeared(self):
        for errno_ in (errno.EPERM, errno.EXDEV, getattr(errno, "ENOTSUP", errno.EPERM)):
            path = str(self.path / ("key%d" % errno_))
            refused = OSError(errno_, os.strerror(errno_))
            with mock.patch("os.link", side_effect=refused):
                self.assertTrue(persist._publish(path, b"one"))
                self.assertFalse(persist._publish(path, b"two"))
            with io.open(path, "rb") as file:
                self.assertEqual(persist._unframed(file.read()), b"one")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(
            "key%d" % e for e in {errno.EPERM, errno.EXDEV, getattr(errno, "ENOTSUP", 1)}))

    @slow
    def test_many_processes_publish_one_key_and_every_reader_sees_one_whole_record(self):
        path = str(self.path / "key")
        writers = [spawn(self, [sys.executable, "-c", textwrap.dedent("""
            import os, sys, persist
            for round in range(200):
                persist._publish(sys.argv[1] + str(round), os.urandom(4096 * (1 + %d)))
        """ % n), path]) for n in range(6)]
        for writer in writers:
            self.assertEqual(writer.wait(), 0)
        names = os.listdir(self.dir)
        self.assertEqual(len(names), 200)                  # no temporary file left
        for name in names:
            with io.open(os.path.join(self.dir, name), "rb") as file:
                self.assertIsNotNone(persist._unframed(file.read()), name)


# -- the store of files: memoize(store=), a shelf of files, mappings


def pretend_shared(test, directory, kind="nfs4"):
    """Make persist take directory for one on a filesystem several machines share (kind), as
    the mount table would say on a cluster, for this test (the real one: TestSharedMounts)."""
    key = (os.path.realpath(directory), "/proc/self/mountinfo")
    persist._FILESYSTEMS[key] = (kind, "server:/export")
    test.addCleanup(persist._FILESYSTEMS.pop, key, None)


class TestFilesStore(TempDirTest):
    """memoize(store="files"): every cache method, the ledger and explain() on a store of
    files, as on SQLite."""

    def memo(self, **options):
        calls = []

        @persist.memoize(cache_dir=self.dir, name="job", **options)
        def job(x):
            calls.append(x)
            if x < 0:
                raise ValueError("negative %d" % x)
            return [x] * 3
        job.calls = calls
        return job

    def test_results_failures_and_every_cache_method(self):
        job = self.memo(store="files")
        self.assertEqual([job(1), job(2), job(1)], [[1] * 3, [2] * 3, [1] * 3])
        self.assertEqual(job.calls, [1, 2])
        info = job.cache_info()
        self.assertEqual((info.hits, info.misses, info.entries, info.failures), (1, 2, 2, 0))
        self.assertEqual(info.path, os.path.join(self.dir, "job.files"))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "job.db")))
        for _ in range(2):
            with self.assertRaisesRegex(ValueError, "negative -5"):
                job(-5)
        failure, = job.failures()
        self.assertEqual((failure.type, failure.count, failure.call.args),
                         ("ValueError", 2, (-5,)))
        self.assertIn("ValueError: negative -5", failure.traceback)
        self.assertEqual(job.cache_info().failures, 1)
        self.assertEqual([job.explain(x).reason for x in (1, -5, 9)],
                         ["hit", "failed before", "no entry"])
        self.assertTrue(job.cache_delete(2))
        self.assertFalse(job.cache_delete(2))
        self.assertEqual(job.cache_info().entries, 1)
        job.cache_clear()
        self.assertEqual((job.cache_info().entries, job.failures()), (0, []))

    def test_a_success_ends_the_calls_failures(self):
        state = {"fail": True}

        @persist.memoize(cache_dir=self.dir, store="files")
        def flaky(x):
            if state["fail"]:
                raise OSError("network down")
            return x
        with self.assertRaises(OSError):
            flaky(1)
        self.assertEqual(len(flaky.failures()), 1)
        state["fail"] = False
        self.assertEqual(flaky(1), 1)
        self.assertEqual((flaky.failures(), flaky.explain(1).reason), ([], "hit"))

    def test_versions_kept_apart_pruned_on_request_and_expired_replaced(self):
        one = self.memo(store="files", version=1)
        one(1)
        two = self.memo(store="files", version=2)
        self.assertEqual(two.explain(1).reason, "another version")
        two(1)
        self.assertEqual((two.calls, two.cache_info().entries), ([1], 2))
        self.assertEqual(two.cache_prune(), 1)          # version 1's
        self.assertEqual(two.cache_info().entries, 1)
        brief = self.memo(store="files", version=2, expire=1e-6)
        stored = brief.explain(1).stored
        self.assertEqual(brief.explain(1).reason, "expired")
        brief(1)
        self.assertEqual(brief.calls, [1])
        self.assertGreater(two.explain(1).stored, stored)     # replaced, not kept
        self.assertEqual(two.cache_info().entries, 1)

    def test_a_result_stamped_ahead_of_the_clock_is_replaced_not_kept(self):
        # Stored by a machine whose clock ran a day ahead (or before this one jumped back):
        # expired, as its age cannot be known. Kept as "another writer's, stored since this
        # call began", it stayed, and every call computed it again.
        job = self.memo(store="files", expire=3600)
        with mock.patch("time.time", return_value=time.time() + 86400):
            job(1)
        self.assertEqual(job.explain(1).reason, "expired")
        job(1)
        self.assertEqual((job(1), job.calls, job.explain(1).reason), ([1] * 3, [1, 1], "hit"))

    def test_a_store_another_process_makes_meanwhile_is_taken_not_refused(self):
        # Two machines opening a new store at once: one looked for the marker before the
        # other published it (and its info), then found them there as it made the directory,
        # and refused it as "a directory of other files (store)": every call of that process
        # raised. Here the first look is made to miss what is there.
        self.memo(store="files")(1)
        real = persist._Directory.exists
        looks = []

        def late(self, path):
            looks.append(path)
            return len(looks) > 1 and real(self, path)
        with mock.patch.object(persist._Directory, "exists", late):
            again = self.memo(store="files")
            self.assertEqual((again(1), again.calls), ([1] * 3, []))

    def test_persist_map_stores_and_records_into_it(self):
        job = self.memo(store="files")
        with self.assertRaises(persist.Failures) as raised:
            persist.map(job, [1, -1, 2], progress=False)
        self.assertEqual([item for item, _ in raised.exception.failures], [-1])
        self.assertEqual(job.cache_info().entries, 2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool, \
                self.assertRaises(persist.Failures):
            persist.map(job, [1, -1, 2], executor=pool, progress=False)
        self.assertEqual(job.calls, [1, -1, 2, -1])    # the rerun computed only -1
        self.assertEqual(job.failures()[0].count, 2)

    def test_the_environment_chooses_and_bad_choices_are_refused_before_any_call(self):
        with mock.patch.dict(os.environ, {"PERSIST_STORE": "files"}):
            job = self.memo()
            job(1)
            self.assertTrue(job.cache_info().path.endswith("job.files"))
        with mock.patch.dict(os.environ, {"PERSIST_STORE": "postgres"}):
            late = self.memo()
            with self.assertRaisesRegex(ValueError, r"\$PERSIST_STORE='postgres'.*'files'"):
                late(1)
            self.assertEqual(late.calls, [])
        with self.assertRaisesRegex(ValueError, r"store='disk'.*'files', 'sqlite'"):
            self.memo(store="disk")
        with self.assertRaisesRegex(TypeError, r"store=.*MutableMapping.*not int"):
            self.memo(store=3)

    def test_sqlite_is_refused_on_a_shared_filesystem_unless_one_machine_uses_it(self):
        pretend_shared(self, self.dir)
        job = self.memo()                             # chosen by itself there
        job(1)
        self.assertTrue(job.cache_info().path.endswith("job.files"))
        forced = self.memo(store="sqlite")
        with self.assertRaises(persist.PersistError) as raised:
            forced(1)
        self.assertEqual(raised.exception.reason, persist.PersistError.SHARED_FILESYSTEM)
        self.assertIn("nfs4", str(raised.exception))
        self.assertIn("sqlite-one-machine", str(raised.exception))
        self.assertEqual(forced.calls, [])
        alone = self.memo(store="sqlite-one-machine")
        self.assertEqual(alone(1), [1] * 3)
        self.assertTrue(alone.cache_info().path.endswith("job.db"))

    def test_persist_store_sqlite_on_a_shared_filesystem_says_what_to_set_it_to(self):
        # A user who set $PERSIST_STORE was told to pass store='files': no help to one who set
        # no store=, and impossible for persist.open, which $PERSIST_STORE chooses for too.
        pretend_shared(self, self.dir)
        shelf = os.path.join(self.dir, "shelf.db")
        with mock.patch.dict(os.environ, {"PERSIST_STORE": "sqlite"}):
            job = self.memo()
            for attempt in (lambda: job(1), lambda: persist.open(shelf)):
                with self.assertRaises(persist.PersistError) as raised:
                    attempt()
                message = str(raised.exception)
                self.assertEqual(raised.exception.reason,
                                 persist.PersistError.SHARED_FILESYSTEM)
                self.assertIn("PERSIST_STORE=files", message)
                self.assertIn("PERSIST_STORE=sqlite-one-machine", message)
                self.assertNotIn("store='", message)
            self.assertEqual(job.calls, [])
        with mock.patch.dict(os.environ, {"PERSIST_STORE": "SQLite"}):
            with self.assertRaisesRegex(ValueError, r"'SQLite' .*'sqlite-one-machine'"):
                self.memo()(1)
        with mock.patch.dict(os.environ, {"PERSIST_STORE": "sqlite-one-machine"}):
            with persist.open(shelf) as db:
                db["x"] = 1
            self.assertTrue(os.path.isfile(shelf))

    def test_a_torn_result_is_a_miss_and_is_stored_whole_again(self):
        job = self.memo(store="files")
        job(7)
        path, = [os.path.join(root, name) for root, _, names
                 in os.walk(os.path.join(self.dir, "job.files", "results")) for name in names]
        with io.open(path, "rb") as file:
            whole = file.read()
        for cut in (0, 1, len(whole) // 2, len(whole) - 1):
            with io.open(path, "wb") as file:
                file.write(whole[:cut])
            self.assertEqual(job(7), [7] * 3)
            with io.open(path, "rb") as file:
                self.assertIsNotNone(persist._unframed(file.read()))
        self.assertEqual(job.calls, [7] * 5)

    def test_the_command_line_lists_shows_and_clears_it(self):
        job = self.memo(store="files")
        job(1)
        with self.assertRaises(ValueError):
            job(-1)
        listed = run_command(CLI + ["ls", self.dir])
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, r"\njob +1 .* 1 .*job\.files\n")
        # one store given, as a .db file can be ("or one cache file"), with or without the
        # slash a shell completes: it printed the header alone
        for one in ("job.files", "job.files" + os.sep):
            listed = run_command(CLI + ["ls", os.path.join(self.dir, one)])
            self.assertEqual(listed.returncode, 0, listed.stderr)
            self.assertRegex(listed.stdout, r"\njob +1 .* 1 .*job\.files\n")
        shown = run_command(CLI + ["show", "job", "--dir", self.dir])
        self.assertIn("(1)", shown.stdout)
        failed = run_command(CLI + ["failures", "job", "--dir", self.dir])
        self.assertIn("ValueError: negative -1", failed.stdout)
        cleared = run_command(CLI + ["clear", os.path.join(self.dir, "job.files")])
        self.assertIn("removed 1 entry and 1 failure record", cleared.stdout)
        self.assertEqual((job.cache_info().entries, job.failures()), (0, []))


class TestShelfOfFiles(TempDirTest):
    """persist.open on a shared filesystem: a shelf of files."""

    def test_a_shelf_of_files_where_machines_share_the_disk(self):
        pretend_shared(self, self.dir)
        path = self.path / "results.db"
        long_key = "k" * 1000                         # longer than a file name may be
        with persist.open(path) as db:
            db["a"], db[long_key], db["é"] = 1, [2], {"x": 3}
            db["a"] = 4                               # the last assignment wins
            self.assertEqual((db["a"], db[long_key], len(db), "é" in db), (4, [2], 3, True))
            del db[long_key]
        self.assertTrue(path.is_dir())
        with persist.open(path, "r") as db:
            self.assertEqual(dict(db), {"a": 4, "é": {"x": 3}})
        shown = run_command(CLI + ["show", str(path)])
        self.assertEqual(sorted(line.split()[-1] for line in shown.stdout.splitlines()[1:]),
                         ["a", "é"])

    def test_a_directory_of_other_files_is_never_made_a_store(self):
        pretend_shared(self, self.dir)
        (self.path / "mine").mkdir()
        (self.path / "mine" / "notes.txt").write_text("x")
        with self.assertRaises(OSError):
            persist.open(self.path / "mine")
        self.assertEqual(os.listdir(self.path / "mine"), ["notes.txt"])


class FlakyMapping(dict):
    """An object store that times out on every read: not a miss, a failure of the store."""

    def __getitem__(self, key):
        raise TimeoutError("the request timed out")


class TestObjectStoreMapping(TempDirTest):
    """memoize(store=mapping) and persist.open(mapping): any MutableMapping[str, bytes], as
    fsspec.get_mapper("s3://bucket/cache") gives (S3 itself: TestObjectStoreServer)."""

    def test_a_dict_holds_a_cache_and_a_shelf(self):
        mapping = {}
        calls = []

        @persist.memoize(store=mapping)
        def double(x):
            calls.append(x)
            if x < 0:
                raise ValueError(x)
            return 2 * x
        self.assertEqual([double(1), double(1), double(2)], [2, 2, 4])
        with self.assertRaises(ValueError):
            double(-1)
        self.assertEqual((calls, double.cache_info().entries, len(double.failures())),
                         ([1, 2, -1], 2, 1))
        prefix = double.cache_info().path.split("/")[-1]
        self.assertTrue(all(name.startswith(prefix + "/") for name in mapping), mapping)
        with persist.open(mapping) as db:
            db["k"] = "v"
            self.assertEqual(dict(db), {"k": "v"})

    def test_failures_of_a_map_point_to_the_ledger_not_to_a_command_that_cannot_reach_it(self):
        # persist.Failures told the user to run 'python -m persist failures <dict>/...' (or
        # 'bucket/cache/...' for S3): the command line reads caches on disk, never a mapping,
        # and that command only says no such cache was found.
        @persist.memoize(store={})
        def parse(text):
            return int(text)
        with self.assertRaises(persist.Failures) as raised:
            persist.map(parse, ["1", "x"], progress=False)
        self.assertIn("parse.failures()", str(raised.exception))
        self.assertNotIn("python -m persist", str(raised.exception))

        @persist.memoize(cache_dir=self.dir, store="files")
        def on_disk(text):
            return int(text)
        with self.assertRaises(persist.Failures) as raised:
            persist.map(on_disk, ["x"], progress=False)
        self.assertIn("python -m persist failures " + self.dir, str(raised.exception))

    def test_cache_dir_beside_a_mapping_is_refused_not_ignored(self):
        # memoize(cache_dir="/scratch", store=mapping) kept the cache in the mapping and
        # said nothing of the cache_dir= the user meant
        with self.assertRaisesRegex(ValueError, r"cache_dir='.*'.*ignored.*pass one"):
            persist.memoize(cache_dir=self.dir, store={})(len)
        self.assertEqual(os.listdir(self.dir), [])

    def test_an_fsspec_mapping_is_named_by_its_url(self):
        # fsspec's get_mapper("s3://bucket/cache") has root "bucket/cache", no protocol: the
        # path cache_info() and every message gave looked like a local relative directory.
        class Filesystem:
            def unstrip_protocol(self, path):
                return "s3://" + path

        class Mapper(dict):
            root, fs = "bucket/cache", Filesystem()

        @persist.memoize(store=Mapper(), name="job")
        def job(x):
            return x
        self.assertEqual(job(1), 1)
        self.assertEqual(job.cache_info().path, "s3://bucket/cache/job.files")
        with self.assertRaisesRegex(FileNotFoundError, "s3://bucket/cache"):
            persist.open(Mapper(), "r")

    def test_a_store_that_fails_warns_counts_and_returns_never_a_silent_miss(self):
        calls = []

        @persist.memoize(store=FlakyMapping())
        def work(x):
            calls.append(x)
            return x
        with self.assertWarnsRegex(persist.PersistWarning, "timed out") as warned:
            self.assertEqual(work(1), 1)
        # what to do, for an object store: cache_dir= and $PERSIST_DIR change nothing there
        self.assertIn("another mapping", str(warned.warning))
        self.assertNotIn("PERSIST_DIR", str(warned.warning))
        self.assertEqual(work(2), 2)
        self.assertEqual(work.cache_info().unstored, 2)

        @persist.memoize(store=FlakyMapping(), strict=True)
        def strict(x):
            calls.append(x)
            return x
        with self.assertRaisesRegex(OSError, "timed out"):
            strict(1)
        self.assertEqual(calls, [1, 2])


# -- the store of files: crashes, races, torn records, hostile directories


# A program that stores results (and failures) into a store of files, for the tests below:
# `PROGRAM DIR store KEYS...` prints each key once it is stored (a result, or a failure
# recorded: every seventh key fails); `PROGRAM DIR check KEYS...` prints, as JSON, what a
# later process finds: the keys that were hits (each checked right), cache_info(), failures().
FILES_WRITER = """
import json, os, sys, persist
directory, mode, keys = sys.argv[1], sys.argv[2], [int(k) for k in sys.argv[3:]]
computed = []

@persist.memoize(cache_dir=directory, name="work", store=os.environ.get("STORE", "files"))
def work(x):
    computed.append(x)
    if x % 7 == 0:
        raise ValueError("seven divides %d" % x)
    return (x, "v" * (x * 37 % 20000))

def right(x):
    return (x, "v" * (x * 37 % 20000))

if mode == "store":
    for x in keys:
        if x % 7 == 0:
            try:
                persist.map(work, [x])
            except persist.Failures:
                pass
        else:
            assert work(x) == right(x)
        print(x, flush=True)
else:
    # A network filesystem's client may still take a name another machine made a moment ago
    # for missing (sshfs and NFS keep a failed lookup for about a second): a result that
    # visible is not promised sooner (see the README). Wait for what the listing shows to
    # open, within a bound, before counting what the store holds.
    import time
    deadline = time.monotonic() + 30
    for top, _, names in os.walk(directory):
        for name in names:
            while not name.startswith(".") and time.monotonic() < deadline:
                try:
                    os.close(os.open(os.path.join(top, name), os.O_RDONLY))
                    break
                except FileNotFoundError:    # (removed since, or not seen yet)
                    if name not in os.listdir(top):
                        break
                    time.sleep(0.05)
    entries = work.cache_info().entries         # (opening the store sweeps it)
    hits = []
    for x in keys:
        if x % 7:
            assert work(x) == right(x), x
            if not computed or computed[-1] != x:
                hits.append(x)
    info = work.cache_info()
    print(json.dumps({"hits": hits, "before": entries, "entries": info.entries,
                      "failures": info.failures, "unstored": info.unstored,
                      "failed": sorted([row.args, row.type, row.message, row.count]
                                       for row in work.failures())}))
"""


def files_writer(test, directory, mode, keys, **options):
    """FILES_WRITER in a child of test's, on directory."""
    return spawn(test, [sys.executable, "-c", FILES_WRITER, str(directory), mode] +
                 [str(key) for key in keys], stdout=subprocess.PIPE,
                 universal_newlines=True, **options)


def files_check(test, directory, keys, **env):
    """What a later process finds in the store of files in directory (see FILES_WRITER)."""
    out = run_python("import sys; sys.argv[1:] = %r\n" % ([str(directory), "check"] + [
        str(key) for key in keys]) + FILES_WRITER, **env)
    return json.loads(out)


def result_files(store):
    """The result records in store (a store of files' directory), as persist names them."""
    return sorted(os.path.join(top, name) for top, _, names in os.walk(os.path.join(store,
                  "results")) for name in names if not name.startswith("."))


def stored_temp_files(store):
    return sorted(name for _, _, names in os.walk(store) for name in names
                  if name.startswith(".") and name.endswith(".tmp"))


def dead_pid(test):
    """The process id of a process of this machine that has ended."""
    child = spawn(test, [sys.executable, "-c", "import os; print(os.getpid())"],
                  stdout=subprocess.PIPE, universal_newlines=True)
    pid = int(child.communicate()[0])
    return pid


def ls_entries(directory, name):
    """The ENTRIES column of `persist ls directory` for the cache called name."""
    done = run_command(CLI + ["ls", str(directory)])
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines()[1:]:
        if line.split()[-1] == name:
            return int(line.split()[1])
    raise AssertionError("%s not listed:\n%s" % (name, done.stdout))


def shared_mounts(test):
    """The two mounts of one directory that $PERSIST_TEST_MOUNTS names (m1, m2), else skip."""
    mounts = os.environ.get("PERSIST_TEST_MOUNTS", "").split(os.pathsep)
    if len(mounts) != 2 or not all(os.path.isdir(mount) for mount in mounts):
        test.skipTest("NOT TESTED: no shared filesystem: set PERSIST_TEST_MOUNTS to two "
                      "sshfs mounts of one directory, joined by %r (.ci/net does)" % os.pathsep)
    here = "files-hostile-%d-%s" % (os.getpid(), os.urandom(4).hex())
    m1, m2 = (os.path.join(mount, here) for mount in mounts)
    os.mkdir(m1)
    test.addCleanup(__import__("shutil").rmtree, m1, True)
    if not os.path.isdir(m2):
        test.skipTest("NOT TESTED: $PERSIST_TEST_MOUNTS %r and %r are not one directory"
                      % tuple(mounts))
    return m1, m2


def killed_at_random(test, directories, keys, rounds, writers):
    """rounds of writers processes on each of directories (one store, maybe through two
    mounts), each storing keys in its own order and killed (SIGKILL) at a random one;
    returns the keys they said they had stored."""
    rng = random.Random(os.getpid())
    stored = set()
    for _ in range(rounds):
        children = []
        for n in range(writers):
            order = list(keys)
            rng.shuffle(order)
            children.append(files_writer(test, directories[n % len(directories)], "store",
                                         order))
        for child in children:
            for _ in range(rng.randrange(len(keys) // 10)):
                line = child.stdout.readline()
                if not line:
                    break
                stored.add(int(line))
            child.kill()
            child.wait()
            child.stdout.close()
    return stored


@unittest.skipUnless(POSIX, "kill -9, and process ids in temporary files' names")
class TestFilesStoreKilled(TempDirTest):
    """Processes storing results and failures into one store of files, killed (SIGKILL) at
    random points, round after round: every result there loads and is right, each file is
    counted as the store says, none is torn, and the next open sweeps the temporary files of
    dead processes of this machine, and only those."""

    @slow
    def test_every_result_left_is_whole_and_counted_and_dead_temporaries_are_swept(self):
        keys = range(300)
        said = killed_at_random(self, [self.dir], keys, rounds=3, writers=4)
        store = os.path.join(self.dir, "work.files")
        # what the next open must sweep, and what it must leave
        dead = dead_pid(self)
        alive = spawn(self, [sys.executable, "-c", "import sys; sys.stdin.read()"],
                      stdin=subprocess.PIPE)
        bucket = os.path.join(store, "results", "ab")
        os.makedirs(bucket, exist_ok=True)
        planted = {
            "dead": ".ab%s.%s-%d-0a0b0c.tmp" % ("0" * 62, persist._HOST, dead),
            "alive": ".ab%s.%s-%d-0a0b0c.tmp" % ("1" * 62, persist._HOST, alive.pid),
            "elsewhere": ".ab%s.another-host-%d-0a0b0c.tmp" % ("2" * 62, dead)}
        for name in planted.values():
            with io.open(os.path.join(bucket, name), "wb") as file:
                file.write(b"half a reco")
        left = [name for name in stored_temp_files(store) if name not in planted.values()]
        files = result_files(store)
        self.assertEqual(ls_entries(self.dir, "work.files"), len(files))
        found = files_check(self, self.dir, keys)
        self.assertEqual(sorted(stored_temp_files(store)),
                         sorted([planted["alive"], planted["elsewhere"]]),
                         "left by the writers killed: %s" % left)
        # every result file is whole (a hit, right) and counted as the store counts
        self.assertEqual(len(found["hits"]), len(files))
        self.assertEqual(found["before"], len(files))
        self.assertEqual(found["entries"], len([x for x in keys if x % 7]))
        self.assertEqual(ls_entries(self.dir, "work.files"), found["entries"])
        self.assertLessEqual({x for x in said if x % 7}, set(found["hits"]))     # none lost
        self.assertEqual(found["unstored"], 0)
        # each failure recorded is one of the keys that fail, counted once a call
        self.assertEqual(found["failures"], len(found["failed"]))
        for args, kind, message, count in found["failed"]:
            x = int(args.strip("()"))
            self.assertEqual((x % 7, kind, message), (0, "ValueError", "seven divides %d" % x))
            self.assertGreaterEqual(count, 1)

    def test_the_sweep_leaves_a_live_process_s_temporary_file(self):
        files_check(self, self.dir, [1])
        bucket = os.path.join(self.dir, "work.files", "results", "cd")
        os.makedirs(bucket, exist_ok=True)
        dead = dead_pid(self)
        mine = ".cd%s.%s-%d-0a0b0c.tmp" % ("1" * 62, persist._HOST, os.getpid())
        gone = ".cd%s.%s-%d-0a0b0c.tmp" % ("2" * 62, persist._HOST, dead)
        # machines whose names this one's ends or starts: node-12's are not node's
        others = [".cd%s.%s-%d-%d-0a0b0c.tmp" % ("3" * 62, persist._HOST, dead, dead),
                  ".cd%s.x%s-%d-0a0b0c.tmp" % ("4" * 62, persist._HOST, dead)]
        for name in [mine, gone] + others:
            with io.open(os.path.join(bucket, name), "wb") as file:
                file.write(b"unfinished")
        files_check(self, self.dir, [1])
        self.assertEqual(sorted(os.listdir(bucket)), sorted([mine] + others))
        for name in [mine] + others:
            os.unlink(os.path.join(bucket, name))


class TestFilesStoreTornRecords(TempDirTest):
    """A record of a store of files cut short at every byte, or torn (a byte flipped): a
    result reads as a miss (computed again, stored whole again), a failure record is not
    counted, a damaged marker is refused with a clear PersistError; never a wrong result
    and never a crash."""

    def memo(self, name="torn"):
        calls = []

        @persist.memoize(cache_dir=self.dir, name=name, store="files")
        def f(x):
            calls.append(x)
            if x < 0:
                raise ValueError("negative %d" % x)
            return {"x": x, "list": list(range(x))}

        f.calls = calls
        return f

    def damaged(self, record):
        """record cut short at every byte, then torn at every byte."""
        for end in range(len(record)):
            yield record[:end]
        for at in range(len(record)):
            torn = bytearray(record)
            torn[at] ^= 0x21
            yield bytes(torn)

    def test_a_result_cut_or_torn_is_computed_again_and_stored_whole(self):
        f = self.memo()
        self.assertEqual(f(5), {"x": 5, "list": [0, 1, 2, 3, 4]})
        [path] = result_files(f.cache_info().path)
        with io.open(path, "rb") as file:
            record = file.read()
        for n, bad in enumerate(self.damaged(record)):
            with io.open(path, "wb") as file:
                file.write(bad)
            self.assertEqual(f(5), {"x": 5, "list": [0, 1, 2, 3, 4]})
            self.assertEqual(len(f.calls), n + 2)          # a miss, computed again
            self.assertEqual(f(5), {"x": 5, "list": [0, 1, 2, 3, 4]})
            self.assertEqual(len(f.calls), n + 2)          # stored whole again: a hit
        self.assertEqual(f.cache_info().entries, 1)
        self.assertNoTemp()

    def test_a_failure_record_cut_or_torn_is_not_counted(self):
        f = self.memo()
        with self.assertRaises(persist.Failures):
            persist.map(f, [-1])
        store = f.cache_info().path
        [path] = [os.path.join(top, name) for top, _, names in os.walk(
            os.path.join(store, "failures")) for name in names]
        with io.open(path, "rb") as file:
            record = file.read()
        for bad in self.damaged(record):
            with io.open(path, "wb") as file:
                file.write(bad)
            self.assertEqual(f.cache_info().failures, 0)
            self.assertEqual(f.failures(), [])
            self.assertEqual(f.explain(-1).reason, "no entry")
        with io.open(path, "wb") as file:
            file.write(record)
        self.assertEqual(f.cache_info().failures, 1)

    def test_the_info_record_cut_or_torn_is_ignored(self):
        f = self.memo()
        f(1)
        path = os.path.join(f.cache_info().path, "info")
        with io.open(path, "rb") as file:
            record = file.read()
        for bad in list(self.damaged(record))[::3]:
            with io.open(path, "wb") as file:
                file.write(bad)
            g = self.memo()
            self.assertEqual(g(1), {"x": 1, "list": [0]})
            self.assertEqual(g.calls, [])
            self.assertEqual(g.cache_info().entries, 1)

    def test_a_damaged_marker_is_refused_clearly(self):
        f = self.memo()
        f(1)
        path = os.path.join(f.cache_info().path, "store")
        with io.open(path, "rb") as file:
            record = file.read()
        crafted = [persist._framed(text) for text in (
            b'{"persist": "files", "format": 1e400}', b'[1]', b'{"persist": "files"}',
            b'{"persist": "files", "format": "x"}')]
        for bad in list(self.damaged(record)) + crafted:
            with io.open(path, "wb") as file:
                file.write(bad)
            g = self.memo()
            with self.assertRaises(persist.PersistError) as caught:
                g(1)
            self.assertEqual(caught.exception.reason, persist.PersistError.NOT_A_CACHE)
            self.assertIn("marker file 'store'", str(caught.exception))
            self.assertEqual(g.calls, [])
        with io.open(path, "wb") as file:
            file.write(record)
        self.assertEqual(self.memo()(1), {"x": 1, "list": [0]})

    def test_whole_records_that_are_not_persist_s_are_ignored(self):
        f = self.memo()
        f(1)
        with self.assertRaises(persist.Failures):
            persist.map(f, [-1])
        store = f.cache_info().path
        [failure] = [os.path.join(top, name) for top, _, names in os.walk(
            os.path.join(store, "failures")) for name in names]
        stem = failure.rsplit(".", 2)[0]
        for n, text in enumerate([b"[1, 2]", b'{"when": "x"}', b'"text"', b"null",
                                  b'{"when": 1, "started": 1, "type": 3}']):
            with io.open("%s.%d.elsewhere-1-%d" % (stem, n + 1, n), "wb") as file:
                file.write(persist._framed(text))
        with io.open(os.path.join(store, "info"), "wb") as file:
            file.write(persist._framed(b"[1]"))
        g = self.memo()
        self.assertEqual(g(1), {"x": 1, "list": [0]})
        self.assertEqual(g.cache_info().failures, 1)
        self.assertEqual(g.explain(-1).reason, "failed before")
        self.assertEqual(len(g.failures()), 1)
        done = run_command(CLI + ["failures", "--dir", self.dir, "torn.files"])
        self.assertEqual(done.returncode, 0, done.stderr)
        # a result whose header is not put()'s: a miss, computed and stored again
        headers = ({"stored": "5"}, {"stored": float("nan")}, {"stored": 1, "seconds": "x"},
                   {"stored": 1, "version": 3}, {"stored": True}, [1], {"stored": 1e400},
                   {"stored": 1, "args": ["a"]}, {"stored": 1, "owner": {}})
        keys = range(10, 10 + len(headers))
        before = result_files(store)
        for x in keys:
            g(x)
        planted = sorted(set(result_files(store)) - set(before))
        for path, header in zip(planted, headers):
            head = json.dumps(header).encode("utf-8")
            with io.open(path, "wb") as file:
                file.write(persist._framed(len(head).to_bytes(4, "big") + head +
                                           pickle.dumps("wrong")))
        self.assertEqual(g.cache_info().entries, len(result_files(store)) - len(headers))
        for command in (["ls", self.dir], ["show", "--dir", self.dir, "torn.files"]):
            done = run_command(CLI + command)
            self.assertEqual(done.returncode, 0, done.stderr)
        g.cache_prune()
        del g.calls[:]
        self.assertEqual([g(x) for x in keys], [{"x": x, "list": list(range(x))} for x in keys])
        self.assertEqual(len(g.calls), len(headers))


class TestFilesStoreOneKeyTwoMachines(TempDirTest):
    """Processes computing one key at once into one store of files (through two sshfs
    mounts of one directory where PERSIST_TEST_MOUNTS names them, else in one directory):
    each succeeds, and each reader sees one whole result; expire=, version=, cache_delete,
    cache_clear, cache_prune, failures() and explain() as on one machine."""

    def places(self):
        if os.environ.get("PERSIST_TEST_MOUNTS"):
            return shared_mounts(self)
        return self.dir, self.dir

    @slow
    def test_both_succeed_and_every_reader_sees_one_whole_result(self):
        m1, m2 = self.places()
        code = textwrap.dedent("""
            import os, sys, persist
            @persist.memoize(cache_dir=sys.argv[1], name="race", store="files")
            def f(x):
                return (x, os.getpid(), "v" * 100000)
            sys.stdin.readline()                   # all start together
            for x in range(60):
                value = f(x)
                assert value[0] == x and value[2] == "v" * 100000, value
            print(sorted(set(f(x)[1] for x in range(60))) and "ok", flush=True)
        """)
        children = [spawn(self, [sys.executable, "-c", code, place], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, universal_newlines=True)
                    for place in (m1, m2, m1, m2)]
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            self.assertEqual(child.communicate()[0], "ok\n")
            self.assertEqual(child.returncode, 0)
        store = os.path.join(m1, "race.files")
        self.assertEqual(len(result_files(store)), 60)
        self.assertEqual(stored_temp_files(store), [])

    def test_expire_version_delete_clear_prune_failures_and_explain(self):
        m1, m2 = self.places()

        def memo(place, version="1", expire=None, fail=False):
            @persist.memoize(cache_dir=place, name="both", store="files", version=version,
                             expire=expire)
            def f(x):
                if fail:
                    raise ValueError("no %d" % x)
                return (x, version)
            return f

        one, two = memo(m1), memo(m2)
        self.assertEqual(one(1), (1, "1"))
        self.assertEqual(two.explain(1).reason, "hit")
        self.assertEqual(two.explain(2).reason, "no entry")
        # expire=: an expired result is replaced
        path = result_files(os.path.join(m1, "both.files"))[0]
        past = time.time() - 3600
        os.utime(path, (past, past))
        expiring = memo(m2, expire=1e-9)
        self.assertEqual(expiring.explain(1).reason, "expired")
        self.assertEqual(expiring(1), (1, "1"))
        self.assertEqual(expiring.cache_info().misses, 1)
        # version=: another version's result stays for switching back
        other = memo(m2, version="2")
        self.assertEqual(other.explain(1).reason, "another version")
        self.assertEqual(other(1), (1, "2"))
        self.assertEqual(memo(m1)(1), (1, "1"))
        self.assertEqual(memo(m1).explain(1).reason, "hit")
        # failures from several processes add up
        failing = textwrap.dedent("""
            import sys, persist
            @persist.memoize(cache_dir=sys.argv[1], name="both", store="files", version="1")
            def f(x):
                raise ValueError("no %d" % x)
            try:
                persist.map(f, [7, 8])
            except persist.Failures:
                pass
        """)
        for place in (m1, m2, m1):
            run_python("import sys; sys.argv[1:] = [%r]\n" % place + failing)
        rows = memo(m2).failures()
        self.assertEqual(sorted((row.args, row.count) for row in rows),
                         [("(7)", 3), ("(8)", 3)])
        self.assertEqual(memo(m1).cache_info().failures, 2)
        self.assertEqual(memo(m1).explain(7).reason, "failed before")
        # cache_delete, cache_prune, cache_clear through either mount
        self.assertTrue(memo(m2).cache_delete(1))
        self.assertEqual(memo(m1).explain(1).reason, "another version")   # 2's stays
        self.assertEqual(memo(m1, version="2").explain(1).reason, "hit")
        memo(m1)(3)
        memo(m1).cache_prune()                  # version 2's result is stale for version 1
        self.assertEqual(memo(m2, version="2").explain(1).reason, "no entry")
        self.assertEqual(memo(m2).explain(3).reason, "hit")
        memo(m2).cache_clear()
        self.assertEqual(memo(m1).cache_info().entries, 0)
        self.assertEqual(memo(m1).cache_info().failures, 0)
        self.assertEqual(stored_temp_files(os.path.join(m1, "both.files")), [])


LINK_REFUSED = """
import errno, os, sys, warnings, persist
refused = OSError(int(sys.argv[2]), os.strerror(int(sys.argv[2])))
def link(*args, **kwargs):
    raise refused
os.link = link
@persist.memoize(cache_dir=sys.argv[1], name="nolink", store="files")
def f(x):
    return [x] * 100
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert [f(x) for x in range(20)] == [[x] * 100 for x in range(20)]
    assert [f(x) for x in range(20)] == [[x] * 100 for x in range(20)]
info = f.cache_info()
assert (info.hits, info.misses, info.entries, info.unstored) == (20, 20, 20, 0), info
assert not caught, [str(w.message) for w in caught]
print("ok")
"""


class TestFilesStoreWithoutRoom(TempDirTest):
    """Where link() is refused, results are published with os.replace(); where the disk is
    full, each result is still returned, counted in unstored, warned of once; strict raises
    an OSError that names the store."""

    def test_link_refused(self):
        for code in (errno.EPERM, getattr(errno, "ENOTSUP", errno.EPERM), errno.EXDEV):
            where = self.path / str(code)
            where.mkdir()
            self.assertEqual(run_python("import sys; sys.argv[1:] = [%r, %r]\n" % (
                str(where), str(code)) + LINK_REFUSED), "ok\n")
            self.assertEqual(len(result_files(str(where / "nolink.files"))), 20)
            self.assertEqual(stored_temp_files(str(where / "nolink.files")), [])

    @unittest.skipUnless(POSIX, "mount")
    def test_disk_full(self):
        disk = small_disk(self)
        os.unlink(str(disk / "filler"))
        calls = []

        def memo(strict=False):
            @persist.memoize(cache_dir=str(disk), name="full", store="files", strict=strict)
            def f(x):
                calls.append(x)
                return "r" * 5000 + str(x)
            return f

        f = memo()
        self.assertEqual(f(0), "r" * 5000 + "0")
        with open(str(disk / "filler"), "wb", buffering=0) as filler:
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 4096)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual([f(x) for x in range(1, 4)], ["r" * 5000 + str(x)
                                                          for x in range(1, 4)])
        self.assertEqual(len(caught), 1, [str(w.message) for w in caught])
        self.assertIn("full.files", str(caught[0].message))
        self.assertEqual(f.cache_info().unstored, 3)
        self.assertEqual(f(0), "r" * 5000 + "0")                # still a hit
        strict = memo(strict=True)
        with self.assertRaises(OSError) as raised:
            strict(9)
        self.assertEqual(raised.exception.errno, errno.ENOSPC)
        self.assertIn("full.files", str(raised.exception))
        self.assertEqual(stored_temp_files(str(disk / "full.files")), [])
        self.assertEqual(calls, [0, 1, 2, 3, 9])


class TestFilesStoreHostileDirectories(TempDirTest):
    """What may be planted in a store of files, or handed to persist as one."""

    def memo(self, name="hostile", place=None):
        calls = []

        @persist.memoize(cache_dir=place or self.dir, name=name, store="files")
        def f(x):
            calls.append(x)
            return x * 2

        f.calls = calls
        return f

    def test_a_link_planted_at_a_result_is_refused_not_followed(self):
        f = self.memo()
        f(1)
        [path] = result_files(f.cache_info().path)
        outside = self.path / "outside"
        os.rename(path, str(outside))
        os.symlink(str(outside), path)
        g = self.memo()
        with self.assertRaises(persist.PersistError) as caught:
            g(1)
        self.assertEqual(caught.exception.reason, persist.PersistError.SYMLINK)
        self.assertEqual(caught.exception.filename, path)
        self.assertEqual(g.calls, [])
        self.assertTrue(outside.exists())

    def test_a_link_planted_at_a_bucket_is_refused_not_followed(self):
        f = self.memo()
        f(1)
        [path] = result_files(f.cache_info().path)
        bucket = os.path.dirname(path)
        outside = self.path / "outside"
        os.rename(bucket, str(outside))
        os.symlink(str(outside), bucket)
        for call in (lambda g: g(1), lambda g: g.cache_info(), lambda g: g.cache_clear()):
            g = self.memo()
            with self.assertRaises(persist.PersistError) as caught:
                call(g)
            self.assertEqual(caught.exception.reason, persist.PersistError.SYMLINK)
            self.assertEqual(caught.exception.filename, bucket)
        self.assertEqual(os.listdir(str(outside)), [os.path.basename(path)])   # not cleared
        os.unlink(bucket)
        os.rename(str(outside), self.path / "results")
        results = os.path.join(f.cache_info().path, "results")
        os.rename(results, str(outside))
        os.symlink(str(outside), results)
        with self.assertRaises(persist.PersistError) as caught:
            self.memo()(1)
        self.assertEqual(caught.exception.reason, persist.PersistError.SYMLINK)

    @unittest.skipUnless(ROOT, "another user: dropping privileges needs root")
    def test_a_record_another_user_planted_in_a_bucket_left_open_is_never_loaded(self):
        f = self.memo()
        f(1)
        [path] = result_files(f.cache_info().path)
        os.chmod(self.dir, 0o755)
        os.chmod(os.path.dirname(path), 0o777)          # a bucket left open to every user
        os.unlink(path)
        head = json.dumps({"stored": 9e9}).encode("utf-8")
        record = persist._framed(len(head).to_bytes(4, "big") + head + pickle.dumps("planted"))
        run_python(drop_privileges() + """
            with open(%r, "wb") as file:
                file.write(%r)
        """ % (path, record))
        self.assertEqual(os.stat(path).st_uid, NOBODY)
        g = self.memo()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual(g(1), 2)
        self.assertEqual(g.calls, [1])
        self.assertIn("every user may write it", str(caught[0].message))
        with self.assertRaises(persist.PersistError) as raised:
            g.cache_info()
        self.assertEqual(raised.exception.reason, persist.PersistError.UNSAFE)

    def test_names_that_are_not_digests_are_not_records(self):
        f = self.memo()
        for x in range(3):
            f(x)
        store = f.cache_info().path
        path = result_files(store)[0]
        bucket, name = os.path.split(path)
        for other in (name + " (copy)", name[:2] + "zz", name + "~", name.upper()[:2] + "x"):
            __import__("shutil").copy(path, os.path.join(bucket, other))
        self.assertEqual(f.cache_info().entries, 3)
        self.assertEqual(ls_entries(self.dir, "hostile.files"), 3)
        done = run_command(CLI + ["show", "--dir", self.dir, "hostile.files"])
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(len(done.stdout.splitlines()), 1 + 3)
        f.cache_clear()
        self.assertEqual(len(os.listdir(bucket)), 4)           # not ours: left as it is

    @unittest.skipUnless(hasattr(os, "mkfifo"), "FIFOs")
    def test_a_fifo_planted_at_a_record_blocks_nothing(self):
        # in a child: open() on a FIFO would wait for a writer for good
        out = run_python("""
            import glob, os, persist
            @persist.memoize(cache_dir=%r, name="fifo", store="files")
            def f(x):
                if x < 0:
                    raise ValueError(x)
                return x * 2
            f(1)
            try:
                persist.map(f, [-1])
            except persist.Failures:
                pass
            store = f.cache_info().path
            [result] = glob.glob(store + "/results/*/*")
            [failure] = glob.glob(store + "/failures/*/*")
            for path in (result, failure, store + "/info"):
                os.unlink(path)
                os.mkfifo(path)
            @persist.memoize(cache_dir=%r, name="fifo", store="files")
            def g(x):
                return x * 2
            print(g(1), g(1), g.cache_info().misses, g.cache_info().failures)
        """ % (self.dir, self.dir))
        self.assertEqual(out, "2 2 1 0\n")

    @unittest.skipUnless(POSIX, "a sparse file")
    def test_a_huge_file_planted_in_failures_is_not_read(self):
        f = self.memo()
        bucket = os.path.join(self.dir, "hostile.files", "failures", "ab")
        f(1)
        os.makedirs(bucket)
        with io.open(os.path.join(bucket, "ab" + "0" * 62 + ".1.host-1-abcd"), "wb") as file:
            file.truncate(1 << 40)
        self.assertEqual(f.cache_info().failures, 0)
        self.assertEqual(f.failures(), [])

    def test_terminal_escapes_in_a_crafted_info_record_print_harmlessly(self):
        f = self.memo()
        f(1)
        with self.assertRaises(persist.Failures):
            persist.map(self.memo(name="hostile"), [None])
        evil = "\x1b]0;owned\x07\x1b[2J\x9b31m"
        with io.open(os.path.join(f.cache_info().path, "info"), "wb") as file:
            file.write(persist._framed(json.dumps({"function": evil, "version": evil,
                                                   "source": evil}).encode("utf-8")))
        for args in (["ls", self.dir], ["show", "--dir", self.dir, "hostile.files"],
                     ["failures", "--dir", self.dir, "hostile.files"]):
            done = run_command(CLI + args)
            self.assertEqual(done.returncode, 0, done.stderr)
            for char in "\x1b\x07\x9b":
                self.assertNotIn(char, done.stdout + done.stderr, args)

    def test_a_directory_of_the_user_s_own_files_never_becomes_a_store(self):
        own = self.path / "mine.files"
        (own / "results").mkdir(parents=True)
        (own / "results" / "notes.txt").write_text("mine")
        (self.path / "project").mkdir()
        (self.path / "project" / "a.txt").write_text("mine too")
        f = self.memo(name="mine")
        with self.assertRaises(persist.PersistError) as caught:
            f(1)
        self.assertEqual(caught.exception.reason, persist.PersistError.NOT_A_CACHE)
        self.assertIn("results/notes.txt", str(caught.exception))
        self.assertEqual(f.calls, [])
        with self.assertRaises(OSError):
            persist.open(self.path / "project")
        self.assertEqual(sorted(os.listdir(str(own))), ["results"])
        self.assertEqual(os.listdir(str(own / "results")), ["notes.txt"])
        self.assertEqual(os.listdir(str(self.path / "project")), ["a.txt"])

    @unittest.skipUnless(ROOT, "another user: dropping privileges needs root")
    def test_a_store_another_user_planted_in_a_shared_sticky_directory_is_refused(self):
        shared = self.path / "shared"
        shared.mkdir()
        os.chmod(str(shared), 0o1777)
        os.chmod(self.dir, 0o755)
        run_python(drop_privileges() + """
            import os
            @persist.memoize(cache_dir=%r, name="planted", store="files")
            def f(x):
                return "planted %%d" %% x
            f(1)
            for top, dirs, names in os.walk(f.cache_info().path):
                for name in dirs + names:
                    os.chmod(os.path.join(top, name), 0o777 if name in dirs else 0o666)
        """ % str(shared))
        store = shared / "planted.files"
        before = sorted(os.walk(str(store)))
        f = self.memo(name="planted", place=str(shared))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual(f(1), 2)                   # computed, never the planted pickle
            self.assertEqual(f(1), 2)
        self.assertEqual(f.calls, [1, 1])
        self.assertEqual(len(caught), 1)
        self.assertIn(str(store), str(caught[0].message))
        self.assertIn("every user may write it", str(caught[0].message))
        self.assertEqual(sorted(os.walk(str(store))), before)     # left as it is


class TestFilesStoreOnSharedMounts(TempDirTest):
    """On two sshfs mounts of one directory ($PERSIST_TEST_MOUNTS): memoize picks the store
    of files by itself, refuses store='sqlite', takes 'sqlite-one-machine'; writers on both
    mounts at once, killed at random: nothing lost, torn or wrong."""

    def test_the_store_of_files_is_picked_and_sqlite_refused(self):
        m1, m2 = shared_mounts(self)

        @persist.memoize(cache_dir=m1, name="picked")
        def f(x):
            return x + 1

        self.assertEqual(f(1), 2)
        self.assertTrue(f.cache_info().path.endswith(".files"), f.cache_info().path)

        @persist.memoize(cache_dir=m2, name="refused", store="sqlite")
        def g(x):
            return x + 1

        with self.assertRaises(persist.PersistError) as caught:
            g(1)
        self.assertEqual(caught.exception.reason, persist.PersistError.SHARED_FILESYSTEM)

        @persist.memoize(cache_dir=m2, name="taken", store="sqlite-one-machine")
        def h(x):
            return x + 1

        self.assertEqual(h(1), 2)
        self.assertTrue(h.cache_info().path.endswith(".db"), h.cache_info().path)

    @slow
    def test_a_shelf_written_and_read_on_both_mounts_at_once(self):
        # a record replaced or removed on one mount while the other reads it: sshfs fails
        # fstat() or read() on the open file (ENOENT), which must read as the new record
        m1, m2 = shared_mounts(self)
        code = textwrap.dedent("""
            import sys, persist
            n = int(sys.argv[2])
            with persist.open(sys.argv[1]) as db:
                for i in range(150):
                    value = db.get("k%d" % (i % 3))
                    assert value is None or value[1] == "x" * value[0], value
                    db["k%d" % (i % 3)] = (n * 1000 + i, "x" * (n * 1000 + i))
                    if i % 7 == 0:
                        db.pop("k%d" % ((i + 1) % 3), None)
            print("ok")
        """)
        writers = [spawn(self, [sys.executable, "-c", code, os.path.join(place, "db"), str(n)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
                   for n, place in enumerate((m1, m2, m1, m2))]
        for writer in writers:
            out, err = writer.communicate()
            self.assertEqual((writer.returncode, out), (0, "ok\n"), err)
        self.assertTrue(os.path.isfile(os.path.join(m2, "db", "store")))
        self.assertEqual(stored_temp_files(os.path.join(m2, "db")), [])

    @slow
    def test_writers_on_both_mounts_killed_at_random_lose_nothing(self):
        m1, m2 = shared_mounts(self)
        keys = range(200)
        said = killed_at_random(self, [m1, m2], keys, rounds=2, writers=4)
        stored = result_files(os.path.join(m2, "work.files"))
        found = files_check(self, m2, keys)
        self.assertEqual(len(found["hits"]), len(stored))              # 0 torn, 0 wrong
        self.assertEqual(found["before"], len(stored), found)
        self.assertLessEqual({x for x in said if x % 7}, set(found["hits"]))     # 0 lost
        # a last round, not killed, stores them all
        for child in [files_writer(self, place, "store", keys) for place in (m1, m2)]:
            child.communicate()
            self.assertEqual(child.returncode, 0)
        found = files_check(self, m1, keys)
        self.assertEqual(len(found["hits"]), len([x for x in keys if x % 7]))
        self.assertEqual(found["entries"], len(found["hits"]))
        self.assertEqual(found["failures"], len([x for x in keys if x % 7 == 0]))
        self.assertEqual(stored_temp_files(os.path.join(m1, "work.files")), [])


# -- the command line


class TestCommandLine(TempDirTest):
    @classmethod
    def setUpClass(cls):
        # One child fills the cache once for the class, and each test gets a copy of it: a
        # child per test cost more than most of the tests.
        holder = __import__("tempfile").TemporaryDirectory()
        cls.addClassCleanup(holder.cleanup)
        cls.filled = os.path.join(holder.name, "cache")
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="jobs.fetch", expire=3600)
            def fetch(url, retries=3):
                return "page " * 1000
            for i in range(5):
                fetch("https://example.org/%%d" %% i)
            fetch("https://example.org/big", retries=1) if False else None
        """ % cls.filled)

    def setUp(self):
        import shutil
        super().setUp()
        self.cache = self.path / "cache"
        shutil.copytree(self.filled, str(self.cache))

    def persist_cli(self, *args, **env):
        return run_command(CLI + list(args), cwd=self.dir, **env)

    @slow
    def test_help_on_every_command(self):
        # Seven interpreters, started together rather than one after another.
        script = os.path.join(HERE, "persist.py")
        runs = [[script] + command + ["--help"]
                for command in ([], ["ls"], ["show"], ["clear"], ["prune"], ["merge"],
                                ["status"])]
        runs.append(["-m", "persist", "--help"])
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            for args, done in zip(runs, pool.map(lambda a: run_command(a, cwd=self.dir), runs)):
                self.assertEqual(done.returncode, 0, "%s\n%s" % (args, done.stderr))
                self.assertIn("usage: persist", done.stdout)

    @slow
    def test_ls(self):
        for done in (self.persist_cli("ls", str(self.cache)),
                     self.persist_cli("ls", PERSIST_DIR=self.cache)):
            self.assertEqual(done.returncode, 0, done.stderr)
            lines = done.stdout.splitlines()
            self.assertEqual(lines[0].split()[:3], ["CACHE", "ENTRIES", "SIZE"])
            self.assertEqual(lines[1].split()[:2], ["jobs.fetch", "5"])
        os.rename(self.cache, self.path / ".persist")
        self.assertIn("jobs.fetch", self.persist_cli("ls").stdout)

    @slow
    def test_show(self):
        done = self.persist_cli("show", str(self.cache / "jobs.fetch.db"))
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 6)
        self.assertIn("('https://example.org/0')", lines[1])
        self.assertIn("KB", lines[1])
        again = self.persist_cli("show", "jobs.fetch", PERSIST_DIR=self.cache).stdout
        # the same entries; their AGE may have passed a second meanwhile
        self.assertEqual([line.split(None, 1)[1] for line in again.splitlines()[1:]],
                         [line.split(None, 1)[1] for line in lines[1:]])

    @slow
    def test_clear_and_prune(self):
        db = str(self.cache / "jobs.fetch.db")
        done = self.persist_cli("prune", db, "--expired")
        self.assertEqual(done.stdout.split()[:2], ["removed", "0"])
        done = self.persist_cli("prune", db, "--older-than", "7d")
        self.assertEqual(done.stdout.split()[:2], ["removed", "0"])
        backdate(db, 2 * 86400)
        done = self.persist_cli("prune", db, "--older-than", "1d")
        self.assertEqual(done.stdout.split()[:2], ["removed", "5"], done.stderr)
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="jobs.fetch", expire=3600)
            def fetch(url, retries=3):
                return 1
            fetch("a")
        """ % str(self.cache))
        done = self.persist_cli("clear", db)
        self.assertEqual(done.stdout.split()[:2], ["removed", "1"], done.stderr)
        with persist.open(db, "r") as shelf:
            self.assertEqual(len(shelf), 0)
        self.assertNotEqual(self.persist_cli("prune", db).returncode, 0)

    @slow
    def test_not_a_cache(self):
        (self.path / "notes.txt").write_text("my notes")
        for command in ("show", "clear", "prune"):
            extra = ["--expired"] if command == "prune" else []
            done = self.persist_cli(command, "notes.txt", *extra)
            self.assertEqual(done.returncode, 1)
            self.assertIn("notes.txt: not a persist cache", done.stderr)
            self.assertNotIn("Traceback", done.stderr)
        done = self.persist_cli("show", "nothing-here")
        self.assertEqual(done.returncode, 1)
        self.assertIn("No such cache", done.stderr)
        self.assertEqual((self.path / "notes.txt").read_text(), "my notes")

    @slow
    @unittest.skipUnless(POSIX and hasattr(os, "setuid"), "POSIX permissions")
    def test_a_directory_it_may_not_read_is_an_error_not_empty(self):
        # ls listed nothing, with exit status 0, and show said "No such cache file": as if
        # there were no caches, where there are caches it may not read.
        os.chmod(self.dir, 0o755)
        inner = self.cache / "inner"
        inner.mkdir()
        os.rename(str(self.cache / "jobs.fetch.db"), str(inner / "jobs.fetch.db"))
        for locked in (self.cache, inner):
            os.chmod(str(self.cache), 0o755)
            os.chmod(str(locked), 0o000)
            self.addCleanup(os.chmod, str(locked), 0o755)
            for args in (["ls", self.cache], ["show", "--dir", self.cache, "jobs.fetch"]):
                with self.subTest(locked=locked.name, command=args[0]):
                    # python -m persist ARGS, as nobody (what it imports, imported first)
                    out = run_python("import argparse, runpy, sys\n"
                                     "argparse.ArgumentParser().format_help()\n" +
                                     textwrap.dedent(drop_privileges()) + textwrap.dedent("""
                        sys.argv, sys.stderr = ["persist"] + %r, sys.stdout
                        try:
                            runpy.run_module("persist", run_name="__main__", alter_sys=True)
                        except SystemExit as exc:
                            print("exit", exc.code)
                    """ % [str(arg) for arg in args]), cwd=self.dir)
                    self.assertTrue(out.endswith("Permission denied\nexit 1\n"), out)
                    self.assertIn("persist: error: %s: " % locked, out)
            os.chmod(str(locked), 0o755)

    @slow
    def test_status(self):
        finished, unfinished = self.path / "a", self.path / "b"
        with persist.done_dir(finished) as d:
            (d / "x").write_text("12")
        unfinished.mkdir()
        done = self.persist_cli("status", str(finished))
        self.assertEqual(done.returncode, 0)
        self.assertIn('finished {"finished"', done.stdout)
        self.assertIn('"files": 1', done.stdout)
        done = self.persist_cli("status", str(finished), str(unfinished), "missing")
        self.assertEqual(done.returncode, 1)
        self.assertEqual([line.split(": ", 1)[1][:12] for line in done.stdout.splitlines()],
                         ["finished {\"f", "not finished", "missing"])

    @slow
    @unittest.skipUnless(POSIX and hasattr(os, "setuid"), "POSIX users")
    def test_status_of_a_marker_it_may_not_read(self):
        # Another user's private marker: status stopped at it with an error (exit 1, as
        # "not finished"), and said nothing of the paths after it.
        os.chmod(self.dir, 0o755)
        private, later = self.path / "private", self.path / "later"
        for stage in (private, later):
            with persist.done_dir(stage) as d:
                (d / "x").write_text("12")
        os.chmod(str(private / "DONE"), 0o600)
        out = run_python("import argparse, runpy, sys\n"
                         "argparse.ArgumentParser().format_help()\n" +
                         textwrap.dedent(drop_privileges()) + textwrap.dedent("""
            sys.argv, sys.stderr = ["persist", "status", %r, %r], sys.stdout
            try:
                runpy.run_module("persist", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                print("exit", exc.code)
        """ % (str(private), str(later))), cwd=self.dir)
        lines = out.splitlines()
        self.assertEqual(len(lines), 3, out)
        self.assertTrue(lines[0].startswith("%s: finished (its marker " % private), out)
        self.assertIn("Permission denied", lines[0])
        self.assertTrue(lines[1].startswith('%s: finished {"finished"' % later), out)
        self.assertEqual(lines[2], "exit 0")

    def test_status_renders_a_marker_someone_wrote(self):
        stage = self.path / "stage"
        with persist.done_dir(stage) as d:
            (d / "x").write_text("12")
        (stage / "DONE").write_text('{"finished": "\x1b]0;owned\x07\x1b[2J"}\n')
        done = self.persist_cli("status", str(stage))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("\x1b", done.stdout)
        self.assertIn("\\x1b]0;owned\\x07\\x1b[2J", done.stdout)

    def test_status_shows_a_marker_as_text(self):
        # A marker that another tool (or another user, in a shared directory) wrote went
        # to the terminal as it was: escape sequences, however long, over several lines.
        stage = self.path / "stage"
        stage.mkdir()
        (stage / "DONE").write_bytes(b"\x1b[2J\x1b]0;title\x07{\"x\": 1}\nline two\n" +
                                     b"y" * 100000)
        done = self.persist_cli("status", str(stage))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(len(done.stdout.splitlines()), 1, done.stdout[:300])
        self.assertNotIn("\x1b", done.stdout)
        self.assertNotIn("\x07", done.stdout)
        self.assertIn("\\x1b[2J", done.stdout)
        self.assertLess(len(done.stdout), 2000)


def backdate(cache_file, seconds):
    """Make every entry of a cache look stored seconds earlier, as time would."""
    conn = sqlite3.connect(str(cache_file))
    with conn:
        conn.execute("UPDATE Dict SET stored = stored - ?", (seconds,))
    conn.close()


class CommandLineTest(TempDirTest):
    """A cache of five entries, jobs.fetch, in DIR/cache; the command line run as a user would."""

    def setUp(self):
        super().setUp()
        self.cache = self.path / "cache"
        self.db = self.cache / "jobs.fetch.db"
        self.fill(self.cache)

    def fill(self, directory, count=5, size=1000):
        @persist.memoize(cache_dir=directory, name="jobs.fetch")
        def fetch(url):
            return "p" * size

        for i in range(count):
            fetch("https://example.org/%d" % i)

    def cli(self, *args, **env):
        return run_command(CLI + [str(a) for a in args],
                           cwd=self.dir, **env)

    def entries(self):
        with persist.open(self.db, "r") as shelf:
            return len(shelf)

    def assertOneLineError(self, done, *words):
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        for word in words:
            self.assertIn(word, done.stderr)


class TestCommandLinePruneAndClear(CommandLineTest):
    """prune and clear: the ages they take, --dry-run, and the space they give back."""

    @slow
    def test_negative_nan_infinite_and_zero_ages_are_refused(self):
        for age in ("-1d", "nan", "inf", "-inf", "0s", "1e400"):
            done = self.cli("prune", self.db, "--older-than=" + age)
            self.assertEqual(done.returncode, 2, age)
            self.assertIn("positive and finite, not %r" % age, done.stderr)
            self.assertEqual(self.entries(), 5)

    def test_the_written_out_message_shows(self):
        done = self.cli("prune", self.db, "--older-than", "5x")
        self.assertIn("not an age: '5x' (try 90s", done.stderr)
        self.assertNotIn("invalid", done.stderr)

    def test_a_positive_age_still_prunes(self):
        backdate(self.db, 2 * 86400)
        done = self.cli("prune", self.db, "--older-than", "1d")
        self.assertEqual(done.stdout.split()[:2], ["removed", "5"], done.stderr)
        self.assertEqual(self.entries(), 0)

    def test_prune_dry_run_counts_and_keeps(self):
        backdate(self.db, 3 * 86400)
        done = self.cli("prune", self.db, "--older-than", "2d", "--dry-run")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, r"^would remove 5 entries \(\d.* KB\) from ")
        self.assertEqual(self.entries(), 5)
        done = self.cli("prune", self.db, "--older-than", "4d", "--dry-run")
        self.assertRegex(done.stdout, r"^would remove 0 entries \(0 B\)")

    def test_prune_counts_a_value_file_as_its_bytes_and_removes_it(self):
        # SQLite adds up the pickles in rows; a result too large for its row is in a value
        # file, found on the index of the rows that name one, and counted as the file's size
        with persist.open(self.db) as shelf:
            shelf["large"] = b"x" * (3 << 20)
        backdate(self.db, 3 * 86400)
        with persist.open(self.db) as shelf:
            shelf["new"] = 1
        values = str(self.db) + ".values"
        self.assertEqual(len(os.listdir(values)), 1)
        done = self.cli("prune", self.db, "--older-than", "2d", "--dry-run")
        self.assertRegex(done.stdout, r"^would remove 6 entries \(3\.0 MB\) from ", done.stderr)
        done = self.cli("prune", self.db, "--older-than", "2d")
        self.assertRegex(done.stdout, r"^removed 6 entries \(3\.0 MB\) from ", done.stderr)
        self.assertEqual(os.listdir(values), [])
        self.assertEqual(self.entries(), 1)

    def test_clear_dry_run_counts_and_keeps(self):
        done = self.cli("clear", self.db, "--dry-run")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, r"^would remove 5 entries \(\d.* KB\) from ")
        self.assertEqual(self.entries(), 5)

    @slow
    def test_one_entry_is_an_entry(self):
        # "would remove 1 entries", "removed 1 entries"
        self.fill(self.path / "one", count=1)
        one = self.path / "one" / "jobs.fetch.db"
        backdate(one, 3 * 86400)
        for args in (["clear", "--dry-run"], ["prune", "--older-than", "2d", "--dry-run"],
                     ["prune", "--older-than", "2d"]):
            done = self.cli(args[0], one, *args[1:])
            self.assertRegex(done.stdout, r"^(would remove|removed) 1 entry [(f]", args)


@slow
class TestCommandLineGivesSpaceBack(CommandLineTest):
    def test_prune_and_clear_shrink_the_file(self):
        self.fill(self.cache, count=3000, size=200)
        full = os.path.getsize(self.db)
        backdate(self.db, 2 * 86400)
        with persist.open(self.db) as shelf:      # five new entries
            for i in range(5):
                shelf[str(i)] = i
        done = self.cli("prune", self.db, "--older-than", "1d")
        self.assertEqual(done.stdout.split()[:2], ["removed", "3000"], done.stderr)
        wal = str(self.db) + "-wal"             # a connection this process still holds keeps it
        left = os.path.getsize(self.db) + (os.path.getsize(wal) if os.path.exists(wal) else 0)
        self.assertLess(left, full / 4)
        done = self.cli("clear", self.db)
        self.assertEqual(done.stdout.split()[:2], ["removed", "5"], done.stderr)
        self.assertEqual(self.entries(), 0)


class TestCommandLineListsBrokenFiles(CommandLineTest):
    def test_each_is_listed_with_its_reason(self):
        (self.cache / "notes.db").write_text("my notes, not a database")
        (self.cache / "empty.db").write_bytes(b"")
        conn = sqlite3.connect(str(self.cache / "other.db"))
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        with open(str(self.db), "rb") as file:
            (self.cache / "cut.db").write_bytes(file.read(20000))
        done = self.cli("ls", self.cache)
        self.assertEqual(done.returncode, 0, done.stderr)
        rows = {line.split()[-1]: line for line in done.stdout.splitlines()[1:]}
        self.assertEqual(sorted(rows), ["cut.db", "empty.db", "jobs.fetch.db", "notes.db",
                                        "other.db"])
        self.assertTrue(rows["jobs.fetch.db"].startswith("jobs.fetch "))
        self.assertTrue(rows["notes.db"].startswith("(not SQLite) "))
        self.assertTrue(rows["empty.db"].startswith("(empty file) "))
        self.assertTrue(rows["other.db"].startswith("(foreign SQLite) "))
        self.assertTrue(rows["cut.db"].startswith("(corrupt) "), rows["cut.db"])

    def test_each_reason_has_its_word(self):
        # ls names a refused cache by its PersistError's reason
        import shutil
        words = {"newer.db": "(newer format) ", "older.db": "(older format) "}
        for name, version in (("newer.db", 99), ("older.db", 2)):
            shutil.copyfile(str(self.db), str(self.cache / name))
            conn = sqlite3.connect(str(self.cache / name))
            conn.execute("PRAGMA user_version=%d" % version)
            conn.close()
        if hasattr(os, "symlink"):
            os.symlink(str(self.cache / "newer.db"), str(self.cache / "link.db"))
            words["link.db"] = "(symlink) "
        if POSIX:
            shutil.copyfile(str(self.db), str(self.cache / "open.db"))
            os.chmod(str(self.cache / "open.db"), 0o666)
            words["open.db"] = "(unsafe) "
        done = self.cli("ls", self.cache)
        self.assertEqual(done.returncode, 0, done.stderr)
        rows = {line.split()[-1]: line for line in done.stdout.splitlines()[1:]}
        self.assertEqual({name: rows[name][:len(word)] for name, word in words.items()}, words,
                         done.stdout)

    def test_the_word_is_the_reason_not_a_word_in_the_path(self):
        # ls searched the error's text, path and all: in a directory named "locked" (or
        # "symbolic link", ...) every refused file was called what the path said
        for folder in ("locked", "owned by user"):
            cache = self.path / folder
            cache.mkdir()
            (cache / "notes.db").write_text("my notes, not a database")
            (cache / "empty.db").write_bytes(b"")
            done = self.cli("ls", cache)
            self.assertEqual(done.returncode, 0, done.stderr)
            rows = {line.split()[-1]: line for line in done.stdout.splitlines()[1:]}
            self.assertTrue(rows["notes.db"].startswith("(not SQLite) "), rows["notes.db"])
            self.assertTrue(rows["empty.db"].startswith("(empty file) "), rows["empty.db"])

    @unittest.skipUnless(hasattr(os, "mkfifo"), "FIFOs")
    def test_a_fifo_named_as_a_cache_is_listed_not_waited_on(self):
        # in a directory others may write (/tmp), anyone may leave one named NAME.db
        os.mkfifo(str(self.cache / "pipe.db"))
        done = self.cli("ls", self.cache)            # one that waits fails at its timeout
        self.assertEqual(done.returncode, 0, done.stderr)
        rows = {line.split()[-1]: line for line in done.stdout.splitlines()[1:]}
        self.assertTrue(rows["pipe.db"].startswith("(not a file) "), rows["pipe.db"])
        out = run_python("""
            import persist
            for flag in "rc":
                try:
                    persist.open(%r, flag)
                except persist.PersistError as exc:
                    print(exc.filename, exc.strerror)
        """ % str(self.cache / "pipe.db"), timeout=120)     # one that waits fails here
        self.assertEqual(out.count("%s a FIFO, not a cache file" % (self.cache / "pipe.db")), 2,
                         out)
        self.assertTrue(stat.S_ISFIFO(os.lstat(str(self.cache / "pipe.db")).st_mode))

    @slow
    @unittest.skipUnless(hasattr(os, "mkfifo"), "FIFOs")
    def test_a_fifo_that_ls_lists_is_named_so_by_the_other_commands(self):
        # 'ls' lists pipe.db as "(not a file)"; given that name (as ls prints it, or its
        # path), show, clear and failures said "No such cache file", of a file that is there
        os.mkfifo(str(self.cache / "pipe.db"))
        for args in (["show", self.cache / "pipe.db"], ["show", "pipe.db", "--dir", self.cache],
                     ["clear", self.cache / "pipe.db"], ["failures", self.cache / "pipe.db"],
                     ["ls", self.cache / "pipe.db"]):
            done = self.cli(*args)               # one that waits on the FIFO fails at its timeout
            self.assertOneLineError(done, "a FIFO, not a cache file")
            self.assertNotIn("No such", done.stderr)
        self.assertTrue(stat.S_ISFIFO(os.lstat(str(self.cache / "pipe.db")).st_mode))


class TestCommandLineWhere(CommandLineTest):
    def setUp(self):
        super().setUp()
        self.tree = self.path / "examples"
        for part in ("a", "b"):
            self.fill(self.tree / part / ".persist", count=2)

    def test_ls_shows_where_each_cache_is(self):
        done = self.cli("ls", self.tree)
        self.assertEqual(done.returncode, 0, done.stderr)
        rows = [line.split() for line in done.stdout.splitlines()[1:]]
        self.assertEqual([(row[0], row[-1]) for row in rows], [
            ("jobs.fetch", os.path.join("a", ".persist", "jobs.fetch.db")),
            ("jobs.fetch", os.path.join("b", ".persist", "jobs.fetch.db"))])

    @slow
    def test_show_takes_what_ls_printed(self):
        where = self.cli("ls", self.tree).stdout.splitlines()[2].split()[-1]
        done = self.cli("show", "--dir", self.tree, where)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(len(done.stdout.splitlines()), 3)
        again = self.cli("show", os.path.join("examples", where)).stdout
        self.assertEqual([line.split()[1:] for line in again.splitlines()],   # without the age
                         [line.split()[1:] for line in done.stdout.splitlines()])
        # the default directory: ls prints the file name, which show takes
        os.rename(str(self.cache), str(self.path / ".persist"))
        where = self.cli("ls").stdout.splitlines()[1].split()[-1]
        self.assertEqual(len(self.cli("show", where).stdout.splitlines()), 6)
        self.assertEqual(len(self.cli("show", "jobs.fetch").stdout.splitlines()), 6)

    @slow
    def test_dir_on_every_command_that_takes_a_name(self):
        done = self.cli("show", "jobs.fetch", "--dir", self.cache)
        self.assertEqual(len(done.stdout.splitlines()), 6, done.stderr)
        done = self.cli("prune", "jobs.fetch", "--dir", self.cache, "--older-than", "1d")
        self.assertEqual(done.stdout.split()[:2], ["removed", "0"], done.stderr)
        done = self.cli("clear", "jobs.fetch", "--dir", self.cache)
        self.assertEqual(done.stdout.split()[:2], ["removed", "5"], done.stderr)

    def test_a_name_of_many_caches_is_refused_with_their_paths(self):
        done = self.cli("show", "--dir", self.tree, "jobs.fetch")
        self.assertOneLineError(done, "2 caches of that name",
                                os.path.join("a", ".persist", "jobs.fetch.db"))


class Thing:
    """No __repr__: its repr has its address, which changes from run to run."""


class Lines:
    def __repr__(self):
        return "Lines\n  one\n  two"

    def __reduce__(self):
        return Lines, ()


class TestCommandLineShow(CommandLineTest):
    @slow
    def test_limit(self):
        done = self.cli("show", self.db, "--limit", "2")
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 4, done.stderr)
        self.assertIn("/0')", lines[1])
        self.assertEqual(lines[3], "... 3 more, of 5 entries (--limit 0 shows all)")
        self.assertEqual(len(self.cli("show", self.db, "--limit", "0").stdout.splitlines()), 6)
        self.assertEqual(len(self.cli("show", self.db).stdout.splitlines()), 6)   # a pipe
        done = self.cli("show", self.db, "--limit", "-1")
        self.assertEqual(done.returncode, 2)
        self.assertIn("not a number of entries: '-1'", done.stderr)

    @unittest.skipUnless(hasattr(os, "openpty"), "needs a pseudo-terminal")
    def test_a_terminal_gets_a_screenful(self):
        self.fill(self.cache, count=80, size=10)
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        with open(os.devnull) as null:
            child = spawn(self, [sys.executable] + CLI + ["show", str(self.db)],
                          stdin=null, stdout=slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:          # Linux: EIO once the child has closed the terminal
                break
            if not chunk:
                break
            out += chunk
        child.wait()
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), 52)
        self.assertEqual(lines[-1], "... 30 more, of 80 entries (--limit 0 shows all)")

    @slow
    def test_one_line_per_entry_and_no_addresses_and_no_ignored_parameters(self):
        code = """
            import persist, sys
            sys.path.insert(0, %r)
            from test_persist import Thing, Lines
            @persist.memoize(cache_dir=%r, name="fit", ignore=("log",))
            def fit(data, log, scale=1):
                return 1
            fit(Thing(), "LOG-A")
            fit(Lines(), "LOG-B", scale=2)
        """ % (HERE, str(self.cache))
        run_python(code)
        run_python(code)              # other addresses, the same keys
        with persist.open(self.cache / "shelf.db") as shelf:
            shelf["two\nlines at 0xbeef"] = 1      # a key, as it is: no repr
        done = self.cli("show", self.cache / "fit.db")
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 3, done.stdout)
        self.assertIn("(<test_persist.Thing object>)", lines[1])
        self.assertIn("(Lines one two, scale=2)", lines[2])
        self.assertNotIn("LOG", done.stdout)
        self.assertNotIn("0x", done.stdout)
        done = self.cli("show", self.cache / "shelf.db")
        self.assertEqual(len(done.stdout.splitlines()), 2, done.stdout)
        self.assertIn("two lines at 0xbeef", done.stdout)


class TestCommandLineErrors(CommandLineTest):
    @slow
    def test_not_a_cache(self):
        (self.path / "notes.txt").write_text("my notes")
        for args in (["show"], ["clear"], ["prune", "--expired"], ["ls"],
                     ["clear", "--dry-run"]):
            done = self.cli(*(args[:1] + ["notes.txt"] + args[1:]))
            self.assertOneLineError(done, "notes.txt: not a persist cache")
        self.assertEqual((self.path / "notes.txt").read_text(), "my notes")
        self.assertOneLineError(self.cli("show", "nothing-here"), "No such cache")
        self.assertOneLineError(self.cli("ls", "nowhere"), "nowhere: No such directory")
        self.assertOneLineError(self.cli("show", self.cache), "a directory, not a cache")

    @slow
    def test_nothing_where_it_looked_says_where_and_how_to_point_elsewhere(self):
        # 'persist ls' without ./.persist said only "No such directory".
        (self.path / "elsewhere").mkdir()
        where = os.path.join(self.dir, "elsewhere", ".persist")
        for args, option in ((["ls"], "'persist ls DIR'"), (["show", "jobs.fetch"], "--dir DIR"),
                             (["failures", "jobs.fetch"], "--dir DIR")):
            done = run_command(CLI + args, cwd=self.path / "elsewhere", PERSIST_DIR="")
            self.assertOneLineError(done, "looked in %s (./.persist, the default; memoize keeps "
                                          "a function's caches in .persist beside the file "
                                          "that defines it)" % where,
                                    "another directory with %s or $PERSIST_DIR" % option)
            done = run_command(CLI + args, cwd=self.path / "elsewhere",
                               PERSIST_DIR=self.path / "nowhere")
            self.assertOneLineError(done, "looked in %s (from $PERSIST_DIR)"
                                    % (self.path / "nowhere"))
        done = run_command(CLI + ["show", "jobs.fetch"], cwd=self.path / "elsewhere",
                           PERSIST_DIR=self.cache)
        self.assertEqual(done.returncode, 0, done.stderr)

    @slow
    def test_a_cache_it_cannot_read(self):
        with open(str(self.db), "rb") as file:
            (self.cache / "cut.db").write_bytes(file.read(20000))
        for args in (["show"], ["clear"], ["prune", "--older-than", "1d"],
                     ["prune", "--stale", "--dry-run"]):
            done = self.cli(*(args[:1] + [self.cache / "cut.db"] + args[1:]))
            self.assertOneLineError(done, "cut.db: ")

    @slow
    @unittest.skipUnless(POSIX, "symbolic links")
    def test_a_dangling_link_and_a_name_with_a_newline(self):
        os.symlink(str(self.path / "gone" / "x.db"), str(self.cache / "old.db"))
        done = self.cli("show", self.cache / "old.db")
        self.assertOneLineError(done, "old.db: a symbolic link to ", "which does not exist")
        persist.memoize(lambda x: x, cache_dir=self.cache, name="two\nlines")(1)
        rows = self.cli("ls", self.cache).stdout.splitlines()
        self.assertEqual(len(rows), 4)               # the header and one row each
        self.assertIn("(dangling link)", "".join(rows))
        self.assertIn("two lines ", "".join(rows))

    @unittest.skipIf(POSIX and os.geteuid() == 0, "root may write any file")
    def test_a_read_only_cache_it_was_asked_to_change(self):
        os.chmod(str(self.db), 0o444)
        self.addCleanup(os.chmod, str(self.db), 0o644)
        for args in (["clear"], ["prune", "--older-than", "1d"]):
            done = self.cli(*(args[:1] + [self.db] + args[1:]))
            self.assertOneLineError(done, "jobs.fetch.db: ")
        self.assertEqual(self.entries(), 5)
        done = self.cli("clear", self.db, "--dry-run")
        self.assertEqual(done.returncode, 0, done.stderr)


class TestFailuresCommand(TempDirTest):
    @slow
    def test_failures_and_ls(self):
        cache = self.path / "cache"
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="jobs.parse")
            def parse(text):
                if text.startswith("?"):
                    raise ValueError("malformed")
                if text == "":
                    raise KeyError("empty")
                return int(text)
            for text in ["1", "?a", "?b", "", "2", "?a", "?c", "?d", "?e", "?f", "?g"]:
                try:
                    parse(text)
                except Exception:
                    pass
        """ % str(cache))
        cli = CLI
        done = run_command(cli + ["failures", str(cache / "jobs.parse.db")])
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0].split(" (")[0], "jobs.parse: 8 failed calls, not succeeded "
                                                  "since")
        self.assertEqual(lines[2], "ValueError: malformed")
        self.assertEqual(lines[3].split(", the last")[0], "  7 calls, 8 failures in all")
        self.assertEqual(lines[4], "  ('?b'), ('?a'), ('?c'), ('?d'), ('?e'), and 2 more")
        self.assertEqual(lines[6], "KeyError: 'empty'")
        self.assertEqual(lines[8], "  ('')")
        done = run_command(cli + ["failures", "--traceback", "--limit", "0", "jobs.parse"],
                           PERSIST_DIR=cache)
        self.assertEqual(done.stdout.count("Traceback (most recent call last)"), 8)
        self.assertIn("  ('?a'): failed 2 times", done.stdout)
        self.assertIn("  ('?b'): failed 1 time, first ", done.stdout)      # not "1 times"
        self.assertIn("KeyError: 'empty'", done.stdout)
        done = run_command(cli + ["ls", str(cache)])
        header, row = done.stdout.splitlines()
        self.assertEqual(header.split()[:5], ["CACHE", "ENTRIES", "SIZE", "FAILED", "TOOK"])
        self.assertEqual(row.split()[:2] + row.split()[4:5], ["jobs.parse", "2", "8"])
        # clear says what it takes: the entries and the failure records
        done = run_command(cli + ["clear", "--dry-run", "jobs.parse"], PERSIST_DIR=cache)
        self.assertRegex(done.stdout, r"^would remove 2 entries \(.*\) and 8 failure records ")
        done = run_command(cli + ["clear", "jobs.parse"], PERSIST_DIR=cache)
        self.assertRegex(done.stdout, r"^removed 2 entries and 8 failure records from ")

    @slow
    def test_limit_applies_to_tracebacks(self):
        cache = self.path / "cache"
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="limited")
            def parse(text):
                raise ValueError("malformed") if text[0] == "?" else KeyError(text)
            for text in ["?a", "?b", "?c", "?d", "k"]:
                try:
                    parse(text)
                except Exception:
                    pass
        """ % str(cache))
        done = run_command(CLI + ["failures", "--traceback", "--limit", "2", "limited"],
                           PERSIST_DIR=cache)
        self.assertEqual(done.returncode, 0, done.stderr)
        # two of the four ValueErrors, and the one KeyError
        self.assertEqual(done.stdout.count("Traceback (most recent call last)"), 3, done.stdout)
        self.assertIn("\n  and 2 more calls (--limit 0 shows all)\n", done.stdout)
        self.assertNotIn("('?c')", done.stdout)
        done = run_command(CLI + ["failures", "--traceback", "--limit", "0", "limited"],
                           PERSIST_DIR=cache)
        self.assertEqual(done.stdout.count("Traceback (most recent call last)"), 5, done.stdout)
        done = run_command(CLI + ["failures", "--limit", "-1", "limited"], PERSIST_DIR=cache)
        self.assertEqual(done.returncode, 2)
        self.assertIn("not a number of entries: '-1' (0 shows all)", done.stderr)

    @slow
    def test_escape_sequences_of_a_record_never_reach_the_terminal(self):
        # a call's own exception text, and a record or label that someone wrote into the file
        cache = self.path / "cache"
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="hostile")
            def f(text):
                raise ValueError("\\x1b]0;owned\\x07\\x1b[2J" + text)
            try:
                f("\\x1b[31mred")
            except ValueError:
                pass
        """ % str(cache))
        db = str(cache / "hostile.db")
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE Info SET value = 'hostile\x1b[8m' WHERE name = 'function'")
            conn.execute("UPDATE Failures SET type = 'Error\x9b1m', traceback = traceback || "
                         "'\x1b[?1049h\n'")
        for extra in ([], ["--traceback"]):
            done = run_command(CLI + ["failures", db] + extra)
            self.assertEqual(done.returncode, 0, done.stderr)
            for control in ("\x1b", "\x07", "\x9b"):
                self.assertNotIn(control, done.stdout, extra)
            self.assertIn("hostile\\x1b[8m: 1 failed call", done.stdout)
            self.assertIn("Error\\x9b1m: \\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred",
                          done.stdout)
            self.assertIn("('\\x1b[31mred')", done.stdout)
        self.assertIn("\\x1b[?1049h", done.stdout)
        self.assertIn("    Traceback (most recent call last)", done.stdout)

    @slow
    def test_file_names_someone_chose_reach_no_terminal(self):
        # a shared cache directory: anyone who may write there names files and folders
        cache = self.path / "cache"
        hostile = cache / "team\x1b]8;;x\x07"
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="named")
            def f(x):
                raise ValueError(x)
            try:
                f(1)
            except ValueError:
                pass
        """ % str(hostile))
        (cache / "\x1b[31mplanted\u202e.db").write_bytes(b"x")
        db = str(hostile / "named.db")
        for command in (["ls", str(cache)], ["failures", db], ["clear", "--dry-run", db],
                        ["prune", "--stale", "--dry-run", db],
                        ["prune", "--expired", "--dry-run", db]):
            done = run_command(CLI + command)
            self.assertEqual(done.returncode, 0, done.stderr)
            for control in ("\x1b", "\x07", "\u202e"):
                self.assertNotIn(control, done.stdout, command)
            self.assertIn("team\\x1b]8;;x\\x07", done.stdout, command)

    @slow
    def test_text_that_is_not_utf_8_in_a_crafted_cache_reaches_no_terminal(self):
        # SQLite's error quotes the column's text: "Could not decode to UTF-8 column ..."
        cache = self.path / "cache"
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="crafted")
            def f(x):
                if x:
                    raise ValueError(x)
            f(0)
            try:
                f(1)
            except ValueError:
                pass
        """ % str(cache))
        db = str(cache / "crafted.db")
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE Failures SET args = CAST(X'28ff1b5d303b6f776e656407' AS TEXT)")
            conn.execute("UPDATE Dict SET args = CAST(X'28fe1b5b33316d29' AS TEXT)")
        for command in (["failures", db], ["failures", "--traceback", db], ["show", db]):
            done = run_command(CLI + command)
            self.assertEqual(done.returncode, 1, done.stdout)
            self.assertIn("crafted.db: cache file error", done.stderr)
            for control in ("\x1b", "\x07"):
                self.assertNotIn(control, done.stdout + done.stderr, command)

    @unittest.skipUnless(POSIX, "file names with control characters")
    def test_escape_sequences_of_a_file_name_never_reach_the_terminal(self):
        # ls printed each cache's WHERE, the file's name, as it was: anyone who can write
        # to a shared PERSIST_DIR (its group) chose what the terminal of 'persist ls' ran
        cache = self.path / "cache"
        cache.mkdir()
        with persist.open(cache / "good.db") as db:
            db["k"] = 1
        hostile = "\x1b]0;owned\x07\x1b[2J\nx"
        os.rename(str(cache / "good.db"), str(cache / (hostile + ".db")))
        (cache / (hostile + "2.db")).write_bytes(b"not a cache" * 20)
        for args in (["ls", cache], ["show", cache / (hostile + "2.db")]):
            done = run_command(CLI + [str(arg) for arg in args])
            for control in ("\x1b", "\x07"):
                self.assertNotIn(control, done.stdout + done.stderr, args)
            self.assertIn("\\x1b]0;owned\\x07\\x1b[2J", done.stdout + done.stderr)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)


class TestMergeCommand(TempDirTest):
    """python -m persist merge SOURCE... DEST: results and failure records between caches of
    either store, the newest result of each call winning."""

    def cli(self, *args, **env):
        return run_command(CLI + ["merge"] + [str(a) for a in args], cwd=self.dir, **env)

    def merged(self, *args, **env):
        done = self.cli(*args, **env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, "")
        return done.stdout.splitlines()

    def job(self, directory, store, machine="here", runs=None):
        """The memoized function 'job' with its cache in directory: x returns (machine, x), a
        negative x fails."""
        @persist.memoize(cache_dir=directory, name="job", store=store)
        def job(x):
            if runs is not None:
                runs.append(x)
            if x < 0:
                raise ValueError("negative: %d" % x)
            return machine, x
        return job

    def fill(self, directory, store, items, machine="here"):
        job = self.job(directory, store, machine)
        for x in items:
            with contextlib.suppress(ValueError):
                job(x)
        return job

    def assertHits(self, directory, store, expected):
        """Each call x of expected is a hit in the cache job in directory, as expected[x]."""
        runs = []
        job = self.job(directory, store, "rerun", runs)
        self.assertEqual({x: job(x) for x in expected}, expected)
        self.assertEqual(runs, [])

    def test_files_to_sqlite_and_back(self):
        self.fill(self.path / "shared", "files", [0, 1, 2, -1], "cluster")
        local = self.path / "local"
        lines = self.merged(self.path / "shared" / "job.files", local / "job.db")
        self.assertEqual(lines, ["%s -> %s: 3 results copied, 0 skipped (not newer than "
                                 "DEST's); 1 failure record copied, 0 skipped" % (
                                     self.path / "shared" / "job.files", local / "job.db")])
        self.assertTrue(os.path.isfile(str(local / "job.db")))
        expected = {x: ("cluster", x) for x in range(3)}
        self.assertHits(local, "sqlite", expected)
        # ... and back, into a new store of files; its info (the function's) came along
        lines = self.merged(local / "job.db", self.path / "again" / "job.files")
        self.assertIn(": 3 results copied, 0 skipped", lines[0])
        self.assertIn("; 1 failure record copied, 0 skipped", lines[0])
        self.assertHits(self.path / "again", "files", expected)
        done = run_command(CLI + ["ls", str(self.path / "again")])
        self.assertEqual(done.stdout.splitlines()[1].split()[:2], ["job", "3"])
        with self.assertRaises(persist.Failures) as raised:
            persist.map(self.job(self.path / "again", "files", "rerun"), [0, 1, 2, -1])
        self.assertEqual([item for item, _ in raised.exception.failures], [-1])
        self.assertNoTemp()

    @slow
    def test_shelves_either_way(self):
        # a shelf of files (persist.open makes one where a .files directory is): its keys
        # are kept in its records, named by their digests; SQLite's are the keys
        (self.path / "shelf.files").mkdir()
        with persist.open(self.path / "shelf.files") as shelf:
            shelf["alpha"] = [1]
            shelf["b\u00e9ta"] = {"x": 2}
        self.merged(self.path / "shelf.files", self.path / "shelf.db")
        self.merged(self.path / "shelf.db", self.path / "again.files")
        for name in ("shelf.db", "again.files"):
            with persist.open(self.path / name, "r") as shelf:
                self.assertEqual(dict(shelf), {"alpha": [1], "b\u00e9ta": {"x": 2}})

    @slow
    def test_two_machines_caches_into_one_newest_wins(self):
        self.fill(self.path / "m1", "files", [0, 1, 2, 3], "m1")
        self.fill(self.path / "m2", "sqlite", [2, 3, 4, 5], "m2")    # later: 2 and 3 newer
        one, two = self.path / "m1" / "job.files", self.path / "m2" / "job.db"
        expected = {0: ("m1", 0), 1: ("m1", 1), 2: ("m2", 2), 3: ("m2", 3), 4: ("m2", 4),
                    5: ("m2", 5)}
        for order, dest, counts in (([one, two], self.path / "a", [(4, 0), (4, 0)]),
                                    ([two, one], self.path / "b", [(4, 0), (2, 2)])):
            lines = self.merged(*order + [dest / "job.db"])
            self.assertEqual([tuple(int(n) for n in re.findall(r"(\d+) (?:results? )?"
                                                                r"(?:copied|skipped)",
                                                                line)[:2])
                              for line in lines], counts, lines)
            self.assertHits(dest, "sqlite", expected)
            # again: every key is there with the same stored time, skipped
            lines = self.merged(*order + [dest / "job.db"])
            for line in lines:
                self.assertRegex(line, r": 0 results copied, 4 skipped \(not newer than "
                                       r"DEST's\); 0 failure records copied, 0 skipped$")
        # into a store of files, and the files store's own newest-wins check
        self.merged(two, one, self.path / "c" / "job.files")
        self.assertHits(self.path / "c", "files", expected)

    @slow
    def test_a_result_whose_class_does_not_load_here_is_copied_as_bytes(self):
        lib = self.path / "lib"
        lib.mkdir()
        (lib / "shapes.py").write_text(textwrap.dedent("""
            class Shape:
                def __init__(self, sides):
                    self.sides = sides
        """))
        child = """
            import persist, shapes
            @persist.memoize(cache_dir=%r, name="job", store=%r)
            def job(x):
                print("computed", x)
                return shapes.Shape(x)
            print([job(x).sides for x in range(3)])
        """
        out = run_python(child % (str(self.path / "shared"), "files"), PYTHONPATH=lib)
        self.assertEqual(out.count("computed"), 3)
        # the merging process cannot import shapes: nothing is loaded
        done = run_command(CLI + ["-c", "import shapes"], cwd=self.dir)
        self.assertNotEqual(done.returncode, 0)
        lines = self.merged(self.path / "shared" / "job.files", self.path / "local" / "job.db")
        self.assertIn(": 3 results copied, 0 skipped", lines[0])
        out = run_python(child % (str(self.path / "local"), "sqlite"), PYTHONPATH=lib)
        self.assertEqual(out, "[0, 1, 2]\n")       # every one a hit, as it was made

    @slow
    def test_a_new_store_of_files_named_with_a_trailing_slash(self):
        # "merge job.db new.files/" (a shell completes a directory so) was refused: "give a
        # path that ends in .db (SQLite) or .files", which it does
        self.fill(self.path / "m1", "sqlite", [1, 2])
        lines = self.merged(self.path / "m1" / "job.db", "new.files" + os.sep)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("2 results copied", lines[0])

        @persist.memoize(cache_dir=self.dir, name="new", store="files")
        def new(x):
            raise AssertionError("computed again: %r" % (x,))
        self.assertEqual([new(1), new(2)], [("here", 1), ("here", 2)])

    def test_a_store_of_files_failures_count_whole_in_any_listing_order(self):
        # A store of files keeps one file a failure, listed in the directory's order (a hash
        # on ext4); SQLite keeps one record a key, from its first failure to its last. Merged
        # out of time order (t1, t3, then t2), t2 lay within the record made of t1 and t3, was
        # taken for one merged before, and skipped: 3 failures became 2, and --dry-run said 3.
        job = self.job(self.dir, "files")
        for _ in range(3):
            with contextlib.suppress(ValueError):
                job(-1)
        self.assertEqual([f.count for f in job.failures()], [3])
        # the listing order that lost one: the directory's, as a hash may give it
        child = """
            import os, runpy, sys
            real = os.scandir

            class Listing(list):
                def __enter__(self):
                    return self
                def __exit__(self, *exc):
                    return False
                def close(self):
                    pass

            def scandir(path="."):
                with real(path) as entries:
                    listed = Listing(sorted(entries, key=lambda entry: entry.name))
                if len(listed) == 3 and all("." in entry.name for entry in listed):
                    listed[1], listed[2] = listed[2], listed[1]     # t1, t3, t2
                return listed

            os.scandir = scandir
            sys.argv = ["persist", "merge", "job.files", "local/job.db"]
            runpy.run_module("persist", run_name="__main__")
        """
        out = run_python(child, cwd=self.dir)
        self.assertIn("3 failure records copied, 0 skipped", out)
        self.assertEqual([f.count for f in self.job(self.path / "local", "sqlite").failures()],
                         [3])

    def test_failures_carried_with_counts(self):
        one, two = self.path / "m1", self.path / "m2"
        first = self.fill(one, "sqlite", [-1, -1, 7])
        self.fill(two, "files", [-1, -2])
        # m1's failure of -3, and m2's result of it, stored after: the failure is void
        with contextlib.suppress(ValueError):
            self.job(one, "sqlite")(-3)
        self.job(two, "files", "m2")                  # (the same function, another run)

        @persist.memoize(cache_dir=two, name="job", store="files")
        def job(x):
            return "m2", x
        job(-3)
        self.assertEqual({f.args: f.count for f in first.failures()},
                         {"(-1)": 2, "(-3)": 1})
        dest = self.path / "local"
        for _ in range(2):      # the second time, nothing more: no failure counted twice
            self.merged(one / "job.db", two / "job.files", dest / "job.db")
            local = self.job(dest, "sqlite")
            self.assertEqual({f.args: f.count for f in local.failures()},
                             {"(-1)": 3, "(-2)": 1})
        # a SOURCE that failed again since: its record grew, and holds the failures merged
        # before (counted once, not added again)
        self.merged(one / "job.db", self.path / "grown" / "job.db")
        with contextlib.suppress(ValueError):
            self.job(one, "sqlite")(-1)
        self.merged(one / "job.db", self.path / "grown" / "job.db")
        self.assertEqual({f.args: f.count for f in self.job(self.path / "grown",
                                                             "sqlite").failures()},
                         {"(-1)": 3, "(-3)": 1})
        # into a store of files, from both kinds: the same counts
        self.merged(dest / "job.db", one / "job.db", two / "job.files",
                    self.path / "files" / "job.files")
        into_files = self.job(self.path / "files", "files")
        self.assertEqual({f.args: f.count for f in into_files.failures()},
                         {"(-1)": 3, "(-2)": 1})
        # a rerun through persist.map: the results are hits, the failures fail again
        for directory, store in ((dest, "sqlite"), (self.path / "files", "files")):
            runs = []
            with self.assertRaises(persist.Failures) as raised:
                persist.map(self.job(directory, store, "rerun", runs), [7, -3, -1, -2])
            self.assertEqual(sorted(item for item, _ in raised.exception.failures), [-2, -1])
            self.assertEqual(raised.exception.results[:2], [("here", 7), ("m2", -3)])
            self.assertEqual(sorted(runs), [-2, -1])
            counts = {f.args: f.count for f in self.job(directory, store).failures()}
            self.assertEqual(counts, {"(-1)": 4, "(-2)": 2})
        self.assertNoTemp()

    @slow
    def test_dry_run_counts_and_writes_nothing(self):
        self.fill(self.path / "m1", "files", [0, 1, -1])
        self.fill(self.path / "m2", "sqlite", [1, 2, -2])
        sources = [self.path / "m1" / "job.files", self.path / "m2" / "job.db"]
        for dest in (self.path / "new.db", self.path / "new.files"):
            lines = self.merged("--dry-run", *sources + [dest])
            self.assertEqual([line.split(": ", 1)[1] for line in lines], [
                "2 results to copy, 0 to skip (not newer than DEST's); 1 failure record to "
                "copy, 0 to skip (dry run: nothing written)",
                "2 results to copy, 0 to skip (not newer than DEST's); 1 failure record to "
                "copy, 0 to skip (dry run: nothing written)"])
            self.assertFalse(os.path.lexists(str(dest)))
            real = self.merged(*sources + [dest])
            self.assertEqual([line.split(": ", 1)[1].replace("copied", "to copy").replace(
                "skipped", "to skip") for line in real],
                [line.split(": ", 1)[1].replace(" (dry run: nothing written)", "")
                 for line in lines])
            again = self.merged("--dry-run", *sources + [dest])
            self.assertEqual([line.split(": ", 1)[1].split(";")[0] for line in again],
                             ["0 results to copy, 2 to skip (not newer than DEST's)"] * 2)

    @slow
    def test_dry_run_counts_failures_as_sqlite_merges_them(self):
        # SQLite keeps one failure record a key, widened by each merge: a record of DEST's
        # (the earliest failure), then one of the first SOURCE's (the latest), cover the
        # second SOURCE's (in between). The dry run weighed each record apart: "1 to copy",
        # where the merge skips it
        dest = self.path / "d" / "job.db"
        self.fill(dest.parent, "sqlite", [-1])
        self.fill(self.path / "m2", "sqlite", [-1])
        self.fill(self.path / "m1", "files", [-1])
        sources = [self.path / "m1" / "job.files", self.path / "m2" / "job.db"]
        dry = self.merged("--dry-run", *sources + [dest])
        real = self.merged(*sources + [dest])
        self.assertEqual([line.split("; ")[1] for line in real],
                         ["1 failure record copied, 0 skipped",
                          "0 failure records copied, 1 skipped"])
        self.assertEqual([line.split("; ")[1] for line in dry],
                         ["1 failure record to copy, 0 to skip (dry run: nothing written)",
                          "0 failure records to copy, 1 to skip (dry run: nothing written)"])

    def assertRefused(self, done, *words):
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertEqual(done.stdout, "")
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        for word in words:
            self.assertIn(word, done.stderr)

    @slow
    def test_refusals(self):
        self.fill(self.path / "m1", "files", [0, 1])
        source = self.path / "m1" / "job.files"

        @persist.memoize(cache_dir=self.path / "other", name="other")
        def other(x):
            return x
        other(1)
        (self.path / "notes.txt").write_text("my notes")
        (self.path / "plain").mkdir()
        (self.path / "mine.files").mkdir()
        (self.path / "mine.files" / "notes.txt").write_text("mine")
        before = sorted(os.listdir(self.dir))
        for args, words in (
                ([source, self.path / "m1" / ".." / "m1" / "job.files"],
                 ["DEST is the same cache as the SOURCE"]),
                ([self.path / "notes.txt", "dest.db"],
                 ["notes.txt: SOURCE is not a cache (not SQLite)"]),
                ([source, self.path / "notes.txt"],
                 ["notes.txt: DEST is not a cache (not SQLite)"]),
                ([source, self.path / "other" / "other.db"],
                 ["caches of different functions merged into one", "job() in",
                  "other() in", "--force"]),
                ([self.path / "m1", self.path / "notes.txt"],
                 ["DEST must be a directory"]),
                ([self.path / "plain", "dest.db"], ["a directory with no caches under it"]),
                ([source, self.path / "mine.files"],
                 ["mine.files: DEST is not a cache (a directory without the marker file "
                  "'store' of a store of files)"]),
                ([source, "dest"], ["dest: No such cache", "ends in .db (SQLite) or .files"]),
                (["nothing-here", "dest.db"], ["No such cache"])):
            with self.subTest(args=args):
                self.assertRefused(self.cli(*args), *words)
        # a $PERSIST_STORE of no store, where it chooses DEST's kind: one line, no traceback
        self.assertRefused(self.cli(self.path / "m1", "dest", PERSIST_STORE="sqlit"),
                           "dest: $PERSIST_STORE='sqlit' is not a store persist has")
        self.assertEqual(sorted(os.listdir(self.dir)), before)
        self.assertEqual((self.path / "notes.txt").read_text(), "my notes")
        with persist.open(self.path / "other" / "other.db", "r") as shelf:
            self.assertEqual(len(shelf), 1)
        # said how: a renamed function's cache, with --force (their keys are alike: other(1)
        # is newer than job(1))
        lines = self.merged("--force", source, self.path / "other" / "other.db")
        self.assertIn(": 1 result copied, 1 skipped", lines[0])

    @slow
    def test_dest_inside_a_source_refused(self):
        # a careless DEST: in the SOURCE directory of caches (each would merge into one
        # beside it, of the other kind, and again deeper at each rerun), or inside a store
        # of files, among its records (where no one lists it); through a link or '..' too
        self.fill(self.path / "m1", "files", [0, 1])
        self.fill(self.path / "m2", "sqlite", [0])
        source = self.path / "m1" / "job.files"
        os.symlink(str(self.path / "m1"), str(self.path / "link"))
        before = sorted(str(path) for path in self.path.rglob("*"))
        for args in ([self.path / "m1", self.path / "m1"],
                     [self.path / "m1", str(self.path / "m1") + os.sep],
                     [self.path / "m1", self.path / "m1" / "sub"],
                     [self.path / "m1", self.path / "link" / "sub"],
                     [source, source / "results" / "job.files"],
                     [source, self.path / "link" / "job.files" / "more" / "job.db"],
                     [self.path / "m2" / "job.db", self.path / "m2" / "job.db.values" / "x.db"]):
            with self.subTest(args=args):
                self.assertRefused(self.cli(*args), "DEST is inside the SOURCE",
                                   "outside it")
        self.assertEqual(sorted(str(path) for path in self.path.rglob("*")), before)
        # beside it, or above it: merged
        lines = self.merged(self.path / "m1", self.path)
        self.assertIn(lines[0].split(": ")[0], ["%s -> %s" % (source, self.path / name)
                                                for name in ("job.files", "job.db")])

    @slow
    def test_a_shelf_and_a_function_never_merge_even_forced(self):
        # --force is for a renamed function; a shelf's keys are words, a function's are
        # digests: a shelf holding a function's entries cannot even be iterated
        self.fill(self.path / "m1", "files", [0, 1])
        with persist.open(self.path / "shelf.db") as shelf:
            shelf["alpha"] = 1
        for args in ([self.path / "m1" / "job.files", self.path / "shelf.db"],
                     [self.path / "shelf.db", self.path / "m1" / "job.files"]):
            for force in ([], ["--force"]):
                with self.subTest(args=args, force=force):
                    self.assertRefused(self.cli(*force + args), "a shelf and a function's "
                                       "cache merged into one", "job() in", "a shelf")
        with persist.open(self.path / "shelf.db", "r") as shelf:
            self.assertEqual(dict(shelf), {"alpha": 1})
        self.assertHits(self.path / "m1", "files", {0: ("here", 0), 1: ("here", 1)})

    def test_a_missing_value_file_in_source_is_lost_and_the_rest_copied(self):
        # a SQLite SOURCE one of whose value files was removed by hand: that result is gone
        # (memoize would compute it again); the merge copies the others, and says so
        @persist.memoize(cache_dir=self.path / "m1", name="job", store="sqlite")
        def job(x):
            return x, "p" * 300000         # large: a value file of its own
        for x in range(3):
            job(x)
        source = self.path / "m1" / "job.db"
        on_disk, named = value_files(source)
        self.assertEqual(len(named), 3)
        os.remove(str(self.path / "m1" / "job.db.values" / sorted(named)[0]))
        dest = self.path / "local" / "job.db"
        for args, copied in ((["--dry-run"], "2 results to copy, 0 to skip"),
                             ([], "2 results copied, 0 skipped")):
            lines = self.merged(*args + [source, dest])
            self.assertIn(": %s (not newer than DEST's), 1 unreadable in SOURCE (a value "
                          "file missing, or a row persist did not write): not copied; "
                          % copied, lines[0])
        runs = []

        @persist.memoize(cache_dir=dest.parent, name="job", store="sqlite")
        def again(x):
            runs.append(x)
            return x, "p" * 300000
        self.assertEqual([again(x) for x in range(3)], [(x, "p" * 300000) for x in range(3)])
        self.assertEqual(len(runs), 1)

    def test_ls_of_the_cache_made_lists_it(self):
        # 'persist ls DEST' after a merge: a store of files is a directory, and ls listed the
        # caches under it (none), not it, as it lists a .db file given to it
        self.fill(self.path / "m1", "sqlite", [0, 1, -1])
        dest = self.path / "local" / "job.files"
        self.merged(self.path / "m1" / "job.db", dest)
        done = run_command(CLI + ["ls", str(dest)], cwd=self.dir)
        self.assertEqual(done.returncode, 0, done.stderr)
        rows = [line.split() for line in done.stdout.splitlines()[1:]]
        self.assertEqual([(row[0], row[1], row[4], row[-1]) for row in rows],
                         [("job", "2", "1", "job.files")])        # CACHE ENTRIES FAILED WHERE

    @slow
    def test_a_full_disk_names_dest_and_a_rerun_finishes(self):
        # ENOSPC from a write of DEST's: the error said "[Errno 28] No space left on device"
        # alone, naming no cache
        @persist.memoize(cache_dir=self.path / "m1", name="job", store="sqlite")
        def job(x):
            return x, "p" * 300000
        for x in range(6):
            job(x)
        source = self.path / "m1" / "job.db"
        # (into a store of files: each record is written with os.write; SQLite writes its
        # value files through a file object)
        dest = self.path / "d1" / "job.files"
        done = run_command(["-c", textwrap.dedent("""
            import errno, os, sys, runpy
            from unittest import mock
            real, written = os.write, []
            def write(fd, data):
                written.append(len(data))
                if sum(written) > 1000000:       # past three results: the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(fd, data)
            sys.argv = ["persist", "merge", %r, %r]
            with mock.patch.object(os, "write", write):
                runpy.run_module("persist", run_name="__main__", alter_sys=True)
        """ % (str(source), str(dest)))], cwd=self.dir)
        self.assertRefused(done, "%s: No space left on device, merging %s into it; "
                           "what was copied stays: the same merge again finishes it"
                           % (dest, source))
        lines = self.merged(source, dest)
        copied = int(lines[0].split(": ")[1].split()[0])
        self.assertTrue(0 < copied < 6, lines)
        self.assertIn("%d results copied, %d skipped" % (copied, 6 - copied), lines[0])
        self.assertNoTemp()

    @slow
    def test_a_failure_file_made_by_hand_is_no_record(self):
        # fields of a failure file that failures() adds up and merge copies into SQLite's
        # columns, made by another program (or by hand): each crashed merge, failures() and
        # 'persist failures' with a traceback (int('many'), bytes.fromhex('zz'), an int too
        # large for SQLite, a list bound as a column); now such a file is no record, as one
        # with a torn frame is
        job = self.fill(self.path / "m1", "files", [0, -1])
        source = self.path / "m1" / "job.files"
        [path] = [str(p) for p in (source / "failures").rglob("*.*")]
        with open(path, "rb") as file:
            record = file.read()
        # (a record's frame is of one length, whatever its payload: see persist._framed)
        good = json.loads(record[len(persist._framed(b"")):].decode("utf-8"))
        for number, change in enumerate(({"count": "many"}, {"count": 10 ** 22}, {"count": -5},
                       {"count": True}, {"first": "yesterday"}, {"call": {"pickle": "zz"}},
                       {"call": {"hex": "00"}}, {"args": [1]}, {"seconds": "long"},
                       {"version": 5}, {"owner": 7})):
            with self.subTest(change=change):
                payload = json.dumps(dict(good, **change)).encode("utf-8")
                with open(path, "wb") as file:
                    file.write(persist._framed(payload))
                self.assertEqual(job.failures(), [])
                dest = self.path / "dest" / ("%d.db" % number)
                lines = self.merged(source, dest)
                self.assertTrue(lines[0].endswith("; 0 failure records copied, 0 skipped"),
                                lines)
                done = run_command(CLI + ["failures", str(source)], cwd=self.dir)
                self.assertEqual((done.returncode, done.stderr), (0, ""))
        # the file as record_failure() wrote it: a record again
        with open(path, "wb") as file:
            file.write(record)
        self.assertEqual([f.args for f in job.failures()], ["(-1)"])

    @slow
    def test_sqlite_rows_of_other_types_are_not_copied(self):
        # SQLite keeps what any program writes in a column, of any type: a stored time 'x',
        # args as a blob, a failure count 'many' made merge die with a traceback (or, into
        # a store of files, write records that no one reads: counted copied, and lost); a
        # row naming a value file outside the cache stopped the merge, which is how the
        # rest of a damaged cache is saved
        self.fill(self.path / "m1", "sqlite", [0, 1, 2, 3, -1, -2])
        source = self.path / "m1" / "job.db"
        conn = sqlite3.connect(str(source))
        try:
            with conn:
                rows = sorted(conn.execute("SELECT key, args FROM Dict"), key=lambda r: r[1])
                conn.execute("UPDATE Dict SET stored = 'x' WHERE key = ?", (rows[0][0],))
                conn.execute("UPDATE Dict SET args = x'ff00' WHERE key = ?", (rows[1][0],))
                # a value file outside the cache: never read, and the others still copied
                conn.execute("UPDATE Dict SET file = '../../notes' WHERE key = ?",
                             (rows[3][0],))
                failed = sorted(conn.execute("SELECT key, args FROM Failures"),
                                key=lambda r: r[1])
                conn.execute("UPDATE Failures SET count = 'many' WHERE key = ?",
                             (failed[0][0],))
        finally:
            conn.close()
        for dest in (self.path / "d" / "job.db", self.path / "d" / "job.files"):
            with self.subTest(dest=dest):
                lines = self.merged(source, dest)
                self.assertEqual(lines[0].split(": ", 1)[1], "1 result copied, 0 skipped (not "
                                 "newer than DEST's), 3 unreadable in SOURCE (a value file "
                                 "missing, or a row persist did not write): not copied; 1 "
                                 "failure record copied, 0 skipped")
                self.assertEqual(ls_entries(str(dest.parent), dest.name), 1)
        self.assertHits(self.path / "d", "sqlite", {2: ("here", 2)})

    @slow
    def test_a_link_to_a_directory_of_caches_is_followed(self):
        # ~/caches -> /scratch/me/caches: DEST a link to a directory was refused as "not a
        # cache (symlink)", a SOURCE one as "a directory, not a cache"
        self.fill(self.path / "m1", "sqlite", [0, 1])
        (self.path / "scratch").mkdir()
        os.symlink(str(self.path / "scratch"), str(self.path / "home"))
        os.symlink(str(self.path / "m1"), str(self.path / "theirs"))
        lines = self.merged(self.path / "m1" / "job.db", self.path / "home")
        self.assertEqual(lines[0].split(": ")[0], "%s -> %s" % (
            self.path / "m1" / "job.db", self.path / "home" / "job.db"))
        self.assertEqual(os.listdir(str(self.path / "scratch")), ["job.db"])
        lines = self.merged(self.path / "theirs", self.path / "d")
        self.assertIn(": 2 results copied, 0 skipped", lines[0])
        self.assertHits(self.path / "d", "sqlite", {0: ("here", 0), 1: ("here", 1)})

    def test_into_an_empty_directory_named_files(self):
        # mkdir out.files, then merge into it (as persist.open makes a shelf there): refused
        # as "DEST is not a cache (not a cache)"
        self.fill(self.path / "m1", "sqlite", [0, 1, -1])
        dest = self.path / "out" / "job.files"
        dest.mkdir(parents=True)
        lines = self.merged("--dry-run", self.path / "m1" / "job.db", dest)
        self.assertIn(": 2 results to copy, 0 to skip", lines[0])
        self.assertEqual(os.listdir(str(dest)), [])
        lines = self.merged(self.path / "m1" / "job.db", dest)
        self.assertIn(": 2 results copied, 0 skipped", lines[0])
        self.assertHits(dest.parent, "files", {0: ("here", 0), 1: ("here", 1)})

    def test_whole_cache_directories_by_name(self):
        # another machine's .persist (stores of files) into this one's: cache by cache
        theirs, mine = self.path / "theirs" / ".persist", self.path / "mine" / ".persist"
        self.fill(theirs, "files", [0, 1], "theirs")

        @persist.memoize(cache_dir=theirs / "sub", name="helper", store="files")
        def helper(x):
            return x
        helper(5)
        self.fill(mine, "sqlite", [1, 2], "mine")
        lines = self.merged(theirs, mine)
        self.assertEqual(sorted(line.split(": ")[0] for line in lines), sorted([
            "%s -> %s" % (theirs / "job.files", mine / "job.db"),
            "%s -> %s" % (theirs / "sub" / "helper.files", mine / "sub" / "helper.db")]))
        self.assertHits(mine, "sqlite", {0: ("theirs", 0), 1: ("mine", 1), 2: ("mine", 2)})
        runs = []

        @persist.memoize(cache_dir=mine / "sub", name="helper")
        def helper_here(x):
            runs.append(x)
        self.assertEqual(helper_here(5), 5)
        self.assertEqual(runs, [])
        # PERSIST_STORE says which kind a new one is, as it does to memoize; by name, --dir
        (self.path / "third").mkdir()
        lines = self.merged("--dir", theirs, "job", self.path / "third", PERSIST_STORE="files")
        self.assertEqual(lines[0].split(": ")[0], "%s -> %s" % (
            theirs / "job.files", self.path / "third" / "job.files"))

    @slow
    def test_killed_midway_leaves_whole_entries_and_a_rerun_finishes(self):
        # into a store of files, killed in a link() that publishes a result (its temporary
        # file written); into SQLite, once os.open() made a large result's value file (its
        # transaction yet to come)
        for kind, dest, call, size in (("files", "job.files", "link", 100),
                                       ("sqlite", "job.db", "open", 300000)):
            with self.subTest(kind=kind):
                self.killed_midway(kind, self.path / kind / "dest" / dest, call, size)

    @slow
    def test_ctrl_c_says_what_stays_and_a_rerun_finishes(self):
        # Ctrl-C in a long merge printed a traceback, saying nothing of what DEST holds
        self.fill(self.path / "m1", "sqlite", range(30))
        source, dest = self.path / "m1" / "job.db", self.path / "d" / "job.files"
        done = run_command(["-c", textwrap.dedent("""
            import os, signal, sys, runpy
            from unittest import mock
            calls, real = [], os.link
            def link(*args, **kwargs):
                calls.append(args)
                if len(calls) == 10:             # the user presses Ctrl-C
                    os.kill(os.getpid(), signal.SIGINT)
                return real(*args, **kwargs)
            sys.argv = ["persist", "merge", %r, %r]
            with mock.patch.object(os, "link", link):
                runpy.run_module("persist", run_name="__main__", alter_sys=True)
        """ % (str(source), str(dest)))], cwd=self.dir)
        self.assertEqual((done.returncode, done.stdout), (130, ""))
        self.assertEqual(done.stderr, "persist: interrupted, merging %s into %s: what was "
                         "copied stays; the same merge again finishes it\n" % (source, dest))
        lines = self.merged(source, dest)
        copied = int(lines[0].split(": ")[1].split()[0])
        self.assertTrue(0 < copied < 30, lines)
        self.assertIn(": %d results copied, %d skipped" % (copied, 30 - copied), lines[0])
        self.assertHits(dest.parent, "files", {x: ("here", x) for x in range(30)})
        self.assertNoTemp()

    def killed_midway(self, kind, dest, call, size):
        @persist.memoize(cache_dir=self.path / kind / "m1", name="job")
        def job(x):
            if x < 0:
                raise ValueError(x)
            return "here", x, "p" * size

        for x in list(range(40)) + [-1, -2]:
            with contextlib.suppress(ValueError):
                job(x)
        source = self.path / kind / "m1" / "job.db"
        # python -m persist merge, which stops for good in the 20th call it makes
        child = start_python(self, """
            import os, sys, runpy
            from unittest import mock
            calls, real = [], os.%s
            def counted(*args, **kwargs):
                calls.append(args)
                done = real(*args, **kwargs) if %r == "open" else None
                if len(calls) == 20:
                    print("stopped", flush=True)
                    sys.stdin.read()
                return done if %r == "open" else real(*args, **kwargs)
            sys.argv = ["persist", "merge", %r, %r]
            with mock.patch.object(os, %r, counted):
                runpy.run_module("persist", run_name="__main__", alter_sys=True)
        """ % (call, call, call, str(source), str(dest), call), cwd=self.dir)
        self.assertEqual(child.stdout.readline(), "stopped\n")
        child.kill()
        child.wait()
        if kind == "sqlite":            # a value file that no row names yet
            on_disk, named = value_files(dest)
            self.assertEqual(len(on_disk), len(named) + 1)
        # whole entries only, in a valid cache (looked at in a copy: a miss there is stored)
        import shutil
        copy = self.path / kind / "copy"
        shutil.copytree(str(dest.parent), str(copy))
        runs = []

        @persist.memoize(cache_dir=copy, name="job", store=kind)
        def rerun(x):
            runs.append(x)
            return "rerun", x, "p" * size

        self.assertEqual([rerun(x) for x in range(40)],
                         [("rerun" if x in runs else "here", x, "p" * size)
                          for x in range(40)])
        self.assertTrue(0 < 40 - len(runs) < 40, runs)
        lines = self.merged(source, dest)
        self.assertEqual(lines[0].split(": ")[1], "%d results copied, %d skipped (not newer "
                         "than DEST's); 2 failure records copied, 0 skipped" % (
                             len(runs), 40 - len(runs)))
        runs.clear()

        @persist.memoize(cache_dir=dest.parent, name="job", store=kind)
        def again(x):
            runs.append(x)

        self.assertEqual([again(x) for x in range(40)],
                         [("here", x, "p" * size) for x in range(40)])
        self.assertEqual(runs, [])
        if kind == "sqlite":             # the value file of the killed copy: swept
            on_disk, named = value_files(dest)
            self.assertEqual(on_disk, named)
            self.assertEqual(len(named), 40)
        self.assertNoTemp()


# -- the module as shipped: README, the example, installing, type checking


class TestModule(unittest.TestCase):
    def test_all_is_the_public_names(self):
        # TYPE_CHECKING (False) is the one other: type checkers know that name, not _TYPE_CHECKING;
        # inspect is a module, None until memoize first needs it
        public = {name for name in vars(persist) if not name.startswith("_")
                  and not isinstance(getattr(persist, name), type(persist))}
        self.assertEqual(set(persist.__all__), public - {"TYPE_CHECKING", "inspect"})
        self.assertIs(persist.TYPE_CHECKING, False)

    @slow
    @unittest.skipUnless(hasattr(sys, "stdlib_module_names"), "Python 3.10's list of them")
    def test_names_only_the_standard_library(self):
        # every import, those only type checkers read included: persist.py is copied alone
        import ast
        with open(persist.__file__, encoding="utf-8") as file:
            tree = ast.parse(file.read())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module}
        # CPython's own C SHA-256, which persist tries by both names: _sha256 up to 3.11,
        # _sha2 from 3.12 (this Python's list has the one it has)
        renamed = {"_sha256", "_sha2"}
        self.assertEqual(len(renamed & set(sys.stdlib_module_names)), 1)
        self.assertEqual({name for name in names - renamed
                          if name.split(".")[0] not in sys.stdlib_module_names}, set())

    def test_every_persist_error_has_a_reason_its_docstring_names(self):
        # what 'persist ls' and callers tell the cases apart by: a raise site without one
        # would be listed by the file's first bytes, as if it were any damaged file
        import ast
        with open(persist.__file__, encoding="utf-8") as file:
            tree = ast.parse(file.read())
        reasons = {name: value for name, value in vars(persist.PersistError).items()
                   if name.isupper()}
        made = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "PersistError"]
        self.assertGreater(len(made), 25)
        for node in made:
            given = [keyword.value for keyword in node.keywords if keyword.arg == "reason"]
            self.assertEqual(len(given), 1, "line %d" % node.lineno)
            named = {sub.attr for sub in ast.walk(given[0]) if isinstance(sub, ast.Attribute)
                     and getattr(sub.value, "id", None) == "PersistError"}
            self.assertTrue(named or isinstance(given[0], ast.Name), "line %d" % node.lineno)
            self.assertLessEqual(named, set(reasons), "line %d" % node.lineno)
        doc = persist.PersistError.__doc__
        self.assertEqual({name for name in reasons if re.search(r"\n +%s " % name, doc)},
                         set(reasons))
        self.assertEqual(len(set(reasons.values())), len(reasons))
        self.assertTrue(all(re.fullmatch("[a-z]+(-[a-z]+)*", value)
                            for value in reasons.values()), reasons)

    @slow
    def test_a_test_that_hangs_in_this_process_fails_within_a_ci_jobs_limit(self):
        # The backstop (TempDirTest.setUp) for a hang no child's watchdog can end (a deadlock,
        # a pool's exit): the run stops with the hanging test's traceback, in time, and kills
        # what the test started (a pool's worker that loops once ran on for ever)
        self.assertLess(TEST_TIMEOUT + TORTURE_SECONDS + 60, CI_JOB_LIMIT)
        done = subprocess.run([sys.executable, "-c", textwrap.dedent('''
            import subprocess, sys, threading, unittest
            sys.path.insert(0, %r)
            import test_persist
            test_persist.TEST_TIMEOUT = 1
            child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            print(child.pid, flush=True)
            class Hangs(test_persist.TempDirTest):
                def test_waits_for_ever(self):
                    child.wait()
            unittest.main(argv=["hangs"])
        ''' % HERE)], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=CHILD_TIMEOUT)
        self.assertNotEqual(done.returncode, 0)
        self.assertRegex(done.stderr, r"(?s)in test_waits_for_ever.*still running after 1 s")
        if os.path.isdir("/proc/self"):
            try:
                with open("/proc/%d/stat" % int(done.stdout)) as file:
                    state = file.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                state = "gone"
            self.assertIn(state, ("gone", "Z", "X"))  # ended (a zombie where nothing reaps)

    def test_version_and_licence(self):
        self.assertEqual(persist.__version__, "0.1.0")
        with open(persist.__file__, encoding="utf-8") as file:
            self.assertIn("MIT License", file.read(2000))


class TestColdStart(TempDirTest):
    """What a script that makes one memoized call imports: what it does not need stays out
    (pickle.py, with re and enum, for its Python pickler; shelve until a shelf is opened;
    hashlib, with OpenSSL, until an input to hash is long)."""

    def test_a_one_call_script_imports_no_python_pickler_shelve_nor_hashlib(self):
        script = self.path / "job.py"
        script.write_text(textwrap.dedent("""
            import sys
            before = set(sys.modules)      # (3.11's site may import re and enum)
            import persist
            @persist.memoize(cache_dir=sys.argv[1])
            def double(x, times=2, unit="m"):
                return times * x
            print(double(21), double(21), double("ab"))
            lean = ("pickle", "shelve", "re", "enum", "hashlib")
            print(" ".join(name for name in lean if name in set(sys.modules) - before) or "-")
            with persist.open(sys.argv[1] + "/shelf.db") as db:
                import shelve
                db["k"] = [1, 2]
                print(isinstance(db, shelve.Shelf), type(db).__name__, db["k"])
        """))
        done = run_command([str(script), str(self.path / "cache")], cwd=self.dir,
                           timeout=CHILD_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        # PyPy has neither a C pickler apart from pickle.py, nor a SHA-256 in C besides
        # hashlib's: it imports those (and re)
        lean = "-" if importlib.util.find_spec("_pickle") and (
            importlib.util.find_spec("_sha2") or importlib.util.find_spec("_sha256")) \
            else done.stdout.splitlines()[1]
        self.assertEqual(done.stdout.splitlines(), ["42 42 abab", lean, "True _Shelf [1, 2]"])

    def test_the_command_line_imports_no_inspect(self):
        # memoize's decoration alone needs it (8 ms): 'persist prune' of a big cache is
        # timed against the bare SQL of its DELETE
        out = run_python("""
            import runpy, sys, persist
            with persist.open(%r) as db:
                db["k"] = 1
            sys.argv = ["persist", "prune", "--older-than", "1d", %r]
            try:
                runpy.run_module("persist", run_name="__main__")
            except SystemExit as exc:
                print(exc.code, "inspect" in sys.modules)
        """ % (str(self.path / "c.db"), str(self.path / "c.db")))
        self.assertRegex(out, r"^removed 0 entries \(0 B\) from .*\n0 False\n$")


@slow
class TestReadme(TempDirTest):
    """Every code block in README.md, and in the pages of docs/ it links, runs."""

    def blocks(self, language):
        import glob
        found = []
        for name in [os.path.join(HERE, "README.md")] + sorted(
                glob.glob(os.path.join(HERE, "docs", "*.md"))):
            with open(name, encoding="utf-8") as file:
                found += re.findall(r"```%s\n(.*?)```" % language, file.read(), re.S)
        return found

    def test_python_blocks_run(self):
        # A block that imports what is not installed here (Dask) is skipped, saying so: .ci/run
        # runs this test again where the engines are (TestEngines' environment).
        import importlib.util
        blocks = self.blocks("python")
        self.assertGreaterEqual(len(blocks), 4)
        for number, block in enumerate(blocks):
            needs = re.findall(r"^(?:from|import) ([\w]+)", block, re.M)
            missing = [name for name in needs if importlib.util.find_spec(name) is None]
            with self.subTest(block=number):
                if missing:
                    self.skipTest("SKIPPED: README block %d needs %s, not installed here"
                                  % (number, ", ".join(missing)))
                script = self.path / ("block%d.py" % number)
                script.write_text(block)
                done = run_command([str(script)], cwd=self.dir)
                self.assertEqual(done.returncode, 0, "README block %d:\n%s\n%s"
                                 % (number, block, done.stderr))

    def test_shell_blocks_run(self):
        import shutil
        shutil.copy(os.path.join(HERE, "persist.py"), self.dir)
        shutil.copytree(os.path.join(HERE, "examples"), str(self.path / "examples"),
                        ignore=shutil.ignore_patterns("work", ".persist", "__pycache__"))
        commands = [line for block in self.blocks("sh") for line in block.splitlines()
                    if line.strip() and not line.startswith("#")]
        self.assertTrue(any("pipeline.py" in line for line in commands))
        for line in commands:
            command, _, comment = line.partition("#")
            command = command.split()
            if "unittest" in command or ".ci/run" in command:
                continue               # the suite itself: it is running now
            self.assertEqual(command[0], "python", line)
            if command[1].endswith("pipeline.py"):
                command += ["--slow", "0"]     # the README's 3,000 records, without the wait
            done = run_command(command[1:], cwd=self.dir)
            expected = 1 if "--fail-on-bad" in command else 0
            self.assertEqual(done.returncode, expected, "%s\n%s" % (line, done.stderr))
            # the numbers the README shows are those the command prints, in this order
            for count in re.findall(r"\d[\d,]* (?:items|reused|computed|failed)", comment):
                self.assertRegex(done.stdout + done.stderr, r"(?<![\d,])" + count,
                                 "%s\n%s%s" % (line, done.stdout, done.stderr))


@slow
class TestExamplePipeline(TempDirTest):
    def pipeline(self, *args, records=900):
        return run_command([os.path.join(HERE, "examples", "pipeline.py"), "--work",
                            str(self.path / "work"), "--records", str(records), "--slow", "0"]
                           + list(args), PERSIST_DIR=self.path / "cache")

    def test_crash_then_resume(self):
        # 500 records reach past the first malformed one (399), with 400 fewer files to write.
        crashed = self.pipeline("--fail-on-bad", records=500)
        self.assertEqual(crashed.returncode, 1)
        self.assertIn("ValueError", crashed.stderr)
        self.assertIn("crashed on record 399", crashed.stdout)
        self.assertFalse((self.path / "work" / "report.json").exists())
        self.assertTrue(persist.is_done(self.path / "work" / "records"))
        fixed = self.pipeline("--fix", records=500)
        self.assertEqual(fixed.returncode, 0, fixed.stderr)
        self.assertIn("split:     already done", fixed.stdout)
        self.assertIn("transform: 500 items: 399 reused, 101 computed, 0 failed in ",
                      fixed.stderr)
        report = json.loads((self.path / "work" / "report.json").read_text())
        self.assertEqual((report["records"], report["malformed_skipped"]), (500, 0))
        again = self.pipeline(records=500)
        self.assertIn("transform: 500 items: 500 reused, 0 computed, 0 failed", again.stderr)

    def test_keeps_going_past_malformed_records_then_computes_only_those(self):
        done = self.pipeline("--workers", "2")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("transform: 900 items: 0 reused, 898 computed, 2 failed (ValueError x2) "
                      "in ", done.stderr)
        self.assertIn("; see transform.failures()", done.stderr)
        self.assertIn("skipped 2 malformed records: 399, 799", done.stdout)
        report = json.loads((self.path / "work" / "report.json").read_text())
        self.assertEqual((report["records"], report["malformed_skipped"]), (898, 2))
        listed = run_command(CLI + ["failures",
                              "pipeline.transform"], PERSIST_DIR=self.path / "cache")
        self.assertIn("pipeline.transform: 2 failed calls", listed.stdout)
        self.assertIn("'id': 399", listed.stdout)
        fixed = self.pipeline("--fix")
        self.assertIn("transform: 900 items: 898 reused, 2 computed, 0 failed", fixed.stderr)
        self.assertNoTemp()


@slow
class TestInstallWithPip(TempDirTest):
    """pip builds a wheel of the repository that installs the module persist and nothing else,
    and a fresh virtual environment imports it from there and memoizes with it.

    Building needs the backend that pyproject.toml names (flit_core). Without build isolation
    pip takes it from this interpreter, so the test fetches nothing: where it is not installed
    the test is skipped (.ci/run installs it from .ci/requirements.txt)."""

    def setUp(self):
        super().setUp()
        for module, why in (("pip", "pip"), ("venv", "venv"),
                            ("flit_core", "the build backend flit_core (pip install -r "
                                          ".ci/requirements.txt)")):
            if importlib.util.find_spec(module) is None:
                self.skipTest("%s is not installed in this interpreter" % why)
        version = run_command(["-m", "pip", "--version"]).stdout.split()[1]
        if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < (22, 3):
            self.skipTest("pip %s has no --python (22.3 and newer)" % version)

    def pip(self, *args):
        done = run_command(["-m", "pip", "--disable-pip-version-check", "--no-input",
                            "--no-cache-dir"] + list(args), cwd=self.dir)
        self.assertEqual(done.returncode, 0, done.stderr)

    def install(self):
        """Build the wheel, install it into a fresh venv: (the wheel, the venv, its python)."""
        self.pip("wheel", "--no-deps", "--no-build-isolation", "-w", "wheels", HERE)
        (wheel,) = os.listdir(os.path.join(self.dir, "wheels"))
        self.assertEqual(wheel, "persist_results-%s-py3-none-any.whl" % persist.__version__)
        wheel = os.path.join(self.dir, "wheels", wheel)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "venv"], cwd=self.dir,
                       check=True, timeout=300)
        venv = os.path.join(self.dir, "venv")
        python = os.path.join(venv, "Scripts" if os.name == "nt" else "bin", "python")
        self.pip("--python", python, "install", "--no-deps", "--no-index", wheel)
        return wheel, venv, python

    def test_wheel_installs_one_module(self):
        import zipfile
        wheel, venv, python = self.install()
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            metadata = archive.read("persist_results-%s.dist-info/METADATA"
                                    % persist.__version__).decode("utf-8")
        self.assertEqual([name for name in names if ".dist-info/" not in name], ["persist.py"])
        self.assertIn("\nVersion: %s\n" % persist.__version__, metadata)
        self.assertIn("\nRequires-Python: >=3.8\n", metadata)
        # -I: neither this directory nor PYTHONPATH (the repository) is on sys.path.
        done = subprocess.run([python, "-I", "-c", textwrap.dedent("""
            import os, persist
            print(os.path.realpath(persist.__file__))
            @persist.memoize(cache_dir="cache", name="square")
            def square(x):
                print("computed")
                return x * x
            print(square(12), square(12), square.cache_info().hits)
            """)], cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=CHILD_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        where, computed, results = done.stdout.splitlines()
        self.assertTrue(where.startswith(os.path.realpath(venv) + os.sep), where)
        self.assertEqual((computed, results), ("computed", "144 144 1"))
        self.assertTrue(os.path.exists(os.path.join(self.dir, "cache", "square.db")))
        self.check_types_of_installed(python)

    def test_installs_the_persist_command(self):
        # pip install gave no `persist`, which README and persist's messages tell people to
        # run ('persist ls', 'persist failures'): only python -m persist worked.
        _, venv, python = self.install()
        command = os.path.join(venv, "Scripts" if os.name == "nt" else "bin", "persist")
        subprocess.run([python, "-I", "-c", textwrap.dedent("""
            import persist
            @persist.memoize(cache_dir="cache", name="square")
            def square(x):
                if x < 0:
                    raise ValueError(x)
                return x * x
            square(3)
            try:
                square(-1)
            except ValueError:
                pass
            """)], cwd=self.dir, check=True, timeout=300)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)      # the one installed, not the repository's
        env.pop("PERSIST_DIR", None)
        runs = {args: subprocess.run([command] + list(args), cwd=self.dir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     universal_newlines=True, timeout=300)
                for args in (("ls", "cache"), ("failures", "square", "--dir", "cache"),
                             ("ls",))}
        listed = runs[("ls", "cache")]
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout.splitlines()[1], r"^square +1 ")
        failed = runs[("failures", "square", "--dir", "cache")]
        self.assertEqual(failed.returncode, 0, failed.stderr)
        self.assertIn("ValueError", failed.stdout)
        nothing = runs[("ls",)]          # an error, in one line, from the installed module
        self.assertEqual((nothing.returncode, nothing.stderr.count("\n")), (1, 1))
        self.assertIn("persist: error: .persist: No such directory", nothing.stderr)

    def check_types_of_installed(self, python):
        """A single module cannot carry PEP 561's py.typed: mypy calls persist, installed,
        untyped, unless told to read it (follow_untyped_imports, mypy 1.13 and newer, as the
        README says); then its annotations are the types."""
        if importlib.util.find_spec("mypy") is None:
            return               # the rest of the test stands; TestTypeCheck says it skipped
        (self.path / "user.py").write_text(textwrap.dedent("""\
            import persist
            @persist.memoize
            def f(x: int) -> str:
                return str(x)
            reveal_type(f(1))
            """))
        command = [sys.executable, "-m", "mypy", "--python-executable", python, "--strict",
                   "--cache-dir", os.path.join(self.dir, "mypy-cache"), "--no-error-summary",
                   "user.py"]
        env = dict(os.environ)
        env.pop("MYPYPATH", None)
        for config, found in (("[mypy]\n", "[import-untyped]"),
                              ("[mypy]\n[mypy-persist]\nfollow_untyped_imports = True\n",
                               'Revealed type is "builtins.str"')):
            (self.path / "mypy.ini").write_text(config)
            done = subprocess.run(command + ["--config-file", "mypy.ini"], cwd=self.dir, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=600)
            self.assertIn(found, done.stdout.replace('"str"', '"builtins.str"'),
                          done.stderr)


_TYPED_USER_FILE = """\
import persist

@persist.memoize
def f(x: int) -> str:
    return str(x)

@persist.memoize(cache_dir="cache", version=2)
def g(x: int, *, scale: float = 1.0) -> "list[float]":
    return [x * scale]

@persist.memoize
async def fetch(x: int) -> bytes:
    return b"%d" % x

class Model:
    @persist.memoize
    def predict(self, x: int) -> float:
        return 1.0

async def main() -> None:
    reveal_type(await fetch(1))                    # expect: bytes

reveal_type(f(1))                                  # expect: str
reveal_type(g(1, scale=2.0))                       # expect: list[float]
reveal_type(Model().predict(1))                    # expect: float
reveal_type(Model.predict(Model(), 1))             # expect: float
reveal_type(f.cache_clear())                       # expect: None
reveal_type(f.cache_delete(1))                     # expect: bool
reveal_type(Model().predict.cache_delete(1))       # expect: bool
reveal_type(f.cache_prune())                       # expect: int
reveal_type(f.explain(1).hit)                      # expect: bool
reveal_type(persist.map(f, [1, 2]))                # expect: list[str]
reveal_type(persist.map(f, [1, 2], shard=(0, 2)))  # expect: list[str]
persist.map(f, [1, 2], shard=0)                    # error: arg-type reportArgumentType
with persist.open("shelf.db") as db:
    reveal_type(db)                                # expect: _Shelf
with persist.atomic_open("out.txt", "w") as text:
    reveal_type(text)                              # expect: TextIOWrapper
with persist.atomic_open("out.bin", "wb") as binary:
    reveal_type(binary)                            # expect: BufferedWriter
with persist.done_dir("stage") as stage:
    reveal_type(stage)                             # expect: Path
info = f.cache_info()
failure = f.failures()[0]
f("wrong")                                         # error: arg-type reportArgumentType
g(1, scale="x")                                    # error: arg-type reportArgumentType
Model().predict()                                  # error: call-arg reportCallIssue
"""


# The fields of the named tuples, as a type checker must see them (the run-time ones are
# built by collections.namedtuple: the test reads their names from there).
_TYPED_FIELDS = {
    "info": {"hits": "int", "misses": "int", "entries": "int", "path": "str",
             "unstored": "int", "failures": "int", "seconds": "float", "saved": "float"},
    "failure": {"args": "str | None", "type": "str", "message": "str", "count": "int",
                "first": "float", "last": "float", "seconds": "float | None",
                "version": "str | None", "traceback": "str", "call": "_FailedCall | None",
                "call_error": "str | None"},
}


def _plain_type(text):
    """A revealed type as mypy 1 and 2 and pyright all say it: "Union[builtins.str, None]",
    "str | None" -> "str | None"; "_io.TextIOWrapper[_io._WrappedBuffer]" -> "TextIOWrapper";
    "List[str]" (typing's name, which pyright keeps) -> "list[str]"."""
    text = re.sub(r"\b[A-Za-z_][\w]*\.", "", text)
    # a NamedTuple as mypy says it, "tuple[int, str, fallback=Call]": by its name, as pyright
    text = re.sub(r"tuple\[[^=]*, fallback=(\w+)\]", r"\1", text)
    text = re.sub(r"\b(List|Dict|Set|FrozenSet|Tuple)\[", lambda m: m.group(1).lower() + "[",
                  text)
    text = re.sub(r"^Union\[(.*)\]$", lambda m: " | ".join(m.group(1).split(", ")), text)
    if text.startswith(("TextIOWrapper", "BufferedWriter")):
        text = text.partition("[")[0]
    return text


class TestTypeCheck(TempDirTest):
    """A type checker sees a memoized function's own signature and result, and the types
    of the rest of the API: mypy (and pyright, where it is installed) reveal what the
    user file above expects, and report exactly the errors it marks. mypy --strict passes
    on persist.py itself. Skipped where the checker is not installed (.ci/run installs them
    from .ci/requirements-types.txt into a virtual environment of their own)."""

    def user_file(self):
        lines = _TYPED_USER_FILE.splitlines()
        for variable, fields in _TYPED_FIELDS.items():
            names = {"info": persist._CacheInfo, "failure": persist._Failure}[variable]._fields
            self.assertEqual(sorted(names), sorted(fields))     # none left untyped
            for field in names:
                lines.append("reveal_type(%s.%s)  # expect: %s"
                             % (variable, field, fields[field]))
        (self.path / "user.py").write_text("\n".join(lines) + "\n")
        expected, errors = {}, {}
        for number, line in enumerate(lines, 1):
            if "# expect: " in line:
                expected[number] = line.partition("# expect: ")[2]
            elif "# error: " in line:
                errors[number] = line.partition("# error: ")[2].split()
        return expected, errors

    def mypy(self, *args):
        if importlib.util.find_spec("mypy") is None:
            self.skipTest("mypy is not installed in this interpreter (.ci/run installs it "
                          "from .ci/requirements-types.txt)")
        (self.path / "mypy.ini").write_text("[mypy]\n")     # not the user's own settings
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir",
             os.path.join(self.dir, "mypy-cache"), "--strict", "--show-error-codes",
             "--no-error-summary", "--no-pretty"] + list(args),
            cwd=self.dir, env=child_env(MYPYPATH=HERE), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=600)

    def check_output(self, found, expected, errors, tool):
        self.assertEqual(found["revealed"], {number: kind for number, kind in expected.items()},
                         "%s revealed other types:\n%s" % (tool, found["output"]))
        self.assertEqual(sorted(found["errors"]), sorted(errors),
                         "%s reported other errors:\n%s" % (tool, found["output"]))
        for number, code in found["errors"].items():
            self.assertIn(code, errors[number], found["output"])

    def test_mypy_reveals_the_types_of_the_user_file(self):
        expected, errors = self.user_file()
        done = self.mypy("user.py")
        revealed, found = {}, {}
        for line in done.stdout.splitlines():
            match = re.match(r"user\.py:(\d+): (note|error): (.*)", line)
            if match is None:
                continue
            number, kind, text = int(match.group(1)), match.group(2), match.group(3)
            if kind == "note" and text.startswith("Revealed type is "):
                revealed[number] = _plain_type(text[len('Revealed type is "'):-1])
            elif kind == "error":
                found[number] = re.search(r"\[([\w-]+)\]$", text).group(1)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)   # the errors marked
        self.assertFalse([line for line in done.stdout.splitlines()
                          if not line.startswith("user.py:")], done.stdout)
        self.check_output({"revealed": revealed, "errors": found, "output": done.stdout},
                          expected, errors, "mypy")
        self.assertEqual(os.listdir(self.dir).count(".mypy_cache"), 0)

    def test_mypy_strict_passes_on_persist_itself(self):
        done = self.mypy(os.path.join(HERE, "persist.py"))
        self.assertEqual((done.returncode, done.stdout), (0, ""), done.stderr)
        # the oldest Python the types are for: 3.10 (ParamSpec, from typing itself)
        done = self.mypy("--python-version", "3.10", os.path.join(HERE, "persist.py"))
        self.assertEqual((done.returncode, done.stdout), (0, ""), done.stderr)

    def test_pyright_reveals_the_types_of_the_user_file(self):
        if importlib.util.find_spec("pyright") is None:
            self.skipTest("pyright is not installed in this interpreter (.ci/run installs it "
                          "from .ci/requirements-types.txt)")
        command = [sys.executable, "-m", "pyright"]
        # The PyPI package runs pyright's npm package with node, fetching it on first use.
        ready = subprocess.run(command + ["--version"], cwd=self.dir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True,
                               timeout=600)
        if ready.returncode != 0:
            self.skipTest("pyright cannot run here (it needs node and its npm package): "
                          + ready.stdout[-300:])
        expected, errors = self.user_file()
        (self.path / "pyrightconfig.json").write_text(json.dumps(
            {"extraPaths": [HERE], "pythonVersion": "%d.%d" % sys.version_info[:2]}))
        done = subprocess.run(command + ["--outputjson", "user.py"], cwd=self.dir,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=600)
        report = json.loads(done.stdout)
        revealed, found = {}, {}
        for diagnostic in report["generalDiagnostics"]:
            number = diagnostic["range"]["start"]["line"] + 1
            message = diagnostic["message"]
            if diagnostic["severity"] == "information":
                match = re.match(r'Type of ".*" is "(.*)"$', message, re.S)
                revealed[number] = _plain_type(match.group(1))
            elif diagnostic["severity"] == "error":
                self.assertTrue(diagnostic["file"].endswith("user.py"), diagnostic)
                found[number] = diagnostic.get("rule", "")
        self.check_output({"revealed": revealed, "errors": found, "output": done.stdout},
                          expected, errors, "pyright")


# -- shared filesystems and object stores
# The real components the tests of issue 23 run on (.ci/net up starts them: MountsTest,
# ObjectStoreTest); these two prove they are what the tests take them for.


class TestTwoMounts(MountsTest):
    """PERSIST_TEST_MOUNTS's two mounts show one directory, as a shared filesystem does: what
    one writes the other reads, and link() refuses a name the other made."""

    def test_a_file_written_through_one_is_read_whole_through_the_other(self):
        data = os.urandom(3 * 1024 * 1024 + 17)
        with io.open(os.path.join(self.m1, "written"), "wb") as file:
            file.write(data)
        with io.open(os.path.join(self.m2, "written"), "rb") as file:
            self.assertEqual(file.read(), data)
        with io.open(os.path.join(self.m2, "back"), "wb") as file:
            file.write(b"the other way")
        with io.open(os.path.join(self.m1, "back"), "rb") as file:
            self.assertEqual(file.read(), b"the other way")
        self.assertEqual(sorted(os.listdir(self.m1)), ["back", "written"])

    def test_persist_takes_both_for_a_shared_filesystem(self):
        self.assertTrue(persist._shared_filesystem(self.m1), persist._filesystem(self.m1))
        self.assertTrue(persist._shared_filesystem(self.m2), persist._filesystem(self.m2))
        self.assertIsNone(persist._shared_filesystem(self.dir))     # the local one, for contrast

    def test_a_link_over_a_name_the_other_mount_made_is_file_exists(self):
        with io.open(os.path.join(self.m2, "key"), "wb") as file:
            file.write(b"made through m2")
        with io.open(os.path.join(self.m1, "mine.tmp"), "wb") as file:
            file.write(b"made through m1")
        with self.assertRaises(FileExistsError) as caught:
            os.link(os.path.join(self.m1, "mine.tmp"), os.path.join(self.m1, "key"))
        self.assertEqual(caught.exception.errno, errno.EEXIST)
        with io.open(os.path.join(self.m1, "key"), "rb") as file:
            self.assertEqual(file.read(), b"made through m2")
        os.link(os.path.join(self.m1, "mine.tmp"), os.path.join(self.m1, "free"))
        with io.open(os.path.join(self.m2, "free"), "rb") as file:
            self.assertEqual(file.read(), b"made through m1")


class TestObjectStoreServer(ObjectStoreTest):
    """PERSIST_TEST_S3's server is an S3 store: s3fs's mapping of a prefix stores bytes under
    keys another client reads, and a create-only write (If-None-Match) refuses a key that is
    there."""

    def test_a_prefix_is_a_mapping_of_bytes(self):
        mapping = self.fs.get_mapper(self.bucket + "/prefix")
        mapping["key"] = b"value"
        self.assertEqual(mapping["key"], b"value")
        with self.assertRaises(KeyError):
            mapping["missing"]
        self.assertEqual(list(mapping), ["key"])
        # the server holds it: a client of its own (boto3's) reads it
        import boto3
        client = boto3.client("s3", endpoint_url=S3, aws_access_key_id="persist-test",
                              aws_secret_access_key="persist-test", region_name="us-east-1")
        got = client.get_object(Bucket=self.bucket, Key="prefix/key")
        self.assertEqual(got["Body"].read(), b"value")

    def test_a_create_only_write_over_a_key_that_is_there_is_file_exists(self):
        path = self.bucket + "/key"
        with self.fs.open(path, "xb") as file:
            file.write(b"first")
        with self.assertRaises(FileExistsError):
            with self.fs.open(path, "xb") as file:
                file.write(b"second")
        self.assertEqual(self.fs.cat_file(path), b"first")



class OnceTimingOut(collections.abc.MutableMapping):
    """A mapping that passes to another, but whose next read of a result times out, once."""

    def __init__(self, inner):
        self.inner, self.armed = inner, False

    def __getitem__(self, key):
        if self.armed and "/results/" in key:
            self.armed = False
            raise TimeoutError("Read timeout on endpoint URL")
        return self.inner[key]

    def __setitem__(self, key, value):
        self.inner[key] = value

    def __delitem__(self, key):
        del self.inner[key]

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


class TestObjectStoreOnS3(ObjectStoreTest):
    """memoize(store=fsspec mapping) on a real S3 server (moto's)."""

    CHILD = """
        import os, sys, s3fs, persist
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["S3"]},
                               key="persist-test", secret="persist-test", skip_instance_cache=True)
        @persist.memoize(store=fs.get_mapper(os.environ["BUCKET"] + "/cache"), name="job")
        def job(x):
            print("computed", x, flush=True)
            if x < 0:
                raise ValueError("negative %d" % x)
            return {"x": x, "pid": os.getpid()}
        sys.stdin.readline()                  # go
        try:
            print(job(int(sys.argv[1]))["x"], flush=True)
        except ValueError as exc:
            print("failed", exc, flush=True)
    """

    def children(self, arguments):
        script = self.path / "child.py"
        script.write_text(textwrap.dedent(self.CHILD))
        env = child_env(S3=S3, BUCKET=self.bucket)
        children = [spawn(self, [sys.executable, str(script), str(argument)], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          universal_newlines=True) for argument in arguments]
        for child in children:                # all at once
            child.stdin.write("go\n")
            child.stdin.flush()
        outs = [child.communicate()[0] for child in children]
        self.assertEqual([child.returncode for child in children], [0] * len(children), outs)
        return outs

    def job(self):
        @persist.memoize(store=self.fs.get_mapper(self.bucket + "/cache"), name="job")
        def job(x):
            if x < 0:
                raise ValueError("negative %d" % x)
            return {"x": x}
        return job

    @slow
    def test_sixteen_processes_race_one_key_each_returns_and_one_whole_result_stays(self):
        outs = self.children([7] * 16)
        self.assertTrue(all(out.endswith("7\n") for out in outs), outs)
        job = self.job()
        self.assertEqual((job(7)["x"], job.cache_info().hits, job.cache_info().entries),
                         (7, 1, 1))
        results = self.fs.find(self.bucket + "/cache/job.files/results")
        self.assertEqual(len(results), 1, results)
        self.assertIsNotNone(persist._unframed(self.fs.cat_file(results[0])))

    @slow
    def test_failures_from_every_process_reach_the_ledger(self):
        self.children([-1, -1, -1, 2])
        job = self.job()
        failure, = job.failures()
        self.assertEqual((failure.count, failure.call.args), (3, (-1,)))
        self.assertEqual(job.cache_info().entries, 1)
        with self.assertRaises(persist.Failures) as raised:
            persist.map(job, [2, -1], progress=False)
        self.assertEqual([item for item, _ in raised.exception.failures], [-1])

    def test_a_read_that_times_out_is_said_and_never_a_silent_miss(self):
        mapping = OnceTimingOut(self.fs.get_mapper(self.bucket + "/cache"))
        calls = []

        @persist.memoize(store=mapping, name="job")
        def job(x):
            calls.append(x)
            return x
        job(1)
        mapping.armed = True
        with self.assertWarnsRegex(persist.PersistWarning, "Read timeout"):
            self.assertEqual(job(1), 1)
        self.assertEqual((job(1), calls, job.explain(1).reason), (1, [1, 1], "hit"))


if __name__ == "__main__":
    if "--torture" in sys.argv:        # python test_persist.py --torture [SECONDS]
        at = sys.argv.index("--torture")
        seconds = sys.argv[at + 1] if len(sys.argv) > at + 1 else "300"
        os.environ["PERSIST_TORTURE_SECONDS"] = seconds
        TORTURE_SECONDS = float(seconds)
        sys.argv[at:] = ["TestTorture"]
    unittest.main()
