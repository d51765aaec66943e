# persist.py - results that survive crashes.
#
# Copyright (c) 2026 the persist authors
#
# Permission is hereby granted, free of charge, to any person obtaining a copy of this software
# and associated documentation files (the "Software"), to deal in the Software without
# restriction, including without limitation the rights to use, copy, modify, merge, publish,
# distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
# Software is furnished to do so, subject to the following conditions: the above copyright
# notice and this permission notice shall be included in all copies or substantial portions of
# the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR
# OTHER LIABILITY ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE. (MIT License)
"""Results that survive crashes: a persistent memoize, atomic files, finished-stage markers.

Copy this file into your project (keep the licence notice above), or put it on your path.

    import persist

    @persist.memoize                    # each result is on disk when the call returns;
    def featurize(record_id): ...       # a rerun after a crash computes only what is missing

    with persist.open("results.db") as db:    # shelve.open, safe for many processes
        db["model"] = model

    persist.atomic_write("report.json", text)  # the old content or the new, never half

    with persist.done_dir("work/split") as d:  # d / "DONE" appears only if the block ends well
        persist.atomic_write(d / "part-0.json", text)
    persist.is_done("work/split")              # True: a rerun can skip this stage

Caches hold pickles, and loading a pickle runs code: only use caches from places you trust.
"""

__version__ = "0.1.0"
__all__ = [
    "memoize", "open", "atomic_write", "atomic_open", "done_dir", "is_done",
    "PersistError", "PersistWarning",
]

import _thread
import codecs
import collections
import collections.abc
import contextlib
import errno
import functools
import io
import os
import stat
import sys
import time
import weakref

# Imported by _load() on first use: together they cost more than the rest of persist.
hashlib = inspect = pathlib = pickle = shelve = sqlite3 = threading = None

# -- constants and messages

_TEXT_MODES = {"w": "w", "wt": "w", "x": "x", "xt": "x"}
_BINARY_MODES = {"wb": "w", "xb": "x"}
_MODES_ACCEPTED = "'w', 'wb', 'x' or 'xb'"
_FLAGS = {"r": "ro", "w": "rw", "c": "rw", "n": "rw"}   # SQLite open modes, once it exists
_PROTOCOL = 5                    # every CPython 3.8+ reads it
_INLINE_LIMIT = 1 << 18          # larger pickled values live in files of their own
_PAGE_SIZE = 16384               # at a million entries, hits and misses ~10% faster than 4 KB
_BUSY_TIMEOUT = 600.0            # seconds a writer waits for another before failing
_SNAPSHOT = 0.1                  # seconds memoize's lookups may share one read transaction
_APPLICATION_ID = 0x70727374     # "prst" in the SQLite header: this file is a persist cache
_FORMAT = 2                      # PRAGMA user_version: the layout described in _SCHEMA
_HEX_KEYS = 1                    # the format whose memoize keys are hex digests, not raw ones
_SCHEMA = (
    # Dict is the table of CPython's dbm.sqlite3, with the time each value was stored.
    # memoize's keys are 32-byte SHA-256 digests (hex in format 1, which is still read).
    # A value of b'' means the pickle is in DIR/FILE.values/sha256(key).
    # args is a short, readable form of a memoized call's arguments, for people.
    "CREATE TABLE IF NOT EXISTS Dict (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL,"
    " stored REAL NOT NULL, args TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS Info (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
)
_GET = "SELECT value, stored FROM Dict WHERE key = ?"
_PUT = "REPLACE INTO Dict (key, value, stored, args) VALUES (?, ?, ?, ?)"
_DELETE = "DELETE FROM Dict WHERE key = ?"
_CONTAINS = "SELECT 1 FROM Dict WHERE key = ?"
_KEYS = "SELECT key FROM Dict"
_COUNT = "SELECT count(*) FROM Dict"
_CLEAR = "DELETE FROM Dict"
_INFO = "SELECT name, value FROM Info"
_OLD = "SELECT key, length(value) FROM Dict WHERE stored < ?"
_PRUNE = "DELETE FROM Dict WHERE stored < ?"
_ENTRIES = "SELECT key, args, stored, length(value) FROM Dict ORDER BY stored"
_SUMMARY = "SELECT count(*), min(stored), max(stored) FROM Dict"
_SET_INFO = "REPLACE INTO Info (name, value) VALUES (?, ?)"

_NOT_A_CACHE = ("{path} is not a persist cache ({why}); if it holds nothing you need, delete "
                "it to start over, or use another file name")
_NEWER = ("{path} was written by a newer persist (format {found}; this persist.py reads "
          "format {ours}); use a newer persist.py, or delete the file to start over")
_LINK = ("a symbolic link where persist keeps its own file (it may have been planted); "
         "persist does not follow it: remove it")
_WORLD_WRITABLE = ("every user may write it (or, in a shared directory such as /tmp, another "
                   "user owns it), and loading a pickle that someone planted there runs their "
                   "code; make it private (chmod o-w), or use another place")
_NOT_OURS = ("owned by user {uid}, who could put pickles of their own in {what}, and loading "
             "a pickle runs its author's code; use a cache directory under one that you own, "
             "or chown it to yourself")
_SWAPPABLE = ("every user may write this directory, on the way to {what}: anyone could "
              "replace what lies in it, with pickles that run their code; chmod o-w it (or "
              "+t, as /tmp), or use another place")
_BUSY_DIR = ("{path} is being filled by another done_dir() right now (in this or another "
             "process); let that one finish, or give each stage its own directory")

# -- the error and warning classes


class PersistError(OSError):
    """A path persist was given is not safe to use: not a cache, corrupt, planted, or busy."""


class PersistWarning(UserWarning):
    """persist could not do what it does in the background; your result is still returned."""


# -- platform differences, settled once

_O_TEMP = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
           | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
           | getattr(os, "O_NOINHERIT", 0))
_CHECK_WORLD_WRITABLE = os.name == "posix"   # the mode bits mean the same everywhere there
_CAN_CHOWN = hasattr(os, "fchown")            # POSIX: a replaced file's owner can be kept
_CAN_FSYNC_DIR = hasattr(os, "O_DIRECTORY")   # POSIX: a directory can be opened and fsynced
_SCANDIR_FD = os.scandir in os.supports_fd and os.open in os.supports_dir_fd   # POSIX
_O_SUBDIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
# done_dir() opens each file to fsync it: never through a link, never waiting on a FIFO.
# Windows flushes only a handle open for writing.
_O_SYNC_FILE = ((os.O_RDWR if os.name == "nt" else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0)
                | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_VANISHED = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}   # gone, or swapped for a file or link
_sync_all = getattr(os, "sync", None)         # POSIX: flush every filesystem at once
_SYNC_THREADS = 8                             # done_dir's fsyncs at once: see _sync_files
# Linux writes a file's dirty pages back when told they are not needed: see _start_writeback
_START_WRITEBACK = (getattr(os, "POSIX_FADV_DONTNEED", None)
                    if sys.platform.startswith("linux") else None)
try:
    import fcntl as _fcntl                    # POSIX: done_dir() locks its directory
except ImportError:                           # Windows: concurrent done_dir() is not detected
    _fcntl = None
_FULLFSYNC = getattr(_fcntl, "F_FULLFSYNC", None)   # macOS: fsync() stops at the drive's cache


def _link_no_clobber(src, dst):
    """Rename src to dst, failing with FileExistsError if dst exists, even if it just appeared."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:               # no hard links on this filesystem (FAT, some FUSE mounts)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)
    else:
        os.unlink(src)


_rename_no_clobber = os.rename if os.name == "nt" else _link_no_clobber  # nt never replaces

# -- private helpers: files


def _fsync(fd):
    """Flush fd to stable storage; on macOS with F_FULLFSYNC, out of the drive's cache too."""
    if _FULLFSYNC is not None:
        try:
            _fcntl.fcntl(fd, _FULLFSYNC)
            return
        except OSError:           # not every filesystem has it (SMB, some FUSE): fsync then
            pass
    os.fsync(fd)


def _fsync_dir(directory):
    """Make a rename or unlink in directory durable, where the platform allows it."""
    if not _CAN_FSYNC_DIR:
        return
    # best effort: some network and FUSE filesystems refuse to fsync a directory (EINVAL)
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _fsync(fd)
        finally:
            os.close(fd)


def _create_temp(target, shown):
    """Create .NAME.RANDOM.tmp beside target, exclusively, never through a link; 0o666 & ~umask."""
    directory, name = os.path.split(target)
    for _ in range(100):
        temp = os.path.join(directory, ".%s.%s.tmp" % (name[:60], os.urandom(4).hex()))
        try:
            return temp, os.open(temp, _O_TEMP, 0o666)   # the kernel applies the umask
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory (its directory "
                                    "does not exist; create it first)", shown) from None
    raise FileExistsError(errno.EEXIST, "no free temporary file name beside it", shown)


def _mode(mode, encoding, errors, newline):
    """("w" or "x", the encoding or None for binary) for atomic_open()'s arguments."""
    if mode in _BINARY_MODES:
        if encoding is not None or errors is not None or newline is not None:
            raise ValueError("atomic_open() mode %r is binary: it takes no encoding, errors "
                             "or newline" % mode)
        return _BINARY_MODES[mode], None
    if mode in _TEXT_MODES:
        encoding = "utf-8" if encoding is None else encoding
        codecs.lookup(encoding)     # an unknown encoding fails now, before any file exists
        return _TEXT_MODES[mode], encoding
    raise ValueError("atomic_open() mode must be %s, not %r" % (_MODES_ACCEPTED, mode))


def _kind(mode):
    """What a file type is called in an error: 'a FIFO', 'a character device', ..."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _existing(target, shown, follow):
    """os.stat (lstat if not follow) of the regular file at target, None if there is none.

    Anything else is refused: renaming over a device, FIFO or socket would replace it, and
    as root atomic_write("/dev/null", ...) would replace the system's /dev/null.
    """
    try:
        info = os.stat(target) if follow else os.lstat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), shown)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
        raise PersistError(errno.EINVAL, "%s, not a regular file: atomic_write() and "
                           "atomic_open() replace only regular files; write to it with "
                           "open(), or give another path" % _kind(info.st_mode), shown)
    return info


def _keep_owner_and_mode(fd, temp, old):
    """Give the new file at temp (open as fd) the owner, group and mode of the old one.

    As root both are set; a member of the old file's group sets the group; anyone else gets
    the new file as their own, which is all a rename can do. Owner first: chown clears the
    setuid and setgid bits, which the chmod after it puts back.
    """
    if _CAN_CHOWN:
        new = os.fstat(fd)
        if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except PermissionError:
                # best effort: not root; the group, if we are in it
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, -1, old.st_gid)
    os.chmod(temp, stat.S_IMODE(old.st_mode))


@contextlib.contextmanager
def _atomic_open(path, mode, sync, follow, encoding=None, errors=None, newline=None):
    """atomic_open(); follow=False replaces a symbolic link at path instead of its target."""
    kind, encoding = _mode(mode, encoding, errors, newline)
    target = os.fsdecode(os.fspath(path))
    # Resolved once, here: an os.chdir() in the block must not move the commit elsewhere.
    # Not os.path.abspath(), which would drop "link/.." where open() follows the link.
    if not os.path.isabs(target):
        target = os.path.join(os.getcwd(), target)
    if kind == "x" and os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    if follow and os.path.islink(target):
        target = os.path.realpath(target)   # as open(path, "w"): the link's target is written
    old = _existing(target, path, follow)
    temp, fd = _create_temp(target, path)
    try:
        with io.open(fd, "wb" if encoding is None else "w", encoding=encoding, errors=errors,
                     newline=newline) as file:
            if old is not None and stat.S_ISREG(old.st_mode):
                _keep_owner_and_mode(fd, temp, old)
            yield file
            file.flush()
            if sync:
                _fsync(fd)
        if kind == "x":
            try:
                _rename_no_clobber(temp, target)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        else:
            _existing(target, path, follow)     # again: a FIFO may have appeared meanwhile
            os.replace(temp, target)
    except BaseException:
        # best effort: the temporary file may be gone already; the original error matters
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if sync:
        _fsync_dir(os.path.dirname(target))


class _Spill:
    """A file for pickle.dump: bytes in memory up to a limit, then the rest into a file."""

    def __init__(self, open_file):
        self._open_file = open_file
        self._chunks = []
        self._size = 0
        self.file = None

    def write(self, data):
        if self.file is None:
            self._size += memoryview(data).nbytes
            if self._size <= _INLINE_LIMIT:
                self._chunks.append(bytes(data))
                return
            self.file = self._open_file()
            self.file.writelines(self._chunks)
            self._chunks = None
        self.file.write(data)

    def getvalue(self):
        return b"" if self.file is not None else b"".join(self._chunks)


def _size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _remove_files_in(directory):
    """Remove the plain files in directory (not the directory); a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _check_private(directory, what):
    """Refuse directory unless only we and root can change what it holds, and its parents.

    The checks OpenSSH's StrictModes makes: the directory and each parent up to the root are
    owned by us or root, and no parent lets other users rename what is in it, so nobody
    else can swap in a directory of their own. A parent writable by every user is fine when
    sticky (/tmp: only an entry's owner may rename it, and the entry below is ours or root's);
    the directory itself may be sticky and shared too (then _Store takes only files we own).
    Writable by the group is accepted: the group's members are people the directory is
    shared with on purpose (a team directory, or a user's own group under umask 002). A
    symbolic link on the way is checked where it lies and where it leads.
    """
    if not _CHECK_WORLD_WRITABLE:
        return
    trusted = (0, os.geteuid())
    pending, seen = [os.path.abspath(directory)], set()
    while pending:
        path = pending.pop()
        if path in seen:                   # a link back up the path, or a loop of links
            continue
        seen.add(path)
        info = os.lstat(path)
        if info.st_uid not in trusted:
            raise PersistError(errno.EPERM, _NOT_OURS.format(what=what, uid=info.st_uid), path)
        if stat.S_ISLNK(info.st_mode):
            pending.append(os.path.realpath(path))
        elif info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise PersistError(errno.EPERM, _SWAPPABLE.format(what=what), path)
        pending.append(os.path.dirname(path))


# -- private helpers: the store

_STORES = weakref.WeakSet()      # open stores, for _after_fork
_ABANDONED = []                  # connections inherited over fork(): never used, never closed


def _after_fork():
    """In a forked child: fresh locks, and each store reconnects on its next use."""
    global _OPEN_LOCK
    _OPEN_LOCK = _thread.allocate_lock()
    for store in list(_STORES):
        store._lock = _thread.allocate_lock()
        if store._conn is not None:
            _ABANDONED.append(store._conn)
            store._conn = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

_REAPER = None                   # the thread that ends memoize's read snapshots


def _reap():
    """End each store's read snapshot once it is old: an idle process that still held one
    would keep SQLite from restarting its write-ahead log, which would then grow."""
    while True:
        time.sleep(_SNAPSHOT)
        for store in list(_STORES):
            store.end_snapshot(time.monotonic())


def _start_reaper():
    global _REAPER
    if _REAPER is None or not _REAPER.is_alive():     # after fork() it is not
        _REAPER = threading.Thread(target=_reap, name="persist-snapshots", daemon=True)
        _REAPER.start()


_LOG = _SHORT = _KeyPickler = _Shelf = None


def _load():
    """Import what the store and memoize need, and make the classes that build on it."""
    global hashlib, inspect, pathlib, pickle, shelve, sqlite3, threading
    global _LOG, _SHORT, _KeyPickler, _Shelf
    if _Shelf is not None:
        return
    import hashlib, inspect, logging, pathlib, pickle, reprlib, shelve, sqlite3, threading  # noqa
    _LOG = logging.getLogger("persist")      # DEBUG: a line per hit, miss and store
    _SHORT = reprlib.Repr()                  # arguments shortened for 'persist show'
    _SHORT.maxstring = _SHORT.maxother = 40
    # Pickles for keys: no memo (equal values, equal bytes), dicts and sets by content.
    _KeyPickler = type("_KeyPickler", (pickle.Pickler,),
                       {"persistent_id": lambda self, obj: _canonical(obj)})
    _Shelf = type("_Shelf", (_ShelfMethods, shelve.Shelf), {})


class _Store(collections.abc.MutableMapping):
    """bytes -> bytes in one SQLite file in WAL mode; every assignment commits when it returns.

    Large values live as files in FILE.values/. One connection per process, behind a lock.
    """

    __eq__ = object.__eq__        # a store is itself, not its contents
    __hash__ = object.__hash__

    def __init__(self, filename, flag="c"):
        _load()
        if flag not in _FLAGS:
            raise ValueError("flag must be 'r', 'w', 'c' or 'n', not %r" % (flag,))
        self.path = os.path.abspath(os.fsdecode(os.fspath(filename)))
        self._values = self.path + ".values"
        self._had_values = os.path.isdir(self._values)   # else no large value to replace
        self._flag = flag
        self._lock = _thread.allocate_lock()
        self._conn = None
        self._snapshot_ends = 0.0
        with self._lock:
            self._connect()
        _STORES.add(self)
        if flag == "n":
            self.clear()

    def _error(self, exc):
        """Turn an sqlite3 error into ours, naming the file."""
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc)
            if "readonly" in text:
                return PermissionError(errno.EACCES, "cannot write the cache (%s)" % text,
                                       self.path)
            if "full" in text:
                return OSError(errno.ENOSPC, "cannot write the cache (%s)" % text, self.path)
            return OSError(errno.EIO, "cache file error (%s)" % text, self.path)
        return PersistError(_NOT_A_CACHE.format(path=self.path, why=exc))

    def _connect(self):
        self._check_path()
        try:
            if self._flag in "cn" and not os.path.exists(self.path):
                self._create()
            conn = self._open(_FLAGS[self._flag])
        except sqlite3.OperationalError as exc:
            # SQLite reads a WAL file in a directory it may not write (no -shm file can be
            # made) only as immutable: nobody but root can be changing it there.
            if not os.path.isfile(self.path) or os.access(os.path.dirname(self.path), os.W_OK):
                raise self._error(exc) from None
            try:
                conn = self._open("ro&immutable=1")
            except sqlite3.Error as exc:
                raise self._error(exc) from None
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        self._conn = conn
        self._cursor = conn.cursor()     # recent()'s: one cursor, not one a lookup
        return conn

    def _open(self, mode):
        conn = sqlite3.connect(pathlib.Path(self.path).as_uri() + "?mode=" + mode, uri=True,
                               timeout=_BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        try:
            self._check(conn)
            conn.execute("PRAGMA synchronous=NORMAL")   # WAL: a commit survives a crash
            conn.execute("PRAGMA wal_autocheckpoint=2500")   # 40 MB: fewer checkpoint fsyncs
            conn.execute("PRAGMA checkpoint_fullfsync=ON")   # macOS: past the drive's cache
            conn.execute("PRAGMA cache_size=-32768")   # up to 32 MB of pages, as used
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_path(self):
        """Refuse a cache others could plant code in, or that would write through a link."""
        if self._flag in "rw" and not os.path.exists(self.path):
            raise FileNotFoundError(errno.ENOENT, "No such cache file (open it with flag 'c' "
                                    "to create it)", self.path)
        shared = 0
        if _CHECK_WORLD_WRITABLE:
            directory = os.path.dirname(self.path)
            _check_private(directory, "the cache's directory")
            shared = os.stat(directory).st_mode & (stat.S_IWOTH | stat.S_ISVTX)
        for name in (self.path, self.path + "-wal", self.path + "-shm", self._values):
            try:
                info = os.lstat(name)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(info.st_mode):
                raise PersistError(errno.ELOOP, _LINK, name)
            # in a sticky shared directory (/tmp) only files we own are safe
            foreign = shared & stat.S_IWOTH and info.st_uid not in (0, os.getuid())
            if _CHECK_WORLD_WRITABLE and (info.st_mode & stat.S_IWOTH or foreign):
                raise PersistError(errno.EPERM, _WORLD_WRITABLE, name)

    def _check(self, conn):
        """Check the header: a persist cache, of a format this code reads."""
        # fetchall(), never fetchone(): on PyPy an unfinished statement blocks COMMIT
        (app,), = conn.execute("PRAGMA application_id").fetchall()
        if app != _APPLICATION_ID:
            empty = not conn.execute("SELECT 1 FROM sqlite_master").fetchall()
            why = "an empty file" if empty else "an SQLite database of another program"
            raise PersistError(_NOT_A_CACHE.format(path=self.path, why=why))
        (found,), = conn.execute("PRAGMA user_version").fetchall()
        if found > _FORMAT:
            raise PersistError(_NEWER.format(path=self.path, found=found, ours=_FORMAT))
        self.format = found

    def _create(self):
        """Make a new cache beside path and link it into place: nobody sees it half made."""
        temp, fd = _create_temp(self.path, self.path)
        os.close(fd)
        try:
            conn = sqlite3.connect(temp, isolation_level=None)
            try:
                conn.execute("PRAGMA page_size=%d" % _PAGE_SIZE)
                conn.execute("PRAGMA journal_mode=WAL").fetchall()
                conn.execute("PRAGMA application_id=%d" % _APPLICATION_ID)
                conn.execute("PRAGMA user_version=%d" % _FORMAT)
                for statement in _SCHEMA:
                    conn.execute(statement)
            finally:
                conn.close()
            with contextlib.suppress(FileExistsError):   # another process made it first
                _rename_no_clobber(temp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _latest(self):
        """The connection, seeing the latest state: recent()'s snapshot ended. Hold the lock."""
        conn = self._conn or self._connect()
        if conn.in_transaction:
            conn.execute("COMMIT")
        return conn

    def _query(self, sql, params=()):
        with self._lock:
            try:
                return self._latest().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def recent(self, key):
        """lookup() for memoize, from a snapshot at most _SNAPSHOT seconds old.

        Every SQLite read transaction takes and drops file locks: half the cost of a hit.
        Sharing one for a moment is safe for memoize, whose stored results stay right: at
        worst a result that another process stored in that moment is computed again.
        """
        self._lock.acquire()      # not "with": this is every hit's path, and it costs less
        try:
            conn = self._conn or self._connect()
            try:
                now = time.monotonic()
                if now > self._snapshot_ends or not conn.in_transaction:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
                    conn.execute("BEGIN")
                    self._snapshot_ends = now + _SNAPSHOT
                    _start_reaper()
                return self._cursor.execute(_GET, (key,)).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc) from None
        finally:
            self._lock.release()

    @staticmethod
    def _put_in_snapshot(conn, row):
        """Store row in recent()'s snapshot, so that a miss is one transaction from lookup to
        store and takes SQLite's locks once. False if another process wrote since the
        snapshot began (SQLite then refuses, and the caller writes in a transaction of its own).
        """
        try:
            conn.execute(_PUT, row)
            conn.execute("COMMIT")
            return True
        except sqlite3.OperationalError:     # SQLITE_BUSY: the snapshot is not the latest
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False

    def end_snapshot(self, now):
        """End recent()'s snapshot if it is old, unless the store is busy (then it is in use)."""
        if now > self._snapshot_ends > 0 and self._lock.acquire(blocking=False):
            try:
                if self._conn is not None and self._conn.in_transaction:
                    # best effort: a failure here only delays the end of a read
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("COMMIT")
                self._snapshot_ends = 0.0
            finally:
                self._lock.release()

    @contextlib.contextmanager
    def _transaction(self):
        with self._lock:
            try:
                conn = self._latest()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def _side(self, key):
        return os.path.join(self._values, hashlib.sha256(key).hexdigest())

    def _drop_side(self, key):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._side(key))

    def _open_side(self, key):
        os.makedirs(self._values, exist_ok=True)
        self._had_values = True
        return _atomic_open(self._side(key), "wb", sync=False, follow=False)

    # The raw mapping: bytes keys, pickled bytes values.

    def __getitem__(self, key):
        row = self.lookup(key)
        if row is None:
            raise KeyError(key)
        if row[0]:
            return row[0]
        with io.open(self._side(key), "rb") as file:
            return file.read()

    def __setitem__(self, key, blob):
        if len(blob) > _INLINE_LIMIT:
            with self._open_side(key) as file:
                file.write(blob)
            blob = b""
        self._put(key, blob, None)

    def __delitem__(self, key):
        if not self.delete(key):
            raise KeyError(key)

    def __contains__(self, key):
        return bool(self._query(_CONTAINS, (key,)))

    def __iter__(self):
        return iter([key for key, in self._query(_KEYS)])

    def __len__(self):
        return self._query(_COUNT)[0][0]

    def _put(self, key, blob, args):
        row = (key, blob, time.time(), args)
        with self._lock:
            try:
                conn = self._conn or self._connect()
                if not (conn.in_transaction and self._put_in_snapshot(conn, row)):
                    conn.execute(_PUT, row)
            except sqlite3.Error as exc:
                raise self._error(exc) from None
        if blob and self._had_values:    # remove a large value that this one replaced
            self._drop_side(key)

    # What the shelf and memoize use: pickling straight to and from disk.

    def lookup(self, key):
        """(value, stored) for key, or None."""
        rows = self._query(_GET, (key,))
        return rows[0] if rows else None

    def load(self, key, blob):
        """Unpickle a value that lookup() returned."""
        if blob:
            return pickle.loads(blob)
        with io.open(self._side(key), "rb") as file:
            return pickle.load(file)

    def dump(self, key, value, protocol, args=None):
        """Pickle value under key; a large pickle goes to its file without a copy in memory."""
        with contextlib.ExitStack() as stack:
            spill = _Spill(lambda: stack.enter_context(self._open_side(key)))
            pickle.dump(value, spill, protocol)
        self._put(key, spill.getvalue(), args)

    def delete(self, key):
        """Remove key; return whether it was there."""
        with self._transaction() as conn:
            gone = conn.execute(_DELETE, (key,)).rowcount > 0
        self._drop_side(key)
        return gone

    def clear(self):
        self._query(_CLEAR)
        self._reclaim()

    def _reclaim(self):
        """After every entry went: remove the large values' files and shrink the file."""
        _remove_files_in(self._values)
        # best effort: another process may be using the file; its free pages are reused anyway
        with contextlib.suppress(OSError):
            self._query("VACUUM")

    def info(self):
        return dict(self._query(_INFO))

    def prune(self, before):
        """Remove the entries stored before the Unix time before; return how many went."""
        with self._transaction() as conn:
            rows = conn.execute(_OLD, (before,)).fetchall()
            conn.execute(_PRUNE, (before,))
        for key, size in rows:
            if not size:
                self._drop_side(key)
        return len(rows)

    def entries(self):
        """(key, args, stored, size) of every entry, oldest first."""
        rows = self._query(_ENTRIES)
        return [(key, args, stored, size or _size(self._side(key)))
                for key, args, stored, size in rows]

    def disk_usage(self):
        names = [self.path, self.path + "-wal", self.path + "-shm"]
        with contextlib.suppress(FileNotFoundError):
            names += [entry.path for entry in os.scandir(self._values)]
        return sum(_size(name) for name in names)

    def claim(self, function, version, expire):
        """Mark this cache as function's at version; results of another version are dropped."""
        want = {"function": function, "version": version, "expire": repr(expire)}
        if self.info() == want:
            return
        with self._transaction() as conn:
            old = dict(conn.execute(_INFO).fetchall())
            stale = "version" in old and old["version"] != version
            if stale:
                conn.execute(_CLEAR)
            conn.executemany(_SET_INFO, want.items())
        if stale:
            self._reclaim()

    def __del__(self):
        # best effort: a store dropped without close() closes its connection (not one that
        # fork() left behind: _after_fork took it away)
        with contextlib.suppress(Exception):
            self.close()

    def close(self):
        _STORES.discard(self)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _ShelfMethods:
    """Mixed into shelve.Shelf by _load(): values are pickled straight to and from the file."""

    def __getitem__(self, key):
        store = self.dict
        if not isinstance(store, _Store):   # closed: let Shelf raise its ValueError
            return super().__getitem__(key)
        raw = key.encode(self.keyencoding)
        row = store.lookup(raw)
        if row is None:
            raise KeyError(key)
        return store.load(raw, row[0])

    def __setitem__(self, key, value):
        if not isinstance(self.dict, _Store):
            return super().__setitem__(key, value)
        self.dict.dump(key.encode(self.keyencoding), value, self._protocol)

    @property
    def path(self):
        """The cache file's absolute path."""
        return self.dict.path


# -- private helpers: memoize

_MISSING = object()
_DEBUG = 10                     # logging.DEBUG, without importing logging
_ATOMS = {int, float, str, bytes, bool, type(None)}   # their repr() is exact and stable
_OPEN_LOCK = _thread.allocate_lock()   # one thread at a time opens a memoized function's cache
_CacheInfo = collections.namedtuple("CacheInfo", "hits misses entries path")


def _canonical(obj):
    """What keys pickle for dicts and sets: their content, whatever their order."""
    kind = type(obj)
    if kind is dict:
        return ("persist.dict", sorted(_digest((k, v)) for k, v in obj.items()))
    if kind is set or kind is frozenset:
        return ("persist." + kind.__name__, sorted(_digest(item) for item in obj))
    return None


class _HashFile:
    """A file for pickle.dump that feeds a hash: large buffers are hashed in place, not copied."""

    __slots__ = ("write",)

    def __init__(self, hasher):
        self.write = hasher.update


def _digest(obj):
    """sha256 of obj's pickle, with no memo (equal values, equal bytes) and dicts canonical."""
    hasher = hashlib.sha256()
    pickler = _KeyPickler(_HashFile(hasher), _PROTOCOL)
    pickler.fast = True        # no memo: a repeated object is written again, a cycle raises
    pickler.dump(obj)
    return hasher.digest()


def _keyer(salt):
    """key(material) -> the 32-byte key of a call, for a cache whose salt is the str salt.

    sha256 over repr((salt, material)) for a few small plain values, else over a pickle. The
    repr is hashed in three parts, its start made once: the same digest, 20% sooner.
    """
    start = ("(%r, " % (salt,)).encode("utf-8", "surrogatepass")

    def key(material):
        if type(material) is tuple and len(material) < 8:
            for value in material:
                kind = type(value)
                if kind not in _ATOMS or (kind is str or kind is bytes) and len(value) > 256:
                    break
            else:    # the repr of these types is exact and never starts as a pickle does
                hasher = hashlib.sha256(start)
                hasher.update(repr(material).encode("utf-8", "surrogatepass"))
                hasher.update(b")")
                return hasher.digest()
        return _digest((salt, material))

    return key


def _binder(func, ignore):
    """A fast bind(args, kwargs) -> tuple of the values that make the key, defaults applied."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):     # some builtins have no signature: key on the call
        if ignore:
            raise TypeError("memoize(ignore=...) needs a function with a signature; "
                            "%r has none" % (func,)) from None
        return lambda args, kwargs: (args, kwargs)
    params = list(sig.parameters.values())
    names = [p.name for p in params]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    for name in ignore:
        if name not in names and not takes_kwargs:
            raise TypeError("memoize(ignore=...) names %r, which is not a parameter of %s%s"
                            % (name, _identity(func), sig))
    keep = [i for i, name in enumerate(names) if name not in ignore]

    def bind_slowly(args, kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = []
        for param in params:
            value = bound.arguments[param.name]
            if param.kind is param.VAR_KEYWORD and ignore:
                value = {k: v for k, v in value.items() if k not in ignore}
            if param.name not in ignore:
                values.append(value)
        return tuple(values)

    if not all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params):
        return bind_slowly
    count = len(params)
    required = sum(p.default is p.empty for p in params)
    defaults = tuple(p.default for p in params)

    def bind(args, kwargs):
        if kwargs or not required <= len(args) <= count:
            return bind_slowly(args, kwargs)
        values = args + defaults[len(args):] if len(args) < count else args
        return tuple([values[i] for i in keep]) if ignore else values

    return bind


def _unkeyable(func, args, kwargs, exc):
    """The TypeError for an argument that cannot be part of a key, naming the parameter."""
    label = _identity(func)
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
        named = list(bound.arguments.items())
    except (TypeError, ValueError):
        named = []
    for name, value in named:
        try:
            _digest(value)
        except Exception as inner:
            return TypeError("%s(): argument %r cannot be part of a cache key (%s: %s); leave "
                             "it out with memoize(ignore=[%r]) or pass memoize(key=...)"
                             % (label, name, type(inner).__name__, inner, name))
    return TypeError("%s(): the arguments cannot be made into a cache key (%s: %s); pass "
                     "memoize(key=...)" % (label, type(exc).__name__, exc))


def _identity(func):
    """module.qualname; for a script run as __main__, its file name (or -m name) as module."""
    module = getattr(func, "__module__", None) or "__main__"
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name != "__main__":
            module = spec.name
        else:
            filename = getattr(getattr(func, "__code__", None), "co_filename", "")
            stem = os.path.splitext(os.path.basename(filename))[0]
            if stem.isidentifier():
                module = stem
    name = getattr(func, "__qualname__", None) or type(func).__qualname__   # or a partial
    if "<lambda>" in name:       # two lambdas in one scope share a qualname: add the line
        name += "-%d" % getattr(getattr(func, "__code__", None), "co_firstlineno", 0)
    return "%s.%s" % (module, name)


def _file_name(identity):
    """A file name for the cache of identity, safe on every platform."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in identity)
    if safe != identity:     # keep names that differ only in unsafe characters apart
        safe += "-" + hashlib.sha256(identity.encode()).hexdigest()[:8]
    return safe + ".db"


def _default_dir(func):
    """.persist beside the file that defines func, else in the current directory."""
    filename = getattr(getattr(func, "__code__", None), "co_filename", "")
    if filename and os.path.isfile(filename):
        return os.path.join(os.path.dirname(os.path.abspath(filename)), ".persist")
    return os.path.join(os.getcwd(), ".persist")


def _make_cache_dir(directory):
    """Create directory with a .gitignore of '*', so a cache never lands in a commit."""
    if os.path.isdir(directory):
        return
    os.makedirs(directory, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        with _atomic_open(os.path.join(directory, ".gitignore"), "x", sync=False,
                          follow=False) as file:
            file.write("*\n")


def _seconds(expire):
    if expire is None:
        return None
    seconds = expire.total_seconds() if hasattr(expire, "total_seconds") else expire
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise TypeError("Expected memoize(expire=...) to be a positive number of seconds or "
                        "a timedelta, not %r" % (expire,))
    return float(seconds)


def _short_repr(call):
    """f's arguments as '(1, 'a', key=2)', shortened for people."""
    shorten = _SHORT
    args, kwargs = call
    try:
        parts = [shorten.repr(a) for a in args]
        parts += ["%s=%s" % (k, shorten.repr(v)) for k, v in kwargs.items()]
    except Exception:           # a repr that fails must not cost the result
        return None
    text = "(%s)" % ", ".join(parts)
    return text if len(text) <= 200 else text[:199] + "\u2026"


def _warn(message):
    """Warn at the user's line: the first caller outside this file."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    import warnings
    warnings.warn(message, PersistWarning, stacklevel=level)


class _Memo:
    """The cache behind one memoized function: opened on first use, counters for this process."""

    def __init__(self, func, cache_dir, name, version, expire):
        self.func = func
        self.identity = name or _identity(func)
        self.version = repr(version)
        self.expire = expire
        self.cache_dir = None if cache_dir is None else os.path.abspath(os.fspath(cache_dir))
        self.default_dir = _default_dir(func)
        self.hits = self.misses = 0
        self.store = None
        self.hex_keys = False     # a cache made by persist 0.1 keys on hex digests
        self.broken = False       # the cache could not be opened: run uncached, warned once
        self._path = None

    @property
    def path(self):
        if self._path is None:
            directory = self.cache_dir or os.environ.get("PERSIST_DIR") or self.default_dir
            self._path = os.path.join(os.path.abspath(directory), _file_name(self.identity))
        return self._path

    def open(self, create=True):
        with _OPEN_LOCK:
            if self.store is None and not self.broken:
                if not create and not os.path.exists(self.path):
                    return None
                try:
                    _make_cache_dir(os.path.dirname(self.path))
                    store = _Store(self.path, "c")
                    try:
                        store.claim(self.identity, self.version, self.expire)
                    except PermissionError:      # a read-only cache still serves its results
                        if store.info().get("version") != self.version:
                            raise
                        _warn("the cache of %s() at %s is read-only; new results are not "
                              "stored" % (self.identity, self.path))
                except PersistError:
                    raise
                except OSError as exc:
                    self.broken = True
                    _warn("cannot use the cache of %s() at %s (%s); its results are computed "
                          "but not stored" % (self.identity, self.path, exc))
                    return None
                self.hex_keys = store.format == _HEX_KEYS
                self.store = store
            return self.store

    def stored_key(self, digest):
        """The key under which the cache holds the call whose key is digest."""
        return digest.hex().encode() if self.hex_keys else digest

    def get(self, digest):
        """The cached result for the call whose key is digest, or _MISSING."""
        store = self.open() if self.store is None else self.store
        rows = None
        if store is not None:
            key = self.stored_key(digest) if self.hex_keys else digest
            try:
                rows = store.recent(key)
            except PersistError:
                raise
            except OSError as exc:
                _warn("cannot read the cache of %s() (%s); computing the result"
                      % (self.identity, exc))
        if rows and (self.expire is None or time.time() - rows[0][1] < self.expire):
            try:
                blob = rows[0][0]        # load(), without a call when the pickle is inline
                value = pickle.loads(blob) if blob else store.load(key, blob)
            except Exception as exc:
                _warn("a cached result of %s() in %s cannot be loaded (%s: %s); computing it "
                      "again" % (self.identity, self.path, type(exc).__name__, exc))
            else:
                self.hits += 1
                if _LOG.isEnabledFor(_DEBUG):
                    _LOG.debug("%s: hit %s", self.identity, digest[:6].hex())
                return value
        self.misses += 1
        if _LOG.isEnabledFor(_DEBUG):
            _LOG.debug("%s: miss %s", self.identity, digest[:6].hex())
        return _MISSING

    def put(self, digest, value, args):
        store = self.store
        if store is None:
            return
        try:
            store.dump(self.stored_key(digest), value, _PROTOCOL, _short_repr(args))
            if _LOG.isEnabledFor(_DEBUG):
                _LOG.debug("%s: stored %s", self.identity, digest[:6].hex())
        except OSError as exc:
            _warn("cannot store a result of %s() in %s (%s); it is returned but not cached"
                  % (self.identity, self.path, exc))
        except Exception as exc:
            _warn("a result of %s() cannot be pickled (%s: %s); it is returned but not cached"
                  % (self.identity, type(exc).__name__, exc))


def _memoize(func, cache_dir, name, version, expire, ignore, key):
    _load()
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError("memoize cannot cache %s(): it is a generator function, and a "
                        "generator is consumed as it runs; memoize a function that returns "
                        "a list instead" % func.__qualname__)
    if isinstance(ignore, str):
        ignore = (ignore,)
    ignore = frozenset(ignore)
    if key is not None and not callable(key):
        raise TypeError("Expected memoize(key=...) to be a callable, not %r" % (key,))
    memo = _Memo(func, cache_dir, name, version, _seconds(expire))
    bind = _binder(func, ignore) if key is None else (lambda args, kwargs: key(*args, **kwargs))
    key_from = _keyer(memo.version)

    def key_of(args, kwargs):
        material = bind(args, kwargs)      # a wrong call raises here, as calling func would
        try:
            return key_from(material)
        except Exception as exc:
            raise _unkeyable(func, args, kwargs, exc) from None

    if inspect.iscoroutinefunction(func):
        async def wrapper(*args, **kwargs):
            k = key_of(args, kwargs)
            result = memo.get(k)
            if result is _MISSING:
                result = await func(*args, **kwargs)
                memo.put(k, result, (args, kwargs))
            return result
    else:
        def wrapper(*args, **kwargs):
            k = key_of(args, kwargs)
            result = memo.get(k)
            if result is _MISSING:
                result = func(*args, **kwargs)
                memo.put(k, result, (args, kwargs))
            return result

    def cache_info():
        """hits and misses in this process; entries and path of the cache on disk."""
        store = memo.open(create=False)
        return _CacheInfo(memo.hits, memo.misses, 0 if store is None else len(store), memo.path)

    def cache_clear():
        """Remove every stored result of this function."""
        store = memo.open(create=False)
        if store is not None:
            store.clear()
        memo.hits = memo.misses = 0

    def cache_delete(*args, **kwargs):
        """Remove the result stored for these arguments; return whether there was one."""
        store = memo.open(create=False)
        return store is not None and store.delete(memo.stored_key(key_of(args, kwargs)))

    functools.update_wrapper(wrapper, func)
    wrapper.cache_info = cache_info
    wrapper.cache_clear = cache_clear
    wrapper.cache_delete = cache_delete
    return wrapper


# -- private helpers: done_dir


class _NotDurable(Exception):
    """An fsync failed in _sync_tree(): (errno, strerror, name), past its except OSError."""


def _start_writeback(name, dir_fd):
    """Ask Linux to start writing the file's dirty pages to disk, without waiting."""
    # This is an optimization only; it's ok if it fails. Started for every file before the
    # first fsync, the writes and their block allocations share a few journal commits: with
    # the threads of _sync_files, 10,000 fsyncs took 0.5 s here instead of 0.7 s. The price:
    # pages already on disk leave the page cache (os has no sync_file_range(), which would
    # start the writes and do only that).
    with contextlib.suppress(OSError):
        fd = os.open(name, _O_SYNC_FILE, dir_fd=dir_fd)
        try:
            os.posix_fadvise(fd, 0, 0, _START_WRITEBACK)
        finally:
            os.close(fd)


def _sync_file(name, dir_fd):
    """Fsync the regular file name (relative to dir_fd, if given): its size in bytes.

    An OSError from opening it means it vanished or may not be read; one from fsync means
    the file is not durable, and is raised as _NotDurable. Plain fsync, even on macOS: one
    F_FULLFSYNC afterwards, on the marker, empties the drive's cache of every file at once.
    """
    fd = os.open(name, _O_SYNC_FILE, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):     # a FIFO swapped in meanwhile is only counted
            try:
                os.fsync(fd)
            except OSError as exc:
                raise _NotDurable(exc.errno, exc.strerror, name) from None
        return info.st_size
    finally:
        os.close(fd)


def _sync_files(names, dir_fd):
    """Fsync the files names (relative to dir_fd, if given): (files, bytes, files not synced).

    Several threads fsync at once, because the drive's cache flushes that concurrent fsyncs
    ask for are merged: for 3,000 small files, 0.18 s instead of 3.2 s on a busy disk here.
    """
    if _START_WRITEBACK is not None:
        for name in names:
            _start_writeback(name, dir_fd)
    results = []                           # a size, _VANISHED, or the exception

    def sync(part):
        for name in part:
            try:
                results.append(_sync_file(name, dir_fd))
            except _NotDurable as exc:
                results.append(exc)
            except OSError as exc:
                results.append(_VANISHED if exc.errno in _VANISHED else exc)

    if len(names) < 2 * _SYNC_THREADS:
        sync(names)
    else:
        import threading
        threads = [threading.Thread(target=sync, args=(names[i::_SYNC_THREADS],))
                   for i in range(_SYNC_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    files = size = unsynced = 0
    for result in results:
        if isinstance(result, _NotDurable):
            raise result
        if isinstance(result, OSError):    # may not be opened: not synced, still counted
            unsynced += 1
            files += 1
        elif result is not _VANISHED:
            files += 1
            size += result
    return files, size, unsynced


def _sync_tree(folder, skip=None, dir_fd=None):
    """Fsync each file and directory in folder and below; (files, bytes, files not synced).

    Symbolic links are not followed, and the file skip at the top is left out. A file or
    directory that vanishes while we look (another tool's temporary file) is left out: the
    marker's record is for people, and must never cost the marker. One that may not be
    opened is counted as not synced. Where scandir takes a descriptor, each file is opened
    relative to its open directory, with no path to resolve.
    """
    files = size = unsynced = 0
    regular = []                           # this directory's files, synced after the loop
    fd = None
    if _SCANDIR_FD:
        fd = os.open(folder, _O_SUBDIR if dir_fd is not None else os.O_RDONLY, dir_fd=dir_fd)
    try:
        with os.scandir(folder if fd is None else fd) as entries:
            for entry in entries:
                name = entry.path if fd is None else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        more = _sync_tree(name, None, fd)
                        files, size = files + more[0], size + more[1]
                        unsynced += more[2]
                    elif entry.name == skip:
                        continue
                    elif entry.is_file(follow_symlinks=False):
                        regular.append(name)
                    else:                  # a link, FIFO or socket: nothing to sync
                        size += entry.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError as exc:
                    if exc.errno not in _VANISHED:
                        unsynced += 1
        more = _sync_files(regular, fd)
        files, size, unsynced = files + more[0], size + more[1], unsynced + more[2]
        if dir_fd is not None:             # a subdirectory: its entries are durable too
            # best effort: some network and FUSE filesystems refuse to fsync a directory
            with contextlib.suppress(OSError):
                os.fsync(fd)
    finally:
        if fd is not None:
            os.close(fd)
    return files, size, unsynced


def _marker_record(directory, marker):
    """Make every file in directory durable; the marker's text: when, how many files, bytes."""
    try:
        files, size, unsynced = _sync_tree(os.fspath(directory), marker)
    except _NotDurable as failed:
        code, text, name = failed.args
        raise OSError(code, "cannot make this file durable (%s), so the stage gets no "
                      "marker" % text, os.path.join(directory, name)) from None
    if unsynced and _sync_all is not None:
        _sync_all()                        # files we may not open: flush every filesystem
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return '{"finished": "%s", "files": %d, "bytes": %d}\n' % (finished, files, size)


@contextlib.contextmanager
def _dir_lock(directory):
    """Hold an exclusive lock on directory, or fail at once if someone else holds it."""
    if _fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            raise PersistError(errno.EBUSY, _BUSY_DIR.format(path=directory),
                               os.fspath(directory)) from None
        yield
    finally:
        os.close(fd)


def _empty(directory):
    """Remove everything in directory, not following symbolic links."""
    import shutil
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# -- the public API


def memoize(func=None, *, cache_dir=None, name=None, version=None, expire=None, ignore=(),
            key=None):
    """Keep each result of func on disk, so that a rerun computes only what is missing.

    Use it bare, @memoize, or with options, @memoize(version=2). Each result is committed
    before the call returns: a crash, even kill -9, loses nothing that was returned. Many
    threads and processes may share one cache. Exceptions are never cached.

    cache_dir: where the cache lives; else $PERSIST_DIR; else .persist beside the file that
        defines func (or in the current directory, for the REPL and notebooks).
    name: the cache's name; else module.qualname of func.
    version: change it when results computed before are wrong; they are all dropped. Editing
        the function does not drop anything, by design.
    expire: seconds (or a timedelta) after which a result is computed again.
    ignore: names of parameters left out of the key, such as 'self' or 'verbose'.
    key: a callable taking func's arguments and returning what to key on instead.

    Equal arguments give the same key in every process: defaults are applied, dict and set
    order do not matter, types do (1 and 1.0 differ). The wrapper has cache_info(),
    cache_clear() and cache_delete(*args, **kwargs). Caches are pickles: trust them as code.
    """
    options = (cache_dir, name, version, expire, ignore, key)
    if func is None:
        return lambda f: memoize(f, cache_dir=cache_dir, name=name, version=version,
                                 expire=expire, ignore=ignore, key=key)
    if not callable(func):
        raise TypeError("Expected a function to decorate, not %r: use @memoize or "
                        "@memoize(option=...)" % (func,))
    return _memoize(func, *options)


def open(filename, flag="c", protocol=None):
    """Open a persistent dictionary: shelve.open, safe for many processes and for crashes.

    Keys are str, values anything picklable. Every assignment is committed when it returns;
    many threads and processes may use one file at once. flag is 'r' (read only), 'w' (read
    and write an existing file), 'c' (create it if needed) or 'n' (start empty). writeback is
    not offered: assign a changed value back to store it. Use it as a context manager, or
    call close(). The file is SQLite: sqlite3 FILE 'SELECT key, stored FROM Dict' lists it.
    """
    store = _Store(filename, flag)
    return _Shelf(store, protocol)


def atomic_write(path, data, *, sync=True, encoding=None, errors=None, newline=None):
    """Replace the file at path with data, atomically: readers see the old file or the new.

    data is str (written as text, utf-8 unless encoding says otherwise) or bytes-like. See
    atomic_open() for what is guaranteed and for the options.
    """
    if isinstance(data, str):
        mode = "w"
    else:
        try:
            memoryview(data)
        except TypeError:
            raise TypeError("Expected str or a bytes-like object as atomic_write() data, "
                            "not %s" % type(data).__name__) from None
        mode = "wb"
    with _atomic_open(path, mode, sync, True, encoding, errors, newline) as file:
        file.write(data)


def atomic_open(path, mode="w", *, sync=True, encoding=None, errors=None, newline=None):
    """Open a file for writing that replaces path only when the with-block ends without error.

    with atomic_open("out.json") as f: json.dump(obj, f)

    mode is "w" or "wb", or "x" or "xb" to fail with FileExistsError if path exists (checked
    before the block runs and again, without a race, at the end). Text is utf-8 unless
    encoding says otherwise; errors and newline are as for open(). The data goes to a
    temporary .NAME.RANDOM.tmp beside path, is flushed and fsynced, renamed over path, and
    the directory is fsynced: at every instant path holds the old content or the new, even
    if the process is killed. sync=False skips the fsyncs (faster; a power cut may then lose
    the new content, never mix it). On any exception the temporary file is removed and path
    is untouched. A relative path is resolved once, on entry: an os.chdir() in the block
    does not move the file.

    A new file gets the permissions open() would give it. A replaced one keeps its mode, and
    its owner and group where the process may set them, as open(path, "w") would: root keeps
    both; a member of the file's group keeps the group; anyone else (POSIX), and everyone on
    Windows, makes the new file their own. It is a new file: hard links to the old one, ACLs
    and extended attributes are not carried over. A symbolic link at path is followed, as
    open() does. A device, FIFO or socket at path (or at the end of the link) is refused
    with PersistError, never replaced. Windows: replacing a file that another process holds
    open can fail with PermissionError.
    """
    _mode(mode, encoding, errors, newline)      # wrong arguments fail here, as open()'s do
    return _atomic_open(path, mode, sync, True, encoding, errors, newline)


def done_dir(path, *, marker="DONE", clean=False):
    """A directory that gets its marker file only when the with-block finishes without error.

    with done_dir("work/features") as d: ...   # d is the directory, a pathlib.Path

    On entry the directory and its parents are created, and an old marker is removed (and
    the removal made durable) before the block runs; clean=True also empties it. Files
    already there stay, so a stage can resume. When the block ends, every file and
    directory in the tree is fsynced (symbolic links are not followed), and then the marker
    is written, atomically, and made durable. So when the marker exists, every file in the
    directory is durable: files inside may be written with atomic_write(..., sync=False) or
    open(). The marker holds one line of JSON with "finished" (UTC), "files" and "bytes"
    (what the directory held), for people; is_done() needs only that it exists.

    Leaving the block by return, break or continue finishes the stage, as reaching its end
    does. To abandon a stage, raise: on any exception there is no marker and the files
    stay. marker="_SUCCESS" suits Hadoop and Spark. A second done_dir() on the same
    directory at the same time raises PersistError (POSIX).
    """
    if not isinstance(marker, str) or marker in ("", ".", "..") or "/" in marker or \
            os.sep in marker or (os.altsep and os.altsep in marker):
        raise ValueError("done_dir() marker must be a plain file name, not %r" % (marker,))
    import pathlib
    directory = pathlib.Path(os.fsdecode(os.fspath(path)))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (done_dir() needs a "
                                 "directory; move the file away)", path)
    return _done_dir(directory, marker, clean)


@contextlib.contextmanager
def _done_dir(directory, marker, clean):
    """done_dir() once its arguments are checked: the work happens on entry and exit."""
    where = directory.absolute()           # once: an os.chdir() in the block moves nothing
    made, probe = [], where
    while not os.path.lexists(probe):      # the directories mkdir() will add
        made.append(probe)
        probe = probe.parent
    where.mkdir(parents=True, exist_ok=True)
    stamp = os.path.join(where, marker)
    with _dir_lock(where):
        if os.path.lexists(stamp):
            os.unlink(stamp)
            _fsync_dir(where)
        if clean:
            _empty(where)
            _fsync_dir(where)
        yield directory
        record = _marker_record(where, marker)
        for path in made:                  # their entries too, or a power cut may drop them
            _fsync_dir(path.parent)
        _fsync_dir(where)
        with _atomic_open(stamp, "w", True, False) as file:
            file.write(record)


def is_done(path, *, marker="DONE"):
    """True when the directory at path holds marker as a regular file (any content)."""
    try:
        return stat.S_ISREG(os.lstat(os.path.join(os.fsdecode(os.fspath(path)), marker)).st_mode)
    except (OSError, ValueError):
        return False


# -- the command line: python persist.py COMMAND, or python -m persist COMMAND


def _when(stamp):
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def _bytes(size):
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (size, unit)
        size /= 1024


def _age(seconds):
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return "%d%s" % (seconds // length, unit)
    return "%ds" % seconds


def _duration(text):
    """'90', '90s', '15m', '12h', '7d' or '2w' as seconds; argparse calls it."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise ValueError("not a duration: %r (try 90s, 15m, 12h, 7d or 2w)" % text) from None


def _default_cache_dir():
    return os.environ.get("PERSIST_DIR") or ".persist"


def _open_cache(name, flag="w"):
    """A cache by path, or by function name in the default cache directory."""
    path = name
    if not os.path.exists(path) and os.sep not in name:
        path = os.path.join(_default_cache_dir(), _file_name(name))
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "No such cache (give the path of a .db file, "
                                "or see 'persist ls')", name)
    return _Store(path, flag)


def _cli_ls(options):
    directory = options.dir or _default_cache_dir()
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, "No such directory", directory)
    print("%-40s %8s %10s  %-16s  %-16s" % ("CACHE", "ENTRIES", "SIZE", "OLDEST", "NEWEST"))
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.endswith(".values"))
        for name in sorted(files):
            if not name.endswith(".db"):
                continue
            try:
                store = _Store(os.path.join(root, name), "r")
            except OSError:          # not a persist cache: not ours to list
                continue
            with contextlib.closing(store):
                (count, oldest, newest), = store._query(_SUMMARY)
                label = store.info().get("function") or name
                print("%-40s %8d %10s  %-16s  %-16s" % (label, count, _bytes(store.disk_usage()),
                                                       _when(oldest), _when(newest)))


def _cli_show(options):
    with contextlib.closing(_open_cache(options.cache, "r")) as store:
        now = time.time()
        print("%6s %10s  %s" % ("AGE", "SIZE", "ARGUMENTS (or KEY)"))
        for key, args, stored, size in store.entries():
            if args is None:              # a shelf's key, else memoize's digest
                try:
                    args = key.decode("utf-8")
                except UnicodeDecodeError:
                    args = key.hex()
            print("%6s %10s  %s" % (_age(now - stored), _bytes(size), args))


def _cli_clear(options):
    with contextlib.closing(_open_cache(options.cache)) as store:
        count = len(store)
        store.clear()
        print("removed %d entries from %s" % (count, store.path))


def _cli_prune(options):
    with contextlib.closing(_open_cache(options.cache)) as store:
        age = options.older_than
        if age is None:
            expire = store.info().get("expire", "None")
            if expire == "None":
                print("%s has no expire=; nothing has expired" % store.path)
                return 0
            age = float(expire)
        print("removed %d entries from %s" % (store.prune(time.time() - age), store.path))


def _cli_status(options):
    unfinished = 0
    for path in options.paths:
        if is_done(path, marker=options.marker):
            with io.open(os.path.join(path, options.marker), encoding="utf-8",
                         errors="replace") as file:
                print("%s: finished %s" % (path, file.read().strip()))
        else:
            unfinished += 1
            state = "not finished" if os.path.isdir(path) else "missing"
            print("%s: %s" % (path, state))
    return 1 if unfinished else 0


def _main(argv=None):
    """python persist.py COMMAND: look after caches and done_dir() stages."""
    import argparse
    _load()
    parser = argparse.ArgumentParser(prog="persist", description="Look after persist's caches "
                                     "and done_dir() stages.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    ls = commands.add_parser("ls", help="list the caches under a directory")
    ls.add_argument("dir", nargs="?", help="default: $PERSIST_DIR, else ./.persist")
    ls.set_defaults(run=_cli_ls)
    show = commands.add_parser("show", help="list a cache's entries: age, size, arguments")
    clear = commands.add_parser("clear", help="remove every entry of a cache")
    prune = commands.add_parser("prune", help="remove a cache's old entries")
    for command, run in ((show, _cli_show), (clear, _cli_clear), (prune, _cli_prune)):
        command.add_argument("cache", help="a cache file, or a function's name as in 'ls'")
        command.set_defaults(run=run)
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--expired", action="store_true", help="older than the function's "
                       "expire=")
    which.add_argument("--older-than", type=_duration, metavar="AGE",
                       help="older than AGE: 90s, 15m, 12h, 7d or 2w")
    status = commands.add_parser("status", help="say whether done_dir() stages finished; "
                                 "exit 1 if any did not")
    status.add_argument("paths", nargs="+", metavar="PATH")
    status.add_argument("--marker", default="DONE", help="the marker's name (default DONE)")
    status.set_defaults(run=_cli_status)
    options = parser.parse_args(argv)
    try:
        return options.run(options) or 0
    except BrokenPipeError:          # persist show CACHE | head
        sys.stdout = None
        return 0
    except OSError as exc:
        print("persist: error: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
