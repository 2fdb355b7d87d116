import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The embedded default corpus, small, prepared once per test session."""
    from pretrain.data.synthetic import prepare_default_corpus

    path = tmp_path_factory.mktemp("corpus")
    prepare_default_corpus(path, seed=1234, mano_train=3000)
    return path
