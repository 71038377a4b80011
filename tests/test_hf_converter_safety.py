"""The converters never lose work and fail in one line on damaged input.

One 1-rank spawn writes a small HF directory (one file and a sharded copy) and converts it into a
training checkpoint; the tests copy these sources, damage or aim at them, and run the command-line
tools' ``main`` in this process (every refusal below happens before a process group or a model
exists); two cases run the real scripts as subprocesses. Each asserts: exit status 1, one line on
stderr naming the problem (and the file), the sources unchanged, nothing written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_lasp.testing import spawn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer")
TO_HF, TO_CKPT = "convert_checkpoint_to_hf.py", "convert_hf_to_checkpoint.py"


def _make_sources(rank, world_size, root):
    import torch

    from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
    from megatron_lasp.hf.from_hf import convert_hf_to_checkpoint
    from megatron_lasp.hf.mapping import CONFIG_FIELDS
    from megatron_lasp.hf.modeling_linear_lm import LaspLinearLMForCausalLM
    from megatron_lasp.hf.to_hf import write_hf_directory
    from megatron_lasp.hf.tokenizer import tokenizer_from_settings

    settings = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER}
    tokenizer = tokenizer_from_settings(settings)
    config = LaspLinearLMConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=48)
    fields = {hf: getattr(config, hf) for _, hf in CONFIG_FIELDS}
    fields["vocab_size"] = config.vocab_size
    torch.manual_seed(0)
    tensors = LaspLinearLMForCausalLM(config).state_dict()
    for name, max_shard in (("hf", 10**9), ("hf_sharded", 40_000)):
        os.makedirs(os.path.join(root, name))
        write_hf_directory(os.path.join(root, name), tensors, fields, tokenizer, max_shard_size=max_shard)
    convert_hf_to_checkpoint(os.path.join(root, "hf"), os.path.join(root, "ckpt"), iteration=2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("converter_sources")
    spawn(_make_sources, 1, args=(str(root),), init_process_group=False, timeout=300)
    assert sorted(os.listdir(root / "ckpt")) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    return root


def _main(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(REPO, "tools", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _snapshot(path):
    """{relative path: sha256 (files) or link target or 'dir'} of everything under ``path``."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = "dir"
            else:
                with open(full, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _fails(capsys, script, args, expected):
    """Run ``script``'s main: exit 1 and one stderr line that contains every ``expected`` piece."""
    capsys.readouterr()
    rc = _main(script)(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, (args, captured.err)
    assert lines[0].startswith(f"{script}: error: "), lines
    for piece in [expected] if isinstance(expected, str) else expected:
        assert piece in lines[0], (piece, lines[0])
    assert "wrote" not in captured.out
    return lines[0]


def _refuses_all(capsys, work, script, cases, force):
    """Each ``(load, save, expected)`` fails naming ``expected`` and --save, and leaves ``work`` as it was."""
    before = _snapshot(work)
    for load, save, expected in cases:
        args = ["--load", str(load), "--save", str(save)] + (["--force"] if force else [])
        _fails(capsys, script, args, [expected, "--save"])
        assert _snapshot(work) == before, (load, save)


@pytest.fixture
def work(sources, tmp_path):
    """Fresh copies of the sources in tmp_path (ckpt, hf, hf_sharded), and tmp_path's snapshot."""
    for name in ("ckpt", "hf", "hf_sharded"):
        shutil.copytree(sources / name, tmp_path / name, symlinks=True)
    return tmp_path


# ----------------------------------------------------------------------------------------------
# --save must stay apart from the sources


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_checkpoint_to_hf_refuses_targets_overlapping_the_checkpoint(work, capsys, force):
    ckpt = work / "ckpt"
    os.symlink(ckpt, work / "link_to_ckpt")
    os.symlink(work, work / "link_to_root")
    (work / "decoy").mkdir()
    os.symlink(work / "decoy", work / "ckpt" / "decoy_link")  # the link itself is part of the source
    cases = [
        (ckpt, ckpt, "is the checkpoint directory"),
        (ckpt / "iter_0000002", ckpt, "is the checkpoint directory"),  # --load the iteration directory
        (ckpt, ckpt / "iter_0000002", "lies inside the checkpoint directory"),
        (ckpt, ckpt / "hf", "lies inside the checkpoint directory"),
        (ckpt, work, "contains the checkpoint directory"),
        (ckpt, work / "link_to_ckpt", "is the checkpoint directory"),
        (ckpt, work / "link_to_root" / "ckpt" / "hf", "lies inside the checkpoint directory"),
        (work / "link_to_ckpt", ckpt, "is the checkpoint directory"),
    ]
    _refuses_all(capsys, work, TO_HF, cases, force)
    # the tokenizer files are sources too
    tok = work / "tok"
    shutil.copytree(TOKENIZER, tok)
    before = _snapshot(work)
    for save in (tok, work):
        args = ["--load", str(ckpt), "--save", str(save), "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", str(tok)] + (["--force"] if force else [])
        _fails(capsys, TO_HF, args, "--save")
        assert _snapshot(work) == before


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_hf_to_checkpoint_refuses_targets_overlapping_the_hf_directory(work, capsys, force):
    hf = work / "hf"
    os.symlink(hf, work / "link_to_hf")
    cases = [
        (hf, hf, "is the HF model directory"),
        (hf, hf / "ckpt", "lies inside the HF model directory"),
        (hf, work, "contains the HF model directory"),
        (hf, work / "link_to_hf", "is the HF model directory"),
        (work / "link_to_hf", hf, "is the HF model directory"),
    ]
    _refuses_all(capsys, work, TO_CKPT, cases, force)
    tok = work / "tok"
    shutil.copytree(TOKENIZER, tok)
    before = _snapshot(work)
    args = ["--load", str(hf), "--save", str(tok), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(tok)] + (["--force"] if force else [])
    _fails(capsys, TO_CKPT, args, "is the tokenizer file")
    assert _snapshot(work) == before


# ----------------------------------------------------------------------------------------------
# damaged checkpoints: named, with the other iterations


def _with_three_iterations(ckpt):
    for other in (1, 3):
        shutil.copytree(ckpt / "iter_0000002", ckpt / f"iter_{other:07d}")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2\n")
    return ckpt / "iter_0000002"


def _shard(path):
    shards = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))
    assert shards, os.listdir(path)
    return path / shards[0]


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGES = {
    "shard-missing": (lambda it: os.remove(_shard(it)), lambda it: f"{_shard_name(it)} is missing"),
    "shard-truncated": (lambda it: _truncate(_shard(it)), lambda it: f"{_shard_name(it)} is truncated ("),
    "metadata-missing": (lambda it: os.remove(it / ".metadata"), lambda it: f"{it / '.metadata'} is missing"),
    "metadata-garbage": (lambda it: (it / ".metadata").write_bytes(b"not a pickle"),
                         lambda it: f"{it / '.metadata'} is unreadable"),
    "metadata-json-missing": (lambda it: os.remove(it / "metadata.json"),
                              lambda it: f"{it / 'metadata.json'} is missing"),
    "common-missing": (lambda it: os.remove(it / "common.pt"), lambda it: f"{it / 'common.pt'} is missing"),
    "common-truncated": (lambda it: _truncate(it / "common.pt"), lambda it: f"{it / 'common.pt'} is truncated"),
    "args-missing": (lambda it: os.remove(it / "args.json"), lambda it: f"{it / 'args.json'} is missing"),
    "config-missing": (lambda it: os.remove(it / "config.json"), lambda it: f"{it / 'config.json'} is missing"),
    "config-garbage": (lambda it: (it / "config.json").write_text("{not json"),
                       lambda it: f"{it / 'config.json'} is not a valid config"),
}
_SHARD_NAMES = {}


def _shard_name(it):
    return _SHARD_NAMES[str(it)]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_named_with_the_other_iterations(work, capsys, damage):
    ckpt = work / "ckpt"
    it = _with_three_iterations(ckpt)
    _SHARD_NAMES[str(it)] = str(_shard(it))
    make, message = DAMAGES[damage]
    make(it)
    before = _snapshot(work)
    out = work / "out"
    line = _fails(capsys, TO_HF, ["--load", str(ckpt), "--save", str(out)],
                  [message(it), f"other iterations in {ckpt}: 1, 3 (choose one with --ckpt-step)"])
    assert line.count(str(it)) >= 1
    assert _snapshot(work) == before and not out.exists()


def test_missing_iteration_lists_those_that_exist(work, capsys):
    ckpt = work / "ckpt"
    _with_three_iterations(ckpt)
    before = _snapshot(work)
    for flag in ("--ckpt-step", "--iteration"):
        _fails(capsys, TO_HF, ["--load", str(ckpt), flag, "7", "--save", str(work / "out")],
               f"iteration 7 not found in {ckpt} (saved iterations: 1, 2, 3; choose one with --ckpt-step)")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("banana\n")
    _fails(capsys, TO_HF, ["--load", str(ckpt), "--save", str(work / "out")],
           ["expected an iteration number", "1, 2, 3"])
    os.remove(ckpt / "latest_checkpointed_iteration.txt")
    _fails(capsys, TO_HF, ["--load", str(ckpt), "--save", str(work / "out")], "no checkpoint found")
    assert not (work / "out").exists()
    assert set(before) - set(_snapshot(work)) == {"ckpt/latest_checkpointed_iteration.txt"}


# ----------------------------------------------------------------------------------------------
# damaged HF directories


def _rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _rewrite(hf, edit):
    _rewrite_safetensors(hf / "model.safetensors", edit)


def _drop(name):
    return lambda t: t.pop(name)


def _reshape(name):
    def edit(t):
        t[name] = t[name][:-1].clone()
    return edit


def _add(name):
    def edit(t):
        t[name] = t["model.norm.weight"].clone()
    return edit


def _edit_config(hf, **changes):
    config = json.loads((hf / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (hf / "config.json").write_text(json.dumps(config))


def test_damaged_hf_directory_is_named(work, capsys):
    cases = {
        "safetensors-missing": (lambda hf: os.remove(hf / "model.safetensors"),
                                "has neither model.safetensors nor model.safetensors.index.json"),
        "safetensors-truncated": (lambda hf: _truncate(hf / "model.safetensors"),
                                  lambda hf: f"{hf / 'model.safetensors'} is truncated or not a safetensors file"),
        "safetensors-garbage": (lambda hf: (hf / "model.safetensors").write_bytes(b"\x00" * 64),
                                lambda hf: f"{hf / 'model.safetensors'} is truncated or not a safetensors file"),
        "tensor-missing": (lambda hf: _rewrite(hf, _drop("model.layers.1.attn.k_proj.weight")),
                           "tensor model.layers.1.attn.k_proj.weight missing"),
        "tensor-shape": (lambda hf: _rewrite(hf, _reshape("model.layers.0.mlp.up_proj.weight")),
                         lambda hf: f"{hf / 'model.safetensors'}: tensor model.layers.0.mlp.up_proj.weight "
                                    "has shape (47, 32)"),
        "tensor-unexpected": (lambda hf: _rewrite(hf, _add("model.layers.9.extra")),
                              "unexpected tensor model.layers.9.extra"),
        "config-missing": (lambda hf: os.remove(hf / "config.json"), "has no config.json"),
        "config-garbage": (lambda hf: (hf / "config.json").write_text("{"),
                           lambda hf: f"{hf / 'config.json'} is not valid JSON"),
        "config-lacks-field": (lambda hf: _edit_config(hf, head_dim=None), "lacks head_dim"),
        "config-wrong-shape": (lambda hf: _edit_config(hf, intermediate_size=64), "config.json implies"),
        "tokenizer-garbage": (lambda hf: (hf / "tokenizer.json").write_text("{oops"), "tokenizer:"),
    }
    for name, (damage, expected) in cases.items():
        hf = work / f"hf_{name}"
        shutil.copytree(work / "hf", hf)
        damage(hf)
        before = _snapshot(work)
        out = work / "out"
        text = expected(hf) if callable(expected) else expected
        _fails(capsys, TO_CKPT, ["--load", str(hf), "--save", str(out)], text)
        assert _snapshot(work) == before and not out.exists(), name


def test_damaged_sharded_hf_directory_is_named(work, capsys):
    hf = work / "hf_sharded"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    os.remove(hf / shards[1])
    before = _snapshot(work)
    _fails(capsys, TO_CKPT, ["--load", str(hf), "--save", str(work / "out")], f"{hf / shards[1]} is missing")
    (hf / "model.safetensors.index.json").write_text("[]")
    _fails(capsys, TO_CKPT, ["--load", str(hf), "--save", str(work / "out")],
           f"{hf / 'model.safetensors.index.json'} is not a safetensors index")
    assert set(_snapshot(work)) == set(before) and not (work / "out").exists()


# ----------------------------------------------------------------------------------------------
# the model's own tokenizer; the right kind of directory


def test_export_with_another_tokenizer_is_refused(work, capsys):
    """Tokenizer flags naming another tokenizer than the checkpoint recorded: one line naming both
    and the flag that allows it; nothing written."""
    ckpt, out = work / "ckpt", work / "out"
    recorded = json.loads((ckpt / "iter_0000002" / "config.json").read_text())["tokenizer"]["tokenizer_model"]
    before = _snapshot(work)
    _fails(capsys, TO_HF, ["--load", str(ckpt), "--save", str(out), "--tokenizer-type", "NullTokenizer",
                           "--vocab-size", "100"],
           ["(--tokenizer-type NullTokenizer --vocab-size 100)",
            f"(--tokenizer-type HuggingFaceTokenizer --tokenizer-model {recorded})", "--allow-other-tokenizer"])
    assert _snapshot(work) == before and not out.exists()


def test_recorded_tokenizer_check(tmp_path):
    """The recorded tokenizer passes at another path when its files are the same; another one, a
    copy with other contents, or one whose recorded files are gone, is refused."""
    from megatron_lasp.hf.files import ConversionError
    from megatron_lasp.hf.tokenizer import check_recorded_tokenizer, tokenizer_from_settings

    recorded = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER}
    copy = tmp_path / "copy"
    shutil.copytree(TOKENIZER, copy)
    moved = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(copy)}
    check_recorded_tokenizer(recorded, recorded, tokenizer_from_settings(recorded))
    check_recorded_tokenizer(moved, recorded, tokenizer_from_settings(moved))
    check_recorded_tokenizer(moved, None, tokenizer_from_settings(moved))  # nothing recorded: nothing to compare
    null = {"tokenizer_type": "NullTokenizer", "vocab_size": 100}
    with pytest.raises(ConversionError, match="another tokenizer than the one the checkpoint recorded"):
        check_recorded_tokenizer(null, recorded, tokenizer_from_settings(null))
    with open(copy / "tokenizer.json", "a") as f:  # other file contents: not provably the same tokenizer
        f.write("\n")
    with pytest.raises(ConversionError, match="another tokenizer"):
        check_recorded_tokenizer(moved, recorded, tokenizer_from_settings(moved))
    gone = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tmp_path / "gone")}
    with pytest.raises(ConversionError, match="not readable here"):
        check_recorded_tokenizer(recorded, gone, tokenizer_from_settings(recorded))


def test_import_with_a_larger_tokenizer_is_refused(work, capsys):
    """HF -> checkpoint checks the tokenizer's ids against the embedding rows, as the export does."""
    out = work / "out"
    before = _snapshot(work)
    _fails(capsys, TO_CKPT, ["--load", str(work / "hf"), "--save", str(out), "--tokenizer-type", "NullTokenizer",
                             "--vocab-size", "4000"],
           ["tokenizer has 4001 ids but the model's vocabulary has 2048 rows", "tokenizer flags"])
    assert _snapshot(work) == before and not out.exists()


@pytest.mark.parametrize("script", [TO_HF, TO_CKPT])
def test_unread_tokenizer_flag_is_refused(script, tmp_path, capsys):
    """A tokenizer flag that nothing would read (no --tokenizer-type, or a type that reads other
    flags) is one line, before anything is read or written."""
    load, out = tmp_path / "in", tmp_path / "out"
    _fails(capsys, script, ["--load", str(load), "--save", str(out), "--tokenizer-type", "HuggingFaceTokenizer",
                            "--tokenizer-model", str(load), "--vocab-size", "100"],
           "--vocab-size is not used by --tokenizer-type HuggingFaceTokenizer")
    _fails(capsys, script, ["--load", str(load), "--save", str(out), "--vocab-file", "vocab.json"],
           "--vocab-file is used only with --tokenizer-type")
    assert not out.exists()


def test_wrong_kind_of_directory_names_the_other_converter(work, capsys):
    before = _snapshot(work)
    _fails(capsys, TO_HF, ["--load", str(work / "hf"), "--save", str(work / "out")],
           [f"{work / 'hf'} is a Hugging Face model directory", "tools/convert_hf_to_checkpoint.py"])
    for ckpt in (work / "ckpt", work / "ckpt" / "iter_0000002"):
        _fails(capsys, TO_CKPT, ["--load", str(ckpt), "--save", str(work / "out")],
               [f"{ckpt} is a megatron-lasp checkpoint", "tools/convert_checkpoint_to_hf.py"])
    assert _snapshot(work) == before and not (work / "out").exists()


# ----------------------------------------------------------------------------------------------
# the real scripts: exit status and stderr of a process


def _cli(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", script), *args],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout


def test_cli_processes_fail_in_one_line(work):
    ckpt = work / "ckpt"
    it = _with_three_iterations(ckpt)
    shard = _shard(it)
    _truncate(shard, keep=0.9)
    _truncate(work / "hf" / "model.safetensors", keep=0.9)
    before = _snapshot(work)
    rc, lines, out = _cli(TO_HF, "--load", str(ckpt), "--save", str(work / "out"))
    assert rc == 1 and len(lines) == 1 and f"{shard} is truncated" in lines[0] and "1, 3" in lines[0], lines
    rc, lines, out = _cli(TO_CKPT, "--load", str(work / "hf"), "--save", str(work / "out"), "--force")
    assert rc == 1 and len(lines) == 1 and "model.safetensors is truncated" in lines[0], lines
    rc, lines, out = _cli(TO_HF, "--load", str(ckpt), "--save", str(ckpt), "--force")
    assert rc == 1 and len(lines) == 1 and "is the checkpoint directory" in lines[0], lines
    assert _snapshot(work) == before and not (work / "out").exists()
