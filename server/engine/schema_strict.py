"""OpenAI's `strict: true` on a JSON schema (response_format, a tool's parameters), as the grammar
enforces it: every object has exactly its listed properties, all of them required, and no others
(additionalProperties false), at every depth; xgrammar's default, OpenAI's structured outputs rule.
Without strict the schema means what JSON Schema says (unlisted properties allowed, only
`required` ones required)."""

from __future__ import annotations

from typing import Any

# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_schema(schema: Any) -> Any:
    """A copy of `schema` with OpenAI's strict rules on every object (see the module docstring)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _ONE and isinstance(value, (dict, list)):
            out[key] = strict_schema(value)
        elif key in _MANY and isinstance(value, list):
            out[key] = [strict_schema(s) for s in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: strict_schema(s) for name, s in value.items()}
        else:
            out[key] = value
    kinds = out.get("type")
    is_object = kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in out
    if is_object:
        out["additionalProperties"] = False
        out["required"] = list(out.get("properties", {}))
    return out
