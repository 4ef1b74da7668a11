"""Config files (ml_collections, one ``get_config()`` per file) and ``--config.a.b=value`` overrides.

An override must name an existing key, except inside the free-form keyword sections (``model.backbone_args``,
``model.head``, ``model.train_test``) where it may add one; its value is parsed as a Python literal (``1e-4``,
``(8, 11)``, ``True``) or kept as a string, and must fit the key's type. Errors name the key, the closest
existing one and what is known there.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file that cannot be loaded, or an override that does not fit it."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"lit_jax_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    # While it loads, the file's folder is importable: a config beside configs/base_*.py builds on them with a
    # plain ``from base_retinanet import retinanet_config``.
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a broken config file: say which
        raise ConfigError(f"config file {path}: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Sections that hold free-form keyword arguments of a constructor: an override may add a key there (the
# constructor then checks it and names the keys it knows). Everywhere else a key must exist already.
FREE_FORM_SECTIONS = ("model.backbone_args", "model.head", "model.train_test")


def _unknown_key(dotted: str, part: str, where: str, node: Any) -> ConfigError:
    import difflib

    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    close = difflib.get_close_matches(part, known, n=1)
    hint = f"; did you mean {'.'.join(filter(None, [where if where != '<top>' else '', close[0]]))!r}?" if close else ""
    return ConfigError(f"unknown config key {dotted!r}: no {part!r} under {where}{hint} (known: {known})")


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets ``config.<dotted> = literal(text)``. The key must exist (the error names the closest one) and the
    type must fit, except inside :data:`FREE_FORM_SECTIONS`, where a new key is added as parsed."""
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_key(dotted, part, ".".join(parts[:i]) or "<top>", node)
        node = node[part]
    leaf = parts[-1]
    parent = ".".join(parts[:-1])
    if isinstance(node, ml_collections.ConfigDict) and leaf not in node and parent in FREE_FORM_SECTIONS:
        try:
            node[leaf] = _parse_value(text)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config key {dotted!r}: {err}") from err
        return
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise _unknown_key(dotted, leaf, parent or "<top>", node)
    value = _parse_value(text)
    old = node[leaf]
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
        value = text
    if old is not None and not isinstance(old, ml_collections.ConfigDict) and type(value) is not type(old):
        raise ConfigError(f"config key {dotted!r} is {type(old).__name__} ({old!r}); got {text!r}")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key {dotted!r}: {err}") from err


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates ``--config.a.b=v`` / ``--config.a.b v`` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key = arg[len("--config."):]
            if "=" in key:
                key, text = key.split("=", 1)
            elif i + 1 < len(argv):
                i += 1
                text = argv[i]
            else:
                raise ConfigError(f"{arg} needs a value")
            overrides.append((key, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_config(path: str, overrides: Sequence[tuple[str, str]] = (),
                prepare: Optional[Callable[[ml_collections.ConfigDict], None]] = None) -> ml_collections.ConfigDict:
    """The config file's ``get_config()`` with the overrides applied.

    ``prepare(config)``, when given, runs before the overrides: a tool can add keys of its own there (with their
    defaults) so that ``--config.a.b=v`` may name them.
    """
    config = load_config_file(path)
    if prepare is not None:
        prepare(config)
    for key, text in overrides:
        apply_override(config, key, text)
    return config


EVAL_MODES = ("per_image", "bucket")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the numeric and choice values whose wrong sign, zero or spelling is meaningless.

    Run before any data is read or step taken; raises :class:`ConfigError` naming the key and the value.
    Sections or keys a config does not have are skipped.
    """

    def get(dotted: str) -> tuple[bool, Any]:
        node: Any = config
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def check(dotted: str, ok: Callable[[Any], bool], want: str, *, allow_none: bool = False) -> None:
        present, value = get(dotted)
        if not present or (allow_none and value is None):
            return
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"config key {dotted!r} = {value!r}: must be {want}")

    def ints_at_least(low: int) -> Callable[[Any], bool]:
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low

    positive = lambda v: _number(v) and v > 0  # noqa: E731
    non_negative = lambda v: _number(v) and v >= 0  # noqa: E731

    check("optimizer.lr", positive, "a finite number > 0")
    check("optimizer.weight_decay", non_negative, "a finite number >= 0")
    check("optimizer.eps", positive, "a finite number > 0")
    check("optimizer.betas", lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
          "two numbers in [0, 1)")
    # build_optimizer clips only when grad_clip is truthy: 0 / None mean "no clipping".
    check("optimizer.grad_clip", non_negative, "a finite number >= 0 (0 or None: no clipping)", allow_none=True)
    check("schedule.epochs", ints_at_least(1), "an integer >= 1")
    check("schedule.milestones", lambda v: all(ints_at_least(0)(m) for m in v), "integers >= 0 (epochs)")
    check("schedule.gamma", positive, "a finite number > 0")
    check("schedule.warmup_iters", ints_at_least(0), "an integer >= 0")
    check("schedule.warmup_ratio", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
    check("train.max_steps", ints_at_least(0), "an integer >= 0 (0: schedule.epochs)")
    check("train.checkpoint_every_steps", ints_at_least(1), "an integer >= 1")
    check("train.keep_checkpoints", ints_at_least(1), "an integer >= 1")
    check("train.log_every_steps", ints_at_least(1), "an integer >= 1")
    check("train.eval_every_epochs", ints_at_least(0), "an integer >= 0 (0: only at the end)")
    check("train.prefetch", ints_at_least(0), "an integer >= 0")
    check("train.stats_group_size", ints_at_least(0), "an integer >= 0 (0: the whole per-device batch)")
    check("train.reference_batch", ints_at_least(1), "an integer >= 1")
    check("data.global_batch_size", ints_at_least(1), "an integer >= 1")
    check("data.eval_global_batch_size", ints_at_least(1), "an integer >= 1")
    check("data.shuffle_buffer", ints_at_least(0), "an integer >= 0")
    check("data.max_instances", ints_at_least(1), "an integer >= 1")
    check("data.flip_prob", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
    check("data.img_scale", lambda v: len(v) == 2 and all(ints_at_least(1)(x) for x in v), "two integers >= 1")
    check("model.num_classes", ints_at_least(1), "an integer >= 1")
    check("eval.mode", lambda v: v in EVAL_MODES, " or ".join(repr(m) for m in EVAL_MODES))
    check("eval.show_num", ints_at_least(0), "an integer >= 0")
    check("eval.show_score_thr", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
    present_p, pretrained = get("model.pretrained")
    present_l, load_from = get("model.load_from")
    if present_p and present_l and pretrained and load_from:
        raise ConfigError(f"model.load_from={load_from!r} and model.pretrained={pretrained!r} are both set: "
                          "load_from starts from a whole detector (its backbone included); clear one of them")
