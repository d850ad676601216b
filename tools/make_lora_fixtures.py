#!/usr/bin/env python3
"""Generate the committed LoRA fixtures: adapters written by Python ``peft`` on the tiny Llama
fixture, and the log-probabilities ``peft`` computes with them.

What it writes (under ``crates/lm/tests/fixtures/``):

* ``tiny-llama-lora-qv/`` -- a ``peft`` adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors``) on ``q_proj`` and ``v_proj``, r = 4, lora_alpha = 8.
* ``tiny-llama-lora-all/`` -- on every linear layer (``all-linear``), r = 8, lora_alpha = 16,
  rsLoRA scaling.
* ``tiny-llama-lora.reference.json`` -- for each adapter, the per-token log-probs of the
  left-padded batch of ``tiny-llama.reference.json`` under the ``peft`` model, and under the
  merged model (``merge_and_unload``).

Both adapters get random A *and* B (``init_lora_weights=False``), so the adapters change the
model's outputs and a wrong scale, transpose or name shows up. ``base_model_name_or_path`` is
``../tiny-llama`` (relative to the adapter directory, as this toolkit reads it).

* ``tiny-llama-lora-ours/`` (when present) is an adapter written by this toolkit, not by this
  script: ``rlhf sft --set model=crates/lm/tests/fixtures/tiny-llama`` on 64 random prompt /
  completion rows of the fixture's vocabulary, r = 4, lora_alpha = 8, all-linear, with
  ``modules_to_save = ["embed_tokens"]`` (``base_model_name_or_path`` edited to ``../tiny-llama``);
  its ``peft`` log-probs go into the reference file under ``ours``.

Optionally, ``--check DIR`` loads an adapter directory written by this toolkit in ``peft`` and
prints its per-token log-probs of that batch as JSON (to compare with ``rlhf score``).

How to run (repository root; needs torch, transformers, peft, safetensors)::

    python3 tools/make_lora_fixtures.py

Deterministic (fixed ``torch.manual_seed``); CI does not run it.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "crates" / "lm" / "tests" / "fixtures"
BASE = FIXTURES / "tiny-llama"


def token_logprobs(model, batch):
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    pos = torch.tensor(batch["position_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
    out = lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
    return out.tolist()


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32, attn_implementation="eager").eval()


def main():
    from peft import LoraConfig, PeftModel, get_peft_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--check", type=Path, help="an adapter directory to score in peft")
    args = ap.parse_args()
    batch = json.loads((FIXTURES / "tiny-llama.reference.json").read_text())
    if args.check:
        model = PeftModel.from_pretrained(base_model(), args.check).eval()
        json.dump(token_logprobs(model, batch), sys.stdout)
        return

    torch.manual_seed(0)
    adapters = {
        "qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "all": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True, init_lora_weights=False),
    }
    reference = {}
    for name, cfg in adapters.items():
        cfg.task_type = "CAUSAL_LM"
        model = get_peft_model(base_model(), cfg).eval()
        # peft's random init is small; scale B up so the adapter moves log-probs visibly.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(20.0)
        out = FIXTURES / f"tiny-llama-lora-{name}"
        model.save_pretrained(out)
        conf = json.loads((out / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = "../tiny-llama"
        (out / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        (out / "README.md").unlink(missing_ok=True)
        peft_lp = token_logprobs(model, batch)
        merged = model.merge_and_unload()
        reference[name] = {"peft": peft_lp, "merged": token_logprobs(merged, batch)}
    reference["base"] = token_logprobs(base_model(), batch)
    # An adapter this toolkit trained (see the module docs), as peft reads it.
    ours = FIXTURES / "tiny-llama-lora-ours"
    if ours.exists():
        reference["ours"] = {"peft": token_logprobs(PeftModel.from_pretrained(base_model(), ours).eval(), batch)}
    (FIXTURES / "tiny-llama-lora.reference.json").write_text(json.dumps(reference) + "\n")
    print("wrote", ", ".join(adapters), "adapters and tiny-llama-lora.reference.json")


if __name__ == "__main__":
    main()
