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


@pytest.fixture(scope="session")
def llama_dir(reasoner_dir, tmp_path_factory):
    """A tiny standard (Llama) reasoner folder sharing the sentencepiece tokenizer."""
    import shutil

    from helpers.reasoners import tiny_llama

    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    shutil.copy(reasoner_dir / "tokenizer.model", folder / "tokenizer.model")
    return folder
