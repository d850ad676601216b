#!/usr/bin/env python3
"""The reward of the RLOO benchmark (`rlhf-bench rloo`, `anchor_torch.py rloo`): the number of
distinct whitespace-separated words in the completion, divided by 10. Trivial and deterministic,
so that both sides spend (almost) nothing on it and score identical text identically.

As a command (`reward.source = "command"`, the toolkit's JSON protocol) it reads
`{"prompts": [...], "completions": [...]}` on stdin and writes `{"scores": [...]}` to stdout.
The anchor imports `score` and calls it in process, as a TRL reward function.
"""

import json
import sys


def score(completion):
    return len(set(completion.split())) / 10.0


def main():
    request = json.load(sys.stdin)
    json.dump({"scores": [score(c) for c in request["completions"]]}, sys.stdout)


if __name__ == "__main__":
    main()
