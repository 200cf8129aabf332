"""The install the README gives for the paper's runs brings every package the paper configs use."""
import importlib
import os
import re

import pytest

import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, 'config')) if not f.startswith('demo'))


def config_scope(name):
    return configurator.read_config(os.path.join(ROOT, 'config', name))


def listed(req_file):
    """Package names a requirements file brings, following -r includes."""
    names = set()
    for line in open(os.path.join(ROOT, req_file)):
        line = line.split('#')[0].strip()
        if line.startswith('-r'):
            names |= listed(line[2:].strip())
        elif line:
            names.add(re.split(r'[<>=!~\[ ]', line)[0].lower())
    return names


@pytest.mark.parametrize('cfg', CONFIGS)
def test_paper_config_imports_resolve(cfg):
    import open_clip_interop
    oc = open_clip_interop._open_clip()
    scope = config_scope(cfg)
    needed = {'torch', 'torchvision', 'numpy', 'pillow', 'open_clip_torch', 'webdataset'}
    for tower in {scope.get('text_tower', 'ViT-L-14-CLIPA'), 'ViT-L-14-CLIPA'}:  # (a ft stage rebuilds its source's)
        name = open_clip_interop.parse_open_clip_spec(tower)[0] if open_clip_interop.is_open_clip_spec(tower) else tower
        if oc.get_model_config(name)['text_cfg'].get('hf_tokenizer_name'):
            needed.add('transformers')
    assert needed <= listed('requirements-paper.txt'), needed - listed('requirements-paper.txt')
    modules = {'open_clip_torch': 'open_clip', 'pillow': 'PIL'}
    for pkg in needed:
        importlib.import_module(modules.get(pkg, pkg))
    if 'transformers' in needed:
        from open_clip.tokenizer import HFTokenizer  # noqa: F401 (what load_text_tower builds)
        from transformers import AutoTokenizer  # noqa: F401
