import pytest


@pytest.fixture(scope="session")
def reasoner_dir(tmp_path_factory):
    """A tiny LoopLM reasoner folder with a sentencepiece tokenizer for the synthetic tasks."""
    from helpers.models import tiny_model
    from pretrain.data import train_sentencepiece
    from pretrain.data.synthetic import default_corpus

    folder = tmp_path_factory.mktemp("reasoner")
    train_sentencepiece(default_corpus(seed=1234, mano_train=2000)[0], folder / "tokenizer.model", 128)
    tiny_model(total_ut_steps=2, std=0.05).save_pretrained(folder)
    return folder
