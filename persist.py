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

    rows = persist.map(featurize, ids, workers=4)  # every id tried, in 4 processes; those that
                                                   # failed are raised together, and recorded

    with persist.open("results.db") as db:    # shelve.open, safe for many processes
        db["model"] = model

    persist.atomic_write("report.json", text)  # the old content or the new, never half

    with persist.done_dir("work/split") as d:  # d / "DONE" appears only if the block ends well
        persist.atomic_write(d / "part-0.json", text)
    persist.is_done("work/split")              # True: a rerun can skip this stage

Caches hold pickles, and loading a pickle runs code: only use caches from places you trust.
"""

# == map of this file =============================================================================
# This file, in order (each section opens with a "# == title" banner; its public function first):
#   1. constants: limits, the file format and its SQL, messages
#   2. errors
#   3. platform differences, settled once
#   4. memoize - the wrapper, binding, keys, naming and salt, the cache of one function, explain
#   5. map - the failure ledger
#   6. open - the shelf, reading old shelve files
#   7. atomic_write, atomic_open - temporary files
#   8. done_dir, is_done
#   9. the store - value files, connections, the trust check, fork and exit hooks, the files store
#   10. file helpers
#   11. the command line
# How a call goes, traced (tracemap.py): "a -> b" a calls b, "a -> (b; c)" a calls b then c,
# "[x]" a C call (SQLite, hashlib, pickle, os), "double" the user's function:
#   a hit: _function_wrapper.memoized -> (_keyer.key [digest]; _FunctionCache.get ->
#       (_Store.hit -> _Connection.query [execute]; [loads]))
#   a miss: _function_wrapper.memoized -> (_keyer.key [digest]; _FunctionCache.get ->
#       _Store.hit -> _Connection.query [execute]; double; _Miss.__exit__ -> _FunctionCache.put ->
#       _Store.put -> _Connection.run -> _put_row [execute])
#   a persist.map item: map -> _Run.execute -> _Run.serial -> _Wrapper._call ->
#       (_Wrapper._key_of -> _Wrapper._keyed -> _FunctionCache.key -> _keyer.key [digest];
#       _FunctionCache.get -> _Store.hit -> _Connection.query [execute]; double; _Miss.__exit__ ->
#       _FunctionCache.put -> _Store.put -> _Connection.run -> _put_row [execute])
#   a persist.map item sent to workers: map -> _Run.execute -> _Run.parallel -> (_Run.send ->
#       (_Schedule.next -> _Run.to_send -> (_Wrapper._key_of -> _Wrapper._keyed ->
#       _FunctionCache.key -> _keyer.key [digest]; _FunctionCache.get -> _Store.hit ->
#       _Connection.query [execute]); _CtrlCHeld.__enter__; _run -> double;
#       _CtrlCHeld.__exit__); _Run.receive -> _Run.take -> _Run.store ->
#       _FunctionCache.put_many -> _FunctionCache.put -> _Store.put -> _Connection.run ->
#       _put_row [execute])
#   a shelf write: _Shelf.__setitem__ -> _Store.put -> _Connection.run -> _put_row [execute]
#       (a value in a value file, or a batch of persist.map's results: _Connection.transaction
#       -> _Connection.run -> _transaction -> ([execute]; _replace -> _fetch [execute]))
#   an atomic write: atomic_write -> _atomic_open -> (_fsync [fsync]; [replace]; _fsync_dir ->
#       _fsync [fsync])

__version__ = "0.1.0"
__all__ = [
    "memoize", "map", "open", "atomic_write", "atomic_open", "done_dir", "is_done",
    "PersistError", "PersistWarning", "Failures",
]

import _thread
import atexit
import builtins
import codecs
import collections
import collections.abc
import contextlib
import copyreg
import errno
import functools
import io
import itertools
import operator
import os
import reprlib
import sqlite3
import stat
import sys
import time
import types
import weakref

# Types, for type checkers only (mypy --strict passes). At run time TYPE_CHECKING is False:
# nothing below is imported, as typing would cost a cold start. A function's types are in a
# "# type:" comment under its def (PEP 484), which costs nothing, where annotations would be
# evaluated as each function is made (200 us at import, for all of them); the public API
# keeps annotations (as strings: from __future__ import annotations imports a module), so
# that help() and editors show them. See docs/type-checking.md.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import concurrent.futures
    import datetime
    import hashlib
    from concurrent.futures import Executor, ProcessPoolExecutor
    import pathlib
    # typing's own names only (ParamSpec, Concatenate and TypeAlias: a target of 3.10 or
    # newer, as mypy 2 checks for): persist.py names no module outside the standard library
    from typing import (IO, Any, Callable, Concatenate, ContextManager, Deque, Dict, FrozenSet,
                        Iterable, Iterator, List, Literal, MutableMapping, NamedTuple, Optional,
                        OrderedDict,
                        ParamSpec, Protocol, Sequence, Set, Tuple, TypeAlias, TypeVar, Union,
                        overload)

    class Buffer(Protocol):
        """What bytes() takes: collections.abc.Buffer, which typing has only from 3.12 on."""

        def __buffer__(self, flags: int, /) -> memoryview: ...

    _P = ParamSpec("_P")
    _Q = ParamSpec("_Q")
    _R = TypeVar("_R")
    _T = TypeVar("_T")
    _Path: TypeAlias = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
    _StrPath: TypeAlias = Union[str, "os.PathLike[str]"]
    _TextMode: TypeAlias = Literal["w", "wt", "x", "xt"]
    _BinaryMode: TypeAlias = Literal["wb", "xb"]
    _Flag: TypeAlias = Literal["r", "w", "c", "n"]
    _Func: TypeAlias = Callable[..., Any]          # a user's function, or any callable
    _Args: TypeAlias = Tuple[Any, ...]             # a call's positional arguments
    _Kwargs: TypeAlias = Dict[str, Any]            # and its keyword arguments
    _Expire: TypeAlias = Union[float, datetime.timedelta, None]    # memoize(expire=)
    _Names: TypeAlias = Union[str, Iterable[str]]                  # memoize(ignore=)
    _Progress: TypeAlias = Union[bool, Callable[..., Any], None]   # persist.map(progress=)
    _Writer: TypeAlias = Callable[[Any, "_KeyWriter"], None]   # writes a value's key encoding
    # memoize's bind(args, kwargs): what keys the call (arguments are the user's: Any)
    _Bind: TypeAlias = Callable[[_Args, _Kwargs], Any]
    _Params: TypeAlias = List[Tuple[str, int, Any]]      # (name, kind, default) of each
    # the parameters _binder() keys: (name, kind, default, digest of the default or None)
    _Kept: TypeAlias = List[Tuple[str, int, Any, Optional[bytes]]]
    # a row of Dict as _Store.get() reads it: (pickle or b'', value file, stored, seconds)
    _Row: TypeAlias = Tuple[Union[bytes, memoryview], Optional[str], float, Optional[float]]
    # a cache's store: one SQLite file, or a directory of files (see _store_kind)
    _AnyStore: TypeAlias = Union["_Store", "_FileStore"]
    # memoize(store=): a kind of store, or a mapping (an object store's) to keep one in
    _StoreOption: TypeAlias = Union[str, "MutableMapping[str, bytes]", None]
    # where a store of files keeps its records
    _Objects: TypeAlias = Union["_Directory", "_MappingObjects"]
    # what the failure ledger keeps of a call: (args, type, message, traceback, seconds, version)
    _FailureRecord: TypeAlias = Tuple[Optional[str], str, str, str, float, str,
                                      Union[bytes, str, None]]
    _Call: TypeAlias = Tuple[_Args, _Kwargs]       # (args, kwargs) of a call
    # What _run says of one item: (ok, value, seconds, traceback), always unpacked by these
    # names. ok: True, value is its result; False, value is the exception it raised; None,
    # it never started (value None: a failure stopped the run) or its result could not
    # travel back (value a _Moved). seconds: how long the call took. traceback: the
    # exception's, as text, when it goes to another process (see _run).
    # A plain tuple: outcomes travel by the thousand, and a named tuple costs a few us an
    # item to make, pickle and load, as much as the rest of the trip for a quick item.
    _Outcome: TypeAlias = Tuple[Optional[bool], Any, float, Optional[str]]

    class _Event(Protocol):       # threading's, or multiprocessing's
        def is_set(self) -> bool: ...
        def set(self) -> None: ...
        def clear(self) -> None: ...

    class _MemoizedFunction(Protocol[_P, _R]):
        """What memoize returns, to a type checker: func's own signature and result, and the
        cache's methods. At run time it is a function, or a _Wrapper for a method; both
        bind to an instance as a function does."""

        __name__: str
        __qualname__: str
        __module__: str
        __doc__: Optional[str]
        __wrapped__: Callable[_P, _R]

        def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R: ...
        def cache_info(self) -> "_CacheInfo": ...
        def cache_clear(self) -> None: ...
        def cache_delete(self, *args: _P.args, **kwargs: _P.kwargs) -> bool: ...
        def cache_prune(self, *, stale: bool = True, expired: bool = True) -> int: ...
        def cache_parameters(self) -> "Dict[str, Any]": ...
        def failures(self) -> "List[_Failure]": ...
        def explain(self, *args: _P.args, **kwargs: _P.kwargs) -> "_Explanation": ...

        @overload
        def __get__(self, instance: None, owner: Optional[type] = None
                    ) -> "_MemoizedFunction[_P, _R]": ...
        @overload
        def __get__(self: "_MemoizedFunction[Concatenate[_T, _Q], _R]", instance: _T,
                    owner: Optional[type] = None) -> "_MemoizedFunction[_Q, _R]": ...

# Imported by _load() on first use: only memoize's decoration needs them.
if TYPE_CHECKING:
    import inspect
else:
    inspect = None

# The C pickler itself, where it is (CPython): pickle.py imports re, enum and struct for its
# Python pickler, 5 ms of a one-call script's start, and the public names persist uses are
# _pickle's own (pickle.dump is _pickle.dump). PyPy has no _pickle: pickle.py there. shelve,
# which imports pickle.py, is imported by the first persist.open() (_shelf_type).
if TYPE_CHECKING:
    import pickle
    import shelve
else:
    try:
        import _pickle as pickle
    except ImportError:
        import pickle


# == constants: limits, the file format and its SQL, messages =====================================
# Numbers each layer tunes by, the SQLite layout a cache file has (_CREATE: read it first),
# every statement run on it, and the messages persist refuses a file with.

_TEXT_MODES = {"w": "w", "wt": "w", "x": "x", "xt": "x"}
_BINARY_MODES = {"wb": "w", "xb": "x"}
_MODES_ACCEPTED = "'w', 'wb', 'x' or 'xb'"
_FLAGS = {"r": "ro", "w": "rw", "c": "rw", "n": "rw"}   # SQLite open modes, once it exists
_PROTOCOL = 5                    # every CPython 3.8+ reads it
_INLINE_LIMIT = 1 << 18          # larger pickles live in value files of their own
_MANY_LIMIT = 1 << 24            # put_many() commits once its rows' pickles hold this much
_BUSY_TIMEOUT = 600.0            # seconds a writer waits for another before failing
# The waits below are short on purpose: each gives up on something it can do without. Two
# seconds outlast another process's transaction (milliseconds) many times over, and a wait
# that long goes unnoticed; each has its own name, as each may need another length.
# A signal handler's own connection (_Connection._run_aside) waits this long for another
# process's lock: the handler holds up the code it interrupted, and its write is skipped.
_HANDLER_TIMEOUT = 2.0
# _Store._restart_log() waits this long for a reader that keeps the log (or another process
# checkpointing): a write past _LOG_LIMIT must not stall, and a later one tries again.
_RESTART_TIMEOUT = 2.0
# persist.open() of a dbm.sqlite3 shelve file waits this long for another program, or a
# process looking at what the file is (_shelve_kind), to let go of it; then "in use".
_SHELVE_TIMEOUT = 2.0
# ... and for another process copying a shelve file in the same directory (its lock): then it
# goes on, and _from_shelve() finds whether that one got there first.
_CONVERT_TIMEOUT = 2.0
_LOG_LIMIT = 16 << 20            # a log larger than this is restarted (see _restart_log)
_CODE_TAG = 16                   # hex digits of each tag of an owner (see _CREATE)
_RUN = os.urandom(8).hex()       # this run, in the cache's record of the latest run's code
_FROZEN_TRIES = 100              # reads of a file its owner keeps writing, before EBUSY
_FROZEN_PAUSE = 0.005            # seconds between them: the owner is writing, give it a moment
_SWEEP_AGE = 3600.0              # without file locks (Windows), value files younger are kept
_REOPEN_AFTER = 5.0              # seconds before a memoized function tries its cache again
# The modes persist makes a cache's files and directories with, the umask applied after: the
# group's bits as the umask leaves them (a team directory under umask 002), never writable by
# every user, which the trust check refuses (under umask 000 a cache would refuse itself).
_FILE_MODE = 0o664
_DIR_MODE = 0o775
_APPLICATION_ID = 0x70727374     # "prst" in the SQLite header: this file is a persist cache
# The page size of a new cache. A commit writes the pages it changed to the log: with 16 KB
# pages (caches made before, which keep them) 16-20 KB a miss, and a miss took 1.4x as long.
_PAGE_SIZE = 4096
_FORMAT = 3                      # PRAGMA user_version: the layout made by _CREATE
_CREATE = (
    "PRAGMA page_size=%d" % _PAGE_SIZE,
    "PRAGMA auto_vacuum=INCREMENTAL",    # so that clear() and prune() can give space back
    "PRAGMA application_id=%d" % _APPLICATION_ID,
    "PRAGMA user_version=%d" % _FORMAT,
    # Dict is the table of CPython's dbm.sqlite3, with what memoize records beside each value.
    # key: a shelf's key in UTF-8, or memoize's 32-byte SHA-256 of the call's arguments.
    # value: the pickle; b'' when it is in the value file FILE.values/<file>.
    # stored: Unix time; seconds: how long the call took; version: memoize's version= (repr);
    # args: a short form of a memoized call's arguments, for people.
    # owner: for a function that carries something (see _salt), the tags of the code and of
    # the values it carried, which its keys are salted with: 'code16 salt16'; else NULL.
    # (Added to caches made before it by _Store.own(): a NULL there may be anyone's.)
    "CREATE TABLE Dict (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL, file TEXT,"
    " stored REAL NOT NULL, seconds REAL, version TEXT, args TEXT, owner TEXT) WITHOUT ROWID",
    "CREATE INDEX DictFile ON Dict (file) WHERE file IS NOT NULL",
    # Info: memoize's function, version (the latest to open it), expire and source.
    "CREATE TABLE Info (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
    # Failures: the calls of a memoized function that raised, until one succeeds.
    # call: the call's (args, kwargs) pickled, to call it again; or, as TEXT, why not
    # (_ADD_CALL adds it to the caches made before it, last as here).
    "CREATE TABLE Failures (key BLOB PRIMARY KEY NOT NULL, args TEXT, type TEXT NOT NULL,"
    " message TEXT NOT NULL, traceback TEXT NOT NULL, count INTEGER NOT NULL,"
    " first REAL NOT NULL, last REAL NOT NULL, seconds REAL, version TEXT, call, owner TEXT)"
    " WITHOUT ROWID",
)
_ADD_CALL = "ALTER TABLE Failures ADD COLUMN call"
_CALL_LIMIT = 1 << 20            # bytes of a failed call's pickle that the ledger keeps
_PRAGMAS = (                     # after journal_mode=WAL (_to_wal)
    "PRAGMA synchronous=NORMAL",    # WAL: a commit survives a crash, maybe not a power cut
    "PRAGMA checkpoint_fullfsync=ON",   # macOS: past the drive's cache
    # Up to 8 MB of pages, as used: the inner pages of a million entries' B-tree, so that a
    # random hit reads one page from the OS. 32 MB made a miss at a million entries 1.25x
    # slower (1.59x a bare table's against 1.27x), 16 MB 1.1x; the hits were the same.
    "PRAGMA cache_size=-8192",
    "PRAGMA journal_size_limit=%d" % (8 << 20),   # the log shrinks back after a checkpoint
)
# SQLite's own checkpoint (PASSIVE), which a commit runs once the log holds this many bytes
# (in pages of the file's size: _Connection._open): alone, a writer then starts the log over
# from its beginning, never past about this size, as a bare SQLite table does (its default is
# 1000 pages). A restart of ours (a TRUNCATE checkpoint, 28 ms) every 800 commits, which the
# log reached _LOG_LIMIT in, was a third of a miss's time. While other processes keep
# committing, SQLite's checkpoints cannot start the log over (a reader always uses it), and
# _Store._restart_log does, past _LOG_LIMIT.
_CHECKPOINT_AFTER = 4 << 20
_GET = "SELECT value, file, stored, seconds FROM Dict WHERE key = ?"
# a hit's: the pickle, where the row holds it, and the seconds the call took; each column more
# cost a hit 0.2 us (4 of them, 7% of a hit). NULL where a value file holds it, and anything but
# a BLOB where a program other than persist wrote the row: get()'s row is read then, and checked
# (coalesce(file, value), told apart by type, took a TEXT value for a value file's name: another
# key's result, returned for this call; a BLOB file for the pickle).
_HIT = "SELECT CASE WHEN file IS NULL THEN value END, seconds FROM Dict WHERE key = ?"
_FILE = "SELECT file FROM Dict WHERE key = ?"
_PUT = ("REPLACE INTO Dict (key, value, file, stored, seconds, version, args)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)")
_PUT_OWNED = ("REPLACE INTO Dict (key, value, file, stored, seconds, version, args, owner)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_OWNED = "(owner IS NULL OR owner = ?)"   # a NULL: stored before owners were recorded
# A result whose pickle fits in its row, stored in one statement (_Store.put, _put_row): the
# row, and the end of the key's failure records, in the statement's own transaction, committed
# as it returns. BEGIN IMMEDIATE; SELECT file; REPLACE; DELETE FROM Failures; COMMIT took a
# third longer. Each connection makes the view and its trigger, of its own (TEMP: the file's
# layout stays as it is; _Connection._open). A row that would be replaced while it names a
# value file ends the statement with nothing written (_VALUE_FILE_ABORT): the transaction
# (_replace) then stores it, and removes that file once no row names it.
_VALUE_FILE_ABORT = "persist: the row replaced names a value file"
_PUT_ROW_VIEWS = tuple(
    ("CREATE TEMP VIEW {0} (key, value, stored, seconds, version, args{1}) AS SELECT NULL,"
     " NULL, NULL, NULL, NULL, NULL{2}".format(view, columns, ", NULL" * bool(columns)),
     "CREATE TEMP TRIGGER {0}Trigger INSTEAD OF INSERT ON {0} BEGIN"
     " SELECT RAISE(ABORT, '{1}') FROM Dict WHERE key = NEW.key AND file IS NOT NULL;"
     " REPLACE INTO Dict (key, value, stored, seconds, version, args{2}) VALUES (NEW.key,"
     " NEW.value, NEW.stored, NEW.seconds, NEW.version, NEW.args{3});"
     " DELETE FROM Failures WHERE key = NEW.key; END".format(
         view, _VALUE_FILE_ABORT, columns, ", NEW.owner" * bool(columns)))
    for view, columns in (("PutRow", ""), ("PutOwnedRow", ", owner")))
_PUT_ROW = "INSERT INTO PutRow VALUES (?, ?, ?, ?, ?, ?)"
_PUT_OWNED_ROW = "INSERT INTO PutOwnedRow VALUES (?, ?, ?, ?, ?, ?, ?)"  # (Dict with owner)
_DELETE = "DELETE FROM Dict WHERE key = ?"
_DELETE_ROW = "DELETE FROM Dict WHERE key = ? AND value = ? AND file IS ? AND stored = ?"
_CONTAINS = "SELECT 1 FROM Dict WHERE key = ?"
_KEYS = "SELECT key FROM Dict"
_COUNT = "SELECT count(*) FROM Dict"
_CLEAR = "DELETE FROM Dict"
_FILES = "SELECT file FROM Dict WHERE file IS NOT NULL"
_NAMED = "SELECT file FROM Dict WHERE file IN (%s)"
_FORGET_FAILURE = "DELETE FROM Failures WHERE key = ?"
_FAILED_VERSIONS = "SELECT DISTINCT version FROM Failures WHERE version IS NOT ?"
_STALE_FAILURES = "%s FROM Failures WHERE %s"      # SELECT count(*) or DELETE; conditions
# what prune() removes, and its value files (on the partial index DictFile); conditions
_PRUNE_SIZE = "SELECT count(*), total(length(value)) FROM Dict WHERE %s"
_PRUNE_FILES = "SELECT file FROM Dict WHERE file IS NOT NULL AND (%s)"
_INFO = "SELECT name, value FROM Info"
_SET_INFO = "REPLACE INTO Info (name, value) VALUES (?, ?)"
_ENTRIES = ("SELECT key, args, stored, length(value), file, seconds, version FROM Dict"
            " ORDER BY stored")
_SUMMARY = ("SELECT count(*), min(stored), max(stored), total(seconds),"
            " (SELECT count(*) FROM Failures) FROM Dict")
_VERSIONS = "SELECT DISTINCT version FROM Dict WHERE version IS NOT ?"
_STORED = "SELECT stored, version FROM Dict WHERE key = ?"
_FAILED = "SELECT count, last, type, message FROM Failures WHERE key = ?"
_TALLY = ("SELECT (SELECT count(*) FROM Dict), (SELECT total(seconds) FROM Dict),"
          " (SELECT count(*) FROM Failures)")
_TALLY_OWNED = ("SELECT (SELECT count(*) FROM Dict WHERE {0}), (SELECT total(seconds) FROM Dict"
                " WHERE {0}), (SELECT count(*) FROM Failures WHERE {0})".format(_OWNED))
_OWNERS = "SELECT DISTINCT owner FROM Dict WHERE owner IS NOT NULL"
_FAILED_BEFORE = "SELECT count, first FROM Failures WHERE key = ?"
_STORED_SINCE = "SELECT 1 FROM Dict WHERE key = ? AND stored >= ? AND stored < ?"
_RECORD_FAILURE = ("REPLACE INTO Failures (key, args, type, message, traceback, count, first,"
                   " last, seconds, version, call) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_OWN_FAILURE = "UPDATE Failures SET owner = ? WHERE key = ?"
# 'persist merge' (_Store.raw_entries, put_raw, failure_spans, put_failure)
_RAW = "SELECT value, file, stored, seconds, version, args, %s FROM Dict WHERE key = ?"
_STORED_FILE = "SELECT stored, file FROM Dict WHERE key = ?"
# a failure record older than a result (its call began before the result was stored) is void
_FORGET_FAILURE_BEFORE = "DELETE FROM Failures WHERE key = ? AND last - coalesce(seconds, 0) <= ?"
_FAILURE_SPANS = ("SELECT key, args, type, message, traceback, count, first, last, seconds,"
                  " version, %s, %s FROM Failures")     # call and owner, or NULL where none
_SPAN_FIELDS = ("args", "type", "message", "traceback", "count", "first", "last", "seconds",
                "version", "call", "owner")
_SPAN_UPDATE = "UPDATE Failures SET count = ?, first = ?, last = ? WHERE key = ?"
_FAILURES = ("SELECT args, type, message, count, first, last, seconds, version, traceback,"
             " %s FROM Failures ORDER BY last")      # call, or NULL in a cache without it
class _Missing:
    """The type of _MISSING, which pickles by name: a memoized function that travels by value
    (see _FunctionCache.__reduce__) compares with the one of the process it arrives in."""

    __slots__ = ()

    def __reduce__(self):
        # type: () -> str
        return "_MISSING"


_MISSING = _Missing()            # "no such entry", where None is a value

_NOT_A_CACHE = ("not a persist cache ({why}); persist leaves it as it is: give persist "
                "another file name (cache_dir=, name= or the path you open)")
_NEWER = ("written by a newer persist (format {found}; this persist.py reads format {ours}); "
          "use a newer persist.py")
_OLDER = ("written by an older persist (format {found}; this persist.py reads format {ours}), "
          "whose keys this one does not compute: move the file away (its results are computed "
          "again), or keep using the persist.py that wrote it")
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
_PLANTED_COMPANION = ("{what}, which SQLite reads as part of the cache, and it is not yours "
                      "(user {uid} made it, in a directory every user may write): its "
                      "content would become the cache's, and loading a pickle that someone "
                      "planted runs their code; remove it (its owner or root can), or keep the "
                      "cache in a directory only you can write")
_HARD_LINKED = ("a file with {links} names (hard links), in a directory every user may write: "
                "none of a cache's own files has a second name, and a hard link takes its "
                "file's owner, so another user may have linked a file of yours here for SQLite "
                "to read as part of the cache; remove this name, or keep the cache in a "
                "directory only you can write")
_CORRUPT_ROW = ("a corrupt entry: its row names the value file {name!r}, which is not a name "
                "persist gives one ({digits} hex digits, in {values}/): a row crafted or edited "
                "so could make persist read a pickle from elsewhere, or delete a file outside "
                "the cache, so persist does neither, and changes nothing; move the cache away "
                "(and its {values}), and let persist make a new one")
_BUSY_DIR = ("being filled by another done_dir() right now (in this or another "
             "process); let that one finish, or give each stage its own directory")


# == errors =======================================================================================
# PersistError (an OSError with the path) for a file persist will not use; PersistWarning
# when it could not do what it does in the background (the result is still returned);
# Failures for persist.map's items that failed. _sqlite_error (with the connections) is the
# one place that turns sqlite3's errors into persist's.

class PersistError(OSError):
    """A path persist was given is not safe to use: not a cache, corrupt, planted, or busy.

    An OSError: errno, strerror and filename as for any, and str() is "filename: strerror".
    reason says which case it is, as errno does for an OSError, in a short string that stays
    the same from one version of persist to the next (the message may be reworded): compare it
    with the names below (exc.reason == PersistError.NEWER_FORMAT). Every PersistError that
    persist raises has one; one made elsewhere may have None.

    A file that is not a cache of this persist.py (it leaves each as it is):
        NEWER_FORMAT    made by a newer persist.py: use that one
        OLDER_FORMAT    made by an older persist.py, whose keys this one does not compute
        EMPTY           an empty file
        FOREIGN_SQLITE  an SQLite database of another program
        NOT_A_CACHE     not a database at all (or a cache damaged past recognizing)
        CORRUPT         a persist cache that SQLite finds damaged
        CORRUPT_ROW     an entry whose row names a file that is no value file of persist's
        DAMAGED_VALUE   the value file of an entry is cut short or damaged
        MISSING_VALUE   the value file of an entry is missing
        NOT_A_FILE      a FIFO, device or socket where a regular file belongs
        SHELVE          a shelve file (dbm) where persist wanted one of its stores
        SHELVE_UNSUPPORTED  a shelve file of a dbm module this Python does not have
    A path others could plant pickles in (loading a pickle runs its author's code): a link
    (errno ELOOP), or refused by the trust check (errno EPERM, which these alone have):
        SYMLINK         a symbolic link where persist keeps a file of its own
        UNSAFE          writable by every user, or another user's in a directory every user
                        may write (/tmp)
        NOT_OURS        a directory on the way owned by another user (not root)
        SWAPPABLE       a directory on the way that every user may write, and not sticky
        PLANTED         a file SQLite reads with the cache (its log), made by another user
        HARD_LINKED     such a file, with a second name (hard link), in a shared directory
    Something in use, or a name that does not say which:
        BUSY            in use by another program or done_dir() (errno EBUSY)
        NAME_CLASH      the cache holds another function's results: two projects share it
        AMBIGUOUS       a function's name that more than one cache under a directory has
        NO_HOME         $PERSIST_DIR starts with ~, and there is no such home directory
        SHARED_FILESYSTEM  the SQLite store asked for on a filesystem other machines share
    """

    NEWER_FORMAT = "newer-format"
    OLDER_FORMAT = "older-format"
    EMPTY = "empty"
    FOREIGN_SQLITE = "foreign-sqlite"
    NOT_A_CACHE = "not-a-cache"
    CORRUPT = "corrupt"
    CORRUPT_ROW = "corrupt-row"
    DAMAGED_VALUE = "damaged-value"
    MISSING_VALUE = "missing-value"
    NOT_A_FILE = "not-a-file"
    SHELVE = "shelve"
    SHELVE_UNSUPPORTED = "shelve-unsupported"
    SYMLINK = "symlink"
    UNSAFE = "unsafe"
    NOT_OURS = "not-ours"
    SWAPPABLE = "swappable"
    PLANTED = "planted"
    HARD_LINKED = "hard-linked"
    BUSY = "busy"
    NAME_CLASH = "name-clash"
    AMBIGUOUS = "ambiguous"
    NO_HOME = "no-home"
    SHARED_FILESYSTEM = "shared-filesystem"

    def __init__(self, *args, reason=None):
        # type: (*Any, Optional[str]) -> None
        super().__init__(*args)
        # An attribute, not an argument: args stay as OSError's (errno, strerror), and a
        # pickle (persist.map sends a worker's errors back) carries it with the instance's
        # other attributes, as it carries filename.
        self.reason = reason

    def __str__(self):
        # type: () -> str
        if self.filename is None or self.strerror is None:
            return super().__str__()
        return "%s: %s" % (os.fsdecode(self.filename), self.strerror)


# The trust check's refusals (errno EPERM): see _untrusted()
_UNTRUSTED = frozenset((PersistError.UNSAFE, PersistError.NOT_OURS, PersistError.SWAPPABLE,
                        PersistError.PLANTED, PersistError.HARD_LINKED))


class PersistWarning(UserWarning):
    """persist could not do what it does in the background; your result is still returned."""


class Failures(Exception):
    """persist.map() tried every item, and some failed.

    failures: (item, exception) pairs, in the order of the input. results: one entry per
    input item, in order: its result, or the exception where it failed. With shard=, both
    hold the items of this task's share alone.
    """

    def __init__(self, message, failures=(), results=()):
        # type: (str, Iterable[Tuple[Any, BaseException]], Iterable[Any]) -> None
        super().__init__(message)
        self.failures = list(failures)
        self.results = list(results)


# == platform differences, settled once ===========================================================
# Tested for at import (hasattr(os, ...), os.name), never in the functions that use them.

_O_TEMP = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
           | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
           | getattr(os, "O_NOINHERIT", 0))
_CHECK_WORLD_WRITABLE = os.name == "posix"   # the mode bits mean the same everywhere there
_O_HOLD = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)   # see
           | getattr(os, "O_CLOEXEC", 0))                       # _check_companions
_CAN_CHOWN = hasattr(os, "fchown")            # POSIX: a replaced file's owner can be kept
_CHMOD_FD = os.chmod in os.supports_fd         # POSIX: fchmod()
_CAN_FSYNC_DIR = hasattr(os, "O_DIRECTORY")   # POSIX: a directory can be opened and fsynced
_SCANDIR_FD = os.scandir in os.supports_fd and os.open in os.supports_dir_fd   # POSIX
_O_SUBDIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
# done_dir() opens each file to fsync it: never through a link, never waiting on a FIFO.
# Windows flushes only a handle open for writing.
_O_SYNC_FILE = ((os.O_RDWR if os.name == "nt" else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0)
                | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
# PyPy's interpreter may turn a RecursionError into a TypeError at the stack's end: _too_deep
_PYPY = sys.implementation.name == "pypy"
_VANISHED = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}   # gone, or swapped for a file or link
_sync_all = getattr(os, "sync", None)         # POSIX: flush every filesystem at once
_SYNC_THREADS = 8                             # done_dir's fsyncs at once: see _sync_files
# Linux writes a file's dirty pages back when told they are not needed: see _start_writeback
_START_WRITEBACK = (getattr(os, "POSIX_FADV_DONTNEED", None)
                    if sys.platform.startswith("linux") else None)
try:
    import fcntl as _fcntl                    # POSIX: done_dir() locks its directory
except ImportError:                           # Windows: concurrent done_dir() is not detected
    _fcntl = None     # type: ignore[assignment]  # each use is behind a test of _fcntl
_FULLFSYNC = getattr(_fcntl, "F_FULLFSYNC", None)   # macOS: fsync() stops at the drive's cache
_DIRS_HELD = set()  # type: Set[Tuple[int, str]]   # (pid, directory) of done_dir() locks held


def _link_no_clobber(src, dst):
    # type: (str, str) -> None
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
_RENAME_OPEN_FILES = os.name != "nt"     # Windows renames and removes no file that is open

# SHA-256 of a short input (the key of a call of a few numbers and short strs) by CPython's own
# C code, as fast there as OpenSSL's; hashlib imports OpenSSL's (_hashlib: 2.3 ms of a one-call
# script's start) and blake2: _sha256() imports it for the first long input (a key past
# _SHORT_HASH bytes, see _KeyWriter; a closure's salt, a code tag). PyPy's _sha256 is Python
# code, and a CPython built without its own hashes has none: hashlib's there.
if TYPE_CHECKING:
    from hashlib import sha256 as _short_sha256
else:
    try:
        from _sha2 import sha256 as _short_sha256       # 3.12 on
    except ImportError:
        try:
            from _sha256 import sha256 as _short_sha256     # before
        except ImportError:
            from hashlib import sha256 as _short_sha256
    if not isinstance(_short_sha256, types.BuiltinFunctionType):
        from hashlib import sha256 as _short_sha256


# == memoize ======================================================================================
# @memoize wraps a function in two parts: a key path and a cache. Each call is bound to the
# parameters (binding), the values are encoded into a SHA-256 (keys) salted with what the
# function carries (naming and salt); the key is looked up in the function's own store,
# .persist/module.qualname.db beside the code (the cache of one function). A miss runs the
# function outside any lock and stores the result before it returns; a call that raised is
# recorded in the cache's failure ledger (see map).

if TYPE_CHECKING:     # bare, @memoize; or with options, @memoize(version=2)
    @overload
    def memoize(func: Callable[_P, _R], *, cache_dir: Optional[_StrPath] = None,
                name: Optional[str] = None, version: object = None,
                expire: Union[float, datetime.timedelta, None] = None,
                ignore: Union[str, Iterable[str]] = (), key: Optional[Callable[..., Any]] = None,
                strict: bool = False, store: Union[str, MutableMapping[str, bytes], None] = None
                ) -> _MemoizedFunction[_P, _R]: ...
    @overload
    def memoize(func: None = None, *, cache_dir: Optional[_StrPath] = None,
                name: Optional[str] = None, version: object = None,
                expire: Union[float, datetime.timedelta, None] = None,
                ignore: Union[str, Iterable[str]] = (), key: Optional[Callable[..., Any]] = None,
                strict: bool = False, store: Union[str, MutableMapping[str, bytes], None] = None
                ) -> Callable[[Callable[_P, _R]], _MemoizedFunction[_P, _R]]: ...


def memoize(func: "Optional[Callable[..., Any]]" = None, *,
            cache_dir: "Optional[_StrPath]" = None, name: "Optional[str]" = None,
            version: object = None, expire: "Union[float, datetime.timedelta, None]" = None,
            ignore: "Union[str, Iterable[str]]" = (),
            key: "Optional[Callable[..., Any]]" = None, strict: bool = False,
            store: "Union[str, MutableMapping[str, bytes], None]" = None) -> "Any":
    """Keep each result of func on disk, so that a rerun computes only what is missing.

    Use it bare, @memoize, or with options, @memoize(version=2). Each result is committed
    before the call returns: a crash, even kill -9, loses nothing that was returned. Many
    threads and processes may share one cache. Exceptions are never cached; a call that
    raised is recorded, until it succeeds, in the cache's failure ledger (see failures()).

    cache_dir: where the cache lives; else $PERSIST_DIR; else .persist beside the file that
        defines func (or in the current directory, for the REPL and notebooks).
    name: the cache's name; else module.qualname of func (a lambda, or a function with no
        source file, adds a tag of its code). A name is your word that every function
        memoized under it computes the same: what they carry is then not checked.
    version: change it when results computed before are wrong. Results of other versions are
        misses, kept on disk until cache_prune() or 'persist prune --stale' removes them, so
        switching back reuses them. Editing the function keeps every result, by design.
    expire: seconds (or a timedelta) after which a result is computed again.
    ignore: names of parameters left out of the key, such as 'verbose'; ignoring 'self'
        shares results between all instances.
    key: a callable taking func's arguments and returning what to key on instead.
    strict: raise when the cache cannot be used (read-only, disk full) instead of warning once
        and returning results unstored; PERSIST_STRICT=1 sets it for every function.
    store: 'sqlite' (one SQLite file: the fastest) or 'files' (a file a result: for
        filesystems several machines share, NFS, Lustre, GPFS, sshfs, where SQLite's locks do
        not hold); else $PERSIST_STORE; else 'files' on such a filesystem and 'sqlite'
        elsewhere. 'sqlite' is refused on a shared filesystem; 'sqlite-one-machine' takes it
        there, on your word that one machine alone uses the cache.

    Equal arguments give the same key in every process: a parameter left at its default is
    left out (adding one with a default keeps old results), dict and set order do not
    matter, types do (1 and 1.0 differ). What func carries besides its arguments (closure
    cells, a partial's arguments, a bound method's self, a callable object's state) is part
    of the key; if it cannot be, memoize raises TypeError. The wrapper has cache_info(),
    failures(), cache_clear(), cache_delete(*args, **kwargs), cache_prune() and
    cache_parameters() (the options, as a dict), and binds in a class as a function does
    (put it above @classmethod). Caches are pickles: trust them as code.
    """
    options = (cache_dir, name, version, expire, ignore, key, strict, store)
    if func is None:
        return lambda f: memoize(f, cache_dir=cache_dir, name=name, version=version,
                                 expire=expire, ignore=ignore, key=key, strict=strict,
                                 store=store)
    if isinstance(func, classmethod):
        return _make_classmethod_wrapper(func.__func__, options)
    if isinstance(func, staticmethod):
        kind = type(func).__name__
        raise TypeError("memoize cannot decorate the %s %s: put @%s above @memoize, so "
                        "that memoize sees the function itself"
                        % (kind, getattr(func.__func__, "__qualname__", func.__func__), kind))
    if not callable(func):
        raise TypeError("Expected a function to decorate, not %r: use @memoize or "
                        "@memoize(option=...)" % (func,))
    return _make_wrapper(func, *options)


# == memoize: the wrapper -------------------------------------------------------------------------
# _make_wrapper() builds the key path and the _FunctionCache once; the wrapper of a plain
# function is a closure (two stack frames a level), of a method a _Wrapper, a descriptor that
# binds. Every wrapper keys a call with the cache's key path and runs a miss through _Miss:
# call the function outside any lock, store its result, or record its failure.

def _make_wrapper(func, cache_dir, name, version, expire, ignore, key, strict, store):
    # type: (_Func, Optional[_StrPath], Optional[str], object, _Expire, _Names, Optional[_Func], bool, _StoreOption) -> _Func
    """memoize's work, once its options are checked: func through a cache of its own. A
    method gets a _Wrapper, which binds to its instance; anything else, a function
    (_function_wrapper)."""
    label = getattr(_innermost(func), "__qualname__", None) or type(func).__qualname__
    flags = _code_flags(func)
    if flags & (_CO_GENERATOR | _CO_ASYNC_GENERATOR):
        raise TypeError("memoize cannot cache %s(): it is a generator function, and a "
                        "generator is consumed as it runs; memoize a function that returns "
                        "a list instead" % label)
    if isinstance(ignore, str):
        ignore = (ignore,)
    ignore = frozenset(ignore)
    if key is not None and not callable(key):
        raise TypeError("Expected memoize(key=...) to be a callable, not %r" % (key,))
    if isinstance(store, str) and store not in _STORE_KINDS:
        raise ValueError("memoize(store=%r): persist has no such store; use 'files', 'sqlite' "
                         "or 'sqlite-one-machine', a mapping of str to bytes (an object "
                         "store's: fsspec.get_mapper('s3://bucket/cache')), or leave it out to "
                         "choose by where the cache is" % (store,))
    if store is not None and not isinstance(store, (str, collections.abc.MutableMapping)):
        raise TypeError("memoize(store=...) takes 'files', 'sqlite' or 'sqlite-one-machine', "
                        "or a MutableMapping of str to bytes (fsspec.get_mapper(url)), not %s"
                        % type(store).__name__)
    if cache_dir is not None and isinstance(store, collections.abc.MutableMapping):
        # the cache is in the mapping: a cache_dir= beside it was ignored, without a word
        raise ValueError("memoize(cache_dir=%r, store=<a mapping>): a mapping's cache is in "
                         "the mapping, so cache_dir= would be ignored; pass one of them (a "
                         "folder of the mapping: fsspec.get_mapper('s3://bucket/cache/DIR'))"
                         % (os.fspath(cache_dir),))
    cache = _FunctionCache(func, cache_dir, name, version, expire, ignore, key, strict, label,
                           store)
    wrapper = object.__new__(_Wrapper)
    wrapper._cache, wrapper._self = cache, None
    coroutine = bool(flags & _CO_COROUTINE)
    if _in_class_body(func) and not coroutine:
        functools.update_wrapper(wrapper, func)     # a method: it binds to its instance
        return wrapper
    return _function_wrapper(wrapper, coroutine)


_CACHE_METHODS = ("cache_info", "cache_clear", "cache_parameters", "cache_delete",
                  "cache_prune", "explain", "failures")


def _function_wrapper(wrapper, coroutine):
    # type: (_Wrapper, bool) -> _Func
    """A function that calls through wrapper's cache, as wrapper's __call__ does, with its
    cache methods: what memoize returns for anything but a method.

    A function, not wrapper itself: each level of a recursion then takes two frames of the
    stack, the function's and func's, where an object's __call__ would take three before
    Python 3.12 (the limit counts the C call between them too). The plain one keys a call
    as cache.key() does, inline: a call less costs a hit 1 to 3% less (measured against
    key(), side by side, on CPython 3.8 and 3.13), and this is the common case.

    Its closure holds the cache, not the cache's bind and key_from: a function of __main__
    travels by value (cloudpickle), and the cache then goes as a cache with no store that
    keys nothing (_UnattachedCache), where those functions would go as they are.
    """
    cache = wrapper._cache
    func, key_of, get = cache.func, cache.key, cache.get
    if coroutine:
        async def memoized(*args, **kwargs):
            # type: (*Any, **Any) -> Any
            key = key_of(args, kwargs)
            result, _ = get(key)
            if result is _MISSING:
                with _Miss(cache, key, args, kwargs) as miss:
                    result = miss.result = await func(*args, **kwargs)
            return result
    else:   # (ignore[misc]: one variant returns a coroutine; memoize says what either is)
        def memoized(*args, **kwargs):  # type: ignore[misc]
            # type: (*Any, **Any) -> Any
            material = cache.bind(args, kwargs)    # cache.key(args, kwargs), inline
            try:
                key = cache.key_from(material)
            except Exception as exc:
                raise _unkeyable(func, args, kwargs, exc) from None
            result, _ = get(key)
            if result is _MISSING:
                with _Miss(cache, key, args, kwargs) as miss:
                    result = miss.result = func(*args, **kwargs)
            return result

    functools.update_wrapper(memoized, func)
    for name in _CACHE_METHODS:
        setattr(memoized, name, getattr(wrapper, name))
    _WRAPPERS[memoized] = wrapper        # persist.map calls through it, to count hits
    return memoized


class _Miss:
    """The one miss path: a call that missed, while its function runs.

        with _Miss(cache, key, args, kwargs) as miss:
            result = miss.result = func(*args, **kwargs)

    stores the result (put()), or records the call's exception in the failure ledger
    (fail()) and lets it through. The function
    runs in the wrapper's own frame, not in a helper's: a memoized recursion then takes two
    frames a level (see _function_wrapper), and the async wrapper awaits it there.
    """

    __slots__ = ("cache", "key", "call", "result", "start")

    def __init__(self, cache, key, args, kwargs):
        # type: (_FunctionCache, bytes, _Args, _Kwargs) -> None
        self.cache, self.key, self.call = cache, key, (args, kwargs)
        self.result: "Any" = None
        self.start = time.perf_counter()     # the with statement's next step calls func

    def __enter__(self):
        # type: () -> _Miss
        return self

    def __exit__(self, kind, exc, traceback):
        # type: (Optional[type], Optional[BaseException], object) -> None
        # (a call deep in a recursion: put() goes deeper than get() did (a transaction),
        # so within a few frames of the limit a result may not be stored, which put()
        # counts in unstored; it is returned all the same. What fails inside, they handle)
        seconds = time.perf_counter() - self.start
        if kind is None:
            self.cache.put(self.key, self.result, self.call, seconds)
        elif isinstance(exc, Exception):     # not a KeyboardInterrupt, nor SystemExit
            self.cache.fail(self.key, self.call, exc, seconds)


def _make_classmethod_wrapper(func, options):
    # type: (_Func, Tuple[Any, ...]) -> Any
    """memoize(classmethod(func)): a _ClassmethodWrapper, which binds to the class itself,
    where classmethod above memoize hides the class from cache_delete() and explain() (on
    Python 3.8 and from 3.13 on, classmethod does not ask memoize's __get__ to bind)."""
    wrapper = _make_wrapper(func, *options)
    if not isinstance(wrapper, _Wrapper):    # an async def, or not in a class body
        return classmethod(wrapper)
    bound = object.__new__(_ClassmethodWrapper)
    bound._cache, bound._self = wrapper._cache, None
    bound.__dict__ = wrapper.__dict__
    return bound


def _in_class_body(func):
    # type: (_Func) -> bool
    """Whether func was defined in a class body: then memoize's wrapper must bind to an
    instance as func would, and a descriptor is the wrapper."""
    parts = getattr(func, "__qualname__", "").split(".")
    return isinstance(func, types.FunctionType) and len(parts) > 1 and parts[-2] != "<locals>"


def _code_flags(func):
    # type: (_Func) -> int
    """The flags of func's code, through partials and bound methods, as inspect reads them
    for isgeneratorfunction() and the like (without importing it)."""
    while True:
        if isinstance(func, functools.partial):
            func = func.func
        elif isinstance(func, types.MethodType):
            func = func.__func__
        else:
            break
    return func.__code__.co_flags if isinstance(func, types.FunctionType) else 0


_CO_GENERATOR, _CO_COROUTINE, _CO_ASYNC_GENERATOR = 0x20, 0x80, 0x200


def _seconds(expire):
    # type: (_Expire) -> Optional[float]
    if expire is None:
        return None
    seconds = expire.total_seconds() if hasattr(expire, "total_seconds") else expire
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise TypeError("Expected memoize(expire=...) to be a positive number of seconds or "
                        "a timedelta, not %r" % (expire,))
    return float(seconds)


def _with_state(bind, live, label):
    # type: (_Bind, Tuple[object, ...], str) -> _Bind
    """bind, whose key material also holds the digest of live (a bound method's self, a
    callable object, a partial's arguments) as they are at the call: model.fit() changes
    what model.predict returns."""
    def bind_with_state(args, kwargs):
        # type: (_Args, _Kwargs) -> Any
        material = bind(args, kwargs)        # a wrong call raises first, as it would
        try:
            state = _digest(live)
        except RecursionError:
            raise
        except Exception as exc:
            raise TypeError(
                "memoize cannot key %s() now: what it holds besides its arguments (a bound "
                "method's self, a callable object's state or a partial's arguments) could be "
                "keyed when memoize ran, but not now (%s: %s). Pass memoize(key=...) or "
                "memoize(name=...)" % (label, type(exc).__name__, exc)) from None
        return (state, material)
    return bind_with_state


_WRAPPERS: "weakref.WeakKeyDictionary[_Func, _Wrapper]" = \
    weakref.WeakKeyDictionary()   # memoize's function wrappers: their _Wrapper


class _Wrapper:
    """func through its cache: what memoize returns for a method, and behind the function it
    returns for anything else (whose cache_info(), cache_clear() and the rest are its own).

    It binds as a function does, so that instance.method(x) and
    instance.method.cache_delete(x) both pass the instance. It pickles by reference, as a
    function does, so multiprocessing can send it to workers.
    """

    __slots__ = ("_cache", "_self", "__dict__", "__weakref__")
    _cache: "_FunctionCache"
    _self: "Any"                     # the instance (or class) bound to, or None
    __name__: str
    __qualname__: str

    def __call__(self, *args, **kwargs):
        # type: (*Any, **Any) -> Any
        cache, bound = self._cache, self._self
        if bound is not None:
            args = (bound,) + args
        # the one key path (a method's hit pays a call for it, 2-3% on 3.8: only the plain
        # function's wrapper, the common case, keys inline)
        key = cache.key(args, kwargs)
        result, _ = cache.get(key)
        if result is _MISSING:
            with _Miss(cache, key, args, kwargs) as miss:
                result = miss.result = cache.func(*args, **kwargs)
        return result

    def _call(self, args, kwargs, key=None):
        # type: (_Args, _Kwargs, Optional[bytes]) -> Tuple[Any, Optional[float]]
        """(result, None when it was computed, else the seconds its stored call took): a call
        for persist.map, which counts; key: the call's, where persist.map has it already."""
        cache = self._cache
        if key is None:
            key = self._key_of(args, kwargs)
        if self._self is not None:
            args = (self._self,) + args
        result, saved = cache.get(key)
        if result is not _MISSING:
            return result, saved
        with _Miss(cache, key, args, kwargs) as miss:
            result = miss.result = cache.func(*args, **kwargs)
        return result, None

    def __get__(self, instance, owner=None):
        # type: (object, Optional[type]) -> _Wrapper
        if instance is None or self._self is not None:
            return self
        bound = object.__new__(_Wrapper)     # (not a helper's call: one at each method call)
        bound._cache, bound._self = self._cache, instance
        bound.__dict__ = self.__dict__       # __name__, __doc__ and the rest, shared
        return bound

    @property
    def __wrapped__(self):
        # type: () -> _Func
        func = self._cache.func
        return func if self._self is None else types.MethodType(func, self._self)

    @__wrapped__.setter
    def __wrapped__(self, func):             # functools.update_wrapper sets it
        # type: (_Func) -> None
        pass                                 # it is the cache's func

    def __reduce__(self):
        # type: () -> Union[str, _Args]
        """By name where another process can import it; else by value, as a wrapper with no
        cache (see _FunctionCache.__reduce__). A wrapper of __main__ or of a function's
        locals travels by value only with picklers that send such functions by value
        (cloudpickle: Dask, joblib's loky, Ray), in the class or function it belongs to."""
        if self._self is not None:
            return getattr, (self._self, self.__name__)
        qualname: "Optional[str]" = self.__dict__.get("__qualname__")
        # (__main__ by name for pickle and multiprocessing: a spawned worker imports the
        # script again, and finds it there, as it did before it could travel by value)
        if qualname is not None and "<locals>" not in qualname and (
                self.__dict__.get("__module__") != "__main__" or not _pickling_by_value()):
            return qualname                  # a global name: pickle finds it and checks it
        _BY_VALUE[id(self)] = self
        return _unattached_wrapper, (type(self), self._cache, self.__dict__, (_RUN, id(self)))

    # A copy is the wrapper itself, as a function's is (the same cache), not one by value
    # with no cache; a bound one's, as a bound method's, is bound to a copy of its instance.
    def __copy__(self):
        # type: () -> _Wrapper
        return self if self._self is None else getattr(self._self, self.__name__)

    def __deepcopy__(self, memo):
        # type: (Dict[int, Any]) -> _Wrapper
        if self._self is None:
            return self
        import copy
        return getattr(copy.deepcopy(self._self, memo), self.__name__)  # type: ignore[no-any-return]

    def __repr__(self):
        # type: () -> str
        name = getattr(self, "__qualname__", None) or repr(self._cache.func)
        if self._self is not None:
            return "<bound memoized %s of %r>" % (name, self._self)
        return "<memoized %s>" % name

    def _key_of(self, args, kwargs):
        # type: (_Args, _Kwargs) -> bytes
        """The key of a call with these arguments, for cache_delete() and persist.map."""
        return self._keyed(args, kwargs)[1]

    def _keyed(self, args, kwargs):
        # type: (_Args, _Kwargs) -> Tuple[Any, bytes]
        """(what bind() makes of the call, its key) for cache_delete(), explain() and
        persist.map, which a classmethod above memoize reaches without the class on Python
        3.8 and from 3.13 on: a call that does not bind says so."""
        cache = self._cache
        if self._self is not None:
            args = (self._self,) + args
        try:
            material = cache.bind(args, kwargs)
        except TypeError:
            if self._self is None and _under_classmethod(self):
                name = self.__qualname__
                raise TypeError("%s is a classmethod above memoize, which does not pass the "
                                "class to %s.cache_delete() or explain() on this Python: pass "
                                "it first (%s.cache_delete(%s, ...)), or put @memoize above "
                                "@classmethod, which passes it on every Python"
                                % (name, name, name, name.rpartition(".")[0])) from None
            raise
        return material, cache.key(args, kwargs, material)

    def explain(self, *args, **kwargs):
        # type: (*Any, **Any) -> _Explanation
        """Say whether a call with these arguments would be a hit, or why it would miss,
        without calling the function. A hit is loaded, to be sure that it can be."""
        material, key = self._keyed(args, kwargs)    # a wrong call raises, as the call would
        return _explain(self._cache, key, material)

    def cache_info(self):
        # type: () -> _CacheInfo
        """hits and misses in this process; entries and path of the cache on disk; unstored:
        results this process could not store; failures: calls on record as failed (see
        failures()); seconds: how long the stored results took to compute, in all; saved: how
        long the results this process reused took to compute."""
        cache = self._cache
        store = cache.open(create=False)
        entries, seconds, failures = (0, 0.0, 0) if store is None else store.tally(cache.owner)
        return _CacheInfo(cache.hits, cache.misses, entries, cache.path, cache.unstored,
                          failures, seconds, cache.saved)

    def failures(self):
        # type: () -> List[_Failure]
        """The calls that raised and have not succeeded since, the latest failure last: named
        tuples of args (short form), type and message of the exception, count (of failures),
        first and last (Unix times), seconds (the last call's), version, traceback, call (the
        call's args and kwargs, to make it again: f(*call.args, **call.kwargs)) and, where
        call is None, call_error (why: arguments that do not pickle, or are too large)."""
        store = self._cache.open(create=False)
        return [] if store is None else [_Failure(*row[:-1] + _failed_call(row[-1]))
                                         for row in store.failures(self._cache.owner)]

    def cache_parameters(self):
        # type: () -> Dict[str, Any]
        """The options memoize was given, as a new dict (lru_cache's has maxsize and typed):
        memoize(**f.cache_parameters()) memoizes another function the same way."""
        return dict(self._cache.parameters)

    def cache_clear(self):
        # type: () -> None
        """Remove every stored result of this function, and its failure records; of this
        one alone, where one cache holds several (make(2) and make(3) of one factory)."""
        cache = self._cache
        store = cache.open(create=False)
        if store is not None:
            store.clear(cache.owner)
        cache.hits = cache.misses = 0
        cache.saved = 0.0
        cache.failed_versions = None

    def cache_delete(self, *args, **kwargs):
        # type: (*Any, **Any) -> bool
        """Remove the result stored for these arguments; return whether there was one."""
        key = self._key_of(args, kwargs)
        store = self._cache.open(create=False)
        return store is not None and store.delete(key)

    def cache_prune(self, *, stale=True, expired=True):
        # type: (_Wrapper, bool, bool) -> int
        """Remove results of other version=s and of other code of the nested helpers it
        calls (stale), and results older than expire=; return how many went."""
        cache = self._cache
        store = cache.open(create=False)
        if store is None or not (stale or cache.expire is not None and expired):
            return 0
        before = after = None
        if expired and cache.expire is not None:     # as _expired(): too far either way
            now = time.time()
            before, after = now - cache.expire, now + cache.expire
        codes = None
        if stale:
            cache.failed_versions = None     # they went with their results
            if cache.owner is not None:      # this run's code, and this function's
                codes = (store.stale_codes() or []) + [cache.owner[:_CODE_TAG]]
        return store.prune(before, cache.version if stale else None, after=after, codes=codes,
                           owner=cache.owner)[0]


# A bound memoized method (model.predict) passed as an argument is keyed by its type's name
# (_write_reduced): _Wrapper keys under its name before issue 21, so that keys stay the same.
_KEYED_AS = {_Wrapper: "_Memoized"}     # type: Dict[type, str]


class _ClassmethodWrapper(_Wrapper):
    """What memoize gives for a classmethod: C.f and C().f bind to C (a subclass's to the
    subclass), so that C.f.cache_delete(x) passes C, as C.f(x) does, on every Python."""

    __slots__ = ()

    def __get__(self, instance, owner=None):
        # type: (object, Optional[type]) -> _Wrapper
        if self._self is not None:
            return self
        bound = object.__new__(_Wrapper)
        bound._cache = self._cache
        bound._self = owner if owner is not None else type(instance)
        bound.__dict__ = self.__dict__
        return bound


def _under_classmethod(wrapper):
    # type: (_Wrapper) -> bool
    """Whether wrapper is the function of a classmethod in the class that defines it."""
    owner = sys.modules.get(getattr(wrapper, "__module__", ""))  # type: object
    *path, name = getattr(wrapper, "__qualname__", "").split(".")
    for part in path:
        owner = getattr(owner, part, None)
    held = vars(owner).get(name) if isinstance(owner, type) else None
    return isinstance(held, classmethod) and held.__func__ is wrapper


def _pickling_by_value():
    # type: () -> bool
    """Whether the pickler that called _Wrapper.__reduce__ sends the functions of __main__
    by value: one that overrides reducer_override does (cloudpickle: Dask, joblib's loky,
    Ray); pickle and multiprocessing's pickler send them by name. A pickler is an object,
    not an argument of __reduce__: it is found as the self of a frame up the stack (the
    Python pickler's save(), cloudpickle's dump(); the C pickler has no frame of its own)."""
    # the C pickler's class, and the Python one's where pickle.py is imported: it is only
    # there to be used then (persist imports _pickle alone)
    picklers = (pickle.Pickler, getattr(sys.modules.get("pickle"), "_Pickler", pickle.Pickler))
    frame: "Optional[types.FrameType]" = sys._getframe(2)
    while frame is not None:
        pickler = frame.f_locals.get("self")
        if isinstance(pickler, picklers):
            return getattr(type(pickler), "reducer_override", None) is not None
        frame = frame.f_back
    return False


def _unattached_wrapper(kind, cache, attributes, origin=None):
    # type: (type, _FunctionCache, Dict[str, Any], Optional[Tuple[str, int]]) -> _Wrapper
    """A _Wrapper loaded from a pickle made by value (see _Wrapper.__reduce__): in the
    process that made it, the wrapper itself (see _BY_VALUE)."""
    here = _BY_VALUE.get(origin[1]) if origin is not None and origin[0] == _RUN else None
    if isinstance(here, _Wrapper) and here._cache is cache:
        return here
    wrapper: "_Wrapper" = object.__new__(kind)
    wrapper._cache, wrapper._self = cache, None
    wrapper.__dict__ = attributes
    return wrapper


# == memoize: binding -----------------------------------------------------------------------------
# bind(args, kwargs) -> the values that make a call's key: a call that binds as the function
# would, defaults left out when a value keys as its default does, ignore= taken out.

def _binder(func, ignore, label):
    # type: (_Func, FrozenSet[str], str) -> _Bind
    """A fast bind(args, kwargs) -> the values that make the key of a call.

    The values of the parameters without a default come first, in order; then the name and
    value of each other parameter that the call does not leave at its default. So f(5),
    f(x=5) and f() with x=5 are one key, and adding a parameter with a default keeps the
    keys of every call that does not pass it. Plain calls take a shortcut.
    """
    for name in ignore:
        if not isinstance(name, str):
            raise TypeError("Expected memoize(ignore=...) to hold parameter names, not %r"
                            % (name,))
    try:
        params = _parameters(func)
    except (TypeError, ValueError):     # some builtins have no signature: key on the call
        if ignore:
            raise TypeError("memoize(ignore=...) needs a function with a signature; "
                            "%r has none" % (func,)) from None
        return lambda args, kwargs: (args, kwargs)
    names = [name for name, _, _ in params]
    collects = any(kind == 4 for _, kind, _ in params)    # **kwargs: ignore=('timeout',)
    for name in ignore:
        if name not in names and not collects:     # a misspelt name must not pass
            _load()
            raise TypeError("memoize(ignore=...) names %r, which is not a parameter of %s%s"
                            % (name, label, inspect.signature(func)))
    kept: "_Kept" = []
    for name, kind, default in params:
        if name in ignore:
            continue
        digest = None
        if default is not _MISSING:
            with contextlib.suppress(Exception):   # best effort: compared by identity then
                digest = _digest(default)
        kept.append((name, kind, default, digest))
    # A default that can change in place, by the function itself (def f(seen=[])) or by the
    # program (CONFIG = Config(), filled in by main() after import), is keyed by what it holds
    # at the call if that is not what it held at decoration; a value passed for it always is,
    # even the default itself: what it held at decoration in another run says nothing of it.
    # One that cannot be keyed at decoration (a settings object holding a lambda) is left out
    # when not passed, as itself; passed, it is keyed as any value is, or refused, naming it.
    watched = {name for name, _, default, digest in kept
               if default is not _MISSING and not _fixed(default)}
    bind_slowly = _signature_binder(func, kept, watched, ignore, label)
    if not all(kind == 1 for _, kind, _ in params):    # all positional-or-keyword
        return bind_slowly
    return _positional_binder(params, kept, watched, ignore, bind_slowly)


def _signature_binder(func, kept, watched, ignore, label):
    # type: (_Func, _Kept, Set[str], FrozenSet[str], str) -> Callable[[_Args, _Kwargs], _Args]
    """bind(args, kwargs) for any call, through inspect.Signature.bind(): kept, the
    parameters not ignored (name, kind, default, digest of the default or None); watched,
    the names of those whose default can change in place."""
    signature: "List[inspect.Signature]" = []   # made on first need: a call bind() cannot take

    def bind_slowly(args, kwargs):
        # type: (_Args, _Kwargs) -> _Args
        if not signature:
            _load()
            signature.append(inspect.signature(func))
        try:
            arguments = signature[0].bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise TypeError("%s(): %s" % (label, exc)) from None
        values: "List[Any]" = []
        named: "List[Any]" = []
        for name, kind, default, digest in kept:
            if name in watched:
                if name in arguments:          # passed
                    named += (name, arguments[name])
                elif _differs(default, digest):
                    named += (name, default)
                continue
            if name not in arguments:          # left at its default, or no *args / **kwargs
                continue
            value = arguments[name]
            if kind == 2:                      # *args
                if value:
                    named += ("*" + name, value)
            elif kind == 4:                    # **kwargs, but the keywords ignore= names
                for key in sorted(value):
                    if key in ignore:
                        continue
                    # f(**{"*args": ...}) must not key as the *args of another call
                    named += ("*" + key if key.startswith("*") else key, value[key])
            elif default is _MISSING:
                values.append(value)
            elif not _at_default(value, default, digest):
                named += (name, value)
        return tuple(values + named)

    return bind_slowly


def _positional_binder(params, kept, watched, ignore, bind_slowly):
    # type: (_Params, _Kept, Set[str], FrozenSet[str], Callable[[_Args, _Kwargs], _Args]) -> _Bind
    """bind(args, kwargs) for a function whose parameters are all positional-or-keyword:
    the usual call, made into a key by slicing and comparing, or by bind_slowly() when it
    is not plain (an unknown keyword, a missing argument: bind_slowly() raises its error)."""
    names = [name for name, _, _ in params]
    count = len(params)
    required = sum(default is _MISSING for _, _, default in params)     # they come first
    keep = [i for i in range(required) if names[i] not in ignore]
    digests = {name: digest for name, _, _, digest in kept}
    defaults = tuple(default for _, _, default in params)
    labels = tuple(None if name in ignore else name for name in names)
    position = {name: i for i, name in enumerate(names)}
    plain = not ignore
    run = keep[0] if keep and keep == list(range(keep[0], required)) else None
    if not keep:
        run = required
    exact = _EXACT
    fresh = tuple(name in watched for name in names)    # keyed by content at each call

    def bind(args, kwargs):
        # type: (_Args, _Kwargs) -> _Args
        given = passed = len(args)
        if kwargs:                 # f(x=5): place the keywords, then as if positional
            if given > count:
                return bind_slowly(args, kwargs)
            full = list(args) + list(defaults[given:])
            for name, value in kwargs.items():
                i = position.get(name)
                if i is None or i < given:      # unknown, or given twice: its error
                    return bind_slowly(args, kwargs)
                full[i] = value
            if any(value is _MISSING for value in full[:required]):   # its error
                return bind_slowly(args, kwargs)
            args, given = tuple(full), count
        elif not required <= given <= count:
            return bind_slowly(args, kwargs)
        if watched and given < count:          # those left at their default are looked at too
            args, given = args + defaults[given:], count
        if given == required:                  # the hot path: no parameter with a default
            if plain:
                return args
            if run is not None:               # ignore='self' and the like
                return args[run:]
        named: "_Args" = ()
        for i in range(required, given):
            value, default = args[i], defaults[i]
            if labels[i] is None:
                continue
            if fresh[i]:                      # passed, or no longer as it was
                if i < passed or kwargs and labels[i] in kwargs or \
                        _differs(value, digests[labels[i]]):   # type: ignore[index]
                    named += (labels[i], value)
                continue
            if value is default:
                continue
            kind = type(value)
            if kind is not type(default) or not (
                    value == default if kind in exact
                    else _at_default(value, default,
                                     digests[labels[i]])):  # type: ignore[index]  # not None
                named += (labels[i], value)
        if plain:
            return args[:required] + named
        if run is not None:                   # ignore='self' and the like: a slice
            return args[run:required] + named
        return tuple([args[i] for i in keep]) + named

    return bind


def _parameters(func):
    # type: (_Func) -> _Params
    """[(name, kind, default)] of func's parameters, as inspect.signature() gives them (kind
    0 to 4 as inspect.Parameter's kinds, default _MISSING for none). A plain function's are
    read off its code, without importing inspect, which costs as much as all of persist."""
    code = getattr(func, "__code__", None)
    if type(func) is not types.FunctionType or hasattr(func, "__wrapped__") or \
            hasattr(func, "__signature__") or code is None:
        _load()
        return [(p.name, int(p.kind), _MISSING if p.default is p.empty else p.default)
                for p in inspect.signature(func).parameters.values()]
    names = code.co_varnames
    positional, only = code.co_argcount, code.co_posonlyargcount
    defaults = func.__defaults__ or ()
    keyword_defaults = func.__kwdefaults__ or {}
    first_default = positional - len(defaults)
    params = [(names[i], 0 if i < only else 1,
               defaults[i - first_default] if i >= first_default else _MISSING)
              for i in range(positional)]
    at = positional + code.co_kwonlyargcount
    if code.co_flags & _CO_VARARGS:
        params.append((names[at], 2, _MISSING))
        at += 1
    params += [(name, 3, keyword_defaults.get(name, _MISSING))
               for name in names[positional:positional + code.co_kwonlyargcount]]
    if code.co_flags & _CO_VARKEYWORDS:
        params.append((names[at], 4, _MISSING))
    return params


def _load():
    # type: () -> None
    """Import inspect, which memoize's decoration needs: it costs as much as all of persist."""
    global inspect
    if inspect is None:
        with _LAZY_IMPORT:
            import inspect


_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08    # code flags: *args, **kwargs (as inspect's)

_EXACT = {int, str, bytes, bool, type(None)}   # for these, == is equality of keys

_HEADROOM = 100     # frames: a call made closer than this to the recursion limit is a recursion


def _stack_nearly_full():
    # type: () -> bool
    """Whether the caller runs within _HEADROOM frames of the recursion limit: a
    RecursionError there is the program's own recursion, not the depth of some value."""
    frame: "Optional[types.FrameType]"
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth + _HEADROOM >= sys.getrecursionlimit()


def _unkeyable(func, args, kwargs, exc):
    # type: (_Func, _Args, _Kwargs, Exception) -> Exception
    """The TypeError for an argument that cannot be part of a key, naming the parameter; a
    RecursionError for one nested too deep to key.

    A RecursionError with the stack nearly full is returned as it is: the function's own
    recursion reaching the limit, which its callers expect unchanged (and which has no room
    left for more work here).
    """
    if _too_deep(exc) and _stack_nearly_full():
        return exc
    label = _identity(func)
    _load()
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
        named = list(bound.arguments.items())
    except (TypeError, ValueError):
        named = []
    for name, value in named:
        try:
            _digest(value)
        except Exception as inner:
            if not _too_deep(inner):
                return TypeError("%s(): argument %r cannot be part of a cache key (%s: %s); "
                                 "leave it out with memoize(ignore=[%r]) or pass "
                                 "memoize(key=...)"
                                 % (label, name, type(inner).__name__, inner, name))
            return RecursionError("%s(): argument %r is nested too deep to be part of a cache "
                                  "key (RecursionError: %s); leave it out with "
                                  "memoize(ignore=[%r]), pass memoize(key=...), or raise the "
                                  "limit with sys.setrecursionlimit() (now %d); nothing was run "
                                  "or stored"
                                  % (label, name, _depth_text(inner), name,
                                     sys.getrecursionlimit()))
    if _too_deep(exc):
        return RecursionError("%s(): the arguments are nested too deep to be made into a cache "
                              "key (RecursionError: %s); pass memoize(key=...), or raise the "
                              "limit with sys.setrecursionlimit() (now %d); nothing was run or "
                              "stored"
                              % (label, _depth_text(exc), sys.getrecursionlimit()))
    return TypeError("%s(): the arguments cannot be made into a cache key (%s: %s); pass "
                     "memoize(key=...)" % (label, type(exc).__name__, exc))


def _too_deep(exc):
    # type: (BaseException) -> bool
    """Whether exc is the stack running out: a RecursionError, or on PyPy the TypeError its
    interpreter raises when the stack runs out again as it records a RecursionError's
    context ("couldn't record exception context for exception 'RecursionError'", a path its
    source calls unreachable; seen about once in 400 keyings of a value nested too deep)."""
    if isinstance(exc, RecursionError):
        return True
    return (type(exc) is TypeError and _PYPY
            and "exception context for exception 'RecursionError'" in str(exc))


def _depth_text(exc):
    # type: (BaseException) -> str
    """What a _too_deep exc says: its own text for a RecursionError."""
    return str(exc) if isinstance(exc, RecursionError) else "maximum recursion depth exceeded"


# == memoize: keys --------------------------------------------------------------------------------
# A key is SHA-256 over persist's own encoding of the values (never repr() or pickle):
# _keyer() makes a cache's key function, _write() writes each value by its type's writer.

# Keys.  A key is SHA-256 over an encoding of the call that this file defines, never over
# repr() or pickle, whose output changes between Python and library versions (Path pickles
# differently from 3.13 on, repr() escapes by the Unicode database, numpy 2 pickles arrays
# through other functions). Every value starts with a tag and says where it ends, so two
# different values never make the same stream. Numbers are written in hex, which has no
# int-to-str digit limit; text is UTF-8 (surrogatepass); bytes and arrays are hashed in
# place. Equal values of one type make one key; different types make different keys
# (f(1), f(1.0) and f(True); a list and a tuple; a subclass and its base). Decisions:
#   -0.0 keeps its sign (1 / x, copysign and atan2 tell it from 0.0); every float NaN is one
#     key; numpy data is keyed by its bytes, so there both hold only bit for bit.
#   dict, set and frozenset ignore order; OrderedDict keeps it, as its == does.
#   Decimal('1.0') and Decimal('1.00') differ: str(), quantize() and the context tell them apart.
# Changing the encoding changes _KEY_FORMAT, which starts every key, and the digests pinned
# in test_persist.py's TestKeyFormat.
_KEY_FORMAT = "persist key 1\n"
_LONG = 1 << 16                 # a str longer than this is encoded to UTF-8 in slices
_BLOCK = 1 << 22                # a non-contiguous array is copied and hashed a block at a time
# bytes hashed by _short_sha256, CPython's own SHA-256, where it is as fast as OpenSSL's (3.8 to
# 3.13: 0.4-0.9 us either way up to 64 bytes; past 128 OpenSSL's is faster, 6x at a megabyte)
_SHORT_HASH = 64
_KEY_RUN = 1 << 13              # a list or tuple longer than this is keyed a run at a time
_PREFIXES = tuple("s%x:" % n for n in range(256))     # the start of a short str's encoding
_ONE_TOKEN: "Dict[type, Callable[[Any], str]]" = {      # the values whose encoding is one letter
    bool: {True: "T", False: "F"}.__getitem__, type(None): {None: "N"}.__getitem__}
_RAW_KINDS = frozenset("biufcmMSUV")
_SINGLETON_TYPES = ((type(None), "NoneType"), (type(NotImplemented), "NotImplementedType"),
                    (type(...), "ellipsis"))   # numpy dtype kinds whose bytes are their values


def _keyer(salt):
    # type: (str) -> Callable[[Any], bytes]
    """key(material) -> the 32-byte key of a call, for a cache whose salt is the str salt."""
    # Each key starts a hash of its own: copying one made in advance is no faster, and on
    # PyPy a hash object is locked while copied, so a signal handler keying a call while the
    # code it interrupted copies it would wait for ever.
    start = ("%ss%x:%s" % (_KEY_FORMAT, len(salt), salt)).encode("utf-8", "surrogatepass")

    def key(material):
        # type: (Any) -> bytes
        if type(material) is tuple:
            # The hit path's usual call, a few numbers and short strs: the text that _write
            # makes, without a call per value.
            text = "("
            for value in material:
                kind = type(value)
                if kind is int:
                    text += "i%x;" % value
                elif kind is str and len(value) <= _LONG:
                    text += "s%x:%s" % (len(value), value)
                elif kind is float:
                    text += _float_text(value)
                elif value is None:
                    text += "N"
                else:
                    break
            else:
                data = start + (text + ")").encode("utf-8", "surrogatepass")
                if len(data) <= _SHORT_HASH:
                    return _short_sha256(data).digest()
                return _sha256(data).digest()
        writer = _KeyWriter(start, set())
        _write(material, writer)
        return writer.digest()

    return key


class _KeyWriter:
    """A SHA-256 being fed the encoding of some values.

    Short tokens gather in a list of str and are hashed as UTF-8 in one call; buffers (bytes,
    arrays) are hashed in place, after the text written before them. The hash is made at the
    first buffer, or at digest(): the key of a few values that are all text is hashed in one
    call, by _short_sha256 when it is short. runs=False writes long lists and tuples item by
    item (see _write_long): the reference its tests compare with.
    """

    __slots__ = ("head", "hasher", "text", "active", "runs")

    def __init__(self, head, active, runs=True):
        # type: (bytes, Set[int], bool) -> None
        self.head = head              # what the hash starts with: a key's salt, or b''
        self.hasher: "Optional[hashlib._Hash]" = None      # made by the first flush()
        self.text: "List[str]" = []
        self.active = active          # ids of the containers being written: a cycle shows
        self.runs = runs

    def flush(self):
        # type: () -> hashlib._Hash
        """Hash the text written so far; return the hash, to feed a buffer to."""
        hasher = self.hasher
        if hasher is None:
            hasher = self.hasher = _sha256(self.head)
        if self.text:
            hasher.update("".join(self.text).encode("utf-8", "surrogatepass"))
            self.text.clear()         # the same list: _write_long and _write_objects hold it
        return hasher

    def buffer(self, data):
        # type: (Buffer) -> None
        self.flush().update(data)

    def digest(self):
        # type: () -> bytes
        if self.hasher is None:         # text alone: in one call
            data = self.head + "".join(self.text).encode("utf-8", "surrogatepass")
            return (_short_sha256(data) if len(data) <= _SHORT_HASH else _sha256(data)).digest()
        return self.flush().digest()


def _sha256(data=b""):
    # type: (Buffer) -> hashlib._Hash
    """hashlib.sha256(data): hashlib is imported at the first (see _short_sha256)."""
    sha256 = _LONG_SHA256
    if sha256 is None:
        sha256 = _import_sha256()
    return sha256(data)


def _import_sha256():
    # type: () -> Callable[[Buffer], hashlib._Hash]
    """hashlib.sha256, imported under _LAZY_IMPORT (which fork() waits for)."""
    global _LONG_SHA256
    with _LAZY_IMPORT:
        if _LONG_SHA256 is None:
            import hashlib
            sha256 = getattr(hashlib, "sha256", None)
            if sha256 is None:      # a signal handler, as this thread imports it: the same
                return _short_sha256   # digest, by CPython's own (hashlib was not imported)
            _LONG_SHA256 = sha256
        return _LONG_SHA256


# What persist imports at its first need (hashlib, shelve, inspect) is imported under this
# lock, and fork() takes it (registered here, before the store's hooks, so that it is taken
# after them and given back first): a child forked while another thread was in the middle of
# such an import would wait for ever for that thread's lock on the module, at its first use.
_LAZY_IMPORT = _thread.RLock()
_LONG_SHA256 = None  # type: Optional[Callable[[Buffer], hashlib._Hash]]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_LAZY_IMPORT.acquire, after_in_parent=_LAZY_IMPORT.release,
                        after_in_child=_LAZY_IMPORT.release)


def _digest(value, runs=True):
    # type: (Any, bool) -> bytes
    """The SHA-256 of value's canonical encoding: equal values, equal digests (runs=False:
    long lists and tuples item by item, the reference for the tests of _write_long)."""
    w = _KeyWriter(b"", set(), runs)
    _write(value, w)
    return w.digest()


def _write(value, w):
    # type: (Any, _KeyWriter) -> None
    """Write value's canonical encoding into the _KeyWriter w."""
    kind = type(value)
    if kind is str:
        _write_str(value, w)
    elif kind is int:
        w.text.append("i%x;" % value)
    elif kind is tuple:
        _write_tuple(value, w)
    elif value is None:
        w.text.append("N")
    elif kind is bool:
        w.text.append("T" if value else "F")
    elif kind is float:
        w.text.append(_float_text(value))
    else:
        writer = _WRITERS.get(kind)
        if writer is None:
            writer = _writer_for(kind)
        writer(value, w)


def _write_str(value, w):
    # type: (Any, _KeyWriter) -> None
    if len(value) <= _LONG:
        w.text += ("s%x:" % len(value), value)    # length in code points: no escaping
        return
    w.text.append("s%x:" % len(value))
    update = w.flush().update
    for start in range(0, len(value), _LONG):    # a slice's UTF-8 at a time: the same bytes
        update(value[start:start + _LONG].encode("utf-8", "surrogatepass"))


def _write_int(value, w):
    # type: (Any, _KeyWriter) -> None
    w.text.append("i%x;" % value)


def _write_float(value, w):
    # type: (Any, _KeyWriter) -> None
    w.text.append(_float_text(value))


def _write_tuple(value, w):
    # type: (Any, _KeyWriter) -> None
    w.text.append("(")     # no cycle check: a cycle always passes through a mutable container
    if type(value) is tuple and len(value) > _KEY_RUN and w.runs:
        _write_long(value, w)
    else:
        for item in value:
            _write(item, w)
        if len(w.text) > _KEY_RUN:      # rows of a table (see _write_list)
            w.flush()
    w.text.append(")")


def _float_text(x):
    # type: (float) -> str
    return "f%s;" % x.hex() if x == x else "fnan;"    # hex is exact, and keeps -0.0's sign


def _write_bytes(value, w, tag="b"):
    # type: (Union[bytes, bytearray], _KeyWriter, str) -> None
    w.text.append("%s%x:" % (tag, len(value)))
    w.buffer(value)


def _write_memoryview(value, w):
    # type: (Any, _KeyWriter) -> None
    w.text.append("m")
    _write((value.format, value.shape), w)
    w.text.append("b%x:" % value.nbytes)
    w.buffer(value if value.c_contiguous else value.tobytes())


def _enter(value, w):
    # type: (object, _KeyWriter) -> None
    """Mark the container value as being written; refuse it if it already is (a cycle)."""
    if id(value) in w.active:
        raise ValueError("a %s that contains itself cannot be keyed" % type(value).__name__)
    w.active.add(id(value))


def _write_list(value, w):
    # type: (Any, _KeyWriter) -> None
    _enter(value, w)
    w.text.append("[")
    if type(value) is list and len(value) > _KEY_RUN and w.runs:
        _write_long(value, w)
    else:
        for item in value:
            _write(item, w)
        # a short list of rows (1,000 lists of 1,000 ints) is hashed a row or two at a time,
        # not held to the end as tokens (70 bytes each)
        if len(w.text) > _KEY_RUN:
            w.flush()
    w.text.append("]")
    w.active.discard(id(value))


def _write_long(value, w):
    # type: (Union[List[Any], Tuple[Any, ...]], _KeyWriter) -> None
    """Write the items of value, a long list or tuple, as `for item in value: _write(item, w)`
    does, byte for byte, in runs of _KEY_RUN items: a run of one type among int, float, str,
    bool and None is encoded in one piece by C loops (a list of a million small ints keys in
    a quarter of the time), and each run goes to the hash as it is made, not held to the end.

    A run of other values, and all that follows it, is written one item at a time from a
    live iterator, as the loop does: their writers may run the caller's code (__reduce_ex__,
    properties), which may change the list. Until then no code of the caller's runs (type(),
    `is` and the formatting of exact ints, floats and strs call none, nor a metaclass's
    __eq__ or __hash__: see _run_encoded), so the list is as it was.
    Another thread that changes the list meanwhile gets what it gets from the loop too: the
    items as each is reached.
    """
    start = 0
    while True:
        run = value[start:start + _KEY_RUN]
        if not run:
            return
        encoded = _run_encoded(run)
        if encoded is None:
            break
        w.buffer(encoded)
        start += len(run)
    items = iter(value)
    next(itertools.islice(items, start, start), None)      # past what is written
    tokens = w.text
    for item in items:
        _write(item, w)
        if len(tokens) > _KEY_RUN:
            w.flush()


def _run_encoded(run):
    # type: (Sequence[Any]) -> Optional[bytes]
    """The encoding of the items of run, as _write writes them, in UTF-8, if they are all of
    one type among int, float, str, bool and None (and a str no longer than _LONG); else None."""
    each = builtins.map                  # map() is persist.map here
    # Each item's type is run[0]'s by identity: not by a set of types, which keeps one of two
    # types that a metaclass says are equal (with int's hash, float's or NoneType's) and takes
    # the other's items for ints, floats or None, as _write never does (it writes a float
    # subclass's by the subclass's own hex(), and no value but None as None).
    kind = type(run[0])
    if not all(each(operator.is_, each(type, run), itertools.repeat(kind))):
        return None
    if kind is int:        # bytes' % is a quarter faster than str's, and needs no encoding
        return (b"i%x;" * len(run)) % tuple(run)
    if kind is float:      # float.hex() says "nan" for every NaN, as _float_text does
        text = ("f%s;" * len(run)) % tuple(each(float.hex, run))
    elif kind is str:
        lengths = list(each(len, run))
        longest = max(lengths)
        if longest < len(_PREFIXES):
            prefixes = each(_PREFIXES.__getitem__, lengths)
        elif longest <= _LONG:
            prefixes = each("s%x:".__mod__, lengths)
        else:
            return None                  # _write_str hashes it in slices
        text = "".join(each(operator.add, prefixes, run))
    else:
        token = _ONE_TOKEN.get(kind)
        if token is None:
            return None
        text = "".join(each(token, run))
    return text.encode("utf-8", "surrogatepass")


def _write_unordered(tag, items, w, *parts):
    # type: (str, Iterable[Any], _KeyWriter, *Callable[[Any], Any]) -> None
    """tag, then the digests of items, each written on its own, in sorted order: the same
    for any order of the items."""
    digests: "List[bytes]" = []
    for item in items:
        sub = _KeyWriter(b"", w.active, w.runs)
        for part in parts:
            _write(part(item), sub)
        digests.append(sub.digest())
    digests.sort()
    w.text.append("%s%x:" % (tag, len(digests)))
    w.buffer(b"".join(digests))


def _write_dict(value, w):
    # type: (Any, _KeyWriter) -> None
    _enter(value, w)
    _write_unordered("{", value.items(), w, _first, _second)
    w.active.discard(id(value))


def _write_set(value, w):
    # type: (Any, _KeyWriter) -> None
    _enter(value, w)
    _write_unordered("S" if isinstance(value, set) else "Z", value, w, _same)
    w.active.discard(id(value))


def _first(pair):
    # type: (Sequence[Any]) -> Any
    return pair[0]


def _second(pair):
    # type: (Sequence[Any]) -> Any
    return pair[1]


def _same(item):
    # type: (_T) -> _T
    return item


def _write_complex(value, w):
    # type: (Any, _KeyWriter) -> None
    w.text.append("c%s%s" % (_float_text(value.real), _float_text(value.imag)))


def _write_named(name, payload, w):
    # type: (str, Any, _KeyWriter) -> None
    """A value of a type with an encoding of its own: the type's fixed name, then payload."""
    w.text += ("@s%x:" % len(name), name)
    _write(payload, w)


def _write_type(kind, w):
    # type: (type, _KeyWriter) -> None
    name = _type_name(kind)
    w.text += ("@s%x:" % len(name), name)


def _write_reference(value, w):
    # type: (Any, _KeyWriter) -> None
    """A function or class by the name that imports it, as pickle does."""
    for kind, kind_name in _SINGLETON_TYPES:    # not in builtins before 3.10: as pickle does
        if value is kind:
            w.text.append("G")
            _write(("builtins", kind_name), w)
            return
    module = getattr(value, "__module__", None)
    name = getattr(value, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(name, str) or "<" in name:
        raise TypeError("%r has no name that imports it (a lambda, or a function or class "
                        "defined inside a function)" % (value,))
    target = sys.modules.get(module)
    for part in name.split("."):
        target = getattr(target, part, None)
    if target is not value:          # as pickle checks: made at run time, or redefined since
        raise TypeError("%r is not what %s.%s names now" % (value, module, name))
    w.text.append("G")
    _write((_module_name(module, name, value), name), w)


def _module_name(module, qualname, value):
    # type: (str, str, object) -> str
    """The module that value (named qualname in module) is imported from, one name for all
    versions: a private module's public parent where it has value (pathlib._local, 3.13's
    home of Path, is pathlib), and numpy.core, numpy 2's numpy._core, as neither. A script's
    classes and functions are under its name, as run, imported or spawned."""
    if module in _MAIN_NAMES:
        return _script_name(module, "")
    while "." in module and module.rpartition(".")[2].startswith("_"):
        parent = sys.modules.get(module.rpartition(".")[0])
        target = parent
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if target is not value:
            break
        module = parent.__name__     # type: ignore[union-attr]  # None: target was None
    if module.startswith("numpy."):
        module = ".".join(part for part in module.split(".") if part not in ("core", "_core"))
    return module


def _type_name(kind):
    # type: (type) -> str
    """module:qualname of a class whose instances are keyed; refused for a class made inside
    a function, as pickle refuses it: two such classes share a name but not what they do."""
    if "<" in kind.__qualname__:
        raise TypeError("%s is defined inside a function (its instances cannot be told from "
                        "those of another class of that name); define it at module level"
                        % kind.__qualname__)
    module = _module_name(kind.__module__ or "", kind.__qualname__, kind)
    return "%s:%s" % (module, _KEYED_AS.get(kind, kind.__qualname__))


def _write_reduced(value, w):
    # type: (Any, _KeyWriter) -> None
    """Any other object: its type, then what pickle's __reduce_ex__(4) says it is made of.

    Its parts are written with this encoder, so an object that holds a dict or a set keys by
    their content, and in every process.
    """
    kind = type(value)
    reduce = copyreg.dispatch_table.get(kind)
    rv = reduce(value) if reduce is not None else value.__reduce_ex__(4)
    if isinstance(rv, str):          # a module-level singleton, by name
        _write_named("global", (getattr(value, "__module__", None) or kind.__module__, rv), w)
        return
    _enter(value, w)
    rv = tuple(rv) + (None,) * (6 - len(rv))
    _write_named(_type_name(kind), rv[:3], w)
    _write(None if rv[3] is None else list(rv[3]), w)    # listitems
    if rv[4] is None:                                      # dictitems
        w.text.append("N")
    else:
        _write_unordered("{", rv[4], w, _first, _second)
    _write(rv[5], w)                                       # state setter
    w.active.discard(id(value))


def _write_subclass(base):
    # type: (type) -> _Writer
    """The writer for subclasses of base: the type, base's encoding, then the instance dict."""
    base_writer = _WRITERS[base]

    def write(value, w):
        # type: (Any, _KeyWriter) -> None
        _write_type(type(value), w)
        base_writer(value, w)
        _write(getattr(value, "__dict__", None) or {}, w)
        slots = _slot_values(value)
        if slots:                     # state in __slots__ too (none: the keys stay as they were)
            _write(slots, w)

    return write


def _slot_values(value):
    # type: (object) -> _Kwargs
    """{name: value} of what value holds in the __slots__ of its classes (set ones only)."""
    found: "_Kwargs" = {}
    for kind in type(value).__mro__:
        slots = kind.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in found:
                if name.startswith("__") and not name.endswith("__"):   # name-mangled
                    name = "_%s%s" % (kind.__name__.lstrip("_"), name)
                with contextlib.suppress(AttributeError):
                    found[name] = getattr(value, name)
    return found


def _write_ordered(value, w):
    # type: (Any, _KeyWriter) -> None
    _enter(value, w)
    _write_named(_type_name(type(value)) if type(value) is not collections.OrderedDict
                 else "collections.OrderedDict", [tuple(pair) for pair in value.items()], w)
    _write(getattr(value, "__dict__", None) or {}, w)
    w.active.discard(id(value))


def _write_defaultdict(value, w):
    # type: (Any, _KeyWriter) -> None
    name = ("collections.defaultdict" if type(value) is collections.defaultdict
            else _type_name(type(value)))
    _write_named(name, value.default_factory, w)    # defaultdict(list) and (int) differ
    _write_dict(value, w)
    _write(getattr(value, "__dict__", None) or {}, w)


def _write_datetime(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("datetime.datetime", (value.year, value.month, value.day, value.hour,
                                       value.minute, value.second, value.microsecond,
                                       value.fold, value.tzinfo), w)


def _write_date(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("datetime.date", (value.year, value.month, value.day), w)


def _write_time(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("datetime.time", (value.hour, value.minute, value.second, value.microsecond,
                                   value.fold, value.tzinfo), w)


def _write_timedelta(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("datetime.timedelta", (value.days, value.seconds, value.microseconds), w)


def _write_timezone(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("datetime.timezone", (value.utcoffset(None), value.tzname(None)), w)


def _write_zoneinfo(value, w):
    # type: (Any, _KeyWriter) -> None
    if value.key is None:
        raise TypeError("a ZoneInfo made from a file has no key; pass one made by name")
    _write_named("zoneinfo.ZoneInfo", value.key, w)


def _write_decimal(value, w):
    # type: (Any, _KeyWriter) -> None
    sign, digits, exponent = value.as_tuple()     # exponent: an int, or 'n', 'N', 'F'
    _write_named("decimal.Decimal", (sign, tuple(digits), exponent), w)


def _write_fraction(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("fractions.Fraction", (value.numerator, value.denominator), w)


def _write_uuid(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("uuid.UUID", value.int, w)


def _write_picklebuffer(value, w):
    # type: (Any, _KeyWriter) -> None
    _write_named("pickle.PickleBuffer", None, w)
    _write_memoryview(memoryview(value), w)


def _write_path(value, w):
    # type: (Any, _KeyWriter) -> None
    kind = type(value)
    standard = getattr(sys.modules["pathlib"], kind.__name__, None) is kind  # 3.13: in pathlib._local
    _write_named("pathlib." + kind.__name__ if standard else _type_name(kind),
                  value.as_posix(), w)
    if not standard:
        _write(getattr(value, "__dict__", None) or {}, w)


def _write_enum(value, w):
    # type: (Any, _KeyWriter) -> None
    # A Flag by value: a combination's name changed in 3.11. Any other member by name.
    flag = isinstance(value, sys.modules["enum"].Flag)
    _write_named(_type_name(type(value)), value._value_ if flag else value._name_, w)


def _write_dataclass(value, w):
    # type: (Any, _KeyWriter) -> None
    # Its fields; then what else it holds (self.mean_ = ... set by a fit()), which a result
    # may depend on as much: a dataclass that holds nothing else keys as it always has.
    _enter(value, w)                 # node.parent.children holds node: refused, not recursed
    fields = sys.modules["dataclasses"].fields(value)
    payload = tuple((field.name, getattr(value, field.name)) for field in fields)
    names = {field.name for field in fields}
    others = {name: held for name, held in (getattr(value, "__dict__", None) or {}).items()
              if name not in names}
    others.update((name, held) for name, held in _slot_values(value).items()
                  if name not in names)
    _write_named(_type_name(type(value)), payload + (others,) if others else payload, w)
    w.active.discard(id(value))


def _write_array(value, w, tag="A"):
    # type: (Any, _KeyWriter, str) -> None
    """A numpy array by dtype (little-endian), shape and values in C order, whatever its layout."""
    dtype = value.dtype
    if dtype.names is not None:          # structured: field by field, skipping padding bytes
        w.text.append(tag)
        _write(("V", dtype.names, value.shape), w)
        for name in dtype.names:
            _write_array(value[name], w)
        return
    if dtype.kind not in _RAW_KINDS:     # objects, or numpy 2's variable-width strings
        _enter(value, w)                 # an object array may hold itself
        w.text.append(tag + "(")         # as _write writes (kind, shape, ravel().tolist())
        _write(dtype.kind, w)
        _write(value.shape, w)
        w.text.append("[")
        _write_objects(value.ravel(), w)
        w.text.append("])")
        w.active.discard(id(value))
        return
    little = dtype.newbyteorder("<")
    if dtype != little:                  # big-endian data: a copy in the one order we hash
        value = value.astype(little)
    w.text.append(tag)
    _write((little.str, value.shape), w)
    w.text.append("b%x:" % value.nbytes)
    if not value.nbytes:
        return
    if value.flags.c_contiguous:
        w.buffer(value.reshape(-1).view("u1"))     # in place: no copy
    else:
        _write_blocks(value, w)


def _write_objects(flat, w):
    # type: (Any, _KeyWriter) -> None
    """Write the items of flat, a 1-d numpy array of objects (a DataFrame's str column), as
    _write_list writes flat.tolist(), without a list of them all: a run of _KEY_RUN items at
    a time (see _write_long). The items after the first run of other values are written from
    a list of them made before any is written, as from tolist() (their writers may run the
    caller's code, which may change the array)."""
    start = 0
    if w.runs:
        while start < len(flat):
            encoded = _run_encoded(flat[start:start + _KEY_RUN].tolist())
            if encoded is None:
                break
            w.buffer(encoded)
            start += _KEY_RUN
    tokens = w.text
    for item in flat[start:].tolist():
        _write(item, w)
        if len(tokens) > _KEY_RUN:
            w.flush()


def _write_blocks(value, w):
    # type: (Any, _KeyWriter) -> None
    """Hash a non-contiguous array's bytes in C order, copying a block of rows at a time."""
    if value.ndim == 0 or value.nbytes <= _BLOCK:
        w.buffer(value.copy(order="C").reshape(-1).view("u1"))
        return
    row = value.nbytes // len(value)
    if row > _BLOCK:
        for index in range(len(value)):
            _write_blocks(value[index], w)
        return
    step = _BLOCK // row
    for start in range(0, len(value), step):
        w.buffer(value[start:start + step].copy(order="C").reshape(-1).view("u1"))


def _write_numpy(value, w):
    # type: (Any, _KeyWriter) -> None
    """numpy values, known by their classes' names: numpy is never imported here."""
    names = {c.__name__ for c in type(value).__mro__ if c.__module__ == "numpy"}
    if "ndarray" in names:
        if type(value).__name__ != "ndarray" or type(value).__module__ != "numpy":
            base = next(c for c in type(value).__mro__
                        if c.__module__ == "numpy" and c.__name__ == "ndarray")
            _write_type(type(value), w)
            _write_array(value.view(base), w)
            if hasattr(value, "mask") and hasattr(value, "fill_value"):    # numpy.ma
                _write((value.mask, value.fill_value), w)
            return
        _write_array(value, w)
    elif "generic" in names:             # a scalar: as a 0-d array, by dtype, not class name
        _write_array(value.__array__(), w, "a")
    elif "dtype" in names:
        little = value.newbyteorder("<") if value.kind in _RAW_KINDS else value
        _write_named("numpy.dtype", little.descr if little.names else little.str, w)
    elif "ufunc" in names:
        w.text.append("G")
        _write(copyreg.dispatch_table[type(value)](value)[1], w)    # (module, name)
    else:
        _write_reduced(value, w)


def _write_pandas(value, w):
    # type: (Any, _KeyWriter) -> None
    """pandas objects, without importing pandas: labels, dtypes and values as numpy arrays."""
    names = {c.__name__ for c in type(value).__mro__ if c.__module__.split(".")[0] == "pandas"}
    if "DataFrame" in names:
        _write_named("pandas.DataFrame", type(value).__qualname__, w)
        _write_pandas(value.columns, w)
        _write_pandas(value.index, w)
        for position in range(value.shape[1]):
            _write_pandas_values(value.iloc[:, position], w)
    elif "Series" in names:
        _write_named("pandas.Series", (type(value).__qualname__, value.name), w)
        _write_pandas(value.index, w)
        _write_pandas_values(value, w)
    elif "Index" in names:
        _write_named("pandas.Index", (type(value).__qualname__, list(value.names)), w)
        _write_pandas_values(value, w)
    else:
        _write_reduced(value, w)


def _write_pandas_values(value, w):
    # type: (Any, _KeyWriter) -> None
    dtype = value.dtype
    _write(str(dtype), w)
    if hasattr(dtype, "categories"):     # categorical: the categories and their order count
        _write_pandas(dtype.categories, w)
        _write(bool(dtype.ordered), w)
    _write_array(value.to_numpy(), w)


_WRITERS: "Dict[type, _Writer]" = {
    bytes: _write_bytes,
    bytearray: lambda value, w: _write_bytes(value, w, "y"),
    memoryview: _write_memoryview,
    list: _write_list,
    dict: _write_dict,
    set: _write_set,
    frozenset: _write_set,
    complex: _write_complex,
    str: _write_str, int: _write_int, float: _write_float, tuple: _write_tuple,
}

# Standard library types by the names their modules give them (C or pure Python, any
# version); each is written under one fixed name.
_BY_NAME: "Dict[Tuple[str, str], _Writer]" = {
    ("collections", "OrderedDict"): _write_ordered,
    ("collections", "defaultdict"): _write_defaultdict,
    ("datetime", "datetime"): _write_datetime,
    ("datetime", "date"): _write_date,
    ("datetime", "time"): _write_time,
    ("datetime", "timedelta"): _write_timedelta,
    ("datetime", "timezone"): _write_timezone,
    ("zoneinfo", "ZoneInfo"): _write_zoneinfo,
    ("decimal", "Decimal"): _write_decimal,
    ("fractions", "Fraction"): _write_fraction,
    ("uuid", "UUID"): _write_uuid,
    ("pickle", "PickleBuffer"): _write_picklebuffer,
}
for _names in list(_BY_NAME):
    _BY_NAME["_py" + _names[0], _names[1]] = _BY_NAME[_names]     # _pydatetime, _pydecimal
_BY_NAME["zoneinfo._zoneinfo", "ZoneInfo"] = _write_zoneinfo
_BY_NAME["builtins", "PickleBuffer"] = _write_picklebuffer     # PyPy's
_SUBCLASSED: "List[Tuple[type, _Writer]]" = [(base, _write_subclass(base)) for base in
               (dict, list, tuple, frozenset, set, str, bytes, bytearray, int, float, complex)]
_FUNCTION_TYPES = (type(_write), type(len))


def _writer_for(kind):
    # type: (type) -> _Writer
    """The writer for values of kind, a type with no entry in _WRITERS."""
    module = kind.__module__ or ""
    writer = _BY_NAME.get((module, kind.__qualname__))
    if writer is not None:
        _WRITERS[kind] = writer          # standard types only: the table stays small
        return writer
    if module == "numpy" or module.startswith("numpy."):
        return _write_numpy
    if module == "pandas" or module.startswith("pandas."):
        return _write_pandas
    # Not imported, or not yet in full (another thread is importing it), and the class not
    # made yet: no value of it can exist
    enum = getattr(sys.modules.get("enum"), "Enum", None)
    if enum is not None and issubclass(kind, enum):
        return _write_enum
    if hasattr(kind, "__dataclass_fields__") and not issubclass(kind, type):
        return _write_dataclass
    path = getattr(sys.modules.get("pathlib"), "PurePath", None)
    if path is not None and issubclass(kind, path):
        return _write_path
    if issubclass(kind, collections.OrderedDict):
        return _write_ordered
    if issubclass(kind, collections.defaultdict):
        return _write_defaultdict
    for base, writer in _SUBCLASSED:
        if issubclass(kind, base):
            return writer
    if issubclass(kind, type):
        return _write_reference
    if issubclass(kind, _FUNCTION_TYPES):
        return _write_function
    for base in kind.__mro__:            # a numpy array subclass defined elsewhere
        if base.__module__ == "numpy" and base.__name__ == "ndarray":
            return _write_numpy
    return _write_reduced


def _write_function(value, w):
    # type: (Any, _KeyWriter) -> None
    owner = getattr(value, "__self__", None)
    if owner is None or type(owner) is type(sys):    # a function, or a module's builtin
        try:
            _write_reference(value, w)
        except TypeError:
            wrapper = _WRAPPERS.get(value)
            if wrapper is None:
                raise
            _write_memoized(wrapper, w)
    else:                                            # a bound builtin method: its object too
        _write_reduced(value, w)


def _write_memoized(wrapper, w):
    # type: (_Wrapper, _KeyWriter) -> None
    """A memoized function that no name imports (self.fast = persist.memoize(self.predict),
    made in __init__): its cache and salt, then what it keys at each call (self), as it is
    now; an object being written already (self, holding it) is marked as such."""
    cache = wrapper._cache
    _write_named("memoized", (cache.identity, cache.salt, len(cache.live)), w)
    for value in cache.live:
        if id(value) in w.active:
            _write_named("again", None, w)
        else:
            _write(value, w)


# The writers of standard types whose values never change in place
_FIXED_WRITERS = {_write_datetime, _write_date, _write_time, _write_timedelta, _write_timezone,
                  _write_zoneinfo, _write_decimal, _write_fraction, _write_uuid}


def _fixed(value, depth=0):
    # type: (Any, int) -> bool
    """Whether value cannot change in place: a default that can (a list, a settings object
    filled in after import) is keyed by what it holds at each call."""
    kind = type(value)
    if kind in _EXACT or kind in (float, complex, range) or isinstance(value, type) or \
            isinstance(value, _FUNCTION_TYPES):
        return True
    if kind in (tuple, frozenset):
        return depth < 20 and all(_fixed(item, depth + 1) for item in value)
    if _BY_NAME.get((kind.__module__, kind.__qualname__)) in _FIXED_WRITERS:
        return True
    enum = sys.modules.get("enum")
    pathlib = sys.modules.get("pathlib")
    return (enum is not None and isinstance(value, enum.Enum)) or (
        pathlib is not None and kind in (pathlib.PurePosixPath, pathlib.PureWindowsPath,
                                         pathlib.PosixPath, pathlib.WindowsPath))


def _differs(value, digest):
    # type: (Any, Optional[bytes]) -> bool
    """Whether value no longer keys as the default whose digest is digest (None: a default
    that could not be keyed at decoration, left out as itself)."""
    if digest is None:
        return False
    try:
        return _digest(value) != digest
    except RecursionError:
        raise
    except Exception:              # the key derivation reports it, naming the parameter
        return True


def _at_default(value, default, digest):
    # type: (Any, Any, Optional[bytes]) -> bool
    """Whether value keys as default does: then the call leaves it out of its key."""
    if value is default:
        return True
    kind = type(value)
    if kind is not type(default):
        return False
    if kind in _EXACT:
        return value == default     # type: ignore[no-any-return]  # of int, str ...: a bool
    if kind is float:            # -0.0 is not 0.0, and a nan is its default nan
        return value.hex() == default.hex()     # type: ignore[no-any-return]  # floats
    if digest is None:           # a default that cannot be keyed is left out only as itself
        return False
    try:
        return _digest(value) == digest
    except RecursionError:
        raise
    except Exception:            # the key derivation reports it, naming the parameter
        return False


# == memoize: naming and salt ---------------------------------------------------------------------
# A cache is named by the function's module.qualname (_identity) and its keys salted with
# its code and what it carries (_salt: defaults, closures, globals it reads, self), so that
# changed code never reads an old result, and two functions never share one.

def _salt(func, version, key, ignore):
    # type: (_Func, str, Optional[_Func], FrozenSet[str]) -> Tuple[str, Tuple[object, ...], Optional[str]]
    """(the salt of func's keys, the values to key at each call, the owner of its entries):
    the salt is its version, and what it carries besides its arguments (closure cells, code
    of nested helpers); the values are those it holds itself (a bound method's self, a
    callable object, a partial's arguments), which change as arguments do. The owner (see
    _CREATE) tags what it carries without the values, and with them: another code of a
    nested helper is stale, as another version is; another value (make(2), make(3)) is
    another function's, which may well be in use."""
    carrier = _Carried(key is not None, ignore)
    try:
        carried = carrier.callable(func, top=True, live=True)
    except _Unkeyable as exc:
        label = getattr(_innermost(func), "__qualname__", None) or type(func).__qualname__
        raise TypeError(
            "memoize cannot key %s(): besides its arguments it computes with %s, which "
            "cannot be part of a cache key, so its results could differ under one key. "
            "Pass memoize(name=...) to share one cache whatever that holds, or "
            "memoize(key=...) to give the key yourself, or make it an argument (and "
            "memoize(ignore=...) it)" % (label, exc)) from None
    live = tuple(carrier.live)
    if not carried:
        return version, live, None   # plain functions keep the keys they always had
    digest = _sha256(carried.encode("utf-8", "surrogatepass")).hexdigest()
    code = carried
    for value in carrier.digests:
        code = code.replace(value, "")
    owner = "%s %s" % (_sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
                       [:_CODE_TAG], digest[:_CODE_TAG])
    return "%s %s" % (version, digest), live, owner


class _Carried:
    """What a callable computes with besides its arguments, as text for its keys' salt.

    Values (closure cells, a partial's arguments, a bound method's self, a callable
    object's state) are digested as arguments are; modules and classes are named, as
    globals are; functions are named and described in turn. A value that cannot be keyed
    raises _Unkeyable, naming it, unless memoize(key=...) took that on (lenient).

    The values that what memoize calls holds itself (a bound method's self, a callable
    object, a partial's arguments, through partials and bound methods) are passed to the
    function as arguments are, and change as they do (model.fit()): they are only checked
    here, and collected in live, to be keyed at each call.
    """

    def __init__(self, lenient, ignore):
        # type: (bool, FrozenSet[str]) -> None
        self.seen: "Set[int]" = set()
        self.lenient = lenient
        self.ignore = ignore          # parameters of the memoized function left out
        self.decorated: "Optional[str]" = None   # its own cell is empty while it is decorated
        self.live: "List[object]" = []
        self.digests: "List[str]" = []     # of the values in the text: what is not code

    def value(self, value, live=False):
        # type: (object, bool) -> str
        if isinstance(value, types.ModuleType):
            return "module " + value.__name__
        if isinstance(value, type):   # by name, as a global is: a class's code is not keyed
            if "<locals>" in value.__qualname__:
                # made each time a function runs: one name, whatever it holds then
                raise _Unkeyable("the class %s, defined inside a function (its name does not "
                                 "say what it holds)" % value.__qualname__)
            return "class %s.%s" % (_func_module(value), value.__qualname__)
        if isinstance(value, (types.FunctionType, functools.partial, types.MethodType,
                              _Wrapper)):
            # a bound method or partial that a partial passes on (live) holds what is passed
            # at each call too: partial(apply, model.predict) keys model at each call
            return self.callable(value, live=live)
        try:
            digest = _digest(value).hex()
        except RecursionError:
            raise
        except Exception as exc:
            if self.lenient:
                return "unkeyable"
            raise _Unkeyable("a %s (%s: %s)" % (type(value).__qualname__,
                                                 type(exc).__name__, exc)) from None
        self.digests.append(digest)
        return "value " + digest

    def held(self, name, value, where=None, live=False):
        # type: (Union[str, int], object, Optional[str], bool) -> str
        """value's text, or _Unkeyable saying where (else name) it was held."""
        try:
            return "%s=%s" % (name, self.value(value, live))
        except _Unkeyable as exc:
            where = where or repr(name)
            raise _Unkeyable("%s, held in %s" % (exc, where) if str(exc).startswith("'")
                             else "%s, %s" % (where, exc)) from None

    def carried(self, name, value, where, live):
        # type: (Union[str, int], object, str, bool) -> str
        """held()'s text, but a value (not a name) that live says is passed at each call is
        left to the key of each call."""
        text = self.held(name, value, where, live)
        if live and text.startswith("%s=value " % name):
            self.live.append(value)
            return "%s=live" % name
        return text

    def callable(self, func, top=False, live=False):
        # type: (_Func, bool, bool) -> str
        """func's text; the top level leaves out its name (the cache file has it); live:
        func is what memoize calls, or what that reaches through partials and bound
        methods."""
        wrapper: object = func
        if isinstance(func, types.FunctionType):     # memoize's wrapper: its cache says all
            wrapper = getattr(getattr(func, "cache_info", None), "__self__", None)
        if isinstance(wrapper, _Wrapper):
            # what it keys at each call (fast = memoize(model.predict), in a closure: model)
            # is keyed at each call of this function too, as it is of that one
            cache = wrapper._cache
            self.live.extend(cache.live)
            return "memoized %s %s%s" % (cache.identity, cache.salt, " live" * len(cache.live))
        if id(func) in self.seen:     # functions that call each other
            return "again " + _identity(func)
        self.seen.add(id(func))
        if top:
            self.decorated = getattr(_innermost(func), "__name__", None)
        if isinstance(func, functools.partial):
            return "partial(%s; %s)" % (self.callable(func.func, live=live), "; ".join(
                [self.carried(i, arg, "the partial's argument %d" % i, live)
                 for i, arg in enumerate(func.args)] +
                [self.carried(k, v, "the partial's argument %r" % k, live)
                 for k, v in sorted(func.keywords.items())]))
        if isinstance(func, types.MethodType):
            return "method(%s; %s)" % (self.callable(func.__func__, top),
                                       self.carried("self", func.__self__, "self", live))
        if not isinstance(func, types.FunctionType):
            if isinstance(func, type) or isinstance(getattr(func, "__self__", None),
                                                    types.ModuleType):
                return "" if top else self.value(func)     # a class, a builtin function
            return self.carried("instance", func, "the callable object", live)   # its pickle
        parts = [] if top else [_identity(func)]
        if not top and "<locals>" in func.__qualname__:
            # one of several a function may define under one name (if ... def helper):
            # its code tells them apart (a change of Python makes these keys new)
            parts.append("code " + _sha256(_code_text(func.__code__)).hexdigest())
        for name, cell in zip(func.__code__.co_freevars, func.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:        # not assigned yet
                if name == self.decorated or self.lenient:    # the function, being decorated
                    continue
                # Anything else would be left out of the key, whatever it is assigned later
                raise _Unkeyable("%r, not assigned yet when memoize runs (assign it "
                                 "before the function is decorated)" % name) from None
            parts.append(self.held(name, value))
        # Defaults are evaluated each time an outer function runs, or are code that no
        # source file holds; elsewhere they are code, which is not keyed (README: Keys).
        if "<locals>" in func.__qualname__ or _source_file(func) is None:
            for name, value in _carried_defaults(func):
                if not (top and name in self.ignore):
                    parts.append(self.held(name, value, "the default of %r" % name))
        return "(%s)" % "; ".join(parts) if parts or not top else ""


class _Unkeyable(Exception):
    """Something a function carries cannot be part of a key (a lock, a connection)."""


def _carried_defaults(func):
    # type: (types.FunctionType) -> List[Tuple[str, Any]]
    """(name, default) of func's parameters with a default."""
    code = func.__code__
    positional = code.co_varnames[:code.co_argcount]
    pairs = list(zip(positional[len(positional) - len(func.__defaults__ or ()):],
                     func.__defaults__ or ()))
    return pairs + sorted((func.__kwdefaults__ or {}).items())


_DEFAULTS: "Dict[Tuple[str, str], object]" = {}   # (identity, salt) -> its defaults' digest


def _check_defaults(func, identity, salt):
    # type: (_Func, str, str) -> None
    """Refuse a second function of one name whose defaults differ (for k in (2, 3): def
    scale(x, k=k)): a call left at its default keys without it, so they would share results.
    Defaults that the salt holds already (nested and no-source functions) are fine."""
    inner = _innermost(func)
    if not isinstance(inner, types.FunctionType) or "<locals>" in inner.__qualname__ or \
            _source_file(inner) is None:
        return
    digest: object            # of the defaults, or their ids
    try:
        digest = _digest(tuple(_carried_defaults(inner)))
    except RecursionError:
        raise
    except Exception:             # defaults that cannot be keyed: compared by identity
        digest = tuple(id(value) for _, value in _carried_defaults(inner))
    if _DEFAULTS.setdefault((identity, salt), digest) != digest:
        raise TypeError(
            "memoize: %s() is memoized a second time in this process, with other defaults "
            "(%s): calls left at their default would share one cache. Pass memoize(name=...) "
            "to give each its own, or make the value an argument"
            % (inner.__qualname__, ", ".join("%s=%r" % pair
                                             for pair in _carried_defaults(inner))))


def _identity(func):
    # type: (_Func) -> str
    """module.qualname of what func runs; a lambda, or a function with no source file (a
    notebook, the REPL), also gets a tag of its code, so that two of one name differ."""
    inner = _innermost(func)
    module = _func_module(inner)
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    code = getattr(inner, "__code__", None)
    if isinstance(code, types.CodeType) and (
            "<lambda>" in name or not os.path.isfile(code.co_filename)):
        name += "-" + _code_tag(inner)
    return "%s.%s" % (module, name)


def _innermost(func):
    # type: (_Func) -> _Func
    """What func runs in the end: the function inside partials, bound methods and
    decorators that set __wrapped__ (functools.wraps does), whose file and name are the
    function's own: a decorator's module is shared by every project that uses it."""
    seen: "Set[int]" = set()
    while id(func) not in seen:
        seen.add(id(func))
        if isinstance(func, functools.partial):
            func = func.func
        elif isinstance(func, types.MethodType):
            func = func.__func__
        elif callable(getattr(func, "__wrapped__", None)):
            func = func.__wrapped__     # type: ignore[attr-defined]  # there: just tested
        else:
            break
    return func


_MAIN_NAMES = ("__main__", "__mp_main__")      # a script; __mp_main__ in spawned workers


def _func_module(func):
    # type: (_Func) -> str
    """func's module; for a script, its file name (or -m name), as run, imported or spawned."""
    module = getattr(func, "__module__", None) or "__main__"
    if module in _MAIN_NAMES:
        return _script_name(module, getattr(getattr(func, "__code__", None), "co_filename", ""))
    return module


def _script_name(module, filename):
    # type: (str, str) -> str
    """The name of the script that runs as module (__main__, or __mp_main__ in the workers
    that multiprocessing's spawn and forkserver start): the name python -m ran it by, else
    its file's name; __main__ where it has no file (python -c, the REPL, exec).

    The same name keeps python job.py, import job and its workers on one cache. The -m name
    only if the spec is the script's own: under python -m cProfile job.py (or pdb, or
    trace) __main__'s spec is the tool's, which two scripts share. Any file name, even one
    that is not an identifier (01-prepare.py): each script keeps its own caches.
    """
    main = sys.modules.get(module)
    filename = filename or getattr(main, "__file__", None) or ""
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in _MAIN_NAMES and (
            not filename or not spec.origin or _same_path(spec.origin, filename)):
        return spec.name            # type: ignore[no-any-return]  # a ModuleSpec's: a str
    if filename and os.path.isfile(filename):
        return os.path.splitext(os.path.basename(filename))[0]
    return "__main__"


def _same_path(first, second):
    # type: (str, str) -> bool
    return os.path.normcase(os.path.abspath(first)) == os.path.normcase(os.path.abspath(second))


def _source_file(func):
    # type: (_Func) -> Optional[str]
    """The file that defines func, or None: the REPL, a notebook, exec(), a builtin."""
    inner = _innermost(func)
    code = getattr(inner, "__code__", None)
    filename: "Optional[str]"
    if isinstance(code, types.CodeType):     # PyPy's builtins have a code without a file
        filename = code.co_filename
    else:                         # a class or a callable instance: its module's file
        module = sys.modules.get(getattr(inner, "__module__", None) or "")
        filename = getattr(module, "__file__", None)
    return os.path.abspath(filename) if filename and os.path.isfile(filename) else None


_SHARED_PSEUDO_FILES = {"<string>", "<stdin>", "<console>", "<input>"}   # not one source


def _code_tag(func):
    # type: (_Func) -> str
    """Eight hex digits that stand for func's code: its source text where linecache has it
    (files, IPython and Jupyter cells), else its compiled code. Not its line number, so
    lines added above it change nothing.

    Code compiled from a string (exec, eval, python -c) says its file is <string>, and
    linecache may hold another source under that name (3.13 keeps python -c's): there
    only the compiled code is trusted."""
    _load()
    try:
        if func.__code__.co_filename in _SHARED_PSEUDO_FILES:
            raise OSError("no source of its own")
        lines = inspect.getsource(func).splitlines()
    except Exception:             # no source (python -c, exec, the REPL): use the code
        text = None
    else:                         # its indentation is where it stands, not what it does
        indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()),
                     default=0)
        text = "\n".join(line[indent:].rstrip() for line in lines).strip()
    material = b"" if text is None else text.encode("utf-8", "surrogatepass")
    if text is None or text.count("lambda") > 1:   # two lambdas on one line: keep them apart
        material += _code_text(func.__code__)
    return _sha256(material).hexdigest()[:8]


def _code_text(code):
    # type: (types.CodeType) -> bytes
    """What a code object computes, as bytes: it differs between Python versions."""
    parts = [code.co_code, repr((code.co_names, code.co_varnames, code.co_freevars,
                                 code.co_cellvars, code.co_argcount, code.co_kwonlyargcount,
                                 code.co_flags)).encode("utf-8", "surrogatepass")]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            parts.append(_code_text(const))
        else:
            parts.append(_const_text(const).encode("utf-8", "surrogatepass"))
    return b"\0".join(parts)


def _const_text(const):
    # type: (object) -> str
    """repr() of a code object's constant, but a frozenset's items sorted: its repr lists
    them in hash order, which PYTHONHASHSEED changes for str (x in {'a', 'b'} compiles to
    one), so the function's cache would be another in every process."""
    if isinstance(const, frozenset):
        return "frozenset({%s})" % ", ".join(sorted(_const_text(item) for item in const))
    if isinstance(const, tuple) and any(isinstance(item, (frozenset, tuple)) for item in const):
        return "(%s)" % "".join(_const_text(item) + ", " for item in const)
    return repr(const)


_NAME_LIMIT = 160              # bytes of a cache's name: room for -wal, .values/ and temp files


def _file_name(identity):
    # type: (str) -> str
    """A file name for the cache of identity, safe on every platform.

    Names that differ only in case (Process and process) would be one file on macOS and
    Windows, and very long ones are refused by filesystems (255 bytes, and SQLite adds
    -wal to it): each of those gets a digest of the whole identity instead."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in identity)
    if len(safe.encode("utf-8")) > _NAME_LIMIT:
        safe = safe.encode("utf-8")[:_NAME_LIMIT].decode("utf-8", "ignore")
    if safe != identity or not safe.isascii() or safe != safe.lower():
        safe += "-" + _sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return safe + ".db"


# == memoize: the cache of one function -----------------------------------------------------------
# _FunctionCache opens the function's store on first use (_default_dir, _make_cache_dir, the
# trust and source checks), keys calls (key()), counts hits and misses, and gets, puts and
# records failures through the _Store; a cache that cannot be used warns, and the function
# runs uncached.

class _FunctionCache:
    """The cache of one memoized function: where it is, how its calls are keyed, its store
    (opened on first use) and its counters for this process. Its wrapper (_Wrapper) calls
    key() and get(), and on a miss runs the function in a _Miss, which put()s the result or
    fail()s it.

    When the cache cannot be used, results are still returned (the cache fails open): it warns
    once, saying why and what to do, and counts the results it could not store. With strict
    (memoize(strict=True) or PERSIST_STRICT=1) it raises instead. A cache that could not be
    opened is tried again _REOPEN_AFTER seconds later (the disk may have room by then), or
    ten times as long as the failed try took, whichever is longer: trying costs a call at
    most a tenth of its time, even where opening waits long before it fails (a locked file).
    """

    # (positional names, ignore, *args ignored) for _leave_out, where ignore= left some out
    leave_out: "Optional[Tuple[List[str], FrozenSet[str], bool]]" = None
    store: "Optional[_AnyStore]"
    broken: "Optional[OSError]"
    _path: "Optional[str]"
    failed_versions: "Optional[List[str]]"   # other versions with failure records

    def __init__(self, func, cache_dir, name, version, expire, ignore, key, strict, label,
                 store=None):
        # type: (_Func, Optional[_StrPath], Optional[str], object, _Expire, FrozenSet[str], Optional[_Func], bool, str, _StoreOption) -> None
        seconds = _seconds(expire)
        self.func = func
        self.identity = name or _identity(func)
        self.version = repr(version)
        self.expire = seconds
        self.strict = strict
        self.parameters = {"cache_dir": cache_dir, "name": name, "version": version,
                           "expire": expire, "ignore": ignore, "key": key, "strict": strict,
                           "store": store}
        self.asked = store           # the store asked for; which one: kind, with path
        self.cache_dir = None if cache_dir is None else os.path.abspath(os.fsdecode(cache_dir))
        self.default_dir = _default_dir(func)
        self.source = None if name else _source_file(func)    # for _check_source()
        self._path = None
        self.kind = None             # type: Optional[str]
        self.prefix = ""             # the name of its store of files (see path)
        self._begin()
        self._keys(name, ignore, key, label)

    def _begin(self):
        # type: () -> None
        """The state of this cache in this process, as it begins: its counters, and no store
        yet (a cache that arrives by value begins so too: see _received_cache)."""
        self.hits = self.misses = self.unstored = 0
        self.saved = 0.0          # seconds of computing that this process's hits saved
        self.store = None
        self.broken = None        # the error that keeps the cache from being opened
        self.reopen = 0.0         # the time.monotonic() from which to try again
        self.warned = False       # one warning per function is enough
        self.failed_versions = None   # see older_failures()

    def _keys(self, name, ignore, key, label):
        # type: (Optional[str], FrozenSet[str], Optional[_Func], str) -> None
        """How calls are keyed: salt, what func carries besides its arguments (_salt);
        owner, of its entries (see _CREATE), or None for a plain function; live, what it
        keys at each call besides its arguments; bind(args, kwargs), what keys a call
        (_binder, or key=); key_from(material), the key of what bind() made."""
        func = self.func
        # memoize(name=...) names what the cache holds: what func carries is the caller's word
        self.salt, self.live, self.owner = (self.version, (), None) if name else \
            _salt(func, self.version, key, ignore)
        if not name:
            _check_defaults(func, self.identity, self.salt)
        bind = _binder(func, ignore, label) if key is None else (
            lambda args, kwargs: key(*args, **kwargs))   # type: _Bind
        if self.live:
            bind = _with_state(bind, self.live, label)
        self.bind = bind
        if ignore and key is None:    # _binder() has checked the names against the signature
            params = _parameters(func)
            self.leave_out = ([name for name, kind, _ in params if kind in (0, 1)], ignore,
                              any(kind == 2 and name in ignore for name, kind, _ in params))
        self.key_from = _keyer(self.salt)

    def __reduce__(self):
        # type: () -> Tuple[Any, ...]
        """A memoized function that travels by value (cloudpickle sends the functions of
        __main__ and of a function's locals so: Dask, joblib's loky, Ray) has no cache on the
        other side (_UnattachedCache): its calls there run the function, and store nothing
        where the driver would never look. persist.map stores what they return here."""
        state = {name: value for name, value in vars(self).items() if name in _TRAVELS}
        state["_path"] = self.path
        _BY_VALUE[id(self)] = self
        return _received_cache, (state, (_RUN, id(self)))

    def key(self, args, kwargs, material=_MISSING):
        # type: (_Args, _Kwargs, Any) -> bytes
        """The key of a call, which every wrapper takes (the plain function's has it inline,
        a call less on each hit: see _function_wrapper): material is what bind() made of
        args and kwargs, where the caller has it already. A wrong call raises TypeError in
        bind(), naming the function, as the call would; arguments that cannot be keyed, a
        TypeError or RecursionError naming the parameter (_unkeyable)."""
        if material is _MISSING:
            material = self.bind(args, kwargs)
        try:
            return self.key_from(material)
        except Exception as exc:
            raise _unkeyable(self.func, args, kwargs, exc) from None

    def key_in(self, version, material):
        # type: (str, Any) -> bytes
        """The key that material (of bind()) would have under another version= (its repr):
        keys are salted with the version, then with what func carries (see _salt)."""
        return _keyer(version + self.salt[len(self.version):])(material)

    @property
    def path(self):
        # type: () -> str
        """The cache's file (SQLite) or directory (files): which store is settled here, once
        (see _store_kind)."""
        if self._path is None:
            name = _file_name(self.identity)
            self.prefix = name[:-len(".db")] + ".files"     # its store of files' name
            if self.asked is not None and not isinstance(self.asked, str):
                self.kind = "mapping"                       # its keys: under the prefix
                self._path = _MappingObjects(self.asked, self.prefix, "r").path
                return self._path
            directory = os.path.abspath(self.cache_dir or _env_dir() or self.default_dir)
            kind = _store_kind(directory, self.asked, "memoize(store=%r)" % (self.asked,))
            self.kind = kind
            self._path = os.path.join(directory, self.prefix if kind == "files" else name)
        return self._path

    def trouble(self, what, exc, computed=False):
        # type: (str, Exception, bool) -> None
        """A cache error: raise it (strict), or warn once, saying what to do, and go on.

        A PersistError other than the trust check's is raised too, before the function runs;
        once it ran (computed), its result is returned: such an error found only when storing
        it (a link planted at the .values directory meanwhile) costs it nothing."""
        # An unclear $PERSIST_STRICT was refused at the first call; set since, it keeps results.
        if self.strict or _env_strict() or (isinstance(exc, PersistError) and not computed
                                            and not _untrusted(exc)):
            if isinstance(exc, OSError) and exc.filename is None and exc.errno and \
                    not isinstance(exc, PersistError):
                # a write's own error names no file ("No space left on device"): say which
                # cache, and what to do, as the warning would (OSError() makes the subclass)
                raise OSError(exc.errno, "%s: %s() %s this cache; %s (strict raises instead "
                              "of going on without it)" % (
                                  exc.strerror, self.identity, what,
                                  _advice(exc, self.kind == "mapping")),
                              self.path) from exc
            raise exc
        if not self.warned:
            self.warned = True
            _warn("%s() %s %s (%s); %s. Results are returned; those not stored are counted "
                  "in cache_info().unstored, without more warnings; memoize(strict=True) or "
                  "PERSIST_STRICT=1 raises instead" % (self.identity, what, self.path, exc,
                                                       _advice(exc, self.kind == "mapping")))

    def open(self, create=True):
        # type: (bool) -> Optional[_AnyStore]
        with _OPEN_LOCK:
            if self.store is None and (self.broken is None or
                                       time.monotonic() >= self.reopen):
                _check_env_strict()              # before the call: nothing is lost
                path = self.path          # (which settles kind)
                objects = _MappingObjects(self.asked, self.prefix, "c") \
                    if self.kind == "mapping" else None
                if not create and not (os.path.exists(path) if objects is None else
                                       objects.exists(objects.join("store"))):
                    return None
                start = time.monotonic()
                store = None              # type: Optional[_AnyStore]
                try:
                    if objects is not None:
                        store = _FileStore(self.path, "c", objects=objects)
                    else:
                        _make_cache_dir(os.path.dirname(self.path))
                        store = _open_store(self.path, "c", self.kind or "sqlite")
                    want = {"function": self.identity, "version": self.version,
                            "expire": repr(self.expire)}
                    info: "Dict[str, str]" = {}
                    try:
                        info = store.info()      # never drops results: see prune()
                        if any(info.get(name) != value for name, value in want.items()):
                            store.set_info(want)
                    except PermissionError:      # a read-only cache still serves its results
                        pass
                    if self.owner is not None:   # best effort: what ls calls stale, at worst
                        store.own()
                        code = _latest_code(info.get("code"), self.owner)
                        if info.get("code") != code:
                            with contextlib.suppress(OSError):
                                store.set_info({"code": code})
                    _check_source(store, self)
                except OSError as exc:
                    if store is not None:        # opened, then failed (a full disk): let go
                        store.close()
                    # raised here, at every call: strict, or not a cache persist may use
                    self.trouble("is running without its cache: cannot open", exc)
                    self.broken = exc
                    now = time.monotonic()
                    self.reopen = now + max(_REOPEN_AFTER, 10 * (now - start))
                    return None
                self.store, self.broken = store, None
            return self.store

    def get(self, key):
        # type: (bytes) -> Tuple[Any, float]
        """(the cached result for the call whose key is key, or _MISSING; the seconds its
        call took, which the hit saved: 0.0 on a miss, or where not known)."""
        store = self.store if self.store is not None else self.open()
        value = _MISSING
        if store is not None:
            row: "Optional[_Row]" = None
            try:
                if self.expire is None:       # two columns of the row, not four (see _HIT)
                    found = store.hit(key)
                    if found is not None:
                        data, took = found
                        if isinstance(data, bytes):   # the pickle, in the row: most hits
                            value = pickle.loads(data)
                            seconds = took or 0.0
                        else:                         # a value file's, or crafted (see _HIT)
                            row = store.get(key)
                else:
                    row = store.get(key)
                if row is not None:
                    if row[1] is not None and isinstance(store, _Store):
                        store.values.check([row[1]])   # corrupt: raise before computing
                    if self.expire is None or not _expired(row[2], self.expire):
                        # load(), without a call when the pickle is in the row
                        value = pickle.loads(row[0]) if row[1] is None else store.load(row)
                        seconds = row[3] or 0.0
                if value is not _MISSING:
                    self.hits += 1
                    self.saved += seconds
            except FileNotFoundError as exc:
                # Replaced since get() (a writer removed the file its row named): computed
                # again, stored anew. A row that still names it lost it otherwise (removed by
                # hand, or by a cleaner): that says so, as a file cut short does.
                with contextlib.suppress(OSError):
                    if row is not None and row[1] is not None:
                        again = store.get(key)
                        if again is not None and again[1] == row[1]:
                            self.unloadable(store, row, exc)
            except RecursionError:       # a deep recursion of the caller's: as it is
                raise
            except OSError as exc:
                self.trouble("computes a result again: cannot read", exc)
            except Exception as exc:
                self.unloadable(store, row, exc)
        # _debug(), only where logging is imported: a call less on each hit and miss
        if value is not _MISSING:             # said after the try: no "cannot be loaded" for it
            if _LOG is not None or "logging" in sys.modules:
                _debug("hit", self.identity, key)
            return value, seconds
        self.misses += 1
        if _LOG is not None or "logging" in sys.modules:
            _debug("miss", self.identity, key)
        return _MISSING, 0.0

    def unloadable(self, store, row, exc):
        # type: (_AnyStore, Optional[_Row], Exception) -> None
        """Warn that the stored result in row cannot be loaded, naming the file that holds
        it: it is computed again."""
        where = self.path if row is None or row[1] is None or not isinstance(store, _Store) \
            else store.values.path(row[1])
        _warn("a cached result of %s() cannot be loaded from %s (%s: %s); computing it again, "
              "to store it anew" % (self.identity, where, type(exc).__name__, exc))

    def put(self, key, value, args, seconds):
        # type: (bytes, Any, _Call, float) -> None
        store = self.store
        if store is None:
            self.unstored += 1
            return
        try:
            forget = self.older_failures(store, args)
            if self.leave_out is not None:
                args = _leave_out(args, *self.leave_out)
            store.put(key, value, _PROTOCOL, seconds, self.version, _short_repr(args),
                      forget, self.owner)
        except _HandlerBusy:          # a call in a signal handler: this once, nothing to fix
            self.unstored += 1
        except OSError as exc:
            self.unstored += 1
            self.trouble("could not store a result in", exc, computed=True)
        except Exception as exc:
            # Pickling failed (a RecursionError too: a result nested deeper than pickle goes,
            # or a call this deep in a recursion): the result is computed, and returned.
            # (unpicklable()'s work, inline: deep in a recursion, a frame more is one too many)
            self.unstored += 1
            deep = _too_deep(exc)
            try:
                strict = self.strict or _env_strict()
            except RecursionError:       # no stack left even to read $PERSIST_STRICT
                strict = self.strict
            if strict:
                raise TypeError("a result of %s() cannot be pickled (%s: %s), so it cannot be "
                                "stored in %s; strict raises instead of returning it%s"
                                % (self.identity, type(exc).__name__, exc, self.path,
                                   _DEEP_ADVICE if deep else "")) from exc
            # with the stack full, even the warning may not fit: the result matters more
            with contextlib.suppress(RecursionError):
                _warn("a result of %s() cannot be pickled (%s: %s); it is returned but not "
                      "cached%s" % (self.identity, type(exc).__name__, exc,
                                    _DEEP_ADVICE if deep else ""))
        else:                         # not in the try: stored is stored, whatever logging does
            if _LOG is not None or "logging" in sys.modules:     # (as in get())
                _debug("stored", self.identity, key)

    def unpicklable(self, exc):
        # type: (Exception) -> None
        """A result could not be pickled (exc): count it unstored, and warn, or raise the
        TypeError that says so with strict (as put() does, inline, for one result)."""
        self.unstored += 1
        deep = _too_deep(exc)
        try:
            strict = self.strict or _env_strict()
        except RecursionError:       # no stack left even to read $PERSIST_STRICT
            strict = self.strict
        if strict:
            raise TypeError("a result of %s() cannot be pickled (%s: %s), so it cannot be "
                            "stored in %s; strict raises instead of returning it%s"
                            % (self.identity, type(exc).__name__, exc, self.path,
                               _DEEP_ADVICE if deep else "")) from exc
        # with the stack full, even the warning may not fit: the result matters more
        with contextlib.suppress(RecursionError):
            _warn("a result of %s() cannot be pickled (%s: %s); it is returned but not "
                  "cached%s" % (self.identity, type(exc).__name__, exc,
                                _DEEP_ADVICE if deep else ""))

    def put_many(self, entries):
        # type: (List[Tuple[bytes, Any, _Call, float]]) -> List[Tuple[bool, Optional[Exception]]]
        """put() each of entries, (key, value, call, seconds), in one transaction where it
        can (persist.map's results, a batch at a time, at the caller: a commit is most of a
        put). Returns for each (whether it was stored, what put() would have raised: strict,
        for a result that cannot be pickled, else None). When the transaction fails, each is
        put() alone (which says what went wrong), and on a Ctrl-C too, before it goes on:
        what came back stays stored."""
        store = self.store
        errors: "List[Tuple[bool, Optional[Exception]]]" = []
        if store is not None and len(entries) > 1:
            try:
                rows = []
                for key, value, call, seconds in entries:
                    forget = self.older_failures(store, call)
                    args = call if self.leave_out is None else _leave_out(call, *self.leave_out)
                    rows.append((key, value, seconds, self.version, _short_repr(args), forget,
                                 self.owner))
                failed = store.put_many(rows)
            except Exception:
                pass                        # each alone, below
            except BaseException:
                for entry in entries:
                    with contextlib.suppress(Exception):     # strict's: the Ctrl-C matters
                        self.put(*entry)
                raise
            else:
                for exc in failed:
                    error: "Optional[Exception]" = None
                    if exc is not None:
                        try:
                            self.unpicklable(exc)
                        except TypeError as strict:
                            error = strict
                    errors.append((exc is None, error))
                if _LOG is not None or "logging" in sys.modules:
                    for (key, _, _, _), exc in zip(entries, failed):
                        if exc is None:
                            _debug("stored", self.identity, key)
                return errors
        for position, entry in enumerate(entries):
            unstored = self.unstored
            try:
                self.put(*entry)
            except Exception as exc:        # strict: raised, as the call itself would
                errors.append((False, exc))
            except BaseException:           # a Ctrl-C: this one (again) and the rest first
                for rest in entries[position:]:
                    with contextlib.suppress(Exception):
                        self.put(*rest)
                raise
            else:
                errors.append((self.unstored == unstored, None))
        return errors

    def older_failures(self, store, call):
        # type: (_AnyStore, _Call) -> List[bytes]
        """The keys of call under the other versions that have failure records here: a
        success under this version (which a version= bump made) ends them too. The versions
        are read once a process (reading them at each store would scan the records)."""
        try:
            if self.failed_versions is None:
                self.failed_versions = [version for version in store.failed_versions(
                    self.version) if version is not None]
            if not self.failed_versions:
                return []
            material = self.bind(*call)
            return [self.key_in(version, material) for version in self.failed_versions]
        except Exception:                # best effort (a RecursionError too, deep in a
            return []                    # recursion): the result is stored all the same

    def fail(self, key, call, exc, seconds):
        # type: (bytes, _Call, Exception, float) -> None
        """Record in the cache's failure ledger that the call keyed key raised exc. It never
        raises: the caller is about to re-raise exc, and that is the error that matters."""
        store = self.store
        # A recursion too deep passes through every level of a memoized recursion: a record
        # at each would take a transaction and a traceback a frame, with the stack full.
        if store is None or isinstance(exc, RecursionError):
            return
        # when the call started, taken before the record is made (a traceback to format, a
        # call to pickle): a result another process stored after the start must win, and a
        # start taken late would miss one stored meanwhile (see _record_failure)
        started = time.time() - seconds
        try:
            record = _failure_record(call, exc, seconds, self.version)
            store.record_failure(key, started, record, self.owner, self.expire)
        except Exception as trouble:
            # best effort: a cache that cannot take the record (read-only, full) warns once,
            # and even strict=True lets the user's exception through rather than this one
            with contextlib.suppress(Exception):
                self.trouble("could not record a failed call in", trouble)


# what of a _FunctionCache goes with it by value: how it keys calls, and what it says of itself
_TRAVELS = frozenset(["func", "identity", "version", "expire", "strict", "parameters",
                      "cache_dir", "salt", "live", "owner", "leave_out", "asked", "kind",
                      "prefix"])


class _UnattachedCache(_FunctionCache):
    """The cache of a memoized function loaded from a pickle made by value, in another
    process (see _FunctionCache.__reduce__): none. Each call misses, runs the function and
    stores nothing; cache_info() counts the misses, and its entries are 0."""

    def open(self, create=True):
        # type: (bool) -> Optional[_AnyStore]
        return None


def _received_cache(state, origin=None):
    # type: (Dict[str, Any], Optional[Tuple[str, int]]) -> _FunctionCache
    """The cache of a memoized function loaded from a pickle made by value (see
    _FunctionCache.__reduce__): an _UnattachedCache, or in the process that made it, the
    cache itself (see _BY_VALUE). (A function, not a classmethod: cloudpickle sends a
    classmethod by value, with the globals it names.)"""
    here = _BY_VALUE.get(origin[1]) if origin is not None and origin[0] == _RUN else None
    if isinstance(here, _FunctionCache) and here.path == state["_path"] and \
            here.identity == state["identity"]:
        return here
    cache = object.__new__(_UnattachedCache)
    cache.__dict__.update(state)
    cache.default_dir, cache.source = "", None
    cache._begin()
    cache.bind, cache.key_from = _no_binding, _no_key     # no key is looked up there
    return cache


# The memoized functions' caches and wrappers pickled by value here, by id: one loaded back in
# this process is the original, not a copy with no cache. Dask's tokenize (client.submit,
# dask.delayed) loads each pickle it makes, and cloudpickle, loading a class of __main__ in the
# process that defined it, sets the class's attributes to what it loaded: Model.predict here
# became a copy that stored nothing and keyed every call alike.
_BY_VALUE: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def _no_binding(args, kwargs):
    # type: (_Args, _Kwargs) -> None
    return None


def _no_key(material):
    # type: (Any) -> bytes
    return b""


if TYPE_CHECKING:      # the same named tuples, with the types of their fields
    class _CacheInfo(NamedTuple):
        hits: int
        misses: int
        entries: int
        path: str
        unstored: int
        failures: int
        seconds: float
        saved: float

        @property
        def currsize(self) -> int: ...
        @property
        def maxsize(self) -> None: ...

    class _Failure(NamedTuple):
        args: Optional[str]
        type: str
        message: str
        count: int     # type: ignore[assignment]  # a field named as tuple.count, as at run time
        first: float
        last: float
        seconds: Optional[float]
        version: Optional[str]
        traceback: str
        call: "Optional[_FailedCall]"
        call_error: Optional[str]

    class _FailedCall(NamedTuple):
        args: Tuple[Any, ...]
        kwargs: Dict[str, Any]
else:
    class _CacheInfo(collections.namedtuple(
            "CacheInfo", "hits misses entries path unstored failures seconds saved")):
        """cache_info(): also by lru_cache's names, currsize (entries) and maxsize (None: no
        bound), for code written against lru_cache."""

        __slots__ = ()
        currsize = property(lambda self: self.entries)
        maxsize = None

    _CacheInfo.__name__ = "CacheInfo"    # its repr(), as before
    _Failure = collections.namedtuple(
        "Failure", "args type message count first last seconds version traceback call "
        "call_error")
    _FailedCall = collections.namedtuple("Call", "args kwargs")
    # pickle finds a class by __qualname__: these, by their names here, so that records and
    # their calls travel to a process pool (repr() keeps __name__)
    _Failure.__qualname__, _FailedCall.__qualname__ = "_Failure", "_FailedCall"


_OPEN_LOCK = _thread.RLock()   # one thread at a time opens a cache (a signal handler may re-enter)

_DEEP_ADVICE = ("; return a flatter structure: pickle recurses once per level of nesting, "
                "within a limit of its own from Python 3.12 on")


def _default_dir(func):
    # type: (_Func) -> str
    """.persist beside the file that defines func, else in the current directory."""
    filename = _source_file(func)
    if filename is not None:
        return os.path.join(os.path.dirname(os.path.abspath(filename)), ".persist")
    return os.path.join(os.getcwd(), ".persist")


def _env_dir():
    # type: () -> Optional[str]
    """$PERSIST_DIR, with a leading ~ expanded as a shell does: set where no shell reads it
    (a Dockerfile's ENV, a systemd unit, an IDE's run configuration, a .env file) it made a
    directory named ~. Not $VARIABLES: that would change a name that holds a $."""
    text = os.environ.get("PERSIST_DIR")
    if not text or not text.startswith("~"):
        return text or None
    expanded = os.path.expanduser(text)
    # HOME set but empty: expanduser() makes ~/cache /cache, at the top of the filesystem
    if expanded.startswith("~") or (text.split("/")[0] == "~" and
                                    os.environ.get("HOME", None) == ""):
        raise PersistError(errno.EINVAL, "$PERSIST_DIR starts with ~, and there is no such "
                           "home directory (HOME unset or empty, or no such user): set it to "
                           "the whole path", text, reason=PersistError.NO_HOME)
    return expanded


def _env_strict():
    # type: () -> Optional[bool]
    """$PERSIST_STRICT, read as people write a yes or a no (in any case): None for anything
    else. "false" is no: any value but 0 and nothing used to make every function strict."""
    text = os.environ.get("PERSIST_STRICT", "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    return None


def _check_env_strict():
    # type: () -> None
    """Refuse a $PERSIST_STRICT that is neither a yes nor a no, before any call runs."""
    if _env_strict() is None:
        raise ValueError("PERSIST_STRICT=%r is neither a yes (1, true, yes, on) nor a no (0, "
                         "false, no, off, or empty); set it to one of them (in any case)"
                         % os.environ["PERSIST_STRICT"])


def _make_cache_dir(directory):
    # type: (str) -> None
    """Create directory with a .gitignore of '*', so a cache never lands in a commit."""
    if os.path.isdir(directory):
        return
    # Checked before anything is made: a cache refused in another user's directory (root in a
    # container, in a mounted project) must not leave a root-owned directory there, which
    # would break that user's own cache for good.
    existing = directory
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    _check_private(existing, "the cache's directory")
    # Each level with persist's mode: os.makedirs() gives the ones above the last the umask's.
    made = [directory]
    while os.path.dirname(made[-1]) != made[-1] and \
            not os.path.isdir(os.path.dirname(made[-1])):
        made.append(os.path.dirname(made[-1]))
    mine = []                             # the levels this process made
    for level in reversed(made):
        with contextlib.suppress(FileExistsError):
            os.mkdir(level, _DIR_MODE)
            mine.append(level)
    try:
        with contextlib.suppress(FileExistsError):
            with _atomic_open(os.path.join(directory, ".gitignore"), "x", sync=False,
                              follow=False, bits=_FILE_MODE) as file:
                file.write("*\n")
    except BaseException:
        # A full disk: what we made goes too, so that the next try (see _FunctionCache.open) makes
        # it again with its .gitignore. Best effort: another process may be filling it.
        for level in reversed(mine):
            try:
                os.rmdir(level)
            except OSError:
                break
        raise


def _check_source(store, cache):
    # type: (_AnyStore, _FunctionCache) -> None
    """Refuse a cache that a function of another file filled under the same name.

    Two projects with one PERSIST_DIR may each have a job.py with a load(): their caches
    have one name. The file that defines the function is recorded in the cache's Info
    table; a cache recorded for a file that still exists elsewhere is refused. One whose
    file is gone (the project moved) is adopted. A cache beside its source file is not
    checked: a copied project brings its own cache along.
    """
    source = cache.source
    if source is None or os.path.dirname(cache.path) == cache.default_dir:
        return
    recorded = store.info().get("source")
    if recorded == source:
        return

    def another(recorded):
        # type: (Optional[str]) -> bool
        return (recorded is not None and os.path.exists(recorded)
                and not os.path.samefile(recorded, source))

    try:
        recorded = store.claim_source(source, another)
    except OSError:     # best effort: a read-only cache is still used and keeps its record
        pass
    if another(recorded):
        store.close()
        raise PersistError(errno.EEXIST, (
            "this cache holds the results of %s() defined in %s, which still exists, but this "
            "%s() is defined in %s: two projects share one cache directory. Give one of them "
            "memoize(cache_dir=...) or unset PERSIST_DIR; if both files are the same code, "
            "pass memoize(name=%r) to share the cache"
            % (cache.identity, recorded, cache.identity, source, cache.identity)), cache.path,
            reason=PersistError.NAME_CLASH)


def _latest_code(recorded, owner):
    # type: (Optional[str], str) -> str
    """The cache's record of the code of the latest run, once this run opened it for owner:
    'run tag tag ...'. A run's nested helpers of one name chosen by an if each have a code
    of their own, and none is stale; the earlier code of an edited one is."""
    run, *codes = (recorded or "").split() or [""]
    if run != _RUN:
        codes = []
    code = owner[:_CODE_TAG]
    return " ".join([_RUN] + codes + ([] if code in codes else [code]))


def _advice(exc, mapping=False):
    # type: (BaseException, bool) -> str
    """What to do about an OSError that keeps a cache from being used (in a mapping: an
    object store's, where cache_dir= and $PERSIST_DIR change nothing)."""
    code = getattr(exc, "errno", None)
    if mapping:
        return ("check the store's address, bucket and credentials (the mapping's error says "
                "what failed), or pass memoize(store=) another mapping")
    if _untrusted(exc):                    # the error says what to change
        return "or else set cache_dir= or $PERSIST_DIR to a directory of your own"
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", None):
        return "free some disk space"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ("make the cache writable, or set cache_dir= or $PERSIST_DIR to a directory "
                "you may write")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way of the cache directory: move it, or set cache_dir= or " \
               "$PERSIST_DIR to a directory"
    return "fix the cause, or set cache_dir= or $PERSIST_DIR to another directory"


def _untrusted(exc):
    # type: (BaseException) -> bool
    """Whether exc is the trust check's refusal (see _check_private): a cache others could
    plant pickles in. persist raises the other PersistErrors (a file that is not a cache, one
    of a newer format) at every use; with this one it runs uncached, as with a full disk."""
    return isinstance(exc, PersistError) and exc.reason in _UNTRUSTED


def _warn(message):
    # type: (str) -> None
    """Warn at the user's line: the first caller outside this file (and contextlib's, which
    runs done_dir()'s end at the with statement)."""
    frame: "Optional[types.FrameType]"
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename in (__file__, contextlib.__file__):
        frame, level = frame.f_back, level + 1
    import warnings
    warnings.warn(message, PersistWarning, stacklevel=level)


_DEBUG = 10                     # logging.DEBUG, without importing logging
_LOG: "Any" = None              # the 'persist' logger (logging.Logger), once imported


def _debug(event, identity, key):
    # type: (str, str, bytes) -> None
    """'identity: event key' at DEBUG on the 'persist' logger, once the program uses logging
    at all (the key shortened to 12 hex digits)."""
    global _LOG
    if _LOG is None:
        # Not imported, or not yet in full (another thread is importing it; its first lines
        # put it in sys.modules): nobody can have asked for these messages yet
        logging = sys.modules.get("logging")
        if logging is None or getattr(getattr(logging, "__spec__", None), "_initializing",
                                      False):
            return
        try:
            _LOG = logging.getLogger("persist")
        except Exception:                   # half imported all the same: later
            return
    if _LOG.isEnabledFor(_DEBUG):
        _LOG.debug("%s: %s %s", identity, event, key[:6].hex())


def _short_repr(call):
    # type: (_Call) -> Optional[str]
    """f's arguments as '(1, 'a', key=2)', shortened for people, on one line."""
    args, kwargs = call
    try:
        parts = [_short(a) for a in args]
        parts += ["%s=%s" % (k, _short(v)) for k, v in kwargs.items()]
    except Exception:           # a repr that fails must not cost the result
        return None
    text = "(%s)" % ", ".join(parts)
    return text if len(text) <= 200 else text[:199] + "\u2026"


_AS_REPR = frozenset({float, bool, type(None)})    # _SHORT leaves their repr() as it is


def _short(value):
    # type: (Any) -> str
    """_SHORT.repr(value), without the calls it makes where it leaves repr() as it is: a number,
    None, a short str, the usual arguments (each miss stores its call's: see put())."""
    kind = type(value)
    if kind in _AS_REPR or kind is int and value.bit_length() < 120:   # 37 digits: < maxlong
        return repr(value)
    if kind is str and len(value) <= _SHORT.maxstring:
        text = repr(value)
        if len(text) <= _SHORT.maxstring:
            return text
    return _SHORT.repr(value)


def _leave_out(call, names, ignore, rest):
    # type: (_Call, List[str], FrozenSet[str], bool) -> _Call
    """call's (args, kwargs) without the parameters in ignore, so that 'persist show' does
    not list what the key left out; names: the positional parameters; rest: ignore names
    the *args parameter."""
    args, kwargs = call
    args = tuple(value for i, value in enumerate(args)
                 if not (names[i] in ignore if i < len(names) else rest))
    return args, {name: value for name, value in kwargs.items() if name not in ignore}


def _without_addresses(text):
    # type: (str) -> str
    """repr() text without the ' at 0x7f...' of default reprs: the address differs from call
    to call where the key does not, and would make one argument look like many."""
    start = text.find(" at 0x")
    while start >= 0:
        end = start + 6
        while end < len(text) and text[end] in "0123456789abcdefABCDEF":
            end += 1
        if end > start + 6:
            text = text[:start] + text[end:]
        start = text.find(" at 0x", start + 1)
    return text


class _ShortRepr(reprlib.Repr):
    """reprlib.Repr with bounded work for what it leaves to repr() or sorts in full."""

    fillvalue = "..."           # an attribute of Repr itself from 3.11 on

    def repr_instance(self, x, level):
        # type: (object, int) -> str
        # as reprlib's, with the address left out before the cut, which could keep part of it
        try:
            text = _without_addresses(repr(x))
        except Exception:
            return "<%s instance>" % type(x).__name__
        if len(text) > self.maxother:
            i = max(0, (self.maxother - 3) // 2)
            j = max(0, self.maxother - 3 - i)
            text = text[:i] + self.fillvalue + text[len(text) - j:]
        return text

    def repr1(self, x, level):
        # type: (object, int) -> str
        # A repr of many lines (a DataFrame's) on one; each part cut to maxother as reprlib does.
        text = super().repr1(x, level)
        return " ".join(text.split()) if "\n" in text else text

    def repr_bytes(self, x, level):     # reprlib would repr() all of it, then cut
        # type: (bytes, int) -> str
        if len(x) <= self.maxstring:
            return repr(x)
        i = max(0, (self.maxstring - 3) // 2)
        j = max(0, self.maxstring - 3 - i)
        text = repr(x[:i] + x[len(x) - j:])
        return text[:i] + self.fillvalue + text[len(text) - j:]

    repr_bytearray = repr_bytes

    def repr_int(self, x, level):       # repr() of a huge int is slow, past 4300 digits refused
        # type: (int, int) -> str
        # digits refused
        if x.bit_length() > 4096:
            return "<int of about %d digits>" % int(x.bit_length() * 0.30103 + 1)
        return super().repr_int(x, level)

    def repr_dict(self, x, level):      # reprlib sorts every key first
        # type: (Dict[Any, Any], int) -> str
        return super().repr_dict(x, level) if len(x) <= 100 else self._first_items(x, level)

    def repr_set(self, x, level):
        # type: (Union[Set[Any], FrozenSet[Any]], int) -> str
        # (ignore[arg-type]: this is repr_frozenset too; reprlib's repr_set formats either)
        return (super().repr_set(x, level)  # type: ignore[arg-type]
                if len(x) <= 100 else self._first_items(x, level))

    repr_frozenset = repr_set

    def _first_items(self, x, level):
        # type: (Union[Dict[Any, Any], Set[Any], FrozenSet[Any]], int) -> str
        """The first few items in x's own order: sorting a large one is not worth its time."""
        if isinstance(x, dict):
            inner = ", ".join("%s: %s" % (self.repr1(k, level - 1), self.repr1(v, level - 1))
                              for k, v in itertools.islice(x.items(), 4))
            return "{%s, %s}" % (inner, self.fillvalue)
        inner = ", ".join(self.repr1(item, level - 1) for item in itertools.islice(x, 6))
        return ("{%s, %s}" if type(x) is set else "frozenset({%s, %s})") % (inner, self.fillvalue)


_SHORT = _ShortRepr()            # arguments shortened for people ('persist show')
_SHORT.maxstring = _SHORT.maxother = 40


# == memoize: explain -----------------------------------------------------------------------------
# f.explain(*args) says what a call would do now, without running it: hit, miss, expired,
# failed before, or stored by other code or another version.

def _explain(cache, key, material):
    # type: (_FunctionCache, bytes, Any) -> _Explanation
    """An _Explanation of what a call whose key is key would do now; material: what bind()
    made of the call, to key it under other versions. Nothing is counted, nothing stored."""
    path = cache.path
    if isinstance(cache, _UnattachedCache):     # path is the sending process's
        return _Explanation("no entry", path, "miss: no cache in this process: this memoized "
                            "function came by value (cloudpickle: Dask, joblib's loky, Ray) and "
                            "runs here as the plain function, storing nothing; its cache %s "
                            "is in the process that sent it" % path)
    try:
        store = cache.open(create=False)
        broken = cache.broken
    except OSError as exc:                 # strict=True, or not safe to use: calls raise it
        store, broken = None, exc
    if broken is not None:
        return _Explanation("cannot open", path, "miss: the cache %s cannot be opened (%s)"
                            % (path, broken), error=str(broken))
    if store is None:
        return _no_cache_yet(cache)
    try:
        return (_explain_entry(cache, store, key) or _explain_failure(store, key, path) or
                _explain_other_versions(cache, store, material) or
                _Explanation("no entry", path, "miss: no entry in %s" % path))
    except OSError as exc:
        return _Explanation("cannot open", path, "miss: the cache %s cannot be read (%s)"
                            % (path, exc), error=str(exc))


def _no_cache_yet(cache):
    # type: (_FunctionCache) -> _Explanation
    """Of a cache that does not exist: and of the caches of other code of the function
    beside it, if any."""
    text = "miss: no entry; the cache %s does not exist yet" % cache.path
    others = _other_code_caches(cache)
    if others:
        text += ("; beside it, %s %s of this function with other code: a function with "
                 "no source file is cached by its code (memoize(name=...) keeps results "
                 "while you edit it)" % (", ".join(others), "is one" if len(others) == 1
                                         else "are caches"))
    return _Explanation("no entry", cache.path, text)


def _other_code_caches(cache):
    # type: (_FunctionCache) -> List[str]
    """The caches beside cache's of the same function with other code: a function with no
    source file (a notebook, the REPL) or a lambda has a tag of its code in its cache's name
    (see _identity), so each edit starts a new cache."""
    identity = cache.identity
    stem = identity.rpartition("-")[0]
    if not stem or _file_name(identity) != identity + ".db" or identity != _identity(cache.func):
        return []                          # no tag, a name=, or a name with a digest added
    mine = os.path.basename(cache.path)
    try:
        names = os.listdir(os.path.dirname(cache.path))
    except OSError:
        return []
    return sorted(name for name in names
                  if name != mine and name.startswith(stem + "-") and name.endswith(".db")
                  and len(name) == len(mine))


def _explain_entry(cache, store, key):
    # type: (_FunctionCache, _AnyStore, bytes) -> Optional[_Explanation]
    """Of the entry stored under key: a hit, expired, or one that cannot be loaded (it is
    loaded, to be sure); None if there is none."""
    path = cache.path
    for attempt in range(2):           # a writer may replace the entry while we load it
        row = store.get(key)
        if row is None:
            return None
        stored, seconds = row[2], row[3]
        if cache.expire is not None and _expired(stored, cache.expire):
            return _Explanation("expired", path, "miss: expired; %s, and expire=%g s%s"
                                % (_stored_when(stored), cache.expire,
                                   _FROM_THE_FUTURE if stored > time.time() else ""),
                                stored=stored, seconds=seconds, version=cache.version)
        try:
            store.load(row)
        except FileNotFoundError as exc:
            if not attempt:            # replaced since get(): look again
                continue
            error = "%s: %s" % (type(exc).__name__, exc)   # removed (by hand)
        except OSError:
            raise
        except Exception as exc:
            error = "%s: %s" % (type(exc).__name__, exc)
        else:
            return _Explanation("hit", path, "hit: " + _stored_when(stored, seconds),
                                stored=stored, seconds=seconds, version=cache.version)
        return _Explanation("cannot load", path, "miss: the entry (%s) cannot be "
                            "loaded (%s); a call computes it again"
                            % (_stored_when(stored, seconds), error), stored=stored,
                            seconds=seconds, version=cache.version, error=error)
    return None                        # (not reached: the second attempt returns)


def _explain_failure(store, key, path):
    # type: (_AnyStore, bytes, str) -> Optional[_Explanation]
    """Of the call's record in the failure ledger, if any."""
    try:
        failed = store.failed(key)
    except OSError:                    # best effort: an early cache has no Failures table
        return None
    if not failed:
        return None
    count, last, kind, message = failed
    error = "%s: %s" % (kind, message)
    return _Explanation("failed before", path, "miss: no entry; the call failed %d time%s, "
                        "last %s ago (%s)" % (count, "" if count == 1 else "s",
                                              _age(max(0.0, time.time() - last)), error),
                        error=error, failures=count)


def _explain_other_versions(cache, store, material):
    # type: (_FunctionCache, _AnyStore, Any) -> Optional[_Explanation]
    """Of the same call stored under another version=, if any: the version is part of the
    key, so each other version that stored something here is looked up."""
    for version in store.versions(cache.version):
        if version is None:            # a row that memoize did not store
            continue
        found = store.stored(cache.key_in(version, material))
        if found:
            stored, version = found
            return _Explanation("another version", cache.path, "miss: no entry for "
                                "version=%s, and the version is part of the key; version=%s "
                                "has one, %s" % (cache.version, version, _stored_when(stored)),
                                stored=stored, version=version)
    return None


class _Explanation:
    """What explain() found: str() says it in a line; the attributes say it to programs.

    hit: whether a call would return a stored result; reason: "hit", "no entry", "expired",
    "another version", "cannot load", "failed before" or "cannot open"; path: the cache;
    stored and seconds: when the entry was stored (Unix time) and how long its call took;
    version: the version= that stored it (as its repr); error: why it cannot be loaded or
    opened, or the last failure; failures: how often the call failed since it last succeeded.
    """

    __slots__ = ("hit", "reason", "path", "stored", "seconds", "version", "error", "failures",
                 "_text")

    def __init__(self, reason, path, text, stored=None, seconds=None, version=None,
                 error=None, failures=0):
        # type: (str, str, str, Optional[float], Optional[float], Optional[str], Optional[str], int) -> None
        self.hit = reason == "hit"
        self.reason, self.path, self._text = reason, path, text
        self.stored, self.seconds, self.version = stored, seconds, version
        self.error, self.failures = error, failures

    def __str__(self):
        # type: () -> str
        return self._text

    def __repr__(self):
        # type: () -> str
        return "<explanation %s: %s>" % (self.reason, self._text)


def _expired(stored, expire):
    # type: (float, float) -> bool
    """Whether an entry stored at the Unix time stored is past expire= seconds. An entry
    stored further in the future than that is too: its writer's clock was ahead (a resumed
    VM, a container's skewed clock on a shared cache), or ours is behind, and its true age
    is unknown; taken as stored now, it would live until this clock got past its stamp."""
    return not abs(time.time() - stored) < expire     # (not <: a stamp that is no number too)


_FROM_THE_FUTURE = ("; an entry stored further in the future than expire= has expired too, "
                    "as its age cannot be known")


def _stored_when(stored, seconds=None):
    # type: (float, Optional[float]) -> str
    """'stored 2026-11-26 11:52 (3m ago), computed in 1.5 s' (the last part where known);
    of a stamp ahead of this clock, '(2h ahead of this clock)'."""
    ahead = stored - time.time()
    if ahead >= 1:
        text = "stored %s (%s ahead of this clock: the clock that stored it was ahead, or " \
               "this one is behind)" % (_when(stored), _age(ahead))
    else:
        text = "stored %s (%s ago)" % (_when(stored), _age(max(0.0, -ahead)))
    if seconds is None:
        return text
    if seconds >= 1:
        return text + ", computed in %.1f s" % seconds
    if seconds >= 0.001:
        return text + ", computed in %d ms" % (seconds * 1000)
    return text + ", computed in under 1 ms"


# == map ==========================================================================================
# persist.map(func, items) tries every item, in this process or in workers (its own pool of
# processes, remade when one dies, or an executor), through func's cache when it is memoized:
# _Run sends items in batches, runs again those a dead worker took with it (halving them to
# find the one that kills), shows progress, and raises the failures together (Failures).

def map(func: "Callable[[_T], _R]", items: "Iterable[_T]", *, workers: "Optional[int]" = None,
        executor: "Optional[concurrent.futures.Executor]" = None, keep_going: bool = True,
        progress: "Union[bool, Callable[..., Any], None]" = None,
        shard: "Optional[Tuple[int, int]]" = None) -> "List[_R]":
    """func(item) for every item, as a list in input order, going on past items that fail.

    results = persist.map(transform, records)              # every record is tried
    results = persist.map(transform, records, workers=8)   # in 8 processes

    keep_going=True: a failing item does not stop the others; once every item was tried, if
    any failed, Failures is raised, naming them (its .failures and .results hold them all).
    keep_going=False raises the first failure, as a plain loop would; with workers (or a
    thread pool), no item starts after it, and those running finish (and are stored); on
    another executor, a batch stops at its own failure, and those running elsewhere finish.

    func may be any callable. A memoized one (or a functools.partial of one) stores each
    result as it comes and records each failure (see its failures()): a rerun computes only
    what is missing or failed, and the summary tells reused results from computed ones.
    KeyboardInterrupt and SystemExit are not failures: they stop the run.

    workers=N runs the calls in N processes (concurrent.futures.ProcessPoolExecutor): func
    must pickle (a module-level function does; run the map under if __name__ == "__main__"
    in a script). executor= takes any concurrent.futures.Executor instead (threads, Dask's
    client.get_executor(), loky's), or any object whose submit(fn, *args) gives something
    with result() (submitit's executor). Either way one cache, this process's: each item is
    looked up here, only the misses are sent, the workers run the plain function (they need
    not see the cache), and each result is stored and each failure recorded here as it
    arrives. Ctrl-C stops persist.map's own workers at once, and cancels what an executor
    has not started; whatever arrived before stays stored. An item that kills its worker
    fails with BrokenProcessPool: persist.map replaces its own pool, or lets Dask replace
    its worker, and goes on (a process pool of yours that breaks: RuntimeError).

    progress: None shows a line on stderr that updates in place, when stderr is a terminal
    and the run takes more than about two seconds; True shows it from the start, wherever
    stderr goes; False shows none; a factory with tqdm's interface (progress=tqdm.tqdm)
    gets the counts instead. At the end one summary line goes to the 'persist' logger at
    INFO, and to stderr when the progress line would.

    shard=(index, count): one task of a job array of count tasks (Slurm, PBS, LSF, SGE),
    index from 0 to count - 1, each running the same script on all the items: this task
    runs only its share, and returns the results of its share alone, in input order (the
    items of the share, as they come in items; Failures' .failures and .results likewise,
    and the progress and summary count the share). Each item goes to one task by its key,
    the same in every process and on every machine: for a memoized func, the call's cache
    key (the same call, the same task); for any other, the digest of persist's encoding of
    the item, as memoize keys arguments. With the same count, each task gets the same items
    at every run, in any order; an item that cannot be keyed raises TypeError before
    anything runs. The items of other shares are neither run nor looked up. With a shared
    cache, persist.map(func, items) afterwards, on any machine that sees it, reuses what
    every task stored and computes again what failed (see "Job arrays" in the README).
    """
    _check_map_arguments(func, workers, executor)
    if shard is not None:
        shard = _check_shard(shard)
    found = _memoized_for_map(func)
    threads = False
    if executor is not None:
        import concurrent.futures
        threads = isinstance(executor, concurrent.futures.ThreadPoolExecutor)
        # a process pool sends func with pickle; other engines (Dask, loky) with cloudpickle,
        # which sends what pickle cannot (a function of a function's locals, a lambda)
        if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
            _check_travels(func)
    elif workers is not None:
        _check_travels(func)
    items = list(items)
    keys = None                  # for a shard of a memoized func: each item's cache key
    whose = None                 # (index, count, items in all) for a shard
    if shard is not None:
        whose = shard + (len(items),)
        items, keys = _share(items, found, shard)
    run = _Run(func, items, found, progress, keep_going, keys, whose)
    try:
        run.execute(workers, executor, threads)
    finally:
        run.finish()
    if run.failures:
        raise run.error()
    return run.results


def _check_map_arguments(func, workers, executor):
    # type: (Any, Any, Optional[Executor]) -> None
    """Raise for a func, workers= or executor= that persist.map cannot run with."""
    if not callable(func):
        raise TypeError("Expected a callable as persist.map()'s func, not %r" % (func,))
    if workers is not None and executor is not None:
        raise ValueError("persist.map() takes workers= or executor=, not both")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or
                                workers < 1):
        raise ValueError("persist.map(workers=...) must be a whole number of processes, 1 or "
                         "more, not %r" % (workers,))


def _check_shard(shard):
    # type: (Any) -> Tuple[int, int]
    """shard=, checked: (index, count) of this task in a job array of count tasks."""
    form = ("persist.map(shard=...) takes (index, count): this task's number from 0 to "
            "count - 1, and the number of tasks, as ints, e.g. on Slurm "
            "shard=(int(os.environ['SLURM_ARRAY_TASK_ID']) - "
            "int(os.environ['SLURM_ARRAY_TASK_MIN']), "
            "int(os.environ['SLURM_ARRAY_TASK_COUNT']))")
    if not isinstance(shard, (tuple, list)) or len(shard) != 2:
        raise TypeError("%s; not %r" % (form, shard))
    whole = []
    for name, value in zip(("index", "count"), shard):
        # any integer as range() takes one (__index__): numpy's, as np.arange() gives them
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError("%s; its %s is %r, not an int (an environment variable is a str: "
                            "int() it)" % (form, name, value))
        whole.append(value.__index__())
    index, count = whole
    if count < 1:
        raise ValueError("%s; its count is %d: a job array has 1 task or more"
                         % (form, count))
    if not 0 <= index < count:
        raise ValueError("%s; its index is %d, outside 0 to %d. A job array's task ids may "
                         "start at 1 (LSF's LSB_JOBINDEX does, and Slurm's "
                         "SLURM_ARRAY_TASK_ID for --array=1-N, SGE's SGE_TASK_ID for -t 1-N): "
                         "subtract the first id (SLURM_ARRAY_TASK_MIN, SGE_TASK_FIRST)"
                         % (form, index, count - 1))
    return index, count


def _share(items, found, shard):
    # type: (List[Any], Optional[_WrapperCall], Tuple[int, int]) -> Tuple[List[Any], Optional[List[bytes]]]
    """The items of the task shard=(index, count) gets, in input order, and for a memoized
    func their cache keys (which _Run takes, rather than key each item again).

    An item goes to the task whose index is its key's first 8 bytes, as a big-endian
    number, modulo count: a key is the same in every process and on every machine (never
    hash(), which differs between processes), and is the item's, not its position's. A
    memoized func's key is the call's cache key, so that the calls a cache holds once go to
    one task (f(x=1) and f(1); items its key= or ignore= makes alike); any other func's,
    the digest of persist's encoding of the item."""
    index, count = shard
    mine: "List[Any]" = []
    keys: "Optional[List[bytes]]" = None
    if found is not None:
        wrapper, args, kwargs = found
        keys = []
    for position, item in enumerate(items):
        try:
            key = _digest(item) if found is None else wrapper._key_of(args + (item,), kwargs)
        except Exception as exc:
            # Every task keys every item: each would decide alike where it goes, so each
            # raises, at once, rather than run its share and leave this one to no task.
            if found is not None:        # its error says what to do (ignore=, key=)
                raise TypeError("persist.map(shard=...) gives each item to a task by the "
                                "cache key of its call, and item %d, %s, makes a call that "
                                "has none (%s: %s)" % (position, _SHORT.repr(item),
                                                       type(exc).__name__, exc)) from exc
            raise TypeError("persist.map(shard=...) gives each item to a task by its key, "
                            "and item %d, %s, cannot be keyed (%s: %s): map over items "
                            "persist can key (ids, str, numbers, tuples of them: see \"How "
                            "each type is keyed\" in the README), or memoize func and give "
                            "it key=" % (position, _SHORT.repr(item), type(exc).__name__,
                                         exc)) from exc
        if int.from_bytes(key[:8], "big") % count == index:
            mine.append(item)
            if keys is not None:
                keys.append(key)
    return mine, keys


def _memoized_for_map(func):
    # type: (Callable[[Any], Any]) -> Optional[_WrapperCall]
    """The memoized function behind func, and its leading arguments (see _wrapper_of), once
    checked that persist.map can call it item by item; None for any other callable."""
    found = _wrapper_of(func)
    if found is None:
        return None
    _check_env_strict()                    # else every item would fail with it
    function = found.wrapper._cache.func
    if _code_flags(function) & _CO_COROUTINE:
        raise TypeError("persist.map() calls func(item) and takes the result, but %s is an "
                        "async def function: map a plain function over the items, or gather "
                        "the coroutines with asyncio" % (function.__qualname__,))
    return found


def _check_travels(func):
    # type: (Callable[[Any], Any]) -> None
    """Raise TypeError if func, which persist.map sends to other processes, cannot go."""
    try:
        pickle.dumps(func, _PROTOCOL)
    except Exception as exc:
        raise TypeError("persist.map() sends func to other processes, and %r cannot be "
                        "pickled (%s: %s): define it at the top level of a module, or use "
                        "a thread pool (executor=)" % (func, type(exc).__name__, exc)) \
            from None


_PROGRESS_AFTER = 2.0     # seconds before the progress line appears: quick runs stay quiet
_PROGRESS_EVERY = 0.2     # seconds between its updates
_SHOWN_ITEMS = 3          # inputs the summary of Failures names per kind of error
_BATCH_SECONDS = 0.05     # persist.map sends workers items in batches of about this long
_BATCH_LIMIT = 1000       # items, at most, in one batch
_SUSPECTS_HALVED = 256    # items lost with a dead worker, more than which run again in halves:
                          # a new pool costs as much as a few hundred round trips (spawn)
_REAP_TIMEOUT = 2.0       # seconds _stop_workers() gives a worker to end after SIGTERM, then
                          # SIGKILL


class _Run:
    """One persist.map(): the results, the counts, the progress line and the summary."""

    results: "List[Any]"
    failures: "List[Tuple[int, Exception]]"
    bar: "Any"
    tick: "Optional[float]"

    def __init__(self, func, items, found, progress, keep_going, item_keys=None, shard=None):
        # type: (Callable[[Any], Any], List[Any], Optional[_WrapperCall], _Progress, bool, Optional[List[bytes]], Optional[Tuple[int, int, int]]) -> None
        self.func, self.items, self.found = func, items, found
        self.keep_going = keep_going
        # a memoized func's: the cache key of each item, where _share() has them already
        self.item_keys = item_keys
        inner = func.func if isinstance(func, functools.partial) else func
        self.label = getattr(inner, "__name__", None) or type(inner).__name__
        # shard: (index, count, items in all): the lines and the error say whose items these
        # are (the label alone names the function, as in "see parse.failures()")
        self.title, self.of = self.label, ""
        if shard is not None:
            self.title = "%s, shard=(%d, %d)" % ((self.label,) + shard[:2])
            self.of = " (this shard's, of %s)" % _n(shard[2])
        self.results = [None] * len(items)
        self.failures = []              # (index, exception)
        self.reused = self.computed = 0
        self.moved = 0                  # items run here, as a worker could not (see run_here)
        self.interrupted = False        # the run is stopping (Ctrl-C): nothing more starts
        # For a memoized func run elsewhere (see parallel): the key of each item sent, and
        # the items that wait for one sent with their key (the same call) to come back
        self.keys: "Dict[int, bytes]" = {}
        self.waiting: "Dict[bytes, List[int]]" = {}
        self.schedule: "Optional[_Schedule]" = None
        self.start = time.perf_counter()
        self.bar = None                 # a tqdm-like object from the progress= factory
        self.line = 0                   # characters of the progress line now on stderr
        self.tick = None                # perf_counter() time of the next progress update
        self.loud = progress is True    # the summary goes to stderr even if not a terminal
        if progress is None:
            isatty = getattr(sys.stderr, "isatty", None)
            self.loud = bool(isatty and isatty())
            if self.loud:
                self.tick = self.start + _PROGRESS_AFTER
        elif progress is True:
            self.tick = self.start
        elif callable(progress):
            self.bar = progress(total=len(items), desc=self.title, unit="item")
            self.tick = self.start
        elif progress is not False:
            raise TypeError("Expected persist.map(progress=...) to be None, True, False or a "
                            "factory such as tqdm.tqdm, not %r" % (progress,))
        self.counted = 0                # items the bar was told about

    @property
    def done(self):
        # type: () -> int
        return self.reused + self.computed + len(self.failures)

    def succeeded(self, index, value, hit):
        # type: (int, Any, bool) -> None
        self.results[index] = value
        if hit:
            self.reused += 1
        else:
            self.computed += 1

    def failed(self, index, exc):
        # type: (int, Exception) -> None
        self.results[index] = exc
        self.failures.append((index, exc))

    def show_progress(self):
        # type: () -> None
        """update() the progress when it is due (serial() has this inline: a call an item)."""
        if self.tick is not None:
            now = time.perf_counter()
            if now >= self.tick:
                self.update(now)

    def update(self, now):
        # type: (float) -> None
        """Show progress, at most every _PROGRESS_EVERY seconds."""
        self.tick = now + _PROGRESS_EVERY
        if self.bar is not None:
            self.tell_bar()
            return
        done, total, counts = self.done, len(self.items), self.counts()
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = ", %s left" % _took((total - done) / rate) if rate and done < total else ""
        text = "%s: %s/%s items: %s, %.1f/s%s" % (self.title, _n(done), _n(total), counts,
                                                   rate, left)
        self.show(text)

    def counts(self):
        # type: () -> str
        return "%s reused, %s computed, %s failed" % (
            _n(self.reused), _n(self.computed), _n(len(self.failures)))

    def tell_bar(self):
        # type: () -> None
        """Bring the progress= bar up to date: the items done, and the counts beside them."""
        done = self.done
        self.bar.update(done - self.counted)
        self.counted = done
        postfix = getattr(self.bar, "set_postfix_str", None)
        if postfix is not None:
            postfix(self.counts())

    def show(self, text):
        # type: (str) -> None
        # best effort: a closed or broken stderr costs the progress line, never the results
        with contextlib.suppress(Exception):
            sys.stderr.write("\r" + text + " " * max(0, self.line - len(text)))
            sys.stderr.flush()
            self.line = len(text)

    def execute(self, workers, executor, threads):
        # type: (Optional[int], Optional[Executor], bool) -> None
        """Run the items where persist.map was asked to: on executor (threads: a
        ThreadPoolExecutor, whose workers share this process), in a pool of workers of
        persist.map's own, or here, one after another."""
        stop: "Optional[_Event]"
        if executor is not None:
            width = _width(executor)
            # threads share an Event; other executors' workers learn of a failure only
            # from here, when its result arrives: each batch stops at its own first one
            import threading
            stop = None if self.keep_going else threading.Event() if threads else \
                _BatchStop()
            self.parallel(executor, width, not threads, None, stop)
        elif workers is not None:
            import multiprocessing
            context = multiprocessing.get_context()
            stop = None if self.keep_going else context.Event()
            own = _OwnPool(workers, context, stop, self.func)
            pool = own.new()
            self.parallel(pool, workers, True, pool, None, own)
        else:
            self.serial()

    def serial(self):
        # type: () -> None
        func, found, run, keys = self.func, self.found, self, self.item_keys
        if found is not None:
            call, args, kwargs = found.wrapper._call, found.args, found.kwargs
        for index, item in enumerate(self.items):
            try:
                if found is None:
                    value, hit = func(item), False
                else:
                    value, saved = call(args + (item,), kwargs,
                                        None if keys is None else keys[index])
                    hit = saved is not None
            except Exception as exc:
                run.failed(index, exc)
                if not self.keep_going:
                    raise
            else:
                run.results[index] = value
                if hit:
                    run.reused += 1
                else:
                    run.computed += 1
            if run.tick is not None:
                now = time.perf_counter()
                if now >= run.tick:
                    run.update(now)

    def parallel(self, executor, width, portable, pool=None, stop=None, own=None):
        # type: (Executor, int, bool, Optional[ProcessPoolExecutor], Optional[_Event], Optional[_OwnPool]) -> None
        """Run the items on executor (width: its workers), in the batches a _Schedule gives,
        which it tells what came back. pool: our own, to stop on Ctrl-C; stop: an Event for
        _run, passed with each batch (threads) or held by each worker (pool).

        One cache, here: for a memoized func, each item is looked up in its cache in this
        process first (to_send()), only the misses go, to be computed by the function
        behind func (no cache on the workers' side, which need not see this disk), and each
        result is stored, each failure recorded, here as it arrives (settle()).

        own: makes a new pool of our own when a worker died (a crash in C code, killed, out
        of memory), which takes every batch then in flight with it: the schedule runs those
        items again until the one that kills its worker is known; it fails with
        BrokenProcessPool, and the run goes on past it.
        """
        schedule = self.schedule = _Schedule(len(self.items), width, self.keep_going,
                                             todo=self.to_send())
        try:
            # idle: the pool died with nothing in flight (a worker killed idle)
            idle = self.send(schedule, executor, portable, stop, own)
            while schedule.in_flight or idle:
                if idle:
                    assert own is not None and pool is not None
                    pool = executor = own.replace(pool)
                    idle = self.send(schedule, executor, portable, stop, own)
                    continue
                finished = _finished(schedule.in_flight, _PROGRESS_EVERY)
                lost, broken = self.receive(schedule, finished, portable, own)
                if lost:
                    killer = schedule.worker_died(lost)
                    assert own is not None and pool is not None
                    pool = executor = own.replace(pool)
                    if killer is not None:
                        index, sent = killer
                        self.worker_died(index, sent, broken)
                if self.stopped:
                    if own is not None:
                        # Our own pool: what has not started comes back unstarted, as its
                        # workers share the Event a failure there set (set here too, for one
                        # found here: a result strict could not store). Never cancel() its
                        # futures: before 3.10, a ProcessPoolExecutor whose thread had not yet
                        # dropped a cancelled one hung in shutdown() (CPython gh-94440).
                        assert own.stop is not None
                        own.stop.set()
                    else:
                        for other in list(schedule.in_flight):  # not started: never will
                            cancel = getattr(other, "cancel", None)
                            if cancel is not None and cancel() is True:
                                self.unstarted(schedule.returned(other))
                else:
                    idle = self.send(schedule, executor, portable, stop, own)
                self.show_progress()
        except BaseException as exc:
            # Another's executor: what it has not started never will. Our own pool's
            # workers stop below, which fails every future of it; one cancelled first made
            # the pool's thread die of InvalidStateError (before 3.12), or hang (gh-94440).
            for future in schedule.in_flight if pool is None else ():
                with contextlib.suppress(Exception):
                    future.cancel()
            try:
                self.interrupted = True
                # best effort: the exception that stops the run is what matters
                with contextlib.suppress(Exception):
                    self.take_arrived(schedule)
            finally:                      # a second Ctrl-C too stops the workers
                if pool is not None:
                    _stop_workers(pool)
            if pool is not None:
                # A result a worker sent before it stopped may still have been in the pipe,
                # unread by the pool's thread: it reads each one before it finds the pool
                # broken, and shutdown() waited for it.
                with contextlib.suppress(Exception):
                    self.take_arrived(schedule)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)    # after _stop_workers() too: it does nothing then
        if self.stopped:
            # raised as a plain loop would: of the failures, the first in order, not the
            # first to arrive (an earlier item in flight may fail after a later one)
            _, first = min(self.failures, key=_first)
            raise first

    def take_arrived(self, schedule):
        # type: (_Schedule) -> None
        """As the run stops (Ctrl-C): take the results of the batches that came back but
        were not taken yet, so that each result that arrived stays stored."""
        for future in list(schedule.in_flight):
            done = getattr(future, "done", None)
            if not callable(done) or not done() or getattr(future, "cancelled", bool)():
                continue
            try:
                outcomes, _ = future.result()
            except Exception:             # its batch failed as a whole: nothing came
                continue
            self.take(schedule, future, outcomes)

    def to_send(self):
        # type: () -> Iterator[int]
        """The indexes of the items to send to the workers, in order, as the schedule takes
        them. A memoized func's are looked up in its cache here first: a hit is taken at
        once, a miss is sent (its key kept in keys), and an item whose key is that of one
        in flight (the same call) waits for its result (in waiting)."""
        if self.found is None:
            yield from range(len(self.items))
            return
        wrapper, args, kwargs = self.found
        cache = wrapper._cache
        for index, item in enumerate(self.items):
            if self.stopped:
                return
            try:
                key = wrapper._key_of(args + (item,), kwargs) if self.item_keys is None \
                    else self.item_keys[index]
                if key in self.waiting:
                    self.waiting[key].append(index)
                    continue
                value, saved = cache.get(key)
            except Exception as exc:     # a call that does not bind, an unkeyable argument
                self.failed(index, exc)
                continue
            if value is not _MISSING:
                self.succeeded(index, value, True)
                self.show_progress()
                continue
            self.keys[index] = key
            self.waiting[key] = []
            yield index

    @property
    def stopped(self):
        # type: () -> bool
        """keep_going=False, and an item failed: no item starts any more, and parallel()
        raises that first failure once the items running finish."""
        return not self.keep_going and bool(self.failures)

    def send(self, schedule, executor, portable, stop, own):
        # type: (_Schedule, Executor, bool, Optional[_Event], Optional[_OwnPool]) -> bool
        """Submit the batches the schedule gives now. Returns whether the pool was found
        dead with nothing in flight: then no result will come to say so, and it must be
        replaced before anything runs."""
        import concurrent.futures
        memoized = self.found is not None
        while True:
            batch = schedule.next()
            if batch is None:
                return False
            try:
                # the engine has the batch before submit() returns: a Ctrl-C in between
                # would leave its future, and the result it brings, unknown here
                with _CtrlCHeld():
                    future = executor.submit(_run, self.func, [self.items[i] for i in batch],
                                             portable, stop, memoized, next(_SENT))
                    schedule.sent(future, batch)
            except concurrent.futures.BrokenExecutor as exc:
                if own is None:
                    raise self.pool_died(exc) from exc
                # not started: it goes first into the next pool (which the failure of what
                # is in flight, if anything is, makes)
                schedule.unsent(batch)
                return not schedule.in_flight
            except Exception as exc:
                # An engine that pickles a batch as it is submitted (Dask, submitit): an item
                # that cannot be pickled runs here, as one whose result cannot travel (see
                # run_here), and the others go again. A func that cannot be pickled is named;
                # any other error is the engine's.
                stuck = [index for index in batch if not _pickles(self.items[index])]
                if not stuck or not portable:
                    if portable:
                        try:
                            _check_travels(self.func)
                        except TypeError as named:    # with the engine's own error
                            raise named from exc
                    raise
                schedule.unsent([index for index in batch if index not in stuck])
                for index in stuck:
                    self.run_here(index, _why(exc))

    def receive(self, schedule, finished, portable, own):
        # type: (_Schedule, Iterable[Any], bool, Optional[_OwnPool]) -> Tuple[List[Any], Optional[BaseException]]
        """Take what the finished futures bring back. Returns those that came back with the
        pool's error (a dead worker took them along), and that error."""
        import concurrent.futures
        lost: "List[Any]" = []
        broken: "Optional[BaseException]" = None
        for future in finished:
            try:
                outcomes, seconds = future.result()
            except concurrent.futures.BrokenExecutor as exc:
                if own is None:
                    raise self.pool_died(exc) from exc
                lost.append(future)
                broken = exc
                continue
            except Exception as exc:
                if self.stopped:          # after a failure with keep_going=False
                    schedule.returned(future)
                elif _lost_worker(exc):
                    # An engine that lives on lost the workers that ran (or queued) this
                    # batch (Dask's KilledWorker, after its own retries): its items run
                    # again alone, as suspects, until the one that kills is known
                    killer = schedule.lost(future)
                    if killer is not None:
                        index, sent = killer
                        self.worker_died(index, sent, exc)
                else:
                    batch = schedule.returned(future)
                    if len(batch) > 1:    # one item or result that could not travel: which?
                        schedule.one_by_one(batch)
                    elif portable:        # it, or its result, cannot travel: run it here
                        self.run_here(batch[0], _why(exc))
                    else:
                        self.settle(batch[0], False, exc, 0.0)
                continue
            self.take(schedule, future, outcomes)
            schedule.timed(len(outcomes), seconds)
        return lost, broken

    def take(self, schedule, token, outcomes):
        # type: (_Schedule, Any, List[_Outcome]) -> None
        """Record the outcomes of the batch of token, which came back. A memoized func's
        results are stored first, all in one transaction (put_many): one commit an item
        would cost the caller more than the workers take to compute quick ones. A Ctrl-C
        meanwhile stores the results that came with it all the same, and is raised then (a
        second one stops that): each arrived, and the rerun need not compute it again."""
        settled: "List[Tuple[int, bool, Any, float]]" = []
        # token stays in flight until returned() below, inside the try: a Ctrl-C before
        # it leaves the batch to take_arrived(), one after it to the except
        batch = schedule.in_flight[token]
        try:
            schedule.returned(token)
            for position, index in enumerate(batch):
                self.collect(index, outcomes, position, settled, True)
        except KeyboardInterrupt:
            schedule.in_flight.pop(token, None)     # it came before returned() did
            taken = {entry[0] for entry in settled}
            for position, index in enumerate(batch):
                if index not in taken and outcomes[position] is not None:
                    self.collect(index, outcomes, position, settled, False)
            self.store(settled)
            raise
        self.store(settled)

    def collect(self, index, outcomes, position, settled, here):
        # type: (int, List[_Outcome], int, List[Tuple[int, bool, Any, float]], bool) -> None
        """Take the outcome at position (the item at index) into settled, or, for one that
        never started or whose result could not travel, deal with it now. here: such a
        result may run again here (not once the run is stopping)."""
        ok, value, seconds, traceback = _outcome(outcomes, position)
        if ok is None:
            if not isinstance(value, _Moved):
                self.unstarted([index])
            elif here and not self.stopped and not self.interrupted:
                # computed, but its result could not travel: again here, as a plain loop
                # would (but after a failure with keep_going=False, or once the run is
                # stopping, nothing starts)
                self.run_here(index, value.why)
        else:
            if not ok and traceback is not None:
                value.__cause__ = _WorkerTraceback(traceback)
            settled.append((index, bool(ok), value, seconds))
        outcomes[position] = None   # type: ignore[call-overload]  # freed: see _Packed

    def store(self, settled):
        # type: (List[Tuple[int, bool, Any, float]]) -> None
        """Store the results of settled in one transaction, then settle() each."""
        results: "List[Optional[Tuple[bool, Optional[Exception]]]]" = [None] * len(settled)
        if self.found is not None:
            done = [(self.keys[index], value, self.call_of(index), seconds)
                    for index, ok, value, seconds in settled if ok]
            stored = iter(self.found.wrapper._cache.put_many(done))
            results = [next(stored) if ok else None for _, ok, _, _ in settled]
        for (index, ok, value, seconds), result in zip(settled, results):
            self.settle(index, ok, value, seconds, result)

    def unstarted(self, batch):
        # type: (List[int]) -> None
        """The items of batch never started (keep_going=False, after a failure): their
        lookups in to_send() are not counted as misses, as a loop would not have made them."""
        if self.found is not None:
            for index in batch:
                if self.keys.pop(index, None) is not None:
                    self.found.wrapper._cache.misses -= 1

    def settle(self, index, ok, value, seconds, stored=None):
        # type: (int, bool, Any, float, Optional[Tuple[bool, Optional[Exception]]]) -> None
        """The item at index was computed (ok: value is its result) or failed (value is its
        exception) in seconds: for a memoized func, the result is stored or the failure
        recorded in its cache, here; then the items that waited for the same call take it
        (if it was stored: else, as in a loop, the next computes it again). stored: take()
        stored the result already (put_many): (whether it went in, what strict raised)."""
        waiting: "List[int]" = []
        went_in = False
        if self.found is not None:
            key = self.keys.pop(index)
            waiting = self.waiting.pop(key, [])
            cache, call = self.found.wrapper._cache, self.call_of(index)
            if not ok:
                cache.fail(key, call, value, seconds)
            elif stored is None:
                unstored = cache.unstored
                try:
                    cache.put(key, value, call, seconds)
                except Exception as exc:   # strict: raised, as the call itself would
                    ok, value = False, exc
                went_in = cache.unstored == unstored
            else:
                went_in, error = stored
                if error is not None:      # strict: raised, as the call itself would
                    ok, value = False, error
        if ok:
            self.succeeded(index, value, False)
        else:
            self.failed(index, value)
        if not waiting:
            return
        if ok and went_in:                # each a hit of what was just stored
            cache.hits += len(waiting)
            cache.saved += seconds * len(waiting)
            for other in waiting:
                self.succeeded(other, value, True)
        elif not self.stopped and self.schedule is not None:
            # a failure is not reused, nor a result that could not be stored (a lock, a
            # full disk): the next runs again, as in a plain loop, and the others wait for
            # it in turn
            cache.misses += 1             # as its lookup would have counted
            self.keys[waiting[0]] = key
            self.waiting[key] = waiting[1:]
            self.schedule.one_by_one(waiting[:1])

    def call_of(self, index):
        # type: (int) -> _Call
        """The call of a memoized func that the item at index makes: (args, kwargs), with a
        bound method's instance first."""
        assert self.found is not None
        wrapper, args, kwargs = self.found
        args = args + (self.items[index],)
        if wrapper._self is not None:
            args = (wrapper._self,) + args
        return args, kwargs

    def run_here(self, index, why):
        # type: (int, str) -> None
        """Run an item in this process, after it or its result could not travel between
        this process and a worker (why: pickling it failed, as for a result nested deeper
        than pickle goes or of a type pickle refuses, or loading it here): its result is
        returned, computed here (a second time, when the worker computed it)."""
        if not self.moved:
            # one warning, after which the rest of the run goes on quietly
            _warn("persist.map: an item of %s, or its result, could not travel between this "
                  "process and a worker (%s); it runs in this process instead (a second time, if "
                  "its result was what could not), as any other of this run that cannot, and "
                  "its result is returned"
                  % (self.label, why))
        self.moved += 1
        (ok, value, seconds, _), = _run(self.func, [self.items[index]], False, None,
                                        self.found is not None).outcomes
        self.settle(index, bool(ok), value, seconds)

    def pool_died(self, broken):
        # type: (BaseException) -> RuntimeError
        """The error when a pool not ours broke (broken: its BrokenExecutor), as when one of
        its worker processes died: it can run nothing more, and persist.map cannot replace
        it."""
        from concurrent.futures.process import BrokenProcessPool
        if isinstance(broken, BrokenProcessPool):
            what = "a worker process died (killed, out of memory, or a crash in C code)"
        else:                             # a thread pool's initializer failed, say
            what = "the executor broke (%s)" % _why(broken)
        return RuntimeError("persist.map: %s, and the executor can run no more items; the "
                            "%d results finished before are kept (a memoized function's are "
                            "stored): run again to compute the rest, or use workers=, whose "
                            "pool persist.map replaces" % (what, self.reused + self.computed))

    def worker_died(self, index, start, cause):
        # type: (int, float, Optional[BaseException]) -> None
        """Record that the worker running the item at index alone died: a failure of that
        item (in the ledger too, for a memoized func), as BrokenProcessPool. cause: the
        pool's own error, kept because it may know better (since 3.9, the traceback of a
        result that failed to load here)."""
        from concurrent.futures.process import BrokenProcessPool
        exc = BrokenProcessPool("the worker process died while it ran this item, alone "
                                "(killed, out of memory, or a crash in C code), or its "
                                "result could not be loaded here")
        exc.__cause__ = cause
        self.settle(index, False, exc, time.perf_counter() - start)

    def summary(self):
        # type: () -> str
        """One line: what was reused, computed and failed, and where to see the failures."""
        total = len(self.items)
        parts: "List[str]" = []
        if self.found is not None:
            parts.append("%s reused" % _n(self.reused))
        parts.append("%s computed" % _n(self.computed))
        kinds = collections.Counter(_kind_of(exc) for _, exc in self.failures)
        failed = "%s failed" % _n(len(self.failures))
        if kinds:
            failed += " (%s)" % ", ".join("%s x%s" % (kind, _n(count))
                                          for kind, count in kinds.most_common())
        parts.append(failed)
        done = self.done
        items = "%s item%s" % (_n(total), "" if total == 1 else "s") if done == total else \
            "%s of %s items" % (_n(done), _n(total))
        line = "%s: %s%s: %s in %s" % (self.title, items, self.of, ", ".join(parts),
                                        _took(time.perf_counter() - self.start))
        if self.failures:
            line += "; see %s" % ("%s.failures()" % self.label if self.found is not None
                                  else "the .failures of the persist.Failures raised")
        return line

    def finish(self):
        # type: () -> None
        """Clear the progress line, close the bar, and give the summary line."""
        if self.bar is not None:
            # the counts as they end: updates come at most every _PROGRESS_EVERY seconds,
            # and the last may be many items old
            with contextlib.suppress(Exception):
                self.tell_bar()
            with contextlib.suppress(Exception):
                self.bar.close()
        elif self.line:
            with contextlib.suppress(Exception):
                sys.stderr.write("\r%s\r" % (" " * self.line))
        line = self.summary()
        import logging
        log = logging.getLogger("persist")
        log.info("%s", line)
        if self.loud and not (log.isEnabledFor(logging.INFO) and log.hasHandlers()):
            with contextlib.suppress(Exception):
                print(line, file=sys.stderr)

    def error(self):
        # type: () -> Failures
        """The Failures to raise when items failed and map kept going past them."""
        self.failures.sort(key=_first)         # workers finish out of order
        kinds: "OrderedDict[str, List[int]]" = collections.OrderedDict()
        for index, exc in self.failures:
            kinds.setdefault(_kind_of(exc), []).append(index)
        parts: "List[str]" = []
        for kind, indexes in sorted(kinds.items(), key=lambda pair: -len(pair[1])):
            shown = ", ".join(_SHORT.repr(self.items[i]) for i in indexes[:_SHOWN_ITEMS])
            more = ", ..." if len(indexes) > _SHOWN_ITEMS else ""
            parts.append("%s x%s (%s%s)" % (kind, _n(len(indexes)), shown, more))
        where = "this exception's .failures"
        if self.found is not None:          # a command that works pasted, from anywhere
            cache = self.found.wrapper._cache
            path = cache.path               # (which settles kind)
            where += ", %s.failures()" % self.label
            if cache.kind != "mapping":     # the command line reaches files, not mappings
                where += ", or run: python -m persist failures %s" % _shell_word(path)
        message = "%s of %s items%s failed: %s; every other item%s was tried; see %s" % (
            _n(len(self.failures)), _n(len(self.items)), self.of, ", ".join(parts),
            " of the shard" if self.of else "", where)
        return Failures(message, [(self.items[i], exc) for i, exc in self.failures],
                        self.results)


class _Schedule:
    """Which items of a persist.map go to the workers next, in which batches, and what runs
    again after a worker died: the scheduling of _Run.parallel, which sends what next()
    gives and tells this what came back. No processes here: a token (a future there)
    stands for each batch in flight.

    Batches are sized to take about _BATCH_SECONDS each (one item at first; quick items
    travel many to a message, up to _BATCH_LIMIT), with at most two batches per worker in
    flight (one with keep_going=False, so that fewer start after a failure), so that a
    million items are not a million futures. A worker that dies (a crash in C code, killed,
    out of memory) takes every batch then in flight with it: those items are suspects, and
    run again alone, with nothing else in flight, halves of them at a time while they are
    many (one at a time, each would cost a round trip), then one at a time, so that one
    that kills its worker again is known (worker_died() names it).
    """

    def __init__(self, count, width, keep_going, clock=time.perf_counter, todo=None):
        # type: (int, int, bool, Callable[[], float], Optional[Iterator[int]]) -> None
        self.width = width
        self.window = 2 * width if keep_going else width     # batches in flight, at most
        self.size = 1                     # items in the next batch of new ones
        self.left = count                 # items not sent, or to be sent again
        # the indexes of items never sent (to_send(): those a cache does not have)
        self.todo = iter(range(count)) if todo is None else todo
        self.alone: "Deque[int]" = collections.deque()     # to send one to a batch
        # batches that were in flight when a worker died; the one in flight, and when it went
        self.suspects: "Deque[List[int]]" = collections.deque()
        self.suspect: "Optional[List[int]]" = None
        self.suspect_sent = 0.0
        self.in_flight: "Dict[Any, List[int]]" = {}       # token: its batch
        self.clock = clock

    def next(self):
        # type: () -> Optional[List[int]]
        """The indexes of the items to send now as one batch, or None: none is left, the
        window is full, or a suspect is in flight or waits for the others to finish."""
        if len(self.in_flight) >= self.window or self.suspect is not None:
            return None                   # a suspect runs alone: nothing joins it
        if self.suspects:
            if self.in_flight:            # and starts only then
                return None
            self.suspect, self.suspect_sent = self.suspects.popleft(), self.clock()
            return self.suspect
        batch = [self.alone.popleft()] if self.alone else list(itertools.islice(self.todo,
                                                                                self.size))
        return batch or None

    def sent(self, token, batch):
        # type: (Any, List[int]) -> None
        """batch, from next(), is in flight: token stands for it until returned()."""
        self.left -= len(batch)
        self.in_flight[token] = batch

    def unsent(self, batch):
        # type: (List[int]) -> None
        """batch, from next(), could not be sent (the pool is broken): it goes first into the
        next pool."""
        if not batch:
            pass
        elif self.suspect is not None:    # it was the suspect, just given
            self.suspects.appendleft(batch)
        else:
            self.alone.extendleft(reversed(batch))
        self.suspect = None

    def returned(self, token):
        # type: (Any) -> List[int]
        """The batch of token, which came back (or was cancelled before it started)."""
        batch = self.in_flight.pop(token)
        if batch is self.suspect:
            self.suspect = None
        return batch

    def timed(self, count, seconds):
        # type: (int, float) -> None
        """A batch of count items took seconds where it ran: size the next ones from it."""
        if seconds > 0:
            self.size = max(1, min(int(_BATCH_SECONDS * count / seconds),
                                   self.left // (2 * self.width) or 1, _BATCH_LIMIT))

    def one_by_one(self, batch):
        # type: (List[int]) -> None
        """The results of batch, returned, could not travel back as one: send its items again
        one to a batch, so that each that cannot is known (and runs in the caller)."""
        self.alone.extend(batch)
        self.left += len(batch)

    def lost(self, token):
        # type: (Any) -> Optional[Tuple[int, float]]
        """token came back lost with a worker of an engine that goes on without it (Dask),
        which loses no other batch: as worker_died(), for this batch alone."""
        batch = self.in_flight.pop(token)
        if batch is self.suspect:
            self.suspect = None
            if len(batch) == 1:
                return batch[0], self.suspect_sent
        self.left += len(batch)
        self.suspect_batches(batch)
        return None

    def worker_died(self, tokens):
        # type: (List[Any]) -> Optional[Tuple[int, float]]
        """The pool broke: tokens came back with its error, and every batch in flight is
        lost with them. When they were one suspect item alone, it killed its worker: its
        index and the clock() when it was sent are returned, and it is not sent again.
        Otherwise all of them are suspects: sent again first, alone (see the class)."""
        lost = [index for token in tokens for index in self.in_flight.pop(token)]
        lost += [index for batch in self.in_flight.values() for index in batch]
        self.in_flight.clear()                 # each failed with the pool, or will
        lost.sort()
        self.left += len(lost)
        suspect, self.suspect = self.suspect, None
        if suspect is not None and len(lost) == 1 and lost == suspect:
            self.left -= 1
            return lost[0], self.suspect_sent
        self.suspect_batches(lost)
        return None

    def suspect_batches(self, lost):
        # type: (List[int]) -> None
        """Send the items of lost first, alone, in halves while they are many."""
        if len(lost) > _SUSPECTS_HALVED:
            half = len(lost) // 2
            self.suspects.extendleft([lost[half:], lost[:half]])
        else:
            self.suspects.extendleft([index] for index in reversed(lost))


if TYPE_CHECKING:
    class _WrapperCall(NamedTuple):
        wrapper: _Wrapper
        args: _Args
        kwargs: _Kwargs
else:
    _WrapperCall = collections.namedtuple("_WrapperCall", "wrapper args kwargs")


def _wrapper_of(func):
    # type: (_Func) -> Optional[_WrapperCall]
    """A _WrapperCall (wrapper: the _Wrapper behind func; args and kwargs: the leading
    arguments and keywords of a functools.partial around it) when func is a memoized
    function or method, or a partial of one; else None."""
    args: "_Args"
    kwargs: "_Kwargs"
    args, kwargs = (), {}
    if isinstance(func, functools.partial):
        args, kwargs, func = func.args, func.keywords, func.func
    if isinstance(func, types.MethodType) and isinstance(func.__func__, _Wrapper):
        # a classmethod above memoize, on Python 3.8 and from 3.13 on: the class goes first
        args, func = (func.__self__,) + args, func.__func__
    if isinstance(func, _Wrapper):
        # (one with no cache, received by value, keys nothing: a plain callable)
        return None if isinstance(func._cache, _UnattachedCache) else \
            _WrapperCall(func, args, kwargs)
    try:
        wrapper = _WRAPPERS.get(func)
    except TypeError:                 # unhashable, or no weak reference: not ours
        return None
    return None if wrapper is None else _WrapperCall(wrapper, args, kwargs)


_STOP: "Optional[_Event]" = None   # in persist.map's own workers, with keep_going=False: set by
                                   # a failure


def _run(func, items, portable, stop=None, memoized=False, sent=None):
    # type: (Callable[[Any], Any], List[Any], bool, Optional[_Event], bool, object) -> _Batch
    """func(item) for a batch of items where they run (this process, or a worker): a _Batch of
    the _Outcome of each and the seconds the batch took. memoized: func is a memoized
    function, whose results persist.map stores in its own process: what runs here is the
    function behind it (_plain).
    portable: exceptions go to another process, so each is made picklable and its traceback
    sent as text. stop: an Event that a failure sets, after which no item starts
    (keep_going=False). sent: unused here, and unique to each batch sent (see _SENT)."""
    stop = stop or _STOP
    call = _plain(func) if memoized else func
    outcomes: "List[_Outcome]" = []
    clock = time.perf_counter
    start = clock()
    for item in items:
        if stop is not None and stop.is_set():
            outcomes.append((None, None, 0.0, None))
            continue
        began = clock()
        try:
            outcomes.append((True, call(item), clock() - began, None))
        except Exception as exc:
            seconds = clock() - began
            if stop is not None:
                stop.set()
            text = None
            if portable:
                text = _traceback_text(exc)
                exc = _portable(exc)
            outcomes.append((False, exc, seconds, text))
    if portable:
        outcomes = _Outcomes(outcomes)
    return _Batch(outcomes, clock() - start)


def _traceback_text(exc):
    # type: (BaseException) -> str
    """exc's traceback as text, its innermost _FRAMES frames, to send from a worker. Without
    their source lines where formatting them fails: a worker that cannot import what
    linecache needs (tokenize, imported on first use from Python 3.13 on) once it runs as
    another user, who cannot read the standard library, died of it. Best effort to the end:
    whatever fails here, the batch's results still go back."""
    try:
        import traceback
        try:
            return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__,
                                                      limit=-_FRAMES))
        except Exception:
            frames = ['  File "%s", line %s, in %s\n' % (frame.f_code.co_filename, line,
                                                         frame.f_code.co_name)
                      for frame, line in traceback.walk_tb(exc.__traceback__)]
            return "Traceback (most recent call last):\n%s%s\n" % (
                "".join(frames[-_FRAMES:]), _why(exc))
    except Exception as why:
        return "%s\n(the worker could not format its traceback: %s)" % (_why(exc), _why(why))


def _plain(func):
    # type: (Callable[[Any], Any]) -> Callable[[Any], Any]
    """What persist.map's workers call for a memoized func: the function behind it, with a
    partial's arguments and a method's instance, and no cache. func came by name (pickle:
    it is this process's own import of it) or by value (cloudpickle: its cache is then an
    _UnattachedCache, which keys and stores nothing, and it is called as it is)."""
    found = _wrapper_of(func)
    if found is None:
        return func
    plain = found.wrapper.__wrapped__
    if found.args or found.kwargs:
        return functools.partial(plain, *found.args, **found.kwargs)
    return plain


# One per batch sent to an engine: Dask names a task by its function and arguments, and gave a
# batch sent again (an item that killed its worker, in a rerun of the same items) the error
# its first sending had ended with, without running it.
_SENT = zip(itertools.repeat(_RUN), itertools.count())


class _BatchStop:
    """The stop of _run for keep_going=False on an engine whose workers share no Event with
    this process (its own processes, a cluster): a copy travels with each batch, which
    then stops at its own first failure, as a loop would; batches in flight elsewhere run
    on until that failure arrives here."""

    def __init__(self):
        # type: () -> None
        self.failed = False

    def is_set(self):
        # type: () -> bool
        return self.failed

    def set(self):
        # type: () -> None
        self.failed = True

    def clear(self):
        # type: () -> None
        self.failed = False


if TYPE_CHECKING:
    class _Batch(NamedTuple):
        outcomes: List[_Outcome]
        seconds: float
else:
    _Batch = collections.namedtuple("_Batch", "outcomes seconds")


def _finished(futures, timeout):
    # type: (Iterable[Any], float) -> List[Any]
    """Those of futures that are done, waiting up to timeout seconds for one.
    concurrent.futures.wait() takes only its own futures: any others (Dask's own, submitit's
    jobs, anything whose result() gives the result) are polled with done(), where they
    have it (one without is taken as done: its result() waits)."""
    import concurrent.futures
    futures = list(futures)
    if all(isinstance(future, concurrent.futures.Future) for future in futures):
        finished, _ = concurrent.futures.wait(futures, timeout,
                                              concurrent.futures.FIRST_COMPLETED)
        return list(finished)
    deadline = time.monotonic() + timeout
    pause = _POLL_FIRST
    while True:
        done = [future for future in futures if not callable(getattr(future, "done", None))
                or future.done()]
        left = deadline - time.monotonic()
        if done or left <= 0:
            return done
        time.sleep(min(pause, left))
        pause = min(2 * pause, _POLL_LAST)


_POLL_FIRST = 0.001    # seconds between looks at futures that concurrent.futures cannot wait
_POLL_LAST = 0.05      # for (see _finished): from the first, doubling up to the last


class _CtrlCHeld:
    """A Ctrl-C that comes inside the with is raised as it ends, not where it came: around
    an engine's submit() and the record of the future it returns (_Run.send). The engine
    has the batch before submit() returns (a pool's worker may run it and send its result
    at once): a Ctrl-C in between left a batch in flight that persist.map knew nothing of,
    and its result, which had arrived, was lost (on a loaded machine, 1 run in 20 of
    test_ctrl_c_stores_a_result_still_in_the_pool_pipe). A second Ctrl-C is raised at
    once: a submit() that hangs (a cluster that does not answer) can still be stopped.

    Held where Python runs a handler of its own for SIGINT (default_int_handler, or the
    caller's, called as it ends), in the main thread, the only one a Ctrl-C interrupts; in
    a process forked meanwhile (a pool's new worker), which inherits the handler, the
    handler it replaced runs at once."""

    def __init__(self):
        # type: () -> None
        self.replaced = None  # type: Any   # the handler that runs when this one is done
        self.came = None      # type: Optional[Tuple[int, Any]]   # a Ctrl-C held: its arguments
        self.pid = 0

    def __enter__(self):
        # type: () -> _CtrlCHeld
        import signal
        replaced = signal.getsignal(signal.SIGINT)
        if callable(replaced):            # not SIG_DFL nor SIG_IGN: nothing is raised then
            self.replaced, self.pid = replaced, os.getpid()   # set before hold() can run
            try:
                signal.signal(signal.SIGINT, self.hold)
            except ValueError:            # not the main thread: no Ctrl-C is raised here
                self.replaced = None
        return self

    def hold(self, signum, frame):
        # type: (int, Any) -> None
        if self.came is not None or os.getpid() != self.pid:
            self.replaced(signum, frame)
        self.came = (signum, frame)

    def __exit__(self, *exc_info):
        # type: (object) -> None
        replaced = self.replaced
        if replaced is not None:
            import signal
            signal.signal(signal.SIGINT, replaced)
            if self.came is not None:
                replaced(*self.came)


def _lost_worker(exc):
    # type: (BaseException) -> bool
    """Whether exc, from an engine's future, says that it lost the worker that ran the batch
    (its process died), rather than that the batch or its result could not travel. Known by
    name: persist.map imports no engine (Dask's KilledWorker, Ray's WorkerCrashedError;
    loky's TerminatedWorkerError is a BrokenProcessPool)."""
    import concurrent.futures
    return isinstance(exc, concurrent.futures.BrokenExecutor) or \
        type(exc).__name__ in _LOST_WORKER_ERRORS


_LOST_WORKER_ERRORS = frozenset(["KilledWorker", "WorkerCrashedError", "TerminatedWorkerError"])


def _width(executor):
    # type: (Any) -> int
    """How many items executor runs at once, as persist.map sizes its batches and keeps that
    many twice over in flight: a pool's _max_workers (concurrent.futures', loky's); the
    threads of a Dask cluster's workers, as its client says when the map starts (its
    client.get_executor(), or the client itself); else this machine's cores. (Before, a
    Dask cluster of 8 workers driven from a machine of 2 cores had 4 batches in flight, and
    half its workers idle.)"""
    width = getattr(executor, "_max_workers", None)
    if isinstance(width, int) and width > 0:
        return width
    client = getattr(executor, "_client", executor)
    nthreads = getattr(client, "nthreads", None)
    if callable(nthreads):
        # best effort: a client that cannot say (or another engine's nthreads) is ignored
        with contextlib.suppress(Exception):
            width = sum(nthreads().values())
            if isinstance(width, int) and width > 0:
                return width
    return os.cpu_count() or 1


class _Moved:
    """The value of an _Outcome (ok None) whose result could not travel from
    its worker (why: pickling it failed there, or loading it here): persist.map runs it
    again in the caller (see _Run.run_here())."""

    def __init__(self, why):
        # type: (str) -> None
        self.why = why


class _Outcomes(list):  # type: ignore[type-arg]  # of _Outcome
    """A worker's outcomes, which travel back one by one: a result that cannot be pickled
    there (nested too deep, a lock) or loaded here costs only its own item, not the other
    results of its batch (run again, a second time) nor the pool (a result that fails to
    load breaks it: every item then in flight would run again)."""

    def __reduce__(self):
        # type: () -> Tuple[Any, ...]
        packed: "List[_Outcome]" = []      # each value pickled on its own
        for ok, value, seconds, traceback in self:
            try:
                packed.append((ok, pickle.dumps(value, _PROTOCOL), seconds, traceback))
            except Exception as exc:       # RecursionError included
                packed.append((None, _Moved(_why(exc)), seconds, None))
        return _unpack_outcomes, (packed,)


def _unpack_outcomes(packed):
    # type: (List[_Outcome]) -> _Packed
    return _Packed(packed)


class _Packed(list):  # type: ignore[type-arg]  # of _Outcome
    """A worker's outcomes as they arrive here (see _Outcomes), each value still its pickle:
    _Run.take() loads them one by one (_outcome), once the message that brought them is
    freed, and frees each pickle once its result is taken. Loaded with the message, a large result was held three times at once (in the
    message, as its own pickle, and loaded); so, twice at most."""


def _outcome(outcomes, position):
    # type: (List[_Outcome], int) -> _Outcome
    """The outcome at position of a batch's outcomes, its value loaded when they are
    _Packed (the caller frees its pickle once it is taken)."""
    ok, value, seconds, traceback = outcomes[position]
    if ok is not None and isinstance(outcomes, _Packed):     # (else a _Moved)
        try:
            value = pickle.loads(value)
        except Exception as exc:       # its class is not here, its loading raises
            ok, value, traceback = None, _Moved(_why(exc)), None
    return ok, value, seconds, traceback


def _pickles(value):
    # type: (Any) -> bool
    try:
        pickle.dumps(value, _PROTOCOL)
        return True
    except Exception:                    # RecursionError included
        return False


def _why(exc):
    # type: (BaseException) -> str
    try:
        return "%s: %s" % (type(exc).__name__, exc)
    except Exception:
        return type(exc).__name__


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker, as text: the __cause__ it gets."""

    def __str__(self):
        # type: () -> str
        return "\n\n" + str(self.args[0])


class _WorkerError(Exception):
    """An exception that a worker raised but could not send back: (what to say of it, the
    name of its type, its own message), all in args, so that they travel; str() is the
    first, the failure ledger records the others."""

    def __str__(self):
        # type: () -> str
        return str(self.args[0])

    @property
    def kind(self):
        # type: () -> str
        """The name of the type of the exception it stands for."""
        return str(self.args[1])


def _kind_of(exc):
    # type: (BaseException) -> str
    """The name of exc's type, for people: a _WorkerError's is that of what it stands for."""
    if isinstance(exc, _WorkerError) and len(exc.args) == 3:
        return exc.kind
    return _type_label(type(exc))


def _portable(exc):
    # type: (Exception) -> Exception
    """exc if it survives pickling both ways, else a _WorkerError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc, _PROTOCOL))
        return exc
    except Exception as why:
        try:
            message = str(exc)
        except Exception:
            message = "<str() of the exception failed>"
        kind = _type_label(type(exc))
        return _WorkerError("%s: %s (the worker could not send this exception back: %s: %s)"
                            % (kind, message, type(why).__name__, why), kind, message)


def _type_label(kind):
    # type: (type) -> str
    module = getattr(kind, "__module__", None)
    return kind.__qualname__ if module in (None, "builtins") else \
        "%s.%s" % (module, kind.__qualname__)


def _worker_start(stop, started, func):
    # type: (Optional[_Event], Any, Callable[[Any], Any]) -> None
    """Each worker of persist.map's own pool ignores Ctrl-C: the parent stops them all, at
    once and without a traceback from each. stop: see _run. started: shared memory that the
    first worker to get this far sets (see _OwnPool). func: persist.map's, not used here:
    it comes with the worker's arguments so that a module of it that fails to import in a
    new process kills the worker before this runs, a start that _OwnPool.check_started
    reports, not a death with each batch (under spawn, a batch loads func only when it
    arrives), which would blame every item in turn. A thread of its own ends it once the
    process that made it is gone (_watch_parent)."""
    global _STOP
    _STOP = stop
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                     name="persist-watch-parent").start()
    started.value = 1


def _watch_parent(parent):
    # type: (int) -> None
    """End this worker once its parent is gone: a caller killed with SIGKILL tells its pool
    nothing, and the workers waited for work on their queue for ever, each holding the
    queue's other end open for the others. (Its parent is the caller, or under forkserver
    the server, which ends with the caller.)"""
    while True:
        time.sleep(_PARENT_CHECK)
        if os.getppid() != parent:
            os._exit(1)


_PARENT_CHECK = 1.0       # seconds between a worker's looks for its parent (_watch_parent)


class _OwnPool:
    """persist.map's own pool of worker processes, made anew after a worker died."""

    def __init__(self, workers, context, stop, func):
        # type: (int, Any, Optional[_Event], Callable[[Any], Any]) -> None
        self.workers, self.context, self.stop, self.func = workers, context, stop, func
        self.started = None  # type: Any

    def new(self):
        # type: () -> ProcessPoolExecutor
        import concurrent.futures
        if self.stop is not None:  # set by a failure whose batch a dead worker took along:
            self.stop.clear()      # its items run again, and it is raised then
        self.started = self.context.RawValue("b", 0)   # no lock: any worker sets it to 1
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, self.context, initializer=_worker_start,
            initargs=(self.stop, self.started, self.func))

    def replace(self, pool):
        # type: (ProcessPoolExecutor) -> ProcessPoolExecutor
        """A worker of pool died, and the pool with it: stop what is left of it, and return
        a new one to go on in."""
        _stop_workers(pool)
        self.check_started()
        return self.new()

    def check_started(self):
        # type: () -> None
        """Raise if the pool that just died had no worker that even started: then no item
        is to blame, and a new pool would die the same way."""
        if self.started.value == 0:
            raise RuntimeError(
                "persist.map: its worker processes died as they started, before running any "
                "item. Under the spawn and forkserver start methods (the default on macOS and "
                "Windows) each worker imports the script again: call persist.map under "
                "if __name__ == '__main__':, and make sure func's module imports in a new "
                "process")


def _stop_workers(pool):
    # type: (ProcessPoolExecutor) -> None
    """End a ProcessPoolExecutor's workers now, whatever they are running."""
    # best effort, through a private attribute: without it, shutdown() waits for the calls
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    # Reaped here, whatever shutdown() does: no zombie outlives us. shutdown() joins the
    # workers through the pool's manager thread, but the pool starts that thread only after
    # its first workers, so a Ctrl-C between the two leaves them to us. A worker that
    # outlasts SIGTERM (a handler of its own) is killed.
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(_REAP_TIMEOUT)
            if process.exitcode is None:
                process.kill()
                process.join()
    # A worker stopped halfway through sending a result (a large one) leaves the manager
    # thread reading the rest of it for ever, and shutdown() waits for that thread: with
    # every worker gone, this process's end of the pipe is the last one open, and closing
    # it ends the read (best effort, through a private attribute: the thread then finds
    # the pool broken, and ends).
    with contextlib.suppress(Exception):
        pool._result_queue._writer.close()       # type: ignore[attr-defined]
    pool.shutdown(wait=True)


def _took(seconds):
    # type: (float) -> str
    """A duration for people: 4.2s, 3m12s, 2h41m."""
    if seconds < 60:
        return "%.1fs" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(int(seconds), 60)
    return "%dh%02dm" % divmod(int(seconds) // 60, 60)


def _n(number):
    # type: (int) -> str
    return format(number, ",")


def _shell_word(path):
    # type: (str) -> str
    """path as one word of a command to paste into a shell: POSIX sh's, or Windows'."""
    if os.name == "nt":
        return '"%s"' % path              # a Windows path has no '"' in it
    import shlex
    return shlex.quote(path)


# == map: the failure ledger ----------------------------------------------------------------------
# A call that raised is recorded in its cache's Failures table (what, how often, the
# traceback, the call itself when it pickles), until the call succeeds: failures() and
# 'persist failures' read it.

def _failure_record(call, exc, seconds, version):
    # type: (_Call, BaseException, float, str) -> _FailureRecord
    """(args, type, message, traceback, seconds, version, call): what the ledger keeps of a
    call; call: its (args, kwargs) pickled, or why they are not kept."""
    import traceback
    if isinstance(exc, _WorkerError) and len(exc.args) == 3:
        name, message = exc.kind, str(exc.args[2])   # a worker's that could not come: its own
    else:
        name = _type_label(type(exc))
        try:
            message = str(exc)
        except Exception:
            message = "<str() of the exception failed>"
    if len(message) > _MESSAGE_LIMIT:
        message = message[:_MESSAGE_LIMIT - 1] + "\u2026"
    cause = exc.__cause__
    if isinstance(cause, _WorkerTraceback):
        text = str(cause.args[0])     # raised in a worker (see _Run.take): as it was there
    else:
        # the innermost frames, where the error is: formatting them all costs as much as
        # they are
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__,
                                                  limit=-_FRAMES))
    # A lone surrogate (a file name os.listdir() decoded with surrogateescape, in the
    # message) cannot be SQLite text: it is kept as its escape, \udce9, as repr() shows it
    return (_short_repr(call), name, _escaped_surrogates(message),
            _escaped_surrogates(text[-_TRACEBACK_LIMIT:]), seconds, version,
            _pickled_call(call))


_MESSAGE_LIMIT = 2000          # characters of a failure's message that are recorded
_FRAMES = 50                   # a failure's traceback keeps its innermost frames
_TRACEBACK_LIMIT = 1 << 16     # and of its traceback: the end, where the error is


def _escaped_surrogates(text):
    # type: (str) -> str
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class _TooLarge(Exception):
    pass


class _Capped(io.RawIOBase):
    """A file for pickle.dump() that refuses to hold more than _CALL_LIMIT bytes: a failed
    call's large arguments stop being pickled there, not after the whole of them."""

    def __init__(self):
        # type: () -> None
        super().__init__()
        self.parts: "List[bytes]" = []
        self.size = 0

    def writable(self):
        # type: () -> bool
        return True

    def write(self, data):
        # type: (Any) -> int
        size = memoryview(data).nbytes
        self.size += size
        if self.size > _CALL_LIMIT:
            raise _TooLarge
        self.parts.append(bytes(data))
        return size


def _pickled_call(call):
    # type: (_Call) -> Union[bytes, str]
    """A failed call's (args, kwargs), pickled so that it can be made again; or why not."""
    file = _Capped()
    try:
        pickle.dump((tuple(call[0]), dict(call[1])), file, _PROTOCOL)
    except _TooLarge:
        return "its arguments pickle to more than %s" % _bytes(_CALL_LIMIT)
    except RecursionError:
        return "its arguments nest too deeply to pickle"
    except Exception as exc:
        return "its arguments do not pickle (%s: %s)" % (
            type(exc).__name__, _one_line(str(exc))[:200])
    return b"".join(file.parts)


def _failed_call(stored):
    # type: (Union[bytes, str, None]) -> Tuple[Optional[_FailedCall], Optional[str]]
    """(call, call_error) of a failure record from its column call."""
    if stored is None:
        return None, "recorded by a persist that kept no calls"
    if isinstance(stored, str):
        return None, stored
    try:
        args, kwargs = pickle.loads(stored)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise TypeError("not the arguments of a call: %s, %s" % (
                type(args).__name__, type(kwargs).__name__))
    except RecursionError:
        raise
    except Exception as exc:
        return None, "it does not load (%s: %s)" % (type(exc).__name__, exc)
    return _FailedCall(args, kwargs), None


def _record_failure(conn, key, started, failure, expire=None):
    # type: (sqlite3.Connection, bytes, float, _FailureRecord, Optional[float]) -> None
    until = time.time() + expire if expire is not None else float("inf")
    if _fetch(conn, _STORED_SINCE, (key, started, until)):
        return
    args, kind, message, text, seconds, version, call = failure
    old = _fetch(conn, _FAILED_BEFORE, (key,))
    now = time.time()
    count, first = (old[0][0] + 1, old[0][1]) if old else (1, now)
    row = (key, args, kind, message, text, count, first, now, seconds, version)
    if call is None:                     # no column for it (see _Store.record_failure)
        conn.execute(_RECORD_FAILURE.replace(", call)", ")").replace(", ?)", ")"), row)
    else:
        conn.execute(_RECORD_FAILURE, row + (sqlite3.Binary(call) if isinstance(call, bytes)
                                             else call,))


# == open =========================================================================================
# persist.open(filename) is shelve.open over a _Store: each assignment a committed row.
# A file that shelve made (any dbm) is first copied into a new store under its name.

def open(filename: "Union[_Path, MutableMapping[str, bytes]]", flag: "_Flag" = "c",
         protocol: "Optional[int]" = None,
         writeback: bool = False) -> "_Shelf":
    """Open a persistent dictionary: shelve.open, safe for many processes and for crashes.

    Keys are str, values anything picklable. Every assignment is committed when it returns;
    many threads and processes may use one file at once. flag is 'r' (read only), 'w' (read
    and write an existing file), 'c' (create it if needed) or 'n' (start empty). writeback is
    not offered: assign a changed value back to store it. Use it as a context manager, or
    call close(). The file is SQLite: sqlite3 FILE 'SELECT key, stored FROM Dict' lists it.

    Where shelve.open(filename) made a file (dbm.dumb, dbm.gnu, dbm.ndbm or dbm.sqlite3), its
    entries are copied into a new store of that name, with a PersistWarning; the original is
    kept (as filename.before-persist when it had that very name). Flag 'r' refuses instead.
    """
    if writeback:
        raise ValueError("persist.open() offers no writeback: a changed value is stored when "
                         "you assign it back (db[key] = value); drop writeback=True")
    shelf_type = _shelf_type()      # first: where it cannot be made, nothing is
    if isinstance(filename, collections.abc.MutableMapping):   # an object store's keys
        if flag not in _FLAGS:
            raise ValueError("flag must be 'r', 'w', 'c' or 'n', not %r" % (flag,))
        objects = _MappingObjects(filename, "", flag)
        shelf = _FileStore(objects.path, flag, shelf=True, objects=objects)
        return shelf_type(shelf, protocol)  # type: ignore[arg-type]  # (as below)
    path = os.fsdecode(os.fspath(filename))
    if not path:                            # not the current directory: open("") fails so
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    path = os.path.abspath(path)
    if not os.path.islink(path) and (_is_file_store(path) or (
            not os.path.lexists(path) or os.path.isdir(path)) and
            _store_kind(os.path.dirname(path), None, "") == "files"):
        # a shelf of files: where one is, or on a filesystem several machines share (there,
        # a directory without the marker may be one another machine is making: _FileStore
        # makes it whole, or refuses a directory of other files)
        return shelf_type(_FileStore(path, flag, shelf=True), protocol)  # type: ignore[arg-type]
    _open_shelve_file(path, flag)
    store = _Store(path, flag)
    # a _Store is the mapping under the shelf, though not a MutableMapping: _Shelf
    # overrides each method that shelve.Shelf would call it through
    return shelf_type(store, protocol)  # type: ignore[arg-type]


# == open: the shelf ------------------------------------------------------------------------------
# _Shelf is shelve.Shelf over a _Store: values are pickled straight to and from the file,
# and every method is one step that another process's writes cannot break in the middle of.

if TYPE_CHECKING:     # generic to type checkers, not at run time before Python 3.9
    _ShelfBase = shelve.Shelf[Any]
    _ItemsViewBase = collections.abc.ItemsView[str, Any]
    _ValuesViewBase = collections.abc.ValuesView[Any]
else:
    _ShelfBase = object     # shelve.Shelf joins it at the first open(): see _shelf_type
    _ItemsViewBase = collections.abc.ItemsView
    _ValuesViewBase = collections.abc.ValuesView


class _Shelf(_ShelfBase):
    """shelve.Shelf over a _Store: values are pickled straight to and from the file, and every
    method is one step that another process's writes cannot break in the middle of."""

    dict: "Any"               # shelve.Shelf's: the _Store, or what close() leaves
    keyencoding: str
    _protocol: "Optional[int]"

    @property
    def path(self):
        # type: () -> str
        """The cache file's absolute path."""
        return self._store().path

    def __getitem__(self, key):
        # type: (str) -> Any
        row, value = self._load(self._store(), self._raw(key), key)
        if row is None:
            raise KeyError(key)
        return value

    def _load(self, store, raw, key):
        # type: (_AnyStore, bytes, str) -> Tuple[Optional[_Row], Any]
        """(row, value) of key now; (None, None) if there is none."""
        for _ in range(100):
            row = store.get(raw)
            if row is None:
                return None, None
            try:
                return row, store.load(row)
            except FileNotFoundError:     # replaced or deleted since get(): read it again
                continue
            except (EOFError, pickle.UnpicklingError) as exc:
                if row[1] is None or not isinstance(store, _Store):   # a pickle of the
                    raise                 # row's own: as shelve raises it
                # value files are not fsynced: a power cut may cut one short
                raise PersistError(errno.EIO, "the value file of key %r is cut short or "
                                   "damaged (%s: %s); store the key again, or delete it"
                                   % (key, type(exc).__name__, exc),
                                   store.values.path(row[1]),
                                   reason=PersistError.DAMAGED_VALUE) from None
        # not a writer's replacement: gone for good (removed by hand)
        assert isinstance(store, _Store)  # (a store of files has no value files)
        raise PersistError(errno.ENOENT, "the value file of key %r is missing" % (key,),
                           store.values.path(row[1]),  # type: ignore[index, arg-type]  # a row
                           reason=PersistError.MISSING_VALUE)

    def __setitem__(self, key, value):
        # type: (str, Any) -> None
        self._store().put(self._raw(key), value, self._protocol)

    def __delitem__(self, key):
        # type: (str) -> None
        if not self._store().delete(self._raw(key)):
            raise KeyError(key)

    def get(self, key, default=None):
        # type: (str, Any) -> Any
        try:
            return self[key]
        except KeyError:
            return default

    def pop(self, key, default=_MISSING):
        # type: (str, Any) -> Any
        store = self._store()
        raw = self._raw(key)
        while True:
            row, value = self._load(store, raw, key)
            if row is None:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            if store.delete_row(raw, row):  # else another process changed it: again
                return value

    def popitem(self):
        # type: () -> Tuple[str, Any]
        for key in self:
            try:
                return key, self.pop(key)
            except KeyError:              # deleted by another process meanwhile
                continue
        raise KeyError("popitem(): the shelf is empty")

    def setdefault(self, key, default=None):
        # type: (str, Any) -> Any
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return default

    def items(self):
        # type: () -> _ItemsView
        return _ItemsView(self)

    def values(self):
        # type: () -> _ValuesView
        return _ValuesView(self)

    def clear(self):
        # type: () -> None
        self._store().clear()

    def __contains__(self, key):
        # type: (object) -> bool
        return self._raw(key) in self._store()

    def _raw(self, key):
        # type: (object) -> bytes
        try:
            return key.encode(self.keyencoding)  # type: ignore[attr-defined, no-any-return]
        except AttributeError:      # shelve lets str's missing method say it: AttributeError
            raise TypeError("Expected a str key, not %s: persist.open() keys are text, as "
                            "shelve's are; convert it with str()" % type(key).__name__) from None

    def _store(self):
        # type: () -> _AnyStore
        store = self.dict
        if not isinstance(store, (_Store, _FileStore)):
            raise ValueError("invalid operation on closed shelf")
        return store


def _shelf_type():
    # type: () -> type[_Shelf]
    """The class of persist.open()'s shelves: _Shelf over shelve.Shelf, made at the first
    open(), as shelve imports pickle.py (5 ms of a start that opens no shelf: see pickle
    above). _Shelf's methods come first, as a subclass's would."""
    global _SHELF_TYPE
    if _SHELF_TYPE is None:
        with _LAZY_IMPORT:
            import shelve
        if not hasattr(shelve, "Shelf"):    # half made: this thread is importing it
            raise RuntimeError("persist.open() was called by a signal handler while the code "
                               "it interrupted was in the middle of importing shelve, which "
                               "the first persist.open() imports; import shelve before you "
                               "install the handler")
        # two threads may both make one: either is whole, and both are _Shelf and Shelf
        _SHELF_TYPE = types.new_class("_Shelf", (_Shelf, shelve.Shelf), exec_body=lambda ns: (
            ns.update(__module__=__name__, __qualname__="_Shelf", __doc__=_Shelf.__doc__)))
    return _SHELF_TYPE


_SHELF_TYPE = None  # type: Optional[type[_Shelf]]


class _ItemsView(_ItemsViewBase):
    _mapping: _Shelf

    def __iter__(self):
        # type: () -> Iterator[Tuple[str, Any]]
        for key in self._mapping:
            try:
                yield key, self._mapping[key]
            except KeyError:               # deleted by another process meanwhile
                continue


class _ValuesView(_ValuesViewBase):
    _mapping: _Shelf

    def __iter__(self):
        # type: () -> Iterator[Any]
        for key, value in _ItemsView(self._mapping):
            yield value


# == open: reading old shelve files ---------------------------------------------------------------
# shelve.open(name) leaves NAME.dat and NAME.dir (dbm.dumb), NAME.db or NAME.pag and NAME.dir
# (dbm.ndbm), or NAME itself (dbm.gnu, and dbm.sqlite3 from Python 3.13 on). persist.open(name)
# copies such a file's entries into a new persist store at NAME, keeping the original: the
# copy is made in full and made durable before it takes the name; the original is kept where
# it was, or, when it had that very name, under NAME.before-persist.

def _open_shelve_file(path, flag):
    # type: (str, str) -> None
    """Before persist.open(path, flag) opens a store: move a shelve file's entries into one."""
    if os.path.islink(path) or _open_here(path):    # refused by _Store, or a store of ours
        return
    kind = _shelve_kind(path)
    if kind is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    _check_private(directory, "the shelf's directory")
    if _CHECK_WORLD_WRITABLE:
        # its entries become ours, pickles and all: by the rules of a cache's own files, never
        # from files another user made in /tmp (or that every user may write)
        for name in [path] + [path + ext for ext in (".dir", ".dat", ".pag", ".db", ".bak")]:
            try:
                info = os.lstat(name)
            except FileNotFoundError:
                continue
            if _planted(info, directory):
                raise PersistError(errno.EPERM, _WORLD_WRITABLE, name,
                                   reason=PersistError.UNSAFE)
    if flag == "r":
        raise PersistError(errno.EINVAL, _SHELVE_READ_ONLY.format(kind=kind, path=path), path,
                           reason=PersistError.SHELVE)
    if flag == "n" and kind in ("dbm.dumb", "dbm.ndbm"):
        return                             # its files have other names: they stay as they are
    # One process at a time, and then only if nobody did it meanwhile. The lock is the
    # directory's, which done_dir() also takes: not where this process holds it, and only
    # for a while where another does; _from_shelve() then checks that nobody else got there
    # first.
    lock = None
    if _fcntl is not None and (os.getpid(), os.path.realpath(directory)) not in _DIRS_HELD:
        lock = os.open(directory, os.O_RDONLY)
    try:
        if lock is not None:
            deadline = time.monotonic() + _CONVERT_TIMEOUT
            while True:
                try:
                    _fcntl.flock(lock, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
            kind = _shelve_kind(path)
        if kind is not None:
            try:
                _warn(_from_shelve(path, kind, copy=flag != "n"))
            except FileExistsError:
                if _shelve_kind(path) is not None:     # not another process's store: a fault
                    raise
    finally:
        if lock is not None:
            os.close(lock)


_SHELVE_HEAD = b"SQLite format 3\0"
_SHELVE_KEPT = ".before-persist"
_SHELVE_READ_ONLY = ("a {kind} shelve file, not yet a persist store; open it once with "
                     "persist.open({path!r}, 'w'), which copies its entries into one and "
                     "keeps the original")


def _open_here(path):
    # type: (str) -> bool
    """Whether this process has an SQLite connection to the file at path (then it is a
    store of ours). Its header must not be read then: on POSIX, closing any descriptor of a
    file drops every lock the process holds on it, SQLite's too, and another process that
    closed the store would take itself for its last user and remove the -wal and -shm files
    under this one's feet (https://www.sqlite.org/howtocorrupt.html, section 2.2)."""
    real = os.path.realpath(path)
    return any(conn._conn is not None and os.path.realpath(conn.path) == real
               for conn in _connections())


def _shelve_kind(path):
    # type: (str) -> Optional[str]
    """The dbm module that made the shelve file at path ('dbm.dumb', ...), or None."""
    if os.path.isfile(path):
        try:
            with io.open(path, "rb") as file:
                head = file.read(100)
        except OSError:
            return None
        if head[:16] == _SHELVE_HEAD:
            if int.from_bytes(head[68:72], "big") == _APPLICATION_ID:
                return None
            return "dbm.sqlite3" if _is_dbm_sqlite3(path) else None
    elif not any(os.path.isfile(path + ext) for ext in (".dat", ".db", ".pag")):
        return None                        # the usual case, settled without importing dbm
    import dbm
    kind = dbm.whichdb(path)
    if kind in ("dbm.dumb", "dbm.ndbm") and os.path.lexists(path):
        return None                        # NAME is something else: not for us to replace
    return kind or None


def _is_dbm_sqlite3(path):
    # type: (str) -> bool
    """Whether path is an SQLite file with the one table of dbm.sqlite3 (Python 3.13)."""
    with _elsewhere(path):
        try:
            conn = sqlite3.connect(_uri(os.path.abspath(path), "ro"), uri=True)
        except sqlite3.Error:
            return False
        try:
            tables = _fetch(conn, "SELECT name FROM sqlite_master WHERE type = 'table'")
            columns = [row[1] for row in _fetch(conn, "PRAGMA table_info(Dict)")]
            return tables == [("Dict",)] and columns == ["key", "value"]
        except sqlite3.Error:
            return False
        finally:
            _close(conn)


def _from_shelve(path, kind, copy=True):
    # type: (str, str, bool) -> str
    """Copy the entries of the shelve file at path into a persist store at path (without
    copy, an empty one); keep the original; return what happened, for a warning."""
    directory = os.path.dirname(path)
    same_name = kind in ("dbm.gnu", "dbm.sqlite3")      # the original has the store's name
    original = os.stat(path) if same_name else None
    temp, fd = _create_temp(path, path, kind=_NEW_CACHE)
    os.close(fd)
    os.unlink(temp)                        # _Store makes it, as a store, under this name
    _UNFINISHED.pop(temp, None)
    try:
        store = _Store(temp, "c")
        try:
            count = 0
            with _shelve_items(path, kind) as items:     # a dbm.sqlite3 file is whole then
                if copy:
                    count = store.conn.transaction(_copy_rows, items, time.time())
        finally:
            store.close()                  # the last connection out empties the log into it
        fd = os.open(temp, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            _fsync(fd)
        finally:
            os.close(fd)
        if same_name:
            for log in (path + "-wal", path + "-shm"):
                if os.path.lexists(log):    # SQLite would read it as the new file's
                    raise PersistError(errno.EBUSY, "the shelve file is in use by another "
                                       "program (it has a %s file); close it there, then "
                                       "open it again" % log[-4:], path,
                                       reason=PersistError.BUSY)
            # another process may have copied it meanwhile (one without the lock, see
            # _open_shelve_file), and its store must not be replaced
            kept = _keep_aside(path, original)    # type: ignore[arg-type]  # set: same_name
            if not _same_file(os.stat(path), original):   # type: ignore[arg-type]
                raise FileExistsError(errno.EEXIST, "copied by another process meanwhile",
                                      path)
            os.replace(temp, path)
            where = "the original is kept as %s" % kept
        else:
            _rename_no_clobber(temp, path)
            where = "the original files are kept, unchanged, beside it"
        _fsync_dir(directory)
    except BaseException:
        # best effort: the copy is ours to remove; the original was never changed
        for name in (temp, temp + "-wal", temp + "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(name)
        raise
    if not copy:
        return ("persist.open(%r, 'n'): it was a %s shelve file; a new, empty persist store "
                "has its name, and %s" % (path, kind, where))
    return ("persist.open(%r): it was a %s shelve file; its %d entries are now in a persist "
            "store of that name, and %s" % (path, kind, count, where))


@contextlib.contextmanager
def _shelve_items(path, kind):
    # type: (str, str) -> Iterator[Iterator[Tuple[bytes, bytes]]]
    """An iterator of the (key, pickle) pairs of the shelve file at path, as stored."""
    if kind == "dbm.sqlite3":              # read here: Python before 3.13 has no dbm.sqlite3
        _check_companions(path)
        busy = PersistError(errno.EBUSY, "a dbm.sqlite3 shelve file that another program "
                            "has open; close it there, then open it again", path,
                            reason=PersistError.BUSY)
        try:
            # the rows are read as the caller copies them: all of it under one _elsewhere()
            with _elsewhere(path):
                conn = sqlite3.connect(_uri(path, "rw"), uri=True, isolation_level=None,
                                       timeout=_SHELVE_TIMEOUT)
                try:
                    # Out of WAL mode first, which needs the only connection to it: then
                    # the file holds all of it, and leaves no -wal file that SQLite would
                    # replay into the store that takes its name. Another process may be
                    # looking at what the file is (_shelve_kind), for a moment.
                    if _journal_mode(conn, "DELETE", _SHELVE_TIMEOUT).lower() == "wal":
                        raise busy
                    rows = conn.execute("SELECT key, value FROM Dict")
                    yield ((bytes(key) if isinstance(key, (bytes, memoryview)) else
                            str(key).encode("utf-8"), bytes(value)) for key, value in rows)
                finally:
                    _close(conn)
        except sqlite3.Error as exc:
            if _sqlite_failure(exc) == "busy":
                raise busy from None
            raise OSError(errno.EIO, "cannot read the shelve file (%s)" % exc, path) from None
        return
    import dbm
    try:
        db = dbm.open(path, "r")
    except ImportError:
        raise PersistError(errno.EINVAL, "a %s shelve file, which this Python cannot read "
                           "(it has no %s); open it once with a Python that has, to copy "
                           "its entries into a persist store" % (kind, kind), path,
                           reason=PersistError.SHELVE_UNSUPPORTED) from None
    try:
        yield ((key, db[key]) for key in db.keys())  # type: ignore[misc]  # keys are bytes
    finally:
        db.close()


def _copy_rows(conn, items, stored):
    # type: (sqlite3.Connection, Iterable[Tuple[bytes, bytes]], float) -> int
    conn.executemany(_PUT, ((key, value, None, stored, None, None, None)
                            for key, value in items))
    return _fetch(conn, _COUNT)[0][0]  # type: ignore[no-any-return]  # a row: Any


def _same_file(info, other):
    # type: (os.stat_result, os.stat_result) -> bool
    return (info.st_dev, info.st_ino) == (other.st_dev, other.st_ino)


def _keep_aside(path, original):
    # type: (str, os.stat_result) -> str
    """A second name for the file at path, durable before path is replaced: a hard link,
    or where there are none a copy. original: os.stat() of the file as it was read; if path
    is another file now (another process copied it meanwhile), FileExistsError."""
    moved = FileExistsError(errno.EEXIST, "copied by another process meanwhile", path)
    for number in range(1, 100):
        kept = path + _SHELVE_KEPT + ("" if number == 1 else "-%d" % number)
        try:
            os.link(path, kept)
        except FileExistsError:
            if _same_file(os.stat(kept), original):   # a copy that stopped half way
                return kept
            continue
        except OSError:                   # no hard links on this filesystem: a copy
            if os.path.lexists(kept):
                continue
            import shutil
            temp, fd = _create_temp(kept, path)
            try:
                with io.open(path, "rb") as source, io.open(fd, "wb") as copy:
                    if not _same_file(os.fstat(source.fileno()), original):
                        raise moved
                    shutil.copyfileobj(source, copy)
                    copy.flush()
                    _fsync(copy.fileno())
                _rename_no_clobber(temp, kept)   # whole, or not under that name at all
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                _UNFINISHED.pop(temp, None)
                if isinstance(exc, FileExistsError) and exc is not moved:
                    continue
                raise
            _UNFINISHED.pop(temp, None)
        else:
            if not _same_file(os.stat(kept), original):
                os.unlink(kept)           # our link, to the other process's store
                raise moved
        _fsync_dir(os.path.dirname(path))
        return kept
    raise FileExistsError(errno.EEXIST, "no free name to keep the original under",
                          path + _SHELVE_KEPT)


# == atomic_write, atomic_open ====================================================================
# The new content goes to a temporary file of a random name beside the target, is flushed
# and fsynced, and takes the target's name with os.replace (then the directory is fsynced):
# a reader sees the old file or the new, never half.

def atomic_write(path: "_Path", data: "Union[str, Buffer]", *,
                 sync: bool = True, encoding: "Optional[str]" = None,
                 errors: "Optional[str]" = None, newline: "Optional[str]" = None) -> None:
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


if TYPE_CHECKING:     # text or binary, by mode, as open() is
    @overload
    def atomic_open(path: _Path, mode: _TextMode = "w", *, sync: bool = True,
                    encoding: Optional[str] = None, errors: Optional[str] = None,
                    newline: Optional[str] = None
                    ) -> contextlib.AbstractContextManager[io.TextIOWrapper, Optional[bool]]: ...
    @overload
    def atomic_open(path: _Path, mode: _BinaryMode, *, sync: bool = True,
                    encoding: None = None, errors: None = None, newline: None = None
                    ) -> contextlib.AbstractContextManager[io.BufferedWriter, Optional[bool]]: ...
    @overload
    def atomic_open(path: _Path, mode: str, *, sync: bool = True,
                    encoding: Optional[str] = None, errors: Optional[str] = None,
                    newline: Optional[str] = None
                    ) -> contextlib.AbstractContextManager[IO[Any], Optional[bool]]: ...


def atomic_open(path: "_Path", mode: str = "w", *, sync: bool = True,
                encoding: "Optional[str]" = None, errors: "Optional[str]" = None,
                newline: "Optional[str]" = None
                ) -> "contextlib.AbstractContextManager[IO[Any], Optional[bool]]":
    """Open a file for writing that replaces path only when the with-block ends without error.

    with atomic_open("out.json") as f: json.dump(obj, f)

    mode is "w" or "wb", or "x" or "xb" to fail with FileExistsError if path exists (checked
    before the block runs and again, without a race, at the end). Text is utf-8 unless
    encoding says otherwise; errors and newline are as for open(). The data goes to a
    temporary .NAME.RANDOM.tmp beside path, is flushed and fsynced, renamed over path, and
    the directory is fsynced: at every instant path holds the old content or the new, even
    if the process is killed. The file's name is path, as open()'s is; the block may close
    it (the content is still committed). sync=False skips the fsyncs (faster; a power cut
    may then lose the new content, never mix it). On any exception the temporary file is
    removed and path is untouched. A relative path is resolved once, on entry: an os.chdir()
    in the block does not move the file.

    A new file gets the permissions open() would give it. A replaced one keeps its mode, and
    its owner and group where the process may set them, as open(path, "w") would: root keeps
    both; a member of the file's group keeps the group; anyone else (POSIX), and everyone on
    Windows, makes the new file their own. It is a new file: hard links to the old one, ACLs
    and extended attributes are not carried over. A symbolic link at path is followed, as
    open() does; one that another user made in a sticky directory every user may write
    (/tmp) is refused with PermissionError, as Linux's open() refuses it. A device, FIFO or
    socket at path (or at the end of the link) is refused with PersistError, never replaced.
    Windows: replacing a file that another process holds open can fail with PermissionError.
    """
    _mode(mode, encoding, errors, newline)      # wrong arguments fail here, as open()'s do
    return _atomic_open(path, mode, sync, True, encoding, errors, newline)


@contextlib.contextmanager
def _atomic_open(path, mode, sync, follow, encoding=None, errors=None, newline=None,
                 bits=0o666):
    # type: (_Path, str, bool, bool, Optional[str], Optional[str], Optional[str], int) -> Iterator[IO[Any]]
    """atomic_open(); follow=False replaces a symbolic link at path instead of its target;
    a new file gets the mode bits & ~umask (open()'s 0o666 unless persist's own)."""
    kind, encoding = _mode(mode, encoding, errors, newline)
    target = os.fsdecode(os.fspath(path))
    if not target:                          # not the current directory: open("") fails so
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    # Resolved once, here: an os.chdir() in the block must not move the commit elsewhere.
    # Not os.path.abspath(), which would drop "link/.." where open() follows the link.
    if not os.path.isabs(target):
        target = os.path.join(os.getcwd(), target)
    if kind == "x" and os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    if follow:
        target = _follow(target, path)      # as open(path, "w"): the link's target is written
    old = _existing(target, path, follow)
    owner = os.getpid()
    temp, fd = _create_temp(target, path, bits)
    opened = [fd]
    try:
        # closefd=False: a block may close the file itself (libraries that write to a file
        # object often do), and the descriptor must outlive it for the fsync, and its lock
        # (see _create_temp) the rename
        try:
            with io.open(fd, "wb" if encoding is None else "w", encoding=encoding,
                         errors=errors, newline=newline, closefd=False) as file:
                # its name is the path, as open()'s is, not the descriptor: code that
                # guesses a format from the extension (an image's) reads it
                raw = file.buffer.raw if encoding else file.raw  # type: ignore[attr-defined]
                raw.name = os.fspath(path)
                if old is not None and stat.S_ISREG(old.st_mode):
                    _keep_owner_and_mode(fd, temp, old)
                yield file
                # A child forked in the block (its descriptor now devnull's: see
                # _silence_unfinished) may not commit or remove its parent's file.
                if os.getpid() != owner:
                    raise RuntimeError("atomic_open(%r): this process was forked inside the "
                                       "block, and the file is its parent's to finish: write "
                                       "it in the parent, or open it anew in the child"
                                       % (path,))
            if sync:
                _fsync(fd)
        finally:
            if not _RENAME_OPEN_FILES:   # Windows renames no open file (and has no flock)
                os.close(opened.pop())
        # The except below removes it from here on. Taken off before the rename: one a Ctrl-C
        # left listed after it would name, at exit, whatever file has that name then and the
        # inode ours had (the target's, or one made anew on it).
        _UNFINISHED.pop(temp, None)
        if kind == "x":
            try:
                _rename_no_clobber(temp, target)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        else:
            _existing(target, path, follow)     # again: a FIFO may have appeared meanwhile
            os.replace(temp, target)
    except BaseException:
        if os.getpid() == owner:
            # best effort: the temporary file may be gone already; the original error matters
            with contextlib.suppress(OSError):
                os.unlink(temp)
            _UNFINISHED.pop(temp, None)
        raise
    finally:
        if opened:
            os.close(opened[0])
    if sync:
        _fsync_dir(os.path.dirname(target))


def _mode(mode, encoding, errors, newline):
    # type: (str, Optional[str], Optional[str], Optional[str]) -> Tuple[str, Optional[str]]
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
    # type: (int) -> str
    """What a file type is called in an error: 'a FIFO', 'a character device', ..."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _existing(target, shown, follow):
    # type: (str, _Path, bool) -> Optional[os.stat_result]
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
                           "open(), or give another path" % _kind(info.st_mode), shown,
                           reason=PersistError.NOT_A_FILE)
    if stat.S_ISREG(info.st_mode) and not _may_write(target):
        # open(path, "w") would refuse: a read-only file stays, as it would
        raise PermissionError(errno.EACCES, "Permission denied (the file is read-only to "
                              "you; make it writable first if you mean to replace it)", shown)
    return info


def _may_write(path):
    # type: (str) -> bool
    """Whether open(path, "w") would be allowed, by the permissions of whoever runs us."""
    if os.access in os.supports_effective_ids:
        return os.access(path, os.W_OK, effective_ids=True)
    return os.access(path, os.W_OK)


def _follow(target, shown):
    # type: (str, _Path) -> str
    """Where the symbolic link at target leads, resolved a link at a time, as open() does.

    Only the last component is resolved here; the kernel resolves the others when the
    temporary file is created, with its own checks. A link that another user planted in a
    sticky directory that every user may write (/tmp) is refused, as open() refuses it
    under Linux's fs.protected_symlinks (on by default): os.path.realpath() would follow
    it, and as root replace whatever file that user chose, /etc/passwd included.
    """
    for _ in range(40):                    # the kernel's limit on links in one lookup
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            return target
        if not stat.S_ISLNK(info.st_mode):
            return target
        directory = os.path.dirname(target)
        if _CHECK_WORLD_WRITABLE:
            shared = os.stat(directory)
            if (shared.st_mode & stat.S_IWOTH and shared.st_mode & stat.S_ISVTX
                    and info.st_uid not in (os.geteuid(), shared.st_uid)):
                raise PermissionError(errno.EACCES, (
                    "a symbolic link that user %d made in %s, a directory every user may "
                    "write: following it would replace a file of their choosing; remove the "
                    "link, or write elsewhere" % (info.st_uid, directory)), shown)
        target = os.path.join(directory, os.readlink(target))
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), shown)


def _keep_owner_and_mode(fd, temp, old):
    # type: (int, str, os.stat_result) -> None
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
    # By descriptor where possible: in a directory others may write, the name temp could be
    # a link to /etc/shadow by now, and chmod() would follow it.
    os.chmod(fd if _CHMOD_FD else temp, stat.S_IMODE(old.st_mode))


# == atomic_write, atomic_open: temporary files ---------------------------------------------------
# Each is made under a random name, locked (flock) by its writer while it is open. At
# exit this process removes those it left (_remove_unfinished; a forked child leaves its
# parent's alone); one whose writer was killed is removed by the next done_dir() over its
# directory (_remove_if_dead).

# _create_temp()'s files not yet renamed or removed: name -> (pid, device, inode, descriptor)
_UNFINISHED = {}  # type: Dict[str, Tuple[int, int, int, int]]
# The names of persist's temporary files, each of a shape that the other can never take, so
# that a sweep removes only its own: .NAME.RANDOM.tmp, atomic_open()'s (RANDOM: 8 hex digits
# right before .tmp), and .NAME.RANDOM.new-cache.tmp, a cache being made (see _Store.sweep).
_ATOMIC_TEMP = ""
_NEW_CACHE = ".new-cache"


def _is_atomic_temp(name):
    # type: (str) -> bool
    """Whether name has the shape of an atomic_open() temporary file: .NAME.RANDOM.tmp."""
    return (name.startswith(".") and name.endswith(".tmp") and len(name) >= 15 and
            name[-13] == "." and _hex_name(name[-12:-4], 8))


def _create_temp(target, shown, mode=0o666, kind=_ATOMIC_TEMP):
    # type: (str, _Path, int, str) -> Tuple[str, int]
    """Create .NAME.RANDOM{kind}.tmp beside target, exclusively, never through a link, mode &
    ~umask, and locked (flock) for as long as the descriptor is open: a sweep takes a file
    that nobody holds for one whose writer was killed (see _remove_if_dead).

    The caller renames or removes it, then takes it off _UNFINISHED; if it never can (see
    _remove_unfinished), the process's exit removes it."""
    directory, name = os.path.split(target)
    for _ in range(100):
        temp = os.path.join(directory, ".%s.%s%s.tmp" % (name[:60], os.urandom(4).hex(), kind))
        # A signal handler's exception (Ctrl-C, an alarm) is raised as a call returns to
        # Python code: called from Python, os.open() would raise it after creating the file,
        # its descriptor lost, whenever the signal came during the open() system call (a
        # wide window: one Ctrl-C in two, measured). Called by list.extend(), from C, its
        # descriptor is stored before that exception is raised, so both can be undone.
        opened: "List[int]" = []
        try:
            opened.extend(builtins.map(os.open, (temp,), (_O_TEMP,), (mode,)))   # umask
            if _fcntl is not None:
                # best effort: a filesystem without locks (some NFS) has no sweep either
                with contextlib.suppress(OSError):
                    _fcntl.flock(opened[0], _fcntl.LOCK_EX)
            info = os.fstat(opened[0])
            if info.st_nlink == 0:      # a sweep took it before we locked it: another name
                os.close(opened.pop())
                continue
            _UNFINISHED[temp] = (os.getpid(), info.st_dev, info.st_ino, opened[0])
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory (its directory "
                                    "does not exist; create it first)", shown) from None
        except BaseException:
            if opened:             # created, then interrupted: an OSError creates nothing
                _UNFINISHED.pop(temp, None)
                os.close(opened[0])
                # best effort: the exception that interrupted us is what matters
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise
        return temp, opened[0]
    raise FileExistsError(errno.EEXIST, "no free temporary file name beside it", shown)


def _remove_if_dead(name, dir_fd=None):
    # type: (str, Optional[int]) -> bool
    """Remove the atomic_open() temporary file name (relative to dir_fd, if given) if no
    process holds it: its writer was killed. Whether it is gone now.

    Its writer holds its lock from before it has a name to after its rename or removal (see
    _create_temp), so a file whose lock we get, still under that name, is nobody's. Without
    locks (Windows), no file is proven dead, and none is removed.
    """
    if _fcntl is None:
        return False
    try:
        fd = os.open(name, _O_SYNC_FILE, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)     # else its writer holds it
        info = os.fstat(fd)
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(
                info.st_mode):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_unfinished():
    # type: () -> None
    """At exit: remove the temporary files this process made and never renamed or removed.

    A Ctrl-C can land where no try covers it: as _create_temp() returns, or as a with
    statement enters atomic_open() (its generator then waits at its yield, and PyPy never
    finalizes it). A file is removed only if it is still the one made here: not a parent's
    (after fork), nor a new file under a name that ours was renamed from.
    """
    pid = os.getpid()
    for name, (owner, device, inode, _) in list(_UNFINISHED.items()):
        if owner == pid:
            # best effort: at exit, whatever stops this stops nothing else
            with contextlib.suppress(OSError):
                info = os.lstat(name)
                if (info.st_dev, info.st_ino) == (device, inode):
                    os.unlink(name)


def _silence_unfinished():
    # type: () -> None
    """In a child just forked: the parent's unfinished files get devnull in their descriptors.

    The child has a copy of each one's unflushed buffer, and whatever flushes it must not write
    it into the parent's file a second time: leaving the block, or the exit of the interpreter,
    which on PyPy flushes every open file, even one that another thread of the parent had open
    in its block (that thread is not in the child, and never leaves it).
    """
    for _, device, inode, fd in list(_UNFINISHED.values()):
        try:
            info = os.fstat(fd)
        except OSError:                    # closed already: nothing to flush through it
            continue
        if (info.st_dev, info.st_ino) == (device, inode):     # not a number used again since
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd, inheritable=False)
            os.close(null)


atexit.register(_remove_unfinished)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_silence_unfinished)


# == done_dir, is_done ============================================================================
# done_dir(path) fills a directory and writes its marker (DONE) only when the block ends
# well, after every file in it is durable; is_done(path) asks for the marker. A lock keeps
# two fillers of one directory apart.

def done_dir(path: "_Path", *, marker: str = "DONE", clean: bool = False
             ) -> "contextlib.AbstractContextManager[pathlib.Path, Optional[bool]]":
    """A directory that gets its marker file only when the with-block finishes without error.

    with done_dir("work/features") as d: ...   # d is the directory, an absolute pathlib.Path

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
    directory at the same time raises PersistError (POSIX, where the filesystem has locks).
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
    # type: (pathlib.Path, str, bool) -> Iterator[pathlib.Path]
    """done_dir() once its arguments are checked: the work happens on entry and exit."""
    where = directory.absolute()           # once: an os.chdir() in the block moves nothing
    made: "List[pathlib.Path]"
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
        owner = os.getpid()
        yield where                        # absolute: files written through it follow
        if os.getpid() != owner:
            raise RuntimeError("done_dir(%r): this process was forked inside the block, and "
                               "only its parent finishes the stage" % (os.fspath(where),))
        record = _marker_record(where, marker)
        for path in made:                  # their entries too, or a power cut may drop them
            _fsync_dir(path.parent)
        _fsync_dir(where)
        with _atomic_open(stamp, "w", True, False) as file:
            file.write(record)


def is_done(path: "_Path", *, marker: str = "DONE") -> bool:
    """True when the directory at path holds marker as a regular file (any content)."""
    try:
        return stat.S_ISREG(os.lstat(os.path.join(os.fsdecode(os.fspath(path)), marker)).st_mode)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _dir_lock(directory):
    # type: (Union[str, pathlib.Path]) -> Iterator[None]
    """Hold an exclusive lock on directory, or fail at once if someone else holds it."""
    if _fcntl is None:
        yield
        return
    opened: "List[int]" = []     # by list.extend(), as in _create_temp(): no Ctrl-C leaks it
    held = (os.getpid(), os.path.realpath(directory))
    try:
        opened.extend(builtins.map(os.open, (directory,), (os.O_RDONLY,)))
        for retry in (True, False):
            try:
                _fcntl.flock(opened[0], _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not retry:
                    raise PersistError(errno.EBUSY, _BUSY_DIR, os.fspath(directory),
                                       reason=PersistError.BUSY) from None
            except OSError:
                # a filesystem without locks (some NFS and FUSE mounts): the stage runs, and a
                # second done_dir() at once goes undetected, as on Windows
                break
            # A Ctrl-C raised as a with statement entered or left a done_dir() of this
            # process leaves its generator waiting at its yield, the lock held, until it is
            # finalized: at once on CPython, at the next collection on PyPy.
            import gc
            gc.collect()
        _DIRS_HELD.add(held)
        yield
    finally:
        _DIRS_HELD.discard(held)
        if opened:
            os.close(opened[0])


def _empty(directory):
    # type: (pathlib.Path) -> None
    """Remove everything in directory, not following symbolic links."""
    import shutil
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _marker_record(directory, marker):
    # type: (pathlib.Path, str) -> str
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


class _NotDurable(Exception):
    """An fsync failed in _sync_tree(): (errno, strerror, name), past its except OSError."""


def _sync_tree(folder, skip=None, dir_fd=None, shown=None):
    # type: (str, Optional[str], Optional[int], Optional[str]) -> Tuple[int, int, int]
    """Fsync each file and directory in folder and below; (files, bytes, files not synced).

    Symbolic links are not followed, and the file skip at the top is left out. A file or
    directory that vanishes while we look (another tool's temporary file) is left out: the
    marker's record is for people, and must never cost the marker. One that may not be
    opened is counted as not synced. Where scandir takes a descriptor, each file is opened
    relative to its open directory, with no path to resolve.
    """
    shown = folder if shown is None else shown      # its path, for people
    files = size = unsynced = 0
    regular: "List[str]" = []              # this directory's files, synced after the loop
    opened: "List[int]" = []               # by list.extend(), as in _create_temp()
    try:
        if _SCANDIR_FD:
            opened.extend(builtins.map(functools.partial(os.open, dir_fd=dir_fd), (folder,),
                                       (_O_SUBDIR if dir_fd is not None else os.O_RDONLY,)))
        fd = opened[0] if opened else None
        with os.scandir(folder if fd is None else fd) as entries:
            for entry in entries:
                name = entry.path if fd is None else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        more = _sync_tree(name, None, fd, os.path.join(shown, entry.name))
                        files, size = files + more[0], size + more[1]
                        unsynced += more[2]
                    elif entry.name == skip:
                        continue
                    elif _is_atomic_temp(entry.name) and entry.is_file(follow_symlinks=False):
                        # not a result: an atomic_open() under way (never counted), or left
                        # by a killed writer (removed). Said aloud: a file of someone else's
                        # may have that shape, and then they know where it went.
                        if _remove_if_dead(name, fd):
                            _warn("done_dir() removed %s: a file named as atomic_write() names "
                                  "its temporary files, which no process was writing (left by "
                                  "a writer that was killed); name your own files otherwise"
                                  % os.path.join(shown, entry.name))
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
                os.fsync(fd)   # type: ignore[arg-type]  # set: dir_fd comes with _SCANDIR_FD
    finally:
        if opened:
            os.close(opened[0])
    return files, size, unsynced


def _sync_files(names, dir_fd):
    # type: (List[str], Optional[int]) -> Tuple[int, int, int]
    """Fsync the files names (relative to dir_fd, if given): (files, bytes, files not synced).

    Several threads fsync at once, because the drive's cache flushes that concurrent fsyncs
    ask for are merged: for 3,000 small files, 0.18 s instead of 3.2 s on a busy disk here.
    """
    if _START_WRITEBACK is not None:
        for name in names:
            _start_writeback(name, dir_fd)
    results: "List[Any]" = []              # a size, _VANISHED, or the exception

    def sync(part):
        # type: (List[str]) -> None
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
        # Threads of _thread, not threading: a Ctrl-C that lands inside Thread.start() leaves
        # a thread half started, which the interpreter then waits for at exit, for ever.
        # These each do their part and say so; interrupted, the caller stops waiting, and
        # they finish on their own (a closed dir_fd only makes their fsyncs fail).
        finished = _thread.allocate_lock()
        counting = _thread.allocate_lock()
        running = [_SYNC_THREADS]
        finished.acquire()

        def part(i):
            # type: (int) -> None
            try:
                sync(names[i::_SYNC_THREADS])
            finally:
                with counting:
                    running[0] -= 1
                    if not running[0]:
                        finished.release()

        for i in range(_SYNC_THREADS):
            _thread.start_new_thread(part, (i,))
        finished.acquire()                 # a signal interrupts it, as any wait
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


def _sync_file(name, dir_fd):
    # type: (str, Optional[int]) -> int
    """Fsync the regular file name (relative to dir_fd, if given): its size in bytes.

    An OSError from opening it means it vanished or may not be read; one from fsync means
    the file is not durable, and is raised as _NotDurable. Plain fsync, even on macOS: one
    F_FULLFSYNC afterwards, on the marker, empties the drive's cache of every file at once.
    """
    opened: "List[int]" = []                            # by list.extend(), as in _create_temp()
    try:
        opened.extend(builtins.map(functools.partial(os.open, dir_fd=dir_fd), (name,),
                                   (_O_SYNC_FILE,)))
        info = os.fstat(opened[0])
        if stat.S_ISREG(info.st_mode):     # a FIFO swapped in meanwhile is only counted
            try:
                os.fsync(opened[0])
            except OSError as exc:
                raise _NotDurable(exc.errno, exc.strerror, name) from None
        return info.st_size
    finally:
        if opened:
            os.close(opened[0])


def _start_writeback(name, dir_fd):
    # type: (str, Optional[int]) -> None
    """Ask Linux to start writing the file's dirty pages to disk, without waiting."""
    # This is an optimization only; it's ok if it fails. Started for every file before the
    # first fsync, the writes and their block allocations share a few journal commits: with
    # the threads of _sync_files, 10,000 fsyncs took 0.5 s here instead of 0.7 s. The price:
    # pages already on disk leave the page cache (os has no sync_file_range(), which would
    # start the writes and do only that).
    with contextlib.suppress(OSError):
        opened: "List[int]" = []                        # by list.extend(), as in _create_temp()
        try:
            opened.extend(builtins.map(functools.partial(os.open, dir_fd=dir_fd), (name,),
                                       (_O_SYNC_FILE,)))
            os.posix_fadvise(opened[0], 0, 0, _START_WRITEBACK)  # type: ignore[arg-type]
        finally:
            if opened:
                os.close(opened[0])


# == the store ====================================================================================
# One SQLite file per cache, in WAL mode, shared by every thread and process:
# _Store       what the shelf and memoize do: get, put, delete, iterate, count, clear, prune
# _Values      the files of pickles too large for a row, each one named by its row
# _Connection  one process's connection to the file: a lock, fork() and signals, errors
# Nothing SQLite is open across fork(): the hooks close it before and reopen after.

class _Store:
    """A cache file: keys (bytes) to pickled values, with what memoize records beside them.

    Every write is one transaction, committed when the method returns. Reads take no lock
    that outlives them. The interface is small, so that another backend could replace it.
    """

    def __init__(self, filename, flag="c"):
        # type: (_Path, str) -> None
        if flag not in _FLAGS:
            raise ValueError("flag must be 'r', 'w', 'c' or 'n', not %r" % (flag,))
        self.path = os.path.abspath(os.fsdecode(os.fspath(filename)))
        self.flag = flag
        self.values = _Values(self.path + ".values")
        self._puts = 0                  # put() restarts the log every so often
        self._owned: "Optional[bool]" = None     # whether Dict records owners: owned()
        self._check_path()
        if flag in "cn" and not os.path.exists(self.path):
            self._create()
            # Again: in /tmp another user may have taken the name with a cache of their own
            # as ours was made (ours then was not linked there): refused, not opened.
            self._check_path()
        elif flag in "cn" and os.path.isfile(self.path) and _size(self.path) == 0:
            self._create_in_place()
        mode = _FLAGS[flag]
        if mode == "ro" and _may_write(self.path) and _may_write(os.path.dirname(self.path)):
            mode = "query"      # reads only, but closes as a writer: no -wal or -shm left
        self.conn = _Connection(self.path, mode)
        try:
            self._open_now()
        except BaseException:
            self.conn.close()
            raise
        self.calls = True              # whether Failures has the column call (see _ADD_CALL)
        if flag == "n":
            self.clear()
        elif flag != "r":
            self.sweep()
        self._check_calls()

    def _check_path(self):
        # type: () -> None
        """Refuse a cache others could plant code in, or that would write through a link."""
        if self.flag in "rw" and not os.path.exists(self.path):
            raise FileNotFoundError(errno.ENOENT, "No such cache file (open it with flag 'c' "
                                    "to create it)", self.path)
        directory = os.path.dirname(self.path)
        if _CHECK_WORLD_WRITABLE:
            _check_private(directory, "the cache's directory")
        for name in (self.path, self.values.directory):
            try:
                info = os.lstat(name)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(info.st_mode):
                raise PersistError(errno.ELOOP, _LINK, name, reason=PersistError.SYMLINK)
            if name == self.path and stat.S_ISDIR(info.st_mode):    # SQLite: "unable to open"
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), name)
            if name == self.path and not stat.S_ISREG(info.st_mode):
                # SQLite would wait for ever to open a FIFO for reading (persist ls, 'r')
                raise PersistError(errno.EINVAL, "%s, not a cache file; persist leaves it as "
                                   "it is: give persist another file name" % _kind(
                                       info.st_mode), name, reason=PersistError.NOT_A_FILE)
            if _CHECK_WORLD_WRITABLE and _planted(info, directory):
                raise PersistError(errno.EPERM, _WORLD_WRITABLE, name,
                                   reason=PersistError.UNSAFE)
        _check_companions(self.path)

    def _check_calls(self):
        # type: () -> None
        """Give the Failures of a cache made before persist kept failed calls their column
        call: the other columns stay as they are, and so does the format, so that an older
        persist.py still uses the cache (it names the columns it writes)."""
        def columns(conn):
            # type: (sqlite3.Connection) -> List[str]
            return [row[1] for row in _fetch(conn, "PRAGMA table_info(Failures)")]

        def add(conn):
            # type: (sqlite3.Connection) -> None
            if "call" not in columns(conn):   # another process may have added it meanwhile
                conn.execute(_ADD_CALL)

        if "call" in self.conn.run(columns):
            return
        if self.flag != "r":
            with contextlib.suppress(OSError):   # a read-only cache: its records have none
                self.conn.transaction(add)
        self.calls = "call" in self.conn.run(columns)

    def _create(self):
        # type: () -> None
        """Make a new cache beside path and link it into place: nobody sees it half made.

        It is made in rollback mode and linked while an exclusive lock on it is held; only then
        are the -journal, -wal and -shm files of a cache deleted without them removed. Otherwise SQLite
        would replay that old log into the new file, and deleted results would come back.
        Nobody can open the new file before they are gone: opening waits for the lock.
        """
        directory = os.path.dirname(self.path)
        try:
            # SQLite gives the -wal and -shm files the mode of this one
            temp, fd = _create_temp(self.path, self.path, _FILE_MODE, _NEW_CACHE)
        except PermissionError:
            raise PermissionError(errno.EACCES, "cannot create the cache: its directory is "
                                  "not writable", directory) from None
        os.close(fd)
        try:
            # In /tmp its journal's name too is taken by an empty file of ours first: SQLite
            # makes it one statement at a time, and would replay a journal planted meanwhile.
            _check_companions(temp)
            with _elsewhere(self.path):
                self._make(temp)
        finally:
            # best effort each: the empty ones that _check_companions() made, if still there
            for name in (temp, temp + "-journal", temp + "-wal", temp + "-shm"):
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    os.unlink(name)
            _UNFINISHED.pop(temp, None)

    def _make(self, temp):
        # type: (str) -> None
        """_create() in the empty file temp, then linked as path."""
        conn = None
        try:
            conn = sqlite3.connect(temp, isolation_level=None)
            # each statement is a transaction: TRUNCATE keeps the journal that
            # _check_companions() made ours between them, where DELETE would free its name
            _fetch(conn, "PRAGMA journal_mode=TRUNCATE")
            for statement in _CREATE:
                conn.execute(statement)
            if _RENAME_OPEN_FILES:
                conn.execute("BEGIN EXCLUSIVE")
                with contextlib.suppress(FileExistsError):   # another process was first
                    _rename_no_clobber(temp, self.path)
                    self._remove_stale_companions()
                conn.execute("COMMIT")
            else:
                # Windows renames no open file, and removes no log that a process has open
                _close(conn)
                if not os.path.exists(self.path):
                    self._remove_stale_companions()
                with contextlib.suppress(FileExistsError):
                    _rename_no_clobber(temp, self.path)
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, self.path) from None
        finally:
            if conn is not None:
                _close(conn)

    def _open_now(self):
        # type: () -> None
        """Open the connection now, so that a bad file fails here."""
        try:
            self.conn.run(_fetch, "SELECT 1")
        except PersistError as exc:
            # Another process filling this empty file has begun: SQLite wrote the first page
            # (PRAGMA auto_vacuum does, before the lock _fill() takes), and no table yet. To
            # 'c' and 'n' that is an empty file still: fill it under that lock, as _fill()
            # checks, and open it again.
            if exc.reason != PersistError.EMPTY or self.flag not in "cn":
                raise
            self._create_in_place()
            self.conn.run(_fetch, "SELECT 1")

    def _create_in_place(self):
        # type: () -> None
        """Make a new cache in the empty file at path, as tempfile.mkstemp() leaves one for
        shelve.open(name, "n") to fill: SQLite takes an empty file for an empty database.

        Under its exclusive lock, and only if it is empty still: a second creator waits for
        the lock, and then finds the cache made.
        """
        with _elsewhere(self.path):
            self._fill()

    def _fill(self):
        # type: () -> None
        conn = None
        try:
            conn = sqlite3.connect(_uri(self.path, "rw"), uri=True, timeout=_BUSY_TIMEOUT,
                                   isolation_level=None)
            for statement in _CREATE[:2]:     # page size and auto_vacuum: before the lock,
                conn.execute(statement)       # where they apply to the file then written
            conn.execute("BEGIN EXCLUSIVE")
            # empty still: no table, and no other program's mark (a user_version of its own)
            if not _fetch(conn, "SELECT 1 FROM sqlite_master") and \
                    _fetch(conn, "PRAGMA application_id") == [(0,)] and \
                    _fetch(conn, "PRAGMA user_version") == [(0,)]:
                self._remove_stale_companions()
                for statement in _CREATE[2:]:
                    conn.execute(statement)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, self.path) from None
        finally:
            if conn is not None:
                _close(conn)

    def _remove_stale_companions(self):
        # type: () -> None
        # a journal too: a hot one, left by a transaction killed in the middle, would be
        # replayed into the new file as a log would
        for stale in (self.path + "-journal", self.path + "-wal", self.path + "-shm"):
            # best effort: on Windows one in use cannot go, and then it is not stale
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(stale)

    # Reading

    def get(self, key):
        # type: (bytes) -> Optional[_Row]
        """(pickle or b'', value file name or None, stored, seconds) for key, or None."""
        rows = self.conn.query(_GET, (key,))
        return rows[0] if rows else None

    def hit(self, key):
        # type: (bytes) -> Optional[Tuple[Optional[bytes], Optional[float]]]
        """(the pickle, or None where it is not in the row: see _HIT; seconds) for key, or
        None: what memoize's hit needs of get()'s row, in two columns."""
        rows = self.conn.query(_HIT, (key,))
        return rows[0] if rows else None

    def load(self, row):
        # type: (_Row) -> Any
        """Unpickle the value of a row from get(); FileNotFoundError if a writer replaced it
        (and removed its file) since: get() it again."""
        if row[1] is None:
            return pickle.loads(row[0])
        with io.open(self.values.path(row[1]), "rb") as file:
            return pickle.load(file)

    def keys(self):
        # type: () -> List[bytes]
        return [key for key, in self.conn.run(_fetch, _KEYS)]

    def __bool__(self):           # a store is there, however many entries: no query for that
        # type: () -> bool
        return True

    def __len__(self):
        # type: () -> int
        return self.conn.run(_fetch, _COUNT)[0][0]  # type: ignore[no-any-return]  # a row: Any

    def __contains__(self, key):
        # type: (bytes) -> bool
        return bool(self.conn.run(_fetch, _CONTAINS, (key,)))

    def info(self):
        # type: () -> Dict[str, str]
        return dict(self.conn.run(_fetch, _INFO))

    def entries(self, limit=None):
        # type: (Optional[int]) -> List[Tuple[bytes, Optional[str], float, int, Optional[float], Optional[str]]]
        """(key, args, stored, size, seconds, version) of every entry, oldest first; of the
        limit oldest, if given (SQLite keeps those alone as it reads: 'persist show' of a
        million entries held them all, 500 MB, to print 50)."""
        rows = self.conn.run(_fetch, _ENTRIES + " LIMIT ?", (-1 if limit is None else limit,))
        return [(key, args, stored, _size(self.values.path(file)) if file else size, seconds,
                 version) for key, args, stored, size, file, seconds, version in rows]

    def summary(self):
        # type: () -> Tuple[int, Optional[float], Optional[float], int, int, float, int]
        """(entries, oldest, newest, stale entries, their bytes, seconds their calls took in
        all, failure records), for 'persist ls': one scan of the table (it made two, with
        tally()), and one more where something is stale. Stale entries are those of another
        version than the latest to open the cache, or of other code (stale_codes())."""
        (count, oldest, newest, seconds, failures), = self.conn.run(_fetch, _SUMMARY)
        version = self.info().get("version")
        codes = self.stale_codes()
        stale = self.prune(version=version, codes=codes, dry_run=True)[:2] \
            if version or codes else (0, 0)
        return (count, oldest, newest) + stale + (seconds, failures)

    def tally(self, owner=None):
        # type: (Optional[str]) -> Tuple[int, float, int]
        """(entries, seconds their calls took in all, failure records), in one query; those
        of owner alone (and those stored before owners were recorded), if given."""
        if owner is not None and self.owned():
            return self.conn.run(_fetch, _TALLY_OWNED, (owner,) * 3)[0]  # type: ignore[no-any-return]
        return self.conn.run(_fetch, _TALLY)[0]  # type: ignore[no-any-return]  # a row: Any

    def owned(self):
        # type: () -> bool
        """Whether the cache records owners (see _CREATE): one made before does not."""
        if self._owned is None:
            columns = self.conn.run(_fetch, "PRAGMA table_info(Dict)")
            self._owned = any(column[1] == "owner" for column in columns)
        return self._owned

    def own(self):
        # type: () -> None
        """Record owners from now on in a cache made before they were (best effort: a
        read-only cache stays as it is, and its entries are anyone's)."""
        def add(conn):
            # type: (sqlite3.Connection) -> None
            for table in ("Dict", "Failures"):     # again, in the transaction: two may add
                if not any(column[1] == "owner"
                           for column in _fetch(conn, "PRAGMA table_info(%s)" % table)):
                    conn.execute("ALTER TABLE %s ADD COLUMN owner TEXT" % table)
        if not self.owned() and self.flag != "r":
            with contextlib.suppress(OSError):
                self.conn.transaction(add)
                self._owned = True

    def stale_codes(self):
        # type: () -> Optional[List[str]]
        """The code tags (see _CREATE) of the latest run that opened the cache, whose other
        ones are stale, or None when none is recorded."""
        code = self.info().get("code")
        return code.split()[1:] if code and self.owned() else None

    def closures(self):
        # type: () -> int
        """How many values of what its function carries (make(2), make(3)) the entries that
        are not stale were stored under."""
        codes = self.stale_codes()
        if not codes:
            return 0
        return len({owner for owner, in self.conn.run(_fetch, _OWNERS)
                    if str(owner)[:_CODE_TAG] in codes})     # as prune()'s substr()

    def stored(self, key):
        # type: (bytes) -> Optional[Tuple[float, Optional[str]]]
        """(stored, version) of key's entry, or None."""
        rows = self.conn.query(_STORED, (key,))
        return rows[0] if rows else None

    def versions(self, but):
        # type: (str) -> List[Optional[str]]
        """The versions other than but that entries were stored under."""
        return [version for version, in self.conn.query(_VERSIONS, (but,))]

    def failed(self, key):
        # type: (bytes) -> Optional[Tuple[int, float, str, str]]
        """(count, last, type, message) of key's failure record, or None."""
        rows = self.conn.query(_FAILED, (key,))
        return rows[0] if rows else None

    def failed_versions(self, but):
        # type: (str) -> List[Optional[str]]
        """The versions other than but that failure records were made under."""
        return [version for version, in self.conn.query(_FAILED_VERSIONS, (but,))]

    def claim_source(self, source, another):
        # type: (str, Callable[[Optional[str]], bool]) -> Optional[str]
        """Record source as the file that defines the cache's function, unless another()
        says the one recorded is another project's; return the one recorded before (read
        and recorded in one transaction: two processes may start at once)."""
        def record(conn):
            # type: (sqlite3.Connection) -> Optional[str]
            recorded = dict(conn.execute(_INFO).fetchall()).get("source")
            if not another(recorded):
                conn.execute(_SET_INFO, ("source", source))
            return recorded
        return self.conn.transaction(record)

    def failures(self, owner=None):
        # type: (Optional[str]) -> List[Any]
        """(args, type, message, count, first, last, seconds, version, traceback, call) of
        each failure record, the latest failure last; of owner alone (as tally()), if given.
        call: the pickle of (args, kwargs), or why there is none (text), or None."""
        sql = _FAILURES % ("call" if self.calls else "NULL")
        if owner is not None and self.owned():
            return self.conn.run(_fetch, sql.replace(
                " FROM Failures", " FROM Failures WHERE " + _OWNED), (owner,))
        return self.conn.run(_fetch, sql)

    def disk_usage(self):
        # type: () -> int
        names = [self.path, self.path + "-wal", self.path + "-shm"]
        with contextlib.suppress(OSError):
            names += [os.path.join(self.values.directory, name)
                      for name in os.listdir(self.values.directory)]
        return sum(_size(name) for name in names)

    # Writing

    def put(self, key, value, protocol=_PROTOCOL, seconds=None, version=None, args=None,
            forget=(), owner=None):
        # type: (bytes, Any, Optional[int], Optional[float], Optional[str], Optional[str], Sequence[bytes], Optional[str]) -> None
        """Pickle value under key, with what memoize records; a large pickle goes to a value
        file as it is made, with no copy in memory. The failure records of key, and of the
        keys in forget (the same call under other versions), go in the same transaction."""
        spill = _Spill(self.values)
        try:
            pickle.dump(value, spill, protocol)
            row: "_Args" = (key, spill.inline(), spill.name, time.time(), seconds, version,
                            args)
            if owner is not None and self.owned():
                row += (owner,)
            old = None
            if spill.name is not None or forget or not self.conn.run(_put_row, row):
                old = self.conn.transaction(_replace, row, self.values, forget)
        except BaseException:
            # A signal (Ctrl-C) that arrives while COMMIT runs is raised just after it: the
            # row may name the file already. Remove it only if no row does; if even that
            # check fails, the file stays for sweep().
            if spill.name is not None and not self._named([spill.name]):
                spill.discard()
            raise
        finally:
            spill.close()
        if old:
            self.values.remove([old])
        self._puts += 1
        if self._puts % 32 == 0 and _size(self.path + "-wal") > _LOG_LIMIT:
            self._restart_log()

    def put_many(self, entries, protocol=_PROTOCOL):
        # type: (Sequence[Tuple[bytes, Any, Optional[float], Optional[str], Optional[str], Sequence[bytes], Optional[str]]], Optional[int]) -> List[Optional[Exception]]
        """put() each of entries, (key, value, seconds, version, args, forget, owner), in one
        transaction: persist.map stores a batch that came back from its workers so, as a
        commit is most of a put(). Returns, for each, the exception pickling its value
        raised (it is not stored), or None; anything else (the transaction) raises. The
        pickles wait in memory for the commit: past _MANY_LIMIT, what is ready is committed
        first, so that a batch of many results near _INLINE_LIMIT is not held twice over."""
        spills: "List[_Spill]" = []
        rows: "List[Tuple[_Args, Sequence[bytes]]]" = []
        errors: "List[Optional[Exception]]" = []
        old: "List[str]" = []
        held = 0
        try:
            for key, value, seconds, version, args, forget, owner in entries:
                spill = _Spill(self.values)
                spills.append(spill)
                try:
                    pickle.dump(value, spill, protocol)
                    row: "_Args" = (key, spill.inline(), spill.name, time.time(), seconds,
                                    version, args)
                except Exception as exc:
                    errors.append(exc)
                    continue
                if owner is not None and self.owned():
                    row += (owner,)
                errors.append(None)
                rows.append((row, forget))
                held += len(row[1])
                if held > _MANY_LIMIT:
                    old += self.conn.transaction(_replace_many, rows, self.values)
                    rows, held = [], 0
            for spill in spills:
                spill.close()
            if rows:
                old += self.conn.transaction(_replace_many, rows, self.values)
        except BaseException:
            # As in put(): a signal that arrives while COMMIT runs is raised just after it,
            # when the rows may name their files already. Remove those no row names; if even
            # that check fails, they stay for sweep().
            for spill in spills:
                spill.close()
            names = [spill.name for spill in spills if spill.name is not None]
            if names:
                with contextlib.suppress(Exception):
                    named = self._named(names)
                    self.values.remove([name for name in names if name not in named])
            raise
        # a pickle that failed part way may have begun a value file: no row names it
        self.values.remove([spill.name for spill, error in zip(spills, errors)
                            if error is not None and spill.name is not None])
        if old:
            self.values.remove(old)
        puts, self._puts = self._puts, self._puts + errors.count(None)
        if puts // 32 != self._puts // 32 and _size(self.path + "-wal") > _LOG_LIMIT:
            self._restart_log()
        return errors

    # Raw entries and failure records, for 'persist merge': copied between caches of either
    # store as they are (a pickle is never loaded: its class may not import here), the newest
    # of a key winning. Each copy is one transaction of its own.

    def raw_entries(self):
        # type: () -> Iterator[Tuple[bytes, Optional[bytes], Dict[str, Any]]]
        """(key, pickle, meta) of every entry, read one at a time; the pickle as stored, never
        loaded; meta: {stored, seconds, version, args, owner}, as put_raw() takes it. The
        pickle is None where the entry's value file is missing (removed by hand, lost), or
        its row is none persist wrote (values of other types): nothing to copy; the others
        are still copied."""
        sql = _RAW % ("owner" if self.owned() else "NULL")
        for key in self.keys():
            for _ in range(3):      # a writer may replace it, removing its value file, as we read
                rows = self.conn.query(sql, (key,))
                if not rows:
                    break           # removed meanwhile
                value, file, stored, seconds, version, args, owner = rows[0]
                meta = {"stored": stored, "seconds": seconds, "version": version,
                        "args": args, "owner": owner}
                if not _persists_meta(meta) or not isinstance(value, (bytes, memoryview)):
                    yield key, None, meta   # a row another program wrote: none to copy
                    break
                if file is not None:
                    try:
                        with io.open(self.values.path(file), "rb") as data:
                            value = data.read()
                    except FileNotFoundError:
                        continue
                    except PersistError as exc:
                        if exc.reason != PersistError.CORRUPT_ROW:
                            raise
                        yield key, None, meta   # a file elsewhere, never read: the others
                        break                   # are copied (merge is how a cache is saved)
                yield key, bytes(value), meta
                break
            else:                   # a row that names a file that is not there
                yield key, None, meta

    def put_raw(self, key, data, meta):
        # type: (bytes, bytes, Dict[str, Any]) -> bool
        """Store data, a pickle as raw_entries() gives it (never loaded), under key, with
        meta as it is (its stored time too), unless key's entry is as new or newer; the
        failure records of key older than it go in the same transaction (as in put()).
        Returns whether it was stored."""
        spill = _Spill(self.values)
        try:
            spill.write(data)
            row: "_Args" = (key, spill.inline(), spill.name, float(meta["stored"]),
                            meta.get("seconds"), meta.get("version"), meta.get("args"))
            if meta.get("owner") is not None and self.owned():
                row += (meta["owner"],)
            written, old = self.conn.transaction(_put_raw, row, self.values)
        except BaseException:
            # as in put(): a signal during COMMIT may leave the row naming the file
            with contextlib.suppress(Exception):
                if spill.name is not None and not self._named([spill.name]):
                    spill.discard()
            raise
        finally:
            spill.close()
        if not written:
            spill.discard()
        if old:
            self.values.remove([old])
        return written

    def failure_spans(self, key=None):
        # type: (Optional[bytes]) -> List[Tuple[bytes, Dict[str, Any]]]
        """(key, span) of each failure record (of key alone, if given), as put_failure() takes
        it. span: count failures from first to last, started (when the latest call began),
        and the latest one's args, type, message, traceback, seconds, version, call, owner."""
        sql = _FAILURE_SPANS % ("call" if self.calls else "NULL",
                                "owner" if self.owned() else "NULL")
        rows = self.conn.run(_fetch, sql + (" WHERE key = ?" if key is not None else ""),
                             (key,) if key is not None else ())
        # a row another program wrote, with values of other types: no record to copy
        return [(bytes(row[0]), dict(zip(_SPAN_FIELDS, row[1:]), call=(
            bytes(row[10]) if isinstance(row[10], (bytes, memoryview)) else row[10]),
            started=row[7] - (row[8] or 0.0))) for row in rows
            if _persists_span(dict(zip(_SPAN_FIELDS, row[1:])))]

    def put_failure(self, key, span):
        # type: (bytes, Dict[str, Any]) -> bool
        """Add span (of failure_spans()) to key's failure record, in one transaction, unless
        key's result is newer than its latest call, or the record covers it already
        (_covers); return whether it did. The ledger keeps one record a key: counts add where
        the two spans are apart; where they overlap (the same failures, merged before) the
        larger count stands; the latest failure's details stay."""
        return self.conn.transaction(_put_failure, key, span, self.calls, self.owned())

    def _restart_log(self):
        # type: () -> None
        """Copy the log into the file and start it over. SQLite's own checkpoints never catch
        up while other processes keep committing, and the log would grow without end."""
        def restart(conn):
            # type: (sqlite3.Connection) -> None
            conn.execute("PRAGMA busy_timeout=%d" % (_RESTART_TIMEOUT * 1000))
            try:
                # While another connection checkpoints (SQLite's own automatic checkpoint,
                # which every commit runs once the log is large, or a FULL one waiting for
                # an old reader), SQLite answers busy at once, without waiting: try again
                # until the log is restarted, by us or by another process.
                # A cursor of our own, closed even on Ctrl-C: the checkpoint may wait seconds
                # for an old reader, and on PyPy an interrupt then left its statement
                # unfinished, which failed every later COMMIT of this process ("SQL
                # statements in progress").
                cursor = conn.cursor()
                try:
                    deadline = time.monotonic() + _RESTART_TIMEOUT
                    while (cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0]
                           and _size(self.path + "-wal") > _LOG_LIMIT and
                           time.monotonic() < deadline):
                        time.sleep(0.005)
                finally:
                    cursor.close()
            finally:
                conn.execute("PRAGMA busy_timeout=%d" % (_BUSY_TIMEOUT * 1000))
        # best effort: a reader that stays longer than _RESTART_TIMEOUT defers it to next time
        with contextlib.suppress(OSError):
            self.conn.run(restart)

    def delete(self, key):
        # type: (bytes) -> bool
        """Remove key; return whether it was there."""
        found = self.conn.transaction(_delete, key, self.values)
        if found and found[0]:
            self.values.remove([found[0]])
        return bool(found)

    def delete_row(self, key, row):
        # type: (bytes, _Row) -> bool
        """Remove key if it still holds the row that get() returned; return whether it did."""
        gone = self.conn.transaction(_delete_row, key, row)
        if gone and row[1]:
            self.values.remove([row[1]])
        return gone

    def record_failure(self, key, started, failure, owner=None, expire=None):
        # type: (bytes, float, _FailureRecord, Optional[str], Optional[float]) -> None
        """Record that the call keyed key, started at the Unix time started, raised: failure is
        (args, type, message, traceback, seconds, version, call). Nothing is recorded if a result
        for key was stored since the call started (another process succeeded meanwhile), but
        for one stamped further ahead than expire= (seconds), which has expired (_expired)."""
        if not self.calls:              # a cache that could not be given the column
            failure = failure[:-1] + (None,)

        def record(conn):
            # type: (sqlite3.Connection) -> None
            _record_failure(conn, key, started, failure, expire)
            if owner is not None and self.owned():
                conn.execute(_OWN_FAILURE, (owner, key))
        self.conn.transaction(record)

    def set_info(self, info):
        # type: (Dict[str, str]) -> None
        self.conn.transaction(lambda conn: conn.executemany(_SET_INFO, info.items()))

    def clear(self, owner=None):
        # type: (Optional[str]) -> int
        """Remove every entry (and failure record), or only owner's (and those stored before
        owners were recorded); return how many entries there were."""
        if owner is not None and self.owned():
            count, names = self.conn.transaction(_clear_owned, owner, self.values)
        else:
            count, names = self.conn.transaction(_clear, self.values)
        self.values.remove(names)
        self._give_back()
        return count

    def prune(self, before=None, version=None, dry_run=False, after=None, codes=None,
              owner=None):
        # type: (Optional[float], Optional[str], bool, Optional[float], Optional[Sequence[str]], Optional[str]) -> Tuple[int, int, int]
        """Remove the entries stored before the Unix time before (or after the time after),
        of another version than version (of owner's alone, if given: make(3) may have its
        own expire= and version=), or stored by a function with another code than codes (its
        code tags, see _CREATE); with version the failure records of other versions too
        (owner's alone, likewise), and with codes those of other code; return (entries,
        bytes, failure records) removed, or that would be with dry_run."""
        where: "Any"      # the conditions, then the SQL that joins them
        params: "List[object]"
        where, params = [], []
        if before is not None:
            where.append("stored < ?")
            params.append(before)
        if after is not None:
            where.append("stored > ?")
            params.append(after)
        if version is not None:
            where.append("version IS NOT ?")
            params.append(version)
        # the failure records of other versions, and of other code: their calls cannot be
        # made again, as the entries' results cannot be returned (conditions, parameters)
        stale: "List[str]" = []
        stale_params: "List[object]" = []
        if version is not None:
            stale.append("version IS NOT ?")
            stale_params.append(version)
        if where and owner is not None and self.owned():
            where = ["(%s) AND %s" % (" OR ".join(where), _OWNED)]
            params.append(owner)
            if stale:
                stale = ["(version IS NOT ? AND %s)" % _OWNED]
                stale_params.append(owner)
        if codes and self.owned():       # an entry of no known owner is no one's stale
            other_code = ("(owner IS NOT NULL AND substr(owner, 1, %d) NOT IN (%s))"
                          % (_CODE_TAG, ",".join("?" * len(codes))))
            where.append(other_code)
            params.extend(codes)
            stale.append(other_code)
            stale_params.extend(codes)
        failures = (" OR ".join(stale), stale_params) if stale else None
        if not where:
            raise ValueError("prune() needs before=, version= or codes=")
        where = " OR ".join(where)
        if dry_run:
            count, size, names = self.conn.run(_prune_size, where, params)
            failed = 0 if failures is None else self.conn.run(
                _fetch, _STALE_FAILURES % ("SELECT count(*)", failures[0]), failures[1])[0][0]
            return count, size + sum(_size(self.values.path(name)) for name in names), failed
        count, size, names, failed = self.conn.transaction(_prune, where, params, self.values,
                                                           failures)
        size += sum(_size(self.values.path(name)) for name in names)   # before they go
        self.values.remove(names)
        self._give_back()
        return count, size, failed

    def _named(self, names):
        # type: (List[str]) -> Set[str]
        """The value file names among names that a row names."""
        found: "Set[str]" = set()
        for start in range(0, len(names), 500):     # SQLite's limit on parameters
            part = names[start:start + 500]
            found.update(name for name, in self.conn.run(
                _fetch, _NAMED % ",".join("?" * len(part)), part))
        return found

    def sweep(self):
        # type: () -> None
        """Remove value files and new caches that a killed process left half made, and give
        back the space a killed prune() kept."""
        self.values.sweep(self._named)
        directory, name = os.path.split(self.path)
        # Only what _create_temp() names a new cache of this name, and the files SQLite adds
        # to it: .NAME.RANDOM.new-cache.tmp(-journal): never an atomic_open() temporary file
        # beside it (NAME.csv's is .NAME.csv.RANDOM.tmp), which its writer may hold for hours.
        prefix = "." + name[:60] + "."
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                rest = entry.name[len(prefix):]
                ours = rest[8:] in [_NEW_CACHE + ".tmp" + suffix
                                    for suffix in ("", "-journal", "-wal", "-shm")]
                # best effort; a creation takes milliseconds, so an old one is abandoned
                if entry.name.startswith(prefix) and ours and _hex_name(rest[:8], 8):
                    with contextlib.suppress(OSError):
                        if time.time() - entry.stat(follow_symlinks=False).st_mtime > 60:
                            os.unlink(entry.path)
        (free,), = self.conn.run(_fetch, "PRAGMA freelist_count")
        (total,), = self.conn.run(_fetch, "PRAGMA page_count")
        if free * 4 > total and free > 64:      # a killed prune() or clear() kept them
            self._give_back()

    def _give_back(self):
        # type: () -> None
        """Return free pages to the filesystem, and shorten the log."""
        # best effort: another process may hold a read lock; its pages are reused anyway
        with contextlib.suppress(OSError):
            # executescript() steps it to the end; execute() would free a single page
            self.conn.run(lambda conn: conn.executescript("PRAGMA incremental_vacuum"))
            self.conn.run(_fetch, "PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self):
        # type: () -> None
        self.conn.close()


class _Spill:
    """A file for pickle.dump(): bytes in memory up to _INLINE_LIMIT, past it a value file."""

    name: "Optional[str]"
    file: "Optional[io.BufferedWriter]"
    _chunks: "List[bytes]"

    def __init__(self, values):
        # type: (_Values) -> None
        self._values = values
        self._chunks = []
        self._size = 0
        self.name = self.file = None

    def write(self, data):
        # type: (Buffer) -> None
        if self.file is None:
            self._size += memoryview(data).nbytes
            if self._size <= _INLINE_LIMIT:
                self._chunks.append(bytes(data))
                return
            self.name, self.file = self._values.create()
            self.file.writelines(self._chunks)
            self._chunks = None   # type: ignore[assignment]  # unused from here: let it go
        self.file.write(data)

    def inline(self):
        # type: () -> bytes
        """The pickle, or b'' when it went to the value file."""
        if self.file is not None:
            self.file.flush()
            return b""
        return b"".join(self._chunks)

    def discard(self):
        # type: () -> None
        if self.name is not None:
            self._values.remove([self.name])

    def close(self):
        # type: () -> None
        if self.file is not None:
            self.file.close()


def _put_row(conn, row):
    # type: (sqlite3.Connection, _Args) -> bool
    """_Store.put()'s one statement (see _PUT_ROW), for a row whose pickle is in it (row[2],
    its file, is None); False, with nothing written, where it would replace a row that names
    a value file."""
    try:
        conn.execute(_PUT_ROW if len(row) == 7 else _PUT_OWNED_ROW, row[:2] + row[3:])
    except sqlite3.IntegrityError as exc:
        if str(exc) != _VALUE_FILE_ABORT:
            raise
        return False
    return True


def _replace(conn, row, values, forget=()):
    # type: (sqlite3.Connection, _Args, _Values, Sequence[bytes]) -> Optional[str]
    old = _fetch(conn, _FILE, (row[0],))
    if old and old[0][0] is not None:
        values.check([old[0][0]])         # a corrupt row stays as it is: see _Values
    conn.execute(_PUT if len(row) == 7 else _PUT_OWNED, row)
    for key in (row[0],) + tuple(forget):
        conn.execute(_FORGET_FAILURE, (key,))
    return old[0][0] if old else None


def _put_raw(conn, row, values):
    # type: (sqlite3.Connection, _Args, _Values) -> Tuple[bool, Optional[str]]
    """_Store.put_raw()'s transaction: (whether row went in, the value file it replaced)."""
    old = _fetch(conn, _STORED_FILE, (row[0],))
    if old and old[0][0] >= row[3]:
        return False, None
    if old and old[0][1] is not None:
        values.check([old[0][1]])
    conn.execute(_PUT if len(row) == 7 else _PUT_OWNED, row)
    conn.execute(_FORGET_FAILURE_BEFORE, (row[0], row[3]))
    return True, old[0][1] if old else None


def _put_failure(conn, key, span, calls, owned):
    # type: (sqlite3.Connection, bytes, Dict[str, Any], bool, bool) -> bool
    """_Store.put_failure()'s transaction."""
    stored = _fetch(conn, _STORED_FILE, (key,))
    if stored and stored[0][0] >= span["started"]:
        return False                    # the result came after: the failure is void
    old = _fetch(conn, _FAILURE_SPANS % ("NULL", "NULL") + " WHERE key = ?", (key,))
    count, first, last = span["count"], span["first"], span["last"]
    if old:
        mine = dict(zip(_SPAN_FIELDS, old[0][1:]))
        if _covers(mine, span):
            return False
        count = _merged_count(mine, span)
        first, last = min(first, mine["first"]), max(last, mine["last"])
        if mine["last"] >= span["last"]:         # its own latest failure stays
            conn.execute(_SPAN_UPDATE, (count, first, last, key))
            return True
    call = span.get("call")
    row: "_Args" = (key, span.get("args"), span["type"], span["message"], span["traceback"],
                    count, first, last, span.get("seconds"), span.get("version"))
    columns = _RECORD_FAILURE[:_RECORD_FAILURE.index(", call)")]
    if calls:
        columns += ", call"
        row += (sqlite3.Binary(call) if isinstance(call, bytes) else call,)
    if owned:
        columns += ", owner"
        row += (span.get("owner"),)
    conn.execute("%s) VALUES (%s)" % (columns, ", ".join("?" * len(row))), row)
    return True


def _covers(span, other):
    # type: (Dict[str, Any], Dict[str, Any]) -> bool
    """Whether the failure record span covers other (both as failure_spans() gives them):
    other's failures lie between span's first and last, the same ones (merged before)."""
    return bool(span["first"] <= other["first"] and other["last"] <= span["last"])


def _merged_count(span, other):
    # type: (Dict[str, Any], Dict[str, Any]) -> int
    """How many failures two records of one key's failures hold together: both counts where
    they are apart in time; where they overlap they may hold the same ones (a SOURCE merged
    before, that failed again since): the larger. A lower bound, where two machines failed
    at the same times: the ledger keeps counts, not each failure."""
    if _apart(span, other):
        return int(span["count"]) + int(other["count"])
    return max(int(span["count"]), int(other["count"]))


def _apart(span, other):
    # type: (Dict[str, Any], Dict[str, Any]) -> bool
    """Whether two records of one key's failures are apart in time: no failure in common."""
    return bool(other["last"] < span["first"] or other["first"] > span["last"])


def _replace_many(conn, rows, values):
    # type: (sqlite3.Connection, List[Tuple[_Args, Sequence[bytes]]], _Values) -> List[str]
    """_replace() of each (row, forget) of rows: the value files the rows replaced."""
    old = (_replace(conn, row, values, forget) for row, forget in rows)
    return [name for name in old if name is not None]


def _delete(conn, key, values):
    # type: (sqlite3.Connection, bytes, _Values) -> Optional[Tuple[Optional[str]]]
    old = _fetch(conn, _FILE, (key,))
    if old and old[0][0] is not None:
        values.check([old[0][0]])
    conn.execute(_DELETE, (key,))
    return old[0] if old else None


def _delete_row(conn, key, row):
    # type: (sqlite3.Connection, bytes, _Row) -> bool
    return conn.execute(_DELETE_ROW, (key, row[0], row[1], row[2])).rowcount > 0


def _clear(conn, values):
    # type: (sqlite3.Connection, _Values) -> Tuple[int, List[str]]
    names = [name for name, in _fetch(conn, _FILES)]
    values.check(names)
    count = conn.execute(_CLEAR).rowcount
    conn.execute("DELETE FROM Failures")
    return count, names


def _clear_owned(conn, owner, values):
    # type: (sqlite3.Connection, str, _Values) -> Tuple[int, List[str]]
    names = [name for name, in _fetch(conn, _FILES + " AND " + _OWNED, (owner,))]
    values.check(names)
    count = conn.execute("DELETE FROM Dict WHERE " + _OWNED, (owner,)).rowcount
    conn.execute("DELETE FROM Failures WHERE " + _OWNED, (owner,))
    return count, names


def _prune_size(conn, where, params):
    # type: (sqlite3.Connection, str, Sequence[object]) -> Tuple[int, int, List[str]]
    """(entries, bytes of their pickles in rows, their value files) of the entries that
    match where: added up by SQLite in one scan (fetched into Python, the rows of half a
    million entries took 0.5-0.7 s, more than their DELETE); the value files, found on the
    partial index DictFile, are the only rows fetched."""
    (count, size), = _fetch(conn, _PRUNE_SIZE % where, params)
    names = [name for name, in _fetch(conn, _PRUNE_FILES % where, params)]
    return count, int(size), names


def _prune(conn, where, params, values, failures=None):
    # type: (sqlite3.Connection, str, Sequence[object], _Values, Optional[Tuple[str, Sequence[object]]]) -> Tuple[int, int, List[str], int]
    """_Store.prune()'s transaction: (entries, bytes in rows, value files, failure records)
    removed; what it counts is what it removes, as no other process writes meanwhile."""
    count, size, names = _prune_size(conn, where, params)
    values.check(names)
    conn.execute("DELETE FROM Dict WHERE " + where, params)
    # a failure of another version is stale as its results are: that code is gone
    failed = 0 if failures is None else \
        conn.execute(_STALE_FAILURES % ("DELETE", failures[0]), failures[1]).rowcount
    return count, size, names, failed


# == the store: value files -----------------------------------------------------------------------
# A pickle larger than _INLINE_LIMIT goes to a file of its own in FILE.values/, under a
# random name its row records: created before the transaction that names it, removed only
# after the commit that stopped naming it; sweep() removes what a killed process left.

_VALUE_DIGITS = 32                 # a value file's name: os.urandom(16).hex()


def _hex_name(name, digits):
    # type: (object, int) -> bool
    """Whether name is digits lowercase hex digits, as persist names its files: no '/', no '..'."""
    return isinstance(name, str) and len(name) == digits and not name.strip("0123456789abcdef")


class _Values:
    """The pickles too large for a row: one file each in FILE.values/, under a random name that
    its row records. A name of any other shape (a path, '..') is a corrupt row: path() refuses
    it, so no file outside the directory is ever read or removed.

    A file is created and locked before the transaction that names it, and removed only after
    the commit that stopped naming it. A file that no row names and no process holds (left by a
    killed process) is removed by sweep(), which the next process to open the cache runs.
    """

    def __init__(self, directory):
        # type: (str) -> None
        self.directory = directory

    def path(self, name):
        # type: (str) -> str
        self.check([name])
        return os.path.join(self.directory, name)

    def check(self, names):
        # type: (Iterable[str]) -> None
        """PersistError for the first name among names that is not a value file's; raised
        inside a transaction, it rolls back: nothing changes."""
        for name in names:
            if not _hex_name(name, _VALUE_DIGITS):
                values = os.path.basename(self.directory)
                raise PersistError(errno.EINVAL, _CORRUPT_ROW.format(
                    name=name, digits=_VALUE_DIGITS, values=values),
                    self.directory[:-len(".values")], reason=PersistError.CORRUPT_ROW)

    def create(self):
        # type: () -> Tuple[str, io.BufferedWriter]
        """A new value file, locked against sweep() until closed: (name, binary file)."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory, _DIR_MODE)
        # Checked at each use, not only when the cache was opened: in a shared directory
        # such as /tmp another user may make it meanwhile, then swap our pickles for theirs.
        # By the rules of the cache's other files: in a team's directory a teammate made it.
        info = os.lstat(self.directory)
        if stat.S_ISLNK(info.st_mode):
            raise PersistError(errno.ELOOP, _LINK, self.directory, reason=PersistError.SYMLINK)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory, where persist keeps the "
                                     "cache's large results; move it away", self.directory)
        if _CHECK_WORLD_WRITABLE and _planted(info, os.path.dirname(self.directory)):
            raise PersistError(errno.EPERM, _WORLD_WRITABLE, self.directory,
                               reason=PersistError.UNSAFE)
        while True:
            name = os.urandom(16).hex()
            fd = os.open(self.path(name), _O_TEMP, _FILE_MODE)
            try:
                if _fcntl is not None:
                    _fcntl.flock(fd, _fcntl.LOCK_EX)
                    if os.fstat(fd).st_nlink == 0:    # swept before we locked it: again
                        os.close(fd)
                        continue
                return name, io.open(fd, "wb")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise

    def remove(self, names):
        # type: (Iterable[str]) -> None
        for name in names:
            # best effort: a file already gone is what we wanted; on Windows one that a
            # reader holds open stays, and a later sweep() removes it
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.unlink(self.path(name))

    def sweep(self, named):
        # type: (Callable[[List[str]], Set[str]]) -> None
        """Remove the files that named(names) leaves out and that nobody is writing."""
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        # only names of the shape persist gives: whatever else is there, persist did not make
        names = [name for name in names if _hex_name(name, _VALUE_DIGITS)]
        for name in set(names) - named(names):
            path = self.path(name)
            # best effort, each step: what is left now is swept next time
            if _fcntl is None:        # no locks, but open files cannot be removed (Windows)
                with contextlib.suppress(OSError):
                    if time.time() - os.stat(path).st_mtime > _SWEEP_AGE:
                        os.unlink(path)
                continue
            try:
                # never waiting on a FIFO of that name: opened without blocking, then passed
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) |
                             getattr(os, "O_NONBLOCK", 0))
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):          # not a value file
                    continue
                _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)     # else a writer holds it
                if name not in named([name]):       # its writer may have committed meanwhile
                    os.unlink(path)
            except OSError:
                pass
            finally:
                os.close(fd)


# == the store: connections -----------------------------------------------------------------------
# A _Connection is opened on first use and held for one SQL step or transaction, never while
# user code runs; _sqlite_error turns what sqlite3 raises into PersistError, with the path.

if TYPE_CHECKING:
    _CONNECTIONS: "weakref.WeakSet[_Connection]"
    _FORKING: List[Set[_Connection]]
    _WRITING_AT_FORK: Set[str]
    _ELSEWHERE: Dict[Any, Tuple[str, int]]
    _GARBAGE: List[sqlite3.Connection]
    _ABANDONED: List[sqlite3.Connection]
    _EXITED: bool
    _WRITTEN: Set[str]
_CONNECTIONS = weakref.WeakSet()   # this process's _Connections, closed before fork()
_FORKING = []                      # one per fork under way: the connections whose lock its
                                   # thread held as it began (see _after_fork_in_parent)
_WRITING_AT_FORK = set()           # caches a signal handler forked in the middle of using
# No thread may be inside SQLite when another forks: SQLite's own mutexes (its list of open
# files, its memory) would stay locked in the child, whose next sqlite3.connect() then waits
# for ever. So every SQLite call of persist's runs under a lock that _before_fork() takes:
# a _Connection's, or, for the work done without one (making a cache, reading a dbm.sqlite3
# file, the last look at a log), one of its own in _ELSEWHERE. _FORK_GATE is held from
# before _before_fork() until the fork is over: meanwhile no use of a _Connection (see its
# run()) or work elsewhere can begin, so none begins after _before_fork() has looked for
# those under way.
_FORK_GATE = _thread.RLock()
_FORKING_NOW: "List[None]" = []    # one per fork under way, made while _FORK_GATE is held
_ELSEWHERE = {}                    # a lock held by each work elsewhere: (path, thread)
_GARBAGE = []                      # connections of collected _Connections that a fork kept
                                   # from closing at once: closed by the next use of a cache,
                                   # fork or exit, under a lock (see _Connection.__del__)
_EXITED = False                    # _close_all() has run: each use closes its connection
_WRITTEN = set()                   # caches this process has closed a writer's connection to
_ABANDONED = []                    # in a child, the parent's connections that fork() left
                                   # open (in use by the code a signal handler interrupted, or
                                   # the collector's): never used or closed in the child
                                   # (closing would unlock the parent's)


class _Connection:
    """One process's SQLite connection to one cache file, used under a lock.

    It is opened on first use and held only for the length of one SQL step or transaction, never
    while user code runs. fork() closes it first (a child must not inherit SQLite's locks; see
    the SQLite documentation, howtocorrupt.html 2.6), and parent and child reopen it on their
    next use. A signal handler that uses the cache while its thread is in here gets a connection
    of its own, so it neither deadlocks nor disturbs the transaction it interrupted.
    """

    _conn: "Optional[sqlite3.Connection]"
    _frozen: "Optional[Tuple[int, int, int, int]]"
    _copy: "Optional[str]"

    def __init__(self, path, mode):
        # type: (str, str) -> None
        self.path = path
        self.mode = mode                  # "ro", "rw", or "query" (rw, where only reads run)
        self._lock = _thread.RLock()
        self._depth = 0                   # 1 while this thread is inside run()
        self._conn = None
        self._frozen = None               # see _open_read_only()
        self._copy = None                 # the private copy _open_read_only() made, if any
        self._snapshots = False           # read only through _open_read_only() from now on
        with _gated():                    # not while another thread forks: see _FORK_GATE
            _CONNECTIONS.add(self)

    # (ignore[return]: the loop's last turn returns or raises, which mypy cannot tell)
    def run(self, work, *args):  # type: ignore[return]
        # type: (Callable[..., _T], *Any) -> _T
        """work(connection, *args) under the lock; sqlite3's errors become persist's."""
        for retry in (True, False):
            while True:
                with self._lock:
                    if self._depth:       # a signal handler interrupted this thread in here
                        return self._run_aside(work, args)
                    if not _forking_elsewhere():
                        self._depth = 1
                        try:
                            conn = self._ready()
                            if self._frozen is not None:
                                return self._run_frozen(work, args)
                            return work(conn, *args)
                        except sqlite3.Error as exc:
                            if not (retry and self._lost_its_log(exc)):
                                raise _sqlite_error(exc, self.path) from None
                        finally:
                            self._depth = 0
                            if _EXITED:
                                self._close_conn()
                        break             # once more, on a connection made anew
                _wait_for_fork()

    def query(self, sql, params=()):
        # type: (str, Sequence[Any]) -> List[Any]
        """The rows of one statement: run(_fetch, sql, params), without a call (every
        hit's path)."""
        with self._lock:
            if self._depth:
                return self._run_aside(_fetch, (sql, params))
            if not _FORKING_NOW or not _forking_elsewhere():     # (a call less, mostly)
                self._depth = 1
                try:
                    conn = self._conn
                    if conn is None or _GARBAGE or conn.in_transaction:   # (as _ready())
                        conn = self._ready()
                    if self._frozen is not None:
                        return self._run_frozen(_fetch, (sql, params))
                    # fetchall(), never fetchone(): on PyPy an unfinished statement blocks
                    # COMMIT
                    return conn.execute(sql, params).fetchall()
                except sqlite3.Error as exc:
                    if not self._lost_its_log(exc):
                        raise _sqlite_error(exc, self.path) from None
                finally:
                    self._depth = 0
                    if _EXITED:
                        self._close_conn()
        # once more, on a connection made anew, or once another thread's fork is over
        return self.run(_fetch, sql, params)

    def _lost_its_log(self, exc):
        # type: (sqlite3.Error) -> bool
        """Whether a reader in a directory it may not write saw the cache's last writer go,
        taking the -wal and -shm files that SQLite cannot make again there: then it closes,
        and the next use reads the file as _open_read_only() does."""
        if self.mode != "ro" or _sqlite_failure(exc) != "readonly" or self._conn is None:
            return False
        self._close_conn()
        self._snapshots = True            # SQLite's own way failed here once: not again
        return True

    def transaction(self, work, *args):
        # type: (Callable[..., _T], *Any) -> _T
        """run() work inside BEGIN IMMEDIATE ... COMMIT: all of it is stored, or none."""
        return self.run(_transaction, work, args)  # type: ignore[no-any-return]  # work's

    def _ready(self):
        # type: () -> sqlite3.Connection
        """The connection, opened if need be, with no transaction left open."""
        if _GARBAGE:                      # under our lock, which fork() waits for
            _close_garbage()
        conn = self._conn
        if conn is None:
            if self.path in _WRITING_AT_FORK:
                raise OSError(errno.EBUSY, "this process was forked (from a signal handler) "
                              "while its parent was using this cache: use it in the "
                              "parent, or fork elsewhere", self.path)
            conn = self._connect()
        elif conn.in_transaction:         # left open by a call an exception interrupted
            conn.execute("ROLLBACK")
        return conn

    def _run_aside(self, work, args):
        # type: (Callable[..., _T], Sequence[Any]) -> _T
        # A write waiting for the lock that the interrupted transaction holds would wait
        # for ever: then it fails at once ("database is locked"), and memoize goes on.
        interrupted = self._conn is not None and self._conn.in_transaction
        conn = None
        _check_companions(self.path)
        try:
            conn = self._open(self.mode, 0.0 if interrupted else _HANDLER_TIMEOUT)
            return work(conn, *args)
        except sqlite3.OperationalError as exc:
            if interrupted and _sqlite_failure(exc) == "busy":
                raise _HandlerBusy(errno.EBUSY, "a signal handler cannot write to the cache "
                                   "while the code it interrupted is writing to it",
                                   self.path) from None
            raise _sqlite_error(exc, self.path) from None
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, self.path) from None
        finally:
            if conn is not None:
                _close(conn)

    def _connect(self):
        # type: () -> sqlite3.Connection
        _check_companions(self.path)
        if self._snapshots:
            self._conn = self._open_read_only()
            return self._conn
        try:
            self._conn = self._open(self.mode, _BUSY_TIMEOUT)
        except sqlite3.OperationalError:
            # SQLite reads a cache in WAL mode only if it can make a -shm file beside it
            if os.access(os.path.dirname(self.path), os.W_OK) or not os.path.isfile(self.path):
                raise
            self._conn = self._open_read_only()
        return self._conn

    def _open_read_only(self):
        # type: () -> sqlite3.Connection
        """A connection to a cache in a directory we may not write, where SQLite cannot make
        the -shm file it needs: the file read as immutable, or, when a -wal file is there
        (left by a crash, or its owner is writing), a private copy of both.

        Either is right only while nobody writes the cache, so _run_frozen() compares the
        files before and after each use, and opens it again when they changed.
        """
        for attempt in range(_FROZEN_TRIES):
            if attempt:
                time.sleep(_FROZEN_PAUSE)
            before = self._file_state()
            if before[3] == 0:            # no log: the file alone
                conn = self._open("ro&immutable=1", _BUSY_TIMEOUT)
            else:
                conn = self._open_copy()
            if self._file_state() == before:
                self._frozen = before
                return conn
            _close(conn)
            self._drop_copy()
        raise OSError(errno.EBUSY, "the cache kept changing while it was read", self.path)

    def _open_copy(self):
        # type: () -> sqlite3.Connection
        import shutil
        import tempfile
        copy = tempfile.mkdtemp(prefix="persist-")
        try:
            target = os.path.join(copy, "copy.db")
            shutil.copyfile(self.path, target)
            shutil.copyfile(self.path + "-wal", target + "-wal")
            conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
            _make_put_views(conn)
            conn.execute("PRAGMA query_only=ON")
            self._check(conn)
        except BaseException:
            shutil.rmtree(copy, ignore_errors=True)
            raise
        self._copy = copy
        return conn

    def _file_state(self):
        # type: () -> Tuple[int, int, int, int]
        """What changes when someone writes the cache: the file (inode, size, time), its log."""
        info = os.stat(self.path)
        return info.st_ino, info.st_size, info.st_mtime_ns, _size(self.path + "-wal")

    def _run_frozen(self, work, args):
        # type: (Callable[..., _T], Sequence[Any]) -> _T
        for attempt in range(_FROZEN_TRIES):
            if attempt:
                time.sleep(_FROZEN_PAUSE)
            if self._file_state() != self._frozen:      # written since: read it anew
                self._close_conn()
                conn = self._connect()
                if self._frozen is None:                # now it can be read as usual
                    return work(conn, *args)
                continue
            result = work(self._conn, *args)
            if self._file_state() == self._frozen:
                return result
        raise OSError(errno.EBUSY, "the cache kept changing while it was read", self.path)

    def _open(self, mode, timeout):
        # type: (str, float) -> sqlite3.Connection
        uri_mode = "rw" if mode == "query" else mode
        conn = sqlite3.connect(_uri(self.path, uri_mode), uri=True, timeout=timeout,
                               isolation_level=None, check_same_thread=False)
        try:
            self._check(conn)
            if uri_mode == "rw":
                _to_wal(conn, timeout)
            for pragma in _PRAGMAS:
                conn.execute(pragma).fetchall()
            (page,), = _fetch(conn, "PRAGMA page_size")     # 16 KB in caches made before
            _fetch(conn, "PRAGMA wal_autocheckpoint=%d" % (_CHECKPOINT_AFTER // page))
            _make_put_views(conn)
            if mode == "query":           # only reads, yet closed as a writer: no -wal left
                conn.execute("PRAGMA query_only=ON")
        except BaseException:
            _close(conn)
            raise
        return conn

    def _check(self, conn):
        # type: (sqlite3.Connection) -> None
        """Refuse a file that is not a persist cache of this format."""
        (app,), = _fetch(conn, "PRAGMA application_id")
        (found,), = _fetch(conn, "PRAGMA user_version")
        if app != _APPLICATION_ID:
            empty = not _fetch(conn, "SELECT 1 FROM sqlite_master")
            why = "an empty file" if empty else "an SQLite database of another program"
            raise PersistError(errno.EINVAL, _NOT_A_CACHE.format(why=why), self.path,
                               reason=PersistError.EMPTY if empty else
                               PersistError.FOREIGN_SQLITE)
        if found != _FORMAT:
            message, reason = ((_NEWER, PersistError.NEWER_FORMAT) if found > _FORMAT else
                               (_OLDER, PersistError.OLDER_FORMAT))
            raise PersistError(errno.EINVAL, message.format(found=found, ours=_FORMAT),
                               self.path, reason=reason)

    def _close_conn(self):
        # type: () -> None
        # Let go of it first: a Ctrl-C inside _close() (as fork() closes it) then leaves no
        # closed connection here, which every later use would fail on, for good
        conn, self._conn = self._conn, None
        if conn is not None:
            if self.mode != "ro":         # exit takes another look at its log: _close_all()
                _WRITTEN.add(self.path)
            _close(conn)
        self._frozen = None
        self._drop_copy()

    def _drop_copy(self):
        # type: () -> None
        if self._copy is not None:
            import shutil
            shutil.rmtree(self._copy, ignore_errors=True)
            self._copy = None

    def close(self):
        # type: () -> None
        with self._lock:
            # closed before it leaves _CONNECTIONS: a fork meanwhile waits for the lock
            self._close_conn()
            _CONNECTIONS.discard(self)

    def __del__(self):
        # type: () -> None
        # A memoized function or shelf that is garbage itself: on PyPy its sqlite3
        # connection is never closed (its finalizer gives up while statements are not
        # finalized), its descriptors stay open, and exit leaves the -wal and -shm files;
        # 3.13's sqlite3 warns of a connection left to its finalizer. None after fork() in a
        # child: the connection is its parent's (_ABANDONED). The collector runs in whichever
        # thread, holding none of our locks: closed under _FORK_GATE, then, so that no fork
        # comes meanwhile (see _FORK_GATE), or, while another thread forks or starts some
        # work, left for _close_garbage() (waiting here could wait for ever: this thread
        # may hold what that fork waits for).
        try:
            if _FORK_GATE.acquire(blocking=False):
                try:
                    self._close_conn()
                finally:
                    _FORK_GATE.release()
                return
            conn, self._conn = self._conn, None
            if conn is not None:
                if self.mode != "ro":     # exit takes another look at its log: _close_all()
                    _WRITTEN.add(self.path)
                _GARBAGE.append(conn)
            self._drop_copy()
        except Exception:                  # best effort: at exit, modules may be gone
            pass


def _fetch(conn, sql, params=()):
    # type: (sqlite3.Connection, str, Sequence[Any]) -> List[Any]
    # fetchall(), never fetchone(): on PyPy an unfinished statement blocks COMMIT
    return conn.execute(sql, params).fetchall()


def _close(conn):
    # type: (sqlite3.Connection) -> None
    """Close an sqlite3 connection, even one a signal interrupted.

    On PyPy, a statement whose preparation Ctrl-C interrupted is never finalized, and
    close() then fails for good. So the transaction is ended first: such a connection holds
    no lock while it waits for the process's exit to close it.
    """
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    with contextlib.suppress(sqlite3.Error):
        conn.close()


def _make_put_views(conn):
    # type: (sqlite3.Connection) -> None
    """The views _Store.put() writes a row through (_PUT_ROW), of this connection alone. On
    every connection, a reader's too: a write through it is refused as a REPLACE would be
    ("attempt to write a readonly database"), not for a view that is not there."""
    for statement in _PUT_ROW_VIEWS[0] + _PUT_ROW_VIEWS[1]:
        conn.execute(statement)


def _uri(path, mode):
    # type: (str, str) -> str
    """A file: URI for sqlite3.connect(uri=True); pathlib's as_uri() costs an import."""
    path = path.replace(os.sep, "/")
    if not path.startswith("/"):           # Windows: C:/dir -> /C:/dir
        path = "/" + path
    for char, code in (("%", "%25"), ("?", "%3f"), ("#", "%23")):
        path = path.replace(char, code)
    return "file://%s?mode=%s" % (path, mode)


def _to_wal(conn, timeout):
    # type: (sqlite3.Connection, float) -> None
    """PRAGMA journal_mode=WAL, for readers and a writer at once: the first process to open
    a new cache converts it. Two that convert at once deadlock, and SQLite then fails one
    at once: _journal_mode() tries again."""
    _journal_mode(conn, "WAL", timeout)


def _journal_mode(conn, mode, timeout):
    # type: (sqlite3.Connection, str, float) -> str
    """PRAGMA journal_mode=mode; return SQLite's answer, the mode the file is in.

    A change of mode needs the only connection to the file. While another is there, SQLite
    fails at once ("database is locked"), busy timeout or not, or, leaving WAL, answers
    "wal": both are tried again, as the busy timeout would have, for timeout seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            (answer,), = _fetch(conn, "PRAGMA journal_mode=" + mode)
        except sqlite3.OperationalError as exc:
            if _sqlite_failure(exc) != "busy" or time.monotonic() > deadline:
                raise
        else:
            if (answer.lower() != "wal" or mode.lower() == "wal" or
                    time.monotonic() > deadline):
                return answer  # type: ignore[no-any-return]  # a row: Any
        time.sleep(0.01)


def _transaction(conn, work, args):
    # type: (sqlite3.Connection, Callable[..., _T], Sequence[Any]) -> _T
    try:
        # BEGIN inside the try: a Ctrl-C raised as it returns would leave the write lock
        # held until this connection's next use, and every other writer waiting for it
        conn.execute("BEGIN IMMEDIATE")
        result = work(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        # best effort: the error that got us here matters more than one from the rollback
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:       # not if BEGIN failed, nor if COMMIT succeeded
                conn.execute("ROLLBACK")
        raise
    return result


class _HandlerBusy(OSError):
    """A signal handler's write that would wait for the transaction it interrupted."""


def _sqlite_error(exc, path):
    # type: (sqlite3.Error, str) -> OSError
    """The one place that turns an sqlite3 error into persist's, naming the file."""
    text = str(exc)
    failure = _sqlite_failure(exc)
    if failure == "cantopen":
        unreadable = _unreadable(path)
        if unreadable:
            return PermissionError(errno.EACCES, unreadable, path)
    if isinstance(exc, sqlite3.OperationalError):
        if failure == "readonly":
            return PermissionError(errno.EACCES, "cannot write the cache (%s)" % text, path)
        if failure == "full":
            return OSError(errno.ENOSPC, "cannot write the cache (%s)" % text, path)
        if failure == "busy":
            return OSError(errno.EBUSY, "the cache stayed locked by another process (%s)"
                           % text, path)
        if failure == "cantopen":
            return OSError(errno.EIO, "cannot open the cache (%s)" % text, path)
        return OSError(errno.EIO, "cache file error (%s)" % text, path)
    if isinstance(exc, sqlite3.DatabaseError) and failure == "damaged":
        return _damaged(path, text)
    return OSError(errno.EIO, "cache file error (%s: %s)" % (type(exc).__name__, text), path)


# What went wrong in SQLite, as the callers tell it apart: "readonly", "busy" (another
# connection holds a lock), "full", "cantopen", "damaged" (not a database, or corrupt), or ""
# for anything else. By SQLite's result code where Python gives it (3.11 on: the error's
# sqlite_errorcode); by the message before, and on PyPy, whose sqlite3 has no codes.
# (By getattr: type checkers read sqlite3 as Python 3.10 has it, without the codes.)
_SQLITE_FAILURES = {getattr(sqlite3, "SQLITE_" + name, None): failure for name, failure in (
    ("READONLY", "readonly"), ("BUSY", "busy"), ("LOCKED", "busy"), ("FULL", "full"),
    ("CANTOPEN", "cantopen"), ("NOTADB", "damaged"), ("CORRUPT", "damaged"))}


def _failure_by_code(exc):
    # type: (sqlite3.Error) -> str
    # An extended code (SQLITE_READONLY_DBMOVED, ...) has its primary code in its low byte.
    # The sqlite3 module's own errors (a closed connection) have no code.
    code = getattr(exc, "sqlite_errorcode", None)
    return "" if code is None else _SQLITE_FAILURES.get(code & 0xFF, "")


def _failure_by_text(exc):
    # type: (sqlite3.Error) -> str
    text = str(exc)
    if "unable to open" in text or "could not open" in text.lower():     # PyPy's words
        return "cantopen"
    for needles, failure in ((("readonly", "read-only"), "readonly"), (("full",), "full"),
                             (("locked", "busy"), "busy"),
                             (("not a database", "malformed", "encrypted"), "damaged")):
        if any(needle in text for needle in needles):
            return failure
    return ""


# the codes came with the errors' sqlite_errorcode (3.11)
_sqlite_failure = _failure_by_code if hasattr(sqlite3, "SQLITE_BUSY") else _failure_by_text


def _unreadable(path):
    # type: (str) -> Optional[str]
    """Why we may not read the cache at path, or None: the file or its log's index is another
    user's and not readable (or writable) by us, as a teammate's under umask 077 is."""
    for name in (path, path + "-shm"):
        try:
            info = os.stat(name)
        except OSError:
            continue
        if os.access in os.supports_effective_ids:
            allowed = os.access(name, os.R_OK | os.W_OK * (name != path), effective_ids=True)
        else:
            allowed = os.access(name, os.R_OK | os.W_OK * (name != path))
        if not allowed:
            return ("Permission denied: you may not %s it (mode 0o%o, user %d, group %d); its "
                    "owner can let you ('chmod g+rw' it, for a teammate: files made under "
                    "umask 077 are theirs alone), or use a cache of your own" % (
                        "read" if name == path else "write the index of its log, %s," % name,
                        stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid))
    return None


def _damaged(path, why):
    # type: (str, str) -> PersistError
    """The error for a file at path that SQLite cannot read as a database. Where it is
    recognizably a persist cache (its header says so, or value files lie beside it), it says
    which files to remove to start over: persist never removes them itself (nor can
    'persist clear', which needs a cache it can read). Any other file may be the user's
    (persist show job.py, a slip for job.f): that one only may be removed, if it was a
    cache, and only one that may be is offered (a .db file, a SQLite file, zeros)."""
    ours = False
    head = b""
    with contextlib.suppress(OSError):
        # never through a link, nor blocking on a FIFO planted there
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) |
                     getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            head = os.read(fd, 72) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        finally:
            os.close(fd)
        ours = head[:16] == b"SQLite format 3\0" and \
            int.from_bytes(head[68:72], "big") == _APPLICATION_ID
    ours = ours or os.path.isdir(path + ".values")
    if not ours and not (path.endswith(".db") or head.startswith(b"SQLite format 3\0") or
                         (len(head) >= 16 and not head[:16].strip(b"\0"))):
        return PersistError(errno.EINVAL, _NOT_A_CACHE.format(why=why), path,
                            reason=PersistError.NOT_A_CACHE)
    files = [path, path + "-wal", path + "-shm"]
    if os.name == "nt":
        how = "delete %s, and the folder %s.values" % (", ".join(files), path)
    else:
        import shlex
        how = "rm -f %s; rm -rf %s" % (" ".join(shlex.quote(name) for name in files),
                                        shlex.quote(path + ".values"))
    if ours:
        return PersistError(errno.EINVAL, "a damaged persist cache (%s); persist leaves it as "
                            "it is: to start over (its results are computed again), remove its "
                            "files: %s" % (why, how), path, reason=PersistError.CORRUPT)
    return PersistError(errno.EINVAL, _NOT_A_CACHE.format(why=why) + "; or, if it is a "
                        "persist cache that was damaged, start over by removing its files (%s)"
                        % how, path, reason=PersistError.NOT_A_CACHE)


# == the store: the trust check -------------------------------------------------------------------
# A cache holds pickles: persist refuses one that another user could have written.

def _check_private(directory, what):
    # type: (str, str) -> None
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
            raise PersistError(errno.EPERM, _NOT_OURS.format(what=what, uid=info.st_uid), path,
                               reason=PersistError.NOT_OURS)
        if stat.S_ISLNK(info.st_mode):
            pending.append(os.path.realpath(path))
        elif info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise PersistError(errno.EPERM, _SWAPPABLE.format(what=what), path,
                               reason=PersistError.SWAPPABLE)
        pending.append(os.path.dirname(path))


def _planted(info, directory):
    # type: (os.stat_result, str) -> bool
    """Whether a file or directory of a cache (os.lstat() gave info) in directory, which
    _check_private() accepted, may hold what someone else put there: it is writable by every
    user, or it lies in a directory every user may write (sticky, as /tmp) and another user
    owns it. The same rules for each of a cache's files: one that a member of the directory's
    group made (a teammate, in a team's directory) is accepted, as the directory is."""
    if info.st_mode & stat.S_IWOTH:
        return True
    return bool(os.stat(directory).st_mode & stat.S_IWOTH) and \
        info.st_uid not in (0, os.geteuid())


# What SQLite reads beside a database file: a hot rollback journal is replayed into it, and a
# log's frames are read as its latest pages. (A super-journal, NAME-mjXXXXXXXX, is read only
# as named by a journal, and says only whether to replay it: the journal is what counts.)
_COMPANIONS = (("-journal", "a rollback journal"), ("-wal", "a write-ahead log"),
               ("-shm", "the index of a write-ahead log"))


def _check_companions(path):
    # type: (str) -> None
    """Refuse the files beside the database at path that SQLite would read with it, when they
    are links, writable by every user, or, in a directory every user may write (/tmp), not
    ours: another user who planted one there would choose what the cache holds.

    Run before every connection is made, not only when a cache is opened: between two
    connections (after fork(), or once the last one closed and SQLite removed the log) a
    planted file would be read by the next. In such a directory, each name is first taken by
    an empty file of ours, where there is none: a file planted after this check, as SQLite
    opens the cache, would be read all the same, and there nobody else can make one, nor
    replace ours (the directory is sticky: _check_private). SQLite takes an empty journal
    for none, and an empty log and index as its own new ones (it removes those two as the
    last connection closes; the journal stays).
    """
    shared, mode = False, 0
    if _CHECK_WORLD_WRITABLE:
        shared = bool(os.stat(os.path.dirname(path)).st_mode & stat.S_IWOTH)
        if shared:
            with contextlib.suppress(OSError):          # no cache yet: nothing to read
                info = os.lstat(path)
                if stat.S_ISREG(info.st_mode):
                    mode = stat.S_IMODE(info.st_mode) & 0o666 | 0o600    # as SQLite's own
    for suffix, what in _COMPANIONS:
        name = path + suffix
        if mode:
            # best effort: one that is there already is checked below
            with contextlib.suppress(OSError):
                os.close(os.open(name, _O_HOLD, mode))
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            raise PersistError(errno.ELOOP, _LINK, name, reason=PersistError.SYMLINK)
        if not _CHECK_WORLD_WRITABLE:
            continue
        if info.st_mode & stat.S_IWOTH:
            raise PersistError(errno.EPERM, _WORLD_WRITABLE, name, reason=PersistError.UNSAFE)
        if shared and info.st_uid not in (0, os.geteuid()):
            raise PersistError(errno.EPERM, _PLANTED_COMPANION.format(what=what,
                                                                      uid=info.st_uid), name,
                               reason=PersistError.PLANTED)
        # A hard link has its file's owner. (Not checked for the cache itself, which has two
        # names for a moment as _create() links it into place.)
        if shared and info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
            raise PersistError(errno.EPERM, _HARD_LINKED.format(links=info.st_nlink), name,
                               reason=PersistError.HARD_LINKED)


# == the store: fork and exit hooks ---------------------------------------------------------------
# A child must not inherit SQLite's locks: before fork() every connection is closed under
# _FORK_GATE, and parent and child reopen on next use. At exit every connection is closed,
# so that the last one out removes the -wal and -shm files.

def _gated():
    # type: () -> ContextManager[Any]
    """What to hold to begin what a fork must wait for: _FORK_GATE itself, which a with
    takes and gives back in C, with no Ctrl-C between taking it and the with's body (before
    3.10 one could come there, and leave it held: bpo-29988). For a signal handler whose
    thread is inside a _Connection or _elsewhere(), the gate only if it is free: a fork
    under way in another thread waits for that thread, which would wait for the fork (the
    fork then waits for this too, which ends before the handler returns)."""
    return _GateIfFree() if _inside_sqlite() else _FORK_GATE


class _GateIfFree:
    """_FORK_GATE for a signal handler inside SQLite work, if no other thread holds it."""
    __slots__ = ("taken",)

    def __enter__(self):
        # type: () -> None
        self.taken = _FORK_GATE.acquire(blocking=False)

    def __exit__(self, *exc):
        # type: (*Any) -> None
        if self.taken:
            _FORK_GATE.release()


def _forking_elsewhere():
    # type: () -> bool
    """Whether another thread forks: then a use of a _Connection, under its lock, lets go
    of it and waits for the fork to end (_wait_for_fork()), as fork() waits for the lock."""
    # (ignore[attr-defined]: _thread.RLock's own method, on CPython 3.8+ and PyPy alike,
    # which typeshed leaves out)
    if not _FORKING_NOW:
        return False
    owned = _FORK_GATE._is_owned()  # type: ignore[attr-defined]
    return not owned and not _inside_sqlite()


def _wait_for_fork():
    # type: () -> None
    with _gated():
        pass


def _connections():
    # type: () -> List[_Connection]
    """This process's _Connections, as a list. A WeakSet's iteration is Python code, during
    which another thread may add one (opening a cache) or drop one (closing it), and it then
    raises RuntimeError (set changed size during iteration): the list is made again."""
    while True:
        try:
            return list(_CONNECTIONS)
        except RuntimeError:
            continue


def _inside_sqlite():
    # type: () -> bool
    """Whether this thread is inside a _Connection or _elsewhere(): a signal handler's."""
    me = _thread.get_ident()
    return any(conn._depth and conn._lock._is_owned()  # type: ignore[attr-defined]  # in C and PyPy
               for conn in _connections()) or \
        any(thread == me and lock.locked() for lock, (_, thread) in list(_ELSEWHERE.items()))


@contextlib.contextmanager
def _elsewhere(path):
    # type: (str) -> Iterator[None]
    """Around SQLite work on path done without a _Connection: fork() waits for it to end,
    and none begins while another thread forks (see _FORK_GATE)."""
    lock = _thread.allocate_lock()
    # Held from here to the end, even when Ctrl-C comes between two steps: an entry that
    # one leaves behind is then unlocked, and fork() takes it away without waiting
    with lock:
        with _gated():
            _ELSEWHERE[lock] = (path, _thread.get_ident())
        try:
            yield
        finally:
            _ELSEWHERE.pop(lock, None)


def _close_garbage():
    # type: () -> None
    """Close the connections that _Connection.__del__() left: called under a lock that
    fork() waits for."""
    while _GARBAGE:
        with contextlib.suppress(IndexError):      # another thread took the last one
            _close(_GARBAGE.pop())


def _before_fork():
    # type: () -> None
    """Close every connection, each under its lock, so no thread is inside one at fork(),
    nor inside SQLite elsewhere (see _FORK_GATE).

    _FORK_GATE is taken before this runs, and given back after the fork, by the hooks
    registered below: C code, which no signal handler interrupts. A Ctrl-C in here, or as
    the parent's half begins (CPython ignores a hook's error and forks all the same), can
    then leave no lock held, which every other thread would wait for for ever: this holds
    each connection's lock only while it closes it, and meanwhile the gate keeps any
    thread from starting SQLite work (_forking_elsewhere()). A signal handler may fork
    while this runs: the gate is an RLock, taken and given back once per fork."""
    # one per fork under way (nested: a signal handler's), with the locks its thread holds
    _FORKING.append({conn for conn in _connections()
                     if conn._lock._is_owned()})  # type: ignore[attr-defined]  # in C and PyPy
    me = _thread.get_ident()
    for lock, (path, thread) in list(_ELSEWHERE.items()):
        if thread == me and lock.locked():
            # A signal handler forks while its thread makes this cache (or reads it): the
            # child would find SQLite's locks on it held by a connection of its own
            _WRITING_AT_FORK.add(path)
        else:
            with lock:                    # wait for that thread to finish with SQLite
                _ELSEWHERE.pop(lock, None)
    seen: "Set[_Connection]" = set()
    while True:           # our own thread may open another while we close the first ones
        new = [conn for conn in _connections() if conn not in seen]
        if not new:
            break
        for conn in new:
            seen.add(conn)
            with conn._lock:              # wait for the thread inside it, if one is
                if conn._depth:
                    # Our own thread is inside it: a signal handler forks. The connection
                    # (maybe one being opened) stays for the code it interrupted; the child
                    # may not use this cache file: its SQLite would take the locks of that
                    # connection as held by one of its own, and wait for them for ever.
                    _WRITING_AT_FORK.add(conn.path)
                else:
                    conn._close_conn()
    _close_garbage()                      # no other thread is in SQLite now


def _after_fork_in_parent():
    # type: () -> None
    held = _FORKING.pop() if _FORKING else set()
    # A Ctrl-C can leave the lock of the connection _before_fork() was closing held by this
    # thread, which every other thread would wait for for ever: Python 3.8 and 3.9 run a
    # signal's handler between the end of a with's body and its __exit__, and as an error
    # (an earlier Ctrl-C) enters __exit__. Let go of the locks it took and kept.
    for conn in _connections():
        while conn not in held and conn._lock._is_owned():  # type: ignore[attr-defined]
            conn._lock.release()
    if not _FORKING:
        _WRITING_AT_FORK.clear()


def _after_fork_in_child():
    # type: () -> None
    global _OPEN_LOCK
    _OPEN_LOCK = _thread.RLock()
    del _FORKING[:]
    _WRITTEN.clear()                      # the parent's to look at, at its exit
    for conn in _connections():
        conn._lock = _thread.RLock()      # whoever held the old one is not in this process
        conn._depth = 0
        conn._frozen = conn._copy = None  # a private copy is the parent's to remove
        if conn._conn is not None:        # in use by the code a signal handler interrupted
            _ABANDONED.append(conn._conn)
            conn._conn = None
    _ABANDONED.extend(_GARBAGE)           # the collector's, since _before_fork()
    del _GARBAGE[:]


def _close_all():
    # type: () -> None
    """At exit: close every connection, so the last one out removes the -wal and -shm files."""
    # A daemon thread may use a cache after this, until the interpreter stops it where it
    # is: a connection it opens then would never be closed, and leave the log. So from now
    # on each use closes its own.
    global _EXITED
    _EXITED = True
    with contextlib.suppress(Exception):
        with _elsewhere(""):
            _close_garbage()
    for conn in _connections():
        # best effort: at exit, a connection another thread is using stays as it is
        with contextlib.suppress(Exception):
            if conn._lock.acquire(blocking=False):
                try:
                    conn.close()          # a _Connection: _close() takes sqlite3's own
                finally:
                    conn._lock.release()
    # Each cache this process wrote, closed now or earlier (a shelf closed by hand, while
    # another process had it open, also had to leave the log)
    for path in list(_WRITTEN):
        with contextlib.suppress(Exception):
            _remove_log(path)


def _remove_log(path):
    # type: (str) -> None
    """SQLite removes the log when the last connection to the cache closes. But processes
    that close at the same instant can each see the other still there, and all leave it
    (seen in CI: four workers ending together): look again, a few times, on a connection of
    our own, which removes it if this process is the last one out by now."""
    for _ in range(3):
        if not os.path.exists(path + "-wal"):
            return
        try:
            _check_companions(path)
        except OSError:
            return                        # refused when used: nothing of ours to remove
        with _elsewhere(path):
            try:
                conn = sqlite3.connect(_uri(path, "rw"), uri=True, timeout=0.1)
            except sqlite3.Error:
                return                    # the cache is gone meanwhile: nothing to do
            try:
                _fetch(conn, "SELECT 1 FROM sqlite_master LIMIT 1")   # reads: opens the log
            except sqlite3.Error:
                pass
            finally:
                _close(conn)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
    # Registered after those, so that before fork() the gate is taken, then the mark made,
    # then _before_fork() runs, and after it (in the child too, where the thread that forked
    # is the one left) the mark is taken away, then the gate given back: by C code, which no
    # signal handler interrupts (a hook's Python code can be, even as it begins)
    os.register_at_fork(before=functools.partial(_FORKING_NOW.append, None),
                        after_in_parent=_FORKING_NOW.pop, after_in_child=_FORKING_NOW.pop)
    os.register_at_fork(before=_FORK_GATE.acquire, after_in_parent=_FORK_GATE.release,
                        after_in_child=_FORK_GATE.release)
atexit.register(_close_all)


# == the store: the files store -------------------------------------------------------------------
# Where SQLite's locks do not hold (NFS, Lustre, GPFS, sshfs: _shared_filesystem() reads
# the mount table), a cache is a store of files (_FileStore): a directory (_Directory) or a
# mapping's keys (_MappingObjects: S3 through fsspec), one record a result or a failed
# call, each written whole to a temporary file of its own, fsynced, and published with
# link() (_publish), framed with its length and checksum so that a torn one reads as
# missing (_framed, _unframed); no locks. _store_kind() says which store a cache uses.

def _open_store(path, flag, kind=None):
    # type: (str, str, Optional[str]) -> _AnyStore
    """The store of kind ("files", else SQLite) at path, opened with flag; without kind, the
    one that is there (the command line's): a directory is a store of files."""
    if kind == "files" or kind is None and os.path.isdir(path) and not os.path.islink(path):
        return _FileStore(path, flag)
    return _Store(path, flag)


def _store_kind(directory, asked, what):
    # type: (str, Optional[str], str) -> str
    """Which store a cache in directory uses: asked (memoize(store=), or $PERSIST_STORE),
    else "files" on a filesystem other machines share and "sqlite" elsewhere. "sqlite" on a
    shared filesystem is refused: its locks do not hold there, and two machines writing one
    file corrupt it; "sqlite-one-machine" says the user knows only one machine uses it."""
    # The advice names what the user set: $PERSIST_STORE also chooses for persist.open,
    # which has no store= to pass.
    say = "store=%r"
    if asked is None:
        asked = os.environ.get("PERSIST_STORE") or None
        what, say = "$PERSIST_STORE", "PERSIST_STORE=%s"
    if asked is not None and asked not in _STORE_KINDS:
        raise ValueError("%s=%r is not a store persist has: use 'files' (one file a result; "
                         "any filesystem, shared ones too), 'sqlite' (one SQLite file; the "
                         "fastest on a local disk; 'sqlite-one-machine' on a shared one that "
                         "one machine alone uses) or leave it unset to choose by where the "
                         "cache is" % (what, asked))
    if asked == "files":
        return "files"
    shared = _shared_filesystem(_existing_parent(directory))
    if asked == "sqlite" and shared is not None:
        raise PersistError(errno.EINVAL, (
            "%s asks for the SQLite store, but this directory is on %s, a filesystem other "
            "machines may share: SQLite's locks do not hold there, and two machines writing "
            "one cache corrupt it. Use %s (what persist picks there by itself%s), or, if only "
            "this one machine ever uses this cache, %s"
            % (what, shared, say % "files", ", as when it is unset" if what[0] == "$" else "",
               say % "sqlite-one-machine")), directory,
            reason=PersistError.SHARED_FILESYSTEM)
    if asked is None and shared is not None:
        return "files"
    return "sqlite"


_STORE_KINDS = ("files", "sqlite", "sqlite-one-machine")


def _existing_parent(directory):
    # type: (str) -> str
    """directory, or the nearest directory above it that exists (a cache's directory is made
    on its first store: its filesystem is its parent's)."""
    directory = os.path.abspath(directory)
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return directory


class _FileStore:
    """A cache as a directory of files, one a result, for filesystems where no lock holds
    (NFS, Lustre, GPFS, sshfs): what _Store does, without SQLite.

        NAME.files/store                    what this is: {"persist": "files", "format": 1}
        NAME.files/info                     the function, version, expire= (as _Store's Info)
        NAME.files/results/AB/ABCD...       one result: its key's hex digits, AB the first two
        NAME.files/failures/AB/ABCD....T.HOST-PID-RANDOM    one failed call, at time T

    Each file is one framed record (_framed), written whole to a temporary file of its own
    and published with link() (_publish): a reader on any machine sees a whole record, or
    none; a record torn or cut short reads as missing. A result is published only where no
    other is (two machines computing one key: the first stays), but over one stored before
    this call started (an expired result, or one torn). Each failure is a file of its own,
    so that machines never write one file; a failure older than the key's result is void.
    Names come from digests only: a shelf's keys are hashed, and kept in their records.
    Directories are made once and never removed; nothing is locked.
    """

    calls = True                    # failure records keep their calls (as _Store.calls)

    def __init__(self, path, flag="c", shelf=False, objects=None):
        # type: (_Path, str, bool, Optional[_Objects]) -> None
        if flag not in _FLAGS:
            raise ValueError("flag must be 'r', 'w', 'c' or 'n', not %r" % (flag,))
        # where the records are: a directory at path, or objects (a mapping's keys)
        self.objects = objects if objects is not None else _Directory(
            os.path.abspath(os.fsdecode(os.fspath(path))), flag)
        self.path = self.objects.path
        self.flag = flag
        # a shelf's (persist.open): keys are the user's text, named by their digest and kept
        # in their records; memoize's are digests already
        self.shelf = shelf
        self.objects.check()
        marker = self.objects.join("store")
        if flag in "cn" and not self.objects.exists(marker):
            self.objects.create()
            self.objects.publish(marker, [_FILES_MARKER])
        self._check_marker(marker)
        if flag == "n":
            self.clear()
        elif flag != "r":
            self.sweep()

    def _check_marker(self, marker):
        # type: (str) -> None
        record = self.objects.read(marker, _SMALL_RECORD)
        if record is None:
            raise PersistError(errno.EINVAL, "a directory without persist's marker file "
                               "'store' (or with a damaged one): not a cache of files; "
                               "persist leaves it as it is", self.path,
                               reason=PersistError.NOT_A_CACHE)
        json = _json()
        try:
            fields = json.loads(bytes(record).decode("utf-8"))
            made = int(fields["format"]) if fields.get("persist") == "files" else None
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            made = None
        if made is None:
            raise PersistError(errno.EINVAL, "its marker file 'store' is not persist's: not a "
                               "cache of files; persist leaves it as it is", self.path,
                               reason=PersistError.NOT_A_CACHE)
        if made > _FILES_FORMAT:
            raise PersistError(errno.EINVAL, "a cache made by a newer persist.py (format %d; "
                               "this one reads %d): use that one" % (made, _FILES_FORMAT),
                               self.path, reason=PersistError.NEWER_FORMAT)

    # Files

    def _result(self, key):
        # type: (bytes) -> str
        name = _sha256(key).hexdigest() if self.shelf else key.hex()
        return self.objects.join("results", name[:2], name)

    def _results(self):
        # type: () -> Iterator[str]
        """The path of every result file."""
        yield from self.objects.walk("results")

    def _entry(self, path):
        # type: (str) -> Optional[Tuple[Dict[str, Any], memoryview]]
        """(header, pickle) of the result file at path, or None (gone, torn)."""
        record = self.objects.read(path)
        return None if record is None else _result_parts(record)

    def _entries(self):
        # type: () -> Iterator[Tuple[str, Dict[str, Any], memoryview]]
        for path in self._results():
            entry = self._entry(path)
            if entry is not None:
                yield (path,) + entry

    # Reading

    def get(self, key):
        # type: (bytes) -> Optional[_Row]
        """(pickle, None, stored, seconds) for key, or None (as _Store.get())."""
        entry = self._entry(self._result(key))
        if entry is None:
            return None
        header, data = entry
        return data, None, header["stored"], header.get("seconds")

    def hit(self, key):
        # type: (bytes) -> Optional[Tuple[Optional[bytes], Optional[float]]]
        """(pickle, seconds) for key, or None (as _Store.hit())."""
        row = self.get(key)
        return None if row is None else (bytes(row[0]), row[3])

    def load(self, row):
        # type: (_Row) -> Any
        return pickle.loads(row[0])

    def keys(self):
        # type: () -> List[bytes]
        return [_key_of_record(path, header) for path, header, _ in self._entries()]

    def __bool__(self):
        # type: () -> bool
        return True

    def __len__(self):
        # type: () -> int
        return sum(1 for _ in self._entries())

    def __contains__(self, key):
        # type: (bytes) -> bool
        return self.get(key) is not None

    def info(self):
        # type: () -> Dict[str, str]
        info = self._json_record(self.objects.join("info"))
        if info is None:                     # (or whole, but not persist's: none)
            return {}
        return {str(name): str(value) for name, value in info.items()}

    def _json_record(self, path):
        # type: (str) -> Optional[Dict[str, Any]]
        """The JSON object of the small record at path (the info, a failure), or None: gone,
        torn, larger than any persist writes (a file planted there is not read into memory),
        not JSON, or JSON but no object."""
        record = self.objects.read(path, _SMALL_RECORD)
        try:
            found = None if record is None else _json().loads(bytes(record).decode("utf-8"))
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def set_info(self, info):
        # type: (Dict[str, str]) -> None
        """Merge info into the info record (the last writer's wins: what it says is advice)."""
        if self.flag == "r":
            raise PermissionError(errno.EACCES, "the cache is open read-only", self.path)
        merged = self.info()
        merged.update(info)
        self.objects.publish(self.objects.join("info"),
                      [_json().dumps(merged, sort_keys=True).encode("utf-8")],
                      keep=lambda path: False)

    def claim_source(self, source, another):
        # type: (str, Callable[[Optional[str]], bool]) -> Optional[str]
        """Record source as the file that defines the cache's function, unless another()
        says the recorded one is another project's; return the one recorded before."""
        recorded = self.info().get("source")
        if not another(recorded):
            self.set_info({"source": source})
        return recorded

    def entries(self, limit=None):
        # type: (Optional[int]) -> List[Tuple[bytes, Optional[str], float, int, Optional[float], Optional[str]]]
        """(key, args, stored, size, seconds, version) of every entry, oldest first; of the
        limit oldest, if given (only those are held: each record is read, and let go)."""
        rows = ((_key_of_record(path, header), header.get("args"), header["stored"],
                 len(data), header.get("seconds"), header.get("version"))
                for path, header, data in self._entries())
        if limit is None:
            return sorted(rows, key=_stored_of)
        import heapq
        return heapq.nsmallest(limit, rows, key=_stored_of)

    def summary(self):
        # type: () -> Tuple[int, Optional[float], Optional[float], int, int, float, int]
        """As _Store.summary()."""
        stamps, seconds = [], 0.0
        for _, header, _ in self._entries():
            stamps.append(header["stored"])
            seconds += header.get("seconds") or 0.0
        version = self.info().get("version")
        codes = self.stale_codes()
        stale = self.prune(version=version, codes=codes, dry_run=True)[:2] \
            if version or codes else (0, 0)
        return (len(stamps), min(stamps, default=None), max(stamps, default=None)) + stale + (
            seconds, len(self.failures()))

    def tally(self, owner=None):
        # type: (Optional[str]) -> Tuple[int, float, int]
        """(entries, seconds their calls took in all, failure records): owner's alone (and
        those of no owner), if given."""
        count, seconds = 0, 0.0
        for _, header, _ in self._entries():
            if owner is None or header.get("owner") in (None, owner):
                count += 1
                seconds += header.get("seconds") or 0.0
        return count, seconds, len(self.failures(owner))

    def owned(self):
        # type: () -> bool
        return True

    def own(self):
        # type: () -> None
        pass

    def stale_codes(self):
        # type: () -> Optional[List[str]]
        code = self.info().get("code")
        return code.split()[1:] if code else None

    def closures(self):
        # type: () -> int
        codes = self.stale_codes()
        if not codes:
            return 0
        return len({header["owner"] for _, header, _ in self._entries()
                    if header.get("owner") and header["owner"][:_CODE_TAG] in codes})

    def stored(self, key):
        # type: (bytes) -> Optional[Tuple[float, Optional[str]]]
        """(stored, version) of key's entry, or None."""
        entry = self._entry(self._result(key))
        return None if entry is None else (entry[0]["stored"], entry[0].get("version"))

    def versions(self, but):
        # type: (str) -> List[Optional[str]]
        """The versions other than but that entries were stored under."""
        return sorted({header.get("version") for _, header, _ in self._entries()} - {but},
                      key=str)

    # The failure ledger

    def _failures(self, key=None):
        # type: (Optional[bytes]) -> Iterator[Tuple[str, Dict[str, Any]]]
        """(path, record) of each failure file (of key alone, if given) that no later
        result of its key voids."""
        if key is None:
            paths = self.objects.walk("failures")
        else:
            name = key.hex()
            bucket = self.objects.join("failures", name[:2])
            paths = (path for path in self.objects.listing(bucket)
                     if os.path.basename(path).startswith(name + "."))
        results = {}     # type: Dict[str, Optional[float]]
        for path in paths:
            failure = self._failure_at(path)
            if failure is None:
                continue
            name = os.path.basename(path).split(".")[0]
            if name not in results:
                stored = self.stored(bytes.fromhex(name)) if _hex_name(name, 64) else None
                results[name] = None if stored is None else stored[0]
            if results[name] is None or failure["started"] > results[name]:
                yield path, failure

    def failures(self, owner=None):
        # type: (Optional[str]) -> List[Any]
        """As _Store.failures(): one row a failed call (its failures counted together), the
        latest failure last."""
        calls = {}      # type: Dict[str, List[Dict[str, Any]]]
        for path, failure in self._failures():
            if owner is None or failure.get("owner") in (None, owner):
                calls.setdefault(os.path.basename(path).split(".")[0], []).append(failure)
        rows = []
        for events in calls.values():
            events.sort(key=lambda event: event["when"])
            last = events[-1]
            call = last.get("call")
            if isinstance(call, dict):           # a pickle, in hex
                call = bytes.fromhex(call["pickle"])
            # a failure file that 'persist merge' wrote holds a count, from first on
            count = sum(int(event.get("count", 1)) for event in events)
            first = min(event.get("first", event["when"]) for event in events)
            rows.append((last.get("args"), last["type"], last["message"], count, first,
                         last["when"], last.get("seconds"), last.get("version"),
                         last["traceback"], call))
        rows.sort(key=lambda row: row[5])
        return rows

    def failed(self, key):
        # type: (bytes) -> Optional[Tuple[int, float, str, str]]
        """(count, last, type, message) of key's failures, or None."""
        events = sorted((failure for _, failure in self._failures(key)),
                        key=lambda event: event["when"])
        if not events:
            return None
        return (sum(int(event.get("count", 1)) for event in events), events[-1]["when"],
                events[-1]["type"], events[-1]["message"])

    def failed_versions(self, but):
        # type: (str) -> List[Optional[str]]
        return sorted({failure.get("version") for _, failure in self._failures()} - {but},
                      key=str)

    def record_failure(self, key, started, failure, owner=None, expire=None):
        # type: (bytes, float, _FailureRecord, Optional[str], Optional[float]) -> None
        """As _Store.record_failure(): a file of its own, unless a result for key was stored
        since the call started (and not stamped further ahead than expire=)."""
        if self.flag == "r":
            raise PermissionError(errno.EACCES, "the cache is open read-only", self.path)
        stored = self.stored(key)
        until = time.time() + expire if expire is not None else float("inf")
        if stored is not None and started <= stored[0] < until:
            return
        args, kind, message, text, seconds, version, call = failure
        now = time.time()
        self._publish_failure(key, {
            "args": args, "type": kind, "message": message, "traceback": text,
            "seconds": seconds, "version": version, "owner": owner, "when": now,
            "started": started, "call": call})

    def _publish_failure(self, key, record):
        # type: (bytes, Dict[str, Any]) -> None
        """Publish the failure record of key, a file of its own named for its time (its
        "when") and this process; a call's pickle (bytes) goes as hex."""
        call = record["call"]
        if isinstance(call, bytes):
            record = dict(record, call={"pickle": call.hex()})
        name = key.hex()
        self.objects.publish(self.objects.join("failures", name[:2], "%s.%d.%s-%d-%s" % (
            name, int(record["when"] * 1e6), _HOST, os.getpid(), os.urandom(4).hex())),
            [_json().dumps(record).encode("utf-8")])

    def _forget_failures(self, key):
        # type: (bytes) -> None
        """Remove key's failure files (best effort: a result voids them anyway)."""
        for path, _ in list(self._failures(key)):
            self.objects.remove(path)

    # Raw entries and failure records, for 'persist merge' (as _Store's): copied as they are,
    # each one record published, the newest result of a key winning

    def raw_entries(self):
        # type: () -> Iterator[Tuple[bytes, Optional[bytes], Dict[str, Any]]]
        """(key, pickle, meta) of every entry (as _Store.raw_entries()): never loaded. A torn
        record is no entry, as to get()."""
        for path, header, data in self._entries():
            yield _key_of_record(path, header), bytes(data), {
                name: header.get(name) for name in _RAW_META}

    def put_raw(self, key, data, meta):
        # type: (bytes, bytes, Dict[str, Any]) -> bool
        """Store data, a pickle as raw_entries() gives it, under key with meta as it is,
        unless key's entry is as new or newer (as _Store.put_raw()): one record published.
        A failure file of key older than it is void (see _failures). Returns whether it
        was stored."""
        if self.flag == "r":
            raise PermissionError(errno.EACCES, "the cache is open read-only", self.path)
        stamp = float(meta["stored"])
        stored = self.stored(key)
        if stored is not None and stored[0] >= stamp:
            return False
        header = {name: meta.get(name) for name in _RAW_META}
        header["stored"] = stamp
        if self.shelf:
            header["key"] = key.decode("utf-8", "surrogateescape")

        def keep(path):
            # type: (str) -> bool
            entry = self._entry(path)
            return entry is not None and entry[0]["stored"] >= stamp

        head = _json().dumps(header).encode("utf-8")
        return self.objects.publish(self._result(key),
                                    [len(head).to_bytes(4, "big"), head, data], keep)

    def failure_spans(self, key=None):
        # type: (Optional[bytes]) -> List[Tuple[bytes, Dict[str, Any]]]
        """(key, span) of each failure file (of key alone, if given) that no later result
        voids, as _Store.failure_spans() gives them: one failure each, but those a merge
        wrote, which hold a count of failures from first to last."""
        spans = []
        for path, failure in self._failures(key):
            call = failure.get("call")
            span = {name: failure.get(name) for name in _SPAN_FIELDS}
            span.update(count=int(failure.get("count", 1)), last=failure["when"],
                        first=failure.get("first", failure["when"]),
                        started=failure["started"], call=bytes.fromhex(call["pickle"])
                        if isinstance(call, dict) else call)
            spans.append((bytes.fromhex(os.path.basename(path).split(".")[0]), span))
        return spans

    def put_failure(self, key, span):
        # type: (bytes, Dict[str, Any]) -> bool
        """Add span (of failure_spans()) to key's failures as a file of its own, unless key's
        result is newer than its latest call, or a failure file of key covers it (_covers):
        the same failures, merged before. Returns whether it did."""
        if self.flag == "r":
            raise PermissionError(errno.EACCES, "the cache is open read-only", self.path)
        stored = self.stored(key)
        if stored is not None and stored[0] >= span["started"]:
            return False
        others = [other for _, other in self.failure_spans(key)]
        if any(_covers(other, span) for other in others):
            return False
        # the failures it adds to those of the files it overlaps (as _merged_count): it may
        # add none, and still bring the latest failure's time and details
        count = int(span["count"]) - sum(int(other["count"]) for other in others
                                         if not _apart(other, span))
        span = dict(span, count=max(0, count))
        record = {name: span.get(name) for name in _SPAN_FIELDS if name not in
                  ("count", "first", "last")}
        record.update(when=span["last"], started=span["started"])
        if span["count"] != 1 or span["first"] != span["last"]:
            record.update(count=span["count"], first=span["first"])
        self._publish_failure(key, record)
        return True

    # Writing

    def put(self, key, value, protocol=_PROTOCOL, seconds=None, version=None, args=None,
            forget=(), owner=None):
        # type: (bytes, Any, Optional[int], Optional[float], Optional[str], Optional[str], Sequence[bytes], Optional[str]) -> None
        """Pickle value under key, with what memoize records (as _Store.put()). Another
        machine's result for key stored since this call started stays; an older one (an
        expired result, another version's) is replaced. A shelf's value always is, as in a
        dict: the last assignment wins."""
        self._put(key, pickle.dumps(value, protocol), seconds, version, args, forget, owner)

    def _put(self, key, data, seconds, version, args, forget, owner):
        # type: (bytes, bytes, Optional[float], Optional[str], Optional[str], Sequence[bytes], Optional[str]) -> None
        """put() of a value pickled already (data)."""
        if self.flag == "r":
            raise PermissionError(errno.EACCES, "the cache is open read-only", self.path)
        now = time.time()
        header = {"stored": now, "seconds": seconds, "version": version, "args": args,
                  "owner": owner}
        if self.shelf:
            header["key"] = key.decode("utf-8", "surrogateescape")
        started = now - (seconds or 0.0)

        def keep(path):
            # type: (str) -> bool
            # another writer's, stored while this call ran: it stays (the same result). Not
            # one stamped ahead of this clock (a writer's clock ahead, or this one jumped
            # back): replaced, else it would stay while every call found it expired
            entry = self._entry(path)
            return not self.shelf and entry is not None and \
                started <= entry[0]["stored"] <= time.time() + 1.0

        head = _json().dumps(header).encode("utf-8")
        self.objects.publish(self._result(key), [len(head).to_bytes(4, "big"), head, data], keep)
        for other in (key,) + tuple(forget):
            with contextlib.suppress(OSError):
                self._forget_failures(other)

    def put_many(self, entries, protocol=_PROTOCOL):
        # type: (Sequence[Tuple[bytes, Any, Optional[float], Optional[str], Optional[str], Sequence[bytes], Optional[str]]], Optional[int]) -> List[Optional[Exception]]
        """put() each of entries (as _Store.put_many()); no transaction to share here."""
        errors = []   # type: List[Optional[Exception]]
        for key, value, seconds, version, args, forget, owner in entries:
            try:
                data = pickle.dumps(value, protocol)
            except Exception as exc:
                errors.append(exc)
                continue
            self._put(key, data, seconds, version, args, forget, owner)
            errors.append(None)
        return errors

    def delete(self, key):
        # type: (bytes) -> bool
        if self.flag == "r":
            raise PermissionError(errno.EACCES, "the cache is open read-only", self.path)
        found = self.get(key) is not None
        self.objects.remove(self._result(key))
        return found

    def delete_row(self, key, row):
        # type: (bytes, _Row) -> bool
        """Remove key if it still holds the entry get() returned (its stored time)."""
        now = self.get(key)
        if now is None or now[2] != row[2]:
            return False
        return self.delete(key)

    def clear(self, owner=None):
        # type: (Optional[str]) -> int
        """Remove every entry and failure file (owner's alone, and those of no owner)."""
        if self.flag == "r":
            raise PermissionError(errno.EACCES, "the cache is open read-only", self.path)
        count = 0
        for path, header, _ in list(self._entries()):
            if owner is None or header.get("owner") in (None, owner):
                self.objects.remove(path)
                count += 1
        for path in list(self.objects.walk("failures")):
            failure = self._failure_at(path)
            if owner is None or failure is None or failure.get("owner") in (None, owner):
                self.objects.remove(path)
        return count

    def _failure_at(self, path):
        # type: (str) -> Optional[Dict[str, Any]]
        """The failure record at path, or None: no record (_json_record), or whole but not
        of record_failure's making (its fields are checked before anything sorts or shows
        them)."""
        failure = self._json_record(path)
        if failure is None or not all(
                _number(failure.get(field)) for field in ("when", "started")) or \
                not all(isinstance(failure.get(field), str)
                        for field in ("type", "message", "traceback")):
            return None
        # and those that failures() adds up, and a merge copies (into SQLite's typed
        # columns): the count and first failure 'persist merge' writes, the call's pickle
        call, count = failure.get("call"), failure.get("count", 1)
        if not (failure.get("seconds") is None or _number(failure["seconds"])) or \
                not all(failure.get(field) is None or isinstance(failure[field], str)
                        for field in ("args", "version", "owner")) or \
                not (isinstance(count, int) and not isinstance(count, bool) and
                     0 <= count < 1 << 62) or \
                not _number(failure.get("first", 0)) or \
                not (call is None or isinstance(call, str) or isinstance(call, dict) and
                     isinstance(call.get("pickle"), str) and _is_hex(call["pickle"])):
            return None
        return failure

    def prune(self, before=None, version=None, dry_run=False, after=None, codes=None,
              owner=None):
        # type: (Optional[float], Optional[str], bool, Optional[float], Optional[Sequence[str]], Optional[str]) -> Tuple[int, int, int]
        """As _Store.prune(): (entries, bytes, failure records) removed, or that would be."""
        if before is None and after is None and version is None and not codes:
            raise ValueError("prune() needs before=, version= or codes=")

        def stale(record):
            # type: (Dict[str, Any]) -> bool
            mine = owner is None or record.get("owner") in (None, owner)
            other_code = bool(codes) and record.get("owner") is not None and \
                record["owner"][:_CODE_TAG] not in (codes or ())
            return other_code or mine and version is not None and \
                record.get("version") != version

        count = size = failed = 0
        for path, header, data in list(self._entries()):
            stamp = header["stored"]
            old = (before is not None and stamp < before) or (after is not None and
                                                                stamp > after)
            if (old and (owner is None or header.get("owner") in (None, owner))) or \
                    stale(header):
                count += 1
                size += len(data)
                if not dry_run:
                    self.objects.remove(path)
        if version is not None or codes:
            for path in list(self.objects.walk("failures")):
                failure = self._failure_at(path)
                if failure is not None and stale(failure):
                    failed += 1
                    if not dry_run:
                        self.objects.remove(path)
        return count, size, failed

    def sweep(self):
        # type: () -> None
        self.objects.sweep()

    def disk_usage(self):
        # type: () -> int
        return self.objects.usage()

    def close(self):
        # type: () -> None
        pass




class _Directory:
    """Where a store of files keeps its records (see _FileStore): a directory, each record a
    file, published with link() (_publish). Paths are the records' names.

    On a shared filesystem each record is fsynced before it is published: the issue's rule
    for NFS and the like (where it costs little: close() flushes to the server anyway). On a
    local disk none is, as the SQLite store commits with synchronous=NORMAL: a power cut may
    lose the last results, and a record it left torn reads as missing, never as a result;
    a process killed loses nothing it wrote. (An fsync a record took most of a miss there:
    4.1-4.5x the SQLite store's time with it, 1.6x without, on ext4.)"""

    def __init__(self, path, flag):
        # type: (str, str) -> None
        self.path = path
        self.flag = flag
        self.sync = _shared_filesystem(_existing_parent(path)) is not None

    def join(self, *parts):
        # type: (*str) -> str
        return os.path.join(self.path, *parts)

    def exists(self, path):
        # type: (str) -> bool
        return os.path.lexists(path)

    def check(self):
        # type: () -> None
        """Refuse a directory others could plant pickles in, or one that is not ours."""
        directory = os.path.dirname(self.path)
        if _CHECK_WORLD_WRITABLE:
            _check_private(directory, "the cache's directory")
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            if self.flag in "rw":
                raise FileNotFoundError(errno.ENOENT, "No such cache (open it with flag 'c' "
                                        "to create it)", self.path) from None
            return
        if stat.S_ISLNK(info.st_mode):
            raise PersistError(errno.ELOOP, _LINK, self.path, reason=PersistError.SYMLINK)
        if not stat.S_ISDIR(info.st_mode):
            raise PersistError(errno.ENOTDIR, "%s, not the directory of a cache of files; "
                               "persist leaves it as it is: give persist another name"
                               % _kind(info.st_mode), self.path,
                               reason=PersistError.NOT_A_CACHE)
        if _CHECK_WORLD_WRITABLE and _planted(info, directory):
            raise PersistError(errno.EPERM, _WORLD_WRITABLE, self.path,
                               reason=PersistError.UNSAFE)

    def create(self):
        # type: () -> None
        """Make the directory and its marker: by several machines at once, the first
        marker stays (the same content). A directory of other files is not made a cache."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.path, _DIR_MODE)
        # what a store holds is no other file: another process (another machine) may be
        # making this one at the same moment, and have published its marker, or its info
        others = [name for name in _listdir(self.path) if name not in _STORE_NAMES
                  and not name.startswith((".store.", ".info."))]
        # a results/ or failures/ of the user's own (a project's folder) is no store's either:
        # a store's hold only buckets, named by two hex digits
        others += [os.path.join(part, name) for part in ("results", "failures")
                   for name in _listdir(os.path.join(self.path, part))
                   if not _hex_name(name, 2)]
        if others:
            raise PersistError(errno.EEXIST, "a directory of other files (%s), not a cache; "
                               "persist leaves it as it is: give persist another name"
                               % ", ".join(sorted(others)[:3]), self.path,
                               reason=PersistError.NOT_A_CACHE)
        for part in ("results", "failures"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(self.path, part), _DIR_MODE)

    def read(self, path, limit=None):
        # type: (str, Optional[int]) -> Optional[memoryview]
        """The payload of the record at path, or None: missing, torn, cut short, or larger
        than limit bytes (not read). A record another user could have planted (see _planted),
        or one reached through a link planted at results/ or results/AB, is refused."""
        self._no_link_to(path)
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._read(path, limit)
            except _Replaced:
                continue
        return None                     # replaced again and again: as if read before

    def _read(self, path, limit):
        # type: (str, Optional[int]) -> Optional[memoryview]
        """read() once; _Replaced where the file went while it was read."""
        try:
            fd = os.open(path, _O_READ)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PersistError(errno.ELOOP, _LINK, path,
                                   reason=PersistError.SYMLINK) from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            if _CHECK_WORLD_WRITABLE and _planted(info, os.path.dirname(path)):
                raise PersistError(errno.EPERM, _WORLD_WRITABLE, path,
                                   reason=PersistError.UNSAFE)
            if limit is not None and info.st_size > limit:
                return None
            chunks, size = [], 0
            while True:                      # to its end: a size from stat may be stale (NFS)
                chunk = os.read(fd, max(1 << 16, info.st_size + 1))
                if not chunk:
                    break
                size += len(chunk)
                if limit is not None and size > limit:
                    return None
                chunks.append(chunk)
        except OSError as exc:
            # Another machine replaced or removed the record after it was opened: a network
            # filesystem may then fail fstat() or read() on the open file (sshfs: ENOENT;
            # NFS: ESTALE) where a local one goes on reading the old file. Its name now holds
            # the new record, or none: open it again.
            if exc.errno in _GONE_ERRNOS:
                raise _Replaced from None
            raise
        finally:
            os.close(fd)
        return _unframed(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _no_link_to(self, path):
        # type: (str) -> None
        """Refuse a link planted at a directory between the store's and path (results/,
        results/AB): followed, it would have persist read records from, write records to,
        and clear() remove files from, a directory that is not the store's."""
        directory = os.path.dirname(path)
        while len(directory) > len(self.path):
            try:
                info = os.lstat(directory)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISLNK(info.st_mode):
                    raise PersistError(errno.ELOOP, _LINK, directory,
                                       reason=PersistError.SYMLINK)
            directory = os.path.dirname(directory)

    def publish(self, path, chunks, keep=None):
        # type: (str, List[Any], Optional[Callable[[str], bool]]) -> bool
        """_publish() into a directory made on first use (once: never removed)."""
        self._no_link_to(path)
        try:
            return _publish(path, chunks, keep, self.sync)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.dirname(path), _DIR_MODE)
            return _publish(path, chunks, keep, self.sync)

    def remove(self, path):
        # type: (str) -> None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def walk(self, part):
        # type: (str) -> Iterator[str]
        """The paths of the records in part (results, failures): those named as persist
        names them (see _record_name), in buckets that are directories, not links."""
        top = os.path.join(self.path, part)
        self._no_link_to(os.path.join(top, "00"))
        try:
            buckets = sorted(entry.name for entry in os.scandir(top)
                             if len(entry.name) == 2 and _hex_name(entry.name, 2))
        except FileNotFoundError:
            return
        for bucket in buckets:
            folder = os.path.join(top, bucket)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                if os.path.islink(folder):
                    raise PersistError(errno.ELOOP, _LINK, folder,
                                       reason=PersistError.SYMLINK)
                with os.scandir(folder) as entries:   # (closed if the caller stops early)
                    for entry in entries:
                        if _record_name(part, bucket, entry.name):
                            yield entry.path

    def listing(self, directory):
        # type: (str) -> List[str]
        """The paths of the records in directory (none if it is not there yet)."""
        return [os.path.join(directory, name) for name in _listdir(directory)
                if not name.startswith(".")]

    def sweep(self):
        # type: () -> None
        """Remove the temporary files that processes of this machine left when killed (one
        whose process is gone), and those of any machine a day old: nothing else is swept,
        as nothing else can be proved not in use."""
        now = time.time()
        tops = [self.path] + [os.path.join(self.path, part, bucket)
                              for part in ("results", "failures")
                              for bucket in _listdir(os.path.join(self.path, part))]
        for top in tops:
            for name in _listdir(top):
                if not (name.startswith(".") and name.endswith(".tmp")):
                    continue
                path = os.path.join(top, name)
                with contextlib.suppress(OSError):
                    if now - os.lstat(path).st_mtime > _ABANDONED_TEMP or \
                            _left_by_dead_process(name):
                        os.unlink(path)

    def usage(self):
        # type: () -> int
        total = 0
        for top, _, names in os.walk(self.path):
            total += sum(_size(os.path.join(top, name)) for name in names)
        return total

class _Replaced(Exception):
    """A record went while _Directory._read() read it (see there)."""


class _MappingObjects:
    """Where a store of files keeps its records (see _FileStore) in a mapping of str to bytes
    (memoize(store=mapping), persist.open(mapping)): fsspec's get_mapper("s3://bucket/cache")
    (S3, GCS, Azure), or any MutableMapping. Paths are its keys, under prefix. Only a missing
    key (KeyError) is a missing record: any other error of the mapping (a timeout, a request
    refused) is an OSError that names the store, which the cache warns of and counts, never
    a miss. Where the mapping's filesystem creates a key only where none is (fsspec's mode
    "xb": S3's If-None-Match), a record that is not to replace another is written so."""

    def __init__(self, mapping, prefix, flag):
        # type: (Any, str, str) -> None
        self.mapping = mapping
        self.prefix = prefix.strip("/")
        self.flag = flag
        root = getattr(mapping, "root", None)
        where = root if isinstance(root, str) else "<%s>" % type(mapping).__name__
        # fsspec's root has no protocol ("bucket/cache"): put it back ("s3://bucket/cache"),
        # for messages and cache_info().path that say where. Only a name: it may fail.
        with contextlib.suppress(Exception):
            url = getattr(mapping, "fs").unstrip_protocol(root)
            if isinstance(root, str) and isinstance(url, str):
                where = url
        self.path = where.rstrip("/") + ("/" + self.prefix if self.prefix else "")

    def join(self, *parts):
        # type: (*str) -> str
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def _failed(self, exc, what, name):
        # type: (Exception, str, str) -> OSError
        if isinstance(exc, OSError):
            return exc
        return OSError(errno.EIO, "the store's mapping failed to %s %s (%s: %s)"
                       % (what, name, type(exc).__name__, exc), self.path)

    def exists(self, name):
        # type: (str) -> bool
        try:
            return name in self.mapping
        except Exception as exc:
            raise self._failed(exc, "look up", name) from exc

    def check(self):
        # type: () -> None
        if self.flag in "rw" and not self.exists(self.join("store")):
            raise FileNotFoundError(errno.ENOENT, "No such cache (open it with flag 'c' to "
                                    "create it)", self.path)

    def create(self):
        # type: () -> None
        pass

    def read(self, name, limit=None):
        # type: (str, Optional[int]) -> Optional[memoryview]
        try:
            record = self.mapping[name]
        except KeyError:
            return None
        except Exception as exc:
            raise self._failed(exc, "read", name) from exc
        if limit is not None and len(record) > limit:
            return None
        return _unframed(bytes(record))

    def publish(self, name, chunks, keep=None):
        # type: (str, List[Any], Optional[Callable[[str], bool]]) -> bool
        """As _publish(): True if this call wrote the record at name, False if one was there
        and keep(name) says to keep it (without keep, the first always stays)."""
        record = _frame_head(chunks) + b"".join(bytes(chunk) for chunk in chunks)
        fs, root = getattr(self.mapping, "fs", None), getattr(self.mapping, "root", None)
        try:
            if fs is not None and callable(getattr(fs, "open", None)) and \
                    isinstance(root, str):
                target = root.rstrip("/") + "/" + name
                try:
                    try:
                        with fs.open(target, "xb") as file:
                            file.write(record)
                    except FileNotFoundError:  # a local filesystem's folder: made once
                        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                        with fs.open(target, "xb") as file:
                            file.write(record)
                    return True
                except FileExistsError:
                    if keep is None or keep(name):
                        return False
                except (ValueError, NotImplementedError, TypeError):
                    pass                      # no "xb" there: as any mapping, below
            elif self.read(name) is not None and (keep is None or keep(name)):
                return False                  # (a mapping of no such mode: not atomic)
            self.mapping[name] = record
            return True
        except (FileExistsError, OSError):
            raise
        except Exception as exc:
            raise self._failed(exc, "write", name) from exc

    def remove(self, name):
        # type: (str) -> None
        try:
            del self.mapping[name]
        except KeyError:
            pass
        except Exception as exc:
            raise self._failed(exc, "remove", name) from exc

    def walk(self, part):
        # type: (str) -> Iterator[str]
        return (name for name in self.listing(self.join(part))
                if _record_name(part, name.rsplit("/", 2)[-2], name.rsplit("/", 1)[-1]))

    def listing(self, directory):
        # type: (str) -> List[str]
        """The names of the records under directory (a prefix of keys), sorted."""
        start = directory + "/"
        try:
            return sorted(name for name in self.mapping if name.startswith(start)
                          and not name.rsplit("/", 1)[-1].startswith("."))
        except Exception as exc:
            raise self._failed(exc, "list", directory) from exc

    def sweep(self):
        # type: () -> None
        pass                                  # no temporary records in a mapping

    def usage(self):
        # type: () -> int
        try:
            return sum(len(self.mapping[name]) for name in self.listing(self.prefix)) \
                if self.prefix else sum(len(value) for value in self.mapping.values())
        except Exception as exc:
            raise self._failed(exc, "measure", self.path) from exc


_FILES_FORMAT = 1
_RAW_META = ("stored", "seconds", "version", "args", "owner")   # of a result, as merged
_FILES_MARKER = b'{"format": 1, "persist": "files"}'
_STORE_NAMES = ("store", "info", "results", "failures")     # what a store of files holds
_READ_ATTEMPTS = 5          # a record replaced this many times while it is read reads as none
_GONE_ERRNOS = (errno.ENOENT, getattr(errno, "ESTALE", errno.ENOENT))
_SMALL_RECORD = 16 << 20   # bytes: larger than any marker, info or failure record persist writes
_ABANDONED_TEMP = 24 * 3600.0   # seconds: a temporary file this old is no writer's any more
# a record is opened without following a link, and without waiting: a FIFO planted where
# a record belongs would block open() for good (it reads as no record: not a regular file)
_O_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0) | \
    getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def _result_parts(payload):
    # type: (memoryview) -> Optional[Tuple[Dict[str, Any], memoryview]]
    """(header, pickle) of a result record's payload, or None if it is not one."""
    if len(payload) < 4:
        return None
    length = int.from_bytes(payload[:4], "big")
    try:
        header = _json().loads(bytes(payload[4:4 + length]).decode("utf-8"))
    except ValueError:
        return None
    # whole, yet not put()'s (made by hand, or by another program): no record, rather than
    # a crash where its fields are added up, compared or shown
    if not isinstance(header, dict) or not _number(header.get("stored")) or \
            not -float("inf") < header["stored"] < float("inf") or not (
                header.get("seconds") is None or _number(header["seconds"])) or not all(
                header.get(field) is None or isinstance(header[field], str)
                for field in ("version", "args", "owner", "key")):
        return None
    return header, payload[4 + length:]


def _persists_meta(meta):
    # type: (Dict[str, Any]) -> bool
    """Whether meta (of a result: stored, seconds, version, args, owner) has the types
    persist writes: a finite stored time, seconds a number or None, the rest text or None."""
    stored, seconds = meta.get("stored"), meta.get("seconds")  # type: Any, Any
    return _number(stored) and -float("inf") < stored < float("inf") and \
        (seconds is None or _number(seconds)) and all(
            meta.get(field) is None or isinstance(meta[field], str)
            for field in ("version", "args", "owner"))


def _persists_span(span):
    # type: (Dict[str, Any]) -> bool
    """Whether span (a failure record's fields, _SPAN_FIELDS) has the types persist writes."""
    count, first = span.get("count"), span.get("first")  # type: Any, Any
    return _persists_meta({"stored": span.get("last"), "seconds": span.get("seconds"),
                           "version": span.get("version"), "args": span.get("args"),
                           "owner": span.get("owner")}) and \
        _number(first) and -float("inf") < first < float("inf") and \
        all(isinstance(span.get(field), str) for field in ("type", "message", "traceback")) \
        and isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 1 << 62 \
        and (span.get("call") is None or isinstance(span["call"], (str, bytes, memoryview)))


def _is_hex(text):
    # type: (str) -> bool
    """Whether text is bytes in hex, as bytes.fromhex() takes them."""
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _number(value):
    # type: (object) -> bool
    """Whether value (read from JSON) is a number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_name(part, bucket, name):
    # type: (str, str, str) -> bool
    """Whether name, in results/bucket or failures/bucket, is a record's as persist names
    them: a key's 64 hex digits (a result), then .TIME.HOST-PID-RANDOM (a failure). Other
    files there (a copy, "ab12... (1)", an editor's backup, a temporary file) are no
    record: not counted, loaded, listed or removed."""
    key = name if part == "results" else name.split(".", 1)[0]
    return _hex_name(key, 64) and key.startswith(bucket) and \
        (part == "results" or name.count(".") >= 2)


def _stored_of(row):
    # type: (Tuple[Any, ...]) -> float
    """An entries() row's stored time, to sort by."""
    return row[2]  # type: ignore[no-any-return]


def _key_of_record(path, header):
    # type: (str, Dict[str, Any]) -> bytes
    """The key of the result file at path: a shelf's, kept in its header, else memoize's,
    its name."""
    shelf_key = header.get("key")
    if isinstance(shelf_key, str):
        return shelf_key.encode("utf-8", "surrogateescape")
    return bytes.fromhex(os.path.basename(path))


def _left_by_dead_process(name):
    # type: (str) -> bool
    """Whether the temporary file name (.NAME.HOST-PID-RANDOM.tmp: see _publish) is this
    machine's, made by a process that is gone."""
    # parsed from the right, the host whole: "node" must not take node-12's files for its
    # own (.NAME.node-12-PID-RANDOM.tmp), nor "node" those of "x.node"
    parts = name[:-len(".tmp")].rsplit("-", 2)
    pid = parts[1] if len(parts) == 3 else ""
    if parts[0].rpartition(".")[2] != _HOST or not pid.isdigit() or os.name == "nt":
        return False                             # (os.kill() there would end the process)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _listdir(directory):
    # type: (str) -> List[str]
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _json():
    # type: () -> Any
    """The json module, imported on first use: only the files store needs it."""
    import json
    return json


def _publish(path, payload, keep=None, sync=True):
    # type: (str, Union[bytes, List[Any]], Optional[Callable[[str], bool]], bool) -> bool
    """Write payload (bytes, or a list of bytes-like parts) to path as one framed record (see
    _framed), whole or not at all, where several machines may write it at once and no lock
    holds (NFS, sshfs): the record goes to a temporary file of this process's own in the same
    directory (host, pid and a random part in its name), is fsynced, and is published with
    link(), which creates path only if it is not there. Returns True if this call published
    it, False if path was there already (another writer's record of the same key) and
    keep(path) says to keep that one (without keep, the first always stays); otherwise it is
    replaced (os.replace(): readers see the old record or the new). Where link() is refused
    (EPERM, ENOTSUP, EXDEV: a filesystem without hard links), os.replace() publishes it
    instead, unless path appeared meanwhile and is kept. sync=False: no fsync (see
    _Directory)."""
    chunks = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    directory, name = os.path.split(path)
    temp = os.path.join(directory, ".%s.%s-%d-%s.tmp" % (
        name, _HOST, os.getpid(), os.urandom(6).hex()))
    fd = os.open(temp, _O_TEMP, 0o666)
    try:
        try:
            for chunk in [_frame_head(chunks)] + chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            if sync:
                _fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            if keep is None or keep(path):
                return False
        except OSError:
            # a link() that failed after it made the name (NFS retries), or another
            # writer's record
            if os.path.lexists(path) and (keep is None or keep(path)):
                return False
        os.replace(temp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _framed(payload):
    # type: (bytes) -> bytes
    """payload as a record: _RECORD_MAGIC, its length (8 bytes, big-endian), its SHA-256,
    then payload itself. A record cut short, or torn, fails _unframed's checks: a miss."""
    return _frame_head([payload]) + payload


def _frame_head(chunks):
    # type: (List[Any]) -> bytes
    """What _framed() puts before the payload whose parts are chunks."""
    digest, length = _sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        length += memoryview(chunk).nbytes
    return _RECORD_MAGIC + length.to_bytes(8, "big") + digest.digest()


def _unframed(record):
    # type: (bytes) -> Optional[memoryview]
    """The payload of a record that _framed made (a view of record: no copy), or None for
    anything else: cut short at any byte, torn, another format, a file of someone else's."""
    head = len(_RECORD_MAGIC) + 8 + 32
    if len(record) < head or not record.startswith(_RECORD_MAGIC):
        return None
    length = int.from_bytes(record[len(_RECORD_MAGIC):len(_RECORD_MAGIC) + 8], "big")
    payload = memoryview(record)[head:]
    if len(payload) != length or _sha256(payload).digest() != record[head - 32:head]:
        return None
    return payload


_RECORD_MAGIC = b"persist\x01"
# this machine, in the names of temporary files other machines may see (see _publish): no
# "." in it, so that the name's last "." starts it, and no host's name ends another's
_HOST = "".join(char if char.isalnum() or char in "-_" else "_" for char in (
    os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")))[:64] \
    or "host"


def _shared_filesystem(directory, mountinfo="/proc/self/mountinfo"):
    # type: (str, str) -> Optional[str]
    """The type of the filesystem that holds directory when several machines may share it
    (NFS, SMB, Lustre, GPFS, BeeGFS, CephFS, GlusterFS, 9p, network FUSE mounts such as
    sshfs): there SQLite's locks do not hold. None for a local one, or one not known."""
    kind, _ = _filesystem(directory, mountinfo)
    if kind is None:
        return None
    name = kind.lower()
    if name in _SHARED_TYPES or name.startswith("fuse.") and name[5:] in _SHARED_FUSE:
        return kind
    if name.startswith("0x") and int(name, 16) in _SHARED_MAGIC:
        return kind
    return None


def _filesystem(directory, mountinfo="/proc/self/mountinfo"):
    # type: (str, str) -> Tuple[Optional[str], Optional[str]]
    """(type, source) of the filesystem that holds directory, as the kernel names them:
    ("nfs4", "server:/export"), ("fuse.sshfs", "user@host:/path"), ("ext4", "/dev/sda1"); a
    type of "0x..." where only statfs(2)'s number is known; (None, None) where neither says.
    Linux: the mount in mountinfo with the longest mount point that holds directory (the last
    of those on one point: it covers the others), else statfs. Never a lock, never a write:
    on a hung NFS server both can wait for ever. Cached per directory (_FILESYSTEMS)."""
    directory = os.path.realpath(directory)
    known = _FILESYSTEMS.get((directory, mountinfo))
    if known is not None:
        return known
    found: "Tuple[Optional[str], Optional[str]]" = (None, None)
    try:
        with io.open(mountinfo, "rb") as file:      # (open is persist.open here)
            mounts = _mounts(file.read())
    except OSError:                   # not Linux, or no /proc
        mounts = []
    best = -1
    for point, kind, source in mounts:
        if _holds(point, directory) and len(point) >= best:
            best, found = len(point), (kind, source)
    if found == (None, None):
        magic = _statfs_type(directory)
        if magic is not None:
            found = ("0x%x" % magic, None)
        elif sys.platform == "darwin":
            found = _macos_filesystem(directory)
        elif os.name == "nt":
            found = _windows_filesystem(directory)
    _FILESYSTEMS[(directory, mountinfo)] = found
    return found


def _mounts(text):
    # type: (bytes) -> List[Tuple[str, str, str]]
    """(mount point, type, source) of each line of a mountinfo file, in its order (see
    proc(5): "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"): optional
    fields end at a lone "-"; a space, tab, newline or backslash in a field is written as
    an octal escape (\\040)."""
    mounts = []
    for line in text.decode("utf-8", "surrogateescape").splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            point, kind, source = fields[4], fields[dash + 1], fields[dash + 2]
        except (ValueError, IndexError):  # a line of another format: not a mount
            continue
        mounts.append((_unescaped(point), _unescaped(kind), _unescaped(source)))
    return mounts


def _unescaped(field):
    # type: (str) -> str
    if "\\" not in field:
        return field
    first, *rest = field.split("\\")      # (a backslash itself is \\134)
    parts = [first]
    for part in rest:
        code = part[:3]
        if len(code) == 3 and all(digit in "01234567" for digit in code):
            parts.append(chr(int(code, 8)) + part[3:])
        else:
            parts.append("\\" + part)
    return "".join(parts)


def _holds(point, directory):
    # type: (str, str) -> bool
    """Whether the mount point point holds directory (both absolute, without a trailing /)."""
    return directory == point or directory.startswith(point.rstrip("/") + "/")


def _statfs_type(directory):
    # type: (str) -> Optional[int]
    """Linux's statfs(2) f_type for directory (NFS_SUPER_MAGIC and the like), through ctypes;
    None elsewhere, or where it fails."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        buffer = ctypes.create_string_buffer(256)      # struct statfs is 120 bytes on x86_64
        if libc.statfs(os.fsencode(directory), buffer) != 0:
            return None
        # f_type, the first field, is a long (__fsword_t) on every Linux ABI but s390x
        return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF
    except Exception:                 # no ctypes (some builds), no libc: not known
        return None


def _macos_filesystem(directory):
    # type: (str) -> Tuple[Optional[str], Optional[str]]
    """(f_fstypename, f_mntfromname) of macOS's statfs(2) for directory, through ctypes:
    "nfs", "smbfs", "afpfs", "webdav", "apfs"... (None, None) where it fails."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        try:               # the struct with 64-bit inodes (x86_64's default statfs is older)
            statfs = libc["statfs$INODE64"]
        except AttributeError:
            statfs = libc.statfs               # arm64: there is only that one
        buffer = ctypes.create_string_buffer(2168)   # sizeof(struct statfs): 2168 bytes
        if statfs(os.fsencode(directory), buffer) != 0:
            return None, None
        # f_fstypename[16] at 72, f_mntonname[1024] at 88, f_mntfromname[1024] at 1112
        raw = buffer.raw

        def text(start, size):
            # type: (int, int) -> str
            return raw[start:start + size].split(b"\0", 1)[0].decode("utf-8", "replace")
        return text(72, 16) or None, text(1112, 1024) or None
    except Exception:               # no ctypes, another layout: not known
        return None, None


def _windows_filesystem(directory):
    # type: (str) -> Tuple[Optional[str], Optional[str]]
    """("remote", root) where directory is on a network share (a UNC path, or a drive
    letter mapped to one: GetDriveTypeW's DRIVE_REMOTE), else ("local", root)."""
    drive = os.path.splitdrive(os.path.abspath(directory))[0]
    if drive.startswith(("\\\\", "//")):        # \\server\share
        return "remote", drive
    try:
        import ctypes
        kind = ctypes.windll.kernel32.GetDriveTypeW(drive + "\\")  # type: ignore[attr-defined]
    except Exception:
        return None, None
    return ("remote" if kind == 4 else "local"), drive      # 4: DRIVE_REMOTE


_FILESYSTEMS = {}   # type: Dict[Tuple[str, str], Tuple[Optional[str], Optional[str]]]
_SHARED_TYPES = frozenset([
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "9p", "afs", "ocfs2", "gfs2", "orangefs", "pvfs2", "davfs", "virtiofs",
    "afpfs", "webdav", "remote"])      # macOS's, and a Windows network drive (see above)
_SHARED_FUSE = frozenset([    # the part after "fuse.": FUSE filesystems whose data is remote
    "sshfs", "glusterfs", "ceph-fuse", "ceph", "s3fs", "gcsfuse", "rclone", "juicefs",
    "beegfs", "goofys", "blobfuse", "blobfuse2", "davfs2", "lizardfs", "moosefs", "mfs",
    "gvfsd-fuse", "cvmfs2", "lustre"])
# statfs(2)'s f_type of the same, from the kernel's include/uapi/linux/magic.h and the
# filesystems' own sources, where mountinfo cannot be read
_SHARED_MAGIC = frozenset([
    0x6969,        # NFS_SUPER_MAGIC
    0x517B,        # SMB_SUPER_MAGIC
    0xFF534D42,    # CIFS_SUPER_MAGIC
    0xFE534D42,    # SMB2_SUPER_MAGIC
    0x0BD00BD0,    # Lustre's LL_SUPER_MAGIC
    0x47504653,    # GPFS_SUPER_MAGIC
    0x19830326,    # BeeGFS
    0x00C36400,    # CEPH_SUPER_MAGIC
    0x01021997,    # V9FS_MAGIC
    0x5346414F,    # AFS_FS_MAGIC
    0x65735546])   # FUSE_SUPER_MAGIC: which FUSE filesystem is not told, so taken as shared


# == file helpers =================================================================================
# fsync of a file (F_FULLFSYNC on macOS) and of a directory (where the platform allows it);
# the size of a file.

def _fsync(fd):
    # type: (int) -> None
    """Flush fd to stable storage; on macOS with F_FULLFSYNC, out of the drive's cache too."""
    if _FULLFSYNC is not None:
        try:
            _fcntl.fcntl(fd, _FULLFSYNC)
            return
        except OSError:           # not every filesystem has it (SMB, some FUSE): fsync then
            pass
    os.fsync(fd)


def _fsync_dir(directory):
    # type: (Union[str, os.PathLike[str]]) -> None
    """Make a rename or unlink in directory durable, where the platform allows it."""
    if not _CAN_FSYNC_DIR:
        return
    # best effort: some network and FUSE filesystems refuse to fsync a directory (EINVAL)
    with contextlib.suppress(OSError):
        opened: "List[int]" = []   # by list.extend(), as in _create_temp(): no Ctrl-C leaks it
        try:
            opened.extend(builtins.map(os.open, (directory,), (os.O_RDONLY | os.O_DIRECTORY,)))
            _fsync(opened[0])
        finally:
            if opened:
                os.close(opened[0])


def _size(path):
    # type: (str) -> int
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# == the command line =============================================================================
# python -m persist ls|show|clear|prune|failures|merge|status (or python persist.py ...): _main
# parses the arguments and calls _cli_<command>; each finds caches by name under a directory.
# merge copies entries as they are stored (the stores' raw_entries, put_raw, failure_spans and
# put_failure), one write each.

def _main(argv=None):
    # type: (Optional[Sequence[str]]) -> int
    """python persist.py COMMAND: look after caches and done_dir() stages."""
    import argparse
    parser = argparse.ArgumentParser(prog="persist", description="Look after persist's caches "
                                     "and done_dir() stages.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    ls = commands.add_parser("ls", help="list the caches under a directory")
    ls.add_argument("dir", nargs="?", help="default: $PERSIST_DIR, else ./.persist")
    ls.set_defaults(run=_cli_ls)
    show = commands.add_parser("show", help="list a cache's entries: age, size, arguments")
    show.add_argument("--limit", type=_limit, metavar="N", help="show the first N entries "
                      "(default: 50 on a terminal, else all; 0: all)")
    clear = commands.add_parser("clear", help="remove every entry of a cache")
    prune = commands.add_parser("prune", help="remove a cache's old entries")
    failures = commands.add_parser("failures", help="list a cache's failed calls, grouped by "
                                   "exception")
    failures.add_argument("--traceback", action="store_true", help="show each failed call "
                          "with its traceback")
    failures.add_argument("--limit", type=_limit, default=5, metavar="N", help="calls shown "
                          "per exception, with --traceback too (default 5; 0: all)")
    for command, run in ((show, _cli_show), (clear, _cli_clear), (prune, _cli_prune),
                         (failures, _cli_failures)):
        command.add_argument("cache", help="a cache file, or a function's name or a path as "
                             "'ls' shows them")
        command.add_argument("--dir", help="where to look for it (default: $PERSIST_DIR, "
                             "else ./.persist)")
        command.set_defaults(run=run)
    for command in (clear, prune):
        command.add_argument("--dry-run", action="store_true", help="say how many entries "
                             "and bytes would go, and change nothing")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--expired", action="store_true", help="older than the function's "
                       "expire=")
    which.add_argument("--stale", action="store_true", help="stored by another version= than "
                       "the latest")
    which.add_argument("--older-than", type=_duration, metavar="AGE",
                       help="older than AGE: 90s, 15m, 12h, 7d or 2w")
    merge = commands.add_parser(
        "merge", help="copy results and failed calls between caches, the newest result "
        "winning", description="Copy the results and failure records of "
        "SOURCE caches (SQLite or stores of files) into DEST, either kind: the newest result "
        "of each call wins, results are copied as stored (never loaded), failures add to "
        "DEST's ledger. A SOURCE that is a directory of caches merges each into the cache of "
        "its name in DEST, a directory, of the kind memoize uses there. A missing DEST is "
        "made: a store of files if its name ends in .files, SQLite if in .db. Killed, DEST "
        "holds whole entries; run it again to finish.")
    merge.add_argument("sources", nargs="+", metavar="SOURCE", help="a cache, a function's "
                       "name as 'ls' shows it, or a directory of caches")
    merge.add_argument("dest", metavar="DEST", help="the cache to merge into (made if "
                       "missing), or a directory of caches")
    merge.add_argument("--dir", help="where to look for caches given by name (default: "
                       "$PERSIST_DIR, else ./.persist)")
    merge.add_argument("--dry-run", action="store_true", help="say what would be copied and "
                       "skipped, and write nothing")
    merge.add_argument("--force", action="store_true", help="merge caches of functions of "
                       "different names (one renamed): refused otherwise")
    merge.set_defaults(run=_cli_merge)
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
    except (OSError, sqlite3.Error) as exc:
        print("persist: error: %s" % _error_text(exc), file=sys.stderr)
        return 1


_AGES = 1e6 * 86400          # seconds: a million days, past which a stamp has no age


def _when(stamp):
    # type: (Optional[float]) -> str
    if not stamp:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))
    except (OverflowError, ValueError, OSError):  # a stamp someone wrote: years past 9999
        return "(not a date)"


def _bytes(size):  # type: ignore[return]  # the "GB" turn returns
    # type: (float) -> str
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (size, unit)
        size /= 1024


def _age(seconds):
    # type: (float) -> str
    if not -_AGES < seconds < _AGES:      # a stamp someone wrote: no age to speak of
        return "?"
    if seconds <= -1:                     # stored ahead of this clock: say so, as -2h
        return "-" + _age(-seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return "%d%s" % (seconds // length, unit)
    return "%ds" % seconds


def _duration(text):
    # type: (str) -> float
    """'90', '90s', '15m', '12h', '7d' or '2w' as seconds, positive and finite; argparse calls
    it, and shows the message of an ArgumentTypeError (of a ValueError, only the type's name)."""
    import argparse
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError("not an age: %r (try 90s, 15m, 12h, 7d or 2w)"
                                         % text) from None
    if not 0 < seconds < float("inf"):     # -1d would select every entry; nan compares false
        raise argparse.ArgumentTypeError("an age must be positive and finite, not %r (try "
                                         "90s, 15m, 12h, 7d or 2w)" % text)
    return seconds


def _limit(text):
    # type: (str) -> int
    """show --limit: a count of entries, 0 for all of them."""
    import argparse
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError("not a number of entries: %r (0 shows all)" % text)
    return count


def _default_cache_dir():
    # type: () -> str
    return _env_dir() or ".persist"


def _where_looked(directory, given, option):
    # type: (str, Optional[str], str) -> str
    """Where a command looked for caches, and how to point it elsewhere: for an error that
    found none. option: how the command takes a directory ('--dir DIR' or 'DIR')."""
    if given:
        whence = "as given"
    elif os.environ.get("PERSIST_DIR"):
        whence = "from $PERSIST_DIR"
    else:       # memoize's default is not the current directory's: say where it is
        whence = ("./.persist, the default; memoize keeps a function's caches in .persist "
                  "beside the file that defines it")
    return ("looked in %s (%s); point to another directory with %s or $PERSIST_DIR"
            % (os.path.abspath(directory), whence, option))


def _caches_under(directory):
    # type: (str) -> Iterator[str]
    """The .db files under directory, as os.walk finds them, without the value directories,
    and the .files directories (stores of files), without what they hold. A directory it may
    not read raises: listing nothing there would say there is nothing."""
    def unreadable(exc):
        # type: (OSError) -> None
        raise exc

    for root, dirs, files in os.walk(directory, onerror=unreadable):
        stores = [name for name in dirs if _is_file_store(os.path.join(root, name))]
        dirs[:] = sorted(d for d in dirs if not d.endswith(".values") and d not in stores)
        for name in sorted(files + stores):
            if name.endswith(".db") or name in stores:
                yield os.path.join(root, name)


def _is_file_store(path):
    # type: (str) -> bool
    """Whether path is the directory of a store of files (NAME.files, or a shelf's): it
    holds the marker file 'store' (_FileStore checks what the marker says)."""
    return path.endswith(".files") and os.path.isdir(path) or \
        os.path.isfile(os.path.join(path, "store"))


def _find_cache(name, directory=None):
    # type: (str, Optional[str]) -> str
    """The file of a cache given on the command line: a path, as given or as 'persist ls'
    printed it (relative to the cache directory), or a function's name as 'ls' lists it."""
    given, directory = directory, directory or _default_cache_dir()
    for path in (name, os.path.join(directory, name)):
        if os.path.isfile(path) or _is_file_store(path):
            return path
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "a directory, not a cache (list its caches "
                                    "with 'persist ls %s')" % path, path)
        if os.path.exists(path):          # a FIFO, socket or device 'ls' lists: the store
            return path                   # says what it is, as it does to 'ls'
        if os.path.islink(path):          # dangling: what it names is gone
            raise FileNotFoundError(errno.ENOENT, "a symbolic link to %s, which does not "
                                    "exist" % os.readlink(path), path)
    if os.path.isdir(directory):          # a function's name: its file, wherever below
        wanted = _file_name(name)
        found = [path for path in _caches_under(directory)
                 if os.path.basename(path) in (wanted, wanted[:-len(".db")] + ".files")]
        if len(found) == 1:
            return found[0]
        if found:
            raise PersistError(errno.EINVAL, "%d caches of that name under %s (%s); give one "
                               "of these paths" % (len(found), directory, ", ".join(
                                   os.path.relpath(path, directory) for path in found)), name,
                               reason=PersistError.AMBIGUOUS)
    raise FileNotFoundError(errno.ENOENT, "No such cache file, nor a function's cache of that "
                            "name: %s, or give a .db file's path ('persist ls' lists them)"
                            % _where_looked(directory, given, "--dir DIR"), name)


def _open_cache(name, flag="w", directory=None):
    # type: (str, str, Optional[str]) -> _AnyStore
    """A cache by path, or by function name in the cache directory (--dir)."""
    path = _find_cache(name, directory)
    try:
        return _open_store(path, flag)
    except PersistError:
        kind = _shelve_kind(path)
        if kind is None:
            raise
    # a file of the user's: say what it is and how persist takes it, never to delete it
    raise PersistError(errno.EINVAL, "a %s shelve file, not a persist cache; persist.open(%r) "
                       "copies its entries into one, keeping it" % (kind, path), path,
                       reason=PersistError.SHELVE)


# What 'persist ls' calls a file by the reason of its PersistError, before it looks at the
# file itself (a shelve file, a damaged cache or another file)
_LISTED_AS = {
    PersistError.NEWER_FORMAT: "newer format", PersistError.OLDER_FORMAT: "older format",
    PersistError.EMPTY: "empty file", PersistError.SYMLINK: "symlink",
    PersistError.NOT_A_FILE: "not a file",
}
_LISTED_AS.update(dict.fromkeys(_UNTRUSTED, "unsafe"))


def _problem(path, exc):
    # type: (str, OSError) -> str
    """Why the .db file at path is not a cache persist can list, in a word or two."""
    reason = (exc.reason or "") if isinstance(exc, PersistError) else ""
    if os.path.islink(path) and not os.path.exists(path):
        return "dangling link"
    if os.path.isdir(path) and not isinstance(exc, PermissionError):     # a store of files
        return _LISTED_AS.get(reason, "not a cache")
    if isinstance(exc, PermissionError) or not os.access(path, os.R_OK):
        return "unreadable"
    if reason in _LISTED_AS:
        return _LISTED_AS[reason]
    if not reason and exc.errno == errno.EBUSY:     # another process holds it (_sqlite_error)
        return "locked"
    if _shelve_kind(path) is not None:
        return "shelve file"
    if reason == PersistError.FOREIGN_SQLITE:
        return "foreign SQLite"
    try:
        with io.open(path, "rb") as file:
            sqlite = file.read(16) == b"SQLite format 3\0"
    except OSError:
        return "unreadable"
    return "corrupt" if sqlite else "not SQLite"


def _cli_ls(options):
    # type: (argparse.Namespace) -> None
    directory = options.dir or _default_cache_dir()
    paths: "Iterable[str]"
    if os.path.exists(directory) and not os.path.isdir(directory) or \
            _is_file_store(directory):
        # one cache, as 'show' takes it, else its error, as 'show' gives it; a store of files
        # too (NAME.files/, as a shell completes it: walked as a directory of caches, it
        # listed none)
        directory = directory.rstrip("/" + os.sep) or directory
        _open_store(directory, "r").close()
        paths, directory = [directory], os.path.dirname(directory) or os.curdir
    elif os.path.isdir(directory):
        paths = list(_caches_under(directory))     # one that it may not read: an error
    else:
        raise FileNotFoundError(errno.ENOENT, "No such directory: %s" % _where_looked(
            directory, options.dir, "'persist ls DIR'"), directory)
    row = "%-32s %8s %10s %7s %8s  %-16s  %-16s  %-18s  %s"
    print(row % ("CACHE", "ENTRIES", "SIZE", "FAILED", "TOOK", "OLDEST", "NEWEST", "STALE",
                 "WHERE"))
    for path in paths:
        # where it is, as 'show --dir DIR' takes it: the same name may be in many folders
        # (a name anyone who could write there chose: rendered as labels are)
        where = _one_line(os.path.relpath(path, directory))
        try:
            with contextlib.closing(_open_store(path, "r")) as store:
                # TOOK: what computing them took
                count, oldest, newest, stale, stale_size, took, failed = store.summary()
                label = _one_line(store.info().get("function") or
                                  os.path.splitext(os.path.basename(path))[0])
                notes = ["%d stale (%s)" % (stale, _bytes(stale_size))] if stale else []
                closures = store.closures()
                if closures > 1:              # make(2), make(3): not stale, each its own
                    notes.append("%d closures" % closures)
                print(row % (label, count, _bytes(store.disk_usage()), failed, _took(took),
                             _when(oldest), _when(newest), ", ".join(notes), where))
        except OSError as exc:            # what makes memoized calls raise: listed, marked
            print(row % ("(%s)" % _problem(path, exc), "-", _bytes(_size(path)), "-", "-",
                         "-", "-", "", where))


def _one_line(text):
    # type: (str) -> str
    """text on one line, however many lines it spans."""
    if not text.isprintable():
        text = " ".join(text.split())
        if not text.isprintable():
            text = repr(text)[1:-1]
    return text


def _cli_show(options):
    # type: (argparse.Namespace) -> None
    limit = options.limit
    if limit is None:                     # a terminal shows a screenful; a pipe gets all
        limit = 50 if sys.stdout.isatty() else 0
    with contextlib.closing(_open_cache(options.cache, "r", options.dir)) as store:
        entries = store.entries(limit or None)
        total = len(store) if limit and len(entries) == limit else len(entries)
    now = time.time()
    print("%6s %10s  %s" % ("AGE", "SIZE", "ARGUMENTS (or KEY)"))
    for key, args, stored, size, seconds, version in entries:
        if args is None:              # a shelf's key, else memoize's digest
            try:
                args = key.decode("utf-8")
            except UnicodeDecodeError:
                args = key.hex()
        else:                         # stored by an older persist, with addresses in it
            args = _without_addresses(args)
        print("%6s %10s  %s" % (_age(now - stored), _bytes(size), _one_line(args)))
    if limit and total > limit:
        print("... %d more, of %d entries (--limit 0 shows all)" % (total - limit, total))


def _cli_clear(options):
    # type: (argparse.Namespace) -> None
    if options.dry_run:
        with contextlib.closing(_open_cache(options.cache, "r", options.dir)) as store:
            count, size, _ = store.prune(before=float("inf"), dry_run=True)
            print("would remove %s (%s)%s from %s" % (
                _entries(count), _bytes(size), _and_failures(store.tally()[2]),
                _one_line(store.path)))
        return
    with contextlib.closing(_open_cache(options.cache, "w", options.dir)) as store:
        before = store.disk_usage()
        failed = store.tally()[2]         # clear() takes them too, in its one transaction
        count = store.clear()
        print("removed %s%s from %s; %s given back" % (
            _entries(count), _and_failures(failed), _one_line(store.path),
            _bytes(max(0, before - store.disk_usage()))))


def _entries(count):
    # type: (int) -> str
    return "%d entr%s" % (count, "y" if count == 1 else "ies")


def _and_failures(count):
    # type: (int) -> str
    return " and %d failure record%s" % (count, "" if count == 1 else "s") if count else ""


# (ignore[return]: the end returns None, which _main() takes as exit status 0)
def _cli_prune(options):  # type: ignore[return]
    # type: (argparse.Namespace) -> Optional[int]
    flag = "r" if options.dry_run else "w"
    with contextlib.closing(_open_cache(options.cache, flag, options.dir)) as store:
        info = store.info()
        which: "_Kwargs"           # prune()'s keyword arguments
        if options.stale:
            if "version" not in info:
                print("%s has no version=; nothing is stale" % _one_line(store.path))
                return 0
            # other versions, and other code of the nested helpers it calls than the
            # latest run's; not other values it carried (make(3) beside make(2))
            which = {"version": info["version"], "codes": store.stale_codes()}
        else:
            age = options.older_than
            if age is None:
                expire = info.get("expire", "None")
                if expire == "None":
                    print("%s has no expire=; nothing has expired" % _one_line(store.path))
                    return 0
                age = float(expire)
            now = time.time()     # too far either way, as _expired() tells
            which = {"before": now - age, "after": now + age}
        if options.dry_run:
            count, size, failed = store.prune(dry_run=True, **which)
            print("would remove %s (%s)%s from %s" % (_entries(count), _bytes(size),
                                                       _and_failures(failed),
                                                       _one_line(store.path)))
            return 0
        before = store.disk_usage()
        count, size, failed = store.prune(**which)
        print("removed %s (%s)%s from %s; %s given back" % (
            _entries(count), _bytes(size), _and_failures(failed), _one_line(store.path),
            _bytes(max(0, before - store.disk_usage()))))


# (ignore[return]: as _cli_prune())
def _cli_failures(options):  # type: ignore[return]
    # type: (argparse.Namespace) -> Optional[int]
    with contextlib.closing(_open_cache(options.cache, "r", options.dir)) as store:
        # Everything but the numbers is text a call's exception made, or anyone who could
        # write the file: rendered as 'show' and 'ls' render arguments and labels, so that no
        # escape sequence of it reaches the terminal
        rows = [(_one_line(_without_addresses(str(args))) if args is not None else None,
                 _one_line(str(kind)), _one_line(str(message)), count, first, last, seconds,
                 version, "\n".join(_one_line(line)
                                    for line in str(text).rstrip("\n").split("\n")),
                 _failed_call(call)[1] if not isinstance(call, bytes) else None)
                for args, kind, message, count, first, last, seconds, version, text, call
                in store.failures()]
        label = _one_line(store.info().get("function") or store.path)
        if not rows:
            print("%s: no failed calls on record" % label)
            return 0
        # (type, message): rows, the latest last
        groups: "OrderedDict[Tuple[str, str], List[Any]]" = collections.OrderedDict()
        for row in rows:
            groups.setdefault(row[1:3], []).append(row)
        print("%s: %d failed call%s, not succeeded since (%s)" % (
            label, len(rows), "" if len(rows) == 1 else "s", _one_line(store.path)))
        for (kind, message), group in sorted(groups.items(), key=lambda pair: -len(pair[1])):
            print("\n%s: %s" % (kind, message))
            times = sum(row[3] for row in group)
            print("  %s, %d failure%s in all, the last at %s" % (
                "1 call" if len(group) == 1 else "%d calls" % len(group), times,
                "" if times == 1 else "s", _when(group[-1][5])))
            shown = group[:options.limit or None]
            more = len(group) - len(shown)
            if options.traceback:
                for args, _, _, count, first, last, seconds, version, text, kept in shown:
                    print("\n  %s: failed %d time%s, first %s, last %s, after %s" % (
                        args or "?", count, "" if count == 1 else "s", _when(first),
                        _when(last), _took(seconds or 0.0)))
                    if kept is not None:     # f.failures() cannot give this call again
                        print("  (the call itself is not kept: %s)" % _one_line(kept))
                    print("    " + text.replace("\n", "\n    "))
                if more > 0:
                    print("\n  and %d more call%s (--limit 0 shows all)"
                          % (more, "" if more == 1 else "s"))
            else:
                print("  " + ", ".join(row[0] or "?" for row in shown) +
                      (", and %d more" % more if more > 0 else ""))
        if not options.traceback:
            print("\n(--traceback shows each call's traceback)")


def _cli_merge(options):
    # type: (argparse.Namespace) -> Optional[int]
    """Copy results and failure records from SOURCE caches into DEST: each pair is checked
    before anything is written; then each entry is one write of DEST's (a transaction, or
    one file published), so that a merge killed at any point leaves DEST a cache of whole
    entries, and the same merge again finishes it."""
    pairs = _merge_pairs(options.sources, options.dest, options.dir)
    _check_merge(pairs, options.force)
    pending = {}     # type: Dict[str, Dict[str, Any]]
    for source, dest, kind in pairs:
        try:
            counts = _merge_cache(source, dest, kind, options.dry_run,
                                  pending.setdefault(dest, {"results": {}, "failures": {}}))
        except KeyboardInterrupt:
            # Ctrl-C in a long merge: each entry is one write, whole or not there
            print("persist: interrupted, merging %s into %s: what was copied stays; the same "
                  "merge again finishes it" % (_one_line(source), _one_line(dest)),
                  file=sys.stderr)
            return 130                   # as a shell reports a SIGINT
        except OSError as exc:
            if exc.filename is not None or not exc.strerror:
                raise
            # a write of DEST's that failed (ENOSPC) names no file: say which cache
            raise OSError(exc.errno, "%s, merging %s into it; what was copied stays: the "
                          "same merge again finishes it" % (exc.strerror, source),
                          dest) from exc
        print("%s -> %s: %s; %s" % (_one_line(source), _one_line(dest), counts[0],
                                    counts[1]))
    return None


def _merge_pairs(sources, dest, directory):
    # type: (Sequence[str], str, Optional[str]) -> List[Tuple[str, str, str]]
    """(SOURCE cache, DEST cache, DEST's kind) of each cache to merge. A SOURCE that is a
    directory of caches (not a cache itself) gives each cache under it; into a DEST that is a
    directory (not a cache), or that is to be one, each goes to the cache of its name and
    folder there, of the kind memoize uses there (_store_kind: SQLite on a local disk, files
    on a shared filesystem, as $PERSIST_STORE says). Else DEST is one cache: where it is,
    that one, of either kind; else created at the path given, a store of files if its name
    ends in .files, SQLite if in .db."""
    # "new.files/", as a shell completes a directory's name: the store of files new.files
    if dest.rstrip("/" + os.sep).endswith(".files"):
        dest = dest.rstrip("/" + os.sep)
    found = []   # type: List[Tuple[str, Optional[str]]]
    for name in sources:
        # (a link to a directory of caches, given on the command line, is followed, as ls
        # and cp follow one: ~/caches -> /scratch/me/caches)
        if os.path.isdir(name) and not _is_file_store(name):
            if _within(dest, name):
                # each cache would merge into one beside it, of the other kind; and a merge
                # again would find those it made, and merge them deeper
                raise OSError(errno.EINVAL, "DEST is inside the SOURCE %s, a directory of "
                              "caches (or is it): merge into a directory outside it" % name,
                              dest)
            caches = list(_caches_under(name))
            if not caches:
                raise FileNotFoundError(errno.ENOENT, "a directory with no caches under it "
                                        "('persist ls %s' lists caches)" % name, name)
            found += [(path, os.path.relpath(path, name)) for path in caches]
        else:
            found.append((_find_cache(name, directory), None))
    if any(where is not None for _, where in found) or \
            os.path.isdir(dest) and not _is_file_store(dest):
        if os.path.lexists(dest) and not os.path.isdir(dest):
            raise NotADirectoryError(errno.ENOTDIR, "a SOURCE is a directory of caches, so "
                                     "DEST must be a directory (made if missing), not a "
                                     "cache", dest)
        pairs = []
        for path, where in found:
            where = where or os.path.basename(path)
            folder = os.path.join(dest, os.path.dirname(where))
            stem = os.path.basename(where)
            stem = stem[:-len(".files")] if stem.endswith(".files") else \
                os.path.splitext(stem)[0]
            try:
                kind = _store_kind(folder, None, "")
            except ValueError as exc:       # $PERSIST_STORE of no store: said in one line
                raise OSError(errno.EINVAL, str(exc), dest) from None
            pairs.append((path, os.path.join(folder, stem + (".files" if kind == "files"
                                                             else ".db")), kind))
        return pairs
    if not os.path.lexists(dest):
        try:
            dest = _find_cache(dest, directory)      # a name, as the other commands take it
        except FileNotFoundError:
            if not dest.endswith((".db", ".files")):
                raise FileNotFoundError(errno.ENOENT, "No such cache, nor a function's cache "
                                        "of that name; to make a new one, give a path that "
                                        "ends in .db (SQLite) or .files (a store of files), "
                                        "or a directory to merge into by name", dest) from None
    kind = "files" if dest.endswith(".files") and not os.path.lexists(dest) or \
        os.path.isdir(dest) and not os.path.islink(dest) else "sqlite"
    return [(path, dest, kind) for path, _ in found]


def _check_merge(pairs, force):
    # type: (List[Tuple[str, str, str]], bool) -> None
    """Refuse, before anything is written: a SOURCE that is not a cache (saying what it is,
    as 'ls' does), a DEST that is not one, DEST the same cache as a SOURCE, and the caches
    of different functions merged into one (their keys would mix: unless --force)."""
    functions = {}   # type: Dict[str, Dict[Optional[str], str]]
    for source, dest, kind in pairs:
        if os.path.lexists(dest) and _same_cache(source, dest):
            raise OSError(errno.EINVAL, "DEST is the same cache as the SOURCE %s: merge "
                          "into another cache" % source, dest)
        if _within(dest, source) or _within(source, dest) or \
                _within(dest, source + ".values"):
            # a store of files is a directory: a cache made inside it would lie among its
            # records, which no one lists (and 'ls' of it would find the cache inside); so
            # is a SQLite cache's directory of value files
            raise OSError(errno.EINVAL, "DEST is inside the SOURCE %s, a store of files (or "
                          "its value files), or it inside DEST: merge into a cache outside it"
                          % source, dest)
        for path, flag, what in ((source, "r", "SOURCE"), (dest, "r", "DEST")):
            if path == dest and (not os.path.lexists(dest) or _empty_dir(dest)):
                continue           # made by the merge (mkdir out.files: a store made there)
            try:
                with contextlib.closing(_open_store(path, flag, kind if path == dest
                                                    else None)) as store:
                    info = store.info()
                    if info or len(store):     # a new, empty DEST is any function's
                        functions.setdefault(dest, {}).setdefault(info.get("function"), path)
            except PersistError as exc:
                why = exc.reason           # as the store said it (NOT_A_CACHE, SHELVE...)
                problem = _problem(path, exc)
                if problem == "not a cache":     # (as 'ls' lists it) a directory, not a store
                    problem = "a directory without the marker file 'store' of a store of files"
                raise PersistError(errno.EINVAL, "%s is not a cache (%s); 'persist ls DIR' "
                                   "lists the caches of a directory" % (what, problem), path,
                                   reason=why) from None
    for dest, found in functions.items():
        if None in found and len(found) > 1:
            # a shelf's keys are its users' words, a function's the digests of calls: mixed,
            # the shelf would hold keys that are no words (its iteration fails), and the
            # function entries that no call finds. Not even --force. (A function's store
            # of files that lost its info file reads as a shelf too: a call records it.)
            named = ["%s in %s" % ("%s()" % name if name else "a shelf (persist.open; or a "
                                   "cache that records no function)", path)
                     for name, path in found.items()]
            raise PersistError(errno.EINVAL, "a shelf and a function's cache merged into "
                               "one: %s. A shelf merges only with shelves, a function's cache "
                               "with its function's (a function's cache that lost its record "
                               "of it: call the function once there)" % "; ".join(named), dest,
                               reason=PersistError.NAME_CLASH)
        if len(found) > 1 and not force:
            named = ["%s in %s" % ("%s()" % name if name else "a shelf (persist.open)",
                                   path) for name, path in found.items()]
            raise PersistError(errno.EINVAL, "caches of different functions merged into one: "
                               "%s. Merge each into a cache of its own function; if one "
                               "function is the other renamed (the same code, so the same "
                               "keys), --force merges them, keeping DEST's record of its "
                               "function" % "; ".join(named), dest,
                               reason=PersistError.NAME_CLASH)


def _empty_dir(path):
    # type: (str) -> bool
    """Whether path is a directory (not a link) with nothing in it."""
    try:
        return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    except OSError:
        return False


def _within(inner, outer):
    # type: (str, str) -> bool
    """Whether the path inner is outer, or under it, once links and '..' are resolved."""
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _same_cache(one, other):
    # type: (str, str) -> bool
    try:
        return os.path.samefile(one, other)
    except OSError:
        return os.path.realpath(one) == os.path.realpath(other)


def _merge_cache(source, dest, kind, dry_run, pending):
    # type: (str, str, str, bool, Dict[str, Any]) -> Tuple[str, str]
    """Merge the cache at source into the one at dest (made, of kind, if missing): each
    result newer than DEST's of its key, as it is (never loaded), then each failure record
    that no result of DEST's voids and none of its own covers. pending: what a dry run
    would have copied into dest (so that several SOURCEs count as they would merge).
    Returns what it copied and skipped, as words."""
    results, failures = [0, 0], [0, 0]      # copied, skipped
    lost = 0        # SOURCE's entries it cannot copy: a value file missing, a row not persist's
    with contextlib.closing(_open_store(source, "r")) as src:
        info = src.info()
        store = None        # type: Optional[_AnyStore]
        if not dry_run:
            if not os.path.lexists(dest):
                _make_cache_dir(os.path.dirname(os.path.abspath(dest)))
            store = _open_store(dest, "c", kind)
        elif os.path.lexists(dest) and not _empty_dir(dest):
            store = _open_store(dest, "r", kind)
        try:
            mine = store.info() if store is not None else {}
            if isinstance(store, _FileStore):      # a shelf's keys are named by their digest
                store.shelf = "function" not in (mine or info)
            if not mine and info and store is not None and not dry_run:
                store.set_info(info)               # DEST's own, where it has one
            for key, data, meta in src.raw_entries():
                if data is None:
                    lost += 1
                    continue
                if store is not None and not dry_run:     # it checks DEST's, as it writes
                    results[store.put_raw(key, data, meta) is False] += 1
                    continue
                stored = pending["results"].get(key)
                if stored is None and store is not None:
                    stored = (store.stored(key) or (None,))[0]
                if stored is not None and stored >= meta["stored"]:
                    results[1] += 1
                else:
                    pending["results"][key] = meta["stored"]
                    results[0] += 1
            # In time order: a store of files lists its failures (one a file) as its
            # directories do, and into SQLite's one record a key, one listed after a later
            # one would lie within the record and count as merged before (_covers).
            for key, span in sorted(src.failure_spans(),
                                    key=lambda pair: (pair[1]["first"], pair[1]["last"])):
                if store is not None and not dry_run:
                    failures[store.put_failure(key, span) is False] += 1
                    continue
                stored = pending["results"].get(key)
                if stored is None and store is not None:
                    stored = (store.stored(key) or (None,))[0]
                others = pending["failures"].setdefault(key, [])
                if store is not None:
                    others = others + [other for _, other in store.failure_spans(key)]
                if kind != "files" and others:
                    # SQLite keeps one record a key, which each merged span widens: it covers
                    # what lies between the first and last of them all
                    others = [{"first": min(other["first"] for other in others),
                               "last": max(other["last"] for other in others)}]
                if stored is not None and stored >= span["started"] or \
                        any(_covers(other, span) for other in others):
                    failures[1] += 1
                else:
                    pending["failures"][key].append(span)
                    failures[0] += 1
        finally:
            if store is not None:
                store.close()
    done = "to copy" if dry_run else "copied"
    left = "to skip" if dry_run else "skipped"
    return ("%d result%s %s, %d %s (not newer than DEST's)%s" % (
        results[0], "" if results[0] == 1 else "s", done, results[1], left,
        ", %d unreadable in SOURCE (a value file missing, or a row persist did not "
        "write): not copied" % lost if lost else ""),
        "%d failure record%s %s, %d %s%s" % (
            failures[0], "" if failures[0] == 1 else "s", done, failures[1], left,
            " (dry run: nothing written)" if dry_run else ""))


def _cli_status(options):
    # type: (argparse.Namespace) -> int
    unfinished = 0
    for path in options.paths:
        finished = is_done(path, marker=options.marker)
        if finished:
            # what any tool, or another user, may have written: as text, on one line
            marker = os.path.join(path, options.marker)
            try:
                with io.open(marker, encoding="utf-8", errors="replace") as file:
                    record = file.read(1001).strip()
                record = _one_line(record[:1000]) + ("..." if len(record) > 1000 else "")
            except OSError as exc:
                # another user's marker, private: finished all the same, and the other
                # paths are still answered; one removed meanwhile (a rerun began): not
                finished = is_done(path, marker=options.marker)
                record = "(its marker %s cannot be read: %s)" % (
                    _one_line(marker), _one_line(exc.strerror or str(exc)))
            if finished:
                print("%s: finished %s" % (_one_line(path), record))
        if not finished:
            unfinished += 1
            state = "not finished" if os.path.isdir(path) else "missing"
            print("%s: %s" % (_one_line(path), state))
    return 1 if unfinished else 0


def _error_text(exc):
    # type: (Exception) -> str
    """An error as one line: the path first, then what is wrong with it. A printable one
    is kept as it is: the command that a damaged cache's error gives to remove its files
    names paths with runs of spaces in them."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = "%s: %s" % (os.fsdecode(exc.filename), exc.strerror)
    # SQLite's own message may quote a column's text ("Could not decode to UTF-8 column
    # 'args' with text ..."): what anyone who could write the file put there
    return _one_line(text)


if __name__ == "__main__":
    sys.exit(_main())
