"""What every entry point shares: a user mistake (a misspelt config key, a missing or broken config file, a bad
flag, a damaged input) ends in one line on stderr that names the file, key or step and what to do, exit code 2,
and nothing left behind. No traceback, nothing written.

  absl entry points (train, evaluate):  app.run(main, flags_parser=cli.absl_flags_parser())
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
from typing import Iterator, List, NoReturn, Optional, Tuple

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
                      if f.endswith(".py") and not f.startswith("_") and f != "common.py")
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


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> what its `get_config(arg)` returns (as ml_collections' --config does).
    Raises UserError with one line for a missing file or a config that fails to load (e.g. an unknown arg)."""
    msg = missing_config_message(spec)
    if msg:
        raise UserError(msg)
    path, colon, arg = spec.partition(":")
    try:
        mspec = importlib.util.spec_from_file_location(f"_imprag_config_{abs(hash(os.path.abspath(path)))}", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return mod.get_config(arg) if colon else mod.get_config()
    except Exception as e:  # a syntax error, an unknown config argument, ...
        raise UserError(f"{spec} failed to load: {type(e).__name__}: {first_line(e)}") from None


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


def config_argv(argv: List[str], name: str = "config") -> Tuple[Optional[str], List[str]]:
    """(the value of --name, or None; the dotted keys of its --name.a.b=v overrides) from a command line."""
    spec, keys = None, []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            break
        m = re.match(rf"^--?{re.escape(name)}(?:=(.*))?$", a, re.S)
        if m:
            if m.group(1) is not None:
                spec = m.group(1)
            elif i + 1 < len(argv):
                spec = argv[i + 1]
                i += 1
        else:
            m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", a)
            if m:
                keys.append(m.group(1))
        i += 1
    return spec, keys


def check_config_argv(argv: List[str], name: str = "config") -> None:
    """Fail (one line, exit 2) on a missing config file, a config that does not load, or an override key the
    config does not have. Loads the config file once more only to check override keys."""
    spec, keys = config_argv(argv, name)
    if spec is None:
        if keys:
            fail(f"--{name}.{keys[0]} overrides a config, but no --{name} FILE was given", prefix="config error")
        return
    msg = missing_config_message(spec)
    if msg:
        fail(msg, prefix="config error")
    if not keys:
        return
    try:
        c = load_config_file(spec)
        for key in keys:
            check_key(c, key, spec.partition(":")[0])
    except UserError as e:
        fail(str(e), prefix="config error")


def absl_flags_parser(config_flag: str = "config"):
    """A `flags_parser` for `absl.app.run`: checks --config (file, overrides) first, then parses the flags; every
    parse error is one line and exit code 2 (absl's own parser prints usage and exits 1; ml_collections raises a
    55-line traceback for a misspelt key and a double one for a missing file)."""

    def parse(argv):
        from absl import flags

        try:  # --flagfile=F: check the flags it holds too (ml_collections reads overrides the same way)
            expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
        except Exception as e:  # a missing flag file
            fail(first_line(e))
        check_config_argv(expanded, config_flag)
        try:
            rest = flags.FLAGS(argv)
        except SystemExit:
            raise
        except Exception as e:  # flags.Error, and what ml_collections raises while applying overrides
            spec, _ = config_argv(expanded, config_flag)
            if spec is not None:  # e.g. get_config(arg) raised: say what it said
                try:
                    load_config_file(spec)
                except UserError as ue:
                    fail(str(ue), prefix="config error")
            fail(first_line(e) + " (--helpshort lists the flags)")
        if config_flag in flags.FLAGS:
            value = flags.FLAGS[config_flag].value
            if type(value).__name__ == "_ErrorConfig":  # ml_collections defers a load failure to first use
                try:
                    err = object.__getattribute__(value, "_error")
                except AttributeError:
                    err = "the config file failed to load"
                fail(first_line(err), prefix="config error")
        return rest

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
