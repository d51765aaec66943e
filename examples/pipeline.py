"""A three-stage pipeline that goes on past bad records, and reruns only those.

    python examples/pipeline.py --workers 2     # every record tried; the malformed ones fail
    python persist.py failures examples/.persist/pipeline.transform.db   # which, and why
    python examples/pipeline.py --fix           # reuses every result, computes the failed

    python examples/pipeline.py --fail-on-bad   # the old way: dies on the first bad record

split:     raw.csv -> one JSON file per record, in a done_dir (skipped once finished)
transform: a slow @persist.memoize function per record, run by persist.map (results kept
           across crashes, failures recorded, the summary line logged)
report:    report.json, written with atomic_write

The data (a few thousand weather readings, a few of them malformed) is generated on the
first run into --work (default: examples/work). Caches live in examples/.persist, or in
$PERSIST_DIR. Inspect them with: python persist.py ls examples/.persist
"""

import argparse
import functools
import json
import logging
import os
import pathlib
import random
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))        # persist.py sits at the top of the repository
import persist  # noqa: E402

CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Perth", "Quebec", "Tunis"]
SLOW = 0.002                                # seconds per record: stands for real work


def make_raw_data(path, count):
    """id,city,temperature lines; every 400th reading is malformed, as real feeds are."""
    rng = random.Random(42)
    lines = ["id,city,temperature"]
    for i in range(count):
        temperature = "%.1f" % rng.uniform(-10, 35)
        if i % 400 == 399:
            temperature = rng.choice(["n/a", temperature.replace(".", ","), ""])
        lines.append("%d,%s,%s" % (i, rng.choice(CITIES), temperature))
    persist.atomic_write(path, "\n".join(lines) + "\n")


def parse_temperature(text, fix):
    if fix:                                 # the fix: decimal commas, and gaps as None
        text = text.replace(",", ".")
        if text in ("", "n/a"):
            return None
    return float(text)                      # ValueError on a malformed reading


@persist.memoize(ignore=["fix", "slow"])    # fixing the parser keeps every result computed
def transform(record, fix=False, slow=SLOW):
    time.sleep(slow)
    celsius = parse_temperature(record["temperature"], fix)
    return {
        "id": record["id"],
        "city": record["city"],
        "celsius": celsius,
        "fahrenheit": None if celsius is None else round(celsius * 9 / 5 + 32, 1),
    }


def split(raw, out):
    """Stage 1: one file per record. A rerun skips it once it has finished."""
    if persist.is_done(out):
        return "already done"
    written = 0
    with persist.done_dir(out) as directory:
        for line in raw.read_text().splitlines()[1:]:
            record_id, city, temperature = line.split(",", 2)
            target = directory / ("%06d.json" % int(record_id))
            if not target.exists():         # resume: files already written are kept
                record = {"id": int(record_id), "city": city, "temperature": temperature}
                persist.atomic_write(target, json.dumps(record), sync=False)
                written += 1
    return "%d files" % written


def run_transform(records, fail_on_bad, fix, workers):
    """Stage 2: the slow part. Results come from the cache when they were computed before;
    persist.map tries every record and logs one summary line."""
    records = [json.loads(path.read_text()) for path in sorted(records.glob("*.json"))]
    if fail_on_bad:                         # a plain loop, as most pipelines are written
        for done, record in enumerate(records):
            try:
                transform(record, fix=fix, slow=SLOW)
            except ValueError:
                print("transform: crashed on record %d (%r) after %d results"
                      % (record["id"], record["temperature"], done))
                raise
    try:
        results = persist.map(functools.partial(transform, fix=fix, slow=SLOW), records,
                              workers=workers)
        bad = []
    except persist.Failures as failures:
        results = [r for r in failures.results if not isinstance(r, Exception)]
        bad = [record["id"] for record, _ in failures.failures]
    return results, bad


def report(results, bad, path):
    """Stage 3: a summary, replaced atomically."""
    by_city = {}
    for result in results:
        if result["celsius"] is not None:
            by_city.setdefault(result["city"], []).append(result["celsius"])
    summary = {
        "records": len(results),
        "malformed_skipped": len(bad),
        "mean_celsius": {city: round(sum(v) / len(v), 2) for city, v in sorted(by_city.items())},
    }
    persist.atomic_write(path, json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "work"), help="where data and outputs go")
    parser.add_argument("--records", type=int, default=3000, help="how many records to make")
    parser.add_argument("--fail-on-bad", action="store_true",
                        help="crash on the first malformed record, as real pipelines do")
    parser.add_argument("--fix", action="store_true", help="parse malformed records too")
    parser.add_argument("--slow", type=float, default=0.002, help="seconds of work per record")
    parser.add_argument("--workers", type=int, help="processes for the transform stage")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # persist.map's summary
    global SLOW
    SLOW = options.slow
    work = pathlib.Path(options.work)
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw.csv"
    if not raw.exists():
        make_raw_data(raw, options.records)

    started = time.perf_counter()
    print("split:     %s (%.2f s)" % (split(raw, work / "records"),
                                      time.perf_counter() - started))
    sys.stdout.flush()                      # before the summary line, which goes to stderr
    results, bad = run_transform(work / "records", options.fail_on_bad, options.fix,
                                 options.workers)
    if bad:
        print("transform: skipped %d malformed records: %s (see them with: python persist.py "
              "failures %s; rerun with --fix to parse them)"
              % (len(bad), ", ".join(map(str, bad)), transform.cache_info().path))
    started = time.perf_counter()
    summary = report(results, bad, work / "report.json")
    print("report:    %d records -> %s (%.2f s)" % (summary["records"], work / "report.json",
                                                    time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
