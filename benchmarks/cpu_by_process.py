"""CPU used by every process on the machine while a command runs (Linux /proc accounting).

Samples each process's user+system CPU time once a second while COMMAND runs, then prints the
CPU share (% of one core) of each process over the middle of the run (from 30% to 90% of the
samples, so start-up and shut-down are left out), largest first. Used to see what Ray's daemons
and Ray Train's actors take beside a training worker:

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/cpu_by_process.py -- \\
        .venv/bin/python benchmarks/train_overhead.py --one ray --train-path train.jsonl --steps 20 --bf16
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, tuple[int, str]]:
    """pid -> (user+system clock ticks, command line)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
        except OSError:  # the process ended between listdir and open
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (int(fields[11]) + int(fields[12]), (cmd or stat[stat.index("(") + 1:stat.rindex(")")])[:110])
    return out


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: cpu_by_process.py -- COMMAND [ARGS...]")
    proc = subprocess.Popen(argv)
    samples = []
    while proc.poll() is None:
        samples.append((time.time(), snapshot()))
        time.sleep(1)
    if len(samples) < 5:
        sys.exit("the command ended too soon to measure")
    a, b = samples[int(len(samples) * 0.3)], samples[int(len(samples) * 0.9)]
    seconds = b[0] - a[0]
    rows = sorted(((ticks - a[1].get(pid, (0, ""))[0]) / HZ / seconds * 100, pid, cmd)
                  for pid, (ticks, cmd) in b[1].items())[::-1]
    rows = [r for r in rows if r[0] > 0]
    print(f"window {seconds:.1f} s (command exit {proc.returncode})\n\n| % of one core | pid | process |\n|---:|---:|---|")
    for share, pid, cmd in rows[:30]:
        print(f"| {share:.1f} | {pid} | `{cmd}` |")
    print(f"\nall but the largest: {sum(r[0] for r in rows[1:]):.1f}% of one core")


if __name__ == "__main__":
    main()
