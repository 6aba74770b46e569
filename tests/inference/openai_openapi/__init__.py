"""OpenAI's published schemas (schemas.json, made by refresh.py) and a validator for them.

schemas.json holds an OpenAPI 3.0 document's schemas. OpenAPI 3.0 Schema Objects are not JSON Schema: a null
is allowed only by ``nullable: true``, and ``readOnly``/``writeOnly`` depend on the direction. So they are
checked by openapi-schema-validator's OpenAPI 3.0 validators, as a response (read) or a request (write),
reading ``nullable`` as the document's version, OpenAPI 3.0.0, defines it: "allows sending a null value for
the defined schema", whatever else the schema says. The validator reads 3.0.3's narrower text, where null
must also pass the schema's other keywords, so that it refuses what the document means as null:

- a chat chunk's ``finish_reason``: ``nullable: true`` with an enum of strings, null in every chunk but the
  last;
- a chat chunk's ``usage``: a ``$ref`` with ``nullable: true`` beside it (3.0 ignores what stands beside a
  ``$ref``), "a null value except for the last chunk";
- a completion request's ``prompt``: ``nullable: true`` with a ``oneOf`` and no ``type``.

OpenAI's API and the clients generated from the document read it as 3.0.0 does. Nothing else is loosened.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from jsonschema import validators
from openapi_schema_validator import OAS30ReadValidator, OAS30WriteValidator

SCHEMAS = Path(__file__).resolve().with_name("schemas.json")


def _nullable(check):
    def keyword(validator, value, instance, schema):
        if instance is None and schema.get("nullable") is True:
            return
        yield from check(validator, value, instance, schema)

    return keyword


READ = validators.extend(
    OAS30ReadValidator, {k: _nullable(f) for k, f in OAS30ReadValidator.VALIDATORS.items()}
)
WRITE = validators.extend(
    OAS30WriteValidator, {k: _nullable(f) for k, f in OAS30WriteValidator.VALIDATORS.items()}
)


@functools.cache
def document() -> dict:
    data = json.loads(SCHEMAS.read_text())
    if not data["x-source"]["openapi"].startswith("3.0."):
        raise ValueError(f"{SCHEMAS} is OpenAPI {data['x-source']['openapi']}; these validators read 3.0")
    return data


@functools.cache
def _validator(name: str, request: bool):
    components = document()["components"]
    if name not in components["schemas"]:
        raise KeyError(f"{name} is not in {SCHEMAS.name}; add it to refresh.ROOTS and refresh")
    cls = WRITE if request else READ
    return cls({"$ref": f"#/components/schemas/{name}", "components": components})


def errors(instance, name: str, request: bool = False) -> list[str]:
    """Where ``instance`` breaks the published schema ``name``, one line each: the JSON path, then why."""
    found = sorted(_validator(name, request).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in found]


def check(instance, name: str, request: bool = False) -> None:
    """Fails, naming every offending path, unless ``instance`` is a valid ``name`` of OpenAI's API."""
    found = errors(instance, name, request)
    source = document()["x-source"]
    assert not found, (
        f"not a valid {name} of OpenAI's API {source['version']} (openai-openapi {source['commit'][:12]}):\n  "
        + "\n  ".join(found)
        + f"\nin {json.dumps(instance)[:2000]}"
    )
