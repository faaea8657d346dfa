"""Talon's gateway through the official OpenAI Python client.

Usage: python openai_client.py BASE_URL MODEL API_KEY
Prints one line per check; exits non-zero on the first failure.
"""
import sys

import openai
from openai import OpenAI

base_url, model, api_key = sys.argv[1], sys.argv[2], sys.argv[3]

# Without the key (and with a wrong one): 401 with an OpenAI-style body.
for bad in ["", "talon_0000000000000000_" + "0" * 64]:
    anonymous = OpenAI(base_url=base_url, api_key=bad or "none", max_retries=0, timeout=30)
    try:
        anonymous.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        raise SystemExit("a request without a valid key was served")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
        assert e.body["code"] == "invalid_api_key", e.body
        assert e.body["message"], e.body
print("unauthenticated ok")

client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)

models = [m.id for m in client.models.list().data]
assert model in models, models
print("models ok", models)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello from python"}], max_tokens=6
)
text = chat.choices[0].message.content
assert chat.choices[0].message.role == "assistant", chat
assert len(text.split()) == 6, text
assert chat.usage.completion_tokens == 6, chat.usage
print("chat ok", text)

pieces = []
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "stream please"}], max_tokens=4, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
streamed = "".join(pieces)
assert len(pieces) == 4 and len(streamed.split()) == 4, pieces
print("stream ok", streamed)

emb = client.embeddings.create(model=model, input=["one", "two"])
assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0, emb
print("embeddings ok", len(emb.data[0].embedding))

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("an unknown model was accepted")
except Exception as e:  # openai.NotFoundError
    assert "no-such-model" in str(e), e
    print("unknown model ok")
