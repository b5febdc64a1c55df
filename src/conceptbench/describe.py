"""What a config may say, as text: a method's arguments, inputs and cost, or a config section's keys.

    python -m conceptbench.config --describe dreambooth    # or train, sampling, ...; or nothing: the list
"""

from __future__ import annotations

import json

from . import registry


def _type_text(spec: dict) -> str:
    """"number >= 0, default 1.0" for one schema fragment; "required" where it has no default."""
    if "enum" in spec:
        kind = " | ".join(map(str, spec["enum"]))
    else:
        kinds = spec.get("type", "any")
        kind = " or ".join(kinds) if isinstance(kinds, list) else kinds
    signs = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    bounds = [f"{sign} {spec[word]}" for word, sign in signs.items() if word in spec]
    default = f"default {json.dumps(spec['default'])}" if "default" in spec else "required"
    return ", ".join([" ".join([kind, bounds[0]]) if bounds else kind, *bounds[1:], default])


def _key_lines(properties: dict) -> list[str]:
    width = max(map(len, properties), default=0)
    return [f"  {key:<{width}}  {_type_text(spec)}: {' '.join(str(spec.get('description', '')).split())}"
            for key, spec in properties.items()]


def describe(schema: dict, name: str | None = None) -> str:
    """A method's arguments, inputs and cost; a config section's keys (`schema` is the config schema);
    or, without a name, what there is. An unknown name is a LookupError listing what is known."""
    sections = {**{k: v for k, v in schema["properties"].items() if "properties" in v},
                **{k: v for k, v in schema["$defs"].items() if k in ("train", "sampling", "experiment")}}
    if name is None:
        methods = [f"  {m}: {registry.declaration(m)['summary']}" for m in registry.available_methods()]
        return "\n".join(["methods (experiments.<name>.method):", *methods,
                          f"config sections: {', '.join(sections)}",
                          "python -m conceptbench.config --describe NAME prints one of them."])
    if name in sections:
        return "\n".join([f"{name}: {' '.join(sections[name]['description'].split())}",
                          *_key_lines(sections[name]["properties"])])
    try:
        decl = registry.declaration(name)
    except registry.UnknownMethod as e:
        raise LookupError(f"{e}; config sections: {', '.join(sections)}") from None
    inputs = [k if when is True else f"{k} (when {', '.join(f'{a} = {v}' for a, v in when.items())})"
              for k, when in decl["inputs"].items()]
    return "\n".join([f"{name}: {decl['summary']}", f"  module: {decl['source']}",
                      f"  inputs besides the base model: {', '.join(inputs) or 'none'}",
                      f"  cost: {decl['h100_seconds_per_step']:g} s per step on one H100 at 512x512 (SLURM runtime)",
                      "args (experiments.<name>.args):", *_key_lines(decl["args"])])
