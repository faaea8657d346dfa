"""Keys of two tenants through the official OpenAI Python client.

Usage: python tenants_client.py BASE_URL ACME_KEY GLOBEX_KEY
acme may use model alpha, globex model beta (at priority low at most).
Prints one line per check; exits non-zero on the first failure.
"""
import sys

import openai
from openai import OpenAI

base_url, acme_key, globex_key = sys.argv[1], sys.argv[2], sys.argv[3]
acme = OpenAI(base_url=base_url, api_key=acme_key, max_retries=0, timeout=30)
globex = OpenAI(base_url=base_url, api_key=globex_key, max_retries=0, timeout=30)
hello = [{"role": "user", "content": "hello"}]

chat = acme.chat.completions.create(model="alpha", messages=hello, max_tokens=3)
assert chat.choices[0].message.content, chat
print("acme alpha ok")
chat = globex.chat.completions.create(model="beta", messages=hello, max_tokens=3)
assert chat.choices[0].message.content, chat
print("globex beta ok")

for client, model in [(acme, "beta"), (globex, "alpha")]:
    try:
        client.chat.completions.create(model=model, messages=hello, max_tokens=3)
        raise SystemExit(f"a key was served model {model} of another tenant")
    except openai.PermissionDeniedError as e:
        assert e.status_code == 403, e
        assert e.body["type"] == "model_not_allowed", e.body
        assert model in e.body["message"], e.body
# streams are refused the same way, before anything is sent
try:
    for _ in acme.chat.completions.create(model="beta", messages=hello, max_tokens=3, stream=True):
        raise SystemExit("a cross-tenant stream sent a chunk")
    raise SystemExit("a cross-tenant stream was served")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403, e
print("cross-tenant refused ok")

try:
    globex.chat.completions.create(
        model="beta", messages=hello, max_tokens=3, extra_headers={"x-talon-priority": "high"}
    )
    raise SystemExit("a key above its priority ceiling was served")
except openai.PermissionDeniedError as e:
    assert e.body["type"] == "priority_not_allowed", e.body
chat = globex.chat.completions.create(
    model="beta", messages=hello, max_tokens=3, extra_headers={"x-talon-priority": "low"}
)
assert chat.choices[0].message.content, chat
print("priority ceiling ok")
