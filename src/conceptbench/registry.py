"""Which training methods exist and what each declares, read without importing them (so without torch).

A method is one module. Besides `METHOD` (a subclass of `conceptbench.train.Method`) it declares, as
plain literals at its top level, what the config and the workflow need to know:

    ARGS = {  # one JSON-schema fragment per argument; no "default" makes it required
        "prior_loss_weight": {"type": "number", "minimum": 0, "default": 1.0, "description": "λ, ..."},
    }
    INPUTS = {"data": True, "class_images": True}  # what the train rule hands it besides the base model
    H100_SECONDS_PER_STEP = 1.0  # one optimizer step on one H100 at 512², with margin (SLURM runtimes)

An argument declared as {"same_as": "dreambooth"} is that method's argument of the same name. INPUTS
keys are input kinds (INPUT_KINDS); a value is true, or {arg: value} for "only when args[arg] is value".
The config is checked against these declarations before any job runs, and the method reads its
arguments, defaults filled, from them: each default is written once, beside the method.

conceptbench's own methods are the modules of `conceptbench.methods`, named by file (`dreambooth`);
any other module on the Python path is named by its import path (`my_lab.methods.bitfit`).
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
from pathlib import Path

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

BUILTIN = "conceptbench.methods"
BUILTIN_DIR = Path(__file__).resolve().parent / "methods"
DECLARED = ("ARGS", "INPUTS", "H100_SECONDS_PER_STEP")
INPUT_KINDS = {
    "data": "the experiment's dataset (`data`, then required)",
    "class_images": "the experiment's class images, when class_images.count > 0 (args.class_prompt gets their prompt)",
    "extra_concepts": "the datasets (data_i) and class images (class_images_i) of args.extra_concepts",
    "clip": "the scoring CLIP (metrics.clip)",
    "dino": "the scoring DINOv2 (metrics.dino)",
    "aesthetic": "the aesthetic head (metrics.aesthetic)",
}
# What an argument's declaration may say; anything else is a typo in the declaration.
ARG_KEYWORDS = {"type", "enum", "default", "description", "minimum", "maximum", "exclusiveMinimum",
                "exclusiveMaximum", "minLength", "items", "minItems", "properties", "required",
                "additionalProperties", "same_as"}


class UnknownMethod(LookupError):
    """No method of that name; the message lists the known ones and the closest match."""


def available_methods() -> list[str]:
    """Names of conceptbench's own methods (the modules of conceptbench.methods not starting with _)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.py") if not p.stem.startswith("_"))


def closest(key: str, known) -> str:
    """"; did you mean 'x'?" for the nearest of `known`, or "" when nothing is near."""
    match = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def unknown_argument(method: str, key: str, declared) -> str:
    """The message for an argument `method` does not declare: the closest match and every known one."""
    return f"{method} has no argument {key!r}{closest(key, declared)} (known: {', '.join(sorted(declared))})"


def module_name(name: str) -> str:
    """The module a method name stands for."""
    return name if "." in name else f"{BUILTIN}.{name}"


def source(name: str) -> Path:
    """The file of method `name`, found without running it (a dotted name's parent packages are imported)."""
    if "." not in name:
        path = BUILTIN_DIR / f"{name}.py"
        if name.startswith("_") or not path.is_file():
            raise UnknownMethod(f"{name!r} is not one of {available_methods()}{closest(name, available_methods())} "
                                "(another module is named by its import path, e.g. my_lab.methods.bitfit)")
        return path
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.origin or "").endswith(".py"):
        raise UnknownMethod(f"{name!r}: no such module on the Python path (sys.path, PYTHONPATH)")
    return Path(spec.origin)


def declaration(name: str) -> dict:
    """{"args", "inputs", "h100_seconds_per_step", "source", "summary"} of method `name`."""
    return declaration_of(source(name))


@functools.cache
def declaration_of(path: Path) -> dict:
    """The declarations of the method module at `path`, read as literals and checked."""
    path = Path(path)
    found = {}
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
            if isinstance(target, ast.Name) and target.id in DECLARED and node.value is not None:
                try:
                    found[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    raise ValueError(f"{path}:{node.lineno}: {target.id} must be a literal (numbers, strings, lists, "
                                     "dicts), read without importing the module") from None
    missing = [k for k in DECLARED if k not in found]
    if missing:
        raise ValueError(f"{path}: a method module declares {', '.join(DECLARED)}; missing {missing} "
                         "(see conceptbench/registry.py)")
    args = {key: _resolve(path, key, spec) for key, spec in _mapping(path, "ARGS", found["ARGS"]).items()}
    inputs = _mapping(path, "INPUTS", found["INPUTS"])
    for kind, when in inputs.items():
        if kind not in INPUT_KINDS:
            raise ValueError(f"{path}: INPUTS has no kind {kind!r}{closest(kind, INPUT_KINDS)} "
                             f"(kinds: {', '.join(INPUT_KINDS)})")
        if when is not True and not (isinstance(when, dict) and set(when) <= set(args)):
            raise ValueError(f"{path}: INPUTS[{kind!r}] must be true or {{argument: value}} of declared arguments")
    seconds = found["H100_SECONDS_PER_STEP"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"{path}: H100_SECONDS_PER_STEP must be a positive number (got {seconds!r})")
    summary = (ast.get_docstring(tree) or "").split("\n")[0]
    return {"args": args, "inputs": inputs, "h100_seconds_per_step": float(seconds), "source": str(path),
            "summary": summary}


def _mapping(path: Path, name: str, value) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{path}: {name} must be a dict keyed by name")
    return value


def _resolve(path: Path, key: str, spec) -> dict:
    """One argument's declaration, checked: a valid schema fragment with a description, its default valid."""
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: ARGS[{key!r}] must be a dict (a JSON-schema fragment)")
    if "same_as" in spec:
        other = declaration(spec["same_as"])["args"]
        if key not in other:
            raise ValueError(f"{path}: ARGS[{key!r}] is the same as {spec['same_as']}'s, which has no {key!r}")
        return other[key]
    unknown = sorted(set(spec) - ARG_KEYWORDS)
    if unknown:
        raise ValueError(f"{path}: ARGS[{key!r}] says {unknown[0]!r}{closest(unknown[0], ARG_KEYWORDS)} "
                         f"(an argument may say {', '.join(sorted(ARG_KEYWORDS))})")
    if not isinstance(spec.get("description"), str) or not ("type" in spec or "enum" in spec):
        raise ValueError(f"{path}: ARGS[{key!r}] needs a type (or enum) and a one-line description")
    try:
        Draft202012Validator.check_schema(spec)
    except SchemaError as e:
        raise ValueError(f"{path}: ARGS[{key!r}] is not a valid schema: {e.message}") from None
    if "default" in spec and not Draft202012Validator(spec).is_valid(spec["default"]):
        raise ValueError(f"{path}: ARGS[{key!r}]: the default {spec['default']!r} breaks its own schema")
    return spec


def get_method(name: str):
    """The Method subclass of method `name` (importing its module, and torch with it)."""
    from .train.method import MethodError

    try:
        source(name)
    except UnknownMethod as e:
        raise MethodError(f"unknown method {e}") from None
    module = importlib.import_module(module_name(name))
    if not hasattr(module, "METHOD"):
        raise MethodError(f"{module.__name__} defines no METHOD")
    return module.METHOD


def build(spec: dict):
    """The method of a training spec, built from its args: what a train job hands the training loop."""
    return get_method(spec["method"])(spec.get("args"))
