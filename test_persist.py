"""Tests for persist: python -m unittest (nothing to install).

PERSIST_TEST_LARGE=1 also runs the tests that write more than a gigabyte.
"""

import asyncio
import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import importlib.util
import json
import multiprocessing
import os
import pathlib
import pickle
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import unittest
import warnings
from unittest import mock

import persist

HERE = os.path.dirname(os.path.abspath(__file__))
POSIX = os.name == "posix"
PLAIN_FSYNC = mock.patch.object(persist, "_FULLFSYNC", None)   # as where there is no F_FULLFSYNC
LARGE = os.environ.get("PERSIST_TEST_LARGE") == "1"


def child_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code, cwd=None, check=True, **env):
    """Run code in a fresh interpreter that can import persist; return its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=child_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError("child failed (%d):\n%s" % (done.returncode, done.stderr))
    return done.stdout


def start_python(code, cwd=None, **env):
    """Start code in a fresh interpreter; stdout is a pipe, one line per event; stdin waits."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                            env=child_env(**env), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, universal_newlines=True)


def stop(child):
    child.kill()
    child.wait()
    child.stdin.close()
    child.stdout.close()


def temp_files(directory):
    return sorted(name for _, _, names in os.walk(directory) for name in names
                  if name.endswith(".tmp"))


class TempDirTest(unittest.TestCase):
    """Each test gets its own directory, and leaves no temporary file in it."""

    def setUp(self):
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


class Boom(Exception):
    pass


# -- the module


class TestModule(unittest.TestCase):
    def test_all_is_the_public_names(self):
        public = {name for name in vars(persist) if not name.startswith("_")
                  and not isinstance(getattr(persist, name), type(persist))}
        self.assertEqual(set(persist.__all__), public)

    def test_version_and_licence(self):
        self.assertEqual(persist.__version__, "0.1.0")
        with open(persist.__file__, encoding="utf-8") as file:
            self.assertIn("MIT License", file.read(2000))


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
        self.assertEqual(fsyncs, [])
        self.assertTrue(persist.is_done(self.path / "out"))

    def test_cache_checkpoints_full_sync(self):
        with persist.open(self.path / "db") as db:
            db["k"] = 1
            (on,), = db.dict._conn.execute("PRAGMA checkpoint_fullfsync").fetchall()
        self.assertEqual(on, 1)


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


class TestAtomicBadInput(TempDirTest):
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
        forker = start_python(code)
        self.addCleanup(stop, forker)
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


class TestAtomicConcurrentWriters(TempDirTest):
    def test_four_processes_one_target(self):
        target = self.path / "target"
        code = """
            import sys, persist
            me = int(sys.argv[1]) if len(sys.argv) > 1 else 0
            for i in range(60):
                persist.atomic_write(%r, (str(me) * 100000), sync=False)
        """ % str(target)
        children = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(n)],
                                     env=child_env()) for n in range(4)]
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
        with self.assertRaises(TypeError):
            persist.open(self.path / "x.db", writeback=True)

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
        children = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(n)],
                                     env=child_env(), stderr=subprocess.PIPE)
                    for n in range(4)]
        errors = [child.communicate()[1] for child in children]
        self.assertEqual([child.returncode for child in children], [0] * 4, errors)
        with persist.open(path, "r") as db:
            self.assertEqual(len(db), 800)
            self.assertEqual(db["3-199"], 199)


class TestNotACache(TempDirTest):
    def check_refused(self, path, pattern):
        before = path.read_bytes()
        with self.assertRaises(persist.PersistError) as caught:
            persist.open(path)
        self.assertIn(str(path), str(caught.exception))
        self.assertRegex(str(caught.exception), pattern)
        self.assertEqual(path.read_bytes(), before)

    def test_garbage_file(self):
        path = self.path / "cache.db"
        path.write_bytes(b"this is not sqlite at all, just some text\n" * 100)
        self.check_refused(path, "not a persist cache.*delete it to start over")

    def test_other_sqlite_database(self):
        path = self.path / "cache.db"
        conn = sqlite3.connect(str(path))
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
        conn.close()
        self.check_refused(path, "another program.*delete it")

    def test_newer_format(self):
        path = self.path / "cache.db"
        persist.open(path).close()
        conn = sqlite3.connect(str(path))
        conn.execute("PRAGMA user_version=99")
        conn.close()
        self.check_refused(path, "newer persist.*format 99")


# -- memoize


@persist.memoize
def cube(x):
    return x ** 3


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


def functools_wraps(func, wrapper):
    import functools
    functools.update_wrapper(wrapper, func)


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

    def test_pickles_by_reference(self):
        self.assertIs(pickle.loads(pickle.dumps(cube)), cube)

    def test_process_pool_workers(self):
        with mock.patch.dict(os.environ, {"PERSIST_DIR": self.dir}):
            with concurrent.futures.ProcessPoolExecutor(2) as pool:
                self.assertEqual(list(pool.map(cube, range(10))), [x ** 3 for x in range(10)])
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                self.assertEqual(pool.map(cube, range(5, 15)), [x ** 3 for x in range(5, 15)])
            with persist.open(os.path.join(self.dir, "test_persist.cube.db"), "r") as db:
                self.assertEqual(len(db), 15)


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
                               universal_newlines=True, check=True).stdout
        self.assertEqual(first, "210 20\n")
        self.assertEqual(os.listdir(elsewhere), [])
        cache = script.parent / ".persist"
        self.assertEqual((cache / ".gitignore").read_text(), "*\n")
        self.assertTrue((cache / "job.work.db").exists())
        second = subprocess.run([sys.executable, "job.py"], cwd=str(script.parent),
                                env=child_env(PYTHONHASHSEED=2), stdout=subprocess.PIPE,
                                universal_newlines=True, check=True).stdout
        self.assertEqual(second, "210 0\n")

    def test_script_run_or_imported_shares_its_cache(self):
        script = self.write_script()
        subprocess.run([sys.executable, str(script)], env=child_env(), check=True,
                       stdout=subprocess.PIPE)
        out = run_python("import job; print(sum(job.work(i) for i in range(20)), job.calls)",
                         cwd=str(script.parent))
        self.assertEqual(out, "210 0\n")

    def test_persist_dir_and_cache_dir(self):
        script = self.write_script()
        chosen = self.path / "chosen"
        subprocess.run([sys.executable, str(script)], env=child_env(PERSIST_DIR=chosen),
                       check=True, stdout=subprocess.PIPE)
        self.assertTrue((chosen / "job.work.db").exists())
        self.assertFalse((script.parent / ".persist").exists())

        @persist.memoize(cache_dir=self.path / "explicit", name="my-cache")
        def f(x):
            return x

        with mock.patch.dict(os.environ, {"PERSIST_DIR": str(chosen)}):
            f(1)
            self.assertEqual(f.cache_info().path, str(self.path / "explicit" / "my-cache.db"))

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
                               universal_newlines=True, check=True).stdout
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

    def test_ignore(self):
        f = self.memo(lambda x, verbose=False, log=None: x, ignore=("verbose", "log"))
        f(1)
        f(1, verbose=True, log=threading.Lock())
        f(1, True)
        self.assertEqual(len(f.calls), 1)
        with self.assertRaisesRegex(TypeError, "'nope'.*not a parameter"):
            self.memo(lambda x: x, ignore=["nope"])

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


class OutOfBand:
    """Pickles its data as a PickleBuffer, as numpy arrays do."""

    def __init__(self, data):
        self.data = bytearray(data)

    def __reduce_ex__(self, protocol):
        return OutOfBand, (pickle.PickleBuffer(self.data),)


class Renamed:
    pass


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
        f = self.memo(lambda x: lock)
        with self.assertWarnsRegex(persist.PersistWarning, "cannot be pickled"):
            self.assertIs(f(1), lock)
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

    def test_version_bump_drops_old_results(self):
        f1 = self.memo(lambda x: x, name="job", version=1)
        for i in range(50):
            f1(i)
        f2 = self.memo(lambda x: -x, name="job", version=2)
        self.assertEqual(f2(3), -3)
        self.assertEqual(f2.cache_info().entries, 1)
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
        f = self.memo(lambda x: Renamed())
        f(1)
        del Renamed
        try:
            g = self.memo(lambda x: "fresh", name=f.cache_info().path.rsplit(os.sep, 1)[1][:-3])
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
        with self.assertRaisesRegex(persist.PersistError, "job.db.*delete it"):
            f(1)
        self.assertEqual(f.calls, [])
        self.assertEqual(path.read_bytes(), b"garbage" * 1000)



class TestCacheOfAnEarlierFormat(MemoTest):
    """persist 0.1 (format 1) keyed memoize results on hex digests; they stay hits."""

    def make_format_1(self, f):
        conn = sqlite3.connect(f.cache_info().path, isolation_level=None)
        conn.execute("UPDATE Dict SET key = CAST(lower(hex(key)) AS BLOB)")
        conn.execute("PRAGMA user_version=1")
        conn.close()

    def test_new_cache_keys_on_raw_digests(self):
        f = self.memo(lambda x: x * 2, name="job")
        f(1)
        conn = sqlite3.connect(f.cache_info().path)
        (version,), = conn.execute("PRAGMA user_version").fetchall()
        keys = [key for key, in conn.execute("SELECT key FROM Dict")]
        conn.close()
        self.assertEqual(version, 2)
        self.assertEqual([len(key) for key in keys], [32])

    def test_key_written_by_persist_0_1_is_a_hit(self):
        f = self.memo(lambda x: "computed", name="job")
        f(2)
        self.make_format_1(f)
        old_key = hashlib.sha256(repr(("None", (1,))).encode()).hexdigest().encode()
        conn = sqlite3.connect(f.cache_info().path, isolation_level=None)
        conn.execute("INSERT INTO Dict VALUES (?, ?, 0, '(1)')",
                     (old_key, pickle.dumps("stored by 0.1")))
        conn.close()
        g = self.memo(lambda x: "computed", name="job")
        self.assertEqual((g(1), g(2)), ("stored by 0.1", "computed"))
        self.assertEqual(g.calls, [])

    def test_format_1_results_are_hits_and_new_ones_join_them(self):
        f = self.memo(lambda x: x * 2, name="job")
        f(1), f(2)
        self.make_format_1(f)
        g = self.memo(lambda x: x * 2, name="job")
        self.assertEqual((g(1), g(2), g(3)), (2, 4, 6))
        self.assertEqual(len(g.calls), 1)
        self.assertTrue(g.cache_delete(2))
        h = self.memo(lambda x: x * 2, name="job")
        self.assertEqual((h(1), h(2), h(3)), (2, 4, 6))
        self.assertEqual(len(h.calls), 1)
        conn = sqlite3.connect(h.cache_info().path)
        self.assertEqual({len(key) for key, in conn.execute("SELECT key FROM Dict")}, {64})
        conn.close()


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
            print(caught[0].category.__name__, "cannot use the cache" in str(caught[0].message))
        """ % str(cache)
        self.assertEqual(run_python(code), "6 6\nPersistWarning True\n")


class TestIdleProcessHoldsNothingBack(MemoTest):
    def test_checkpoint_is_not_held_back_by_an_idle_reader(self):
        f = self.memo(lambda x: x, name="idle")
        f(1)
        self.assertEqual(f(1), 1)          # a hit: read through a short-lived snapshot
        run_python("""
            import persist
            @persist.memoize(cache_dir=%r, name="idle")
            def f(x):
                return x
            for i in range(300):
                f(i)
        """ % self.dir)
        # Idle for at most 0.5 s, longer than persist keeps a snapshot: the checkpoint is tried
        # every 20 ms and must succeed by then (a fixed 0.5 s sleep was most of the test).
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


class TestMemoizeManyProcesses(TempDirTest):
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
        children = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(n)],
                                     env=child_env(), stderr=subprocess.PIPE)
                    for n in range(8)]
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
            barrier.wait()
            try:
                for i in range(200):
                    assert f(i % 50) == (i % 50) * 2
            except Exception as exc:      # reported below
                failures.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
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
            child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code),
                                      str(round_ * 1000)], env=child_env(),
                                     stdout=subprocess.PIPE, universal_newlines=True)
            for _ in range(rng.randint(1, 150)):
                reported.add(int(child.stdout.readline()))
            child.kill()
            child.wait()
            reported.update(int(line) for line in child.stdout.read().split())
            child.stdout.close()
        self.assertAllHits("killed", reported, lambda x: {"x": x, "pad": "p" * (x % 7) * 1000})


# -- hardening: faults, hostile inputs


def drop_privileges():
    """Code for a child: become nobody if root, so permission bits apply."""
    return """
        import os, pathlib, persist
        import hashlib, inspect, logging, pickle, reprlib, shelve, sqlite3  # before losing /root
        pathlib.Path("/").as_uri()
        if os.getuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
    """


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

    def test_read_only_files_in_a_writable_directory(self):
        os.chown(self.cache, 65534, 65534)
        for name in os.listdir(self.cache):
            os.chmod(self.cache / name, 0o444)
        self.check()


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


class TestDamagedCacheFile(TempDirTest):
    def make(self):
        path = self.path / "cache.db"
        with persist.open(path) as db:
            for i in range(2000):
                db[str(i)] = "value %d" % i * 20
        return path

    def check_refused(self, path):
        before = path.read_bytes()
        with self.assertRaisesRegex(persist.PersistError, re.escape(str(path)) +
                                    ".*delete it to start over"):
            with persist.open(path) as db:
                dict(db)
        self.assertEqual(path.read_bytes(), before)

    def test_truncated_to_half(self):
        path = self.make()
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size // 2)
        self.check_refused(path)

    def test_truncated_header(self):
        path = self.make()
        with open(path, "r+b") as file:
            file.truncate(50)
        self.check_refused(path)


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
            with self.assertRaisesRegex(persist.PersistError, "symbolic link"):
                persist.open(cache / "f.db")
        self.assertEqual(victim.read_bytes(), b"")

    def test_world_writable_directory_or_file_is_refused(self):
        shared = self.path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        with self.assertRaisesRegex(persist.PersistError, "every user may write"):
            persist.open(shared / "x.db")
        os.chmod(shared, 0o755)
        persist.open(shared / "x.db").close()
        os.chmod(shared / "x.db", 0o666)
        with self.assertRaisesRegex(persist.PersistError, "every user may write"):
            persist.open(shared / "x.db")

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
            with self.assertRaisesRegex(persist.PersistError, "another user owns it"):
                persist.open(shared / "theirs.db")

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


class TestHostileArguments(MemoTest):
    def test_deeply_nested(self):
        f = self.memo(lambda x: 1)
        deep = []
        for _ in range(100000):
            deep = [deep]
        with self.assertRaisesRegex(TypeError, "argument 'x'"):
            f(deep)
        nested = {}
        for _ in range(10000):
            nested = {"k": nested}
        with self.assertRaisesRegex(TypeError, "argument 'x'"):
            f(nested)
        self.assertEqual(f.calls, [])
        self.assertEqual(f([[[1]]]), 1)

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
                               universal_newlines=True, check=True).stdout
                for seed in (1, 2, 3, 4, 5)]
        self.assertEqual(outs, ["computed\n", "", "", "", ""])


class TestShelfThreads(TempDirTest):
    def test_sixteen_threads_one_shelf(self):
        barrier = threading.Barrier(16)
        failures = []
        with persist.open(self.path / "s.db") as db:
            def hammer(me):
                barrier.wait()
                try:
                    for i in range(100):
                        db["%d-%d" % (me, i)] = i
                        db["shared"] = me
                        assert db["%d-%d" % (me, i)] == i
                        assert db["shared"] in range(16)
                except Exception as exc:      # reported below
                    failures.append(exc)

            threads = [threading.Thread(target=hammer, args=(n,)) for n in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(failures, [])
            self.assertEqual(len(db), 1601)


# Half a second in the suite, counted from the first result (a few kills, a few hundred
# results checked); .ci/run gives the newest interpreter a longer run, and
# python test_persist.py --torture [SECONDS] runs it for as long as you like.
TORTURE_SECONDS = float(os.environ.get("PERSIST_TORTURE_SECONDS", "0.5"))


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
        reported, lock, first = set(), threading.Lock(), threading.Event()

        def spawn():
            child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(self.WORKER),
                                      self.dir, str(rng.randrange(3000))], env=child_env(),
                                     stdout=subprocess.PIPE, universal_newlines=True)

            def collect():
                for line in child.stdout:
                    with lock:
                        reported.add(int(line))
                    first.set()

            reader = threading.Thread(target=collect)
            reader.start()
            return child, reader

        workers = [spawn() for _ in range(8)]
        kills = 0
        try:
            # The clock starts at the first reported result, so that a slow start (PyPy's
            # workers took the whole second) does not eat the torture; at least one kill.
            self.assertTrue(first.wait(120), "no worker reported a result within 120 s")
            deadline = __import__("time").monotonic() + TORTURE_SECONDS
            while kills == 0 or __import__("time").monotonic() < deadline:
                threading.Event().wait(rng.uniform(0, 0.2))
                n = rng.randrange(8)
                child, reader = workers[n]
                child.kill()
                child.wait()
                reader.join()
                child.stdout.close()
                kills += 1
                workers[n] = spawn()
        finally:
            for child, reader in workers:
                child.kill()
                child.wait()
                reader.join()
                child.stdout.close()
        if "PERSIST_TORTURE_SECONDS" in os.environ:
            print("\ntorture: %g s, %d writers killed, %d results reported and checked"
                  % (TORTURE_SECONDS, kills, len(reported)), file=sys.stderr)
        self.assertAllHits("torture", reported,
                           lambda x: {"x": x, "blob": bytes([x % 251]) * ((x % 5) * 100000)})


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


@unittest.skipUnless(POSIX, "locks and SIGKILL")
class TestDoneDirProcesses(TempDirTest):
    def test_second_entrant_gets_a_clear_error(self):
        out = self.path / "out"
        child = start_python("""
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
        child = start_python("""
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


# -- the user's first hour: logging, the command line, the example, the README


def run_command(args, cwd=None, **env):
    return subprocess.run([sys.executable] + args, cwd=cwd, env=child_env(**env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600)


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
        return run_command([os.path.join(HERE, "persist.py")] + list(args), cwd=self.dir, **env)

    def test_help_on_every_command(self):
        # Seven interpreters, started together rather than one after another.
        script = os.path.join(HERE, "persist.py")
        runs = [[script] + command + ["--help"]
                for command in ([], ["ls"], ["show"], ["clear"], ["prune"], ["status"])]
        runs.append(["-m", "persist", "--help"])
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            for args, done in zip(runs, pool.map(lambda a: run_command(a, cwd=self.dir), runs)):
                self.assertEqual(done.returncode, 0, "%s\n%s" % (args, done.stderr))
                self.assertIn("usage: persist", done.stdout)

    def test_ls(self):
        for done in (self.persist_cli("ls", str(self.cache)),
                     self.persist_cli("ls", PERSIST_DIR=self.cache)):
            self.assertEqual(done.returncode, 0, done.stderr)
            lines = done.stdout.splitlines()
            self.assertEqual(lines[0].split()[:3], ["CACHE", "ENTRIES", "SIZE"])
            self.assertEqual(lines[1].split()[:2], ["jobs.fetch", "5"])
        os.rename(self.cache, self.path / ".persist")
        self.assertIn("jobs.fetch", self.persist_cli("ls").stdout)

    def test_show(self):
        done = self.persist_cli("show", str(self.cache / "jobs.fetch.db"))
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 6)
        self.assertIn("('https://example.org/0')", lines[1])
        self.assertIn("KB", lines[1])
        self.assertEqual(self.persist_cli("show", "jobs.fetch", PERSIST_DIR=self.cache).stdout,
                         done.stdout)

    def test_clear_and_prune(self):
        db = str(self.cache / "jobs.fetch.db")
        done = self.persist_cli("prune", db, "--expired")
        self.assertEqual(done.stdout.split()[:2], ["removed", "0"])
        done = self.persist_cli("prune", db, "--older-than", "7d")
        self.assertEqual(done.stdout.split()[:2], ["removed", "0"])
        done = self.persist_cli("prune", db, "--older-than", "0s")
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

    def test_not_a_cache(self):
        (self.path / "notes.txt").write_text("my notes")
        for command in ("show", "clear", "prune"):
            extra = ["--expired"] if command == "prune" else []
            done = self.persist_cli(command, "notes.txt", *extra)
            self.assertEqual(done.returncode, 1)
            self.assertIn("notes.txt is not a persist cache", done.stderr)
            self.assertNotIn("Traceback", done.stderr)
        done = self.persist_cli("show", "nothing-here")
        self.assertEqual(done.returncode, 1)
        self.assertIn("No such cache", done.stderr)
        self.assertEqual((self.path / "notes.txt").read_text(), "my notes")

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
        self.assertIn("transform: reused 399, computed 101", fixed.stdout)
        report = json.loads((self.path / "work" / "report.json").read_text())
        self.assertEqual((report["records"], report["malformed_skipped"]), (500, 0))
        again = self.pipeline(records=500)
        self.assertIn("transform: reused 500, computed 0", again.stdout)

    def test_without_the_flag_skips_malformed_records(self):
        done = self.pipeline()             # 900 records: two malformed ones, 399 and 799
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("computed 900", done.stdout)
        self.assertIn("skipped 2 malformed records", done.stdout)
        self.assertNoTemp()


class TestReadme(TempDirTest):
    """Every code block in README.md runs."""

    def blocks(self, language):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
            return re.findall(r"```%s\n(.*?)```" % language, file.read(), re.S)

    def test_python_blocks_run(self):
        blocks = self.blocks("python")
        self.assertGreaterEqual(len(blocks), 4)
        for number, block in enumerate(blocks):
            script = self.path / ("block%d.py" % number)
            script.write_text(block)
            done = run_command([str(script)], cwd=self.dir)
            self.assertEqual(done.returncode, 0, "README block %d:\n%s\n%s"
                             % (number, block, done.stderr))

    # The README runs the example at full size (3,000 records, 2 ms each), which takes seconds
    # per command; here each pipeline command gets these options appended: a data set small,
    # but past the crash on record 399 that the README describes. TestExamplePipeline checks
    # the counts.
    SMALL_PIPELINE = ["--records", "500", "--slow", "0"]

    def test_shell_blocks_run(self):
        import shutil
        shutil.copy(os.path.join(HERE, "persist.py"), self.dir)
        shutil.copytree(os.path.join(HERE, "examples"), str(self.path / "examples"),
                        ignore=shutil.ignore_patterns("work", ".persist", "__pycache__"))
        commands = [line for block in self.blocks("sh") for line in block.splitlines()
                    if line.strip() and not line.startswith("#")]
        self.assertTrue(any("pipeline.py" in line for line in commands))
        for line in commands:
            command = line.split("#")[0].split()
            if "unittest" in command or ".ci/run" in command:
                continue               # the suite itself: it is running now
            self.assertEqual(command[0], "python", line)
            if command[1].endswith("pipeline.py"):
                command += self.SMALL_PIPELINE
            done = run_command(command[1:], cwd=self.dir)
            expected = 1 if "--fail-on-bad" in command else 0
            self.assertEqual(done.returncode, expected, "%s\n%s" % (line, done.stderr))
            if "--fail-on-bad" in command:
                self.assertIn("crashed on record 399", done.stdout)


if __name__ == "__main__":
    if "--torture" in sys.argv:        # python test_persist.py --torture [SECONDS]
        at = sys.argv.index("--torture")
        seconds = sys.argv[at + 1] if len(sys.argv) > at + 1 else "300"
        os.environ["PERSIST_TORTURE_SECONDS"] = seconds
        TORTURE_SECONDS = float(seconds)
        sys.argv[at:] = ["TestTorture"]
    unittest.main()
