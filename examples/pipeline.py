"""A three-stage pipeline that crashes on bad data, and resumes where it stopped.

    python examples/pipeline.py --fail-on-bad   # dies on the first malformed record
    python examples/pipeline.py --fix           # reuses every result, computes the rest

split:     raw.csv -> one JSON file per record, in a done_dir (skipped once finished)
transform: a slow @persist.memoize function per record (results kept across crashes)
report:    report.json, written with atomic_write

The data (a few thousand weather readings, a few of them malformed) is generated on the
first run into --work (default: examples/work). Caches live in examples/.persist, or in
$PERSIST_DIR. Inspect them with: python persist.py ls examples/.persist
"""

import argparse
import json
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


@persist.memoize(ignore=["fix"])            # fixing the parser keeps every result computed
def transform(record, fix=False):
    time.sleep(SLOW)
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


def run_transform(records, fail_on_bad, fix):
    """Stage 2: the slow part. Results come from the cache when they were computed before."""
    results, bad = [], []
    for path in sorted(records.glob("*.json")):
        record = json.loads(path.read_text())
        try:
            results.append(transform(record, fix=fix))
        except ValueError:
            if fail_on_bad:
                info = transform.cache_info()
                print("transform: crashed on record %d (%r) after %d results"
                      % (record["id"], record["temperature"], info.hits + info.misses - 1))
                raise
            bad.append(record["id"])
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
    options = parser.parse_args(argv)
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
    started = time.perf_counter()
    results, bad = run_transform(work / "records", options.fail_on_bad, options.fix)
    info = transform.cache_info()
    print("transform: reused %s, computed %s (%.2f s)"
          % (format(info.hits, ","), format(info.misses, ","), time.perf_counter() - started))
    if bad:
        print("transform: skipped %d malformed records (rerun with --fix to parse them)"
              % len(bad))
    started = time.perf_counter()
    summary = report(results, bad, work / "report.json")
    print("report:    %d records -> %s (%.2f s)" % (summary["records"], work / "report.json",
                                                    time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
