"""Settings: presets (TOML data) and `section.field=value` overrides read into a Config,
a run's saved config.json read back (fields of earlier layouts under their new names), and
every field's one-line doc (`echolm presets`, `echolm STAGE --help`).

A preset (``echolm/presets/NAME.toml`` or a path to any TOML file) names a whole
configuration; any field can then be overridden from the CLI with ``--set rl.group_size=4``.
Unknown sections, fields or wrongly typed values are user errors, reported with the field name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from echolm.config import Config, LoopConfig, RLConfig, RLHFConfig
from echolm.errors import EchoError

PRESET_DIR = Path(__file__).parent / "presets"

# Where fields of earlier layouts went (a run's saved config.json is read through this, and a
# preset or --set that uses an old name is told the new one). None: no longer a field.
MOVED: dict[str, str | None] = {
    **{f"grpo.{f.name}": f"rl.{f.name}" for f in dataclasses.fields(RLConfig)
       if f.name not in {g.name for g in dataclasses.fields(LoopConfig)}},
    **{f"ppo.{f.name}": f"rlhf.{f.name}" for f in dataclasses.fields(RLHFConfig)
       if f.name not in {g.name for g in dataclasses.fields(LoopConfig)}},
    "pref.annotator": "data.rankings_annotator",
    "pref.heldout_fraction": "data.rankings_heldout_fraction",
    "pref.rank_prompts": "rank.prompts", "pref.rank_minutes": "rank.max_minutes",
    "pref.rank_k": "rank.k", "pref.rank_temperatures": "rank.temperatures",
    "pref.annotator_noise": "rank.annotator_noise",
    "pref.rm_loss": "rm.loss", "pref.margin": "rm.margin", "pref.center_coef": "rm.center_coef",
    "pref.rm_epochs": "rm.epochs",
    "pref.dpo_beta": "dpo.beta", "pref.dpo_loss": "dpo.loss", "pref.dpo_epochs": "dpo.epochs",
    "pref.dpo_ptx_coef": "dpo.ptx_coef", "pref.dpo_nll_coef": "dpo.nll_coef",
    "pref.dpo_temperatures": "dpo.temperatures",
    **{f"{stage}.{name}": None for stage in ("pretrain", "sft", "rl", "rm", "rlhf", "dpo")
       for name in ("log_every",)},
    **{f"{stage}.{name}": None for stage in ("sft", "rm", "dpo")
       for name in ("eval_tokens", "sample_every")},
    **{f"{stage}.{name}": None for stage in ("rl", "rlhf")
       for name in ("seq_len", "micro_batch", "grad_accum", "eval_every", "eval_tokens",
                    "sample_every") if not (stage == "rlhf" and name == "eval_every")},
}
# why a loop field is not one of a rollout stage's (what the user asked for instead)
_ROLLOUT_SIZE = {"rl": "rl.prompts_per_step x rl.group_size rollouts up to rl.max_tokens",
                 "rlhf": "rlhf.prompts_per_step x rlhf.samples_per_prompt rollouts up to "
                         "rlhf.max_tokens"}



def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert a TOML value to the dataclass field's type; name the field on failure."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (inner,) = typing.get_args(typ)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, inner, where) for v in items]
    elif origin is tuple:
        args = typing.get_args(typ)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, t, where) for v, t in zip(value, args, strict=True))
    elif origin in (typing.Union, types.UnionType):
        for t in typing.get_args(typ):
            try:
                return _coerce(value, t, where)
            except EchoError:
                pass
    type_name = getattr(typ, "__name__", str(typ))
    raise EchoError(f"{where}: expected {type_name}, got {value!r}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # cached: it evaluates every annotation (~1 ms a call)


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    name = f"{section}.{key}"
    if name in MOVED:
        if MOVED[name] is not None:
            raise EchoError(f"{where}: {name} is now {MOVED[name]}")
        if section in _ROLLOUT_SIZE:
            raise EchoError(f"{where}: {name} is not a setting of the {section} stage: one "
                            f"step is one batch of {_ROLLOUT_SIZE[section]} tokens")
        raise EchoError(f"{where}: {name} is not a setting of the {section} stage "
                        "(nothing reads it)")
    sections = {f.name for f in dataclasses.fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if section not in sections:
        known = ", ".join(sorted(sections))
        raise EchoError(f"{where}: unknown section '{section}' (known: {known})")
    obj = getattr(cfg, section)
    hints = _type_hints(type(obj))
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise EchoError(f"{where}: unknown field '{section}.{key}' (known: {known})")
    setattr(obj, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(preset: str = "micro", overrides: list[str] | None = None) -> Config:
    """Build a Config from a preset name (or TOML path) plus ``section.field=value`` overrides."""
    path = Path(preset)
    if not (path.suffix == ".toml" and path.exists()):
        path = PRESET_DIR / f"{preset}.toml"
        if not path.exists():
            raise EchoError(f"unknown preset '{preset}' (known: {', '.join(list_presets())})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EchoError(f"{path}: invalid TOML: {e}") from None
    cfg = Config(preset=path.stem)
    for section, values in data.items():
        if not isinstance(values, dict):
            raise EchoError(f"{path}: top-level key '{section}' must be a [section]")
        for key, value in values.items():
            _apply(cfg, section, key, value, str(path))
    apply_overrides(cfg, overrides or [])
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise EchoError(f"override '{item}': expected section.field=value")
        lhs, rhs = item.split("=", 1)
        section, key = lhs.strip().split(".", 1)
        try:  # TOML value syntax first (numbers, bools, lists, quoted strings) ...
            value = tomllib.loads(f"v = {rhs}")["v"]
        except tomllib.TOMLDecodeError:  # ... else a bare string
            value = rhs
        _apply(cfg, section, key, value, f"override '{item}'")
    cfg.validate()


def config_from_dict(d: dict[str, Any], where: str = "saved config") -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. a run directory's config.json, named by
    `where` in errors); a field saved under an earlier layout's name is read under its new
    one (MOVED)."""
    cfg = Config(preset=str(d.get("preset", "")))
    for section, values in d.items():
        if dataclasses.is_dataclass(getattr(cfg, section, None)) and not isinstance(values,
                                                                                   dict):
            raise EchoError(f"{where}: '{section}' should be an object of settings, got "
                            f"{values!r}")
        if isinstance(values, dict):
            for key, value in values.items():
                name = f"{section}.{key}"
                if name in MOVED:
                    if MOVED[name] is None:
                        continue
                    section_now, key_now = MOVED[name].split(".")
                    _apply(cfg, section_now, key_now, value, where)
                else:
                    _apply(cfg, section, key, value, where)
    if "pref" in d and "ptx_rows" in d.get("ppo", {}):  # DPO read RLHF's ptx_rows then
        cfg.dpo.ptx_rows = d["ppo"]["ptx_rows"]
    return cfg


def config_changes(old: Config, new: Config) -> list[str]:
    """What `new` changes of `old`, one "section.field: old -> new" per field, in the
    config's order after the preset's name."""
    def flat(cfg: Config) -> dict[str, Any]:
        return {f"{section}.{key}" if isinstance(values, dict) else section: value
                for section, values in json.loads(json.dumps(cfg.to_dict())).items()
                for key, value in (values.items() if isinstance(values, dict) else [(0, values)])}

    a, b = flat(old), flat(new)
    keys = ["preset", *(k for k in b if k != "preset")]
    return [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b[k])}" for k in keys
            if a.get(k) != b[k]]


def field_docs(cls: type) -> dict[str, str]:
    """A config section's field -> its one-line doc: the comment after the field, with any
    comment lines right above it in front (as the fields are documented in echolm/config.py),
    from the section's class and the classes it extends (a redeclared field: its own)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        src = textwrap.dedent(inspect.getsource(klass))
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline)
                    if t.type == tokenize.COMMENT}
        above: list[str] = []
        for i, line in enumerate(src.splitlines(), 1):
            if line.strip().startswith("#"):
                above.append(comments[i])
                continue
            m = re.match(r"    (\w+): [^=]+=", line)
            if m:
                parts = above + ([comments[i]] if i in comments else [])
                if parts:
                    docs[m.group(1)] = " ".join(parts)
            above = []
    return docs


def _section_doc(section: object) -> str:
    return " ".join((type(section).__doc__ or "").split())


def settings_help(sections: list[str]) -> str:
    """`--help` text for the settings of `sections`: each field's default and one-line doc."""
    cfg = Config()
    lines = ["settings (--set SECTION.FIELD=VALUE; a preset's values: echolm presets NAME):"]
    for name in sections:
        section = getattr(cfg, name)
        docs = field_docs(type(section))
        head = _section_doc(section)
        lines += ["", f"  [{name}] {head}"]
        for key, value in cfg.to_dict()[name].items():
            lines.append(f"    {name}.{key} = {_toml_value(value)}  {docs.get(key, '')}".rstrip())
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v)  # JSON's numbers, strings, booleans and lists are TOML's too


def to_toml(cfg: Config) -> str:
    """The whole configuration as a preset file, every field with its one-line doc."""
    out = [f"# preset {cfg.preset or '(none)'}: every field, with what it does"]
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        docs = field_docs(type(section))
        head = _section_doc(section)
        out += ["", f"[{f.name}]" + (f"  # {head}" if head else "")]
        for key, value in cfg.to_dict()[f.name].items():
            doc = docs.get(key, "")
            out.append(f"{key} = {_toml_value(value)}" + (f"  # {doc}" if doc else ""))
    return "\n".join(out) + "\n"
