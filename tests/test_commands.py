"""
Every command the project documents works as written. Each `train.py` (also under torchrun, or
as the arguments of a scripts/slurm/*.sbatch job),
`eval_autoattack.py`, `make_shards.py` and `export.py` command in README.md, docs/*.md, train.py's docstring
and every config's header is run here the cheapest honest way:

- train.py: `--dry_run=True --plan_memory=False` in this process (fresh globals per command,
  as tests/test_train.py does), in a scratch folder where config/ is the project's. A stage that
  starts from another run (its --init_from=out/X, or its config's init_from) finds a stand-in
  for out/X there, so the dry run makes the same stage check a real run makes: a checkpoint
  written by checkpoint.save_checkpoint with the model_args and config of the stage that writes
  out/X (the config, documented command or default run whose out_dir is out/X, itself dry-run
  here), and a state dict of that architecture's keys and shapes whose tensors are zero-stride
  views of one zero (no bytes, nothing a dry run reads). Data paths stay as written: a dry run
  touches no data.
- make_shards.py: run for real, on a 4-image ImageFolder put where the command's source
  folder is (/data/... paths moved into the scratch folder).
- eval_autoattack.py: its --dry_run, with the same stand-ins for --ckpt; skipped while the
  script has no --dry_run.
- export.py: run for real on the stand-in of its run (zero weights), into the scratch folder.
A command with a placeholder (`...`, `<config>`, `--key=value`) is a template and is left out.
"""
import ast
import contextlib
import glob
import io
import os
import re
import shlex
import sys

import pytest
import torch
from PIL import Image

import configurator
from checkpoint import save_checkpoint
from model import build_model, create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
SCRIPTS = ('train.py', 'eval_autoattack.py', 'make_shards.py', 'export.py')
TEMPLATE = re.compile(r'\.\.\.|…|<|^--key=value$')  # `train.py config/x.py --key=value`: how to call, no command
LAUNCHER = re.compile(r'(?:^|(?<=\s))(?:[\w./-]*/)?(?:python3?|torchrun)\s')


# ----------------------------------------------------------------------------- finding the commands
def commands_in(text):
    """(script, args) of each command in one line of shell (`a && b`, trailing # comments)."""
    found = []
    for seg in re.split(r'&&|\|\||;|\|', text):
        m = LAUNCHER.search(seg)
        if m is None:
            toks = seg.split()
            slurm = [i for i, t in enumerate(toks) if re.fullmatch(r'scripts/slurm/\w+\.sbatch', t)]
            if slurm:  # sbatch ... scripts/slurm/x.sbatch <train.py's arguments>
                found.append(('train.py', shlex.split(' '.join(toks[slurm[0] + 1:]), comments=True)))
                continue
            # a bare `config/x.py --key=value` is train.py's arguments (README tables)
            if toks and re.fullmatch(r'config/\w+\.py', toks[0]) and any(t.startswith('--') for t in toks[1:]):
                found.append(('train.py', toks))
            continue
        try:
            toks = shlex.split(seg[m.start():], comments=True)
        except ValueError:
            toks = seg[m.start():].split()
        rest = toks[1:]
        if toks[0].endswith('torchrun'):
            while rest and rest[0].startswith('-'):
                rest = rest[1:]
        if rest and os.path.basename(rest[0]) in SCRIPTS:
            found.append((os.path.basename(rest[0]), rest[1:]))
    return found


def joined_lines(text):
    return text.replace('\\\n', ' ').splitlines()


def markdown_lines(text):
    """Shell lines of fenced blocks, inline code spans, and prose lines that start with a command."""
    fence = re.compile(r'^[ \t]*```[^\n]*\n(.*?)^[ \t]*```', re.S | re.M)
    lines = [l for block in fence.findall(text) for l in joined_lines(block)]
    prose = fence.sub('', text)
    lines += [span.replace('\n', ' ') for span in re.findall(r'`([^`]+)`', prose)]
    return lines + [l for l in prose.splitlines() if LAUNCHER.match(l.strip() + ' ')]


def header_lines(path):
    head = []
    for line in open(path):
        if not line.startswith('#'):
            break
        head.append(line[1:])
    return joined_lines(''.join(head))


def docstring_lines(path):
    doc = ast.get_docstring(ast.parse(open(path).read())) or ''
    return [l.strip()[2:] for l in joined_lines(doc) if l.strip().startswith('$ ')]


def documented_commands():
    """[(where, script, args)], each command once, in the order found."""
    sources = [('README.md', markdown_lines(open(os.path.join(ROOT, 'README.md')).read()))]
    sources += [(os.path.relpath(p, ROOT), markdown_lines(open(p).read()))
                for p in sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))]
    sources.append(('train.py', docstring_lines(TRAIN)))
    sources += [(os.path.relpath(p, ROOT), header_lines(p)) for p in sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))]
    seen, out = set(), []
    for where, lines in sources:
        for line in lines:
            for script, args in commands_in(line):
                if not any(TEMPLATE.search(a) for a in args) and (script, tuple(args)) not in seen:
                    seen.add((script, tuple(args)))
                    out.append((where, script, args))
    return out


COMMANDS = documented_commands()


def command_id(c):
    return f"{c[0]}: {c[1]} {' '.join(c[2])}"[:150]


# ----------------------------------------------------------------------------- running them
def run_train(argv, cwd):
    """train.py in this process with argv, in cwd: (exit code or message, stdout, its globals)."""
    g = {'__name__': '__main__', '__file__': TRAIN}
    out, old = io.StringIO(), (sys.argv, os.getcwd())
    sys.argv = ['train.py', *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            exec(compile(open(TRAIN).read(), TRAIN, 'exec'), g)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv, _ = old
        os.chdir(old[1])
    return code, out.getvalue(), g


def dry(argv):
    return [*argv, '--dry_run=True', '--plan_memory=False']


class Runs:
    """Stand-ins for the runs (out/X) that documented commands start from, built on demand."""

    def __init__(self, root):
        self.root = root
        self.cache = os.path.join(root, 'runs')
        code, _, g = run_train(dry([]), self.workdir('defaults'))
        assert code == 0, code
        self.defaults = g['config']  # train.py's defaults (and dry_run=True, plan_memory=False)
        # who writes out/X: a config alone, else a documented command, else the default (demo) run
        argvs = [[os.path.relpath(p, ROOT)] for p in sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))]
        argvs += [args for _, script, args in COMMANDS if script == 'train.py'] + [[]]
        self.writer = {}
        for argv in argvs:
            try:
                self.writer.setdefault(self.resolve(argv)['out_dir'], argv)
            except SystemExit:
                pass  # a broken command: its own test says why

    def resolve(self, argv):
        g = dict(self.defaults)
        old = os.getcwd()
        os.chdir(ROOT)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                configurator.apply_config(g, argv)
        finally:
            os.chdir(old)
        g['out_dir'] = os.path.normpath(g['out_dir'])
        return g

    def workdir(self, name, runs=()):
        """A fresh scratch folder with config/ and the stand-ins for the given runs (out/X)."""
        d = os.path.join(self.root, 'work', re.sub(r'\W+', '_', name)[:80])
        n = 0
        while os.path.exists(f"{d}_{n}"):
            n += 1
        d = f"{d}_{n}"
        os.makedirs(d)
        os.makedirs(os.path.join(ROOT, 'data_cache'), exist_ok=True)
        for shared in ('config', 'data_cache'):  # the configs; the demo data, generated once (demo_data.ensure_demo)
            os.symlink(os.path.join(ROOT, shared), os.path.join(d, shared))
        for run in runs:
            self.link(d, run)
        return d

    def link(self, d, run):
        os.makedirs(os.path.dirname(os.path.join(d, run)), exist_ok=True)
        os.symlink(self.stand_in(run), os.path.join(d, run))

    def sources(self, argv):
        """The runs argv's stage starts from that some documented stage writes."""
        init = os.path.normpath(self.resolve(argv)['init_from'])
        return [init] if init in self.writer else []

    def dry_run(self, argv, name):
        return run_train(dry(argv), self.workdir(name, self.sources(argv)))

    def stand_in(self, run):
        folder = os.path.join(self.cache, run)
        if os.path.isdir(folder):
            return folder
        argv = self.writer[run]
        code, out, g = self.dry_run(argv, run)
        assert code == 0, f"{run} is written by `train.py {' '.join(argv)}`, whose dry run fails: {code}"
        args, cfg = dict(g['model_args']), g['config']
        if cfg['data'] == 'webdataset':  # as train.py: a web stage's tower ends in its text tower's width
            from open_clip_interop import _open_clip
            args['embed_out'] = _open_clip().get_model_config(cfg['text_tower'])['embed_dim']
        os.makedirs(folder)
        save_checkpoint({'model': shaped_state(build_model, args), 'model_args': args, 'config': cfg,
                         'samples_seen': cfg['samples']}, folder, cfg['samples'])
        return folder


def shaped_state(build, *args):
    """The state dict of build(*args)'s architecture, every tensor a zero-stride view of one zero."""
    with torch.device('meta'):
        shapes = build(*args).state_dict()
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in shapes.items()}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    return Runs(str(tmp_path_factory.mktemp('commands')))


def moved(runs, arg):
    return os.path.join(runs.root, arg[1:]) if arg.startswith('/data/') else arg  # placeholder data paths


def imagenet_val_names(root):
    """RobustBench's 5000 val files as empty files: what eval_autoattack's dry run checks (it decodes none)."""
    if os.path.isdir(os.path.join(root, 'val')):
        return
    for f in open(os.path.join(ROOT, 'assets', 'imagenet_test_image_ids.txt')).read().split():
        os.makedirs(os.path.join(root, 'val', os.path.dirname(f)), exist_ok=True)
        open(os.path.join(root, 'val', f), 'w').close()


def tiny_imagefolder(root):
    for c in ('a', 'b'):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(2):
            Image.new('RGB', (40, 30), (60 * i, 100, 200)).save(os.path.join(root, c, f'{i}.jpg'))


@pytest.mark.parametrize('cmd', COMMANDS, ids=command_id)
def test_documented_command_runs(cmd, runs):
    where, script, args = cmd
    if script == 'train.py':
        code, out, _ = runs.dry_run(args, command_id(cmd))
        assert code == 0 and 'compute_1e10_gflops=' in out, f"{where}: `train.py {' '.join(args)}`: {code}"
    elif script == 'make_shards.py':
        d = runs.workdir(command_id(cmd))
        args = [moved(runs, a) for a in args]
        pos = [a for a in args if not a.startswith('-')]
        tiny_imagefolder(pos[0])
        import make_shards
        with contextlib.redirect_stdout(io.StringIO()):
            manifest = make_shards.main(args)
        assert manifest and os.path.exists(os.path.join(pos[1], 'manifest.json')), f"{where}: make_shards.py {args}"
    elif script == 'export.py':
        import export
        d = runs.workdir(command_id(cmd), [os.path.normpath(args[0])])
        old = os.getcwd()
        os.chdir(d)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                out = export.main(args)
        finally:
            os.chdir(old)
        assert os.listdir(os.path.join(d, out)), f"{where}: `export.py {' '.join(args)}`"
    else:
        if '--dry_run' not in open(os.path.join(ROOT, 'eval_autoattack.py')).read():
            pytest.skip('eval_autoattack.py has no --dry_run yet')
        import eval_autoattack
        d = runs.workdir(command_id(cmd))
        args = [moved(runs, a) for a in args]
        opt = lambda k: args[args.index(k) + 1] if k in args else None
        ckpt = os.path.normpath(opt('--ckpt'))
        if ckpt in runs.writer:
            runs.link(d, ckpt)
        elif opt('--arch') and not os.path.isabs(ckpt):  # a downloaded timm state dict of that preset
            torch.save(shaped_state(create_model, opt('--arch')), os.path.join(d, ckpt))
        if opt('--data'):
            imagenet_val_names(opt('--data'))
        old = os.getcwd()
        os.chdir(d)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                result = eval_autoattack.main([*args, '--dry_run'])
        except SystemExit as e:
            result = e.code
        finally:
            os.chdir(old)
        assert isinstance(result, dict) and result.get('dry_run'), f"{where}: `eval_autoattack.py {' '.join(args)}`: {result}"


def test_commands_are_found():
    """The extraction still sees the documented pipeline (if README moves, this says so)."""
    cmds = {(s, ' '.join(a)) for _, s, a in COMMANDS}
    assert ('train.py', '') in cmds and ('train.py', 'config/demo_ft.py') in cmds
    assert ('train.py', 'config/advxl_ft_in1k_vitl.py --init_from=out/advxl_vitl_laion') in cmds
    assert any(s == 'make_shards.py' for s, _ in cmds) and any(s == 'eval_autoattack.py' for s, _ in cmds)
    for p in glob.glob(os.path.join(ROOT, 'config', '*.py')):  # each stage's header says how to run it
        assert os.path.basename(p).startswith('base_') or any(commands_in(l) for l in header_lines(p)), p


# ----------------------------------------------------------------------------- the stage check itself
def finetune_configs():
    import stage
    return stage.FINETUNE_CONFIGS


def test_finetune_config_map_names_each_models_own_file(runs):
    for preset, path in finetune_configs().items():
        assert os.path.isfile(os.path.join(ROOT, path)), path
        assert runs.resolve([path])['model'] == preset, path


def test_another_models_checkpoint_is_refused_naming_its_config(runs):
    code, _, _ = runs.dry_run(['config/advxl_ft_in1k.py', '--init_from=out/advxl_vitl_laion'], 'refuse')
    assert isinstance(code, str) and 'holds a vit_large_patch16' in code and len(code.splitlines()) == 1, code
    named = re.search(r'config/\w+\.py', code).group(0)
    assert named == 'config/advxl_ft_in1k_vitl.py' and os.path.isfile(os.path.join(ROOT, named))


def test_dry_run_refuses_a_missing_init_from(runs):
    code, _, _ = run_train(dry(['config/advxl_ft_in1k_vitl.py']), runs.workdir('missing'))
    assert isinstance(code, str) and 'init_from out/advxl_vitl_in1k not found' in code and '\n' not in code
    code, out, _ = run_train(dry(['config/advxl_ft_in1k_vitl.py', '--init_from=scratch']), runs.workdir('alone'))
    assert code == 0 and 'compute_1e10_gflops=' in out


def test_dry_run_prints_each_changed_key_and_what_set_it(runs):
    code, out, _ = runs.dry_run(['config/advxl_ft_in1k.py', '--eps=2/255'], 'origins')
    assert code == 0, code
    lines = {l.split(' = ')[0].strip(): l for l in out.splitlines() if l.startswith('  ') and ' = ' in l}
    assert lines['model'].endswith('(config/advxl_ft_in1k.py)')
    assert lines['pgd_steps'].endswith('(config/base_finetune.py)')
    assert lines['eps'].endswith('(command line)')
    assert 'seed' not in lines and 'dry_run' in lines  # only what differs from train.py's defaults


def test_a_stage_from_a_stand_in_plans_its_memory(runs):
    """The memory plan (off above, for time; tests/test_train.py plans every paper config alone) of a
    stage whose architecture comes from its source run: FARE keeps the CLIP demo tower's embedding."""
    code, out, g = run_train(['config/demo_fare.py', '--dry_run=True'],
                             runs.workdir('plan', runs.sources(['config/demo_fare.py'])))
    assert code == 0 and 'peak_mem_gib=' in out, code
    assert g['model_args']['embed_out'] == 256  # the stand-in's, as the CLIP stage's checkpoint has it
