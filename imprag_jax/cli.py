"""What every entry point shares: a user mistake (a misspelt config key, a missing or broken config file, a bad
flag, a damaged input) ends in one line on stderr that names the file, key or step and what to do, exit code 2,
and nothing left behind. No traceback, nothing written.

  absl entry points (train, evaluate):  app.run(main, flags_parser=cli.absl_flags_parser()); cli.loaded_config()
  argparse entry points with a config:  c, argv = cli.config_from_argv(argv)   (then parse the rest)
  config overrides, every entry point:  --config.a.b=v  (lists and task weights as comma strings: 1,5 / qa:1,b:2)
  argparse entry points:                ap = cli.ArgumentParser(...)   (one-line usage errors, exit 2)
  any user error:                       cli.fail("what went wrong; what to do")
  a folder the command may create:      with cli.remove_if_unused(workdir): ...

This module imports nothing heavy (no JAX): it runs before a flag is parsed.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import os
import re
import sys
from typing import Iterator, List, NoReturn, Optional, Sequence, Tuple

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; the message names the file/key/step and says what to do."""


def first_line(e) -> str:
    """The first non-empty line of an exception's message (or of a string), stripped; the type name if empty."""
    s = str(e)
    for line in s.splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__ if isinstance(e, BaseException) else ""


def fail(msg: str, prefix: Optional[str] = "error") -> NoReturn:
    """Print `prefix: msg` as one line on stderr and exit with code 2."""
    sys.stdout.flush()
    msg = " ".join(str(msg).split("\n"))
    print(f"{prefix}: {msg}" if prefix else msg, file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def stderr_is_terminal() -> bool:
    """Progress bars only on a terminal: a redirected log gets none (tqdm's `disable=None` does the same)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (`prog: error: ...; --help lists the options`), exit code 2."""

    def error(self, message):
        fail(f"{message} (--help lists the options)", prefix=f"{self.prog}: error")


# ---------------------------------------------------------------------------------------------------- config files


def _config_candidates(path: str) -> List[str]:
    d = os.path.dirname(path) or "."
    try:
        return sorted(os.path.join(os.path.dirname(path), f) for f in os.listdir(d)
                      if f.endswith(".py") and not f.startswith("_"))
    except OSError:
        return []


def missing_config_message(spec: str) -> Optional[str]:
    """None when the file of `path.py[:arg]` exists, else what to say about it."""
    path = spec.partition(":")[0]
    if not path:
        return "--config is empty; pass a config file, e.g. --config configs/synthetic.py"
    if os.path.isfile(path):
        return None
    have = _config_candidates(path)
    names = {os.path.basename(h): h for h in have}
    close = difflib.get_close_matches(os.path.basename(path), list(names), n=1, cutoff=0.75)
    if close:
        hint = f"did you mean {names[close[0]]}?"
    elif have:
        hint = "configs there: " + ", ".join(os.path.basename(h) for h in have)
    else:
        hint = "pass a file such as configs/synthetic.py (paths are relative to the current folder)"
    return f"config file {path} not found ({hint})"


def _import_config(path: str):
    """The module of config file `path`. A file in a package folder (configs/ has an __init__.py) is imported as
    a member of it, with the folder above on sys.path: `from configs.llama3 import ...` works from any cwd. This is
    the one place the package puts a folder on sys.path."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(os.path.join(folder, "__init__.py")):
        mspec = importlib.util.spec_from_file_location(f"_imprag_config_{abs(hash(path))}", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return mod
    pkg, root = os.path.basename(folder), os.path.dirname(folder)
    loaded = sys.modules.get(pkg)
    if loaded is not None and os.path.abspath(list(getattr(loaded, "__path__", [""]))[0]) != folder:
        raise UserError(f"{path}: a package {pkg!r} from {list(loaded.__path__)[0]} is already imported; load "
                        f"configs from one checkout per process")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{pkg}.{stem}")


def load_config_file(spec: str, overrides: Sequence[Tuple[str, Optional[str]]] = ()):
    """`path/to/config.py[:arg]` -> what its `get_config(arg)` returns, with `overrides` ((dotted key, raw value)
    pairs from `--config.a.b=v`; a None value sets a boolean) applied, locked: a field set later that the config
    does not have is an error. Raises UserError with one line for a missing file, a config that fails to load (e.g.
    an unknown arg), a field the base config does not have, or an override that does not fit."""
    msg = missing_config_message(spec)
    if msg:
        raise UserError(msg)
    path, colon, arg = spec.partition(":")
    try:
        mod = _import_config(path)
        c = mod.get_config(arg) if colon else mod.get_config()
    except UserError:
        raise
    except Exception as e:  # a syntax error, an unknown config argument, ...
        raise UserError(f"{spec} failed to load: {type(e).__name__}: {first_line(e)}") from None
    from .config_base import check_fields, normalize, set_value
    from .model.config import ConfigError

    try:
        check_fields(c, path)
        normalize(c)
    except ConfigError as e:
        raise UserError(str(e)) from None
    for key, raw in overrides:
        check_key(c, key, path)
        node = c
        for part in key.split("."):
            node = node[part]
        if raw is None and not isinstance(node, bool):  # a bare --config.a.b sets a boolean only
            raise UserError(f"--config.{key} needs a value: --config.{key}=V")
        try:
            set_value(c, key, True if raw is None else raw)
        except ConfigError as e:  # "train.steps='abc': ..."
            raise UserError(f"--config.{e}") from None
    c.lock()
    return c


def _flat_keys(node, prefix: str = "") -> Iterator[str]:
    if not hasattr(node, "keys"):
        return
    for k in node.keys():
        full = f"{prefix}{k}"
        yield full
        try:
            child = node[k]
        except Exception:
            continue
        yield from _flat_keys(child, full + ".")


def check_key(c, key: str, source: str) -> None:
    """UserError `no key 'train.stepz' in configs/synthetic.py (did you mean train.steps?)` unless `key` (dotted)
    names a field of the config `c`."""
    node, done = c, []
    for part in key.split("."):
        if not hasattr(node, "keys"):
            raise UserError(f"no key {key!r} in {source}: {'.'.join(done)} is a value, not a section")
        if part not in node.keys():
            close = difflib.get_close_matches(key, list(_flat_keys(c)), n=1, cutoff=0.6)
            if close:
                hint = f"did you mean {close[0]}?"
            else:
                keys = sorted(node.keys())
                where = ".".join(done) or "the config"
                hint = f"{where} has {', '.join(keys[:12])}" + (", ..." if len(keys) > 12 else "")
            raise UserError(f"no key {key!r} in {source} ({hint})")
        node = node[part]
        done.append(part)


def split_config_argv(argv: List[str], name: str = "config"):
    """(the value of --name or None, its overrides as (dotted key, raw value or None) pairs, the other arguments)
    from a command line (argv[0] is the program). The one override syntax of every entry point:
    `--config.a.b=v` or `--config.a.b v`; `--config.a.b` / `--noconfig.a.b` set a boolean true / false."""
    spec, overrides, rest = None, [], argv[:1]
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest.extend(argv[i:])
            break
        m = re.match(rf"^--?{re.escape(name)}(?:=(.*))?$", a, re.S)
        o = re.match(rf"^--?(no)?{re.escape(name)}\.([^=]+)(?:=(.*))?$", a, re.S)
        if m:
            if m.group(1) is not None:
                spec = m.group(1)
            elif i + 1 < len(argv):
                spec = argv[i + 1]
                i += 1
        elif o:
            no, key, value = o.groups()
            if no:
                value = "false"
            elif value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value = argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(a)
        i += 1
    return spec, overrides, rest


def config_argv(argv: List[str], name: str = "config") -> Tuple[Optional[str], List[str]]:
    """(the value of --name, or None; the dotted keys of its --name.a.b=v overrides) from a command line."""
    spec, overrides, _ = split_config_argv(argv, name)
    return spec, [k for k, _ in overrides]


def config_from_argv(argv: List[str], name: str = "config", prefix: str = "config error"):
    """(the loaded, overridden, locked config or None when --name is absent; the other arguments). Fails (one
    line, exit 2) on a missing or broken config file, an unknown field, an override the config does not have or
    overrides without a config file."""
    spec, overrides, rest = split_config_argv(argv, name)
    if spec is None:
        if overrides:
            fail(f"--{name}.{overrides[0][0]} overrides a config, but no --{name} FILE was given", prefix=prefix)
        return None, rest
    try:
        return load_config_file(spec, overrides), rest
    except UserError as e:
        fail(str(e), prefix=prefix)


_LOADED = {}


def loaded_config(name: str = "config"):
    """The config that `absl_flags_parser` loaded from --name (None when the flag was not given)."""
    return _LOADED.get(name)


def absl_flags_parser(config_flag: str = "config"):
    """A `flags_parser` for `absl.app.run` with a `--config FILE[:arg]` string flag: loads the config with its
    `--config.a.b=v` overrides (`loaded_config()` returns it), then parses the other flags; every parse error is
    one line and exit code 2 (absl's own parser prints usage and exits 1)."""

    def parse(argv):
        from absl import flags

        try:  # --flagfile=F: its lines are read like the command line's
            expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
        except Exception as e:  # a missing flag file
            fail(first_line(e))
        _LOADED[config_flag], rest = config_from_argv(expanded, config_flag)
        spec, _, _ = split_config_argv(expanded, config_flag)
        if spec is not None:
            rest = rest[:1] + [f"--{config_flag}={spec}"] + rest[1:]
        try:
            return flags.FLAGS(rest)
        except SystemExit:
            raise
        except Exception as e:  # flags.Error
            fail(first_line(e) + " (--helpshort lists the flags)")

    return parse


# ---------------------------------------------------------------------------------------------------- folders


@contextlib.contextmanager
def remove_if_unused(path: Optional[str]):
    """Run the body; if it fails (an exception or a non-zero exit), remove `path` and the parent folders this
    command created for it, but only folders that did not exist before and are still empty."""
    created = []
    if path:
        p = os.path.abspath(path)
        while not os.path.exists(p):
            created.append(p)  # deepest first
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
    try:
        yield
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            for d in created:
                try:
                    os.rmdir(d)  # only an empty folder
                except OSError:
                    break
        raise
