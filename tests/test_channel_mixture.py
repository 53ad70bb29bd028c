"""Mixed-channel training data: the channel vocabulary, a mixture of datasets with different channel lists
(grain mixing by weight), padded channel_ids / channel_mask in every batch, exact resume and per-process
streams of a mixture, and the checks that keep a model from being fed channels it cannot take."""
from __future__ import annotations

import numpy as np
import pytest

from data.synthetic_screen import generate_screen
from maejax import channels, config as config_lib
from maejax.input_pipeline import Source, make_train_iterator, open_dataset, open_train_data, parse_mixture
from maejax.streams import StreamedBatches
from tests.test_input_pipeline import assert_same_batches, take
from tests.test_real_screen_eval import run_eval

TRAIN = dict(batch_size=8, crop_size=24, seed=3, process_index=0, process_count=1)
FIVE = "Mito,AGP,DNA,RNA,ER"   # a 5-channel rendering of the same screen, in another order


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    """The tiny synthetic screen rendered with its 6 stains, and the same screen (same seed) with 5 of
    them in another order."""
    root = tmp_path_factory.mktemp("mixture")
    six = open_dataset(generate_screen(root / "six", preset="tiny", seed=1))
    five = open_dataset(generate_screen(root / "five", preset="tiny", seed=1, channels=FIVE))
    return six, five


def sources(six, five, weights=(1.0, 1.0), spec=""):
    vocab = channels.parse(spec, [six.channels, five.channels])
    return [Source(ds, w, tuple(vocab.ids(ds.channels, str(ds.path)))) for ds, w in zip((six, five), weights)]


def test_synthetic_channels_option_picks_and_orders_the_rendered_stains(screens):
    six, five = screens
    assert six.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "Golgi"] and five.channels == FIVE.split(",")
    order = [six.channels.index(c) for c in five.channels]
    ids = np.arange(0, len(six), 97)
    np.testing.assert_array_equal(five.reader.read_many(ids), six.reader.read_many(ids)[:, order])
    with pytest.raises(ValueError, match=r"channels='DNA,Actin': name each channel once, from the 6 rendered "
                                         r"stains .* \(not rendered: \['Actin'\]\)"):
        generate_screen(six.path.parent / "bad", preset="tiny", channels="DNA,Actin")


def test_vocabulary_presets_aliases_and_unknown_names():
    cp = channels.parse("cell_painting")
    assert cp.ids(["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"], "rxrx1") == [0, 1, 6, 2, 4, 7]
    assert cp.ids(["DNA", "ER", "RNA", "AGP", "Mito"], "jump") == [0, 1, 2, 3, 4]
    assert channels.parse("", [["a", "b"], ["c", "a"]]).labels == ["a", "b", "c"]
    assert channels.parse("DNA|Hoechst,RNA").spec() == "DNA|Hoechst,RNA"
    assert channels.parse(cp.spec()) == cp
    with pytest.raises(channels.ChannelError, match=r"^/data/jump: channel 'Brightfield' is not in the channel "
                                                    r"vocabulary \[Hoechst,ConA,.*\]; add it to data.channels"):
        channels.parse("rxrx1").ids(["Hoechst", "Brightfield"], "/data/jump")
    with pytest.raises(channels.ChannelError, match=r"'DNA' names channels 0 and 1"):
        channels.parse("DNA|Hoechst,DNA")
    with pytest.raises(channels.ChannelError, match=r"the same vocabulary channel twice \('DNA' and 'Hoechst' are both 'DNA'\)"):
        cp.ids(["DNA", "Hoechst"], "d")


def test_mixture_batches_carry_padded_channels_with_ids_and_mask(screens):
    six, five = screens
    mix = sources(six, five, weights=(3.0, 1.0))
    batches = take(make_train_iterator(mix, **TRAIN), 20)
    b = batches[0]
    assert b["image"].shape == (8, 6, 24, 24) and b["channel_ids"].dtype == np.int32
    assert b["channel_mask"].dtype == bool and b["dataset"].dtype == np.int32
    ids_five = [4, 3, 0, 2, 1, 0]          # Mito AGP DNA RNA ER in the vocabulary DNA ER RNA AGP Mito Golgi
    for batch in batches:
        for k in range(8):
            if batch["dataset"][k] == 0:
                assert batch["channel_ids"][k].tolist() == [0, 1, 2, 3, 4, 5] and batch["channel_mask"][k].all()
            else:
                assert batch["channel_ids"][k].tolist() == ids_five
                assert batch["channel_mask"][k].tolist() == [True] * 5 + [False]
                assert not batch["image"][k, 5].any()          # the padded channel is zeros
                assert batch["image"][k, :5].std() > 0.5         # real channels: self-standardised crops
    drawn = np.concatenate([batch["dataset"] for batch in batches])
    assert abs((drawn == 0).mean() - 0.75) < 0.05                # sampled by weight (3:1)
    assert np.isin(np.concatenate([b["record_id"][b["dataset"] == 1] for b in batches]), np.arange(len(five))).all()


def test_one_dataset_as_a_mixture_gives_the_plain_stream_plus_channel_keys(screens):
    six, _ = screens
    plain = take(make_train_iterator(six, **TRAIN), 3)
    mixed = take(make_train_iterator([Source(six, 1.0, tuple(range(6)))], **TRAIN), 3)
    for p, m in zip(plain, mixed):
        assert set(m) - set(p) == {"channel_ids", "channel_mask", "dataset"}
        for key in p:
            np.testing.assert_array_equal(p[key], m[key], err_msg=key)


def test_mixture_resumes_exactly_from_its_state(screens):
    six, five = screens
    mix = sources(six, five)
    iterator = make_train_iterator(mix, **TRAIN)
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 3)
    restored = make_train_iterator(mix, **TRAIN)
    restored.set_state(state)
    assert_same_batches(expected, take(restored, 3))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in
                   zip(expected, take(make_train_iterator(mix, **{**TRAIN, "seed": 4}), 3)))


def test_mixture_streams_give_the_same_global_batch_whatever_the_process_count(screens):
    six, five = screens
    mix = sources(six, five)

    def make_stream(index, count):
        return make_train_iterator(mix, **{**TRAIN, "process_index": index, "process_count": count})

    one = StreamedBatches(make_stream, 2, 8, 0, 1)
    two = [StreamedBatches(make_stream, 2, 8, p, 2) for p in (0, 1)]
    for _ in range(3):
        whole, halves = next(one), [next(s) for s in two]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]), err_msg=key)
    assert set(np.concatenate([next(one)["dataset"] for _ in range(4)])) == {0, 1}


def data_config(**keys):
    config = config_lib.base()
    for key, value in keys.items():
        config_lib.override(config, key, value)
    return config


def test_open_train_data_maps_channels_and_refuses_what_the_model_cannot_take(screens):
    six, five = screens
    mixture = f"{six.path}=2,{five.path}=1"
    c = data_config(**{"data.mixture": mixture, "model.name": "ca_mae"})
    data = open_train_data(c.data, c.model)
    assert [s.weight for s in data.sources] == [2.0, 1.0] and data.channel_slots == 6 and data.with_channels
    assert data.vocabulary.labels == six.channels and data.sources[1].channel_ids == (4, 3, 0, 2, 1)

    with pytest.raises(channels.ChannelError, match=rf"the mae model takes one fixed list of channels, but {six.path} "
                                                    rf"has \[.DNA., .*\] and {five.path} has \[.Mito., .*\]"):
        open_train_data(data_config(**{"data.mixture": mixture}).data, config_lib.base().model)
    c = data_config(**{"data.mixture": mixture, "model.name": "ca_mae", "data.channels": "cell_painting"})
    assert open_train_data(c.data, c.model).sources[1].channel_ids == (4, 3, 0, 2, 1)   # ids 0-5 of its 11
    c = data_config(**{"data.mixture": mixture, "model.name": "ca_mae", "data.channels": "Brightfield," + FIVE + ",Golgi"})
    with pytest.raises(channels.ChannelError, match=r"channel 'Golgi' is channel 6 of the vocabulary .* but the "
                                                    r"CA-MAE has model.in_channels=6 decoders .*: set model.in_channels=7"):
        open_train_data(c.data, c.model)
    # a fixed-channel model's recorded vocabulary is its own channels (eval looks them up by name), not the preset
    c = data_config(**{"data.dir": str(six.path), "data.channels": "cell_painting"})
    assert open_train_data(c.data, c.model).vocabulary.spec() == "DNA|Hoechst,ER|ConA,RNA|Syto14,AGP,Mito|MitoTracker,Golgi"
    c = data_config(**{"data.mixture": mixture, "model.name": "ca_mae", "data.channels": "rxrx1"})
    with pytest.raises(channels.ChannelError, match=rf"{six.path}: channel 'DNA' is not in the channel vocabulary"):
        open_train_data(c.data, c.model)
    c = data_config(**{"data.mixture": mixture, "model.name": "ca_mae", "model.in_channels": 4})
    with pytest.raises(channels.ChannelError, match=r"has 6 channels; the channel-agnostic model takes at most 4"):
        open_train_data(c.data, c.model)
    with pytest.raises(channels.MixtureError, match=r"data.dir='a' and data.mixture='b=1' are both set"):
        parse_mixture("b=1", "a")
    with pytest.raises(channels.MixtureError, match=r"item 'b=x': the weight 'x' is not a number"):
        parse_mixture("b=x", "")
    with pytest.raises(channels.MixtureError, match=r"item 'b=0': give DIR=WEIGHT with a positive weight"):
        parse_mixture("b=0", "")
    assert parse_mixture("gs://bucket/a=0.5, /data/b", "") == [("gs://bucket/a", 0.5), ("/data/b", 1.0)]


def test_ca_mae_trains_on_the_mixture_resumes_and_evaluates_any_channel_subset(screens, tmp_path, monkeypatch,
                                                                               capsys):
    """The trainer on a 6 + 5 channel mixture (a CA-MAE; batches padded to 6 with the mask reaching the loss),
    stopped after 2 steps and resumed for the 3rd, with the losses of an uninterrupted run; then eval.job on DNA, RNA, Mito of either rendering: the
    same cells in other channel orders give the same features, so the same recall."""
    import json
    from maejax.checkpoint import Checkpoints
    from maejax.train import train
    from tests.tiny_training import losses, tiny_config
    six, five = screens
    config = tiny_config("", **{"data.mixture": f"{six.path}=1,{five.path}=1", "model.name": "ca_mae",
                                "total_steps": 3, "optim.warmup_steps": 1, "ckpt_every": 2, "mesh.data": 4,
                                "mesh.fsdp": 2, "data.streams": 2, "eval.batch_size": 64})
    workdir = tmp_path / "run"
    first = train(config, str(workdir), stop_after=2)
    last = train(config, str(workdir))
    assert sorted(losses(workdir)) == [1, 2, 3] and np.isfinite(list(losses(workdir).values())).all()
    train(config, str(tmp_path / "straight"))           # the same 3 steps without the stop: the same losses
    straight = losses(tmp_path / "straight")
    np.testing.assert_allclose([losses(workdir)[s] for s in (1, 2, 3)], [straight[s] for s in (1, 2, 3)], rtol=1e-6)
    assert 5 < first["channels"] < 6 and 5 < last["channels"] < 6       # 6- and 5-channel crops in each batch
    ckpts = Checkpoints(str(workdir / "checkpoints"))
    assert ckpts.meta(3)["channels"] == ",".join(six.channels)           # the vocabulary eval maps names with
    ckpts.close()

    recalls = []
    for dataset in (six, five):
        out = tmp_path / f"eval-{dataset.path.name}"
        code, _, err = run_eval(monkeypatch, capsys, f"--workdir={workdir}", f"--dataset={dataset.path}",
                                f"--out={out}", "--config.eval.channels=DNA,RNA,Mito", "--config.eval.probe=False",
                                "--config.eval.n_boot=0", "--config.eval.mean_average_precision=False")
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        settings = report["map_settings"]
        assert settings["channels"] == ["DNA", "RNA", "Mito"] and settings["channel_ids"] == [0, 2, 4]
        assert settings["channel_index"] == [dataset.channels.index(c) for c in ("DNA", "RNA", "Mito")]
        recalls.append([[b["recall_mean"][k] for k in sorted(b["recall_mean"])] for b in report["blocks"]])
    np.testing.assert_allclose(recalls[0], recalls[1], atol=1e-6)
    code, _, err = run_eval(monkeypatch, capsys, f"--workdir={workdir}", f"--dataset={five.path}",
                            f"--out={tmp_path / 'bad'}", "--config.eval.channels=DNA,Golgi")
    assert code == 2 and err.strip().startswith(f"EvalSetupError: {five.path}: no channel 'Golgi' among its channels")


def test_the_trainer_refuses_a_mixture_its_model_cannot_take_in_one_line(screens, tmp_path, capsys):
    """`python -m maejax.train`'s run(): a fixed-channel MAE on a 6 + 5 channel mixture, and a mixture with a
    bad weight: one line on stderr, exit 2, no workdir."""
    from maejax.train import run
    from tests.tiny_training import tiny_config
    six, five = screens
    for mixture, expected in ((f"{six.path}=1,{five.path}=1", "ChannelError: the mae model takes one fixed list "
                                                              f"of channels, but {six.path} has ['DNA', "),
                              (f"{six.path}=heavy", f"MixtureError: data.mixture item '{six.path}=heavy': the "
                                                    f"weight 'heavy' is not a number (DIR=WEIGHT)")):
        config = tiny_config("", **{"data.mixture": mixture})
        assert run(config, str(tmp_path / "run")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(expected), err
        assert not (tmp_path / "run").exists()
