"""Where a traced step goes, step by step: `python -m bench.trace_steps TRACE.json [--epoch N]`.

Reads a `--trace` file and, for every traced step of one epoch (default: the last traced), puts
the parent's step beside its workers' spans:

    busy        the sum of a worker's spans in the step (decode, forward, backward, ...)
    slowest     the busiest worker's busy time: what a synchronous step cannot be shorter than
    parent      the parent's own spans (dispatch, reduce, update): its serial slice
    start lag   from the end of the parent's dispatch to the last worker's first span
    end lag     from the last worker's last span to the end of the parent's wait
    the rest    step - slowest - parent: waking, messages, and the cores shared with the parent

and prints the median and 90th percentile of each over the steps, in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

PARENT_SERIAL = ("dispatch", "reduce", "update")


def load(path: str) -> tuple[dict, list]:
    events = json.load(open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return names, [e for e in events if e.get("ph") == "X"]


def breakdown(names: dict, spans: list, epoch: int | None = None) -> dict[str, list[float]]:
    by_process = defaultdict(list)
    for e in spans:
        by_process[names.get(e["pid"], str(e["pid"]))].append(e)
    steps = sorted((e for e in by_process["parent"] if e["name"] == "step"), key=lambda e: e["ts"])
    epochs = [e.get("args", {}).get("epoch") for e in steps]
    chosen = epoch if epoch is not None else max((x for x in epochs if x is not None), default=None)
    steps = [e for e, x in zip(steps, epochs) if x == chosen]
    workers = sorted(p for p in by_process if p.startswith("worker"))
    rows = defaultdict(list)
    for step in steps:
        a, b = step["ts"], step["ts"] + step["dur"]
        parent = {e["name"]: e for e in by_process["parent"] if a <= e["ts"] < b and e is not step}
        inside = [[e for e in by_process[w] if a <= e["ts"] < b] for w in workers]
        inside = [s for s in inside if s]
        if not inside or "dispatch" not in parent or "wait" not in parent:
            continue
        busy = [sum(e["dur"] for e in s) / 1e3 for s in inside]
        serial = sum(parent[k]["dur"] for k in PARENT_SERIAL if k in parent) / 1e3
        dispatched = parent["dispatch"]["ts"] + parent["dispatch"]["dur"]
        waited = parent["wait"]["ts"] + parent["wait"]["dur"]
        rows["step"].append(step["dur"] / 1e3)
        rows["slowest"].append(max(busy))
        rows["fastest"].append(min(busy))
        rows["parent"].append(serial)
        rows["start lag"].append(max(min(e["ts"] for e in s) - dispatched for s in inside) / 1e3)
        rows["end lag"].append((waited - max(e["ts"] + e["dur"] for s in inside for e in s)) / 1e3)
        rows["the rest"].append(step["dur"] / 1e3 - max(busy) - serial)
    return rows


def report(rows: dict[str, list[float]]) -> list[str]:
    def p90(values: list[float]) -> float:
        return sorted(values)[int(0.9 * (len(values) - 1))]

    count = len(rows.get("step", []))
    lines = [f"{count} traced steps", "", "| ms | median | p90 |", "|---|---:|---:|"]
    for name, values in rows.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {p90(values):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", metavar="TRACE.json")
    parser.add_argument("--epoch", type=int, default=None, help="which epoch's steps (1-based; default: the last traced)")
    args = parser.parse_args()
    rows = breakdown(*load(args.trace), args.epoch)
    if not rows:
        raise SystemExit(f"{args.trace}: no traced steps with workers' spans in that epoch")
    print("\n".join(report(rows)))


if __name__ == "__main__":
    main()
