"""
Poor man's configurator, after nanoGPT. Run from a script with
    exec(open('configurator.py').read())
and call it as
    python train.py config/advxl_vitb_in1k.py --batch_size=32 --eps=4/255
Config files are executed over the script's globals in order, then each --key=value
overrides one global (value parsed as a Python literal; simple arithmetic such as 4/255 is
allowed; anything else is taken as a string). Unlike nanoGPT, an unknown key or a value of
the wrong type is a one-line error naming the key and the closest known ones.

A config may start from one base, saying so in its first statement:
    extends('base_finetune.py')     # a file named base_*.py, found next to the config
The base runs first, then the config's own lines. A base extends nothing, so every value
of a stage is in at most two files (its config and that base). The script keeps where each
key was set (`_config_origin`: a file or 'command line') and train.py's dry run prints it.
"""
import ast
import builtins
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


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


def _run_config(path, scope, origin, base_of=None):
    """Execute one config file into scope; origin[key] = the file that assigned key last."""
    if not os.path.isfile(path):
        raise SystemExit(f"{base_of}: base config not found: {path}" if base_of else
                         f"config file not found: {path} (configs live in config/, e.g. config/demo_ft.py)")
    try:
        tree = ast.parse(open(path).read(), path)
    except SyntaxError as e:
        raise SystemExit(f"{path}:{e.lineno}: {e.msg}: {(e.text or '').strip()}")
    if _calls(tree, 'exec'):
        raise SystemExit(f"{path}: exec() in a config: start from a base with extends('base_<name>.py') as its first line")
    ext = _calls(tree, 'extends')
    if ext and base_of:
        raise SystemExit(f"{path}: a base extends nothing (it is extended by {base_of}): copy the values it needs into it")
    if ext and (len(ext) > 1 or not (isinstance(tree.body[0], ast.Expr) and tree.body[0].value is ext[0])):
        raise SystemExit(f"{path}: extends(...) is allowed once, as the config's first statement")

    def extends(name):
        if not os.path.basename(name).startswith('base_'):
            raise SystemExit(f"{path}: extends('{name}'): a config extends only a base (config/base_*.py), "
                             f"not another config; copy the values it needs")
        _run_config(os.path.normpath(os.path.join(os.path.dirname(path), name)), scope, origin, base_of=path)
    scope['extends'] = extends
    exec(builtins.compile(tree, path, 'exec'), scope)  # builtins.compile: train.py has a knob named compile
    scope.pop('extends', None)
    origin.update({n.id: path for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)})


def apply_config(g, argv):
    """Apply config files and --key=value overrides in argv to the globals dict g; returns
    where each key was set last: {key: config file or 'command line'}."""
    known = _config_keys(g)
    origin = {}
    for arg in argv:
        if not arg.startswith('--'):
            scope, set_here = dict(g), {}
            _run_config(arg, scope, set_here)
            for key in _config_keys(scope) - known - {'__builtins__'}:
                raise SystemExit(f"{set_here.get(key, arg)}: {_unknown(key, known)}")
            for key in known:
                if scope[key] is not g[key]:
                    g[key] = _check_type(key, g[key], scope[key])
            origin.update({k: f for k, f in set_here.items() if k in known})
            print(f"config: {arg}")
        else:
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise SystemExit(f"override '{arg}' needs a value: --{key}=VALUE")
            if key not in known:
                raise SystemExit(_unknown(key, known))
            g[key] = _check_type(key, g[key], parse_value(text))
            origin[key] = 'command line'
            print(f"config: {key} = {g[key]!r}")
    return origin


def read_config(path):
    """{key: value} of what a config file and its base set (no script defaults)."""
    scope, origin = {}, {}
    _run_config(path, scope, origin)
    return {k: scope[k] for k in origin if k in scope and not k.startswith('_')}  # (not a comprehension's names)


def config_values(g):
    keys = _config_keys(g)
    return {k: v for k, v in g.items() if k in keys}  # in the script's order


def resolved_config(g, defaults, origin):
    """One line per key whose value differs from the script's default, with what set it."""
    return [f"  {k} = {g[k]!r}  ({origin.get(k, '?')})" for k in defaults if g[k] != defaults[k]]


if __name__ != 'configurator':  # exec'd by a script: configure its globals from the command line
    _config_defaults = config_values(globals())
    _config_origin = apply_config(globals(), sys.argv[1:])
