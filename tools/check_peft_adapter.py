#!/usr/bin/env python3
"""Load an adapter directory written by `rlhf` in Python ``peft`` and compare its completion
log-probs with ``rlhf score``'s, token by token.

    python3 tools/check_peft_adapter.py --adapter runs/x/model --base models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data pairs.jsonl --ours scored.jsonl

``--base`` is an HF directory or a ``.gguf`` file (read by ``transformers``, dequantised to f32,
as ``rlhf`` reads it); ``--data`` holds ``prompt``/``completion`` lines; ``--ours`` is the output
of ``rlhf score --model ADAPTER --data DATA`` for the same file. Prints the largest absolute
difference. The prompt is tokenised with special tokens and the completion without, as TRL and
``rlhf score`` do. Needs torch, transformers, peft (and gguf for a .gguf base).
"""

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ours", type=Path, required=True)
    args = ap.parse_args()
    if args.base.suffix == ".gguf":
        kw = {"gguf_file": args.base.name}
        src = args.base.parent
    else:
        kw, src = {}, args.base
    tok = AutoTokenizer.from_pretrained(src, **kw)
    base = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager", **kw)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    rows = [json.loads(l) for l in args.data.read_text().splitlines() if l.strip()]
    ours = [json.loads(l) for l in args.ours.read_text().splitlines() if l.strip()]
    worst, n = 0.0, 0
    for row, mine in zip(rows, ours):
        p = tok(row["prompt"])["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        theirs = [lp[len(p) - 1 + i, t].item() for i, t in enumerate(c)]
        assert len(theirs) == len(mine["completion_logprobs"]), (len(theirs), len(mine["completion_logprobs"]))
        for a, b in zip(theirs, mine["completion_logprobs"]):
            worst = max(worst, abs(a - b))
            n += 1
    print(json.dumps({"tokens": n, "max_abs_diff": worst}))


if __name__ == "__main__":
    main()
