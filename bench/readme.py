"""Regenerate the README's benchmark section from a ``python -m bench`` results file.

    python -m bench.readme bench/results/<device>-<date>.json [--readme README.md]

Replaces the text between the lines ``<!-- bench:start -->`` and ``<!-- bench:end -->`` of the
README (markers kept) with: the machine and software the numbers come from, the command, the
per-family speedup tables of the run and its targets, and links to the run's plots. Fails, changing
nothing, if the markers are missing, repeated or out of order, or the results file does not
validate (``bench/report.py``).
"""
import argparse
import json
import os
import sys

from . import report

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section(doc, results_path, readme_path):
    """The Markdown that goes between the markers (links relative to the README)."""
    m = doc["meta"]
    rel = os.path.relpath(results_path, os.path.dirname(os.path.abspath(readme_path)))
    stem = os.path.splitext(rel)[0]
    lines = [f"Measured on **{m['device_name']}** ({m['device']}, {m['threads']} threads of {m['cpu_count']} CPUs), "
             f"torch {m['torch']}, triton {m['triton']}, sparsekern {m['git_sha'][:10]}"
             f"{' (dirty)' if m['git_dirty'] else ''}, {m['date'][:10]}; other processes kept "
             f"{m['other_processes_cpus']:.2f} CPUs busy. Command: `{m['command']}` "
             f"({m['wall_s'] / 60:.1f} min). Full results: [`{rel}`]({rel}), report [`{stem}.md`]({stem}.md).",
             "",
             "Times are medians of repeated calls after warmup (ms); ×P is P's time over sparsekern's. "
             "eager = `sparsekern.reference` (plain PyTorch), compile = `torch.compile(reference)`; "
             "every provider's numbers are in the report."]
    for family in dict.fromkeys(r["family"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["family"] == family]
        lines += ["", f"**{report.FAMILY_TITLES.get(family, family)}**", "", report.compact_table(rows)]
    if doc.get("targets"):
        lines += ["", "Targets ([docs/benchmarks.md](docs/benchmarks.md)):", ""] + [f"- {t['text']}" for t in doc["targets"]]
    for png in ("speedup", "spmm-crossover"):
        path = f"{os.path.splitext(results_path)[0]}-{png}.png"
        if os.path.exists(path):
            lines += ["", f"![{png}]({stem}-{png}.png)"]
    return "\n".join(lines)


def replace_section(text, body):
    """``text`` with everything between the marker lines replaced by ``body``; ValueError if
    the markers are not there exactly once each, start before end."""
    counts = {mark: text.count(mark) for mark in (START, END)}
    if counts != {START: 1, END: 1}:
        raise ValueError(f"README needs the markers {START} and {END} exactly once each "
                         f"(found {counts[START]} and {counts[END]})")
    head, rest = text.split(START)
    if END not in rest:
        raise ValueError(f"{END} comes before {START} in the README")
    tail = rest.split(END)[1]
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results JSON written by python -m bench")
    p.add_argument("--readme", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "README.md"))
    args = p.parse_args(argv)
    with open(args.results) as f:
        doc = json.load(f)
    try:
        report.validate(doc)
        with open(args.readme) as f:
            text = f.read()
        new = replace_section(text, section(doc, args.results, args.readme))
    except ValueError as e:
        sys.exit(f"python -m bench.readme: {e}; {args.readme} unchanged")
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"updated the benchmark section of {args.readme} from {args.results} ({doc['meta']['device_name']})")


if __name__ == "__main__":
    main()
