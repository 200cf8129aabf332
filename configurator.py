"""
Poor man's configurator, after nanoGPT. Run from a script with
    exec(open('configurator.py').read())
and call it as
    python train.py config/advxl_vitb_in1k.py --batch_size=32 --eps=4/255
Config files are executed over the script's globals in order, then each --key=value
overrides one global (value parsed as a Python literal; simple arithmetic such as 4/255 is
allowed; anything else is taken as a string). Unlike nanoGPT, an unknown key or a value of
the wrong type is a one-line error naming the key and the closest known ones.
"""
import ast
import difflib
import operator
import os
import sys

_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg}


def _eval_arith(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_eval_arith(node.left), _eval_arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_eval_arith(node.operand))
    raise ValueError


def parse_value(text):
    """'3' -> 3, 'True' -> True, '4/255' -> 0.0157, '(1, 2)' -> (1, 2), 'abc' -> 'abc'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return _eval_arith(ast.parse(text, mode='eval').body)
    except (ValueError, SyntaxError, ZeroDivisionError):
        return text


def _config_keys(g):
    # the knobs are the script's plain-value globals; modules, functions and _private are not
    return {k for k, v in g.items() if not k.startswith('_')
            and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))}


def _unknown(key, known):
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with a config file or see the globals at the top of the script"
    return f"unknown config key '{key}'{hint}"


def _check_type(key, old, new):
    if old is None or new is None or type(old) is type(new):
        return new
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return type(old)(new)
    raise SystemExit(f"config key '{key}' expects {type(old).__name__} (default {old!r}), got {type(new).__name__} {new!r}")


def apply_config(g, argv):
    """Apply config files and --key=value overrides in argv to the globals dict g."""
    known = _config_keys(g)
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise SystemExit(f"config file not found: {arg} (configs live in config/, e.g. config/demo_ft.py)")
            scope = dict(g)
            exec(open(arg).read(), scope)
            for key in _config_keys(scope) - known - {'__builtins__'}:
                raise SystemExit(f"{arg}: {_unknown(key, known)}")
            for key in known:
                if scope[key] is not g[key]:
                    g[key] = _check_type(key, g[key], scope[key])
            print(f"config: {arg}")
        else:
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise SystemExit(f"override '{arg}' needs a value: --{key}=VALUE")
            if key not in known:
                raise SystemExit(_unknown(key, known))
            g[key] = _check_type(key, g[key], parse_value(text))
            print(f"config: {key} = {g[key]!r}")


if __name__ != 'configurator':  # exec'd by a script: configure its globals from the command line
    apply_config(globals(), sys.argv[1:])
