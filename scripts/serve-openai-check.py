#!/usr/bin/env python3
"""Talk to a running `rlhf serve` with the official `openai` Python client (not run in CI).

    target/release/rlhf serve --model PATH --served-model-name tiny --port 8000 &
    python3 scripts/serve-openai-check.py [--base-url http://127.0.0.1:8000/v1] [--model tiny]

Checks that the client's own request and response shapes work: a chat completion, a streamed one
(the same text), a text completion with echo and log-probs, and an error the client raises as
`BadRequestError`. Prints what came back.
"""

import argparse

import openai


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompt", default="w5 w6 w7")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")

    print("models:", [m.id for m in client.models.list().data])

    messages = [{"role": "user", "content": args.prompt}]
    chat = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=8, temperature=0, seed=1
    )
    text = chat.choices[0].message.content
    print("chat:", repr(text), chat.choices[0].finish_reason, chat.usage)

    chunks = client.chat.completions.create(
        model=args.model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices
    )
    print("streamed:", repr(streamed), "same text:", streamed == text)
    assert streamed == text

    with_logprobs = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2,
    )
    for item in with_logprobs.choices[0].logprobs.content:
        print("  chat token", repr(item.token), round(item.logprob, 4),
              [(t.token, round(t.logprob, 4)) for t in item.top_logprobs])

    completion = client.completions.create(
        model=args.model, prompt=args.prompt, max_tokens=2, temperature=0,
        echo=True, logprobs=1,
    )
    lp = completion.choices[0].logprobs
    print("completion:", repr(completion.choices[0].text))
    print("  tokens:", lp.tokens)
    print("  token_logprobs:", lp.token_logprobs)
    print("  text_offset:", lp.text_offset)

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
    except openai.BadRequestError as e:
        print("unknown model ->", e.status_code, e.body)
    else:
        raise SystemExit("expected a 400 for an unknown model")
    print("ok")


if __name__ == "__main__":
    main()
