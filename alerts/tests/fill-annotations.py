#!/usr/bin/env python3
"""Authoring aid: fills `exp_annotations` of promtool unit tests from what promtool renders.

promtool compares annotations exactly, so every expected alert needs its rendered summary,
description and runbook_url. Write a test with `exp_labels` only, run

    python3 alerts/tests/fill-annotations.py alerts/tests/FILE.yml

and REVIEW the inserted text (it is a golden file: it must read right, with the right values).
Only alerts whose labels already match and that have no `exp_annotations` are filled;
`--refresh` first removes every `exp_annotations` block (after editing a template).
Not used by the test suite.
"""
import json
import re
import subprocess
import sys

import yaml

PAIR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_map(text):
    return {k: json.loads('"' + v + '"') for k, v in PAIR.findall(text)}


def failures(path):
    out = subprocess.run(
        ["promtool", "test", "rules", path], capture_output=True, text=True
    )
    out = out.stdout + out.stderr
    result = []  # (alertname, time, [(labels, annotations)])
    cur = None
    section = None
    for line in out.splitlines():
        m = re.match(r"\s*alertname: (\w+), time: ([^,]+),", line)
        if m:
            cur = (m.group(1), m.group(2).strip(), [])
            result.append(cur)
            section = None
            continue
        s = line.strip()
        if s.startswith("got:"):
            section = "got"
        elif s.startswith("exp:"):
            section = "exp"
        elif s.startswith("Labels:{") and section == "got" and cur:
            cur[2].append([parse_map(s[len("Labels:") :]), None])
        elif s.startswith("Annotations:{") and section == "got" and cur and cur[2]:
            cur[2][-1][1] = parse_map(s[len("Annotations:") :])
    return result


def strip_annotations(path):
    lines = open(path).read().split("\n")
    out = []
    skip = None
    for line in lines:
        if skip is not None:
            if len(line) - len(line.lstrip()) > skip:
                continue
            skip = None
        if line.strip() == "exp_annotations:":
            skip = len(line) - len(line.lstrip())
            continue
        out.append(line)
    open(path, "w").write("\n".join(out))


def main(path):
    got = failures(path)
    lines = open(path).read().split("\n")
    out = []
    alertname = None
    eval_time = None
    for i, line in enumerate(lines):
        out.append(line)
        m = re.match(r"\s*- eval_time: (\S+)", line)
        if m:
            eval_time = m.group(1)
        m = re.match(r"\s*alertname: (\w+)", line)
        if m:
            alertname = m.group(1)
        m = re.match(r"(\s*)- exp_labels: (\{.*\})\s*$", line)
        if not m:
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if "exp_annotations" in nxt:
            continue
        want = {k: str(v) for k, v in yaml.safe_load(m.group(2)).items()}
        want["alertname"] = alertname
        for name, t, alerts in got:
            if name != alertname or not same_time(t, eval_time):
                continue
            for labels, ann in alerts:
                if labels == want and ann:
                    ind = m.group(1) + "  "
                    out.append(ind + "exp_annotations:")
                    for k in sorted(ann):
                        out.append(ind + "  " + k + ": " + json.dumps(ann[k], ensure_ascii=False))
                    break
    open(path, "w").write("\n".join(out))


def same_time(promtool_time, yaml_time):
    return promtool_time.replace("0s", "") == yaml_time.replace("0s", "") or promtool_time == yaml_time


if __name__ == "__main__":
    args = sys.argv[1:]
    refresh = "--refresh" in args
    for p in [a for a in args if a != "--refresh"]:
        if refresh:
            strip_annotations(p)
        main(p)
