"""Flags from the command line and from YAML flag files: `--config FILE.yaml`
(parse_args_with_config) and the YAML mappings it and OUTPUT_DIR/config.yaml are read with."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from errors import UserError, capped, shown


def parse_args_with_config(parser: argparse.ArgumentParser,
                           argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags, taking defaults from `--config FILE.yaml` (keys are flag names).

    Flags given on the command line override the file; an unknown key or a value outside a
    flag's choices is an error. Errors are one line (`error: ...`), without argparse's usage.
    """
    parser.error = _one_line_error  # type: ignore[method-assign]
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument("--config", type=str, default=None,
                            help="YAML file of flag values (keys are flag names); flags given on "
                                 "the command line override it.")

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            values = read_yaml_mapping(known.config, "config")
        except UserError as error:
            parser.error(str(error))
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"config {known.config} has unknown keys: {', '.join(unknown)}")
        parser.set_defaults(**{key: _config_value(actions[key], value, known.config, parser)
                               for key, value in values.items()})
    return parser.parse_args(argv)


def yaml_text(values: Dict[str, Any]) -> str:
    """values as the YAML that read_yaml_mapping reads back, keys sorted."""
    return yaml.safe_dump(values, sort_keys=True)


YAML_MAX_NODES = 100_000  # far above any flag file; bounds an alias bomb before it is built


def read_yaml_mapping(path: str | Path, what: str) -> Dict[str, Any]:
    """A YAML file of `name: value` pairs (flag files, OUTPUT_DIR/config.yaml), or a UserError
    naming it: unreadable, not YAML, not a mapping with string keys, or more than
    YAML_MAX_NODES values once its aliases are expanded (counted before anything is built)."""
    try:
        with open(path, encoding="utf-8") as handle:
            loader = yaml.SafeLoader(handle)
            try:
                node = loader.get_single_node()
                if node is not None:
                    _count_yaml_nodes(node, f"{what} {path}")
                values = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"cannot read {what} {path}: {capped(' '.join(str(error).split()), 300)}") from error
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"{what} {path} must be a mapping of flag names to values, got a {type(values).__name__}")
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise UserError(f"{what} {path}: keys must be flag names, got {shown(odd)}")
    return values


def _count_yaml_nodes(root: Any, where: str) -> None:
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > YAML_MAX_NODES:
            raise UserError(f"{where} expands to more than {YAML_MAX_NODES} values (aliases "
                            f"repeated inside each other?); write the values out")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)


def _config_value(action: argparse.Action, value: Any, config: str,
                  parser: argparse.ArgumentParser) -> Any:
    """A config file's value for one flag, checked like the command line checks it: the
    flag's number of values, its type (the same argparse type function) and its choices."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    where = f"config {config}: {action.dest}"
    if value is None:  # `key:` or `key: null`: the flag's own default, as if the key were absent
        return action.default
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            parser.error(f"{where}: {flag} is a switch, give true or false, got {shown(value)}")
        return value
    if isinstance(value, dict):
        parser.error(f"{where}: expects {'values' if action.nargs else 'one value'}, got a mapping")
    if action.nargs in (None, "?"):
        if isinstance(value, list):
            parser.error(f"{where}: {flag} takes one value, got the list {shown(value)}")
        items = [value]
    else:
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            parser.error(f"{where}: {flag} takes {action.nargs} values, e.g. [a, b], got {shown(value)}")
    converted = []
    for item in items:
        if action.type is not None:
            try:
                if isinstance(item, (list, dict)):
                    raise TypeError(f"expects a plain value, got {shown(item)}")
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                parser.error(f"{where}: {error}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where}: invalid choice {shown(item)} "
                         f"(choose from {', '.join(map(str, action.choices))})")
        converted.append(item)
    return converted[0] if action.nargs in (None, "?") else converted


def _one_line_error(message: str) -> None:
    print(f"error: {capped(message)} (see --help)", file=sys.stderr)
    sys.exit(2)
