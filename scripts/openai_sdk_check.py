"""Checks a Tessera API with the official OpenAI Python SDK: a chat completion, a streamed
chat completion with usage, and a (legacy) completion. Prints one JSON line with what it
saw; exits non-zero with a message on the first failure."""

import json
import sys

import openai


def main() -> None:
    base_url, api_key = sys.argv[1], sys.argv[2]
    model = sys.argv[3] if len(sys.argv) > 3 else "smollm2-135m-instruct"
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    seen = {"sdk_version": openai.__version__}

    # 1. Non-streaming chat completion.
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name the capital of France."}],
        max_tokens=24,
        temperature=0,
    )
    text = chat.choices[0].message.content
    assert text, "chat completion has no text"
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0, chat.usage
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.choices[0].finish_reason in ("stop", "length"), chat.choices[0].finish_reason
    assert chat.system_fingerprint, "system_fingerprint names the module"
    raw_tessera = chat.model_extra.get("tessera") or {}
    assert raw_tessera.get("node") and raw_tessera.get("receipt"), chat.model_extra
    seen["chat"] = {"text": text, "usage": chat.usage.model_dump(), "tessera": raw_tessera}

    # 2. Streaming chat completion with a usage chunk.
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name the capital of France."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(pieces)
    assert streamed, "stream carried no text"
    assert roles == ["assistant"], roles
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens > 0, usage
    # Greedy and same prompt: the stream says what the whole response said.
    assert streamed == text, (streamed, text)
    assert usage.completion_tokens == chat.usage.completion_tokens, (usage, chat.usage)
    seen["chat_stream"] = {"text": streamed, "usage": usage.model_dump(), "chunks": len(pieces)}

    # 3. Completion (raw text continuation).
    comp = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert comp.choices[0].text, "completion has no text"
    assert comp.usage.completion_tokens > 0 and comp.usage.completion_tokens <= 8, comp.usage
    seen["completion"] = {"text": comp.choices[0].text, "usage": comp.usage.model_dump()}

    # 4. Errors surface as the SDK's typed exceptions.
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "model_not_found", (e.status_code, e.code)
    try:
        client_bad = openai.OpenAI(base_url=base_url, api_key="tsk_wrong", max_retries=0)
        client_bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("bad key accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e.status_code
    models = [m.id for m in client.models.list()]
    assert model in models, models
    seen["models"] = models
    print(json.dumps(seen))


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, openai.APIError) as e:
        print(f"openai SDK check failed: {e!r}", file=sys.stderr)
        sys.exit(1)
