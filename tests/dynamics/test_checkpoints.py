"""Finding, ordering, hashing and safely loading checkpoints (dynamics.checkpoints)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from traindyn.dynamics.checkpoints import (
    Checkpoint,
    CheckpointError,
    UnsafeCheckpointError,
    find_checkpoints,
    hash_state_dict,
    is_hf_folder,
    load_hf_model,
    load_into,
    load_state_dict,
    parse_step,
    resolve_factory,
)

from tests._tiny_models import mlp


def make_net() -> nn.Module:
    """4 → 8 → 3 ReLU MLP; also the factory ``tests.dynamics.test_checkpoints:make_net``."""
    return mlp(4, 8, 3)


class _OpenFile:
    """Pickle payload: unpickling calls ``open(path, "w")``, which creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -------------------------------------------------------------------------- step parsing


@pytest.mark.parametrize(("name", "step"), [
    ("step1000.pt", 1000), ("step_1000.safetensors", 1000), ("step000100.safetensors", 100),
    ("checkpoint-1000", 1000), ("ckpt_000100.pth", 100), ("global_step42", 42),
    ("epoch=3-step=1000.ckpt", 1000), ("iter_7.pt", 7), ("000250.pt", 250),
    ("model_step5_seed3.pt", 5),
])
def test_parse_step_reads_common_names(name, step):
    assert parse_step(name) == step


@pytest.mark.parametrize("name", ["final.pt", "resnet18.pt", "model.safetensors"])
def test_parse_step_returns_none_without_a_step(name):
    assert parse_step(name) is None


# -------------------------------------------------------------------------- discovery


def _save_series(folder, steps, fmt="pt"):
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        torch.manual_seed(step)
        state = make_net().state_dict()
        if fmt == "pt":
            torch.save(state, folder / f"step{step}.pt")
        else:
            save_file(state, str(folder / f"step{step}.safetensors"))


def test_find_checkpoints_orders_by_step_not_by_name(tmp_path):
    _save_series(tmp_path, [2, 10, 100, 1])
    (tmp_path / "config.json").write_text("{}")        # a recipe's config: not a checkpoint
    (tmp_path / ".step5.pt.123.tmp").write_bytes(b"x")  # half-written file: ignored
    series = find_checkpoints(tmp_path)
    assert [c.step for c in series] == [1, 2, 10, 100]
    assert all(c.format == "torch" for c in series)


def test_explicit_steps_override_names_in_natural_order(tmp_path):
    for name in ["a2.pt", "a10.pt", "a1.pt"]:
        torch.save(make_net().state_dict(), tmp_path / name)
    series = find_checkpoints(tmp_path, steps=[5, 50, 500])
    assert [(c.path.name, c.step) for c in series] == [("a1.pt", 5), ("a2.pt", 50),
                                                        ("a10.pt", 500)]
    with pytest.raises(ValueError, match="3 checkpoints"):
        find_checkpoints(tmp_path, steps=[1, 2])


def test_unparseable_or_repeated_steps_are_clear_errors(tmp_path):
    torch.save(make_net().state_dict(), tmp_path / "first.pt")
    torch.save(make_net().state_dict(), tmp_path / "second.pt")
    with pytest.raises(ValueError, match="cannot read a step from first.pt"):
        find_checkpoints(tmp_path)
    with pytest.raises(ValueError, match="two checkpoints have step 3"):
        find_checkpoints([tmp_path / "first.pt", tmp_path / "second.pt"], steps=[3, 3])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        find_checkpoints(tmp_path / "empty")


def test_hf_folders_are_recognised(tmp_path):
    folder = tmp_path / "checkpoint-30"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_hf_folder(folder)  # no weights yet
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    assert is_hf_folder(folder)
    other = tmp_path / "checkpoint-4"
    other.mkdir()
    (other / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(other / "model.safetensors"))
    series = find_checkpoints(tmp_path)
    assert [(c.step, c.format) for c in series] == [(4, "hf"), (30, "hf")]
    # a single folder is a series of one; without a step in its name it is step 0
    plain = tmp_path / "pretrained"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(plain / "model.safetensors"))
    assert [(c.step, c.format) for c in find_checkpoints(plain)] == [(0, "hf")]


# -------------------------------------------------------------------------- safety


def test_malicious_zip_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "step100.pt"
    torch.save({"0.weight": torch.zeros(8, 4), "payload": _OpenFile(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refused to load step100.pt") as info:
        load_state_dict(path)
    assert "weights_only=True" in str(info.value) and "open" in str(info.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_into(make_net(), path)
    assert not marker.exists()


def test_malicious_pre_zip_pickle_is_refused_and_the_payload_is_live(tmp_path):
    marker = tmp_path / "created_by_payload.txt"
    path = tmp_path / "ckpt_000010.pth"
    with open(path, "wb") as handle:
        pickle.dump({"w": _OpenFile(str(marker))}, handle, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()
    # control: an ordinary unpickler does run the payload, so the assertion above is not vacuous
    code = f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert marker.exists()


def test_truncated_files_fail_with_a_clear_reason(tmp_path):
    torch.save(make_net().state_dict(), tmp_path / "good.pt")
    save_file(make_net().state_dict(), str(tmp_path / "good.safetensors"))
    for name in ("good.pt", "good.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(tmp_path / "cut_good.pt")
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(tmp_path / "cut_good.safetensors")


# -------------------------------------------------------------------------- load_into checks


def test_load_into_copies_weights_and_handles_wrappers(tmp_path):
    torch.manual_seed(1)
    source = make_net()
    state = source.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "step3.pt")
    target = make_net()
    digest = load_into(target, tmp_path / "step3.pt")
    x = torch.randn(5, 4)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    assert digest == hash_state_dict({f"module.{k}": v for k, v in state.items()})


def test_safetensors_and_torch_files_of_the_same_weights_hash_alike(tmp_path):
    torch.manual_seed(2)
    state = make_net().state_dict()
    torch.save(state, tmp_path / "step1.pt")
    save_file(state, str(tmp_path / "step2.safetensors"))
    a = load_into(make_net(), tmp_path / "step1.pt")
    b = load_into(make_net(), tmp_path / "step2.safetensors")
    assert a == b == hash_state_dict(state)
    # a hash written out by hand: names, dtypes, shapes, raw bytes in sorted-name order
    manual = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        manual.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        manual.update(t.numpy().tobytes())
    assert a == manual.hexdigest()
    changed = dict(state)
    changed["2.bias"] = state["2.bias"].clone()
    changed["2.bias"][0] += 1e-6
    assert hash_state_dict(changed) != a


def test_missing_unexpected_shape_and_nan_are_named(tmp_path):
    state = make_net().state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "2.bias"}, "lacks 1 .*2.bias"),
        "unexpected": ({**state, "extra.weight": torch.zeros(1)}, "extra.weight"),
        "shape": ({**state, "0.weight": torch.zeros(8, 5)}, r"shape mismatch.*0.weight \(8, 5\)"),
        "nan": ({**state, "2.weight": state["2.weight"].clone().fill_(float("nan"))},
                "2.weight.*non-finite"),
    }
    for name, (bad, pattern) in cases.items():
        for fmt in ("pt", "safetensors"):
            path = tmp_path / f"{name}.{fmt}"
            if fmt == "pt":
                torch.save(bad, path)
            else:
                save_file(bad, str(path))
            with pytest.raises(CheckpointError, match=pattern):
                load_into(make_net(), path)
    # shapes are checked before anything is copied: the model is untouched
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_into(net, tmp_path / "shape.safetensors")
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    # non-strict loading accepts extra keys
    load_into(make_net(), tmp_path / "unexpected.pt", strict=False)


def test_checkpoint_identity_changes_when_the_file_changes(tmp_path):
    _save_series(tmp_path, [1])
    ckpt = Checkpoint(tmp_path / "step1.pt", 1, "torch")
    before = ckpt.identity()
    torch.manual_seed(9)
    torch.save(nn.Sequential(nn.Linear(4, 9)).state_dict(), tmp_path / "step1.pt")
    os.utime(tmp_path / "step1.pt", ns=(1, 1))
    assert ckpt.identity() != before


# -------------------------------------------------------------------------- factories


def test_resolve_factory_accepts_module_and_file_specs(tmp_path):
    assert resolve_factory("torch.nn:Identity")() is not None
    file = tmp_path / "factory.py"
    file.write_text("from torch import nn\n\ndef make_model(width=3):\n"
                    "    return nn.Linear(2, width)\n\ndef other():\n    return nn.Tanh()\n")
    assert resolve_factory(str(file))().out_features == 3
    assert isinstance(resolve_factory(f"{file}:other")(), nn.Tanh)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        resolve_factory(f"{file}:nope")
    with pytest.raises(ValueError, match="module:function"):
        resolve_factory("torch.nn")
    with pytest.raises(FileNotFoundError):
        resolve_factory(str(tmp_path / "missing.py:f"))


# -------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "checkpoint-7"
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_hf_folder_loads_offline_and_hashes_its_weights(tiny_bert_folder):
    from safetensors.torch import load_file

    model, digest = load_hf_model(tiny_bert_folder)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    stored = load_file(str(tiny_bert_folder / "model.safetensors"))
    for key, value in stored.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert digest == hash_state_dict(model.state_dict())


def test_hf_folder_with_nan_or_missing_weights_fails(tiny_bert_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file

    stored = load_file(str(tiny_bert_folder / "model.safetensors"))
    for name, state, pattern in [
        ("nan", {**stored, "pooler.dense.bias": torch.full_like(stored["pooler.dense.bias"],
                                                                float("nan"))}, "non-finite"),
        ("missing", {k: v for k, v in stored.items() if not k.startswith("pooler.")},
         "lacks 2 weights"),
    ]:
        folder = tmp_path / name
        shutil.copytree(tiny_bert_folder, folder)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=pattern):
            load_hf_model(folder)


# -------------------------------------------------------------------------- formats users have


def _trainer_folder(root, step, state, trainer_step=None, weights="safetensors"):
    """A Trainer ``checkpoint-<step>/`` of a plain nn.Module: weights, no config.json."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if weights == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    torch.save({"lr": torch.tensor(0.1)}, folder / "optimizer.pt")
    if trainer_step is not None:
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": trainer_step, "epoch": 1.0, "log_history": []}))
    return folder


def test_trainer_checkpoint_folders_step_from_name_checked_by_trainer_state(tmp_path):
    nets = {}
    for step, fmt in ((500, "safetensors"), (1500, "bin"), (1000, "safetensors")):
        torch.manual_seed(step)
        nets[step] = make_net()
        _trainer_folder(tmp_path / "out", step, nets[step].state_dict(), trainer_step=step,
                        weights=fmt)
    (tmp_path / "out" / "runs").mkdir()                    # TensorBoard logs: not a checkpoint
    series = find_checkpoints(tmp_path / "out")
    assert [(c.step, c.format, c.step_source) for c in series] == [
        (500, "weights_dir", "trainer_state"), (1000, "weights_dir", "trainer_state"),
        (1500, "weights_dir", "trainer_state")]
    x = torch.randn(6, 4)
    for ckpt in series:
        target = make_net()
        digest = load_into(target, ckpt)
        torch.testing.assert_close(target(x), nets[ckpt.step](x), rtol=0, atol=0)
        assert digest == hash_state_dict(nets[ckpt.step].state_dict())
    # without trainer_state.json the folder name alone gives the step
    bare = _trainer_folder(tmp_path / "bare", 40, nets[500].state_dict())
    assert [(c.step, c.step_source) for c in find_checkpoints(bare)] == [(40, "name")]
    # a folder name that disagrees with trainer_state.json is an error naming both numbers
    _trainer_folder(tmp_path / "bad", 300, nets[500].state_dict(), trainer_step=299)
    with pytest.raises(ValueError, match=r"checkpoint-300/.*step 300.*global_step 299"):
        find_checkpoints(tmp_path / "bad")
    series = find_checkpoints(tmp_path / "bad", steps=[299], force_steps=True)
    assert [(c.step, c.step_source) for c in series] == [(299, "explicit")]


def test_sharded_trainer_folder_loads_every_shard(tmp_path):
    torch.manual_seed(3)
    net = make_net()
    state = net.state_dict()
    folder = tmp_path / "checkpoint-8"
    folder.mkdir()
    first = {k: v for k, v in state.items() if k.startswith("0.")}
    second = {k: v for k, v in state.items() if k.startswith("2.")}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (ckpt,) = find_checkpoints(folder)
    assert (ckpt.step, ckpt.format) == (8, "weights_dir")
    target = make_net()
    assert load_into(target, ckpt) == hash_state_dict(state)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    # an index that points outside its folder is refused
    weight_map["0.bias"] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a file in that folder"):
        load_into(make_net(), ckpt)


class _LitModule(nn.Module):
    """Stand-in for a LightningModule: the network under ``model``, a loss with a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_net()
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.ones(3))


def _lightning_ckpt(path, module, global_step, extra=None):
    """The dictionary ``Trainer.save_checkpoint`` writes (Lightning 2.x keys)."""
    torch.save({
        "epoch": 0, "global_step": global_step, "pytorch-lightning_version": "2.6.6",
        "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {
            "best_model_score": None, "best_model_path": str(path), "dirpath": str(path.parent)}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1},
        **(extra or {})}, path)


def test_lightning_ckpt_weights_only_prefix_stripped_step_from_global_step(tmp_path):
    mods = {}
    for step in (100, 250):
        torch.manual_seed(step)
        mods[step] = _LitModule()
    _lightning_ckpt(tmp_path / "epoch=0-step=100.ckpt", mods[100], 100)
    _lightning_ckpt(tmp_path / "last.ckpt", mods[250], 250)      # no step in the name
    series = find_checkpoints(tmp_path)
    assert [(c.path.name, c.step, c.format, c.step_source) for c in series] == [
        ("epoch=0-step=100.ckpt", 100, "lightning", "lightning"),
        ("last.ckpt", 250, "lightning", "lightning")]
    x = torch.randn(5, 4)
    for ckpt in series:
        target = make_net()                                       # keys "0.weight" …
        digest = load_into(target, ckpt)                          # strict: loss_fn.* ignored
        torch.testing.assert_close(target(x), mods[ckpt.step].model(x), rtol=0, atol=0)
        assert digest == hash_state_dict({f"model.{k}": v for k, v in
                                          mods[ckpt.step].model.state_dict().items()})
    # save_last: last.ckpt repeats the latest epoch=…-step=N.ckpt and is left out
    _lightning_ckpt(tmp_path / "epoch=1-step=250.ckpt", mods[250], 250)
    assert [c.path.name for c in find_checkpoints(tmp_path)] == [
        "epoch=0-step=100.ckpt", "epoch=1-step=250.ckpt"]
    # the LightningModule itself as the target: no prefix is stripped
    whole = _LitModule()
    load_into(whole, series[0])
    torch.testing.assert_close(whole.model(x), mods[100].model(x), rtol=0, atol=0)
    # name and global_step disagree: an error naming both
    (tmp_path / "bad").mkdir()
    _lightning_ckpt(tmp_path / "bad" / "epoch=1-step=300.ckpt", mods[100], 299)
    with pytest.raises(ValueError, match=r"step=300\.ckpt: its name says step 300 but its "
                                         r"Lightning global_step entry is 299"):
        find_checkpoints(tmp_path / "bad")


def test_lightning_ckpt_with_code_in_its_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "epoch=0-step=7.ckpt"
    _lightning_ckpt(path, _LitModule(), 7, extra={"hyper_parameters": _OpenFile(str(marker))})
    (ckpt,) = find_checkpoints(path)                  # unreadable safely: plain torch, step 7
    assert (ckpt.step, ckpt.format, ckpt.step_source) == (7, "torch", "name")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_into(make_net(), ckpt)
    assert not marker.exists()


def test_revision_series_of_one_model(tmp_path):
    folders = []
    for name in ("step1000", "revision-step2000", "main"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        save_file({"w": torch.full((2,), float(len(folders)))}, str(folder / "model.safetensors"))
        folders.append(folder)
    with pytest.raises(ValueError, match="cannot read a step from main/"):
        find_checkpoints(folders)
    series = find_checkpoints(folders, steps=[None, None, 143000])
    assert [(c.path.name, c.step, c.format, c.step_source) for c in series] == [
        ("step1000", 1000, "hf", "name"), ("revision-step2000", 2000, "hf", "name"),
        ("main", 143000, "hf", "explicit")]
    mapped = find_checkpoints({folders[2]: 143000, folders[0]: None})
    assert [(c.step, c.step_source) for c in mapped] == [(1000, "name"), (143000, "explicit")]


def test_explicit_steps_pair_with_paths_in_argument_order(tmp_path):
    _save_series(tmp_path, [2, 10])
    for name in ("b.pt", "a.pt"):
        torch.save(make_net().state_dict(), tmp_path / name)
    series = find_checkpoints([tmp_path / "b.pt", tmp_path / "a.pt"], steps=[5, 50])
    assert [(c.path.name, c.step) for c in series] == [("b.pt", 5), ("a.pt", 50)]
    # names agree with the steps in argument order (not sorted-name order): accepted
    series = find_checkpoints([tmp_path / "step10.pt", tmp_path / "step2.pt"], steps=[10, 2])
    assert [(c.path.name, c.step, c.step_source) for c in series] == [
        ("step2.pt", 2, "explicit"), ("step10.pt", 10, "explicit")]
    # a contradiction names the file, its step and the explicit step
    with pytest.raises(ValueError, match=r"explicit step 2 for step10\.pt contradicts the "
                                         r"checkpoint: its name says step 10.*force_steps"):
        find_checkpoints([tmp_path / "step10.pt", tmp_path / "step2.pt"], steps=[2, 10])
    forced = find_checkpoints([tmp_path / "step10.pt", tmp_path / "step2.pt"], steps=[2, 10],
                              force_steps=True)
    assert [(c.path.name, c.step) for c in forced] == [("step10.pt", 2), ("step2.pt", 10)]
    with pytest.raises(ValueError, match="not both"):
        find_checkpoints({tmp_path / "a.pt": 1}, steps=[1])


def test_load_hf_model_progress_false_silences_transformers(tiny_bert_folder, capsys):
    import transformers

    load_hf_model(tiny_bert_folder, progress=True)
    shown = capsys.readouterr()
    assert "Loading weights" in shown.err + shown.out          # the bar exists: not vacuous
    load_hf_model(tiny_bert_folder, progress=False)
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == ""
    # the user's settings are restored afterwards
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_trainer_output_dir_of_a_transformers_model_is_its_checkpoints(tmp_path):
    out = tmp_path / "out"
    for folder, step in ((out, 900), (out / "checkpoint-300", 300), (out / "checkpoint-900", 900)):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        save_file({"w": torch.full((2,), float(step))}, str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    series = find_checkpoints(out)      # the final model at the top is not a separate step
    assert [(c.path.name, c.step, c.format, c.step_source) for c in series] == [
        ("checkpoint-300", 300, "hf", "trainer_state"),
        ("checkpoint-900", 900, "hf", "trainer_state")]
    assert "model.safetensors" in [p.name for p in series[0].weight_files()]


def test_hub_cache_folder_is_a_revision_series(tmp_path):
    # from_pretrained(..., revision="step1000") etc. leave refs/<revision> → snapshots/<hash>/
    cache = tmp_path / "models--EleutherAI--pythia-70m"
    (cache / "refs").mkdir(parents=True)
    for i, (revision, commit) in enumerate([("step1000", "a1"), ("step143000", "c3"),
                                            ("main", "c3"), ("step20", "b2")]):
        (cache / "refs" / revision).write_text(commit)
        snap = cache / "snapshots" / commit
        if not snap.exists():
            snap.mkdir(parents=True)
            (snap / "config.json").write_text("{}")
            save_file({"w": torch.full((2,), float(i))}, str(snap / "model.safetensors"))
    (cache / "blobs").mkdir()
    series = find_checkpoints(cache)
    # main is the same snapshot as step143000: listed once, under its step
    assert [(c.path.name, c.step, c.format, c.step_source) for c in series] == [
        ("b2", 20, "hf", "name"), ("a1", 1000, "hf", "name"), ("c3", 143000, "hf", "name")]
    # a revision with no step of its own needs explicit steps, and the error names it
    (cache / "refs" / "main").write_text("d4")
    (cache / "snapshots" / "d4").mkdir()
    (cache / "snapshots" / "d4" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(cache / "snapshots" / "d4" / "model.safetensors"))
    with pytest.raises(ValueError, match="cannot read a step from revision main"):
        find_checkpoints(cache)
    # explicit steps pair with the revisions in natural name order: main, step20, step1000, …
    with pytest.raises(ValueError, match="explicit step 5 for revision step20"):
        find_checkpoints(cache, steps=[143001, 5, 1000, 143000])
    series = find_checkpoints(cache, steps=[143001, None, None, None])
    assert [(c.step, c.step_source) for c in series][-1] == (143001, "explicit")


# -------------------------------------------------------------------------- no code from a folder


def _folder_with_code(root, marker, *, tokenizer=False):
    """A Hugging Face folder whose config.json maps AutoConfig / AutoModel (and, with
    ``tokenizer``, AutoTokenizer) to ``evil.py`` of the folder; importing ``evil`` creates
    ``marker``."""
    folder = root / "checkpoint-5"
    folder.mkdir(parents=True)
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizer\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evilnet'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizer):\n    pass\n")
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evilnet",
                                                    "auto_map": auto_map}))
    if tokenizer:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "EvilTokenizer",
             "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder


def test_hf_folder_with_auto_map_is_refused_and_its_code_never_runs(tmp_path, monkeypatch,
                                                                     capsys):
    pytest.importorskip("transformers")
    from traindyn.dynamics.probe_inputs import load_tokenizer

    from tests.helpers import child_env

    marker = tmp_path / "code_ran.txt"
    folder = _folder_with_code(tmp_path / "run", marker, tokenizer=True)
    with pytest.raises(UnsafeCheckpointError, match=r"auto_map.*evil\.EvilModel.*never runs"):
        load_hf_model(folder)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"tokenizer of checkpoint-5.*AutoTokenizer -> "
                                         r"evil\.EvilTokenizer.*never runs"):
        load_tokenizer(folder)
    assert not marker.exists()
    # without traindyn's own check, transformers is still told trust_remote_code=False
    monkeypatch.setattr("traindyn.dynamics.checkpoints.hf_folder.custom_code", lambda f: {})
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(folder)
    with pytest.raises(CheckpointError, match="contains custom code which must be executed"):
        load_hf_model(folder)
    assert not marker.exists()
    monkeypatch.undo()
    # traindyn analyze with "y" on stdin (transformers' prompt would read it): the checkpoint
    # fails with the reason, and the folder's code never runs
    import io

    import xarray as xr
    from traindyn.dynamics.cli import main

    ids = tmp_path / "ids.pt"
    torch.save({"input_ids": torch.ones(4, 3, dtype=torch.int64)}, ids)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 50))
    code = main(["analyze", str(folder.parent), "--probe-data", str(ids), "--layers", "encoder",
                 "--probes", "rankme", "--no-progress", "-o", str(tmp_path / "out.nc")])
    assert code != 0 and not marker.exists()
    assert "1 checkpoint(s) failed" in capsys.readouterr().err
    with xr.open_dataset(tmp_path / "out.nc") as ds:
        assert str(ds["status"].values[0]) == "failed"
        assert "auto_map" in str(ds["reason"].values[0])
        assert "never runs code" in str(ds["reason"].values[0])
    # control: transformers left at its default trust_remote_code (which asks on stdin) does
    # run the folder's code when "y" is typed, so the assertions above are not vacuous
    control = ("import transformers\ntry:\n    transformers.AutoConfig.from_pretrained("
               f"{str(folder)!r}, local_files_only=True)\nexcept Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", control], env=child_env(HF_HOME=str(tmp_path / "hf")),
                   input="y\n" * 5, capture_output=True, text=True, timeout=300)
    assert marker.exists()


# -------------------------------------------------------------------------- ambiguous wrappers


class _EmaModule(nn.Module):
    """A LightningModule stand-in with two copies of the network: ``model`` and ``ema``."""

    def __init__(self, first: str = "model", second: str = "ema") -> None:
        super().__init__()
        torch.manual_seed(11)
        self.add_module(first, make_net())
        torch.manual_seed(12)
        self.add_module(second, make_net())


@pytest.mark.parametrize(("first", "second"), [("model", "ema"), ("student", "teacher")])
def test_lightning_ckpt_with_two_copies_needs_a_prefix(tmp_path, first, second):
    module = _EmaModule(first, second)
    path = tmp_path / "epoch=0-step=10.ckpt"
    _lightning_ckpt(path, module, 10)
    (ckpt,) = find_checkpoints(path)
    assert ckpt.format == "lightning"
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    names = sorted([first, second])
    with pytest.raises(CheckpointError, match=rf"'{names[0]}\.' and '{names[1]}\.'.*prefix="
                                              rf".*--prefix"):
        load_into(net, ckpt)
    for key, value in net.state_dict().items():           # nothing was copied
        assert torch.equal(value, before[key])
    x = torch.randn(5, 4)
    for name in (first, second):
        for spelled in (name, name + "."):                   # "ema" and "ema." alike
            target = make_net()
            digest = load_into(target, ckpt, prefix=spelled)
            torch.testing.assert_close(target(x), getattr(module, name)(x), rtol=0, atol=0)
            assert digest == hash_state_dict({f"{name}.{k}": v for k, v in
                                              getattr(module, name).state_dict().items()})
    with pytest.raises(CheckpointError, match="no tensor under prefix 'nope.'.*"
                                              + rf"{names[0]}\."):
        load_into(make_net(), ckpt, prefix="nope")


def test_analyze_prefix_chooses_the_ema_weights(tmp_path):
    from traindyn.dynamics.analyze import analyze

    module = _EmaModule()
    (tmp_path / "run").mkdir()
    _lightning_ckpt(tmp_path / "run" / "epoch=0-step=10.ckpt", module, 10)
    x = torch.randn(16, 4, dtype=torch.float64)
    torch.save(x.float(), tmp_path / "x.pt")
    common = dict(model="tests.dynamics.test_checkpoints:make_net", probe_data=tmp_path / "x.pt",
                  probes=["rankme"], layers=["0"], progress=False)
    failed = analyze(tmp_path / "run", **common)
    assert str(failed["status"].values[0]) == "failed"
    assert "'ema.' and 'model.'" in str(failed["reason"].values[0])
    from traindyn import probes

    for prefix in ("ema.", "model."):
        ds = analyze(tmp_path / "run", prefix=prefix, **common)
        layer = getattr(module, prefix[:-1])[0]
        with torch.no_grad():
            expected = probes.rankme(layer.double()(x))
        assert_close = abs(float(ds["rankme"].values[0, 0]) - expected) <= 1e-5 * expected
        assert assert_close, (prefix, float(ds["rankme"].values[0, 0]), expected)
    # the command line: --prefix chooses, without it the checkpoint fails with the reason
    import xarray as xr
    from traindyn.dynamics.cli import main

    argv = ["analyze", str(tmp_path / "run"), "--model", "tests.dynamics.test_checkpoints:make_net",
            "--probe-data", str(tmp_path / "x.pt"), "--probes", "rankme", "--layers", "0",
            "--no-progress", "-o"]
    assert main([*argv, str(tmp_path / "none.nc")]) == 1
    assert main([*argv, str(tmp_path / "ema.nc"), "--prefix", "ema"]) == 0
    with xr.open_dataset(tmp_path / "ema.nc") as ds:
        with torch.no_grad():
            expected = probes.rankme(module.ema[0].double()(x))
        assert abs(float(ds["rankme"].values[0, 0]) - expected) <= 1e-5 * expected


# -------------------------------------------------------------------------- dtype kinds


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_an_integer_tensor_is_not_cast_into_a_float_weight(tmp_path, fmt):
    state = make_net().state_dict()
    bad = {**state, "0.weight": torch.arange(32, dtype=torch.int64).reshape(8, 4)}
    path = tmp_path / f"step1.{fmt}"
    if fmt == "pt":
        torch.save(bad, path)
    else:
        save_file(bad, str(path))
    net = make_net()
    before = net[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"dtype mismatch in step1\.\w+: 0\.weight is "
                                              r"(int64|I64) \(int\).*float32 \(float\)"):
        load_into(net, path)
    assert torch.equal(net[0].weight, before)
    # bool into float and float into an integer buffer are refused alike; a float64 weight
    # into a float32 model (same kind) loads, with the value rounded as torch copies it
    bn = nn.BatchNorm1d(3)
    bn_state = {**bn.state_dict(), "num_batches_tracked": torch.tensor(2.0)}
    torch.save(bn_state, tmp_path / "bn.pt")
    with pytest.raises(CheckpointError, match=r"num_batches_tracked is float32 \(float\).*"
                                              r"int64 \(int\)"):
        load_into(nn.BatchNorm1d(3), tmp_path / "bn.pt")
    torch.save({**state, "2.bias": torch.ones(3, dtype=torch.bool)}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"2\.bias is bool \(bool\)"):
        load_into(make_net(), tmp_path / "b.pt")
    wide = {k: v.double() * 1.25 for k, v in state.items()}
    torch.save(wide, tmp_path / "wide.pt")
    net = make_net()
    load_into(net, tmp_path / "wide.pt")
    assert torch.equal(net[0].weight, wide["0.weight"].float())


# -------------------------------------------------------------------------- the readers


def test_every_format_is_a_registered_reader_and_a_new_one_needs_one_module(tmp_path):
    from traindyn.dynamics.checkpoints import READERS, CheckpointReader, get_reader, register_reader

    assert {"torch", "safetensors", "hf", "weights_dir", "lightning", "hub_cache"} <= set(READERS)
    for name, reader in READERS.items():
        assert reader.name == name and reader.description
    # every public module of the package is a format, found without being listed anywhere
    import pkgutil

    from traindyn.dynamics import checkpoints

    modules = {m.name for m in pkgutil.iter_modules(checkpoints.__path__)
               if not m.name.startswith("_") and m.name != "base"}
    assert modules == {type(r).__module__.rsplit(".", 1)[-1] for r in READERS.values()
                       if type(r).__module__.startswith("traindyn.")}
    assert len(modules) == 6
    with pytest.raises(KeyError, match="unknown checkpoint format 'npz'.*safetensors"):
        get_reader("npz")
    import numpy as np

    class NpzReader(CheckpointReader):
        name = "npz_test"
        description = "numpy .npz archive"

        def can_open(self, path):
            return path.is_file() and path.suffix == ".npz"

        def read(self, path):
            with np.load(path, allow_pickle=False) as data:
                return {k: torch.from_numpy(data[k]) for k in data.files}

    register_reader(NpzReader)
    try:
        torch.manual_seed(4)
        source = make_net()
        np.savez(tmp_path / "step30.npz", **{k: v.numpy() for k, v in
                                           source.state_dict().items()})
        (ckpt,) = find_checkpoints(tmp_path)
        assert (ckpt.step, ckpt.format, ckpt.step_source) == (30, "npz_test", "name")
        target = make_net()
        assert load_into(target, ckpt) == hash_state_dict(source.state_dict())
        x = torch.randn(3, 4)
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match="already registered"):
            register_reader(type("Other", (NpzReader,), {}))
    finally:
        READERS.pop("npz_test")


def test_a_training_loop_dict_with_model_and_ema_needs_a_prefix(tmp_path):
    torch.manual_seed(21)
    model, ema = make_net(), make_net()
    torch.save({"step": 5, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, tmp_path / "step5.pt")
    with pytest.raises(CheckpointError, match=r"under each of 'ema\.' and 'model\.'"):
        load_into(make_net(), tmp_path / "step5.pt")
    x = torch.randn(4, 4)
    for name, source in (("ema", ema), ("model", model)):
        target = make_net()
        load_into(target, tmp_path / "step5.pt", prefix=name)
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    # one state dict beside other entries is read as before: no prefix needed
    torch.save({"step": 5, "model": model.state_dict(), "lr": 0.1}, tmp_path / "step6.pt")
    target = make_net()
    assert load_into(target, tmp_path / "step6.pt") == hash_state_dict(model.state_dict())


def test_an_ema_wrapped_once_more_is_seen_beside_the_model(tmp_path):
    class _WithEma(nn.Module):                   # timm-style ModelEmaV2: ema.module.<weights>
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(31)
            self.model = make_net()
            self.ema = nn.Module()
            torch.manual_seed(32)
            self.ema.module = make_net()

    module = _WithEma()
    path = tmp_path / "epoch=0-step=3.ckpt"
    _lightning_ckpt(path, module, 3)
    with pytest.raises(CheckpointError, match=r"'ema\.module\.' and 'model\.'"):
        load_into(make_net(), path)
    target = make_net()
    load_into(target, path, prefix="ema.module")
    x = torch.randn(4, 4)
    torch.testing.assert_close(target(x), module.ema.module(x), rtol=0, atol=0)
