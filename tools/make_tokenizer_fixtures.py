#!/usr/bin/env python3
"""Record what `transformers` does with the SmolLM2 tokenizer and chat template, for the Rust tests.

Run once by a developer (CI never runs Python):

    scripts/fetch-smollm2.sh
    python3 tools/make_tokenizer_fixtures.py [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes crates/lm/tests/fixtures/smollm2_tokenizer.json with:
  * `encode`: for each test string, the ids with and without special tokens and the decodes
    (keeping and skipping special tokens), from `AutoTokenizer.from_pretrained(dir, gguf_file=...)`;
  * `chat`: `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` for several
    conversations, with the template stored in the GGUF;
  * `tiny_template`: a small hand-written template (independent of SmolLM2) rendered through
    transformers' own Jinja environment, exercising trim_blocks/lstrip_blocks, the trailing newline,
    `tojson`, pycompat string methods, loop controls, `raise_exception`, `{% generation %}` and
    Python value printing.

Needs: transformers, tokenizers, gguf (and torch, which transformers imports for GGUF files).
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(REPO, "crates", "lm", "tests", "fixtures", "smollm2_tokenizer.json")

TEXTS = [
    "Hello, world!",
    "",
    "The year 2024 had 366 days; pi is about 3.14159 and -42 < 1e10.",
    "1234567890 0.5 007",
    "  leading,   multiple   spaces\n\n\ttabs\r\nand newlines  ",
    "Unicode: naïve café, Straße, 日本語のテキスト, Ελληνικά, русский",
    "Emoji: 👋🌍 👨‍👩‍👧 ✨🚀",
    "x² + y² = z²; ½ and ①②",
    "I'm sure you're right, they'll see it's DON'T.",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos<|endoftext|>",
    "<|im_start| not quite special <repo_name>foo<filename>bar.py",
]

CHATS = [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "user", "content": "Hi"}], False),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "Write a haiku\nabout rain."},
            {"role": "assistant", "content": "Soft rain on tin roofs —\n  puddles hold the sky.  "},
            {"role": "user", "content": "Now in 日本語 with emoji 🌧"},
        ],
        False,
    ),
]

# A small template independent of SmolLM2. The trailing newline at the very end is dropped by Jinja
# (keep_trailing_newline=False), which the Rust side must reproduce.
TINY_TEMPLATE = """{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = 'default system' %}
    {%- set rest = messages %}
{%- endif %}
[SYS] {{ system }} [/SYS]
{% set ns = namespace(users=0) %}
{% for m in rest %}
    {% if m.role not in ['user', 'assistant'] %}
        {{ raise_exception('bad role: ' + m.role) }}
    {% endif %}
    {% if m['role'] == 'user' %}
        {% set ns.users = ns.users + 1 %}
<user i={{ loop.index0 }} last={{ loop.last }} name={{ m.get('name', 'anon') }}>{{ m.content.strip() }}</user>
    {% else %}
<bot>{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}</bot>
    {% endif %}
    {% if m.content.startswith('STOP') %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<bot>
{% endif %}
users={{ ns.users }} gen={{ add_generation_prompt }} none={{ none }} tools={{ tools is none }}
repr={{ ['a', 1, true, none, 1.5, "it's"] }} {{ {'k': 'v', 'n': [2]} }}
json={{ rest | tojson }}
indented={{ rest[:1] | tojson(indent=2) }}
{% for k, v in (rest[0] if rest else {}).items() %}{{ k|upper }}:{{ v|length }};{% endfor %}

"""

TINY_CASES = [
    ([{"role": "user", "content": "  hello <b>&</b> \"quoted\" 'single'  "}], True),
    (
        [
            {"role": "system", "content": "  Be nice.\n"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply with\nnewline and ünïcödé"},
            {"role": "user", "content": "second \\ backslash\ttab"},
        ],
        False,
    ),
    (
        [
            {"role": "user", "content": "STOP here"},
            {"role": "assistant", "content": "never shown"},
        ],
        True,
    ),
]

TINY_ERROR_CASE = [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.environ.get("RLHF_SMOLLM2_GGUF", DEFAULT_GGUF))
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    import tokenizers
    import transformers
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import render_jinja_template

    if not os.path.isfile(args.gguf):
        sys.exit(f"{args.gguf}: not found; run scripts/fetch-smollm2.sh")
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)

    # SmolLM2's own tokenizer.json (and llama.cpp's `smollm` pre-tokenizer) splits every digit off
    # before ByteLevel; transformers' GGUF path uses plain ByteLevel. The two differ only where a space
    # or letter could merge with a numeric character (e.g. " ²"). We record both: `ids_no_special` is
    # transformers' answer, `ids_digits_pretokenizer` the original tokenizer's.
    hf_like = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    hf_like.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )

    encode = []
    for text in TEXTS:
        with_special = tok(text, add_special_tokens=True)["input_ids"]
        without = tok(text, add_special_tokens=False)["input_ids"]
        alt = hf_like.encode(text, add_special_tokens=False).ids
        if alt != without:
            print(f"note: Digits+ByteLevel differs from transformers' GGUF tokenizer on {text!r}", file=sys.stderr)
        encode.append(
            {
                "text": text,
                "ids_with_special": with_special,
                "ids_no_special": without,
                "tokens": tok.convert_ids_to_tokens(without),
                "decoded": tok.decode(with_special, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
                "ids_digits_pretokenizer": alt,
            }
        )

    chat = []
    for messages, add_gen in CHATS:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
        chat.append(
            {
                "messages": messages,
                "add_generation_prompt": add_gen,
                "rendered": rendered,
                "ids": tok(rendered, add_special_tokens=False)["input_ids"],
            }
        )

    tiny_specials = {"bos_token": "<s>", "eos_token": "</s>"}

    def render_tiny(messages, add_gen):
        out, _ = render_jinja_template(
            conversations=[messages],
            chat_template=TINY_TEMPLATE,
            add_generation_prompt=add_gen,
            **tiny_specials,
        )
        return out[0]

    tiny_cases = [
        {"messages": m, "add_generation_prompt": g, "rendered": render_tiny(m, g)} for m, g in TINY_CASES
    ]
    try:
        render_tiny(TINY_ERROR_CASE, False)
        sys.exit("tiny template error case did not raise")
    except Exception as e:  # jinja2.exceptions.TemplateError
        tiny_error = str(e)

    fixture = {
        "about": "written by tools/make_tokenizer_fixtures.py; do not edit by hand",
        "gguf_file": gguf_name,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "vocab_size": len(tok),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "special_ids": sorted(tok.all_special_ids),
        "chat_template": tok.chat_template,
        "encode": encode,
        "chat": chat,
        "tiny_template": {
            "template": TINY_TEMPLATE,
            **tiny_specials,
            "cases": tiny_cases,
            "error_case": {"messages": TINY_ERROR_CASE, "add_generation_prompt": False, "error": tiny_error},
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(encode)} strings, {len(chat)} chats, {len(tiny_cases)} tiny-template cases")


if __name__ == "__main__":
    main()
