"""The models command without an object store: what makes a directory a model, and the NAME:VERSION spec."""

import pytest

from cluster.models import ModelsError, main, split_spec
from cluster.seed import default_model_dir
from cluster.settings import ClusterSettings
from serve_app.model_repository import NotAModelError, describe_model


def test_a_sentence_transformers_directory_gives_dims_max_tokens_and_pooling():
    described = describe_model(default_model_dir())
    assert described == {
        "framework": "transformers",
        "task": "embed",
        "dims": 384,
        "max_tokens": 256,  # sentence_bert_config.json's max_seq_length, not the 512 positions of config.json
        "pooling": "mean",
    }


def test_a_directory_that_is_not_a_model_is_refused_with_what_it_lacks(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(NotAModelError, match=r"no config\.json, no model\.safetensors or pytorch_model\.bin, no tok"):
        describe_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(NotAModelError, match="hidden_size"):
        describe_model(tmp_path)
    with pytest.raises(NotAModelError, match="not a directory"):
        describe_model(tmp_path / "config.json")


def test_a_version_is_named_name_colon_version():
    assert split_spec("my-model:2", version_required=True) == ("my-model", "2")
    assert split_spec("my-model", version_required=False) == ("my-model", None)
    with pytest.raises(ModelsError, match="NAME:VERSION"):
        split_spec("my-model", version_required=True)
    with pytest.raises(ValueError, match="model name"):
        split_spec("../etc:1", version_required=True)


def test_push_takes_a_directory_or_a_package_not_both_nor_neither(tmp_path, capsys):
    settings = ClusterSettings(state_dir=tmp_path)
    for argv in (
        ["push", "--name", "m", "--version", "1"],
        ["push", str(tmp_path), "--from-package", "x", "--name", "m", "--version", "1"],
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv, settings)
        assert exited.value.code == 2
    assert "one of them" in capsys.readouterr().err
    assert main(["push", "--from-package", "no-such-model-package", "--name", "m", "--version", "1"], settings) == 1
    assert "no installed package 'no-such-model-package'" in capsys.readouterr().err


def serve_config(version="1"):
    return {
        "applications": [
            {
                "args": {"model": "m"},
                "deployments": [{"name": "Gateway"}, {"name": "EmbeddingModel", "user_config": {"version": version}}],
            }
        ]
    }


def test_promote_records_the_version_to_roll_back_to_and_ends_a_canary_of_it():
    from cluster.models import pinned_user_config, set_canary, set_served

    config = serve_config()
    set_canary(config, "m", "2", 10)
    assert pinned_user_config(config, "m") == {"version": "1", "canary_version": "2", "canary_percent": 10}
    assert set_served(config, "m", "2") == "1"
    assert pinned_user_config(config, "m") == {"version": "2", "previous_version": "1"}
    assert set_served(config, "m", "1") == "2"  # a rollback is a promote of the previous version
    assert pinned_user_config(config, "m") == {"version": "1", "previous_version": "2"}
    set_canary(config, "m", "3", 5)
    set_canary(config, "m", None, 0)
    assert "canary_version" not in pinned_user_config(config, "m")


def test_only_a_pinned_model_is_promoted_and_a_canary_is_another_version():
    from cluster.models import set_canary, set_served

    with pytest.raises(ModelsError, match="not pinned by the Serve config"):
        set_served(serve_config(), "other", "2")
    with pytest.raises(ModelsError, match="already the served version"):
        set_canary(serve_config(), "m", "1", 10)
    with pytest.raises(ModelsError, match="must be in"):
        set_canary(serve_config(), "m", "2", 150)


def test_more_pinned_models_are_found_by_their_deployment():
    from cluster.models import pinned_user_config, set_served

    config = serve_config()
    config["applications"][0]["args"]["pinned"] = ["ranker"]
    assert set_served(config, "ranker", "2") is None  # no entry yet: one is made for Pinned-ranker
    [made] = [d for d in config["applications"][0]["deployments"] if d["name"] == "Pinned-ranker"]
    assert made["user_config"] == {"version": "2"}
    assert pinned_user_config(config, "m") == {"version": "1"}


def test_an_archive_that_reaches_outside_its_folder_is_refused(tmp_path):
    import io
    import tarfile

    from serve_app.http.routes.admin import _push_archive

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.TarError):
        _push_archive(None, archive, "m", "1", None)
    assert not (tmp_path.parent / "escaped.txt").exists()
